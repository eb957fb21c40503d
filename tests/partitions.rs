//! A partition at every step: the other half of tests/crashpoints.rs. There a process
//! dies at each fail point; here the host an action is about is cut off there — its
//! agent stopped (SIGSTOP) while its QEMUs run on — under `plasmavmc watch` with a
//! heartbeat every 200 ms and `down_after = 1s`. No host has a fence command, so a VM
//! of a host that stops answering must stay `unknown` until the host answers again or an
//! operator confirms it is off (DESIGN.md §4, invariant 1), even `ha` VMs whose disk is
//! on storage every host sees.
//!
//! How a host is cut off at a step (tests/harness/partition.rs):
//! - engine points (`engine.*`): the daemon runs with `<point>=1*return(pause)`, waits
//!   there, the test stops the agent the action is about, then lets the daemon go on:
//!   its very next call goes to a frozen agent;
//! - agent points (`agent.*`): that host's agent is started with
//!   `<point>=1*return(freeze)` and stops itself in the middle of the command.
//!
//! Then, for three times `down_after`, every 20 ms: where the VM has an instance folder
//! or a QEMU (never on a host outside the step's, see `Strays`), how many QEMUs it has
//! (never two; for live moves never two guests running) and which QEMUs the daemon says
//! it started. At the end of that window the cut-off host must be `down` and the VM
//! `unknown` if the status places it there (or running on the other host of a move).
//! Then the host comes back (SIGCONT), or is powered off and confirmed with
//! `plasmavmc fence confirm`, and the VM must converge: running exactly once where its
//! status says (its guest ticking), or stopped, or gone, as the commit says; the daemon
//! is stopped and a `plasmavmc plan` afterwards is empty.
//!
//! The first tests are the bug this file was written for: an `ha` VM on shared storage
//! moved live to hv3, then unpinned (an `update` on hv3), hv3 cut off at that update;
//! the VM must never start on hv1 or hv2. The flows after them cover every fail point
//! (`every_fail_point_is_partitioned_at`), each flow on its own repository, each step
//! one commit away from where the previous one converged, with VMs of every disk kind.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::Signal;
use plasmavmc_e2e::partition::{partition_host, Strays, SAMPLE};
use plasmavmc_e2e::proc::qemu_memory_mb;
use plasmavmc_e2e::{
    cmdline, last_tick, ticks, wait_for, CopyWatch, Daemon, TestRepo, VmSpec, BOOT_TIMEOUT,
};

/// Fast host health: a host silent for 1 s is down.
const HEARTBEAT: &str = "[heartbeat]\ninterval = \"200ms\"\ndown_after = \"1s\"\n";

/// How long a host stays cut off: three times `down_after`.
const WINDOW: Duration = Duration::from_secs(3);

/// Bound for a step to be reached (it may follow a boot) and for a VM to converge.
const REACH: Duration = BOOT_TIMEOUT;

/// Memory of every test VM: the least the test guest boots with.
const VM_MB: u64 = 96;

/// The bug: an update of a VM just moved live to hv3.
const BUG: &str = "engine.update.before";

/// Starting and stopping `app` (no disk) on hv1.
const START_STOP: &[&str] = &[
    "engine.start.before",
    "engine.stop.before",
    "agent.start.recorded",
    "agent.stop.recorded",
    "agent.start.spawned",
    "engine.stop.after",
    "engine.start.after",
];

/// Creating, updating and deleting running VMs `s1`..`s3` (a local disk each) on hv1.
const CREATE_UPDATE_DELETE: &[(&str, &str)] = &[
    ("engine.create.before", "s1"),
    ("agent.create.disks", "s2"),
    ("engine.create.after", "s3"),
    ("engine.update.before", "s1"),
    ("engine.update.after", "s2"),
    ("engine.delete.before", "s1"),
    ("agent.delete.retained", "s2"),
    ("engine.delete.after", "s3"),
];

/// Restarting `big` (a shared disk) on hv1 for a memory change.
const RESTART: &[&str] = &[
    "engine.restart.before",
    "engine.restart.stopped",
    "engine.restart.updated",
    "engine.restart.after",
];

/// Recovering `ha1` (a shared disk) of a host confirmed off: the host it is recovered on
/// is cut off.
const RECOVER: &[&str] = &["engine.recover.before", "engine.recover.after"];

/// Which host of a move is cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Target,
}

/// Moving `web` live back and forth between hv1 and hv2, its disk on shared storage;
/// the last move at 32 MiB/s, so that the daemon reports its progress.
const LIVE_SHARED: &[(&str, Side)] = &[
    ("engine.migrate.before", Side::Source),
    ("agent.incoming.spawned", Side::Target),
    ("engine.migrate.live.prepared", Side::Source),
    ("agent.migrate-out.completed", Side::Source),
    ("engine.migrate.live.completed", Side::Target),
    ("agent.resume.continued", Side::Target),
    ("engine.migrate.live.resumed", Side::Source),
    ("engine.migrate.live.discarding", Side::Source),
    ("agent.discard.stopped", Side::Source),
    ("engine.migrate.after", Side::Target),
    ("engine.migrate.live.progress", Side::Source),
];

/// Moving `db` live, its local disk mirrored over NBD.
const LIVE_LOCAL: &[(&str, Side)] = &[
    ("agent.migrate-out.mirroring", Side::Source),
    ("agent.migrate-out.switchover", Side::Source),
];

/// Moving `cold1` (a local disk) cold back and forth.
const COLD: &[(&str, Side)] = &[
    ("engine.migrate.cold.stopped", Side::Target),
    ("engine.migrate.cold.created", Side::Source),
    ("agent.disk.partial", Side::Target),
    ("engine.migrate.cold.copied", Side::Target),
    ("engine.migrate.cold.started", Side::Target),
];

/// Points no flow cuts a host off at, each with why. (None so far.)
const EXEMPT: &[(&str, &str)] = &[];

#[test]
fn every_fail_point_is_partitioned_at() {
    let sided = |flow: &[(&'static str, Side)]| flow.iter().map(|(p, _)| *p).collect::<Vec<_>>();
    let mut covered: Vec<&str> = [START_STOP, RESTART, RECOVER, &[BUG]]
        .concat()
        .into_iter()
        .chain(CREATE_UPDATE_DELETE.iter().map(|(p, _)| *p))
        .chain(sided(LIVE_SHARED))
        .chain(sided(LIVE_LOCAL))
        .chain(sided(COLD))
        .chain(EXEMPT.iter().map(|(p, _)| *p))
        .collect();
    covered.sort_unstable();
    covered.dedup();
    let mut all: Vec<&str> = plasmavmc::failpoint::POINTS
        .iter()
        .map(|p| p.name)
        .collect();
    all.sort_unstable();
    assert_eq!(
        covered, all,
        "the flows must cut a host off at every fail point"
    );
}

// ---- the bug ----------------------------------------------------------------------

/// `app` (ha, a shared disk, restart always) moved live from hv1 to hv3 (which has no
/// fence command), then unpinned: the daemon's update of it on hv3 finds hv3 cut off.
/// Returns the daemon with hv3's agent frozen and the window checked.
fn update_after_a_move_with_hv3_cut_off<'r>(
    repo: &'r TestRepo,
    flow: &mut Flow<'r>,
) -> Result<(Daemon<'r>, Window)> {
    let spec = VmSpec::new()
        .memory(VM_MB)
        .shared_disks()
        .ha(true)
        .restart("always");
    repo.write_vm("app", &spec.clone().pin("hv1"))?;
    repo.commit("app on hv1")?;
    let daemon = flow.daemon(BUG, "hv3")?;
    flow.converge(&daemon, End::Runs("hv1"), None)?;
    // From now on app boots from the disk it wrote its first boot on.
    flow.kept_disk = true;
    let seen = last_tick(&repo.serial_on("hv1", "app")).unwrap_or(0);
    repo.write_vm("app", &spec.clone().pin("hv3"))?;
    repo.commit("move app to hv3")?;
    flow.converge(&daemon, End::Runs("hv3"), None)?;
    let first = ticks(&repo.serial_on("hv3", "app")).first().copied();
    ensure!(
        first > Some(seen),
        "app did not move live to hv3 (its console there starts at {first:?}, hv1 was at {seen})"
    );
    repo.write_vm("app", &spec)?;
    repo.commit("unpin app: an update on hv3")?;
    let window = flow.logged(&daemon, |flow| flow.cut(&daemon, BUG, "hv3", &["hv3"]))?;
    // Nothing of app was created or started anywhere while hv3 was cut off.
    let acted: Vec<String> = daemon
        .lines_since(window.since)
        .iter()
        .filter(|l| l.str("vm") == Some("app"))
        .filter(|l| {
            l.is("started", None)
                || (l.is("done", None)
                    && matches!(
                        l.str("op"),
                        Some("create" | "recover" | "start" | "restart")
                    ))
        })
        .map(ToString::to_string)
        .collect();
    ensure!(
        acted.is_empty(),
        "the daemon created or started app while hv3 was cut off:\n{}",
        acted.join("\n")
    );
    Ok((daemon, window))
}

#[test]
fn frozen_host_during_update_after_a_move_keeps_the_vm_unknown_until_it_answers() -> Result<()> {
    let repo = cluster(3, true)?;
    let mut flow = Flow::new(&repo, "app", Copies::Live);
    let (daemon, window) = update_after_a_move_with_hv3_cut_off(&repo, &mut flow)?;
    flow.logged(&daemon, |flow| {
        repo.resume(window.agent)?;
        flow.converge(&daemon, End::Runs("hv3"), Some("hv3"))
    })?;
    flow.settle(daemon)
}

#[test]
fn frozen_host_during_update_after_a_move_is_recovered_elsewhere_once_confirmed_off() -> Result<()>
{
    let repo = cluster(3, true)?;
    let mut flow = Flow::new(&repo, "app", Copies::Live);
    let (daemon, _window) = update_after_a_move_with_hv3_cut_off(&repo, &mut flow)?;
    flow.logged(&daemon, |flow| {
        repo.power_off("hv3")?;
        repo.fence_confirm("hv3")?.expect_code(0)?;
        let host = flow.converge(&daemon, End::Elsewhere("hv3"), None)?;
        // hv3 comes back: its stale instance of app goes, app stays where it is.
        repo.power_on("hv3")?;
        flow.converge(&daemon, End::Runs(&host), Some("hv3"))?;
        Ok(())
    })?;
    flow.settle(daemon)
}

// ---- the flows ----------------------------------------------------------------------

#[test]
fn partitions_while_starting_and_stopping() -> Result<()> {
    let repo = cluster(2, false)?;
    let spec = VmSpec::new().no_disks().memory(VM_MB).ha(true);
    repo.write_vm("app", &spec.clone().power("stopped"))?;
    repo.commit("app, stopped")?;
    apply(&repo)?;
    for (i, point) in START_STOP.iter().enumerate() {
        let (power, end) = if i % 2 == 0 {
            ("running", End::Runs("hv1"))
        } else {
            ("stopped", End::Stopped("hv1"))
        };
        repo.write_vm("app", &spec.clone().power(power))?;
        repo.commit(&format!("app {power}"))?;
        Flow::new(&repo, "app", Copies::One).partition_at(point, "hv1", &["hv1"], end)?;
    }
    Ok(())
}

#[test]
fn partitions_while_creating_updating_and_deleting() -> Result<()> {
    let repo = cluster(2, false)?;
    let spec = VmSpec::new().memory(VM_MB).ha(true);
    let mut priority = 0;
    for &(point, vm) in CREATE_UPDATE_DELETE {
        let end = if point.contains(".create.") {
            repo.write_vm(vm, &spec)?;
            repo.commit(&format!("add {vm}"))?;
            End::Runs("hv1")
        } else if point.contains(".update.") {
            priority += 1;
            repo.write_vm(vm, &spec.clone().priority(priority))?;
            repo.commit(&format!("{vm} priority {priority}"))?;
            End::Runs("hv1")
        } else {
            repo.remove(&format!("vms/{vm}.toml"))?;
            repo.commit(&format!("remove {vm}"))?;
            End::Gone
        };
        Flow::new(&repo, vm, Copies::One).partition_at(point, "hv1", &["hv1"], end)?;
    }
    Ok(())
}

#[test]
fn partitions_while_restarting() -> Result<()> {
    let repo = cluster(2, true)?;
    let spec = VmSpec::new().memory(VM_MB).shared_disks().ha(true);
    repo.write_vm("big", &spec)?;
    repo.commit("add big")?;
    apply(&repo)?;
    first_boot_counted(&repo, "hv1", "big")?;
    for (i, point) in RESTART.iter().enumerate() {
        let mb = VM_MB + 16 * (i as u64 % 2 + 1);
        repo.write_vm("big", &spec.clone().memory(mb))?;
        repo.commit(&format!("big with {mb} MiB"))?;
        Flow::new(&repo, "big", Copies::One)
            .keeping_disk()
            .partition_at(point, "hv1", &["hv1"], End::Runs("hv1"))?;
        let pid = repo.only_on("hv1", "big")?;
        let has = qemu_memory_mb(&cmdline(pid)?);
        ensure!(
            has == Some(mb),
            "after {point}, big runs with {has:?} MiB, not {mb}"
        );
    }
    Ok(())
}

#[test]
fn partitions_while_recovering_a_vm_of_a_host_confirmed_off() -> Result<()> {
    // hv1 (1024 MB) > hv2 (768 MB) > hv3 (512 MB): ha1 starts on hv1, is recovered on
    // hv2, then (hv2 lost in turn) on hv1 again; hv3 must never get it.
    let repo = cluster(3, true)?;
    repo.write_vm("ha1", &VmSpec::new().memory(VM_MB).shared_disks().ha(true))?;
    repo.commit("add ha1")?;
    apply(&repo)?;
    first_boot_counted(&repo, "hv1", "ha1")?;
    let mut lost = "hv1";
    for point in RECOVER {
        let to = if lost == "hv1" { "hv2" } else { "hv1" };
        repo.power_off(lost)?;
        repo.fence_confirm(lost)?.expect_code(0)?;
        let mut flow = Flow::new(&repo, "ha1", Copies::One).keeping_disk();
        let daemon = flow.daemon(point, to)?;
        flow.logged(&daemon, |flow| {
            let window = flow.cut(&daemon, point, to, &[lost, to])?;
            repo.resume(window.agent)?;
            // The recovery goes on on `to`; the lost host still holds the folder of
            // its dead copy, until it returns.
            let on = flow.converge(&daemon, End::Elsewhere(lost), Some(to))?;
            ensure!(on == to, "ha1 was recovered on {on}, not on {to}");
            repo.power_on(lost)?;
            flow.converge(&daemon, End::Runs(to), Some(lost))?;
            Ok(())
        })?;
        flow.settle(daemon)?;
        lost = to;
    }
    Ok(())
}

#[test]
fn partitions_while_moving_live_with_a_shared_disk() -> Result<()> {
    let repo = cluster(3, true)?;
    moves(
        &repo,
        "web",
        VmSpec::new().shared_disks(),
        LIVE_SHARED,
        |point| {
            (point == "engine.migrate.live.progress")
                .then_some("[migration]\nmax_bandwidth_mib = 32\n")
        },
    )
}

#[test]
fn partitions_while_moving_live_with_a_mirrored_local_disk() -> Result<()> {
    let repo = cluster(3, false)?;
    moves(&repo, "db", VmSpec::new(), LIVE_LOCAL, |_| None)
}

#[test]
fn partitions_while_moving_cold() -> Result<()> {
    let repo = cluster(3, false)?;
    moves(
        &repo,
        "cold1",
        VmSpec::new().migration("cold"),
        COLD,
        |_| None,
    )
}

/// Moves `vm` (`spec`, ha) between hv1 and hv2 by pin commits, cutting the source or the
/// target off at each of `points`; hv3 must never get it. `settings` gives extra
/// cluster settings for a point's move.
fn moves(
    repo: &TestRepo,
    vm: &str,
    spec: VmSpec,
    points: &[(&str, Side)],
    settings: impl Fn(&str) -> Option<&'static str>,
) -> Result<()> {
    let spec = spec.memory(VM_MB).ha(true);
    repo.write_vm(vm, &spec.clone().pin("hv1"))?;
    repo.commit(&format!("{vm} on hv1"))?;
    apply(repo)?;
    first_boot_counted(repo, "hv1", vm)?;
    let copies = if spec.migration.as_deref() == Some("cold") {
        Copies::One
    } else {
        Copies::Live
    };
    let mut from = "hv1";
    for &(point, side) in points {
        let to = if from == "hv1" { "hv2" } else { "hv1" };
        if let Some(extra) = settings(point) {
            repo.set_cluster_settings(&format!("{HEARTBEAT}{extra}"))?;
        }
        repo.write_vm(vm, &spec.clone().pin(to))?;
        repo.commit(&format!("move {vm} to {to}"))?;
        let cut = if side == Side::Source { from } else { to };
        Flow::new(repo, vm, copies).keeping_disk().partition_at(
            point,
            cut,
            &[from, to],
            End::Runs(to),
        )?;
        from = to;
    }
    Ok(())
}

// ---- the machinery --------------------------------------------------------------------

/// `hosts` simulated hosts hv1 (1024 MB), hv2 (768 MB), hv3 (512 MB) — unplaced VMs
/// land on hv1 — none with a fence command, all in one storage pool when `shared`;
/// committed with the fast heartbeat, no VM yet.
fn cluster(hosts: usize, shared: bool) -> Result<TestRepo> {
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
fn apply(repo: &TestRepo) -> Result<()> {
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    repo.wait_agents_exit("apply")
}

/// Waits until `vm`'s guest on `host` counted its first boot on its disk (a move or a
/// restart before that would rightly find the disk empty).
fn first_boot_counted(repo: &TestRepo, host: &str, vm: &str) -> Result<()> {
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
enum Copies {
    /// Never.
    One,
    /// Source and target of a live move: only one guest may run.
    Live,
}

/// Where a VM must end once its host is back.
#[derive(Debug, Clone, Copy)]
enum End<'a> {
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
struct Window {
    agent: i32,
    since: usize,
}

/// One VM through partitions: the copies of it seen meanwhile.
struct Flow<'r> {
    repo: &'r TestRepo,
    vm: String,
    copies: CopyWatch<'r>,
    kind: Copies,
    /// The VM has a disk it booted from before: its guest must never come up on an
    /// empty one (`disk: fresh` on its console).
    kept_disk: bool,
}

impl<'r> Flow<'r> {
    fn new(repo: &'r TestRepo, vm: &str, kind: Copies) -> Self {
        Self {
            repo,
            vm: vm.to_owned(),
            copies: CopyWatch::new(repo, vm),
            kind,
            kept_disk: false,
        }
    }

    /// See [`Flow::kept_disk`].
    fn keeping_disk(mut self) -> Self {
        self.kept_disk = true;
        self
    }

    /// The daemon, set to cut `host` off at `point` (engine points hold the daemon
    /// there; agent points freeze `host`'s agent).
    fn daemon(&self, point: &str, host: &str) -> Result<Daemon<'r>> {
        if point.starts_with("engine.") {
            self.repo.watch_failing(Some(point))
        } else {
            self.repo.arm_agent(host, point)?;
            self.repo.watch_failing(None)
        }
    }

    /// Runs `f`; on failure prints the daemon's whole log (shown with the failure).
    fn logged<T>(
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
    fn partition_at(
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
    fn cut(
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
    fn converge(
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
                        End::Runs(h) => repo.only_on(h, &vm).ok().map(|_| h.to_owned()),
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
                                && v.host == h)
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
    fn settle(mut self, mut daemon: Daemon<'_>) -> Result<()> {
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
    fn check_copies(&mut self) -> Result<()> {
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
