//! `plasmavmc drill --repo R --vm NAME --yes-disrupt NAME`: the rows that touch one VM
//! only, against a real cluster's designated test VM and its running daemon.
//!
//! The daemon (`plasmavmc watch`) owns the hosts' agents, so the drill never talks to a
//! host: faults go to the daemon as requests in the state directory (see
//! [`super::desk`]), moves go through commits to the branch it follows (see
//! [`pin`]), the engine crash is a `kill -9` of the daemon (its service manager must
//! start it again), and everything is measured from the status files the daemon writes
//! (event times to the millisecond). No other VM is named in any request or commit.

mod pin;
mod rows;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use plasmavmc_specs::{RestartPolicy, VmSpec};

use super::desk::{DrillAnswer, DrillDesk};
use super::{ms, poll_until, run_rows, Row};
use crate::records::{lock_holder, running_watch};
use crate::source::{Source, Target};
use crate::status::{EngineStatus, StatusDir, VmEvent, VmPhase, VmStatus};
use crate::wire::Fault;

/// How a drill against a real cluster runs.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub repo: PathBuf,
    pub path: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    /// The designated test VM: the only one the drill touches.
    pub vm: String,
    pub runs: usize,
    /// Where the live round trip goes (default: another ready host).
    pub to: Option<String>,
    /// The daemon is restarted by a service manager other than systemd.
    pub supervised: bool,
    /// How long the VM's QEMU must have run before a fault strikes it (its guest booted).
    pub settle: Duration,
    pub only: Vec<String>,
}

/// The cluster as the drill sees it: its repository, state directory and daemon.
pub struct Cluster {
    source: Source,
    state: PathBuf,
    vm: String,
    spec: VmSpec,
    /// The VM's spec file, relative to the repository top.
    spec_path: String,
    cfg: ClusterConfig,
    /// Restart settings of the applied commit: `(max_failures, window)`.
    restart: (u32, Duration),
}

/// Bound for one step of a row (a restart, a move, the engine coming back).
const STEP: Duration = Duration::from_secs(120);

/// Runs the rows of a real cluster; refuses up front (touching nothing) when the VM or
/// the daemon is not in a state to be drilled.
pub fn run_cluster(cfg: &ClusterConfig, progress: &mut dyn FnMut(&str)) -> Result<Vec<Row>> {
    let mut cluster = Cluster::open(cfg.clone())?;
    let pid = cluster.daemon()?;
    progress(&format!(
        "drilling VM {} through the daemon (pid {pid}) of {}",
        cluster.vm,
        cluster.state.display()
    ));
    cluster.settled()?;
    let exits = cluster.exit_budget();
    let refusals: BTreeMap<&str, String> = rows::ROWS
        .iter()
        .filter_map(|m| Some((m.name, rows::refusal(&cluster, m.name, pid)?)))
        .collect();
    let plan = |mode: &super::modes::Mode<Cluster>| match refusals.get(mode.name) {
        Some(why) => Err(why.clone()),
        None => cluster_plan(mode.name, cfg, exits),
    };
    Ok(run_rows(
        &mut cluster,
        &rows::ROWS,
        &cfg.only,
        cfg.runs,
        &plan,
        &|_| {},
        progress,
    ))
}

/// How many runs `row` gets: the rows that end the VM's QEMU share what the restart
/// policy allows before it gives up (`exits`), so the drill never leaves the VM failed.
fn cluster_plan(row: &str, cfg: &ClusterConfig, exits: u32) -> Result<usize, String> {
    let exit_rows = rows::ROWS
        .iter()
        .filter(|m| rows::ends_qemu(m.name))
        .filter(|m| cfg.only.is_empty() || cfg.only.iter().any(|o| m.name.contains(o.as_str())))
        .count();
    if !rows::ends_qemu(row) {
        return Ok(cfg.runs);
    }
    let share = usize::try_from(exits).unwrap_or(usize::MAX) / exit_rows.max(1);
    if share == 0 {
        return Err(format!(
            "the restart policy allows no more exits of {} now ([restart] max_failures within its window): another would leave it failed",
            cfg.vm
        ));
    }
    Ok(cfg.runs.min(share))
}

impl Cluster {
    fn open(cfg: ClusterConfig) -> Result<Self> {
        let source = Source::open(&cfg.repo, cfg.path.as_deref())?;
        let state = match (&cfg.state_dir, source.spec_root()) {
            (Some(dir), _) => dir.clone(),
            (None, Some(root)) => root.join(".plasmavmc"),
            (None, None) => bail!("the repository has no working tree; pass --state-dir"),
        };
        let state = std::path::absolute(&state).unwrap_or(state);
        let engine = read_engine(&state)?;
        if engine.spec_dir != source.spec_dir() {
            bail!(
                "the daemon reads the specs in {:?} of its repository, this drill in {:?}: pass the same --path",
                engine.spec_dir,
                source.spec_dir()
            );
        }
        // The commit the daemon works toward (applied, or tried while another VM's
        // problem keeps it from counting as applied).
        let applied = engine
            .last_attempted_revision
            .clone()
            .or(engine.last_applied_revision.clone())
            .with_context(|| {
                format!(
                    "the daemon of {} has applied no commit yet",
                    state.display()
                )
            })?;
        let target = Target::load(&source, &applied)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("reading the applied commit {applied}"))?;
        let entry = target.desired.vms.get(&cfg.vm).with_context(|| {
            format!(
                "{} is not a VM of the applied commit {}",
                cfg.vm,
                target.commit.short()
            )
        })?;
        if entry.spec.restart == RestartPolicy::Never {
            bail!(
                "{} has restart = \"never\": a crash would leave it stopped; the drill needs a VM the engine restarts",
                cfg.vm
            );
        }
        let file = target
            .commit
            .files
            .iter()
            .find(|f| f.path == entry.file)
            .context("the VM's spec file")?;
        let spec_path = match source.spec_dir() {
            "" => file.rel.clone(),
            dir => format!("{dir}/{}", file.rel),
        };
        let restart = &target.desired.cluster.restart;
        Ok(Self {
            vm: cfg.vm.clone(),
            spec: entry.spec.clone(),
            spec_path,
            restart: (restart.max_failures, restart.window.0),
            source,
            state,
            cfg,
        })
    }

    /// The pid of the daemon holding the state directory (never taking its lock: a
    /// daemon starting at that moment would fail).
    fn daemon(&self) -> Result<i32> {
        let lock = self.state.join("lock");
        if let Some(pid) = running_watch(&lock) {
            return Ok(pid);
        }
        match lock_holder(&lock) {
            Some((pid, text)) => bail!(
                "{} is held by {text} (pid {pid}), not by `plasmavmc watch`",
                self.state.display()
            ),
            None => bail!(
                "no `plasmavmc watch` holds {}: the drill measures the running daemon; start it (e.g. examples/systemd) and retry",
                self.state.display()
            ),
        }
    }

    /// The daemon's pid, if one holds the state directory now.
    fn daemon_now(&self) -> Option<i32> {
        self.daemon().ok()
    }

    fn status(&self) -> Option<VmStatus> {
        status_dir(&self.state).vm(&self.vm).ok().flatten()
    }

    fn engine(&self) -> Result<EngineStatus> {
        read_engine(&self.state)
    }

    /// Waits until the VM runs (after what a previous row did); returns its status.
    fn settled(&self) -> Result<VmStatus> {
        let mut last = None;
        let ok = poll_until(STEP, || {
            last = self.status();
            last.as_ref()
                .is_some_and(|s| s.phase == VmPhase::Running && s.pid.is_some() && s.host.is_some())
        });
        match (ok, last) {
            (true, Some(s)) => Ok(s),
            (_, s) => bail!(
                "{} is not running (status: {}); the drill starts from a running VM",
                self.vm,
                s.map_or_else(
                    || "none".to_owned(),
                    |s| format!(
                        "{}{}",
                        s.phase.as_str(),
                        s.message.map(|m| format!(", {m}")).unwrap_or_default()
                    )
                )
            ),
        }
    }

    /// Unexpected exits of the VM in the restart policy's window before `at`, as its
    /// status events tell.
    fn exits_before(&self, at: SystemTime) -> u32 {
        let (_, window) = self.restart;
        let recent = self.status().map_or(0, |s| {
            s.events
                .iter()
                .filter(|e| e.kind == "exited")
                .filter_map(|e| crate::time::parse(&e.at))
                .filter(|t| *t < at && at.duration_since(*t).unwrap_or_default() <= window)
                .count()
        });
        u32::try_from(recent).unwrap_or(u32::MAX)
    }

    /// Exits the restart policy still allows before giving up on the VM (unlimited when
    /// they never pile up in its window).
    fn exit_budget(&self) -> u32 {
        let (max, window) = self.restart;
        let recent = self.exits_before(SystemTime::now());
        let left = max.saturating_sub(1).saturating_sub(recent);
        // Each fault waits `settle` after the restart the previous one caused: with a
        // window shorter than that, every exit has left the window before the next.
        if left > 0 && self.cfg.settle > window {
            u32::MAX
        } else {
            left
        }
    }

    /// Asks the daemon to inflict `fault` on the VM once its QEMU has run for the
    /// settle time (a guest still booting may not even see an NMI); returns the answer.
    fn inflict(&self, fault: Fault) -> Result<DrillAnswer> {
        let mut status = self.settled()?;
        let booted = |s: &VmStatus| {
            s.since
                .as_deref()
                .and_then(crate::time::parse)
                .is_some_and(|t| t.elapsed().unwrap_or_default() >= self.cfg.settle)
        };
        if !booted(&status) {
            let ok = poll_until(self.cfg.settle + STEP, || {
                self.status().is_some_and(|s| {
                    let ok = s.phase == VmPhase::Running && booted(&s);
                    if ok {
                        status = s;
                    }
                    ok
                })
            });
            if !ok {
                bail!("{} did not stay running for {:?}", self.vm, self.cfg.settle);
            }
        }
        let host = status.host.clone().context("the VM's host")?;
        let pid = self.daemon()?;
        let desk = DrillDesk::new(&self.state);
        let request = desk.ask(&self.vm, &host, fault)?;
        kill(Pid::from_raw(pid), Signal::SIGHUP).context("waking the daemon")?;
        let mut answer = None;
        if !poll_until(Duration::from_secs(15), || {
            answer = desk.take_answer(&request.id);
            answer.is_some()
        }) {
            desk.withdraw(&request.id);
            bail!("the daemon (pid {pid}) did not answer the drill's request within 15 s (an older plasmavmc?); withdrawn");
        }
        let answer = answer.expect("waited");
        if let Some(why) = &answer.error {
            bail!("the daemon refused: {why}");
        }
        Ok(answer)
    }

    /// Events of the VM after `t0`, oldest first.
    fn events_after(&self, t0: SystemTime) -> Vec<(SystemTime, VmEvent)> {
        self.status().map_or_else(Vec::new, |s| {
            s.events
                .into_iter()
                .filter_map(|e| Some((crate::time::parse(&e.at)?, e)))
                .filter(|(at, _)| *at >= t0)
                .collect()
        })
    }

    /// Waits for an event of the VM after `t0` matching `pred`; `what` names it.
    fn event_after(
        &self,
        what: &str,
        t0: SystemTime,
        timeout: Duration,
        pred: impl Fn(&VmEvent) -> bool,
    ) -> Result<(SystemTime, VmEvent)> {
        let mut found = None;
        if poll_until(timeout, || {
            found = self.events_after(t0).into_iter().find(|(_, e)| pred(e));
            found.is_some()
        }) {
            return Ok(found.expect("waited"));
        }
        let status = self.status().map_or_else(
            || "no status".to_owned(),
            |s| {
                format!(
                    "phase {}{}",
                    s.phase.as_str(),
                    s.message.map(|m| format!(", {m}")).unwrap_or_default()
                )
            },
        );
        bail!(
            "timed out after {timeout:?} waiting for {what} ({} now: {status})",
            self.vm
        )
    }

    /// Hosts whose status says `ready`, by name.
    fn ready_hosts(&self) -> Vec<String> {
        status_dir(&self.state).read().map_or_else(
            |_| Vec::new(),
            |snap| {
                snap.hosts
                    .into_iter()
                    .filter(|h| h.phase == crate::status::HostPhase::Ready)
                    .map(|h| h.name)
                    .collect()
            },
        )
    }

    fn local_copies(&self) -> Vec<u32> {
        local_copies_of(&self.vm, &self.local_roots())
    }

    /// The roots of this cluster's hosts that run on this machine: the `--root` of every
    /// agent the running daemon started here. A QEMU of a VM of the same name in another
    /// cluster (another state directory, another test) is none of this VM's copies.
    pub(super) fn local_roots(&self) -> Vec<PathBuf> {
        let Some(daemon) = self.daemon_now().and_then(|p| u32::try_from(p).ok()) else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| descends_from(*pid, daemon))
            .filter_map(|pid| {
                let argv = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let argv: Vec<String> = argv
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                let at = argv.iter().position(|a| a == "--root")?;
                let root = argv.get(at + 1)?;
                // As /proc shows a QEMU's working directory: links resolved.
                let root = std::fs::canonicalize(root).unwrap_or_else(|_| PathBuf::from(root));
                argv.iter().any(|a| a == "agent").then_some(root)
            })
            .collect()
    }
}

/// Whether `pid` is `ancestor` or one of its descendants (by `/proc/PID/stat`'s ppid).
fn descends_from(mut pid: u32, ancestor: u32) -> bool {
    for _ in 0..64 {
        if pid == ancestor {
            return true;
        }
        let Some(parent) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()
            })
        else {
            return false;
        };
        if parent <= 1 {
            return false;
        }
        pid = parent;
    }
    false
}

/// QEMUs of `vm` running on this machine (instance folders `<root>/vms/<vm>`); with
/// `roots`, only those under one of them (none known: under any root).
fn local_copies_of(vm: &str, roots: &[PathBuf]) -> Vec<u32> {
    crate::qemu::process::qemus_in(Path::new("/"))
        .into_iter()
        .filter(|(_, cwd)| {
            let vms = cwd.parent();
            cwd.file_name().is_some_and(|n| *n == *vm)
                && vms.and_then(Path::file_name).is_some_and(|n| n == "vms")
                && (roots.is_empty()
                    || vms
                        .and_then(Path::parent)
                        .is_some_and(|root| roots.iter().any(|r| r == root)))
        })
        .map(|(pid, _)| pid)
        .collect()
}

fn status_dir(state: &Path) -> StatusDir {
    StatusDir::new(&crate::records::StateDir::at(state).status_dir())
}

fn read_engine(state: &Path) -> Result<EngineStatus> {
    status_dir(state).engine()?.with_context(|| {
        format!(
            "{} has no status/engine.toml: is it the state directory of a running daemon?",
            state.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(runs: usize, only: &[&str]) -> ClusterConfig {
        ClusterConfig {
            repo: PathBuf::from("."),
            path: None,
            state_dir: None,
            vm: "app".into(),
            runs,
            to: None,
            supervised: false,
            settle: Duration::from_secs(1),
            only: only.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn exits_are_shared_so_the_vm_is_never_given_up_on() {
        // max_failures 5, none recent: 4 exits for 2 rows.
        assert_eq!(cluster_plan("QEMU crash (kill -9)", &cfg(5, &[]), 4), Ok(2));
        assert_eq!(cluster_plan("guest panic", &cfg(5, &[]), 4), Ok(2));
        assert_eq!(cluster_plan("guest panic", &cfg(1, &[]), 4), Ok(1));
        // One row chosen: it gets the whole budget.
        assert_eq!(cluster_plan("guest panic", &cfg(5, &["panic"]), 4), Ok(4));
        // Rows that end no QEMU are not limited.
        assert_eq!(
            cluster_plan("live migration round trip", &cfg(5, &[]), 0),
            Ok(5)
        );
        assert!(cluster_plan("QEMU crash (kill -9)", &cfg(5, &[]), 1).is_err());
    }
}
