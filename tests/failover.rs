//! Host loss, end to end: `plasmavmc watch` against two simulated hosts (each
//! `hosts/<name>.toml` runs the binary's own agent on a root of its own), real QEMU
//! (TCG) and the tiny test guest. Heartbeat every 200 ms: a host that missed two beats
//! (400 ms of silence) is suspect, after 1 s of silence it is down (`plasmavmc.toml`).
//!
//! What this file proves, one test each:
//! - a host that loses power (agent and QEMUs killed, agent cannot start again) is
//!   fenced by its fence command; its `ha` VM is started afresh on the other host, never
//!   two copies at once; its `ha = false` VM is started nowhere and stays unknown;
//! - the status of that `ha = false` VM says why it is not recovered;
//! - when a fenced host's `ha` VMs do not all fit elsewhere, the one of higher
//!   `priority` is recovered (not the first by name) and the other says what is missing;
//! - a host frozen for less than `down_after` (agent stopped, then resumed; 4 s here)
//!   is `suspect` with its VM `unknown`, then `ready` and `running` again on the same
//!   agent connection and the same QEMU: nothing fenced, nothing started elsewhere;
//! - a partitioned host (agent stopped, its QEMU still running) without a fence command
//!   is suspect, then down, its VM unknown from the first: nothing starts elsewhere
//!   until an operator powers the host off and runs `plasmavmc fence confirm`; when the
//!   host is powered on again its stale instance is removed and the fence record cleared;
//! - a fence command that lies (exit 0, host still running) leads to two copies; when
//!   the host comes back with its stale QEMU still running, that copy is stopped and
//!   deleted and one copy remains, whether the host's agent was restarted or the
//!   partitioned agent resumed.
//!
//! Host faults are simulated by the harness (`tests/harness/fault.rs`): power-off =
//! marker file + kill -9 of the agent and of the QEMUs under the host's root;
//! partition = SIGSTOP of the agent. Every test has its own repository, state dir and
//! host roots in a temp folder; the cleanup resumes stopped agents and kills every
//! process under it, even on failure.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Context, Result};
use plasmavmc_e2e::fault::{failover_repo, failover_repo_with, Fence};
use plasmavmc_e2e::{
    is_alive, ticks, CopyWatch, Daemon, LogLine, PhaseTrail, TestRepo, VmSpec, BOOT_TIMEOUT,
};

/// Fast host health for tests.
const HEARTBEAT: &str = "[heartbeat]\ninterval = \"200ms\"\ndown_after = \"1s\"\n";

/// Bound for a lost host to be declared down (1 s of silence): 10×.
const DETECT: Duration = Duration::from_secs(10);

/// Heartbeat settings with room for a brief freeze: suspect after 400 ms of silence,
/// down only after [`ROOMY_DOWN_AFTER`], so a loaded machine cannot turn the freeze
/// into a host loss before the test has seen `suspect` and resumed the host.
const ROOMY: &str = "[heartbeat]\ninterval = \"200ms\"\ndown_after = \"4s\"\n";
const ROOMY_DOWN_AFTER: Duration = Duration::from_secs(4);

/// Bound for host loss → VM started on the other host, and for a returning host's
/// stale copy to be removed: 10× the ~1.5 s they should take (2.2–3.2 s measured for
/// the first while the health check runs every second whatever the heartbeat: see
/// `benches/failover.rs`).
const RECOVER: Duration = Duration::from_secs(15);

/// Bound for one SIGHUP-triggered reconcile to start.
const RESYNC: Duration = Duration::from_secs(30);

// ---- helpers --------------------------------------------------------------------

/// A "started" line for `vm` whose pid is not `old`.
fn started_anew(vm: &str, old: i32) -> impl Fn(&LogLine) -> bool + '_ {
    move |l| l.is("started", Some(vm)) && l.int("pid").is_some_and(|p| p != i64::from(old))
}

/// Fails unless `vm` booted afresh on `host`: its console there starts at `tick 1`.
fn booted_afresh(repo: &TestRepo, host: &str, vm: &str) -> Result<()> {
    let serial = repo.serial_on(host, vm);
    let seen = ticks(&serial);
    ensure!(
        seen.first() == Some(&1),
        "{vm} on {host} did not boot afresh: ticks {seen:?}\n{serial}"
    );
    Ok(())
}

/// Samples the status every 10 ms until hv1 and ha1 are in `phases` (host, VM); at each
/// poll, samples ha1's `copies` and collects the QEMUs seen on hv2 in `on_hv2`.
fn wait_phases(
    trail: &mut PhaseTrail<'_>,
    daemon: &Daemon<'_>,
    copies: &mut CopyWatch<'_>,
    on_hv2: &mut Vec<i32>,
    (host, vm): (&str, &str),
    timeout: Duration,
) -> Result<()> {
    trail
        .wait_until(&format!("hv1 {host} and ha1 {vm}"), timeout, |t| {
            copies.sample();
            on_hv2.extend(daemon.repo().host_qemus("hv2"));
            t.host_now() == host && t.vm_now() == vm
        })
        .with_context(|| daemon.describe())
}

// ---- tests ----------------------------------------------------------------------

#[test]
fn host_power_off_with_fence_command_recovers_ha_vms() -> Result<()> {
    let repo = failover_repo(
        Some(Fence::Kills),
        &[("ha1", true), ("plain", false)],
        HEARTBEAT,
    )?;
    let daemon = repo.watch(&[])?;
    let old = daemon.wait_running_on("ha1", "hv1")?;
    daemon.wait_running_on("plain", "hv1")?;
    let mut copies = CopyWatch::new(&repo, "ha1");
    copies.sample();

    let since = daemon.lines().len();
    let off = repo.power_off("hv1")?;
    let started = daemon.poll(
        "a \"started\" line for a new QEMU of ha1 after hv1 lost power",
        RECOVER,
        || {
            copies.sample();
            daemon.find_since(since, started_anew("ha1", old))
        },
    )?;
    let new = started.pid()?;
    ensure!(
        repo.qemu_on("hv2", "ha1")? == new,
        "the new QEMU {new} of ha1 is not the one on hv2"
    );
    copies.wait_until("ha1's first tick on hv2", BOOT_TIMEOUT, |_| {
        !ticks(&repo.serial_on("hv2", "ha1")).is_empty()
    })?;
    let first_tick = SystemTime::now();
    booted_afresh(&repo, "hv2", "ha1")?;
    let view = repo.wait_vm("ha1", "running on hv2 with the new pid", RECOVER, |v| {
        copies.sample();
        v.phase == "running" && v.host == "hv2" && v.pid == Some(new)
    })?;
    ensure!(view.restarts == 0, "the recovered ha1 restarted:\n{view}");

    // How the daemon got there, from its log.
    let log = daemon.lines_since(since);
    let first = |what: &str, pred: &dyn Fn(&LogLine) -> bool| {
        log.iter()
            .find(|l| pred(l))
            .cloned()
            .with_context(|| format!("no {what} line after the power-off\n{}", daemon.describe()))
    };
    let down = first("\"host unreachable\" for hv1", &|l| {
        l.is("host unreachable", None) && l.str("host") == Some("hv1")
    })?;
    let fenced = first("\"fenced\" for hv1", &|l| {
        l.is("fenced", None) && l.str("host") == Some("hv1")
    })?;
    first("\"done\" op recover for ha1", &|l| {
        l.is("done", Some("ha1")) && l.str("op") == Some("recover")
    })?;
    println!(
        "hv1 power-off → host unreachable {:.0} ms → fenced {:.0} ms → ha1 started on hv2 \
         {:.0} ms → first tick seen {:.0} ms (heartbeat 200 ms, down_after 1 s)",
        down.ms_after(off)?,
        fenced.ms_after(off)?,
        started.ms_after(off)?,
        first_tick
            .duration_since(off)
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3,
    );

    // hv1 is fenced, by its fence command, which ran; hv2 was not touched.
    let hv1 = repo.host_view("hv1")?.context("no status for hv1")?;
    ensure!(hv1.phase == "fenced", "hv1 is not fenced:\n{hv1}");
    ensure!(
        repo.fenced_by("hv1")?.as_deref() == Some("fence command"),
        "hv1's fence record: {:?}",
        repo.fence_record("hv1")?
    );
    ensure!(repo.fence_runs("hv1") >= 1, "hv1's fence command never ran");
    ensure!(repo.fence_runs("hv2") == 0, "hv2 was fenced");

    // plain (ha = false) runs nowhere and stays unknown; ha1 stays where it is.
    for _ in 0..2 {
        daemon.hup_then(RESYNC, || {
            copies.sample();
        })?;
    }
    ensure!(
        repo.qemus_of("plain").is_empty() && !repo.instance_dir_on("hv2", "plain").exists(),
        "plain (ha = false) was started elsewhere: QEMUs {:?}",
        repo.qemus_of("plain")
    );
    let plain = repo.vm_view("plain")?.context("no status for plain")?;
    ensure!(
        plain.phase == "unknown" && plain.pid.is_none() && plain.host == "hv1",
        "plain should be unknown, last seen on hv1:\n{plain}"
    );
    ensure!(
        repo.qemu_on("hv2", "ha1")? == new && !is_alive(old),
        "ha1 moved again"
    );
    copies.ensure_never_two()?;
    println!("{}", copies.summary());
    Ok(())
}

/// The status of an `ha = false` VM of a fenced host says that it is not recovered, and
/// why: what test 1 leaves out because the engine does not say it yet.
#[test]
fn ha_false_vm_of_a_fenced_host_says_why_it_stays_down() -> Result<()> {
    let repo = failover_repo(Some(Fence::Kills), &[("plain", false)], HEARTBEAT)?;
    let daemon = repo.watch(&[])?;
    daemon.wait_running_on("plain", "hv1")?;
    repo.power_off("hv1")?;
    daemon.wait("hv1 fenced", RECOVER, || repo.host_phase("hv1") == "fenced")?;
    daemon.resync(RESYNC)?;
    let plain = repo.vm_view("plain")?.context("no status for plain")?;
    let said = format!("{}\n{}", plain.message, repo.last_error());
    ensure!(
        said.contains("ha = false") && said.contains("not recovered"),
        "neither plain's status message nor engine.toml says it is not recovered because \
         ha = false:\n{plain}\nlast_error: {}",
        repo.last_error()
    );
    Ok(())
}

/// Cuts hv1 off (its agent stopped; it has no fence command) and checks that the
/// daemon declares it down and `ha1` unknown, says what the operator must do, and
/// starts nothing elsewhere for at least two whole reconciles.
fn cut_off_and_left_alone(
    repo: &TestRepo,
    daemon: &Daemon<'_>,
    copies: &mut CopyWatch<'_>,
    old: i32,
) -> Result<()> {
    // QEMUs seen on hv2 while hv1 is not fenced: there must be none.
    let mut on_hv2: Vec<i32> = Vec::new();

    // hv1 is cut off: its agent stops answering, its QEMU keeps running. It is suspect
    // first (two beats missed), then down (1 s of silence); ha1 is unknown from the
    // first, never running.
    let since = daemon.lines().len();
    let mut trail = PhaseTrail::new(repo, "hv1", "ha1");
    repo.partition("hv1")?;
    let phases = ("down", "unknown");
    wait_phases(&mut trail, daemon, copies, &mut on_hv2, phases, DETECT)?;
    println!("hv1 cut off: {trail}");
    ensure!(
        trail.host_phases() == ["ready", "suspect", "down"]
            && trail.vm_phases() == ["running", "unknown"],
        "hv1 should go ready → suspect → down and ha1 running → unknown: {trail}"
    );
    let suspect = trail.host_first("suspect").context("checked above")?;
    ensure!(
        suspect.message.contains("missed heartbeats"),
        "hv1's status while suspect does not say it missed heartbeats: {:?}",
        suspect.message
    );
    let unknown = trail.vm_first("unknown").context("checked above")?;
    ensure!(
        unknown.at < trail.host_first("down").context("checked above")?.at,
        "ha1 became unknown only when hv1 was down, not while it was suspect: {trail}"
    );
    let error = repo.last_error();
    for part in [
        "ha1: unknown: last seen on hv1",
        "plasmavmc fence confirm hv1",
    ] {
        ensure!(
            error.contains(part),
            "engine.toml's last_error lacks {part:?}: {error}"
        );
    }
    let view = repo.vm_view("ha1")?.context("no status for ha1")?;
    ensure!(
        view.pid.is_none() && view.host == "hv1",
        "ha1 should be unknown, last seen on hv1, without a pid:\n{view}"
    );

    // Three SIGHUPs: at least two whole reconciles ran since detection, and each
    // one's actions are done by the time the next starts. Nothing started elsewhere.
    let window = Instant::now();
    for _ in 0..3 {
        daemon.hup_then(RESYNC, || {
            copies.sample();
            on_hv2.extend(repo.host_qemus("hv2"));
        })?;
    }
    let health = daemon
        .lines_since(since)
        .iter()
        .filter(|l| l.is("reconcile", None) && l.str("trigger") == Some("health"))
        .count();
    println!(
        "hv1 cut off, no fence command: {health} reconciles with trigger \"health\" since the \
         partition; observed {:.1?} after detection",
        window.elapsed()
    );
    ensure!(
        repo.qemus_of("ha1") == [old] && is_alive(old),
        "while hv1 was only cut off, ha1's QEMUs became {:?} (was {old})",
        repo.qemus_of("ha1")
    );
    ensure!(
        on_hv2.is_empty() && !repo.instance_dir_on("hv2", "ha1").exists(),
        "something was started on hv2 before hv1 was fenced: QEMUs {on_hv2:?}"
    );
    ensure!(
        repo.fence_record("hv1")?.is_none(),
        "a fence record for hv1 appeared without a fence command or an operator"
    );
    copies.ensure_never_two()
}

/// Powers hv1 on again (after ha1 was recovered on hv2 as `new`) and checks that the
/// daemon reconnects, deletes hv1's stale instance of ha1, forgets the fencing, and
/// that exactly one QEMU of ha1 runs: `new`, on hv2.
fn rejoins_without_its_stale_copy(
    repo: &TestRepo,
    daemon: &Daemon<'_>,
    copies: &mut CopyWatch<'_>,
    new: i32,
) -> Result<()> {
    // hv1 is powered on again: the daemon reconnects, removes hv1's stale instance of
    // ha1 and forgets the fencing.
    let since = daemon.lines().len();
    repo.power_on("hv1")?;
    daemon.wait_log_since("the daemon to reconnect hv1", RECOVER, since, |l| {
        l.is("connected to the agent", None) && l.str("host") == Some("hv1")
    })?;
    daemon.wait(
        "hv1's stale instance of ha1 removed, its fence record cleared, hv1 ready",
        RECOVER,
        || {
            copies.sample();
            !repo.instance_dir_on("hv1", "ha1").exists()
                && repo.fence_record("hv1").is_ok_and(|r| r.is_none())
                && repo.host_phase("hv1") == "ready"
        },
    )?;
    ensure!(
        daemon
            .lines_since(since)
            .iter()
            .any(|l| l.is("done", Some("ha1")) && l.str("op") == Some("delete")),
        "no \"done\" line for the delete of hv1's stale ha1\n{}",
        daemon.describe()
    );
    daemon.resync(RESYNC)?;
    copies.sample();
    ensure!(
        repo.qemus_of("ha1") == [new] && repo.qemu_on("hv2", "ha1")? == new,
        "after hv1 came back, ha1's QEMUs are {:?}, expected only {new} on hv2",
        repo.qemus_of("ha1")
    );
    ensure!(
        repo.host_qemus("hv1").is_empty() && repo.hosts_with_instance("ha1") == ["hv2"],
        "hv1 runs QEMUs {:?} / ha1 has instances on {:?} after hv1 came back",
        repo.host_qemus("hv1"),
        repo.hosts_with_instance("ha1")
    );
    let view = repo.vm_view("ha1")?.context("no status for ha1")?;
    ensure!(
        view.phase == "running" && view.host == "hv2" && view.pid == Some(new),
        "ha1's status after hv1 came back:\n{view}"
    );
    copies.ensure_never_two()
}

/// hv1 runs two `ha` VMs of 300 MB and is powered off; hv2 (512 MB) has room for one.
/// The one of higher priority (`zulu`, though `alpha` comes first by name) is recovered;
/// `alpha` is started nowhere and its status says what is missing.
#[test]
fn recovery_takes_the_highest_priority_first() -> Result<()> {
    let big = || VmSpec::new().no_disks().memory(300).ha(true);
    let repo = failover_repo_with(
        Some(Fence::Kills),
        &[("alpha", big()), ("zulu", big().priority(10))],
        HEARTBEAT,
    )?;
    let daemon = repo.watch(&[])?;
    daemon.wait_running_on("alpha", "hv1")?;
    let old = daemon.wait_running_on("zulu", "hv1")?;

    repo.power_off("hv1")?;
    let new = daemon.wait_running_on("zulu", "hv2")?;
    ensure!(new != old, "zulu's QEMU on hv2 is the old one");
    booted_afresh(&repo, "hv2", "zulu")?;
    let alpha = repo.wait_vm("alpha", "says why it is not recovered", RECOVER, |v| {
        v.message.contains("cannot be recovered")
    })?;
    ensure!(
        alpha.phase == "unknown"
            && alpha.host == "hv1"
            && alpha
                .message
                .contains("needs 300 MB and 1 vCPUs: hv1 unreachable, hv2 has 212 MB free"),
        "alpha's status should say it does not fit on hv2:\n{alpha}"
    );
    ensure!(
        repo.last_error()
            .contains("alpha: on fenced host hv1; cannot be recovered"),
        "engine.toml's last_error does not name alpha: {}",
        repo.last_error()
    );
    daemon.resync(RESYNC)?;
    ensure!(
        repo.qemus_of("alpha").is_empty() && !repo.instance_dir_on("hv2", "alpha").exists(),
        "alpha was started somewhere: QEMUs {:?}",
        repo.qemus_of("alpha")
    );
    ensure!(
        repo.qemus_of("zulu") == [new],
        "zulu's QEMUs are {:?}, expected only {new} on hv2",
        repo.qemus_of("zulu")
    );
    Ok(())
}

/// hv1 freezes for less than `down_after` (its agent stopped, then resumed): it is
/// suspect and ha1 unknown meanwhile, then both are back, on the same agent
/// connection and the same QEMU; nothing was fenced or started elsewhere.
#[test]
fn brief_freeze_is_suspect_then_ready_again() -> Result<()> {
    let repo = failover_repo(Some(Fence::Kills), &[("ha1", true)], ROOMY)?;
    let daemon = repo.watch(&[])?;
    let old = daemon.wait_running_on("ha1", "hv1")?;
    let mut copies = CopyWatch::new(&repo, "ha1");
    let mut on_hv2: Vec<i32> = Vec::new();

    let since = daemon.lines().len();
    let mut trail = PhaseTrail::new(&repo, "hv1", "ha1");
    let frozen = Instant::now();
    let agent = repo.partition("hv1")?;
    let phases = ("suspect", "unknown");
    wait_phases(
        &mut trail,
        &daemon,
        &mut copies,
        &mut on_hv2,
        phases,
        ROOMY_DOWN_AFTER,
    )?;
    repo.resume(agent)?;
    let resumed_after = frozen.elapsed();
    ensure!(
        resumed_after < ROOMY_DOWN_AFTER,
        "hv1 was resumed only {resumed_after:.2?} after it froze, not before down_after: \
         the test proves nothing ({trail})"
    );
    let phases = ("ready", "running");
    wait_phases(
        &mut trail,
        &daemon,
        &mut copies,
        &mut on_hv2,
        phases,
        DETECT,
    )?;
    println!("hv1 frozen for {resumed_after:.2?}: {trail}");
    ensure!(
        trail.host_phases() == ["ready", "suspect", "ready"]
            && trail.vm_phases() == ["running", "unknown", "running"],
        "hv1 should go ready → suspect → ready and ha1 running → unknown → running: {trail}"
    );

    // The same QEMU, the same agent and connection; nothing fenced, nothing elsewhere.
    let view = repo.vm_view("ha1")?.context("no status for ha1")?;
    ensure!(
        view.pid == Some(old) && view.host == "hv1" && view.restarts == 0,
        "ha1 should run on hv1 as QEMU {old}, never restarted:\n{view}"
    );
    ensure!(
        repo.qemus_of("ha1") == [old] && repo.qemu_on("hv1", "ha1")? == old,
        "ha1's QEMUs are {:?}, expected only {old} on hv1",
        repo.qemus_of("ha1")
    );
    ensure!(
        is_alive(agent) && repo.host_agents("hv1") == [agent],
        "hv1's agent {agent} should still serve it: agents {:?}",
        repo.host_agents("hv1")
    );
    let log = daemon.lines_since(since);
    let about_hv1 = |message: &str| {
        log.iter()
            .any(|l| l.is(message, None) && l.str("host") == Some("hv1"))
    };
    ensure!(
        !about_hv1("connected to the agent") && !about_hv1("host unreachable"),
        "the daemon dropped and reconnected hv1 after a freeze shorter than down_after\n{}",
        daemon.describe()
    );
    ensure!(
        about_hv1("host answers again; ready"),
        "no \"host answers again\" line for hv1\n{}",
        daemon.describe()
    );
    ensure!(
        on_hv2.is_empty() && !repo.instance_dir_on("hv2", "ha1").exists(),
        "something was started on hv2 while hv1 was only suspect: QEMUs {on_hv2:?}"
    );
    ensure!(
        repo.fence_runs("hv1") == 0 && repo.fence_record("hv1")?.is_none(),
        "hv1 was fenced while only suspect"
    );
    copies.ensure_never_two()
}

#[test]
fn partition_without_fence_waits_for_the_operator() -> Result<()> {
    let repo = failover_repo(None, &[("ha1", true)], HEARTBEAT)?;
    let daemon = repo.watch(&[])?;
    let old = daemon.wait_running_on("ha1", "hv1")?;
    let mut copies = CopyWatch::new(&repo, "ha1");
    cut_off_and_left_alone(&repo, &daemon, &mut copies, old)?;

    // The operator powers hv1 off (its QEMU and its stopped agent die, and it cannot
    // start again), and says so.
    repo.power_off("hv1")?;
    ensure!(
        !is_alive(old),
        "ha1's QEMU {old} on hv1 survived the power-off"
    );
    let since = daemon.lines().len();
    let confirm = repo.fence_confirm("hv1")?;
    confirm.expect_code(0)?;
    ensure!(
        confirm.stdout.contains("host hv1 is fenced")
            && confirm.stdout.contains("told the running daemon"),
        "fence confirm does not say what it recorded and whom it told\n{confirm}"
    );
    ensure!(
        repo.fenced_by("hv1")?.as_deref() == Some("operator"),
        "hv1's fence record after fence confirm: {:?}\n{confirm}",
        repo.fence_record("hv1")?
    );
    // No SIGHUP from the test: fence confirm itself wakes the daemon.
    let started = daemon.poll("ha1 started on hv2 after fence confirm", RECOVER, || {
        copies.sample();
        daemon.find_since(since, started_anew("ha1", old))
    })?;
    let new = daemon.wait_running_on("ha1", "hv2")?;
    ensure!(
        started.pid()? == new,
        "the \"started\" line names pid {}, hv2 runs {new}",
        started.pid()?
    );
    booted_afresh(&repo, "hv2", "ha1")?;
    ensure!(
        repo.host_phase("hv1") == "fenced",
        "hv1 is not reported fenced: {:?}",
        repo.host_view("hv1")?
    );

    rejoins_without_its_stale_copy(&repo, &daemon, &mut copies, new)
}

/// How a partitioned host with a stale copy comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Return {
    /// SIGCONT to its agent: the agent finds its engine gone (EOF) and exits; the
    /// daemon's next agent takes the root.
    Resume,
    /// Its agent dies (SIGCONT, then SIGKILL) and the daemon's next agent takes the root;
    /// the stale QEMU keeps running, as after an agent restart on the host.
    AgentRestart,
}

/// hv1 is cut off and its fence command lies (exit 0, ha1's QEMU keeps running
/// there): ha1 is recovered on hv2 and two copies run. When hv1 comes back (`how`),
/// the daemon must stop and delete hv1's copy, leaving exactly one, never restarted.
fn lying_fence_then_return(how: Return) -> Result<()> {
    let repo = failover_repo(Some(Fence::Lies), &[("ha1", true)], HEARTBEAT)?;
    let daemon = repo.watch(&[])?;
    let old = daemon.wait_running_on("ha1", "hv1")?;
    let mut copies = CopyWatch::new(&repo, "ha1");

    let since = daemon.lines().len();
    let agent = repo.partition("hv1")?;
    let started = daemon.poll("ha1 recovered on hv2", RECOVER, || {
        copies.sample();
        daemon.find_since(since, started_anew("ha1", old))
    })?;
    let new = started.pid()?;
    ensure!(
        repo.qemu_on("hv2", "ha1")? == new,
        "the new QEMU {new} of ha1 is not the one on hv2"
    );
    ensure!(
        repo.fence_runs("hv1") >= 1 && repo.fenced_by("hv1")?.as_deref() == Some("fence command"),
        "hv1 was not fenced by its fence command: {:?}",
        repo.fence_record("hv1")?
    );
    // The fence's lie: both copies run now.
    ensure!(
        is_alive(old) && repo.host_qemus("hv1") == [old],
        "the lying fence was expected to leave ha1's QEMU {old} on hv1 running"
    );
    copies.wait_until("two copies of ha1 (the fence lied)", RECOVER, |p| {
        p.len() == 2
    })?;

    // hv1 answers again: the daemon must stop and delete hv1's copy.
    let since = daemon.lines().len();
    let back = Instant::now();
    repo.resume(agent)?;
    if how == Return::AgentRestart {
        plasmavmc_e2e::proc::kill_and_wait(agent, DETECT)?;
    } else {
        daemon.wait(
            format!("hv1's resumed agent {agent} to exit (its engine dropped it)"),
            DETECT,
            || !is_alive(agent),
        )?;
    }
    copies
        .wait_until(
            "only ha1's copy on hv2 left, hv1's instance deleted",
            RECOVER,
            |pids| pids == [new] && !repo.instance_dir_on("hv1", "ha1").exists(),
        )
        .with_context(|| daemon.describe())?;
    let removed_after = back.elapsed();
    ensure!(!is_alive(old), "hv1's copy {old} still runs");
    // The folder goes before the daemon logs the delete's end: wait for the line.
    for op in ["stop", "delete"] {
        daemon.wait_log_since(
            format!("a \"done\" line for op {op} of ha1 after hv1 came back"),
            DETECT,
            since,
            |l| l.is("done", Some("ha1")) && l.str("op") == Some(op),
        )?;
    }
    println!(
        "lying fence, hv1 back by {how:?}: {}; hv1's copy removed {removed_after:.2?} after \
         hv1 came back",
        copies.summary()
    );

    // From then on exactly one copy, the one on hv2, never restarted.
    let mut after = CopyWatch::new(&repo, "ha1");
    for _ in 0..2 {
        daemon.hup_then(RESYNC, || {
            after.sample();
        })?;
    }
    after.sample();
    after.ensure_never_two()?;
    ensure!(
        after.most() == [new] && repo.qemu_on("hv2", "ha1")? == new,
        "ha1's QEMUs are {:?}, expected only {new} on hv2",
        repo.qemus_of("ha1")
    );
    let view = repo.wait_vm("ha1", "running on hv2, not restarted", RECOVER, |v| {
        v.phase == "running" && v.host == "hv2" && v.pid == Some(new)
    })?;
    ensure!(view.restarts == 0, "ha1 was restarted:\n{view}");
    daemon.wait_rejoined("hv1", RECOVER)
}

#[test]
fn returning_host_never_runs_a_second_copy() -> Result<()> {
    lying_fence_then_return(Return::Resume)
}

#[test]
fn returning_host_with_a_restarted_agent_never_keeps_a_second_copy() -> Result<()> {
    lying_fence_then_return(Return::AgentRestart)
}

/// A host that freezes while the daemon asks it what runs holds that reconcile only
/// until the host is suspect (two heartbeats of silence), not until `down_after`: a
/// crash on another host meanwhile is healed within seconds.
#[test]
fn a_host_freezing_mid_look_does_not_hold_up_healing_elsewhere() -> Result<()> {
    // Suspect after 1 s; down only after 30 s (never reached here).
    let settings = "[heartbeat]\ninterval = \"500ms\"\ndown_after = \"30s\"\n";
    let vm = VmSpec::new().no_disks().memory(96);
    let repo = failover_repo_with(
        None,
        &[("a", vm.clone().pin("hv1")), ("b", vm.pin("hv2"))],
        settings,
    )?;
    let daemon = repo.watch(&[])?;
    let a = daemon.wait_running_on("a", "hv1")?;
    daemon.wait_running_on("b", "hv2")?;

    let agent = repo.partition("hv2")?;
    // A reconcile at once: hv2 is not yet suspect, so it is asked what runs, and its
    // frozen agent leaves the question unanswered.
    let since = daemon.lines().len();
    daemon.signal(nix::sys::signal::Signal::SIGHUP)?;
    daemon.wait_log_since("the reconcile asking hv2", DETECT, since, |l| {
        l.is("reconcile", None)
    })?;
    let crashed = Instant::now();
    plasmavmc_e2e::proc::kill_and_wait(a, DETECT)?;
    let started =
        daemon.wait_log_since("a restarted on hv1", Duration::from_secs(40), since, |l| {
            l.is("started", Some("a")) && l.int("pid").is_some_and(|p| p != i64::from(a))
        });
    let took = crashed.elapsed();
    repo.resume(agent)?;
    started?;
    println!("a restarted {took:.2?} after its crash, while hv2 was frozen");
    ensure!(
        took < Duration::from_secs(6),
        "a's restart waited {took:.2?} for the frozen hv2 (down_after is 30 s)\n{}",
        daemon.describe()
    );
    Ok(())
}
