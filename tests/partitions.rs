//! A partition at every step: the other half of tests/crashpoints.rs. There a process
//! dies at each fail point; here the host an action is about is cut off there — its
//! agent stopped (SIGSTOP) while its QEMUs run on — under `plasmavmc watch` with a
//! heartbeat every 200 ms and `down_after = 1s`. No host has a fence command, so a VM
//! of a host that stops answering must stay `unknown` until the host answers again or an
//! operator confirms it is off (DESIGN.md §4, invariant 1), even `ha` VMs whose disk is
//! on storage every host sees.
//!
//! How a host is cut off at a step (tests/harness/partition/):
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

use anyhow::{ensure, Result};
use plasmavmc_e2e::partition::{
    apply, cluster, first_boot_counted, Copies, End, Flow, Window, HEARTBEAT,
};
use plasmavmc_e2e::proc::qemu_memory_mb;
use plasmavmc_e2e::{cmdline, last_tick, ticks, Daemon, TestRepo, VmSpec};

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
