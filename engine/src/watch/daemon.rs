//! The daemon's state and its one step, `reconcile`: the step `apply` takes too
//! ([`crate::step`]), around what is the daemon's own (triggers, timers, the hosts it
//! keeps connected and fences, adoption, the status branch).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::MissedTickBehavior;
use tracing::{debug, error, info, warn};

use super::fleet::{Agents, Connector, Hosts};
use super::health::Limits;
use super::push::Pusher;
use super::triggers::{watch_refs, Trigger};
use super::WatchConfig;
use crate::errors::error_chain;
use crate::execute::journal::JournalFile;
use crate::execute::runner::{LiveFn, Runner};
use crate::execute::{Doing, Outcome as ExecOutcome, Report, Step};
use crate::observe::Observed;
use crate::plan::Action;
use crate::records::{StateDir, StateLock};
use crate::source::remote::{is_remote, Remote};
use crate::source::{Source, Target, TargetError};
use crate::status::{EngineStatus, StatusDir, VmEvent};
use crate::step::{planned, publish, Fleet as _, Outcome, RETRY_FLOOR_MS};
use crate::time::now_ms;
use crate::wire::HostEvent;

/// How long a `git fetch` of a remote may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) struct Daemon<C: Connector> {
    cfg: WatchConfig,
    source: Source,
    remote: Option<Remote>,
    /// `refs/heads/<branch>`.
    rev: String,
    /// The repository followed: its git folder, or the URL of a remote.
    follows: String,
    state: StateDir,
    _lock: StateLock,
    status: StatusDir,
    /// The newest valid commit.
    target: Option<Arc<Target>>,
    /// The newest commit seen, when it is invalid.
    bad: Option<String>,
    /// The hosts, connected or away.
    pub(super) fleet: Hosts<C>,
    engine: EngineStatus,
    /// Why the journal of an interrupted apply could not be read, until the status says
    /// so once.
    damaged_journal: Option<String>,
    /// Status events not written yet.
    events: Vec<(String, VmEvent)>,
    pub(super) wake_at_ms: Option<u64>,
    adopted: bool,
    /// Sends the status branch to a remote repository.
    pusher: Option<Pusher>,
    /// Carries out the actions, several at once, while the daemon goes on reacting.
    runner: Runner<C::Link>,
    /// Where the runner tells of each action as it ends.
    ended: UnboundedReceiver<Step>,
    /// Actions handed to the runner whose end has not come back yet.
    running: usize,
    /// Ended actions not in the VMs' status yet.
    finished: Vec<Step>,
    /// Actions that failed (or were skipped) since the commit's attempt was last recorded:
    /// the attempt's problems.
    failures: Vec<Step>,
    /// VMs whose last action failed, and when they may be tried again: a retry, never a
    /// tight loop.
    retry_at: BTreeMap<String, u64>,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(cfg: WatchConfig) -> anyhow::Result<()> {
    let (tx, mut rx) = unbounded_channel();
    let (mut daemon, _ref_watcher) = Daemon::open(cfg, tx, |state| Agents {
        state: state.clone(),
    })
    .await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut timer = tokio::time::interval(daemon.cfg.interval);
    timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    timer.tick().await;
    let heartbeat = |d: &Daemon<Agents>| d.fleet.limits.interval;
    let mut health = tokio::time::interval(heartbeat(&daemon));
    health.set_missed_tick_behavior(MissedTickBehavior::Delay);
    daemon.step(vec![Trigger::Startup]).await;
    loop {
        if health.period() != heartbeat(&daemon) {
            // [heartbeat] interval comes from the commit: follow it.
            health = tokio::time::interval(heartbeat(&daemon));
            health.set_missed_tick_behavior(MissedTickBehavior::Delay);
        }
        let wake = daemon
            .wake_at_ms
            .map(|at| Duration::from_millis(at.saturating_sub(now_ms())));
        let first = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => Trigger::Signal,
            _ = timer.tick() => Trigger::Timer,
            _ = health.tick() => {
                if !daemon.fleet.health_changed() {
                    continue;
                }
                Trigger::Health
            }
            () = tokio::time::sleep(wake.unwrap_or_default()), if wake.is_some() => Trigger::Wake,
            Some(step) = daemon.ended.recv() => Trigger::Ended(Box::new(step)),
            Some(t) = rx.recv() => t,
        };
        let mut triggers = vec![first];
        while let Ok(more) = rx.try_recv() {
            triggers.push(more);
        }
        while let Ok(step) = daemon.ended.try_recv() {
            triggers.push(Trigger::Ended(Box::new(step)));
        }
        daemon.step(triggers).await;
    }
    info!("stopping on signal; every VM keeps running");
    Ok(())
}

impl<C: Connector> Daemon<C> {
    /// Opens the repository and the state directory (taking its lock); `connector`
    /// makes how hosts are reached, given the state directory.
    pub(super) async fn open(
        cfg: WatchConfig,
        tx: UnboundedSender<Trigger>,
        connector: impl FnOnce(&StateDir) -> C,
    ) -> anyhow::Result<(Self, Option<notify::RecommendedWatcher>)> {
        let remote_url = is_remote(&cfg.repo);
        let state_root = match (&cfg.state_dir, remote_url) {
            (Some(dir), _) => dir.clone(),
            (None, true) => anyhow::bail!(
                "watching a remote repository needs --state-dir (or PLASMAVMC_STATE_DIR)"
            ),
            (None, false) => {
                let probe = Source::open(&PathBuf::from(&cfg.repo), cfg.path.as_deref())?;
                probe
                    .spec_root()
                    .context("the repository has no working tree; pass --state-dir")?
                    .join(".plasmavmc")
            }
        };
        let state = StateDir::open(&state_root)
            .with_context(|| format!("state directory {}", state_root.display()))?;
        let lock = StateLock::acquire(&state.lock_path(), "plasmavmc watch")?;
        let (source, remote, branch) = if remote_url {
            let branch = cfg.branch.clone().unwrap_or_else(|| "main".to_owned());
            let remote = Remote::open(
                &cfg.repo,
                &state.root().join("repo.git"),
                &branch,
                FETCH_TIMEOUT,
            )
            .await?;
            (
                Source::open(remote.dir(), cfg.path.as_deref())?,
                Some(remote),
                branch,
            )
        } else {
            let source = Source::open(&PathBuf::from(&cfg.repo), cfg.path.as_deref())?;
            let branch = match &cfg.branch {
                Some(b) => b.clone(),
                None => source
                    .current_branch()
                    .context("HEAD is not on a branch; pass --branch")?,
            };
            (source, None, branch)
        };
        let watcher = if remote.is_none() {
            Some(
                watch_refs(source.git_dir(), tx.clone())
                    .context("watching the repository's refs")?,
            )
        } else {
            None
        };
        let status = StatusDir::new(&state.status_dir());
        let engine = status.read().map(|s| s.engine).unwrap_or_default();
        // Heal the last good commit even when the branch tip is invalid from the start.
        let target = engine.last_applied_revision.as_deref().and_then(|rev| match Target::load(&source, rev) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => {
                warn!(revision = %short(rev), error = %error_chain(&e), "the last applied commit cannot be read");
                None
            }
        });
        let damaged_journal = interrupted(&state);
        info!(repo = %cfg.repo, branch = %branch, state = %state.root().display(), pid = std::process::id(), "watching");
        let follows = if remote_url {
            cfg.repo.clone()
        } else {
            source.canonical_git_dir()
        };
        let fleet = Hosts::new(connector(&state), state.clone(), tx);
        let pusher = Pusher::for_remote(remote.as_ref(), cfg.status_branch.as_deref());
        let (runner, ended) = runner(&state, &status, &fleet);
        let daemon = Self {
            rev: format!("refs/heads/{branch}"),
            follows,
            cfg,
            source,
            remote,
            state,
            _lock: lock,
            status,
            target,
            bad: None,
            fleet,
            engine,
            damaged_journal,
            events: Vec::new(),
            wake_at_ms: None,
            adopted: false,
            pusher,
            runner,
            ended,
            running: 0,
            finished: Vec::new(),
            failures: Vec::new(),
            retry_at: BTreeMap::new(),
        };
        Ok((daemon, watcher))
    }

    /// Records what the triggers tell (host events) and reconciles once.
    pub(super) async fn step(&mut self, triggers: Vec<Trigger>) {
        let mut name = triggers.first().map_or("timer", Trigger::name);
        for t in &triggers {
            if let Trigger::Host(HostEvent::Exited {
                vm,
                pid,
                reason,
                status,
                expected,
                ..
            }) = t
            {
                info!(vm = %vm, pid, reason = reason.as_str(), status = status.as_deref().unwrap_or("-"), expected, "vm exited");
                if !expected {
                    let status = status
                        .as_deref()
                        .map(|s| format!(", {s}"))
                        .unwrap_or_default();
                    self.events.push((
                        vm.clone(),
                        event("exited", format!("{reason} (pid {pid}{status})")),
                    ));
                }
            }
            if let Trigger::Host(HostEvent::Watchdog {
                vm, pid, action, ..
            }) = t
            {
                info!(vm = %vm, pid, action = action.as_str(), "watchdog fired");
                self.events.push((
                    vm.clone(),
                    event(
                        "watchdog",
                        format!(
                            "the guest stopped feeding its watchdog (pid {pid}, action {})",
                            action.as_str()
                        ),
                    ),
                ));
            }
            if let Trigger::Host(HostEvent::Probe {
                vm,
                liveness,
                state,
                first,
            }) = t
            {
                if let Some((kind, what)) = probe_event(*liveness, state, *first) {
                    self.events.push((vm.clone(), event(kind, what)));
                }
            }
            if let Trigger::Host(HostEvent::GuestAgent { vm, info, first }) = t {
                if let Some(what) = guest_agent_event(info, *first) {
                    self.events.push((vm.clone(), event("guest-agent", what)));
                }
            }
            if matches!(t, Trigger::Commit) {
                name = "commit";
            }
            if let Trigger::Ended(step) = t {
                if !matches!(step.outcome, ExecOutcome::Done { .. }) {
                    let at = now_ms() + RETRY_FLOOR_MS;
                    self.retry_at.insert(step.action.vm().to_owned(), at);
                    self.failures.push((**step).clone());
                }
                self.running = self.running.saturating_sub(1);
                self.finished.push((**step).clone());
            }
        }
        let fetch = triggers
            .iter()
            .any(|t| matches!(t, Trigger::Startup | Trigger::Timer | Trigger::Signal));
        if let Err(e) = self.reconcile(name, fetch).await {
            error!(error = %error_chain(e.as_ref()), "reconcile failed; retrying at the next trigger");
        }
        // A drill's fault last: what it causes is then seen as any failure is, through
        // the host's events, not by a reconcile that knew it was coming.
        if let Some(target) = &self.target {
            let vms: Vec<&String> = target.desired.vms.keys().collect();
            let desk = crate::drill::DrillDesk::new(self.state.root());
            let events = crate::drill::serve(&desk, self.fleet.connected(), &vms).await;
            self.events.extend(events);
        }
    }

    async fn reconcile(&mut self, trigger: &str, fetch: bool) -> anyhow::Result<()> {
        if let (Some(remote), true) = (&self.remote, fetch) {
            if let Err(e) = remote.fetch(FETCH_TIMEOUT).await {
                warn!(error = %error_chain(&e), "fetch failed; using what was fetched before");
            }
        }
        let id = self.source.resolve(&self.rev)?;
        info!(trigger, revision = %short(&id), "reconcile");
        let mut changed = self.load(&id);
        let Some(target) = self.target.clone() else {
            // Nothing valid was ever applied here: report what runs, act on nothing.
            self.fleet
                .ensure(&plasmavmc_specs::Desired::with_implicit_local())
                .await;
            let seen = Outcome {
                after: self.fleet.look().await,
                ..Outcome::default()
            };
            return self.publish(None, &seen, changed);
        };
        let heartbeat = &target.desired.cluster.heartbeat;
        self.fleet.limits = Limits {
            interval: heartbeat.interval.0,
            down_after: heartbeat.down_after.0,
        };
        self.fleet.ensure(&target.desired).await;
        self.fleet.fence_away(&target.desired).await;
        let observed = self.fleet.look().await;
        self.adopt(&observed);
        let plan = planned(&target, &observed, self.cfg.prune);
        for note in &plan.notes {
            debug!(%note, "plan note");
        }
        changed |= !plan.is_empty();
        // VMs whose last action failed wait for their retry; the others go to the runner
        // now, beside whatever it still carries out (those VMs the planner left alone).
        let now = now_ms();
        self.retry_at.retain(|_, at| *at > now);
        let (held, go): (Vec<Action>, Vec<Action>) = plan
            .actions
            .iter()
            .cloned()
            .partition(|a| self.retry_at.contains_key(a.vm()));
        if !go.is_empty() {
            self.running += go.len();
            self.runner
                .submit(go, target.clone(), Arc::new(self.fleet.hosts().clone()));
        }
        // Idle by the endings this daemon has heard of, never ahead of them.
        let idle = self.running == 0;
        if idle {
            // Nothing runs: an interrupted run's journal has told all it had to.
            JournalFile::new(self.state.root()).clear();
        }
        let report = report_of(&mut self.finished);
        // The commit counts as applied once nothing runs, nothing waits for a retry and
        // nothing failed; a failure is said as soon as nothing runs.
        if idle && self.bad.is_none() && (held.is_empty() || !self.failures.is_empty()) {
            let attempt = report_of(&mut self.failures);
            self.engine.attempted(&id, attempt.as_ref(), &plan.pending);
        }
        self.wake_at_ms = plan
            .wake_at_ms
            .into_iter()
            .chain(self.retry_at.values().copied())
            .min();
        let outcome = Outcome {
            report,
            after: observed,
            pending: plan.pending,
            wake_at_ms: self.wake_at_ms,
        };
        if let Some(why) = self.damaged_journal.take_if(|_| idle) {
            // Said once in the status, as `apply` does (and logged at startup), beside
            // the attempt it came with.
            self.engine.add_problem(&why);
        }
        changed |= !self.events.is_empty() || outcome.report.is_some();
        self.publish(Some(&target), &outcome, changed)
    }

    /// Steps the daemon on the actions' endings until nothing is in flight (tests: the
    /// loop of [`run`] does this as they come).
    #[cfg(test)]
    pub(super) async fn settle(&mut self) {
        loop {
            let mut triggers = Vec::new();
            while let Ok(step) = self.ended.try_recv() {
                triggers.push(Trigger::Ended(Box::new(step)));
            }
            if triggers.is_empty() {
                if self.running == 0 {
                    return;
                }
                match self.ended.recv().await {
                    Some(step) => triggers.push(Trigger::Ended(Box::new(step))),
                    None => return,
                }
            }
            self.step(triggers).await;
        }
    }

    /// The first look of this daemon: every QEMU found running is adopted (never
    /// restarted), and says so in its VM's events.
    fn adopt(&mut self, observed: &Observed) {
        if std::mem::replace(&mut self.adopted, true) {
            return;
        }
        for (name, vm) in observed
            .hosts
            .values()
            .flat_map(|inv| inv.vms.iter())
            .filter(|(_, v)| v.state.has_process())
        {
            let pid = vm.pid.unwrap_or(0);
            info!(vm = %name, pid, "adopted");
            self.events.push((
                name.clone(),
                event("adopted", format!("QEMU pid {pid} adopted; not restarted")),
            ));
        }
    }

    /// Reads commit `id` unless already known; an invalid commit keeps the last good one.
    /// Returns whether anything changed.
    fn load(&mut self, id: &str) -> bool {
        if self.target.as_ref().is_some_and(|t| t.commit.id == id)
            || self.bad.as_deref() == Some(id)
        {
            return false;
        }
        self.engine.revision_seen = Some(id.to_owned());
        match Target::load(&self.source, id) {
            Ok(t) => {
                info!(revision = %short(id), vms = t.desired.vms.len(), "new commit");
                self.target = Some(Arc::new(t));
                self.bad = None;
            }
            Err(TargetError::Invalid {
                commit,
                diagnostics,
            }) => {
                let lines: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
                warn!(revision = %commit, errors = %lines.join("; "), "commit refused: invalid; still running the last good commit");
                self.engine.last_attempted_revision = Some(id.to_owned());
                self.engine.last_error = Some(lines.join("\n"));
                self.bad = Some(id.to_owned());
            }
            Err(TargetError::Source(e)) => {
                warn!(error = %error_chain(&e), "cannot read the commit");
                self.engine.last_error = Some(error_chain(&e));
            }
        }
        true
    }

    /// Writes the status files (and commits them to the status branch when asked and
    /// something `changed`).
    fn publish(
        &mut self,
        target: Option<&Target>,
        outcome: &Outcome,
        changed: bool,
    ) -> anyhow::Result<()> {
        self.engine.stamp(self.source.spec_dir());
        self.engine.repo = Some(self.follows.clone());
        self.engine.branch = self.rev.strip_prefix("refs/heads/").map(str::to_owned);
        let events = std::mem::take(&mut self.events);
        let mut engine = self.engine.clone();
        if let Some(why) = self.pusher.as_ref().and_then(Pusher::failure) {
            // Said while it lasts, not kept: the next successful push clears it.
            engine.add_problem(&why);
        }
        publish(
            &self.status,
            engine,
            target.map(|t| &t.desired),
            outcome,
            &events,
        )?;
        let mut committed = false;
        if let (Some(branch), true) = (&self.cfg.status_branch, changed) {
            let revision = self.engine.revision_seen.as_deref().map_or("-", short);
            let message = format!("status: commit {revision}");
            match crate::status::branch::commit_status(
                self.source.repository(),
                branch,
                &self.state.status_dir(),
                &message,
            ) {
                Ok(id) => committed = id.is_some(),
                Err(e) => {
                    warn!(error = %error_chain(&e), branch, "cannot commit the status branch");
                }
            }
        }
        if let Some(pusher) = &mut self.pusher {
            // In a task of its own: a slow or hanging remote never delays a reconcile.
            pusher.after_status(committed);
        }
        Ok(())
    }
}

/// Says what an interrupted run's journal tells; returns why it could not be read.
fn interrupted(state: &StateDir) -> Option<String> {
    match JournalFile::new(state.root()).before_run() {
        Ok(Some(what)) => {
            warn!(journal = %what, "resuming after an interrupted apply");
            None
        }
        Ok(None) => None,
        Err(why) => {
            error!(%why, "the apply journal is damaged");
            Some(why)
        }
    }
}

/// The daemon's runner: it shows long actions' progress in the status and tells of each
/// action as it ends on the channel returned.
fn runner<C: Connector>(
    state: &StateDir,
    status: &StatusDir,
    fleet: &Hosts<C>,
) -> (Runner<C::Link>, UnboundedReceiver<Step>) {
    let (ended_tx, ended) = unbounded_channel();
    let shows = status.clone();
    let live: LiveFn = Arc::new(move |vm: &str, doing: Doing, what: &str| {
        info!(vm, %what, "in progress");
        if let Err(e) = shows.set_live(vm, doing, what) {
            warn!(vm, error = %e, "cannot show progress in the status");
        }
    });
    let runner = Runner::spawn(state.root(), fleet.in_flight.clone(), live, move |step| {
        let _ = ended_tx.send(step);
    });
    (runner, ended)
}

/// The ended actions as a report, none when there are none; `steps` is left empty.
fn report_of(steps: &mut Vec<Step>) -> Option<Report> {
    (!steps.is_empty()).then(|| Report {
        steps: std::mem::take(steps),
    })
}

fn event(kind: &str, message: String) -> VmEvent {
    VmEvent {
        at: crate::time::stamp_ms(),
        kind: kind.to_owned(),
        message,
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// The event text of a guest agent's change: it answers (with its OS and addresses), or
/// it stopped answering; nothing for a first "does not answer" (a guest still booting).
fn guest_agent_event(info: &crate::observe::GuestAgentInfo, first: bool) -> Option<String> {
    if info.answering {
        let os = info.os.as_deref().unwrap_or("OS unknown");
        let addresses = if info.addresses.is_empty() {
            "no addresses".to_owned()
        } else {
            info.addresses.join(", ")
        };
        return Some(format!("answers ({os}; {addresses})"));
    }
    (!first).then(|| {
        format!(
            "stopped answering: {}",
            info.error.as_deref().unwrap_or("no answer")
        )
    })
}

/// The event of a probe that flipped: `unhealthy`/`healthy` (liveness), `ready`/
/// `not-ready` (readiness); nothing for a first word that is no news (alive, not ready
/// yet).
fn probe_event(
    liveness: bool,
    state: &crate::observe::ProbeState,
    first: bool,
) -> Option<(&'static str, String)> {
    match (liveness, state.ok) {
        (true, false) => Some((
            "unhealthy",
            format!("liveness probe failed: {}", state.last),
        )),
        (true, true) => (!first).then(|| ("healthy", state.last.clone())),
        (false, true) => Some(("ready", state.last.clone())),
        (false, false) => (!first).then(|| ("not-ready", state.last.clone())),
    }
}
