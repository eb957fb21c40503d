//! The reconcile step `apply` and `watch` both take, around the pure planner. Above
//! every stage: it may use any of them.
//!
//! ```text
//! Fleet::look ─> planned ─> (apply: show, ask) ─> carry_out ─> publish
//!   observe        plan                            execute,      status files
//!   + memory                                       look, plan
//! ```
//! - [`look`]: what the hosts run, plus what the state directory remembers of those that
//!   do not answer (where each VM may be, which hosts are fenced). A [`Fleet`] is the
//!   hosts a command holds and how it looks at them: `apply` connects once, the daemon
//!   keeps connections and judges them by their heartbeats.
//! - [`planned`]: the plan for a commit against what was seen (orphans first with
//!   `--prune`).
//! - [`carry_out`]: executes the plan (journaled, whereabouts noted first), looks again
//!   and plans again: what is left undone is what the hosts show after acting.
//! - [`publish`]: the status files for what the step saw and did.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use plasmavmc_specs::Desired;

use crate::errors::error_chain;
use crate::execute::journal::JournalFile;
use crate::execute::{execute_journaled, InFlight, Live, Report, Step};
use crate::host::Host;
use crate::observe::{Observed, Unreachable};
use crate::plan::{prune_actions, Pending, Plan};
use crate::records::whereabouts::{Answers, Whereabouts};
use crate::records::{StateDir, StateError};
use crate::source::Target;
use crate::status::{EngineStatus, Snapshot, StatusDir, StatusError, VmEvent};

/// After a run that left actions due (something failed), the soonest the daemon plans
/// again: a retry, never a tight loop.
pub const RETRY_FLOOR_MS: u64 = 1000;

/// The hosts a command acts on, and how it looks at them.
pub trait Fleet {
    type Host: Host;
    /// The hosts to act on (connected, answering).
    fn hosts(&self) -> &BTreeMap<String, Self::Host>;
    /// What the hosts run now, and what is known of those that do not answer.
    fn look(&mut self) -> impl Future<Output = Observed>;
}

/// What carrying a plan out left.
#[derive(Debug, Default)]
pub struct Outcome {
    /// What was done; none when there was nothing to do.
    pub report: Option<Report>,
    /// What the hosts run after.
    pub after: Observed,
    /// What cannot be done now, and why (shown in those VMs' status).
    pub pending: Vec<Pending>,
    /// When to plan again (a backoff ending, or a retry).
    pub wake_at_ms: Option<u64>,
}

/// Gathers the inventory of each host; a host that does not answer is listed as
/// unreachable, with the reason.
pub async fn gather<'a, H: Host + 'a>(hosts: impl IntoIterator<Item = &'a H>) -> Observed {
    let mut out = Observed::default();
    // All at once: a slow or silent host costs its own wait, not the sum of all.
    let hosts: Vec<&H> = hosts.into_iter().collect();
    let answers = futures_util::future::join_all(hosts.iter().map(|h| h.inventory())).await;
    for (host, answer) in hosts.into_iter().zip(answers) {
        match answer {
            Ok(inv) => {
                out.hosts.insert(host.name().to_owned(), inv);
            }
            Err(e) => {
                out.unreachable
                    .insert(host.name().to_owned(), error_chain(&e));
            }
        }
    }
    out
}

/// Observes `hosts` and adds what the state directory `state` remembers: where each VM
/// may be (the durable record, brought up to date with what the hosts that answered
/// report) and which unreachable hosts are fenced. A fenced host that answers again has
/// rejoined: its fence record is cleared (its stale copies are cleaned up by the plan).
/// With actions `in_flight` (the daemon's), the VMs they touch while the hosts are asked
/// keep every host in the record and are left to a later look ([`InFlight`]).
///
/// Callers hold the state lock (the record is rewritten here).
pub async fn look<'a, H: Host + 'a>(
    hosts: impl IntoIterator<Item = &'a H>,
    unreachable: &Unreachable,
    state: &crate::records::StateDir,
    in_flight: Option<&InFlight>,
) -> Observed {
    let record = Whereabouts::new(state.root());
    let fences = crate::records::fence::FenceRecords::new(state.root());
    let records = fences.all();
    let mark = in_flight.map(InFlight::mark);
    let gathered = gather(hosts).await;
    let touched = match (in_flight, mark) {
        (Some(f), Some(mark)) => f.since(mark),
        _ => BTreeMap::new(),
    };
    let answers: Answers<'_> = gathered
        .hosts
        .iter()
        .map(|(host, inv)| (host.as_str(), inv.holds()))
        .collect();
    let keep: BTreeSet<&str> = touched.keys().map(String::as_str).collect();
    // None yet (the first run of an engine that keeps it), or damaged: start from where
    // the status files last saw each VM, and write it whatever the hosts answer.
    let rebuild = || crate::status::StatusDir::new(&state.status_dir()).last_known();
    let (places, damaged) = record.settled(rebuild, &answers, &keep);
    if let Some(e) = &damaged {
        tracing::error!(error = %error_chain(e), "the record of where VMs are is damaged; rebuilt from the status files and what the hosts answer");
    }
    let mut observed = gathered.with_context(unreachable, places, records.clone());
    observed.in_flight = touched;
    for host in observed.hosts.keys() {
        if let (Some(how), true) = (records.get(host), fences.clear(host)) {
            // Said, not silent: an operator's `fence confirm` is void once the host
            // answers, and its VMs are then not recovered elsewhere.
            tracing::info!(host = %host, fencing = %how, "the host answers: it has rejoined; its fence record is cleared");
        }
    }
    observed
}

/// The plan for `target` against `observed`, now; with `prune`, orphans are stopped too.
pub fn planned(target: &Target, observed: &Observed, prune: bool) -> Plan {
    let mut plan = crate::plan::plan(&target.desired, observed, crate::time::now_ms());
    if prune {
        // Orphans go first: the VMs they block can start in the next run.
        plan.actions.splice(0..0, prune_actions(observed));
    }
    plan
}

/// Carries `plan` (made from `observed`) out on `fleet`'s hosts, then looks and plans
/// again: acting changes what comes next (a failed start records an exit and starts a
/// backoff; a start refused for good is pending only once it was tried).
pub async fn carry_out<F: Fleet>(
    fleet: &mut F,
    target: &Target,
    observed: Observed,
    plan: &Plan,
    state: &StateDir,
    live: Live<'_>,
    progress: impl FnMut(&Step),
) -> Result<Outcome, StateError> {
    let journal = JournalFile::new(state.root());
    if plan.is_empty() {
        // Nothing is left of an interrupted run: its journal has told all it had to.
        journal.clear();
        return Ok(Outcome {
            report: None,
            after: observed,
            pending: plan.pending.clone(),
            wake_at_ms: plan.wake_at_ms,
        });
    }
    let report = execute_journaled(
        plan,
        target,
        fleet.hosts(),
        &journal,
        &Whereabouts::new(state.root()),
        live,
        progress,
    )
    .await?;
    let after = fleet.look().await;
    let now = crate::time::now_ms();
    let next = crate::plan::plan(&target.desired, &after, now);
    Ok(Outcome {
        report: Some(report),
        after,
        wake_at_ms: if next.is_empty() {
            next.wake_at_ms
        } else {
            // Actions still due mean something failed.
            Some(now + RETRY_FLOOR_MS)
        },
        pending: next.pending,
    })
}

/// Writes the status files: `engine` (already brought up to date by the caller), each
/// VM and host as `outcome` leaves them, `events` added to their VMs' histories, and the
/// pending VMs' reasons as their messages.
pub fn publish(
    status: &StatusDir,
    engine: EngineStatus,
    desired: Option<&Desired>,
    outcome: &Outcome,
    events: &[(String, VmEvent)],
) -> Result<Snapshot, StatusError> {
    let mut snap = status.build(
        engine,
        desired,
        &outcome.after,
        outcome.report.as_ref(),
        events,
    );
    snap.explain_pending(&outcome.pending);
    snap.keep_live(status, &outcome.after.in_flight);
    status.write(&snap)?;
    Ok(snap)
}
