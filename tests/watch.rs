//! `plasmavmc watch`, end to end: the daemon against real git repositories and real
//! QEMU (TCG) running the tiny test guest.
//!
//! What this file proves, one test each:
//! - the daemon brings up a committed VM and reports it running with its pid;
//! - killing the daemon with SIGKILL leaves the VM running, and a new daemon adopts
//!   the same QEMU without restarting it;
//! - a QEMU killed with SIGKILL is detected as a crash and restarted on the same disk;
//! - `restart = "never"` leaves a crashed VM stopped and says why;
//! - `restart = "on-failure"` leaves a guest that powered itself off stopped;
//! - a crash loop ends in phase "failed" after `max_failures`, and nothing restarts;
//! - a commit is applied at once (not at the next interval); an invalid commit changes
//!   nothing and is reported in `status/engine.toml`;
//! - a second engine (`watch` or `apply`) on the same state dir is refused;
//! - SIGTERM ends the daemon with status 0 and leaves the VMs running.
//!
//! Each test has its own repository and state dir; the daemon runs in its own
//! process group, killed (SIGKILL) when the test ends, even on failure; the QEMUs
//! are killed by the repository's cleanup (see `tests/harness/`).

use std::fs;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use plasmavmc_e2e::proc::{kill_and_wait, qemu_memory_mb};
use plasmavmc_e2e::{
    cmdline, diagnostic, is_alive, last_tick, serial_has_line, ticks, Daemon, TestRepo, VmSpec,
    BOOT_TIMEOUT,
};

/// Bound for the daemon to spawn QEMU / act on a status change (not a boot).
const ACT: Duration = Duration::from_secs(30);
/// Bound for one SIGHUP-triggered reconcile to run (see `Daemon::resync`).
const RESYNC: Duration = Duration::from_secs(30);
/// Bound for crash detection plus restart: 10× the 1 s recovery goal.
const HEAL: Duration = Duration::from_secs(10);

// ---- helpers --------------------------------------------------------------------

/// The state lock's text.
fn lock_text(repo: &TestRepo) -> String {
    fs::read_to_string(repo.state_dir().join("lock")).unwrap_or_default()
}

/// What the lock says while `daemon` holds it: `plasmavmc watch (pid N`.
fn holder(daemon: &Daemon<'_>) -> String {
    format!("plasmavmc watch (pid {}", daemon.pid())
}

// ---- tests ----------------------------------------------------------------------

#[test]
fn watch_brings_up_a_committed_vm() -> Result<()> {
    let repo = TestRepo::with_vm("web", &VmSpec::new().memory(128))?;
    let head = repo.commit("an empty commit on top")?;
    let daemon = repo.watch(&[])?;

    let pid = daemon.wait_running("web")?;
    let args = cmdline(pid)?;
    ensure!(
        args.first().is_some_and(|a| a.contains("qemu-system"))
            && qemu_memory_mb(&args) == Some(128),
        "pid {pid} is not QEMU with -m 128: {}",
        args.join(" ")
    );
    ensure!(
        lock_text(&repo).contains(&holder(&daemon)),
        "the state lock does not name the daemon: {:?}",
        lock_text(&repo)
    );

    // The log lines the benchmark relies on.
    daemon.wait_log("a \"reconcile\" line with trigger \"startup\"", ACT, |l| {
        l.is("reconcile", None) && l.str("trigger") == Some("startup")
    })?;
    daemon.wait_log(format!("a \"started\" line for web, pid {pid}"), ACT, |l| {
        l.is("started", Some("web")) && l.int("pid") == Some(i64::from(pid))
    })?;
    let engine = daemon.poll(
        "status/engine.toml to record the applied commit",
        ACT,
        || {
            repo.engine_view()
                .ok()
                .flatten()
                .filter(|e| e.last_applied_revision.as_deref() == Some(head.as_str()))
        },
    )?;
    ensure!(
        engine.last_error.is_none(),
        "last_error after a good commit:\n{engine}"
    );
    ensure!(
        repo.qemus_of("web") == vec![pid],
        "QEMUs for web: {:?}, expected only {pid}",
        repo.qemus_of("web")
    );
    Ok(())
}

#[test]
fn engine_kill9_leaves_vms_running_and_restart_adopts() -> Result<()> {
    let repo = TestRepo::with_vm("web", &VmSpec::new())?;
    let mut first = repo.watch(&[])?;
    let pid = first.wait_running("web")?;

    // The engine dies: the VM must not notice.
    first.kill9()?;
    let before = last_tick(&repo.serial("web")).context("no tick before the kill")?;
    repo.wait_ticks_past("web", before, HEAL)?;
    ensure!(
        is_alive(pid) && repo.qemu_pid("web")? == pid,
        "QEMU {pid} did not survive the engine's death\n{}",
        repo.describe_vm("web")
    );

    // A new engine adopts the same QEMU.
    let second = repo.watch(&[])?;
    let adopted = second.wait_log("an \"adopted\" line for web", ACT, |l| {
        l.is("adopted", Some("web"))
    })?;
    ensure!(
        adopted.int("pid") == Some(i64::from(pid)),
        "adopted a different pid than {pid}: {adopted}"
    );
    repo.wait_vm("web", "an \"adopted\" event, phase running", ACT, |v| {
        v.last_index_of("adopted").is_some() && v.phase == "running"
    })?;
    // One more whole reconcile after the adoption: still nothing may restart.
    second.resync(RESYNC)?;

    let view = repo
        .vm_view("web")?
        .context("status/vms/web.toml vanished")?;
    ensure!(
        view.phase == "running" && view.pid == Some(pid),
        "status after adoption is not running with pid {pid}:\n{view}"
    );
    let at = view.last_index_of("adopted").context("no adopted event")?;
    let after: Vec<_> = view.events[at + 1..]
        .iter()
        .filter(|e| ["create", "start", "restart", "stop"].contains(&e.kind.as_str()))
        .collect();
    ensure!(
        after.is_empty(),
        "the adopted VM was acted on: {after:?}\n{view}"
    );
    ensure!(
        is_alive(pid) && repo.qemu_pid("web")? == pid && repo.qemus_of("web") == vec![pid],
        "QEMU {pid} was replaced: qemu.pid {:?}, QEMUs {:?}",
        repo.try_qemu_pid("web"),
        repo.qemus_of("web")
    );
    let serial = repo.serial("web");
    let ones = serial.lines().filter(|l| l.trim() == "tick 1").count();
    ensure!(
        ones == 1 && !serial.contains("disk: boots=2"),
        "the guest booted again (tick 1 seen {ones} times)\n{}",
        repo.describe_vm("web")
    );
    ensure!(
        !repo.instance_dir("web").join("serial.log.1").exists(),
        "serial.log was rotated: the VM was restarted"
    );
    repo.wait_ticks_past("web", last_tick(&serial).unwrap_or(0), HEAL)?;
    ensure!(
        lock_text(&repo).contains(&holder(&second)),
        "the lock does not name the second daemon: {:?}",
        lock_text(&repo)
    );
    Ok(())
}

#[test]
fn qemu_kill9_is_detected_and_restarted() -> Result<()> {
    let repo = TestRepo::with_vm("web", &VmSpec::new())?;
    let daemon = repo.watch(&[])?;
    let old = daemon.wait_running("web")?;

    let killed = Instant::now();
    kill_and_wait(old, Duration::from_secs(5))?;
    let new = daemon.poll("a new live QEMU for web", HEAL, || {
        repo.try_qemu_pid("web")
            .filter(|&p| p != old && is_alive(p))
    })?;
    eprintln!("kill -9 -> new QEMU alive: {:?}", killed.elapsed());

    let exited = daemon.wait_log(format!("a \"vm exited\" line for pid {old}"), HEAL, |l| {
        l.is("vm exited", Some("web")) && l.int("pid") == Some(i64::from(old))
    })?;
    ensure!(
        exited.str("reason") == Some("crash"),
        "exit reason is not crash: {exited}"
    );
    daemon.wait_log(format!("a \"started\" line for pid {new}"), HEAL, |l| {
        l.is("started", Some("web")) && l.int("pid") == Some(i64::from(new))
    })?;
    let view = repo.wait_vm(
        "web",
        "running again with the new pid, an exited event mentioning crash, restarts >= 1",
        ACT,
        |v| {
            v.phase == "running"
                && v.pid == Some(new)
                && v.has_event("exited", "crash")
                && v.restarts >= 1
        },
    )?;
    ensure!(
        view.restarts == 1,
        "restarts = {} after one crash:\n{view}",
        view.restarts
    );

    // The new QEMU booted the same disk: a second boot, ticks from 1 again.
    daemon.wait(
        "the restarted guest to find its disk and tick",
        BOOT_TIMEOUT,
        || {
            let s = repo.serial("web");
            s.contains("disk: found boots=1") && serial_has_line(&s, "tick 3")
        },
    )?;
    let serial = repo.serial("web");
    ensure!(
        ticks(&serial).first() == Some(&1),
        "the new serial.log does not start at tick 1:\n{}",
        repo.describe_vm("web")
    );
    let previous = fs::read_to_string(repo.instance_dir("web").join("serial.log.1"))
        .context("serial.log.1 (the crashed run's console) is missing")?;
    ensure!(
        serial_has_line(&previous, "tick 3"),
        "serial.log.1 does not hold the first run"
    );
    ensure!(
        repo.qemus_of("web") == vec![new],
        "QEMUs for web: {:?}, expected only {new}",
        repo.qemus_of("web")
    );
    Ok(())
}

#[test]
fn restart_never_stays_stopped_with_the_reason() -> Result<()> {
    let repo = TestRepo::with_vm("web", &VmSpec::new().restart("never"))?;
    let daemon = repo.watch(&[])?;
    let pid = daemon.wait_running("web")?;

    kill_and_wait(pid, Duration::from_secs(5))?;
    repo.wait_vm("web", "an exited event mentioning crash", HEAL, |v| {
        v.has_event("exited", "crash")
    })?;
    repo.wait_vm("web", "phase stopped", ACT, |v| v.phase == "stopped")?;
    ensure!(
        repo.qemus_of("web").is_empty(),
        "a QEMU runs for web: {:?}",
        repo.qemus_of("web")
    );

    // Another whole reconcile: still nothing starts.
    daemon.resync(RESYNC)?;
    let view = repo
        .vm_view("web")?
        .context("status/vms/web.toml vanished")?;
    ensure!(
        repo.qemus_of("web").is_empty() && !repo.try_qemu_pid("web").is_some_and(is_alive),
        "web was restarted despite restart = never: {:?}\n{view}",
        repo.qemus_of("web")
    );
    ensure!(
        view.phase == "stopped" && view.restarts == 0,
        "expected phase stopped, restarts 0:\n{view}"
    );
    ensure!(
        view.message.contains("never") && view.message.contains("crash"),
        "the message does not give the reason (crash) and the policy (never): {:?}\n{view}",
        view.message
    );
    let at = view.last_index_of("exited").context("no exited event")?;
    ensure!(
        !view.events[at + 1..].iter().any(|e| e.kind == "start"),
        "a start after the exit:\n{view}"
    );
    Ok(())
}

#[test]
fn guest_poweroff_with_on_failure_stays_stopped() -> Result<()> {
    let spec = VmSpec::new()
        .restart("on-failure")
        .cmdline("plasmavmc.poweroff=3");
    let repo = TestRepo::with_vm("web", &spec)?;
    let daemon = repo.watch(&[])?;

    let pid = daemon.poll("a QEMU for web", ACT, || repo.try_qemu_pid("web"))?;
    daemon.wait("the guest to power itself off", BOOT_TIMEOUT, || {
        repo.serial("web").contains("powering off")
    })?;
    daemon.wait(format!("QEMU {pid} to exit by itself"), HEAL, || {
        !is_alive(pid)
    })?;
    repo.wait_vm(
        "web",
        "phase stopped with an exited event mentioning guest-poweroff",
        ACT,
        |v| v.phase == "stopped" && v.has_event("exited", "guest-poweroff"),
    )?;

    daemon.resync(RESYNC)?;
    let view = repo
        .vm_view("web")?
        .context("status/vms/web.toml vanished")?;
    ensure!(
        repo.qemus_of("web").is_empty(),
        "web was restarted after a guest power-off with on-failure: {:?}\n{view}",
        repo.qemus_of("web")
    );
    ensure!(
        view.phase == "stopped" && view.restarts == 0,
        "expected phase stopped, restarts 0:\n{view}"
    );
    let message = view.message.to_lowercase();
    ensure!(
        message.contains("guest-poweroff")
            || (message.contains("guest")
                && message.contains("powered")
                && message.contains("off")),
        "the message does not say the guest powered off: {:?}",
        view.message
    );
    let at = view.last_index_of("exited").context("no exited event")?;
    ensure!(
        !view.events[at + 1..].iter().any(|e| e.kind == "start"),
        "a start after the power-off:\n{view}"
    );
    let serial = repo.serial("web");
    ensure!(
        !serial.contains("disk: boots=2")
            && !repo.instance_dir("web").join("serial.log.1").exists(),
        "the guest booted twice\n{}",
        repo.describe_vm("web")
    );
    Ok(())
}

#[test]
fn crash_loop_ends_in_failed() -> Result<()> {
    let repo = TestRepo::new()?;
    repo.set_cluster_settings(
        "[restart]\nbackoff = \"100ms\"\nbackoff_max = \"200ms\"\nmax_failures = 3\nwindow = \"10m\"\n",
    )?;
    repo.write_vm(
        "web",
        &VmSpec::new().restart("always").cmdline("plasmavmc.panic=2"),
    )?;
    repo.commit("web panics after 2 ticks")?;
    let daemon = repo.watch(&[])?;

    // Each run boots (~3 s under TCG, more when tests share the cores) and panics.
    let started = Instant::now();
    let failed = daemon.poll("web to reach phase failed", 4 * BOOT_TIMEOUT, || {
        repo.vm_view("web")
            .ok()
            .flatten()
            .filter(|v| v.phase == "failed")
    })?;
    eprintln!(
        "failed after {:?} with restarts = {}",
        started.elapsed(),
        failed.restarts
    );
    ensure!(
        (2..=3).contains(&failed.restarts),
        "max_failures = 3 but restarts = {}:\n{failed}",
        failed.restarts
    );
    ensure!(
        failed.has_event("exited", "panic"),
        "no exited event mentions panic:\n{failed}"
    );
    ensure!(
        failed.events_of("failed").next().is_some(),
        "no \"failed\" event:\n{failed}"
    );

    // It stopped restarting: no QEMU now, none after another whole reconcile.
    ensure!(
        repo.qemus_of("web").is_empty(),
        "a QEMU runs in phase failed: {:?}",
        repo.qemus_of("web")
    );
    daemon.resync(RESYNC)?;
    let view = repo
        .vm_view("web")?
        .context("status/vms/web.toml vanished")?;
    ensure!(
        view.phase == "failed" && view.restarts == failed.restarts,
        "phase or restarts moved after failed:\n{view}"
    );
    ensure!(
        repo.qemus_of("web").is_empty(),
        "restarted after failed: {:?}",
        repo.qemus_of("web")
    );
    // Each restart booted the disk once more: the guest's own count agrees.
    let boots = failed.restarts + 1;
    let serial = repo.serial("web");
    ensure!(
        serial.contains(&format!("disk: boots={boots}"))
            && !serial.contains(&format!("disk: boots={}", boots + 1)),
        "the guest did not boot exactly {boots} times\n{}",
        repo.describe_vm("web")
    );
    Ok(())
}

#[test]
fn commits_apply_immediately_and_invalid_ones_change_nothing() -> Result<()> {
    let repo = TestRepo::with_vm("web", &VmSpec::new())?;
    let daemon = repo.watch(&["--interval", "1h"])?;
    let web = daemon.wait_running("web")?;

    // A new commit runs at once, not at the next interval.
    repo.write_vm("db", &VmSpec::new())?;
    let good = repo.commit("add db")?;
    let committed = Instant::now();
    let db = daemon.poll(
        "a live QEMU for db, well before the 1h interval",
        Duration::from_secs(15),
        || repo.try_qemu_pid("db").filter(|&p| is_alive(p)),
    )?;
    eprintln!("commit -> db QEMU alive: {:?}", committed.elapsed());
    daemon.wait_log(
        format!("a reconcile with trigger commit, revision {good}"),
        ACT,
        |l| {
            l.is("reconcile", None)
                && l.str("trigger") == Some("commit")
                && l.str("revision")
                    .is_some_and(|r| r.len() >= 7 && good.starts_with(r))
        },
    )?;
    daemon.poll("last_applied_revision = the db commit", ACT, || {
        repo.engine_view()
            .ok()
            .flatten()
            .filter(|e| e.last_applied_revision.as_deref() == Some(good.as_str()))
    })?;
    daemon.wait("tick 3 on db's console", BOOT_TIMEOUT, || {
        serial_has_line(&repo.serial("db"), "tick 3")
    })?;

    // An invalid file plus a change to a running VM: the whole commit is refused.
    let spec = VmSpec::new().no_disks().to_toml(repo.guest());
    repo.write(
        "vms/bad.toml",
        &format!(
            "vcpus = 1\ncolour = \"blue\"\n{}",
            spec.replacen("vcpus = 1\n", "", 1)
        ),
    )?;
    repo.write_vm("web", &VmSpec::new().memory(192))?;
    let bad = repo.commit("a bad file and a change to web")?;
    let engine = daemon.poll(
        "last_attempted_revision = the bad commit",
        Duration::from_secs(15),
        || {
            repo.engine_view()
                .ok()
                .flatten()
                .filter(|e| e.last_attempted_revision.as_deref() == Some(bad.as_str()))
        },
    )?;
    let error = engine.last_error.clone().unwrap_or_default();
    let (line, _col) = diagnostic(&error, "vms/bad.toml")
        .with_context(|| format!("last_error has no vms/bad.toml:LINE:COL: message\n{engine}"))?;
    ensure!(
        line == 2,
        "the unknown field is on line 2, last_error says {line}\n{engine}"
    );
    ensure!(
        engine.last_applied_revision.as_deref() == Some(good.as_str()),
        "last_applied_revision moved off {good}:\n{engine}"
    );

    // Nothing moved, not even after another whole reconcile of the bad commit.
    daemon.resync(RESYNC)?;
    for (vm, pid) in [("web", web), ("db", db)] {
        ensure!(
            is_alive(pid) && repo.qemu_pid(vm)? == pid,
            "{vm} was touched by an invalid commit (pid {pid} -> {:?})\n{}",
            repo.try_qemu_pid(vm),
            repo.describe_vm(vm)
        );
    }
    ensure!(
        qemu_memory_mb(&cmdline(web)?) == Some(128),
        "web runs with the refused memory size"
    );
    ensure!(
        !repo.instance_dir("bad").exists(),
        "an instance folder for the invalid VM was created"
    );
    let engine = repo.engine_view()?.context("status/engine.toml vanished")?;
    ensure!(
        engine.last_applied_revision.as_deref() == Some(good.as_str())
            && engine.last_attempted_revision.as_deref() == Some(bad.as_str()),
        "engine status after the resync:\n{engine}"
    );
    Ok(())
}

#[test]
fn a_second_engine_is_refused() -> Result<()> {
    let repo = TestRepo::with_vm("web", &VmSpec::new())?;
    let daemon = repo.watch(&[])?;
    let pid = daemon.wait_running("web")?;
    let holder = holder(&daemon);
    daemon.wait("the lock to name the daemon", ACT, || {
        lock_text(&repo).contains(&holder)
    })?;

    let mut second = repo.watch(&[])?;
    let status = second.wait_exit(ACT)?;
    let stderr = second.stderr();
    ensure!(
        status.code() == Some(1),
        "a second watch exited with {status}\n{}",
        second.describe()
    );
    ensure!(
        stderr.contains("in use by") && stderr.contains(&holder),
        "the second watch does not name the holder ({holder})\n{}",
        second.describe()
    );

    let apply = repo.run(&["apply", "--auto-approve"])?;
    apply.expect_code(1)?;
    ensure!(
        apply.stderr.contains("in use by") && apply.stderr.contains(&holder),
        "apply does not name the holder ({holder})\n{apply}"
    );

    ensure!(
        daemon.is_running(),
        "the first daemon died\n{}",
        daemon.describe()
    );
    ensure!(
        repo.qemus_of("web") == vec![pid] && repo.qemu_pid("web")? == pid,
        "the VM was touched: QEMUs {:?}",
        repo.qemus_of("web")
    );
    ensure!(
        lock_text(&repo).contains(&holder),
        "the refused engines rewrote the lock: {:?}",
        lock_text(&repo)
    );
    Ok(())
}

#[test]
fn sigterm_exits_cleanly_leaving_vms() -> Result<()> {
    let repo = TestRepo::with_vm("web", &VmSpec::new())?;
    let mut daemon = repo.watch(&[])?;
    let pid = daemon.wait_running("web")?;

    daemon.signal(Signal::SIGTERM)?;
    let status = daemon.wait_exit(HEAL)?;
    ensure!(
        status.code() == Some(0),
        "SIGTERM: the daemon exited with {status}\n{}",
        daemon.describe()
    );
    let before = last_tick(&repo.serial("web")).context("no tick")?;
    repo.wait_ticks_past("web", before, HEAL)?;
    ensure!(
        is_alive(pid) && repo.qemu_pid("web")? == pid,
        "QEMU {pid} did not survive SIGTERM of the daemon"
    );
    // The VM was left as committed: nothing to do.
    repo.run(&["plan", "--detailed-exitcode"])?
        .expect_code(0)
        .context("after the daemon's clean exit, the VM should match its spec")?;
    ensure!(is_alive(pid), "plan touched the VM");
    Ok(())
}
