//! The planner: a pure function from (desired, observed) to a list of actions.
//!
//! In: the validated specs of one commit and what the hosts run. Out: a [`Plan`] —
//! actions with their reasons, and notes on what the planner will not do. It never
//! touches a socket, a file or a clock, so the same inputs always give the same plan.
//!
//! Per VM, highest `priority` first, equal ones by name — the order in which VMs compete
//! for capacity (new VMs placed, VMs of a fenced host recovered, one shared [`Load`]):
//! ```text
//! in specs, no instance         -> create, then start if power = running
//! same spec hash                -> start / stop to match power
//! spec changed, needs a reboot  -> restart (running) | update (+ start/stop)
//! spec changed, no reboot       -> update (+ start/stop)
//! instance, not in specs        -> stop if it runs, then delete (disks retained)
//! pin elsewhere / host drained  -> migrate (live or cold, see migrate.rs)
//! its host lacks a network / CPU model it needs -> nothing started there; pending (fit.rs)
//! ```

mod action;
pub mod fit;
mod migrate;
pub mod place;
mod recover;
pub mod restart;
mod saved;

use std::collections::{BTreeMap, BTreeSet};

use plasmavmc_specs::{Desired, Power, VmEntry, VmSpec};
use serde::{Deserialize, Serialize};

pub use action::{Action, MoveMode};
pub use saved::{SavedPlan, StalePlan};

use crate::observe::{Observed, ObservedVm, RunState};
use crate::qemu::exit::ExitReason;
use place::Load;
use restart::Verdict;

/// What to do, in order, and what was left undone and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Things the planner saw and will not act on (unreachable host, refused change).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// VMs this plan cannot bring to their desired state, and why: unplaceable, unknown on
    /// a lost host, given up on. While any remain, the commit does not count as applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<Pending>,
    /// When to plan again, in ms since the epoch: a restart waits for its backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_at_ms: Option<u64>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// The pending VMs as `vm: why` lines (what tests compare).
    #[cfg(test)]
    pub fn pending_lines(&self) -> Vec<String> {
        self.pending.iter().map(ToString::to_string).collect()
    }

    /// Records that `vm` cannot be brought to its desired state, and says why in the notes.
    fn pend(&mut self, vm: &str, why: String) {
        let pending = Pending {
            vm: vm.to_owned(),
            why,
        };
        self.notes.push(pending.to_string());
        self.pending.push(pending);
    }
}

/// A VM a plan cannot bring to its desired state, and why. Written `vm: why` (in saved
/// plans too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Pending {
    pub vm: String,
    pub why: String,
}

impl Pending {
    /// `pending` one `vm: why` a line.
    pub fn lines(pending: &[Pending]) -> String {
        pending
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl std::fmt::Display for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.vm, self.why)
    }
}

impl From<Pending> for String {
    fn from(p: Pending) -> String {
        p.to_string()
    }
}

impl TryFrom<String> for Pending {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let (vm, why) = text
            .split_once(": ")
            .ok_or_else(|| format!("{text:?} is not `vm: why`"))?;
        Ok(Self {
            vm: vm.to_owned(),
            why: why.to_owned(),
        })
    }
}

/// Plans the changes that make `observed` equal to `desired`, at time `now_ms` (ms since
/// the epoch; only restart backoff depends on it).
pub fn plan(desired: &Desired, observed: &Observed, now_ms: u64) -> Plan {
    let mut out = Plan::default();
    let mut names: Vec<&str> = desired
        .vms
        .keys()
        .map(String::as_str)
        .chain(
            observed
                .hosts
                .values()
                .flat_map(|inv| inv.vms.keys().map(String::as_str)),
        )
        .collect::<BTreeSet<&str>>()
        .into_iter()
        // Left alone while their actions run: planned again once a look sees them settled.
        .filter(|name| !observed.in_flight.contains_key(*name))
        .collect();
    // By name (above), then stably by priority: higher first, equal ones by name.
    names.sort_by_key(|name| {
        std::cmp::Reverse(desired.vms.get(*name).map_or(0, |v| v.spec.priority))
    });
    out.notes.extend(observed.unreachable.values().cloned());
    for (host, inv) in &observed.hosts {
        for o in &inv.orphans {
            out.notes.push(format!(
                "orphan QEMU pid {} on {host} runs in folder vms/{} with no instance record; left running (--prune stops it)",
                o.pid, o.folder
            ));
        }
    }
    let copies_of = copies_by_vm(observed);
    let mut load = Load::new(desired, observed, &copies_of);
    // Moves first: the capacity they free on their source is free before anything new
    // is placed (moves run before creations).
    let moved = migrate::plan_moves(desired, observed, &copies_of, &names, &mut load, &mut out);
    for name in names {
        let copies = copies_in(&copies_of, name);
        let found = match copies {
            [] => None,
            [one] => Some(*one),
            _ => {
                let keep = recover::keeper(observed, name, copies);
                recover::remove_stale(name, keep.0, copies, &mut out);
                Some(keep)
            }
        };
        if moved.contains(name) {
            continue;
        }
        match (desired.vms.get(name), found) {
            (_, None) if observed.lost_on(name).is_some() => {
                let host = observed.lost_on(name).unwrap_or_default();
                recover::plan_lost(desired, observed, &mut load, name, host, &mut out);
            }
            (Some(want), None) => plan_new(desired, &mut load, want, &mut out),
            (Some(want), Some((host, have))) => {
                let source = recover::source_may_resume(observed, have, copies.len());
                if !recover::plan_postcopy_source(observed, name, host, have, &mut out)
                    && !recover::plan_resume(name, host, have, source, &mut out)
                {
                    let first = out.actions.len();
                    plan_existing(desired, observed, want, (host, have), now_ms, &mut out);
                    fit::hold_starts(desired, observed, want, host, first, &mut out);
                }
            }
            (None, Some((host, have))) => plan_removed(host, have, &mut out),
            (None, None) => {}
        }
    }
    hold_where_unknown(observed, &mut out);
    // Never start a second QEMU in a folder where an orphan still runs: it would share
    // the socket, pid file and disks. When in doubt, do not start.
    let blocked: BTreeSet<&str> = observed
        .hosts
        .values()
        .flat_map(|inv| inv.orphans.iter().map(|o| o.folder.as_str()))
        .collect();
    let before = out.actions.len();
    out.actions.retain(|a| {
        !(blocked.contains(a.vm()) && matches!(a, Action::Start { .. } | Action::Restart { .. }))
    });
    if out.actions.len() != before {
        out.notes.push("VMs with an orphan QEMU in their folder are not started until the orphan is gone (--prune)".to_owned());
    }
    // Stops and deletes first, then moves: the memory they free is what the placements
    // counted on.
    out.actions.sort_by_key(|a| match a {
        Action::Stop { .. } | Action::Delete { .. } | Action::Prune { .. } => 0,
        Action::Migrate { .. } => 1,
        _ => 2,
    });
    out
}

/// Every copy of every VM the hosts hold, by VM, each list in host order: what
/// [`Observed::copies`] says for one VM, built in one pass for the whole plan (asking
/// `copies` of each VM looks on every host: 100,000 VMs on 1,000 hosts made that 10^8
/// lookups per plan; BENCHMARKS.md, "Fleet scale").
pub(crate) type Copies<'o> = BTreeMap<&'o str, Vec<(&'o str, &'o ObservedVm)>>;

/// The [`Copies`] of `observed`.
pub(crate) fn copies_by_vm(observed: &Observed) -> Copies<'_> {
    let mut out: Copies<'_> = BTreeMap::new();
    for (host, inv) in &observed.hosts {
        for (vm, o) in &inv.vms {
            out.entry(vm.as_str()).or_default().push((host.as_str(), o));
        }
    }
    out
}

/// The copies of `vm` in `copies` (none: an empty list).
pub(crate) fn copies_in<'c, 'o>(
    copies: &'c Copies<'o>,
    vm: &str,
) -> &'c [(&'o str, &'o ObservedVm)] {
    copies.get(vm).map_or(&[], Vec::as_slice)
}

/// When in doubt, do not start: drops every action that could start a copy of a VM on
/// one host (create, recover, start, restart, a move's target) while the VM may still be
/// on another host that does not answer and is not fenced. Stops, updates and deletes
/// where it is found go ahead; the VM is `unknown` until that host answers or is fenced.
fn hold_where_unknown(observed: &Observed, out: &mut Plan) {
    let mut held: BTreeSet<(String, String, String)> = BTreeSet::new();
    out.actions.retain(|a| {
        let target = match a {
            Action::Create { host, .. }
            | Action::Recover { host, .. }
            | Action::Start { host, .. }
            | Action::Restart { host, .. } => host,
            Action::Migrate { to, .. } => to,
            Action::Stop { .. }
            | Action::Update { .. }
            | Action::Delete { .. }
            | Action::Prune { .. } => return true,
        };
        match observed.unknown_on(a.vm()) {
            Some(away) if away != target => {
                held.insert((a.vm().to_owned(), away.to_owned(), target.clone()));
                false
            }
            _ => true,
        }
    });
    for (vm, away, target) in held {
        out.pend(&vm, format!("unknown: it may still run on {away}, which is unreachable and not fenced; nothing of it is started on {target} until {away} answers or is fenced"));
    }
}

/// Actions that stop every orphan QEMU (what `--prune` adds to a plan).
pub fn prune_actions(observed: &Observed) -> Vec<Action> {
    observed
        .hosts
        .iter()
        .flat_map(|(host, inv)| {
            inv.orphans.iter().map(move |o| Action::Prune {
                vm: o.folder.clone(),
                host: host.clone(),
                reason: "orphan QEMU with no instance record (--prune)".to_owned(),
                pid: o.pid,
            })
        })
        .collect()
}

fn plan_new(desired: &Desired, load: &mut Load, want: &VmEntry, out: &mut Plan) {
    let vm = want.name.clone();
    let placement = match load.place_new(desired, want) {
        Ok(p) => p,
        Err(missing) => {
            out.pend(&vm, format!("cannot be placed: {missing}"));
            return;
        }
    };
    let host = placement.host;
    out.actions.push(Action::Create {
        vm: vm.clone(),
        host: host.clone(),
        reason: format!(
            "new VM ({}); placed on {host}: {}",
            want.file, placement.why
        ),
    });
    if want.spec.power == Power::Running {
        out.actions.push(Action::Start {
            vm,
            host,
            reason: "new VM, power = \"running\"".to_owned(),
        });
    }
}

fn plan_existing(
    desired: &Desired,
    observed: &Observed,
    want: &VmEntry,
    (host, have): (&str, &ObservedVm),
    now_ms: u64,
    out: &mut Plan,
) {
    let vm = want.name.clone();
    let host = host.to_owned();
    let runs = have.state.has_process();
    let wants_run = want.spec.power == Power::Running;
    let replaced = replaced_files(&have.file_digests, &want.file_digests);
    if have.spec_hash != want.hash || !replaced.is_empty() {
        let diff = spec_diff(&have.spec, &have.revision, &want.spec, &want.file);
        let seed = seed_change(have.seed.as_deref(), want.seed.as_deref());
        let mut changed = if have.spec == want.spec {
            Vec::new()
        } else {
            changed_fields(&have.spec, &want.spec)
        };
        // A kernel or initrd replaced in place: the guest boots it only after a restart.
        // A base image: the VM's disks keep the copy they were made from (overlays are
        // never rebased); only disks made from now on use the new one.
        let boots_new = replaced
            .iter()
            .any(|(what, ..)| !what.starts_with("image "));
        for (what, old, new) in &replaced {
            let short = |s: &str| s.get(..12).unwrap_or(s).to_owned();
            let tail = if what.starts_with("image ") {
                "; its disk keeps the image it was made from, new disks use this one"
            } else {
                ""
            };
            changed.push(format!(
                "{what} (sha256 {} → {}{tail})",
                short(old),
                short(new)
            ));
        }
        if let Some(what) = &seed {
            // The seed's content, not the paths naming it, is what cloud-init sees.
            changed.retain(|field| field != "cloud_init");
            changed.push(what.clone());
        }
        // Nothing else differs, yet the hash does: what its NICs' networks are (bridge,
        // VLAN) changed.
        let networks = changed.is_empty() && have.spec_hash != want.hash;
        if networks {
            changed.push("the definition of its networks in plasmavmc.toml".to_owned());
        }
        let reboot =
            networks || seed.is_some() || boots_new || needs_reboot(&have.spec, &want.spec);
        if runs && wants_run && reboot {
            let reason = format!(
                "{} changed; needs a reboot (disks are kept)",
                changed.join(", ")
            );
            out.actions.push(Action::Restart {
                vm,
                host,
                reason,
                diff,
            });
            return;
        }
        if runs && !wants_run {
            out.actions.push(Action::Stop {
                vm: vm.clone(),
                host: host.clone(),
                reason: "power = \"stopped\"".to_owned(),
            });
        }
        let reason = if runs && wants_run {
            format!("{} changed; no reboot needed", changed.join(", "))
        } else {
            format!("{} changed", changed.join(", "))
        };
        out.actions.push(Action::Update {
            vm: vm.clone(),
            host: host.clone(),
            reason,
            diff,
        });
        if !runs && wants_run {
            out.actions.push(Action::Start {
                vm,
                host,
                reason: start_reason(have),
            });
        }
        return;
    }
    if wants_run && have.state == RunState::Exited {
        plan_exited(desired, observed, want, (&host, have), now_ms, out);
    } else if wants_run && !runs {
        out.actions.push(Action::Start {
            vm,
            host,
            reason: start_reason(have),
        });
    } else if !wants_run && runs {
        out.actions.push(Action::Stop {
            vm,
            host,
            reason: "power = \"stopped\"".to_owned(),
        });
    } else if have.state == RunState::Unresponsive || have.state == RunState::Paused {
        let detail = have.detail.as_deref().unwrap_or("not running");
        out.notes.push(format!(
            "{vm}: QEMU (pid {}) is alive but {detail}; left alone",
            have.pid.unwrap_or(0)
        ));
    }
}

/// A VM that should run and exited without being asked: what its restart policy says.
fn plan_exited(
    desired: &Desired,
    observed: &Observed,
    want: &VmEntry,
    (host, have): (&str, &ObservedVm),
    now_ms: u64,
    out: &mut Plan,
) {
    let vm = want.name.clone();
    match restart::verdict(want.spec.restart, &desired.cluster.restart, have, now_ms) {
        Verdict::Restart { reason, attempt } => {
            let reason = format!("restart after an unexpected exit ({reason}), attempt {attempt}");
            out.actions.push(Action::Start {
                vm,
                host: host.to_owned(),
                reason,
            });
        }
        Verdict::Wait { until_ms, .. } => {
            let secs = until_ms.saturating_sub(now_ms).div_ceil(1000);
            let what = restart::describe_exit(have);
            out.notes
                .push(format!("{vm}: {what}; restart in {secs}s (backoff)"));
            out.wake_at_ms = Some(out.wake_at_ms.map_or(until_ms, |w| w.min(until_ms)));
        }
        Verdict::GiveUp { mut why } => {
            let locked = have
                .last_exit
                .as_ref()
                .is_some_and(|e| e.reason == ExitReason::ImageLocked);
            if locked {
                why.push_str(&recover::lock_holders(desired, observed, host));
            }
            out.notes.push(format!("{vm}: {why}"));
            out.pending.push(Pending {
                vm,
                why: format!("failed: {why}"),
            });
        }
        Verdict::Stay { why } => {
            out.notes.push(format!("{vm}: {why}"));
        }
    }
}

fn start_reason(have: &ObservedVm) -> String {
    match have.state {
        RunState::Exited => "QEMU had exited; the spec changed, starting the new one".to_owned(),
        _ => "stopped; power = \"running\"".to_owned(),
    }
}

fn plan_removed(host: &str, have: &ObservedVm, out: &mut Plan) {
    let vm = have.name.clone();
    let host = host.to_owned();
    if have.state.has_process() {
        out.actions.push(Action::Stop {
            vm: vm.clone(),
            host: host.clone(),
            reason: "its spec file was removed".to_owned(),
        });
    }
    out.actions.push(Action::Delete {
        vm,
        host,
        reason: "its spec file was removed; disks are kept (local ones in retained/, shared ones in place)"
            .to_owned(),
    });
}

/// True when QEMU must restart for `new` to take effect.
pub fn needs_reboot(old: &VmSpec, new: &VmSpec) -> bool {
    old.vcpus != new.vcpus
        || old.memory_mb != new.memory_mb
        || old.boot != new.boot
        || old.disks != new.disks
        || old.nics != new.nics
        || old.qemu != new.qemu
}

/// The files given by path (kernel, initrd, base images) whose content changed since the
/// instance was made: `(what, old sha256, new sha256)`. Only files both sides know: a
/// file added or removed is a spec change; a record older than digests knows none.
fn replaced_files(
    have: &BTreeMap<String, String>,
    want: &BTreeMap<String, String>,
) -> Vec<(String, String, String)> {
    have.iter()
        .filter_map(|(what, old)| {
            let new = want.get(what)?;
            (new != old).then(|| (what.clone(), old.clone(), new.clone()))
        })
        .collect()
}

/// What changed in the cloud-init seed, by instance-ids (running → committed); `None`
/// when nothing did.
fn seed_change(have: Option<&str>, want: Option<&str>) -> Option<String> {
    match (have, want) {
        (a, b) if a == b => None,
        (None, Some(id)) => Some(format!("a cloud-init seed was added (instance-id {id})")),
        (Some(_), None) => Some("its cloud-init seed was removed".to_owned()),
        (Some(a), Some(b)) => Some(format!(
            "the cloud-init seed (instance-id {a} → {b}, a new instance for cloud-init)"
        )),
        (None, None) => None,
    }
}

/// Top-level fields that differ, in spec order.
fn changed_fields(old: &VmSpec, new: &VmSpec) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return vec!["spec".to_owned()];
    };
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let changed: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    if changed.is_empty() {
        vec!["spec".to_owned()]
    } else {
        changed
    }
}

/// Unified diff of the running spec against the committed one, both as canonical TOML.
pub fn spec_diff(old: &VmSpec, old_rev: &str, new: &VmSpec, new_file: &str) -> String {
    let a = toml::to_string_pretty(old).unwrap_or_default();
    let b = toml::to_string_pretty(new).unwrap_or_default();
    let short = old_rev.get(..12).unwrap_or(old_rev);
    similar::TextDiff::from_lines(&a, &b)
        .unified_diff()
        .context_radius(3)
        .header(&format!("running (commit {short})"), new_file)
        .to_string()
}

#[cfg(test)]
mod migrate_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
