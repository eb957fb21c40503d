//! Moves: a VM whose pin changed, or whose host is in maintenance, goes to another host
//! by its `migration` policy.
//!
//! ```text
//! pin names another host ─────────┐
//! host in maintenance (drain) ────┴─> target by the placement rules ─┬─ migration = none ──> note: refused
//!                                                                    ├─ running, live ─────> migrate (live)
//!                                                                    └─ otherwise ─────────> migrate (cold)
//! ```
//! The target has every network and the CPU model the VM needs (placement, `fit.rs`).
//! A live move needs the same QEMU configuration on both ends: a spec change that needs a
//! reboot makes it cold, and so does a guest on the host's CPU (`cpu = "host"`, or no
//! `cpu` unless under `tcg`) between hosts whose CPUs differ or are not known. A paused or unresponsive QEMU is not moved (it may be half-way
//! through a migration already).

use std::collections::{BTreeMap, BTreeSet};

use plasmavmc_specs::{Desired, HostState, MigrationPolicy, Power, VmEntry};

use super::place::Load;
use super::{needs_reboot, Action, MoveMode, Plan};
use crate::observe::{Observed, ObservedVm, RunState};

/// What [`plan_move`] decided for one VM.
#[derive(Debug)]
pub(super) enum Decision {
    /// It stays where it is, nothing to say.
    Stay,
    /// It moves (with a note to show, sometimes).
    Move {
        action: Action,
        note: Option<String>,
    },
    /// It should move but cannot (now); `pending` when the commit cannot count as applied.
    Blocked { why: String, pending: bool },
}

/// Whether `want` (kept on `host` as `have`) must move, and how; a move books its place on
/// the target in `load`.
pub(super) fn plan_move(
    desired: &Desired,
    observed: &Observed,
    load: &mut Load,
    want: &VmEntry,
    host: &str,
    have: &ObservedVm,
) -> Decision {
    let vm = &want.name;
    let draining = desired
        .hosts
        .get(host)
        .is_some_and(|h| h.spec.state == HostState::Maintenance);
    let why = match &want.spec.host {
        Some(pin) if pin != host => format!("pinned to {pin} (runs on {host})"),
        Some(_) if draining => {
            return Decision::Blocked {
                why: format!(
                    "{host} is in maintenance but {vm} is pinned to it; change or remove the pin to move it"
                ),
                pending: false,
            };
        }
        _ if draining => format!("{host} is in maintenance (drain)"),
        _ => return Decision::Stay,
    };
    if !matches!(
        have.state,
        RunState::Running | RunState::Stopped | RunState::Exited
    ) {
        return Decision::Blocked {
            why: format!(
                "must move ({why}) but its QEMU is {}; not moved now",
                have.detail.as_deref().unwrap_or("not running normally")
            ),
            pending: false,
        };
    }
    // A VM that should stop anyway moves cold (stopped, copied, not started).
    let runs = have.state == RunState::Running && want.spec.power == Power::Running;
    let mut note = None;
    let mode = match want.spec.migration {
        MigrationPolicy::None => {
            return Decision::Blocked {
                why: format!(
                    "must move ({why}) but migration = \"none\": commit migration = \"cold\" (restart elsewhere) or \"live\" to allow it"
                ),
                pending: true,
            };
        }
        MigrationPolicy::Live if runs && !needs_reboot(&have.spec, &want.spec) => MoveMode::Live,
        MigrationPolicy::Live if runs => {
            note = Some(format!(
                "{vm}: moves cold: the spec change needs a reboot, so the guest cannot move live"
            ));
            MoveMode::Cold
        }
        _ => MoveMode::Cold,
    };
    let not_here = |candidate: &str| {
        if candidate == host {
            return Err("is where it runs".to_owned());
        }
        storage_fit(desired, want)(candidate)
    };
    match load.place_where(desired, want, not_here) {
        Ok(placement) => {
            let mut reason = format!("{why}; to {}: {}", placement.host, placement.why);
            let cpu =
                super::fit::live_cpu_problem(desired, observed, &want.spec, host, &placement.host);
            let mode = match cpu {
                Some(cold) if mode == MoveMode::Live => {
                    reason = format!("{reason}; {cold}");
                    MoveMode::Cold
                }
                _ => mode,
            };
            Decision::Move {
                action: Action::Migrate {
                    vm: vm.clone(),
                    host: host.to_owned(),
                    to: placement.host,
                    mode,
                    reason,
                },
                note,
            }
        }
        Err(missing) => Decision::Blocked {
            why: format!("must move ({why}) but cannot be placed: {missing}"),
            pending: true,
        },
    }
}

/// Plans every move `desired` asks of what `observed` runs, releasing each mover's share
/// on its source. Rounds repeat while a move frees room another one needed, so a plan
/// carried out leaves no move for the next one. Returns the VMs that move.
pub(super) fn plan_moves<'a>(
    desired: &Desired,
    observed: &Observed,
    copies_of: &super::Copies<'_>,
    names: &[&'a str],
    load: &mut Load,
    out: &mut Plan,
) -> BTreeSet<&'a str> {
    let mut moved = BTreeSet::new();
    let mut blocked = BTreeMap::new();
    let mut todo: Vec<&str> = names.to_vec();
    loop {
        let mut progress = false;
        todo.retain(|&name| {
            let copies = super::copies_in(copies_of, name);
            let (Some(want), Some(&first)) = (desired.vms.get(name), copies.first()) else {
                return false;
            };
            let several = copies.len() > 1;
            let (host, have) = if several {
                super::recover::keeper(observed, name, copies)
            } else {
                first
            };
            // Its guest is on a postcopy target or lost: nothing of it moves from here.
            if have.is_postcopy_source() {
                return false;
            }
            let source = super::recover::source_may_resume(observed, have, copies.len());
            let resume = super::recover::resumable(have, source);
            if resume && have.holds_completed_migration() {
                return false;
            }
            // A source an earlier migration left paused moves as the running guest it
            // is again once resumed: the move resumes it first (it stays put, the
            // plan resumes it where it is).
            let resumed;
            let have = if resume {
                resumed = ObservedVm {
                    state: RunState::Running,
                    detail: None,
                    paused: None,
                    ..have.clone()
                };
                &resumed
            } else {
                have
            };
            match plan_move(desired, observed, load, want, host, have) {
                Decision::Stay => false,
                Decision::Move { action, note } => {
                    out.actions.push(action);
                    out.notes.extend(note);
                    if resume {
                        out.notes.push(format!(
                            "{name}: its last migration was cut short with the guest paused on {host}; the move resumes it there first"
                        ));
                    }
                    load.release(host, want);
                    moved.insert(name);
                    blocked.remove(name);
                    progress = true;
                    false
                }
                Decision::Blocked { why, pending } => {
                    blocked.insert(name, (why, pending));
                    true
                }
            }
        });
        if !progress {
            break;
        }
    }
    for (name, (why, pending)) in blocked {
        if pending {
            out.pend(name, why);
        } else {
            out.notes.push(format!("{name}: {why}"));
        }
    }
    moved
}

/// Whether a host can hold `want`'s disks: a disk that must be on shared storage needs a
/// host that has some.
pub(super) fn storage_fit<'a>(
    desired: &'a Desired,
    want: &'a VmEntry,
) -> impl Fn(&str) -> Result<(), String> + 'a {
    let wants_shared = want
        .spec
        .disks
        .iter()
        .any(|d| d.storage == plasmavmc_specs::Storage::Shared);
    move |host: &str| {
        let has = desired
            .hosts
            .get(host)
            .is_some_and(|h| h.spec.shared_storage.is_some());
        if wants_shared && !has {
            Err("has no shared storage".to_owned())
        } else {
            Ok(())
        }
    }
}
