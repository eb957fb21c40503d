//! Placement: which host a new (or homeless) VM goes to, and why — or what is missing.
//!
//! Pure and deterministic: the same specs and observed hosts give the same answer.
//! Rules, in order:
//! 1. a pin (`host = ...`) is the only candidate;
//! 2. a host must be reachable and `state = "active"` (maintenance receives nothing);
//! 3. the host has what the VM needs besides room: every network of its NICs (listed in
//!    the host's `networks`, its bridge present) and its named CPU model ([`super::fit`]);
//! 4. memory is never overcommitted; vCPUs up to `[placement] vcpu_overcommit` × CPUs;
//!    a host port forwarded to a guest (`tcp:2222:22`) has one VM per host;
//! 5. among fitting hosts: fewest VMs of the same anti-affinity `group`, then most free
//!    memory, then name.
//!
//! Placement is sticky: it is only asked for VMs that have no instance anywhere. When
//! VMs compete for the room left, the planner asks for the higher `priority` first
//! (equal ones by name), so what does not fit is the least important.
//!
//! Two ways to the same answer: [`Load::place_where`] walks every host and checks each
//! rule in the order above (it also says why each host was refused); new VMs go through
//! [`quick`], which answers the same from arrays of free room and hosts that fit each
//! kind of VM (100,000 VMs on 1,000 hosts: BENCHMARKS.md, "Planning 100,000 VMs"), and
//! asks the walk whenever it cannot (a pin, no host fits: the walk explains why).

mod quick;

use std::collections::{BTreeMap, BTreeSet};

use plasmavmc_specs::{Desired, Forward, HostEntry, HostState, VmEntry, VmSpec};

use super::fit::{self, Facts, Lack};
use crate::observe::{Capacity, Observed};

/// What each host has and has handed out, kept up to date while one plan places VMs.
#[derive(Debug, Clone, Default)]
pub struct Load {
    /// Every reachable host, ordered by name: a host's index here is its rank by name.
    hosts: Vec<(String, HostLoad)>,
    /// VMs per anti-affinity group, per host index.
    groups: BTreeMap<String, Members>,
    /// The hosts (indexes) where each forwarded host port (`udp`, port) is taken.
    port_hosts: BTreeMap<(bool, u16), BTreeSet<usize>>,
    /// Free room per host and the hosts each kind of VM may go to, for [`quick`].
    quick: quick::Quick,
}

#[derive(Debug, Clone, Default)]
struct HostLoad {
    capacity: Capacity,
    used: Capacity,
    /// Its bridges and CPU, for what VMs need besides room.
    facts: Facts,
    /// Host ports forwarded to guests (`udp`, port) and the VM that has each: one user
    /// per port and host, or the second QEMU cannot start.
    ports: BTreeMap<(bool, u16), String>,
}

/// The VMs of one group per host (index): a map while few hosts have any, an array once
/// many do (the quick pick reads it per host, and a map of 1,000 hosts is slow to walk).
#[derive(Debug, Clone)]
enum Members {
    Few(BTreeMap<usize, u32>),
    Many(Vec<u32>),
}

impl Members {
    fn count(&self, i: usize) -> u32 {
        match self {
            Self::Few(map) => map.get(&i).copied().unwrap_or(0),
            Self::Many(all) => all[i],
        }
    }

    /// One more on host `i` of `hosts`.
    fn add(&mut self, i: usize, hosts: usize) {
        match self {
            Self::Few(map) => {
                *map.entry(i).or_default() += 1;
                if map.len() > hosts / 16 {
                    let mut all = vec![0; hosts];
                    for (&h, &n) in &*map {
                        all[h] = n;
                    }
                    *self = Self::Many(all);
                }
            }
            Self::Many(all) => all[i] += 1,
        }
    }

    /// One fewer on host `i` (if it had any).
    fn remove(&mut self, i: usize) {
        let n = match self {
            Self::Few(map) => map.get_mut(&i),
            Self::Many(all) => all.get_mut(i),
        };
        if let Some(n) = n {
            *n = n.saturating_sub(1);
        }
    }
}

/// Where a VM goes and the reason, for the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub host: String,
    pub why: String,
}

impl Load {
    /// The load of every reachable host: capacity from the host spec (or what the host
    /// reports), use from the instances it has that should run (`copies`: those of
    /// `observed`, by VM, [`super::copies_by_vm`]).
    pub(crate) fn new(desired: &Desired, observed: &Observed, copies: &super::Copies<'_>) -> Self {
        let mut hosts = Vec::with_capacity(observed.hosts.len());
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
                facts: Facts::of(inv),
                ..HostLoad::default()
            };
            hosts.push((name.clone(), load));
        }
        let mut out = Self {
            quick: quick::Quick::new(desired, &hosts),
            hosts,
            ..Self::default()
        };
        // A placed VM of the specs reserves its share where it stays (one copy, as the
        // planner keeps it), even while stopped: it may be started any time. Copies being
        // deleted, and VMs leaving the specs, free theirs for this plan.
        for (vm, want) in &desired.vms {
            let copies = super::copies_in(copies, vm);
            if copies.is_empty() {
                continue;
            }
            let (host, _) = super::recover::keeper(observed, vm, copies);
            if let Some(i) = out.index_of(host) {
                out.add(i, vm, &want.spec);
            }
        }
        // A VM with actions in flight may end up on any host they touch (a move's target,
        // or its source if the move fails): booked on each, until it has settled.
        for (vm, touched) in &observed.in_flight {
            let Some(want) = desired.vms.get(vm) else {
                continue;
            };
            let copies = super::copies_in(copies, vm);
            let keeper =
                (!copies.is_empty()).then(|| super::recover::keeper(observed, vm, copies).0);
            for host in touched.iter().filter(|h| Some(h.as_str()) != keeper) {
                if let Some(i) = out.index_of(host) {
                    out.add(i, vm, &want.spec);
                }
            }
        }
        out
    }

    /// The index of reachable host `host`.
    fn index_of(&self, host: &str) -> Option<usize> {
        self.hosts
            .binary_search_by(|(name, _)| name.as_str().cmp(host))
            .ok()
    }

    /// VMs of `group` on host `i`.
    fn group_count(&self, group: Option<&String>, i: usize) -> u32 {
        group
            .and_then(|g| self.groups.get(g))
            .map_or(0, |members| members.count(i))
    }

    /// Picks a host for `vm` and books its resources there.
    pub fn place(&mut self, desired: &Desired, vm: &VmEntry) -> Result<Placement, String> {
        match self.place_quick(desired, vm) {
            Some(placement) => Ok(placement),
            None => self.place_where(desired, vm, |_| Ok(())),
        }
    }

    /// [`Load::place`] for a new VM: the same host as
    /// `place_where(desired, vm, storage_fit(desired, vm))` (a host without shared
    /// storage lacks what a shared disk needs anyway), found without visiting every host.
    pub(super) fn place_new(
        &mut self,
        desired: &Desired,
        vm: &VmEntry,
    ) -> Result<Placement, String> {
        match self.place_quick(desired, vm) {
            Some(placement) => Ok(placement),
            None => self.place_where(desired, vm, super::migrate::storage_fit(desired, vm)),
        }
    }

    /// [`Load::place`] among the hosts `allowed` accepts (its `Err` is the reason a host
    /// is not a candidate, for the explanation). Walks every host: the reference the
    /// quick pick ([`quick`]) is tested against.
    pub fn place_where(
        &mut self,
        desired: &Desired,
        vm: &VmEntry,
        allowed: impl Fn(&str) -> Result<(), String>,
    ) -> Result<Placement, String> {
        let spec = &vm.spec;
        let ratio = desired.cluster.placement.vcpu_overcommit;
        let mut refusals = Vec::new();
        let mut lacks: Vec<Lack> = Vec::new();
        // Asked of every host, so parsed once per VM, not per host.
        let forwards: Vec<Forward> = spec.forwards().collect();
        // The best fitting host so far (fewest of its group, most free memory, name)
        // and how many fit: a scan, not a sort.
        let mut best: Option<(u32, std::cmp::Reverse<u64>, usize)> = None;
        let mut fitting = 0usize;
        let candidates: Vec<(&String, &HostEntry)> = match &spec.host {
            Some(pin) => desired.hosts.get_key_value(pin).into_iter().collect(),
            None => desired.hosts.iter().collect(),
        };
        // Both are ordered by name: walked together, not a lookup per host.
        let mut loads = self.hosts.iter().enumerate().peekable();
        for (name, entry) in candidates {
            while loads.next_if(|(_, (h, _))| h < name).is_some() {}
            let Some((i, (_, load))) = loads.next_if(|(_, (h, _))| h == name) else {
                refusals.push(format!("{name} unreachable"));
                continue;
            };
            if let Err(why) = allowed(name) {
                refusals.push(format!("{name} {why}"));
                continue;
            }
            if entry.spec.state == HostState::Maintenance {
                refusals.push(format!("{name} in maintenance"));
                continue;
            }
            if let Some(lack) = fit::lack(desired, name, &load.facts, spec) {
                lacks.push(lack);
                continue;
            }
            if let Some(taken) = load.port_taken(&forwards) {
                refusals.push(format!("{name} {taken}"));
                continue;
            }
            let free_mem = load.free_memory();
            if free_mem < spec.memory_mb {
                refusals.push(format!("{name} has {free_mem} MB free"));
                continue;
            }
            let free_vcpus = load.free_vcpus(ratio);
            if free_vcpus < spec.vcpus {
                refusals.push(format!("{name} has {free_vcpus} vCPUs free"));
                continue;
            }
            let same_group = self.group_count(spec.group.as_ref(), i);
            fitting += 1;
            let this = (same_group, std::cmp::Reverse(free_mem), i);
            if best.as_ref().is_none_or(|b| this < *b) {
                best = Some(this);
            }
        }
        let Some((same_group, std::cmp::Reverse(free_mem), i)) = best else {
            return Err(explain(spec, &lacks, &refusals));
        };
        Ok(self.book(vm, i, (same_group, free_mem, fitting)))
    }

    /// Books `vm` on host `i`, chosen among `fitting` hosts with `same_group` VMs of its
    /// group and `free_mem` MB free, and says why it went there.
    fn book(
        &mut self,
        vm: &VmEntry,
        i: usize,
        (same_group, free_mem, fitting): (u32, u64, usize),
    ) -> Placement {
        let spec = &vm.spec;
        let host = self.hosts[i].0.clone();
        let mut why = format!(
            "{free_mem} MB free, the most of {fitting} fitting host{}",
            if fitting == 1 { "" } else { "s" }
        );
        if spec.host.is_some() {
            why = format!("pinned; {free_mem} MB free");
        } else if let Some(group) = &spec.group {
            why = format!(
                "{same_group} other VM{} of group {group} there; {why}",
                if same_group == 1 { "" } else { "s" }
            );
        }
        self.add(i, &vm.name, spec);
        Placement { host, why }
    }
}

/// Why no host took `spec`: per need, the hosts that lack it ("needs network lan: hv2 has
/// no bridge br-lan, hv3 does not list it in networks"), then the hosts refused for room,
/// state or reachability ("needs 256 MB and 1 vCPUs: hv1 has 100 MB free").
fn explain(spec: &plasmavmc_specs::VmSpec, lacks: &[Lack], refusals: &[String]) -> String {
    let mut needs: Vec<&str> = Vec::new();
    for lack in lacks {
        if !needs.contains(&lack.need.as_str()) {
            needs.push(&lack.need);
        }
    }
    let mut parts: Vec<String> = needs
        .iter()
        .map(|need| {
            let whys: Vec<&str> = lacks
                .iter()
                .filter(|l| l.need == *need)
                .map(|l| l.why.as_str())
                .collect();
            format!("needs {need}: {}", whys.join(", "))
        })
        .collect();
    if !refusals.is_empty() || parts.is_empty() {
        let what = if refusals.is_empty() {
            "no host matches".to_owned()
        } else {
            refusals.join(", ")
        };
        parts.push(format!(
            "needs {} MB and {} vCPUs: {what}",
            spec.memory_mb, spec.vcpus
        ));
    }
    parts.join("; ")
}

impl Load {
    /// Books `spec`'s share (VM `vm`) on host `i`: room, its group, its forwarded host
    /// ports.
    fn add(&mut self, i: usize, vm: &str, spec: &VmSpec) {
        let load = &mut self.hosts[i].1;
        load.used.vcpus = load.used.vcpus.saturating_add(spec.vcpus);
        load.used.memory_mb = load.used.memory_mb.saturating_add(spec.memory_mb);
        for fwd in spec.forwards() {
            let key = (fwd.udp, fwd.host_port);
            if let std::collections::btree_map::Entry::Vacant(free) = load.ports.entry(key) {
                free.insert(vm.to_owned());
                self.port_hosts.entry(key).or_default().insert(i);
            }
        }
        if let Some(g) = &spec.group {
            let hosts = self.hosts.len();
            if !self.groups.contains_key(g) {
                self.groups.insert(g.clone(), Members::Few(BTreeMap::new()));
            }
            if let Some(members) = self.groups.get_mut(g) {
                members.add(i, hosts);
            }
        }
        self.quick.changed(i, &self.hosts[i].1);
    }

    /// Gives back what `vm` booked on `host`: it is moving away.
    pub fn release(&mut self, host: &str, vm: &VmEntry) {
        let Some(i) = self.index_of(host) else {
            return;
        };
        let spec = &vm.spec;
        let load = &mut self.hosts[i].1;
        load.used.vcpus = load.used.vcpus.saturating_sub(spec.vcpus);
        load.used.memory_mb = load.used.memory_mb.saturating_sub(spec.memory_mb);
        let port_hosts = &mut self.port_hosts;
        load.ports.retain(|key, user| {
            let keep = *user != vm.name;
            if !keep {
                if let Some(hosts) = port_hosts.get_mut(key) {
                    hosts.remove(&i);
                }
            }
            keep
        });
        if let Some(members) = spec.group.as_ref().and_then(|g| self.groups.get_mut(g)) {
            members.remove(i);
        }
        self.quick.changed(i, &self.hosts[i].1);
    }
}

impl HostLoad {
    /// Memory not handed out.
    fn free_memory(&self) -> u64 {
        self.capacity.memory_mb.saturating_sub(self.used.memory_mb)
    }

    /// vCPUs not handed out, up to `ratio` × its CPUs.
    fn free_vcpus(&self, ratio: f64) -> u32 {
        // The ratio is validated to 0.1..=64, so the product is positive and in range.
        #[allow(clippy::cast_sign_loss)]
        let vcpu_limit = (f64::from(self.capacity.vcpus) * ratio).floor() as u32;
        vcpu_limit.saturating_sub(self.used.vcpus)
    }

    /// The first host port of `forwards` (a VM's) that another VM has here, said for the
    /// plan.
    fn port_taken(&self, forwards: &[Forward]) -> Option<String> {
        forwards.iter().find_map(|fwd| {
            let user = self.ports.get(&(fwd.udp, fwd.host_port))?;
            let proto = if fwd.udp { "udp" } else { "tcp" };
            Some(format!(
                "has host port {proto}:{} forwarded to VM {user}",
                fwd.host_port
            ))
        })
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
        let mut load = Load::new(&d, &o, &crate::plan::copies_by_vm(&o));
        let placed: Vec<String> = ["a", "b", "c", "d"]
            .iter()
            .map(|v| load.place(&d, &d.vms[*v]).expect("fits").host)
            .collect();
        assert_eq!(placed, ["hv1", "hv2", "hv3", "hv1"]);
    }

    #[test]
    fn a_forwarded_host_port_has_one_vm_per_host() {
        let fwd = "[[nics]]\nforward = [\"tcp:2222:22\"]";
        let mut files = THREE[..2].to_vec();
        files.extend([
            ("vms/a.toml", fwd),
            ("vms/b.toml", fwd),
            ("vms/c.toml", fwd),
        ]);
        let d = desired(&files);
        let o = hosts(&[("hv1", 4, 4096), ("hv2", 4, 4096)]);
        let mut load = Load::new(&d, &o, &crate::plan::copies_by_vm(&o));
        let a = load.place(&d, &d.vms["a"]).expect("a fits").host;
        let b = load.place(&d, &d.vms["b"]).expect("b fits").host;
        assert_ne!(a, b, "two users of tcp:2222 on one host");
        let err = load.place(&d, &d.vms["c"]).expect_err("no port left");
        assert!(
            err.contains("hv1 has host port tcp:2222 forwarded to VM a")
                && err.contains("hv2 has host port tcp:2222 forwarded to VM b"),
            "{err}"
        );
        // A VM moving away gives its port back.
        load.release(&a, &d.vms["a"]);
        assert_eq!(load.place(&d, &d.vms["c"]).expect("c fits").host, a);
    }

    #[test]
    fn a_shared_disk_goes_only_where_shared_storage_is() {
        let files = [
            (
                "hosts/hv1.toml",
                "address = \"local\"\nshared_storage = \"/srv/pool\"\nstorage_pool = \"p\"",
            ),
            ("hosts/hv2.toml", "address = \"local\""),
            (
                "vms/a.toml",
                "memory_mb = 512\n[[disks]]\nname = \"d\"\nsize_gb = 1\nstorage = \"shared\"",
            ),
        ];
        let d = desired(&files);
        let roomy = hosts(&[("hv1", 4, 1024), ("hv2", 4, 8192)]);
        let placed = Load::new(&d, &roomy, &crate::plan::copies_by_vm(&roomy))
            .place(&d, &d.vms["a"])
            .expect("fits");
        assert_eq!(
            placed.host, "hv1",
            "hv2 has more memory but no shared storage"
        );
        let full = hosts(&[("hv1", 4, 256), ("hv2", 4, 8192)]);
        let err = Load::new(&d, &full, &crate::plan::copies_by_vm(&full))
            .place(&d, &d.vms["a"])
            .expect_err("nowhere");
        assert!(
            err.contains("needs shared storage: hv2 has none (disk d has storage = \"shared\")")
                && err.contains("hv1 has 256 MB free"),
            "{err}"
        );
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
        let err = Load::new(&d, &o, &crate::plan::copies_by_vm(&o))
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
        let mut load = Load::new(&d, &o, &crate::plan::copies_by_vm(&o));
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
            let mut load = Load::new(&d, &o, &crate::plan::copies_by_vm(&o));
            ["a", "b"].map(|v| load.place(&d, &d.vms[v]).expect("fits"))
        };
        assert_eq!(run(), run());
    }
}

#[cfg(test)]
mod quick_tests;
