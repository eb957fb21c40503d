//! Moves: a VM whose pin changed, or whose host is in maintenance, goes to another host
//! by its `migration` policy.
//!
//! ```text
//! pin names another host ─────────┐
//! host in maintenance (drain) ────┴─> target by the placement rules ─┬─ migration = none ──> note: refused
//!                                                                    ├─ running, live ─────> migrate (live)
//!                                                                    └─ otherwise ─────────> migrate (cold)
//! ```
//! A live move needs the same QEMU configuration on both ends: a spec change that needs a
//! reboot makes it cold. A paused or unresponsive QEMU is not moved (it may be half-way
//! through a migration already).

use plasmavmc_specs::{Desired, HostState, MigrationPolicy, Power, VmEntry};

use super::place::Load;
use super::{needs_reboot, Action, MoveMode, Plan};
use crate::observe::{ObservedVm, RunState};

/// Plans the move of `want` (kept on `host` as `have`) when it must move. Returns true
/// when the VM's fate is settled by it (a move was planned); false leaves the VM to the
/// other rules, where it stays.
pub(super) fn plan_move(
    desired: &Desired,
    load: &mut Load,
    want: &VmEntry,
    host: &str,
    have: &ObservedVm,
    out: &mut Plan,
) -> bool {
    let vm = &want.name;
    let draining = desired
        .hosts
        .get(host)
        .is_some_and(|h| h.spec.state == HostState::Maintenance);
    let why = match &want.spec.host {
        Some(pin) if pin != host => format!("pinned to {pin} (runs on {host})"),
        Some(_) if draining => {
            out.notes.push(format!(
                "{vm}: {host} is in maintenance but {vm} is pinned to it; change or remove the pin to move it"
            ));
            return false;
        }
        _ if draining => format!("{host} is in maintenance (drain)"),
        _ => return false,
    };
    if !matches!(
        have.state,
        RunState::Running | RunState::Stopped | RunState::Exited
    ) {
        out.notes.push(format!(
            "{vm}: must move ({why}) but its QEMU is {}; not moved now",
            have.detail.as_deref().unwrap_or("not running normally")
        ));
        return false;
    }
    // A VM that should stop anyway moves cold (stopped, copied, not started).
    let runs = have.state == RunState::Running && want.spec.power == Power::Running;
    let mode = match want.spec.migration {
        MigrationPolicy::None => {
            let note = format!(
                "{vm}: must move ({why}) but migration = \"none\": commit migration = \"cold\" (restart elsewhere) or \"live\" to allow it"
            );
            out.notes.push(note.clone());
            out.pending.push(note);
            return false;
        }
        MigrationPolicy::Live if runs && !needs_reboot(&have.spec, &want.spec) => MoveMode::Live,
        MigrationPolicy::Live if runs => {
            out.notes.push(format!(
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
            out.actions.push(Action::Migrate {
                vm: vm.clone(),
                host: host.to_owned(),
                to: placement.host.clone(),
                mode,
                reason: format!("{why}; to {}: {}", placement.host, placement.why),
            });
            true
        }
        Err(missing) => {
            let note = format!("{vm}: must move ({why}) but cannot be placed: {missing}");
            out.notes.push(note.clone());
            out.pending.push(note);
            false
        }
    }
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
