//! The steps every partition scenario shares: a cluster of hosts without fence commands,
//! a daemon set to cut a host off at a fail point, the window while it is cut off (what
//! the daemon may and may not do meanwhile), the host's return, convergence, and an empty
//! plan afterwards. tests/partitions.rs says what is proven with them.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::Signal;

use super::{partition_host, Strays, SAMPLE};
use crate::daemon::Daemon;
use crate::repo::TestRepo;
use crate::serial::last_tick;
use crate::wait::wait_for;
use crate::{CopyWatch, BOOT_TIMEOUT};

/// Fast host health: a host silent for 1 s is down.
pub const HEARTBEAT: &str = "[heartbeat]\ninterval = \"200ms\"\ndown_after = \"1s\"\n";

/// How long a host stays cut off: three times `down_after`.
pub const WINDOW: Duration = Duration::from_secs(3);

/// Bound for a step to be reached (it may follow a boot) and for a VM to converge.
const REACH: Duration = BOOT_TIMEOUT;

/// `hosts` simulated hosts hv1 (1024 MB), hv2 (768 MB), hv3 (512 MB) — unplaced VMs
/// land on hv1 — none with a fence command, all in one storage pool when `shared`;
/// committed with the fast heartbeat, no VM yet.
pub fn cluster(hosts: usize, shared: bool) -> Result<TestRepo> {
    let repo = TestRepo::new()?;
    repo.set_cluster_settings(HEARTBEAT)?;
    for (name, mb) in [("hv1", 1024), ("hv2", 768), ("hv3", 512)]
        .into_iter()
        .take(hosts)
    {
        partition_host(&repo, name, mb, shared)?;
    }
    repo.commit("hosts without fence commands")?;
    Ok(repo)
}

/// `apply --auto-approve` without faults, to set a flow up.
pub fn apply(repo: &TestRepo) -> Result<()> {
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    repo.wait_agents_exit("apply")
}

/// Waits until `vm`'s guest on `host` counted its first boot on its disk (a move or a
/// restart before that would rightly find the disk empty).
pub fn first_boot_counted(repo: &TestRepo, host: &str, vm: &str) -> Result<()> {
    wait_for(
        format!("{vm} to count its first boot on its disk on {host}"),
        BOOT_TIMEOUT,
        || repo.serial_on(host, vm).contains("disk: boots=1"),
    )
    .with_context(|| repo.serial_on(host, vm))
}

/// Whether `vm`'s guest on `host` prints a new tick within a second (a few ticks).
fn guest_runs(repo: &TestRepo, host: &str, vm: &str) -> bool {
    let seen = last_tick(&repo.serial_on(host, vm));
    wait_for("a tick", Duration::from_secs(1), || {
        last_tick(&repo.serial_on(host, vm)) > seen
    })
    .is_ok()
}

/// Whether a VM may have two QEMUs at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copies {
    /// Never.
    One,
    /// Source and target of a live move: only one guest may run.
    Live,
}

/// Where a VM must end once its host is back.
#[derive(Debug, Clone, Copy)]
pub enum End<'a> {
    /// Running on this host alone, its guest ticking.
    Runs(&'a str),
    /// Running alone on any host but this one (recovered once it was confirmed off).
    Elsewhere(&'a str),
    /// Stopped, its instance on this host alone.
    Stopped(&'a str),
    /// No instance, no QEMU anywhere.
    Gone,
}

/// A host cut off at a step: its frozen agent and where the daemon's log was then.
#[derive(Debug)]
pub struct Window {
    pub agent: i32,
    pub since: usize,
}

/// One VM through partitions: the copies of it seen meanwhile.
#[derive(Debug)]
pub struct Flow<'r> {
    repo: &'r TestRepo,
    vm: String,
    copies: CopyWatch<'r>,
    kind: Copies,
    /// The VM has a disk it booted from before: its guest must never come up on an
    /// empty one (`disk: fresh` on its console).
    pub kept_disk: bool,
}

impl<'r> Flow<'r> {
    pub fn new(repo: &'r TestRepo, vm: &str, kind: Copies) -> Self {
        Self {
            repo,
            vm: vm.to_owned(),
            copies: CopyWatch::new(repo, vm),
            kind,
            kept_disk: false,
        }
    }

    /// See [`Flow::kept_disk`].
    pub fn keeping_disk(mut self) -> Self {
        self.kept_disk = true;
        self
    }

    /// The daemon, set to cut `host` off at `point` (engine points hold the daemon
    /// there; agent points freeze `host`'s agent).
    pub fn daemon(&self, point: &str, host: &str) -> Result<Daemon<'r>> {
        if point.starts_with("engine.") {
            self.repo.watch_failing(Some(point))
        } else {
            self.repo.arm_agent(host, point)?;
            self.repo.watch_failing(None)
        }
    }

    /// Runs `f`; on failure prints the daemon's whole log (shown with the failure).
    pub fn logged<T>(
        &mut self,
        daemon: &Daemon<'_>,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        let result = f(self);
        if result.is_err() {
            println!("=== the daemon's log\n{}", daemon.stderr());
        }
        result
    }

    /// Commit already made: cuts `host` off at `point`, checks the window, brings the
    /// host back, checks that `vm` ends as `end`, stops the daemon, checks the plan.
    pub fn partition_at(
        mut self,
        point: &str,
        host: &str,
        allowed: &[&str],
        end: End<'_>,
    ) -> Result<()> {
        let started = Instant::now();
        let daemon = self.daemon(point, host)?;
        self.logged(&daemon, |flow| {
            let window = flow.cut(&daemon, point, host, allowed)?;
            flow.repo.resume(window.agent)?;
            flow.converge(&daemon, end, Some(host))?;
            Ok(())
        })
        .with_context(|| format!("{host} cut off at {point}"))?;
        self.settle(daemon)?;
        println!(
            "{point}: converged and settled {:.1?} after the daemon started",
            started.elapsed()
        );
        Ok(())
    }

    fn sample(copies: &mut CopyWatch<'_>, strays: &mut Strays<'_>) {
        copies.sample();
        strays.sample();
    }

    /// Waits for the step at `point`, cuts `host` off there and keeps it cut off for
    /// [`WINDOW`], sampling; then checks that `host` is down, that the VM is unknown (or
    /// runs on another host of the step) and was nowhere but on `allowed` hosts.
    pub fn cut(
        &mut self,
        daemon: &Daemon<'_>,
        point: &str,
        host: &str,
        allowed: &[&str],
    ) -> Result<Window> {
        let repo = self.repo;
        let copies = &mut self.copies;
        let mut strays = Strays::new(repo, &self.vm, allowed);
        let agent = if point.starts_with("engine.") {
            repo.wait_paused(daemon, point, REACH, || Self::sample(copies, &mut strays))?;
            let agent = repo.partition(host)?;
            repo.release(point)?;
            agent
        } else {
            let agent =
                repo.wait_self_frozen(daemon, host, REACH, || Self::sample(copies, &mut strays))?;
            repo.disarm_agent(host)?;
            agent
        };
        let since = daemon.lines().len();
        // A QEMU of the VM on the cut-off host may run its guest as far as anyone can
        // tell from outside: a guest booted anywhere meanwhile would make two.
        let held: Vec<i32> = repo
            .host_qemus(host)
            .into_iter()
            .filter(|pid| repo.qemus_of(&self.vm).contains(pid))
            .collect();
        let frozen = Instant::now();
        let mut phases: Vec<String> = Vec::new();
        daemon.poll_every(SAMPLE, "the partition window to end", WINDOW * 2, || {
            Self::sample(copies, &mut strays);
            if let Ok(Some(v)) = repo.vm_view(&self.vm) {
                let seen = format!("{} on {}", v.phase, v.host);
                if phases.last() != Some(&seen) {
                    phases.push(seen);
                }
            }
            (frozen.elapsed() >= WINDOW).then_some(())
        })?;
        let trail = format!(
            "{} while {host} was cut off at {point}: {}",
            self.vm,
            phases.join(" → ")
        );
        println!("{trail}");
        let mut problems = Vec::new();
        if let Err(e) = strays.ensure_none() {
            problems.push(format!("{e:#}"));
        }
        for line in daemon.lines_since(since) {
            if line.is("started", Some(&self.vm)) {
                let pid = line.pid()?;
                let on = strays.host_of(pid);
                if !on.is_some_and(|h| allowed.contains(&h)) {
                    problems.push(format!(
                        "the daemon started it as pid {pid} on {on:?}: {line}"
                    ));
                } else if !held.is_empty() {
                    problems.push(format!(
                        "the daemon started it afresh as pid {pid} on {on:?} while its QEMU \
                         {held:?} lived on the cut-off {host}: {line}"
                    ));
                }
            }
        }
        if let Err(e) = self.check_copies() {
            problems.push(format!("{e:#}"));
        }
        let phase = repo.host_phase(host);
        if phase != "down" {
            problems.push(format!("{host} is {phase:?}, not down"));
        }
        if let Some(v) = repo.vm_view(&self.vm)? {
            let pid = repo.qemu_on(&v.host, &self.vm).ok();
            if !allowed.contains(&v.host.as_str()) {
                problems.push(format!(
                    "its status places it on {}, outside {allowed:?}",
                    v.host
                ));
            } else if v.host == host && v.phase != "unknown" {
                problems.push(format!(
                    "its status says {} on {host}, not unknown",
                    v.phase
                ));
            } else if v.phase == "running" && (pid.is_none() || pid != v.pid) {
                problems.push(format!(
                    "its status says it runs on {} as {:?}, but its QEMU there is {pid:?}",
                    v.host, v.pid
                ));
            } else if v.phase == "running" && !guest_runs(repo, &v.host, &self.vm) {
                problems.push(format!(
                    "its status says it runs on {}, but its guest there does not tick",
                    v.host
                ));
            }
            if !problems.is_empty() {
                problems.push(format!("its status:\n{v}"));
            }
        }
        if !problems.is_empty() {
            bail!("{trail}, after {WINDOW:?}:\n- {}", problems.join("\n- "));
        }
        Ok(Window { agent, since })
    }

    /// Waits until the VM ends as `end` (and `rejoined`, when given, is ready again);
    /// returns the host it runs on (empty if it does not run).
    pub fn converge(
        &mut self,
        daemon: &Daemon<'_>,
        end: End<'_>,
        rejoined: Option<&str>,
    ) -> Result<String> {
        let repo = self.repo;
        let vm = self.vm.clone();
        let copies = &mut self.copies;
        // What the status files said meanwhile, from when this began (printed).
        let begun = Instant::now();
        let mut trail: Vec<String> = Vec::new();
        let host = daemon
            .poll_every(
                SAMPLE,
                format!("{vm} to end {end:?}, {rejoined:?} ready"),
                REACH,
                || {
                    copies.sample();
                    let now = format!(
                        "{} on {}{}",
                        repo.vm_phase(&vm).ok().flatten().unwrap_or_default(),
                        repo.vm_view(&vm)
                            .ok()
                            .flatten()
                            .map(|v| v.host)
                            .unwrap_or_default(),
                        rejoined
                            .map(|h| format!(" ({h} {})", repo.host_phase(h)))
                            .unwrap_or_default(),
                    );
                    if trail.last().is_none_or(|l| !l.ends_with(&now)) {
                        trail.push(format!("{:.1?} {now}", begun.elapsed()));
                    }
                    if rejoined.is_some_and(|h| repo.host_phase(h) != "ready") {
                        return None;
                    }
                    match end {
                        // Up to date too: the QEMU that ran before a change it awaits
                        // (a restart retried once the host is back) is not the end.
                        End::Runs(h) => (repo.only_on(h, &vm).is_ok()
                            && repo.vm_view(&vm).ok()??.up_to_date())
                        .then(|| h.to_owned()),
                        End::Elsewhere(lost) => {
                            // The lost host keeps its dead copy's folder until it returns.
                            let v = repo.vm_view(&vm).ok()??;
                            let pid = repo.qemu_on(&v.host, &vm).ok()?;
                            (v.host != lost
                                && v.phase == "running"
                                && v.pid == Some(pid)
                                && repo.qemus_of(&vm) == [pid])
                            .then_some(v.host)
                        }
                        End::Stopped(h) => {
                            let v = repo.vm_view(&vm).ok()??;
                            (repo.qemus_of(&vm).is_empty()
                                && repo.hosts_with_instance(&vm) == [h]
                                && v.phase == "stopped"
                                && v.host == h
                                && v.up_to_date())
                            .then(String::new)
                        }
                        End::Gone => (repo.qemus_of(&vm).is_empty()
                            && repo.hosts_with_instance(&vm).is_empty())
                        .then(String::new),
                    }
                },
            )
            .with_context(|| format!("{}\n{}", trail.join(" → "), repo.describe_vm(&vm)))?;
        println!("{vm} converging to {end:?}: {}", trail.join(" → "));
        if !host.is_empty() {
            let seen = last_tick(&repo.serial_on(&host, &vm)).unwrap_or(0);
            repo.ticking_on(&host, &vm, seen)?;
            let serial = repo.serial_on(&host, &vm);
            ensure!(
                !(self.kept_disk && serial.contains("disk: fresh")),
                "{vm} came up on {host} with an empty disk (its own is elsewhere):\n{serial}"
            );
        }
        self.check_copies()?;
        Ok(host)
    }

    /// Stops the daemon (SIGTERM: the VMs keep running) and checks that a plan
    /// afterwards is empty.
    pub fn settle(mut self, mut daemon: Daemon<'_>) -> Result<()> {
        daemon.signal(Signal::SIGTERM)?;
        let status = daemon.wait_exit(Duration::from_secs(30))?;
        ensure!(
            status.success(),
            "the daemon exited with {status}\n{}",
            daemon.describe()
        );
        self.repo.wait_agents_exit("the daemon")?;
        let plan = self.repo.plan_json(&[])?;
        self.repo.wait_agents_exit("plan")?;
        if !plan["actions"].as_array().is_some_and(Vec::is_empty) {
            println!("=== the daemon's log\n{}", daemon.stderr());
            bail!("the daemon converged, yet there is something to do:\n{plan:#}");
        }
        self.copies.sample();
        self.check_copies()
    }

    /// No two QEMUs of the VM at once (no two running guests for live moves) so far.
    pub fn check_copies(&mut self) -> Result<()> {
        match self.kind {
            Copies::One => self.copies.ensure_never_two(),
            Copies::Live => {
                ensure!(
                    self.copies.most().len() <= 2,
                    "more than a source and a target: {}",
                    self.copies.summary()
                );
                self.copies.ensure_never_two_running()
            }
        }
    }
}
