//! What a VM needs of a host besides room — a QEMU that runs and knows its machine type,
//! shared storage for its shared disks, the bridges of its networks, its CPU model —
//! and whether its CPU lets it move live between two hosts.
//!
//! In: the specs and each host's inventory (its bridges, its CPU as the agent reports
//! them). Out: the first thing a host lacks, said for the plan; the reason a live move
//! must be cold. Pure; placement ([`super::place`]) asks it for every candidate, so
//! creation, recovery and moves all obey it.
//! ```text
//! any VM                      ─> host's QEMU runs and knows the VM's machine type
//! disk storage = "shared"     ─> host has `shared_storage`
//! NIC on network N (not user) ─> host lists N in `networks` ─> N's bridge in its inventory
//! cpu = MODEL (not host)      ─> host reported its CPU and MODEL is among its usable models
//! live move, guest on the host's CPU (cpu = "host", or no cpu and not accel = "tcg")
//!                             ─> both hosts reported their CPU, same digest; else cold
//! ```

use plasmavmc_specs::net::HOST_CPU;
use plasmavmc_specs::{Accel, Desired, Power, Storage, VmEntry, VmSpec};

use super::{Action, Plan};
use crate::observe::{HostCpu, HostQemu, Inventory, Observed};

/// What placement must know of a host beyond its capacity, from its inventory.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    bridges: Vec<String>,
    cpu: Option<HostCpu>,
    qemu: Option<HostQemu>,
}

impl Facts {
    pub fn of(inv: &Inventory) -> Self {
        Self {
            bridges: inv.bridges.clone(),
            cpu: inv.cpu.clone(),
            qemu: inv.qemu.clone(),
        }
    }
}

/// Something a VM needs that a host lacks: `need` ("network lan", "CPU model X") and why
/// the host does not have it ("hv2 has no bridge br-lan").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lack {
    pub need: String,
    pub why: String,
}

impl std::fmt::Display for Lack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "needs {}: {}", self.need, self.why)
    }
}

/// The declared networks of `spec`'s NICs (not `user`), each once, in NIC order.
pub fn networks(spec: &VmSpec) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for nic in spec.nics.iter().filter(|n| !n.network.is_user()) {
        if !out.contains(&nic.network.as_str()) {
            out.push(nic.network.as_str());
        }
    }
    out
}

/// The named CPU model `spec` asks for (`None` for `host` or no model).
pub fn named_model(spec: &VmSpec) -> Option<&str> {
    spec.qemu.cpu.as_deref().filter(|m| *m != HOST_CPU)
}

/// Everything [`lack`] reads of a VM's spec: VMs with equal needs fit the same hosts.
/// (Placement works out once per kind of VM which hosts those are: a field [`lack`] comes
/// to read must be added here.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needs {
    machine: String,
    shared: bool,
    networks: Vec<String>,
    model: Option<String>,
    accel: Accel,
}

impl Needs {
    pub fn of(spec: &VmSpec) -> Self {
        Self {
            machine: spec.qemu.machine.clone(),
            shared: needs_shared(spec),
            networks: networks(spec).into_iter().map(str::to_owned).collect(),
            model: named_model(spec).map(str::to_owned),
            accel: spec.qemu.accel,
        }
    }

    /// Whether `spec` has these needs (what `Needs::of(spec) == *self` says, without
    /// copying).
    pub fn of_spec(&self, spec: &VmSpec) -> bool {
        self.machine == spec.qemu.machine
            && self.shared == needs_shared(spec)
            && self.model.as_deref() == named_model(spec)
            && self.accel == spec.qemu.accel
            && self.networks.iter().map(String::as_str).eq(networks(spec))
    }
}

/// Whether a disk of `spec` must be on shared storage.
fn needs_shared(spec: &VmSpec) -> bool {
    spec.disks.iter().any(|d| d.storage == Storage::Shared)
}

/// The first thing `spec` needs that `host` (with `facts`) lacks, or `None` when it fits.
pub fn lack(desired: &Desired, host: &str, facts: &Facts, spec: &VmSpec) -> Option<Lack> {
    if let Some(lack) = qemu_lack(host, facts.qemu.as_ref(), spec) {
        return Some(lack);
    }
    // Looked up only for a VM that needs more than room: placement asks this of every
    // host for every VM (BENCHMARKS.md, "Fleet scale").
    let host_spec = || desired.hosts.get(host).map(|h| &h.spec);
    if let Some(disk) = spec.disks.iter().find(|d| d.storage == Storage::Shared) {
        if host_spec().is_none_or(|h| h.shared_storage.is_none()) {
            return Some(Lack {
                need: "shared storage".to_owned(),
                why: format!(
                    "{host} has none (disk {} has storage = \"shared\")",
                    disk.name
                ),
            });
        }
    }
    let declared = networks(spec);
    let listed = if declared.is_empty() {
        None
    } else {
        host_spec().map(|h| h.networks.as_slice())
    };
    for net in declared {
        let need = format!("network {net}");
        if !listed.is_some_and(|l| l.iter().any(|n| n == net)) {
            let why = format!("{host} does not list it in networks");
            return Some(Lack { need, why });
        }
        let Some(def) = desired.cluster.networks.get(net) else {
            let why = "it is not declared in plasmavmc.toml".to_owned();
            return Some(Lack { need, why });
        };
        if !facts.bridges.contains(&def.bridge) {
            let why = format!("{host} has no bridge {}", def.bridge);
            return Some(Lack { need, why });
        }
    }
    let model = named_model(spec)?;
    let need = format!("CPU model {model}");
    let accel = accel_on(desired, spec, host);
    let why = match &facts.cpu {
        None => format!("{host} has not reported its CPU"),
        Some(cpu) if !cpu.models_for(accel).iter().any(|m| m == model) => {
            let under = if accel == Accel::Tcg {
                " under tcg"
            } else {
                ""
            };
            format!("{host} cannot run it{under}")
        }
        Some(_) => return None,
    };
    Some(Lack { need, why })
}

/// What `host`'s QEMU cannot do for `spec`: run at all, or its machine type. Nothing is
/// said of a host that did not report its QEMU (an older agent).
fn qemu_lack(host: &str, qemu: Option<&HostQemu>, spec: &VmSpec) -> Option<Lack> {
    let qemu = qemu?;
    if let Some(problem) = &qemu.problem {
        return Some(Lack {
            need: "QEMU".to_owned(),
            why: format!("{host}: {problem}"),
        });
    }
    let machine = &spec.qemu.machine;
    if qemu.machines.is_empty() || qemu.machines.iter().any(|m| m == machine) {
        return None;
    }
    let version = qemu.version.as_deref().unwrap_or("of unknown version");
    Some(Lack {
        need: format!("QEMU machine type {machine}"),
        why: format!("{host}'s QEMU {version} does not know it"),
    })
}

/// The accelerator `spec` asks for on `host`: the VM's, or under `auto` the host's
/// (`auto` again when both say `auto`: KVM where `/dev/kvm` opens).
fn accel_on(desired: &Desired, spec: &VmSpec, host: &str) -> Accel {
    match spec.qemu.accel {
        Accel::Auto => desired
            .hosts
            .get(host)
            .map_or(Accel::Auto, |h| h.spec.accel),
        other => other,
    }
}

/// Whether `spec`'s guest may see `host`'s own CPU (`-cpu host`): `cpu = "host"`, or no
/// `cpu` unless it runs under TCG. The agent gives a VM without `cpu` the host's CPU
/// whenever it runs under KVM, and `auto` (the VM's `accel`, then the host's) is KVM on
/// any host where `/dev/kvm` opens, which the plan cannot see: so only `tcg`, the VM's or
/// its host's, is known to use QEMU's default model.
pub fn uses_host_cpu(desired: &Desired, spec: &VmSpec, host: &str) -> bool {
    if let Some(model) = spec.qemu.cpu.as_deref() {
        return model == HOST_CPU;
    }
    accel_on(desired, spec, host) != Accel::Tcg
}

/// Why `spec` must not move live from `from` to `to` because of its CPU, or `None`: a
/// guest on the host's CPU moves live only between hosts that reported the same CPU
/// (equal digests). The text ends in "moving cold", for the action's reason.
pub fn live_cpu_problem(
    desired: &Desired,
    observed: &Observed,
    spec: &VmSpec,
    from: &str,
    to: &str,
) -> Option<String> {
    if !uses_host_cpu(desired, spec, from) && !uses_host_cpu(desired, spec, to) {
        return None;
    }
    let what = if spec.qemu.cpu.is_some() {
        "cpu = host"
    } else {
        "cpu = host by default (no cpu, accel not \"tcg\")"
    };
    let digest = |h: &str| {
        observed
            .hosts
            .get(h)
            .and_then(|i| i.cpu.as_ref())
            .map(|c| c.digest.as_str())
            .filter(|d| !d.is_empty())
    };
    match (digest(from), digest(to)) {
        (Some(a), Some(b)) if a == b => None,
        (Some(_), Some(_)) => Some(format!(
            "{what}: {from} and {to} have different CPUs; moving cold"
        )),
        (a, b) => {
            let unknown: Vec<&str> = [(from, a), (to, b)]
                .into_iter()
                .filter(|(_, d)| d.is_none())
                .map(|(h, _)| h)
                .collect();
            let (who, has) = match unknown.as_slice() {
                [one] => ((*one).to_owned(), "has"),
                _ => (unknown.join(" and "), "have"),
            };
            Some(format!(
                "{what}: {who} {has} not reported {} CPU, so the CPUs cannot be compared; moving cold",
                if has == "has" { "its" } else { "their" }
            ))
        }
    }
}

/// A VM that stays on `host` but cannot start there (its spec needs a network or CPU
/// model `host` lacks): drops the starts and restarts planned for it from `actions[from..]`
/// and says why it is pending. Nothing of it is started; a running QEMU keeps running.
pub(super) fn hold_starts(
    desired: &Desired,
    observed: &Observed,
    want: &VmEntry,
    host: &str,
    from: usize,
    out: &mut Plan,
) {
    let facts = observed.hosts.get(host).map(Facts::of).unwrap_or_default();
    let Some(lack) = lack(desired, host, &facts, &want.spec) else {
        return;
    };
    let mut held = false;
    let mut i = from;
    while i < out.actions.len() {
        let starts = matches!(
            &out.actions[i],
            Action::Start { .. } | Action::Restart { .. }
        );
        if starts && out.actions[i].vm() == want.name {
            out.actions.remove(i);
            held = true;
        } else {
            i += 1;
        }
    }
    if held {
        let fix = if want.spec.host.is_some() {
            "change its pin to a host that has it, or provide it on"
        } else {
            "pin it to a host that has it (it moves there), or provide it on"
        };
        let running = if want.spec.power == Power::Running
            && observed
                .hosts
                .get(host)
                .and_then(|i| i.vms.get(&want.name))
                .is_some_and(|v| v.state.has_process())
        {
            " (the running QEMU is left as it is)"
        } else {
            ""
        };
        out.pend(
            &want.name,
            format!("{lack}; not started on {host}, where it is placed{running}: {fix} {host}"),
        );
    }
}
