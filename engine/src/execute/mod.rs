//! The executor: carries out a plan's actions through the [`Host`] trait.
//!
//! In: a [`Plan`], the [`Target`] it was made from (specs + files), the hosts by name.
//! Out: one [`Outcome`] per action. Different VMs' actions run at once, within the
//! bounds of `[concurrency]` ([`queue`]); each VM's run in plan order, and when one
//! fails the VM's later ones are skipped while the other VMs go on. Every host call is
//! idempotent, so running a half-done plan again finishes it. The daemon keeps a
//! [`runner::Runner`] that takes more actions while others run.

mod downloads;
mod inflight;
pub mod journal;
mod migrate;
mod queue;
pub mod runner;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tracing::{error, info, info_span, Instrument};

use crate::errors::error_chain;
use crate::failpoint::failpoint;
use crate::host::{Host, HostError};
use crate::plan::{Action, Plan};
use crate::records::whereabouts::Whereabouts;
use crate::source::Target;
use crate::wire::StopOutcome;

pub use inflight::InFlight;
use queue::Queue;

/// What happened to one action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done { detail: String, took: Duration },
    Failed { error: String },
    Skipped { why: String },
}

/// An action and what came of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    pub outcome: Outcome,
    /// When it ended (RFC 3339, ms).
    pub at: String,
}

/// The result of executing a plan.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub steps: Vec<Step>,
}

impl Report {
    pub fn failed(&self) -> bool {
        self.steps
            .iter()
            .any(|s| !matches!(s.outcome, Outcome::Done { .. }))
    }

    /// One line per failed action: `start web: VM web: QEMU failed to start: ...`.
    pub fn failures(&self) -> String {
        let lines: Vec<String> = self
            .steps
            .iter()
            .filter_map(|s| match &s.outcome {
                Outcome::Failed { error } => {
                    Some(format!("{} {}: {error}", s.action.op(), s.action.vm()))
                }
                _ => None,
            })
            .collect();
        lines.join("\n")
    }
}

/// Errors of one action; the executor turns them into [`Outcome::Failed`].
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("host {host} is not managed by this engine")]
    NoHost { host: String },
    #[error("VM {vm} is not in commit {commit}")]
    NotInCommit { vm: String, commit: String },
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("not done: {0}")]
    Record(String),
    /// A fail point's `error` action (test builds only).
    #[cfg(feature = "failpoints")]
    #[error(transparent)]
    Injected(#[from] crate::failpoint::Injected),
}

/// Told what a long action (a migration, a download) is doing while it runs:
/// `(vm, kind, what)`.
pub type Live<'a> = &'a (dyn Fn(&str, Doing, &str) + Sync);

/// The kind of long work a [`Live`] report is about: it decides the VM's phase in the
/// status (a download leaves it as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doing {
    /// Moving the VM to another host.
    Migrating,
    /// A host downloads an image by URL for the VM.
    Downloading,
}

/// Runs `plan`; `progress` is told about each step as it finishes, `live` about long
/// ones while they run.
pub async fn execute<H: Host>(
    plan: &Plan,
    target: &Target,
    hosts: &BTreeMap<String, H>,
    live: Live<'_>,
    mut progress: impl FnMut(&Step),
) -> Report {
    execute_with(plan, target, hosts, live, |_, _| Ok(()), |_, s| progress(s)).await
}

/// [`execute`], with `before` asked before each action touches a host (with its index
/// in the plan): an error fails the action untouched (e.g. where the VM goes could not
/// be recorded). Actions run at once as the [`queue`] allows; `progress` hears of them
/// as they end, the report lists them in plan order.
async fn execute_with<H: Host>(
    plan: &Plan,
    target: &Target,
    hosts: &BTreeMap<String, H>,
    live: Live<'_>,
    mut before: impl FnMut(usize, &Action) -> Result<(), String>,
    mut progress: impl FnMut(usize, &Step),
) -> Report {
    let stop_timeout = target.desired.cluster.timeouts.stop.0;
    let mut queue = Queue::new(target.desired.cluster.concurrency.clone());
    for action in &plan.actions {
        queue.push(action.clone(), ());
    }
    let mut steps: Vec<Option<Step>> = vec![None; plan.actions.len()];
    let start = |id: u64, action: &Action, ()| {
        let ready = before(index(id), action);
        let action = action.clone();
        async move {
            match ready {
                Ok(()) => act(&action, target, hosts, stop_timeout, live).await,
                Err(why) => failed(&action, &ExecError::Record(why)),
            }
        }
    };
    runner::drive(
        &mut queue,
        None,
        start,
        |_, _| {},
        |id, step| {
            progress(index(id), &step);
            if let Some(slot) = steps.get_mut(index(id)) {
                *slot = Some(step);
            }
        },
    )
    .await;
    Report {
        steps: steps.into_iter().flatten().collect(),
    }
}

fn index(id: u64) -> usize {
    usize::try_from(id).unwrap_or(usize::MAX)
}

/// Carries out one action on its host(s); how it went.
async fn act<H: Host>(
    action: &Action,
    target: &Target,
    hosts: &BTreeMap<String, H>,
    stop_timeout: Duration,
    live: Live<'_>,
) -> Outcome {
    let span = info_span!(
        "action",
        op = action.op(),
        vm = action.vm(),
        host = action.host()
    );
    let started = Instant::now();
    let near: Vec<&H> = may_put(action)
        .into_iter()
        .filter_map(|h| hosts.get(h))
        .collect();
    let work = run(action, target, hosts, stop_timeout, live);
    match downloads::showing(&near, action.vm(), live, work)
        .instrument(span)
        .await
    {
        Ok(detail) => {
            info!(op = action.op(), vm = action.vm(), %detail, "done");
            Outcome::Done {
                detail,
                took: started.elapsed(),
            }
        }
        Err(e) => failed(action, &e),
    }
}

fn failed(action: &Action, e: &ExecError) -> Outcome {
    let error = error_chain(e);
    error!(op = action.op(), vm = action.vm(), %error, "failed");
    Outcome::Failed { error }
}

/// [`execute`], journaled: the plan is written to `journal` before the first action, as
/// each starts and after each ends, and removed at the end. Refuses to act when the
/// journal cannot be written. Before an action may put a VM on a host (see
/// [`may_put`]), that host is added to `record` (where each VM may be); an action whose
/// host cannot be recorded fails without touching anything.
pub async fn execute_journaled<H: Host>(
    plan: &Plan,
    target: &Target,
    hosts: &BTreeMap<String, H>,
    journal: &journal::JournalFile,
    record: &Whereabouts,
    live: Live<'_>,
    mut progress: impl FnMut(&Step),
) -> Result<Report, crate::records::StateError> {
    let entry = std::sync::Mutex::new(journal::Journal::new(
        &target.commit.id,
        plan.actions.clone(),
    ));
    let save = |update: &dyn Fn(&mut journal::Journal)| {
        let mut entry = entry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        update(&mut entry);
        if let Err(e) = journal.write(&entry) {
            error!(error = %e, "cannot update the journal");
        }
    };
    journal.write(
        &entry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )?;
    let steps = |vm: &str, doing: Doing, what: &str| {
        save(&|j| j.stepped(vm, what));
        live(vm, doing, what);
    };
    let before = |i: usize, action: &Action| {
        note(record, action)?;
        save(&|j| j.started(i));
        Ok(())
    };
    let report = execute_with(plan, target, hosts, &steps, before, |i, step| {
        save(&|j| j.ended(i));
        progress(step);
    })
    .await;
    journal.clear();
    Ok(report)
}

/// Adds the hosts `action` may put its VM on to `record`; the error says why not (the
/// action then fails untouched).
fn note(record: &Whereabouts, action: &Action) -> Result<(), String> {
    let hosts = may_put(action);
    if hosts.is_empty() {
        return Ok(());
    }
    record.note(action.vm(), &hosts).map_err(|e| {
        let why = format!(
            "cannot record where {} may run: {}",
            action.vm(),
            error_chain(&e)
        );
        error!(%why);
        why
    })
}

/// The hosts `action` may leave a copy of its VM on (where a QEMU may be started, or an
/// instance made): noted in the record of where VMs are before the action runs.
pub fn may_put(action: &Action) -> Vec<&str> {
    match action {
        Action::Create { host, .. }
        | Action::Recover { host, .. }
        | Action::Start { host, .. }
        | Action::Restart { host, .. }
        | Action::Update { host, .. } => vec![host],
        Action::Migrate { host, to, .. } => vec![host, to],
        Action::Stop { .. } | Action::Delete { .. } | Action::Prune { .. } => Vec::new(),
    }
}

async fn run<H: Host>(
    action: &Action,
    target: &Target,
    hosts: &BTreeMap<String, H>,
    stop_timeout: Duration,
    live: Live<'_>,
) -> Result<String, ExecError> {
    let host = hosts.get(action.host()).ok_or_else(|| ExecError::NoHost {
        host: action.host().to_owned(),
    })?;
    let vm = action.vm();
    let instance = || {
        target
            .instance(vm, action.host())
            .ok_or_else(|| ExecError::NotInCommit {
                vm: vm.to_owned(),
                commit: target.commit.short().to_owned(),
            })
    };
    // Fail points (test builds): `before` with the journal saying the action is next,
    // `after` with the action done but the journal not yet advanced past it.
    Ok(match action {
        Action::Recover { from, .. } => {
            failpoint!("engine.recover.before");
            host.recover(&instance()?).await?;
            failpoint!("engine.recover.after");
            format!("instance created (recovering from {from})")
        }
        Action::Create { .. } => {
            failpoint!("engine.create.before");
            host.create(&instance()?).await?;
            failpoint!("engine.create.after");
            "instance and disks created".to_owned()
        }
        Action::Start { .. } => {
            failpoint!("engine.start.before");
            let pid = host.start(vm).await?;
            info!(vm, pid, "started");
            failpoint!("engine.start.after");
            format!("running, pid {pid}")
        }
        Action::Stop { .. } => {
            failpoint!("engine.stop.before");
            let how = describe_stop(host.stop(vm, stop_timeout).await?);
            failpoint!("engine.stop.after");
            how.to_owned()
        }
        Action::Restart { .. } => {
            failpoint!("engine.restart.before");
            let inst = instance()?;
            let how = describe_stop(host.stop(vm, stop_timeout).await?);
            failpoint!("engine.restart.stopped");
            host.update(&inst).await?;
            failpoint!("engine.restart.updated");
            let pid = host.start(vm).await?;
            info!(vm, pid, "started");
            failpoint!("engine.restart.after");
            format!("{how}; running the new spec, pid {pid}")
        }
        Action::Update { .. } => {
            failpoint!("engine.update.before");
            host.update(&instance()?).await?;
            failpoint!("engine.update.after");
            "spec updated".to_owned()
        }
        Action::Prune { pid, .. } => {
            host.prune(vm, *pid).await?;
            format!("orphan QEMU pid {pid} stopped")
        }
        Action::Migrate { to, mode, .. } => {
            failpoint!("engine.migrate.before");
            let m = migrate::Move {
                vm,
                from: action.host(),
                to,
                mode: *mode,
            };
            let done = migrate::run_move(&m, target, hosts, stop_timeout, live).await?;
            failpoint!("engine.migrate.after");
            done
        }
        Action::Delete { .. } => {
            failpoint!("engine.delete.before");
            let kept = host.delete(vm).await?;
            failpoint!("engine.delete.after");
            match kept {
                Some(kept) => format!("instance removed; disks retained in {}", kept.display()),
                None => "instance removed (no local disks to retain)".to_owned(),
            }
        }
    })
}

fn describe_stop(outcome: StopOutcome) -> &'static str {
    match outcome {
        StopOutcome::AlreadyStopped => "was not running",
        StopOutcome::Graceful => "stopped gracefully",
        StopOutcome::Quit => "guest ignored the power button; QEMU quit after the stop timeout",
        StopOutcome::Paused => "QEMU held no running guest (paused by a migration); quit",
        StopOutcome::Killed => "QEMU did not quit and was killed",
    }
}

#[cfg(test)]
mod tests;
