//! The quick pick: the host [`Load::place_where`] would choose for a VM without a pin,
//! without asking every host every rule.
//!
//! What a host has for any VM of one kind (in the specs, `active`, lacking nothing the
//! kind needs: [`fit::Needs`]) does not change during a plan: worked out once per kind.
//! What changes as VMs are booked (free memory and vCPUs) is kept in one array, updated
//! by every booking and release; a VM's group and host ports mark the few hosts they
//! concern before the pass over the array and are cleared after. The pass then compares
//! plain numbers: the same rules, the same order (fewest of the group, most free memory,
//! name = index) and the same count of fitting hosts as the walk. Whatever it cannot
//! answer — a pin, another `Desired` than the load was built from, no fitting host (the
//! walk says why) — is left to the walk. `proptests` check both give the same answers.

use std::cmp::Reverse;

use plasmavmc_specs::{Desired, HostState, VmEntry, VmSpec};

use super::{HostLoad, Load, Members, Placement};
use crate::plan::fit;

/// At most this many kinds of VM are remembered; a VM of yet another kind takes the walk.
const KINDS: usize = 64;

/// A host's free room, as placement counts it.
#[derive(Debug, Clone, Copy, Default)]
struct Room {
    memory_mb: u64,
    vcpus: u32,
}

/// What the quick pick keeps per host, by host index ([`Load`]'s order).
#[derive(Debug, Clone, Default)]
pub(super) struct Quick {
    /// The specs the load was built from (their address) and their vCPU ratio: what
    /// follows holds only for them.
    built_for: usize,
    ratio: f64,
    room: Vec<Room>,
    /// Per kind of VM, the hosts it may go to if there is room.
    kinds: Vec<(fit::Needs, Vec<bool>)>,
    /// Per host, during one pick: may it take the VM (its kind, its host ports), and
    /// how many VMs of the VM's group it has (for a group few hosts have; all zero
    /// between picks).
    open: Vec<bool>,
    same_group: Vec<u32>,
}

impl Quick {
    pub(super) fn new(desired: &Desired, hosts: &[(String, HostLoad)]) -> Self {
        let ratio = desired.cluster.placement.vcpu_overcommit;
        Self {
            built_for: std::ptr::from_ref(desired) as usize,
            ratio,
            room: hosts.iter().map(|(_, h)| room(h, ratio)).collect(),
            kinds: Vec::new(),
            open: vec![false; hosts.len()],
            same_group: vec![0; hosts.len()],
        }
    }

    /// Host `i`'s use changed to `load`'s.
    pub(super) fn changed(&mut self, i: usize, load: &HostLoad) {
        self.room[i] = room(load, self.ratio);
    }

    /// The index in `kinds` of `spec`'s kind, worked out on first sight (`None`: too
    /// many kinds).
    fn kind(
        &mut self,
        desired: &Desired,
        hosts: &[(String, HostLoad)],
        spec: &VmSpec,
    ) -> Option<usize> {
        if let Some(k) = self.kinds.iter().position(|(n, _)| n.of_spec(spec)) {
            return Some(k);
        }
        if self.kinds.len() >= KINDS {
            return None;
        }
        let open = hosts
            .iter()
            .map(|(name, load)| {
                desired.hosts.get(name).is_some_and(|entry| {
                    entry.spec.state != HostState::Maintenance
                        && fit::lack(desired, name, &load.facts, spec).is_none()
                })
            })
            .collect();
        self.kinds.push((fit::Needs::of(spec), open));
        Some(self.kinds.len() - 1)
    }

    /// Of the `open` hosts with `memory_mb` and `vcpus` free, the best (fewest of the
    /// group by `same_group`, most free memory, first index) as (index, VMs of the
    /// group, free memory), and how many there are.
    fn best(
        &self,
        same_group: &[u32],
        memory_mb: u64,
        vcpus: u32,
    ) -> Option<((usize, u32, u64), usize)> {
        let mut best: Option<(u32, Reverse<u64>, usize)> = None;
        let mut fitting = 0usize;
        let hosts = self.room.iter().zip(&self.open).zip(same_group);
        for (i, ((room, &open), &same)) in hosts.enumerate() {
            if !open || room.memory_mb < memory_mb || room.vcpus < vcpus {
                continue;
            }
            fitting += 1;
            let this = (same, Reverse(room.memory_mb), i);
            if best.is_none_or(|b| this < b) {
                best = Some(this);
            }
        }
        best.map(|(same, Reverse(free), i)| ((i, same, free), fitting))
    }
}

/// The free room of `load`, vCPUs up to `ratio` × its CPUs.
fn room(load: &HostLoad, ratio: f64) -> Room {
    Room {
        memory_mb: load.free_memory(),
        vcpus: load.free_vcpus(ratio),
    }
}

impl Load {
    /// What [`Load::place`] picks for `vm`, booked; `None` when the walk must answer.
    pub(super) fn place_quick(&mut self, desired: &Desired, vm: &VmEntry) -> Option<Placement> {
        let spec = &vm.spec;
        let built_for = std::ptr::from_ref(desired) as usize == self.quick.built_for;
        if spec.host.is_some() || !built_for {
            return None;
        }
        let kind = self.quick.kind(desired, &self.hosts, spec)?;
        let quick = &mut self.quick;
        quick.open.copy_from_slice(&quick.kinds[kind].1);
        for fwd in spec.forwards() {
            let taken = self.port_hosts.get(&(fwd.udp, fwd.host_port));
            for &i in taken.into_iter().flatten() {
                quick.open[i] = false;
            }
        }
        let best = match spec.group.as_ref().and_then(|g| self.groups.get(g)) {
            Some(Members::Many(all)) => quick.best(all, spec.memory_mb, spec.vcpus),
            Some(Members::Few(few)) => {
                let mut same_group = std::mem::take(&mut quick.same_group);
                for (&i, &n) in few {
                    same_group[i] = n;
                }
                let best = quick.best(&same_group, spec.memory_mb, spec.vcpus);
                for &i in few.keys() {
                    same_group[i] = 0;
                }
                quick.same_group = same_group;
                best
            }
            None => quick.best(&quick.same_group, spec.memory_mb, spec.vcpus),
        };
        let ((i, same_group, free_mem), fitting) = best?;
        Some(self.book(vm, i, (same_group, free_mem, fitting)))
    }
}
