//! The daemon's state and its one step, `reconcile`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::time::MissedTickBehavior;
use tracing::{debug, error, info, warn};

use super::health::{self, Health, Limits};
use super::triggers::{watch_refs, Trigger};
use super::WatchConfig;
use crate::errors::error_chain;
use crate::execute::journal::JournalFile;
use crate::execute::{execute_journaled, Report};
use crate::host::{agent_argv, AgentHost, ConnectOptions, Host};
use crate::observe::{Observed, Unreachable};
use crate::plan::{plan, prune_actions};
use crate::source::remote::{is_remote, Remote};
use crate::source::{Source, Target, TargetError};
use crate::state::fence::FenceRecords;
use crate::state::whereabouts::Whereabouts;
use crate::state::{StateDir, StateLock};
use crate::status::{EngineStatus, StatusDir, VmEvent};
use crate::time::now_ms;
use crate::wire::HostEvent;

/// The soonest a failed action is retried.
const RETRY_FLOOR_MS: u64 = 1000;

/// How long a `git fetch` of a remote may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

struct Daemon {
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
    journal: JournalFile,
    /// The newest valid commit.
    target: Option<Target>,
    /// The newest commit seen, when it is invalid.
    bad: Option<String>,
    /// Connected hosts.
    hosts: BTreeMap<String, AgentHost>,
    /// The agent argv each connected host was reached with.
    host_argv: BTreeMap<String, Vec<String>>,
    /// Hosts of the specs that could not be reached, and why.
    down: BTreeMap<String, String>,
    /// Connected hosts that were suspect (missed heartbeats) at the last observation.
    suspect: Vec<String>,
    /// What the last plan could not do (`vm: why`), shown in those VMs' status.
    pending: Vec<crate::plan::Pending>,
    /// Since when each unreachable host has been away, and when it was last fenced at.
    away_since: BTreeMap<String, std::time::Instant>,
    fence_tried: BTreeMap<String, std::time::Instant>,
    /// Heartbeat interval and the silence after which a host is down.
    heartbeat: Duration,
    down_after: Duration,
    engine: EngineStatus,
    /// Status events not written yet.
    events: Vec<(String, VmEvent)>,
    wake_at_ms: Option<u64>,
    adopted: bool,
    tx: UnboundedSender<Trigger>,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(cfg: WatchConfig) -> anyhow::Result<()> {
    let (tx, mut rx) = unbounded_channel();
    let (mut daemon, _ref_watcher) = Daemon::open(cfg, tx).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut timer = tokio::time::interval(daemon.cfg.interval);
    timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    timer.tick().await;
    let mut health = tokio::time::interval(daemon.heartbeat);
    health.set_missed_tick_behavior(MissedTickBehavior::Delay);
    daemon.step(vec![Trigger::Startup]).await;
    loop {
        if health.period() != daemon.heartbeat {
            // [heartbeat] interval comes from the commit: follow it.
            health = tokio::time::interval(daemon.heartbeat);
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
                if !daemon.health_changed() {
                    continue;
                }
                Trigger::Health
            }
            () = tokio::time::sleep(wake.unwrap_or_default()), if wake.is_some() => Trigger::Wake,
            Some(t) = rx.recv() => t,
        };
        let mut triggers = vec![first];
        while let Ok(more) = rx.try_recv() {
            triggers.push(more);
        }
        daemon.step(triggers).await;
    }
    info!("stopping on signal; every VM keeps running");
    Ok(())
}

impl Daemon {
    async fn open(
        cfg: WatchConfig,
        tx: UnboundedSender<Trigger>,
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
            Ok(t) => Some(t),
            Err(e) => {
                warn!(revision = %short(rev), error = %error_chain(&e), "the last applied commit cannot be read");
                None
            }
        });
        let journal = JournalFile::new(state.root());
        match journal.before_run() {
            Ok(Some(what)) => warn!(journal = %what, "resuming after an interrupted apply"),
            Ok(None) => {}
            Err(why) => error!(%why, "the apply journal is damaged"),
        }
        info!(repo = %cfg.repo, branch = %branch, state = %state.root().display(), pid = std::process::id(), "watching");
        let follows = if remote_url {
            cfg.repo.clone()
        } else {
            source.canonical_git_dir()
        };
        let daemon = Self {
            rev: format!("refs/heads/{branch}"),
            follows,
            cfg,
            source,
            remote,
            state,
            _lock: lock,
            status,
            journal,
            target,
            bad: None,
            hosts: BTreeMap::new(),
            host_argv: BTreeMap::new(),
            down: BTreeMap::new(),
            suspect: Vec::new(),
            pending: Vec::new(),
            away_since: BTreeMap::new(),
            fence_tried: BTreeMap::new(),
            heartbeat: Duration::from_secs(1),
            down_after: Duration::from_secs(5),
            engine,
            events: Vec::new(),
            wake_at_ms: None,
            adopted: false,
            tx,
        };
        Ok((daemon, watcher))
    }

    /// Records what the triggers tell (host events) and reconciles once.
    async fn step(&mut self, triggers: Vec<Trigger>) {
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
            if matches!(t, Trigger::Commit) {
                name = "commit";
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
            let events = crate::drill::serve(&desk, &self.hosts, &vms).await;
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
        let Some(target) = &self.target else {
            // Nothing valid was ever applied here: report what runs, act on nothing.
            self.ensure_hosts(&plasmavmc_specs::Desired::with_implicit_local())
                .await;
            let observed = self.observe().await;
            self.write_status(None, None, &observed, changed)?;
            return Ok(());
        };
        let desired = target.desired.clone();
        self.heartbeat = desired.cluster.heartbeat.interval.0;
        self.down_after = desired.cluster.heartbeat.down_after.0;
        self.ensure_hosts(&desired).await;
        self.fence_away_hosts(&desired).await;
        let observed = self.observe().await;
        if !self.adopted {
            self.adopted = true;
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
        let target = self.target.clone().expect("checked above");
        let mut plan = plan(&target.desired, &observed, now_ms());
        self.pending.clone_from(&plan.pending);
        if self.cfg.prune {
            plan.actions.splice(0..0, prune_actions(&observed));
        }
        self.wake_at_ms = plan.wake_at_ms;
        for note in &plan.notes {
            debug!(%note, "plan note");
        }
        let (report, after) = if plan.is_empty() {
            (None, observed)
        } else {
            changed = true;
            let status = &self.status;
            let live = |vm: &str, what: &str| {
                info!(vm, %what, "in progress");
                if let Err(e) = status.set_migrating(vm, what) {
                    warn!(vm, error = %e, "cannot show progress in the status");
                }
            };
            let report = execute_journaled(
                &plan,
                &target,
                &self.hosts,
                &self.journal,
                &Whereabouts::new(self.state.root()),
                &live,
                |_| {},
            )
            .await?;
            let after = self.observe().await;
            // Acting changes what comes next (a failed start records an exit and starts a
            // backoff): plan again to know when to wake. Actions still due mean something
            // failed; retry in a second, never in a tight loop.
            let next = crate::plan::plan(&target.desired, &after, now_ms());
            self.wake_at_ms = if next.is_empty() {
                next.wake_at_ms
            } else {
                Some(now_ms() + RETRY_FLOOR_MS)
            };
            // What is left undone is what the hosts show now (a start refused for good
            // is pending only after it was tried).
            self.pending = next.pending;
            (Some(report), after)
        };
        if self.bad.is_none() {
            self.engine.attempted(&id, report.as_ref(), &self.pending);
        }
        changed |= !self.events.is_empty();
        self.write_status(Some(&target), report.as_ref(), &after, changed)
    }

    fn limits(&self) -> Limits {
        Limits {
            interval: self.heartbeat,
            down_after: self.down_after,
        }
    }

    /// What the ready hosts run, plus what is known of the others (unreachable and
    /// suspect hosts, where each VM was last seen). Suspect hosts are not asked: a call
    /// to a silent agent would only wait.
    async fn observe(&mut self) -> Observed {
        let health::Triage {
            ready,
            suspect,
            down,
        } = health::triage(&self.hosts, self.limits());
        for (host, s) in &suspect {
            if !self.suspect.contains(host) {
                warn!(host = %host, why = %s.why, "host suspect: missed heartbeats; its VMs are unknown until it answers");
            }
        }
        for host in &self.suspect {
            if !suspect.contains_key(host) && self.hosts.contains_key(host) {
                info!(host = %host, "host answers again; ready");
            }
        }
        self.suspect = suspect.keys().cloned().collect();
        // A host that went down after `ensure_hosts` looked (during the actions) is not
        // asked, and says why: its VMs are unknown, never "gone".
        let mut down = down;
        down.extend(self.down.clone());
        let unreachable = Unreachable { down, suspect };
        crate::step::look(ready, &unreachable, &self.state).await
    }

    /// Whether host health calls for a reconcile: a connected host closed or went silent
    /// past `down_after`, one entered or left `suspect`, or an unreachable one is due for
    /// fencing.
    fn health_changed(&self) -> bool {
        let limits = self.limits();
        let lost = self.hosts.values().any(|h| limits.of(h) == Health::Down);
        let suspect_changed = health::suspects(&self.hosts, limits) != self.suspect;
        let fence_due = self.away_since.iter().any(|(host, since)| {
            since.elapsed() >= self.down_after
                && self
                    .fence_tried
                    .get(host)
                    .is_none_or(|t| t.elapsed() >= self.down_after)
        });
        lost || suspect_changed || fence_due
    }

    /// Runs the `fence` command of every host away for `down_after` that is not fenced
    /// yet; exit 0 records it as fenced. Retried every `down_after`, never in a loop.
    async fn fence_away_hosts(&mut self, desired: &plasmavmc_specs::Desired) {
        let records = FenceRecords::new(self.state.root());
        let fenced = records.all();
        for (host, since) in self.away_since.clone() {
            let Some(argv) = desired.hosts.get(&host).and_then(|h| h.spec.fence.clone()) else {
                // Nothing to run: the operator decides (`fence confirm`). Throttle the
                // health check's "fence due" for this host all the same.
                self.fence_tried
                    .insert(host.clone(), std::time::Instant::now());
                continue;
            };
            let due = since.elapsed() >= self.down_after
                && self
                    .fence_tried
                    .get(&host)
                    .is_none_or(|t| t.elapsed() >= self.down_after);
            if fenced.contains_key(&host) {
                // Nothing to run any more; throttle the health check's "fence due" all
                // the same, or a fenced host would cost a reconcile (and a reconnection
                // attempt) at every heartbeat until it returns.
                self.fence_tried
                    .insert(host.clone(), std::time::Instant::now());
                continue;
            }
            if !due {
                continue;
            }
            self.fence_tried
                .insert(host.clone(), std::time::Instant::now());
            warn!(host = %host, command = ?argv, "host down; fencing it");
            match run_fence(&argv).await {
                Ok(()) => {
                    if let Err(e) = records.record(&host, "fence command") {
                        error!(host = %host, error = %error_chain(&e), "cannot record the fencing");
                    } else {
                        info!(host = %host, "fenced");
                    }
                }
                Err(why) => warn!(host = %host, %why, "fence command failed; its VMs stay unknown"),
            }
        }
    }

    /// Keeps one agent connection per host of `desired`: new hosts and broken channels are
    /// (re)connected, hosts gone from the specs are dropped (their agents exit).
    async fn ensure_hosts(&mut self, desired: &plasmavmc_specs::Desired) {
        let limits = self.limits();
        // When each dropped host was last heard from: its `down_after` (and so its
        // fencing) counts from there, not from when this engine gave up on it.
        let mut last_heard = BTreeMap::new();
        self.hosts.retain(|name, host| {
            let keep = desired.hosts.contains_key(name) && limits.of(host) != Health::Down;
            if !keep {
                // Hang up for real: a silent (partitioned) agent must see EOF when it
                // wakes, release its root and exit, so the host can rejoin.
                host.close();
                let heard = std::time::Instant::now()
                    .checked_sub(host.silence())
                    .unwrap_or_else(std::time::Instant::now);
                last_heard.insert(name.clone(), heard);
            }
            keep
        });
        self.host_argv
            .retain(|name, _| self.hosts.contains_key(name));
        self.down.clear();
        for entry in desired.hosts.values() {
            let argv = match agent_argv(entry, &self.state) {
                Ok(argv) => argv,
                Err(e) => {
                    self.down.insert(entry.name.clone(), error_chain(&e));
                    warn!(host = %entry.name, error = %error_chain(&e), "cannot reach host");
                    continue;
                }
            };
            if self.host_argv.get(&entry.name) == Some(&argv) {
                continue;
            }
            let opts = ConnectOptions {
                heartbeat: self.heartbeat,
                down_after: self.down_after,
                ..ConnectOptions::default()
            };
            match AgentHost::connect(&entry.name, &argv, opts).await {
                Ok(host) => {
                    info!(host = %entry.name, hostname = %host.facts().hostname, "connected to the agent");
                    forward_events(&host, self.tx.clone());
                    self.hosts.insert(entry.name.clone(), host);
                    self.host_argv.insert(entry.name.clone(), argv);
                }
                Err(e) => {
                    self.hosts.remove(&entry.name);
                    self.host_argv.remove(&entry.name);
                    warn!(host = %entry.name, error = %error_chain(&e), "host unreachable");
                    self.down.insert(entry.name.clone(), error_chain(&e));
                }
            }
        }
        let now = std::time::Instant::now();
        for name in desired.hosts.keys() {
            if self.hosts.contains_key(name) {
                self.away_since.remove(name);
                self.fence_tried.remove(name);
            } else {
                self.away_since
                    .entry(name.clone())
                    .or_insert_with(|| last_heard.get(name).copied().unwrap_or(now));
            }
        }
        self.away_since
            .retain(|name, _| desired.hosts.contains_key(name));
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
                self.target = Some(t);
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

    fn write_status(
        &mut self,
        target: Option<&Target>,
        report: Option<&Report>,
        observed: &Observed,
        changed: bool,
    ) -> anyhow::Result<()> {
        self.engine.updated_at = crate::time::now();
        env!("CARGO_PKG_VERSION").clone_into(&mut self.engine.version);
        self.engine.repo = Some(self.follows.clone());
        self.engine.branch = self.rev.strip_prefix("refs/heads/").map(str::to_owned);
        self.source.spec_dir().clone_into(&mut self.engine.spec_dir);
        let events = std::mem::take(&mut self.events);
        let mut snap = self.status.build(
            self.engine.clone(),
            target.map(|t| &t.desired),
            observed,
            report,
            &events,
        );
        snap.explain_pending(&self.pending);
        self.status.write(&snap)?;
        if let (Some(branch), true) = (&self.cfg.status_branch, changed) {
            let revision = self.engine.revision_seen.as_deref().map_or("-", short);
            let message = format!("status: commit {revision}");
            if let Err(e) = crate::status::branch::commit_status(
                self.source.repository(),
                branch,
                &self.state.status_dir(),
                &message,
            ) {
                warn!(error = %error_chain(&e), branch, "cannot commit the status branch");
            }
        }
        Ok(())
    }
}

/// Runs a fence command (argv, no shell); `Ok` when it exits 0 within a minute.
async fn run_fence(argv: &[String]) -> Result<(), String> {
    let (program, rest) = argv.split_first().ok_or("empty fence command")?;
    let child = tokio::process::Command::new(program)
        .args(rest)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(60), child).await {
        Err(_) => Err("timed out after 60s".to_owned()),
        Ok(Err(e)) => Err(format!("cannot run {program}: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Forwards a host's events into the trigger channel, until the host is dropped.
fn forward_events(host: &AgentHost, tx: UnboundedSender<Trigger>) {
    let mut events = host.subscribe();
    tokio::spawn(async move {
        loop {
            let trigger = match events.recv().await {
                // Exits the engine asked for are its own doing, progress is only shown:
                // nothing to react to.
                Ok(HostEvent::Exited { expected: true, .. } | HostEvent::Migrating { .. }) => {
                    continue
                }
                Ok(e) => Trigger::Host(e),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Trigger::Timer,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            };
            if tx.send(trigger).is_err() {
                break;
            }
        }
    });
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
