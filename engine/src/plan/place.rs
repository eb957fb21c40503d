//! Placement: which host a new (or homeless) VM goes to, and why — or what is missing.
//!
//! Pure and deterministic: the same specs and observed hosts give the same answer.
//! Rules, in order:
//! 1. a pin (`host = ...`) is the only candidate;
//! 2. a host must be reachable and `state = "active"` (maintenance receives nothing);
//! 3. memory is never overcommitted; vCPUs up to `[placement] vcpu_overcommit` × CPUs;
//! 4. among fitting hosts: fewest VMs of the same anti-affinity `group`, then most free
//!    memory, then name.
//!
//! Placement is sticky: it is only asked for VMs that have no instance anywhere. When
//! VMs compete for the room left, the planner asks for the higher `priority` first
//! (equal ones by name), so what does not fit is the least important.

use std::collections::BTreeMap;

use plasmavmc_specs::{Desired, HostState, VmEntry};

use crate::observe::{Capacity, Observed};

/// What each host has and has handed out, kept up to date while one plan places VMs.
#[derive(Debug, Clone, Default)]
pub struct Load {
    hosts: BTreeMap<String, HostLoad>,
}

#[derive(Debug, Clone, Default)]
struct HostLoad {
    capacity: Capacity,
    used: Capacity,
    /// VMs per anti-affinity group.
    groups: BTreeMap<String, u32>,
}

/// Where a VM goes and the reason, for the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub host: String,
    pub why: String,
}

impl Load {
    /// The load of every reachable host: capacity from the host spec (or what the host
    /// reports), use from the instances it has that should run.
    pub fn new(desired: &Desired, observed: &Observed) -> Self {
        let mut hosts = BTreeMap::new();
        for (name, inv) in &observed.hosts {
            let spec = desired.hosts.get(name).map(|h| &h.spec);
            let capacity = Capacity {
                vcpus: spec.and_then(|s| s.vcpus).unwrap_or(inv.capacity.vcpus),
                memory_mb: spec
                    .and_then(|s| s.memory_mb)
                    .unwrap_or(inv.capacity.memory_mb),
            };
            let load = HostLoad {
                capacity,
                ..HostLoad::default()
            };
            hosts.insert(name.clone(), load);
        }
        // A placed VM of the specs reserves its share where it stays (one copy, as the
        // planner keeps it), even while stopped: it may be started any time. Copies being
        // deleted, and VMs leaving the specs, free theirs for this plan.
        for (vm, want) in &desired.vms {
            let copies = observed.copies(vm);
            if copies.is_empty() {
                continue;
            }
            let (host, _) = super::recover::keeper(observed, vm, &copies);
            if let Some(load) = hosts.get_mut(host) {
                load.add(
                    want.spec.vcpus,
                    want.spec.memory_mb,
                    want.spec.group.as_deref(),
                );
            }
        }
        Self { hosts }
    }

    /// Picks a host for `vm` and books its resources there.
    pub fn place(&mut self, desired: &Desired, vm: &VmEntry) -> Result<Placement, String> {
        self.place_where(desired, vm, |_| Ok(()))
    }

    /// [`Load::place`] among the hosts `allowed` accepts (its `Err` is the reason a host
    /// is not a candidate, for the explanation).
    pub fn place_where(
        &mut self,
        desired: &Desired,
        vm: &VmEntry,
        allowed: impl Fn(&str) -> Result<(), String>,
    ) -> Result<Placement, String> {
        let spec = &vm.spec;
        let ratio = desired.cluster.placement.vcpu_overcommit;
        let mut refusals = Vec::new();
        let mut fitting = Vec::new();
        let candidates: Vec<&String> = match &spec.host {
            Some(pin) => desired.hosts.keys().filter(|h| *h == pin).collect(),
            None => desired.hosts.keys().collect(),
        };
        for name in candidates {
            let Some(load) = self.hosts.get(name) else {
                refusals.push(format!("{name} unreachable"));
                continue;
            };
            if let Err(why) = allowed(name) {
                refusals.push(format!("{name} {why}"));
                continue;
            }
            if desired
                .hosts
                .get(name)
                .is_some_and(|h| h.spec.state == HostState::Maintenance)
            {
                refusals.push(format!("{name} in maintenance"));
                continue;
            }
            let free_mem = load.capacity.memory_mb.saturating_sub(load.used.memory_mb);
            if free_mem < spec.memory_mb {
                refusals.push(format!("{name} has {free_mem} MB free"));
                continue;
            }
            // The ratio is validated to 0.1..=64, so the product is positive and in range.
            #[allow(clippy::cast_sign_loss)]
            let vcpu_limit = (f64::from(load.capacity.vcpus) * ratio).floor() as u32;
            let free_vcpus = vcpu_limit.saturating_sub(load.used.vcpus);
            if free_vcpus < spec.vcpus {
                refusals.push(format!("{name} has {free_vcpus} vCPUs free"));
                continue;
            }
            let same_group = spec
                .group
                .as_ref()
                .and_then(|g| load.groups.get(g))
                .copied()
                .unwrap_or(0);
            fitting.push((same_group, std::cmp::Reverse(free_mem), name.clone()));
        }
        fitting.sort();
        let Some((same_group, std::cmp::Reverse(free_mem), host)) = fitting.first().cloned() else {
            let needs = format!("needs {} MB and {} vCPUs", spec.memory_mb, spec.vcpus);
            let what = if refusals.is_empty() {
                "no host matches".to_owned()
            } else {
                refusals.join(", ")
            };
            return Err(format!("{needs}: {what}"));
        };
        let mut why = format!(
            "{free_mem} MB free, the most of {} fitting host{}",
            fitting.len(),
            if fitting.len() == 1 { "" } else { "s" }
        );
        if spec.host.is_some() {
            why = format!("pinned; {free_mem} MB free");
        } else if let Some(group) = &spec.group {
            why = format!(
                "{same_group} other VM{} of group {group} there; {why}",
                if same_group == 1 { "" } else { "s" }
            );
        }
        if let Some(load) = self.hosts.get_mut(&host) {
            load.add(spec.vcpus, spec.memory_mb, spec.group.as_deref());
        }
        Ok(Placement { host, why })
    }
}

impl Load {
    /// Gives back what `vm` booked on `host`: it is moving away.
    pub fn release(&mut self, host: &str, vm: &VmEntry) {
        if let Some(load) = self.hosts.get_mut(host) {
            let spec = &vm.spec;
            load.used.vcpus = load.used.vcpus.saturating_sub(spec.vcpus);
            load.used.memory_mb = load.used.memory_mb.saturating_sub(spec.memory_mb);
            if let Some(n) = spec.group.as_ref().and_then(|g| load.groups.get_mut(g)) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

impl HostLoad {
    fn add(&mut self, vcpus: u32, memory_mb: u64, group: Option<&str>) {
        self.used.vcpus = self.used.vcpus.saturating_add(vcpus);
        self.used.memory_mb = self.used.memory_mb.saturating_add(memory_mb);
        if let Some(g) = group {
            *self.groups.entry(g.to_owned()).or_default() += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::observe::Inventory;

    use crate::test_utils::desired;

    fn hosts(list: &[(&str, u32, u64)]) -> Observed {
        let hosts = list
            .iter()
            .map(|(n, vcpus, memory_mb)| {
                (
                    (*n).to_owned(),
                    Inventory {
                        bridges: Vec::new(),
                        cpu: None,
                        capacity: Capacity {
                            vcpus: *vcpus,
                            memory_mb: *memory_mb,
                        },
                        ..Inventory::default()
                    },
                )
            })
            .collect::<BTreeMap<_, _>>();
        Observed {
            hosts,
            ..Observed::default()
        }
    }

    const THREE: [(&str, &str); 3] = [
        ("hosts/hv1.toml", "address = \"local\""),
        ("hosts/hv2.toml", "address = \"local\""),
        ("hosts/hv3.toml", "address = \"local\""),
    ];

    #[test]
    fn a_group_spreads_over_hosts_then_doubles_up() {
        let mut files = THREE.to_vec();
        files.extend([
            ("vms/a.toml", "group = \"web\""),
            ("vms/b.toml", "group = \"web\""),
            ("vms/c.toml", "group = \"web\""),
            ("vms/d.toml", "group = \"web\""),
        ]);
        let d = desired(&files);
        let o = hosts(&[("hv1", 4, 4096), ("hv2", 4, 4096), ("hv3", 4, 4096)]);
        let mut load = Load::new(&d, &o);
        let placed: Vec<String> = ["a", "b", "c", "d"]
            .iter()
            .map(|v| load.place(&d, &d.vms[*v]).expect("fits").host)
            .collect();
        assert_eq!(placed, ["hv1", "hv2", "hv3", "hv1"]);
    }

    #[test]
    fn memory_is_never_overcommitted_and_the_refusal_says_what_is_missing() {
        let mut files = THREE[..2].to_vec();
        files.extend([
            (
                "hosts/hv3.toml",
                "address = \"local\"\nstate = \"maintenance\"",
            ),
            ("vms/big.toml", "memory_mb = 2048"),
        ]);
        let d = desired(&files);
        let o = hosts(&[("hv1", 4, 512), ("hv3", 4, 8192)]);
        let err = Load::new(&d, &o)
            .place(&d, &d.vms["big"])
            .expect_err("nowhere");
        assert_eq!(
            err,
            "needs 2048 MB and 1 vCPUs: hv1 has 512 MB free, hv2 unreachable, hv3 in maintenance"
        );
    }

    #[test]
    fn vcpus_overcommit_up_to_the_ratio_and_pins_are_honoured() {
        let mut files = THREE.to_vec();
        files.extend([
            ("plasmavmc.toml", "[placement]\nvcpu_overcommit = 2.0"),
            ("vms/a.toml", "vcpus = 4\nmemory_mb = 64"),
            ("vms/b.toml", "vcpus = 1\nmemory_mb = 64\nhost = \"hv2\""),
        ]);
        let d = desired(&files);
        let o = hosts(&[("hv1", 2, 1024), ("hv2", 1, 4096)]);
        let mut load = Load::new(&d, &o);
        assert_eq!(
            load.place(&d, &d.vms["a"])
                .expect("hv1 takes 4 of 2x2")
                .host,
            "hv1"
        );
        let b = load.place(&d, &d.vms["b"]).expect("pinned");
        assert_eq!(b.host, "hv2");
        assert!(b.why.starts_with("pinned"));
    }

    #[test]
    fn the_same_inputs_give_the_same_placements() {
        let mut files = THREE.to_vec();
        files.extend([("vms/a.toml", ""), ("vms/b.toml", "")]);
        let d = desired(&files);
        let o = hosts(&[("hv1", 4, 4096), ("hv2", 4, 4096), ("hv3", 4, 4096)]);
        let run = || {
            let mut load = Load::new(&d, &o);
            ["a", "b"].map(|v| load.place(&d, &d.vms[v]).expect("fits"))
        };
        assert_eq!(run(), run());
    }
}
