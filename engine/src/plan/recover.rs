//! VMs of lost hosts: recovered elsewhere once their host is fenced, or left unknown
//! with what the operator must do; and stale copies cleaned up when a host returns.
//!
//! ```text
//! last seen on an unreachable host ─┬─ not fenced ──────────────> unknown (note: fence it)
//!                                   └─ fenced ─┬─ ha, no local disks ─> recover elsewhere
//!                                              └─ otherwise ───────────> note: decision needed
//! instances on several hosts ──> keep the one that holds the guest (running, or a
//!                                completed migration target; see `keeper`), resume it
//!                                if a migration left it paused; stop+delete the rest
//! a migrated source alone, every host answering ──> its target is gone: resume it
//!   (never one whose move switched to postcopy: stopped instead, the guest is lost)
//! a postcopy source while its target runs ──> left alone until the move completes
//! start refused by a disk's image lock ──> failed; say which hosts may hold the disk
//! ```

use plasmavmc_specs::{Desired, Power, Storage, VmEntry};

use super::place::Load;
use super::{Action, Plan};
use crate::observe::{Observed, ObservedVm, RunState};

/// `name` was last seen on `host`, which does not answer.
pub(super) fn plan_lost(
    desired: &Desired,
    observed: &Observed,
    load: &mut Load,
    name: &str,
    host: &str,
    out: &mut Plan,
) {
    let Some(how) = observed.fenced.get(host) else {
        let needed = match desired.hosts.get(host).and_then(|h| h.spec.fence.as_ref()) {
            Some(_) => "its fence command has not succeeded yet".to_owned(),
            None => format!("once it is powered off, run `plasmavmc fence confirm {host}`"),
        };
        // Why the host is unreachable, in its own words ("host hv1 is unreachable: the
        // agent channel closed"), for the VM's status message.
        let why = observed
            .unreachable
            .get(host)
            .cloned()
            .unwrap_or_else(|| format!("{host} is unreachable"));
        out.pend(name, format!("unknown: last seen on {host} ({why}); not started elsewhere (it may still run there): {needed}"));
        return;
    };
    let Some(want) = desired.vms.get(name) else {
        out.notes.push(format!(
            "{name}: was on fenced host {host} and is no longer in the specs; nothing to recover"
        ));
        return;
    };
    if !want.spec.ha {
        out.pend(name, format!("on fenced host {host} ({how}); ha = false, so it is not recovered elsewhere: set ha = true, or bring {host} back"));
        return;
    }
    let lost = desired.hosts.get(host).map(|h| &h.spec);
    if let Some(disk) = local_disk(want, lost.is_some_and(|s| s.shared_storage.is_some())) {
        out.pend(name, format!("on fenced host {host} with local disk {disk}: not recreated without its data; commit a decision (remove the VM, or bring {host} back)"));
        return;
    }
    // Disks on shared storage are only visible to hosts of the same pool.
    let pool = lost.and_then(|s| s.storage_pool.as_deref());
    let needs_pool = !want.spec.disks.is_empty();
    let same_pool = |candidate: &str| {
        let theirs = desired
            .hosts
            .get(candidate)
            .and_then(|h| h.spec.storage_pool.as_deref());
        if !needs_pool || theirs == pool {
            Ok(())
        } else {
            Err(format!("is not in storage pool {}", pool.unwrap_or("-")))
        }
    };
    match load.place_where(desired, want, same_pool) {
        Ok(placement) => {
            let to = placement.host;
            let reason = format!(
                "{host} is fenced ({how}); recovered on {to}: {}",
                placement.why
            );
            out.actions.push(Action::Recover {
                vm: name.to_owned(),
                host: to.clone(),
                from: host.to_owned(),
                reason,
            });
            if want.spec.power == Power::Running {
                out.actions.push(Action::Start {
                    vm: name.to_owned(),
                    host: to,
                    reason: "recovered, power = \"running\"".to_owned(),
                });
            }
        }
        Err(missing) => {
            out.pend(
                name,
                format!("on fenced host {host}; cannot be recovered: {missing}"),
            );
        }
    }
}

/// The first disk that lived on the lost host's own storage (lost with it): `local`, or
/// `auto` on a host without shared storage.
fn local_disk(want: &VmEntry, host_has_shared: bool) -> Option<&str> {
    want.spec
        .disks
        .iter()
        .find(|d| match d.storage {
            Storage::Local => true,
            Storage::Auto => !host_has_shared,
            Storage::Shared => false,
        })
        .map(|d| d.name.as_str())
}

/// Of several copies of one VM, the one to keep:
/// 1. the copy whose guest runs (it holds the disks and the guest's state, e.g. after a
///    fence command that lied, or a migration whose source was resumed);
/// 2. a live-migration target whose migration completed (QEMU `paused` after
///    `-incoming`): the guest's state is there, the source is `postmigrate` or gone;
/// 3. among the rest, copies that are not half-made migration targets first; then
///    copies that are not migrated sources (`postmigrate`: a target that was resumed
///    and exited since holds a newer guest and newer disks); then the ones with a QEMU;
///    then the ones that ever ran (a cold move's target, created but never started,
///    holds empty or half-copied disks).
///
/// Of equals, the one on the host noted last in the record of where VMs are (where the
/// engine put it most recently), else the first.
pub(super) fn keeper<'a>(
    observed: &Observed,
    name: &str,
    copies: &[(&'a str, &'a ObservedVm)],
) -> (&'a str, &'a ObservedVm) {
    let last = observed.last_seen(name);
    let rank = |v: &ObservedVm| {
        (
            v.state != RunState::Running,
            !v.holds_completed_migration(),
            v.incoming,
            v.is_migrated_source(),
            !v.state.has_process(),
            v.started_at.is_none(),
        )
    };
    let best = copies
        .iter()
        .map(|(_, v)| rank(v))
        .min()
        .expect("at least one copy");
    let pool: Vec<(&str, &ObservedVm)> = copies
        .iter()
        .copied()
        .filter(|(_, v)| rank(v) == best)
        .collect();
    pool.iter()
        .find(|(h, _)| Some(*h) == last)
        .or_else(|| pool.first())
        .copied()
        .expect("at least one copy")
}

/// Whether a kept copy paused by a migration, and no completed target, may be resumed
/// where it is: when other copies of it were found (its migration was cut short between
/// them); when it is paused in the migration's last stage (its guest went nowhere, and
/// nothing finishes that migration now); or when it is a migrated source alone while
/// every host answers — its target is gone, and the guest with it unless the source
/// resumes. Never on a guess: while a host does not answer, the target may live there.
/// Never a source whose move switched to postcopy: the target ran the guest since.
pub(super) fn source_may_resume(observed: &Observed, have: &ObservedVm, copies: usize) -> bool {
    !have.postcopy && copies > 1
        || have.paused_mid_migration()
        || (have.is_migrated_source() && observed.unreachable.is_empty())
}

/// Whether [`plan_resume`] would resume this kept copy (`source`: see
/// [`source_may_resume`]).
pub(super) fn resumable(have: &ObservedVm, source: bool) -> bool {
    have.state == RunState::Paused && (have.holds_completed_migration() || source)
}

/// A kept copy whose QEMU holds the guest paused by a migration: a completed target, or
/// a source whose migration was cut short or whose target is gone (`source`: see
/// [`source_may_resume`]). Plans its resumption and returns true.
pub(super) fn plan_resume(
    name: &str,
    host: &str,
    have: &ObservedVm,
    source: bool,
    out: &mut Plan,
) -> bool {
    if !resumable(have, source) {
        return false;
    }
    let reason = if have.holds_completed_migration() {
        "live migration completed here; resuming the guest".to_owned()
    } else if have.is_migrated_source() {
        "its migration completed but no host holds the target any more; resuming the guest here, where it was".to_owned()
    } else {
        format!(
            "its migration did not finish (QEMU is {}); resuming the guest here, where it was",
            have.detail.as_deref().unwrap_or("paused")
        )
    };
    out.actions.push(Action::Start {
        vm: name.to_owned(),
        host: host.to_owned(),
        reason,
    });
    true
}

/// A kept copy that is the source of a move that switched to postcopy, with no target
/// holding the guest (else that target would be kept): the guest's memory was split
/// between the hosts and the half on the target is gone, so the guest is lost. The
/// paused source is stopped, never resumed (the VM then boots again from its disks, as
/// after a crash); while a host does not answer it is left alone: the target may run
/// there. Plans that and returns true; false for any other copy.
pub(super) fn plan_postcopy_source(
    observed: &Observed,
    name: &str,
    host: &str,
    have: &ObservedVm,
    out: &mut Plan,
) -> bool {
    if !have.is_postcopy_source() {
        return false;
    }
    if observed.unreachable.is_empty() {
        out.actions.push(Action::Stop {
            vm: name.to_owned(),
            host: host.to_owned(),
            reason: "its live move switched to postcopy and no host holds the target any more: the guest is lost; this paused copy lacks part of its memory and is never resumed".to_owned(),
        });
    } else {
        out.pend(name, format!("paused on {host} by a live move that switched to postcopy; its target may run on a host that does not answer: neither resumed nor stopped until every host answers"));
    }
    true
}

/// For a VM whose start on `host` was refused because another QEMU holds a disk: where
/// that QEMU may be, as the end of a sentence. Only hosts of `host`'s storage pool see
/// the disk, and a copy on one that answers would be in its inventory: so the hosts of
/// the pool that do not answer.
pub(super) fn lock_holders(desired: &Desired, observed: &Observed, host: &str) -> String {
    let pool_of = |h: &str| {
        desired
            .hosts
            .get(h)
            .and_then(|e| e.spec.storage_pool.as_deref())
    };
    let away: Vec<&str> = observed
        .unreachable
        .keys()
        .map(String::as_str)
        .filter(|h| pool_of(h) == pool_of(host))
        .collect();
    if away.is_empty() {
        return "; every host of its storage pool answers: a QEMU this engine does not manage holds the disk".to_owned();
    }
    let fenced: Vec<&str> = away
        .iter()
        .copied()
        .filter(|h| observed.fenced.contains_key(*h))
        .collect();
    let lied = if fenced.is_empty() {
        String::new()
    } else {
        format!(
            " ({} fenced: its fence command may have lied)",
            fenced.join(", ")
        )
    };
    format!(
        "; hosts of its storage pool that do not answer: {}{lied}",
        away.join(", ")
    )
}

/// Stops and deletes every copy but `keep` (local disks retained, never deleted; disks on
/// shared storage left where they are: the copy kept uses them).
pub(super) fn remove_stale(name: &str, keep: &str, copies: &[(&str, &ObservedVm)], out: &mut Plan) {
    for (host, copy) in copies.iter().filter(|(h, _)| *h != keep) {
        if copy.is_postcopy_source() && copy.paused == Some(crate::observe::Paused::FinishMigrate) {
            // The target pulls the pages it still lacks from this QEMU until `completed`.
            out.notes.push(format!("{name}: left paused on {host} while {keep} pulls the rest of its memory (postcopy); removed once that move completes"));
            continue;
        }
        let reason = format!("stale copy: {name} lives on {keep}");
        let disks = "local disks are retained, shared ones left in place";
        if copy.state.has_process() {
            out.actions.push(Action::Stop {
                vm: name.to_owned(),
                host: (*host).to_owned(),
                reason: reason.clone(),
            });
        }
        out.actions.push(Action::Delete {
            vm: name.to_owned(),
            host: (*host).to_owned(),
            reason: format!("{reason}; {disks}"),
        });
    }
}
