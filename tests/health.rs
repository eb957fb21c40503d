//! Guest health against real QEMU: a guest that hangs while its QEMU runs on.
//!
//! The guest here is the generic-kernel flavour of the test guest (its initrd loads the
//! i6300esb driver the cloud kernel lacks); `plasmavmc.watchdog=N` makes it feed
//! `/dev/watchdog` for N seconds and then stop while it keeps ticking: a hang from the
//! watchdog's point of view. `i6300esb.heartbeat=2` keeps the wait short.
//!
//! What this file proves, under `watch`:
//! - `watchdog = "restart"`: the fired watchdog ends that QEMU (exit reason `watchdog`)
//!   and the engine starts a fresh one even under `restart = "never"`;
//! - `watchdog = "reset"`: QEMU resets the guest in place (same pid, the guest boots
//!   again), counted in the status (`watchdog_resets`) with a `watchdog` event;
//! - `watchdog = "poweroff"` with `restart = "never"`: the VM stays off, and its status
//!   says the watchdog fired;
//! - `guest_agent = true`: the status shows it answering (OS, address), a new daemon
//!   adopts the VM and the pinging goes on, a silent guest agent restarts nothing;
//! - a `tcp` readiness probe flips `ready` both ways without a restart;
//! - a `guest-agent` liveness probe whose checks hang (ended at their timeout) makes
//!   the VM `unhealthy`, and its QEMU is replaced;
//! - probes survive a daemon restart (SIGTERM, a new daemon adopts the VM): a
//!   readiness flip after it is shown, a liveness failure after it replaces the QEMU;
//! - an `http` probe whose request hangs (a forwarded port the guest never answers) is
//!   ended at its timeout, and the agent and daemon go on (a commit is carried out).
//!
//! Each prints how long detection and recovery took (the figures belong in
//! BENCHMARKS.md; the bounds here are only generous sanity bounds).

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use plasmavmc_e2e::{
    is_alive, poll_every, serial_has_line, HostSpec, TestRepo, VmSpec, ACT_TIMEOUT, BOOT_TIMEOUT,
};

/// Feed for this long, then stop.
const FEED_SECONDS: u32 = 3;

/// A VM on the generic kernel whose guest stops feeding its watchdog.
fn hanging(action: &str, restart: &str) -> VmSpec {
    VmSpec::new()
        .no_disks()
        .generic_kernel()
        .restart(restart)
        .cmdline(&format!(
            "plasmavmc.watchdog={FEED_SECONDS} i6300esb.heartbeat=2"
        ))
        .health_line(&format!("watchdog = {action:?}"))
}

/// A repository with `vm` on one simulated host, and its daemon running it.
fn started(repo: &TestRepo, vm: &str, spec: &VmSpec) -> Result<()> {
    repo.write_host("hv1", &HostSpec::default())?;
    repo.write_vm(vm, spec)?;
    repo.commit(&format!("{vm}, its watchdog armed"))?;
    Ok(())
}

/// Waits until the guest says it stopped feeding; returns when the test saw it.
fn stopped_feeding(repo: &TestRepo, vm: &str) -> Result<Instant> {
    repo.wait_serial(vm, "watchdog: feeding", BOOT_TIMEOUT)?;
    printed(repo, vm, "watchdog: stopped feeding")
}

/// Waits until `vm`'s console has `line` (polled every 10 ms, a boot's bound); returns
/// when the test saw it.
fn printed(repo: &TestRepo, vm: &str, line: &str) -> Result<Instant> {
    poll_every(
        Duration::from_millis(10),
        format!("{vm}'s console to print {line:?}"),
        BOOT_TIMEOUT,
        || serial_has_line(&repo.serial(vm), line).then(Instant::now),
    )
}

/// Waits until QEMU `pid` has ended (polled every 5 ms); returns when the test saw it.
fn ended(pid: i32) -> Result<Instant> {
    poll_every(
        Duration::from_millis(5),
        format!("QEMU {pid} to end"),
        ACT_TIMEOUT,
        || (!is_alive(pid)).then(Instant::now),
    )
}

#[test]
fn watchdog_restart_replaces_the_qemu_even_under_restart_never() -> Result<()> {
    let repo = TestRepo::new()?;
    started(&repo, "hung", &hanging("restart", "never"))?;
    let daemon = repo.watch(&[])?;
    let first = daemon.wait_running("hung")?;
    ensure!(
        plasmavmc_e2e::cmdline(first)?
            .iter()
            .any(|a| a == "i6300esb"),
        "QEMU runs without the watchdog device"
    );
    let stopped = stopped_feeding(&repo, "hung")?;
    let ended = ended(first)?;
    let view = repo.wait_vm("hung", "running again in a new QEMU", ACT_TIMEOUT, |v| {
        v.phase == "running" && v.pid.is_some_and(|p| p != first)
    })?;
    let running = Instant::now();
    ensure!(
        view.has_event("exited", "watchdog") && view.has_event("watchdog", "restart"),
        "status does not tell the watchdog fired:\n{view}"
    );
    let second = view.pid.unwrap_or_default();
    ensure!(is_alive(second), "the new QEMU {second} is not alive");
    eprintln!(
        "watchdog restart: stopped feeding -> QEMU ended {:?}; -> running again (status) {:?}",
        ended - stopped,
        running - ended
    );
    ensure!(
        ended - stopped < Duration::from_secs(30),
        "detection too slow"
    );
    Ok(())
}

#[test]
fn watchdog_reset_resets_the_guest_in_the_same_qemu() -> Result<()> {
    let repo = TestRepo::new()?;
    started(&repo, "reset", &hanging("reset", "always"))?;
    let daemon = repo.watch(&[])?;
    let pid = daemon.wait_running("reset")?;
    let stopped = stopped_feeding(&repo, "reset")?;
    let view = repo.wait_vm("reset", "a watchdog reset counted", ACT_TIMEOUT, |v| {
        v.raw
            .get("health")
            .and_then(|h| h.get("watchdog_resets"))
            .and_then(toml::Value::as_integer)
            .is_some_and(|n| n >= 1)
            && v.has_event("watchdog", "reset")
    })?;
    let counted = Instant::now();
    ensure!(
        view.pid == Some(pid) && is_alive(pid),
        "a reset must keep the QEMU (pid {pid}):\n{view}"
    );
    ensure!(
        view.phase == "running" && view.restarts == 0,
        "a reset in place is no restart:\n{view}"
    );
    // The guest boots again on the same console.
    repo.wait_serial_seq(
        "reset",
        &[
            "watchdog: stopped feeding",
            "plasmavmc-guest: booted",
            "tick 1",
        ],
        BOOT_TIMEOUT,
    )?;
    eprintln!(
        "watchdog reset: stopped feeding -> reset counted in status {:?}",
        counted - stopped
    );
    Ok(())
}

#[test]
fn watchdog_poweroff_leaves_it_to_the_restart_policy() -> Result<()> {
    let repo = TestRepo::new()?;
    started(&repo, "off", &hanging("poweroff", "never"))?;
    let daemon = repo.watch(&[])?;
    let pid = daemon.wait_running("off")?;
    stopped_feeding(&repo, "off")?;
    let view = repo.wait_vm("off", "off after its watchdog fired", ACT_TIMEOUT, |v| {
        v.phase != "running" && v.message.contains("watchdog")
    })?;
    ensure!(
        !is_alive(pid) && view.pid.is_none() && view.restarts == 0,
        "restart = \"never\" keeps it off:\n{view}"
    );
    ensure!(
        view.message.contains("never"),
        "the status should say why it stays off:\n{view}"
    );
    Ok(())
}

#[test]
fn the_guest_agent_is_pinged_across_a_daemon_restart_until_it_stops_answering() -> Result<()> {
    let repo = TestRepo::new()?;
    let spec = VmSpec::new()
        .no_disks()
        .nic("user", None)
        .cmdline("plasmavmc.qga=25 plasmavmc.ip=10.0.2.15/24")
        .health_line("guest_agent = true")
        .health_line("guest_agent_period = \"500ms\"");
    started(&repo, "qga", &spec)?;
    let mut daemon = repo.watch(&[])?;
    let pid = daemon.wait_running("qga")?;
    let view = repo.wait_vm("qga", "its guest agent answering", ACT_TIMEOUT, |v| {
        v.health_flag("guest_agent", "answering") == Some(true)
    })?;
    let info = view.health("guest_agent").cloned().unwrap_or_default();
    let text = |k: &str| info.get(k).map(ToString::to_string).unwrap_or_default();
    ensure!(
        text("os").contains("PlasmaVMC test guest") && text("addresses").contains("10.0.2.15/24"),
        "the guest's OS and address are not in the status:\n{view}"
    );
    ensure!(
        view.has_event("guest-agent", "answers"),
        "no guest-agent event:\n{view}"
    );

    // A new daemon (and so a new agent on the host) adopts the VM and pings on.
    daemon.kill9()?;
    let daemon = repo.watch(&[])?;
    ensure!(daemon.wait_running("qga")? == pid, "the VM was restarted");
    let since = text("since");
    let stopped = printed(&repo, "qga", "qga: stopped answering")?;
    let view = repo.wait_vm("qga", "its guest agent silent", ACT_TIMEOUT, |v| {
        v.health_flag("guest_agent", "answering") == Some(false)
    })?;
    let noticed = Instant::now();
    ensure!(
        view.has_event("guest-agent", "stopped answering")
            && view.pid == Some(pid)
            && view.phase == "running",
        "a silent guest agent is shown, nothing restarted:\n{view}"
    );
    // The first daemon's record was kept, not re-announced: never two "answers" in a
    // row (a loaded machine may make it miss a ping and come back, which is news).
    let words: Vec<bool> = view
        .events_of("guest-agent")
        .map(|e| e.message.contains("answers"))
        .collect();
    ensure!(
        !words.windows(2).any(|w| w[0] && w[1]),
        "the adopted VM's guest agent was announced twice (answering since {since}):\n{view}"
    );
    eprintln!(
        "guest agent (period 500ms): stopped answering -> status {:?}",
        noticed - stopped
    );
    Ok(())
}

#[test]
fn tcp_readiness_flips_without_a_restart() -> Result<()> {
    let repo = TestRepo::new()?;
    let echo = plasmavmc_e2e::free_port()?;
    let spec = VmSpec::new()
        .no_disks()
        .nic("user", None)
        .forward(&format!("tcp:{echo}:7"))
        .cmdline("plasmavmc.ip=10.0.2.15/24 plasmavmc.echo=7 plasmavmc.echo_stop=12")
        .health_line("[health.readiness]")
        .health_line("kind = \"tcp\"\nport = 7\nperiod = \"500ms\"\ntimeout = \"500ms\"\nfailure_threshold = 2");
    started(&repo, "svc", &spec)?;
    let daemon = repo.watch(&[])?;
    let pid = daemon.wait_running("svc")?;
    // The event comes with the probe's word, the record of `ready` with a look: either
    // may be published first.
    repo.wait_vm("svc", "ready, with its event", BOOT_TIMEOUT, |v| {
        v.ready() == Some(true) && v.has_event("ready", "open")
    })?;
    let closed = printed(&repo, "svc", "net: echo closed")?;
    let view = repo.wait_vm("svc", "not ready, with its event", ACT_TIMEOUT, |v| {
        v.ready() == Some(false) && v.has_event("not-ready", "closed")
    })?;
    let noticed = Instant::now();
    ensure!(
        view.pid == Some(pid) && is_alive(pid) && view.restarts == 0 && view.phase == "running",
        "readiness restarts nothing:\n{view}"
    );
    eprintln!(
        "tcp readiness (period 500ms, timeout 500ms, threshold 2): port closed -> ready = false {:?}",
        noticed - closed
    );
    Ok(())
}

#[test]
fn a_failed_guest_agent_liveness_probe_replaces_the_qemu() -> Result<()> {
    let repo = TestRepo::new()?;
    let spec = VmSpec::new()
        .no_disks()
        .cmdline("plasmavmc.qga=8")
        .health_line("guest_agent = true")
        .health_line("[health.liveness]")
        .health_line(
            "kind = \"guest-agent\"\nperiod = \"1s\"\ntimeout = \"1s\"\nfailure_threshold = 3",
        );
    started(&repo, "live", &spec)?;
    let daemon = repo.watch(&[])?;
    let first = daemon.wait_running("live")?;
    let stopped = printed(&repo, "live", "qga: stopped answering")?;
    let ended = ended(first)?;
    let view = repo.wait_vm("live", "running again in a new QEMU", ACT_TIMEOUT, |v| {
        v.phase == "running" && v.pid.is_some_and(|p| p != first)
    })?;
    let running = Instant::now();
    ensure!(
        view.has_event("unhealthy", "liveness probe failed")
            && view.has_event("exited", "unhealthy"),
        "status does not tell why it was replaced:\n{view}"
    );
    eprintln!(
        "guest-agent liveness (period 1s, timeout 1s, threshold 3): stopped answering -> QEMU ended {:?}; -> running again (status) {:?}",
        ended - stopped,
        running - ended
    );
    Ok(())
}

#[test]
fn probes_keep_working_across_a_daemon_restart() -> Result<()> {
    let repo = TestRepo::new()?;
    let echo = plasmavmc_e2e::free_port()?;
    // The port closes 15 s after the echo server starts and the guest agent falls
    // silent 25 s after it starts: both after the restart below.
    let spec = VmSpec::new()
        .no_disks()
        .nic("user", None)
        .forward(&format!("tcp:{echo}:7"))
        .cmdline("plasmavmc.ip=10.0.2.15/24 plasmavmc.echo=7 plasmavmc.echo_stop=15 plasmavmc.qga=25")
        .health_line("guest_agent = true")
        .health_line("[health.liveness]")
        .health_line("kind = \"guest-agent\"\nperiod = \"1s\"\ntimeout = \"1s\"\nfailure_threshold = 3")
        .health_line("[health.readiness]")
        .health_line("kind = \"tcp\"\nport = 7\nperiod = \"500ms\"\ntimeout = \"500ms\"\nfailure_threshold = 2");
    started(&repo, "probed", &spec)?;
    let mut daemon = repo.watch(&[])?;
    let pid = daemon.wait_running("probed")?;
    repo.wait_vm("probed", "ready and alive", BOOT_TIMEOUT, |v| {
        v.ready() == Some(true) && v.health_flag("liveness", "ok") == Some(true)
    })?;

    // SIGTERM: the daemon (and the host's agent with it) ends, the VM runs on.
    daemon.signal(nix::sys::signal::Signal::SIGTERM)?;
    daemon.wait_exit(ACT_TIMEOUT)?;
    ensure!(is_alive(pid), "SIGTERM must leave the VM running");
    let daemon = repo.watch(&[])?;
    ensure!(
        daemon.wait_running("probed")? == pid,
        "the VM was restarted"
    );
    let serial = repo.serial("probed");
    ensure!(
        !serial_has_line(&serial, "net: echo closed")
            && !serial_has_line(&serial, "qga: stopped answering"),
        "the guest stopped before the new daemon adopted it (machine too slow for this test):\n{serial}"
    );

    // The readiness probe of the adopted VM sees the port close; nothing restarts.
    let closed = printed(&repo, "probed", "net: echo closed")?;
    let view = repo.wait_vm("probed", "not ready, with its event", ACT_TIMEOUT, |v| {
        v.ready() == Some(false) && v.has_event("not-ready", "closed")
    })?;
    let not_ready = Instant::now();
    ensure!(
        view.pid == Some(pid) && view.phase == "running" && view.restarts == 0,
        "readiness restarts nothing:\n{view}"
    );
    let last = view.health_text("readiness", "last");
    ensure!(
        last.contains("closed"),
        "the readiness record should say why:\n{view}"
    );

    // Its liveness probe sees the guest agent fall silent, and the QEMU is replaced.
    let silent = printed(&repo, "probed", "qga: stopped answering")?;
    let ended = ended(pid)?;
    // Both events: `exited: unhealthy` says the exit was recorded (and counted by the
    // restart policy) before the new QEMU started. A look used to find the QEMU gone
    // before its watcher recorded why, and the restart came first.
    repo.wait_vm(
        "probed",
        "running again in a new QEMU, the exit recorded",
        ACT_TIMEOUT,
        |v| {
            v.phase == "running"
                && v.pid.is_some_and(|p| p != pid)
                && v.has_event("unhealthy", "liveness probe failed")
                && v.has_event("exited", "unhealthy")
        },
    )?;
    eprintln!(
        "after a daemon restart: port closed -> ready = false {:?}; guest agent silent -> QEMU ended {:?}",
        not_ready - closed,
        ended - silent
    );
    Ok(())
}

#[test]
fn a_probe_that_hangs_is_bounded_by_its_timeout() -> Result<()> {
    let repo = TestRepo::new()?;
    let port = plasmavmc_e2e::free_port()?;
    // The guest has no IPv4 address: QEMU's user network accepts the probe's
    // connection on the host and never gets an answer from the guest, so the HTTP
    // request hangs unanswered.
    let spec = VmSpec::new()
        .no_disks()
        .nic("user", None)
        .forward(&format!("tcp:{port}:80"))
        .cmdline("plasmavmc.qga=0")
        .health_line("guest_agent = true")
        .health_line("guest_agent_period = \"500ms\"")
        .health_line("[health.readiness]")
        .health_line(
            "kind = \"http\"\nport = 80\npath = \"/\"\nperiod = \"1s\"\ntimeout = \"500ms\"",
        );
    started(&repo, "mute", &spec)?;
    let daemon = repo.watch(&[])?;
    let pid = daemon.wait_running("mute")?;
    let view = repo.wait_vm("mute", "its readiness probe timed out", ACT_TIMEOUT, |v| {
        v.ready() == Some(false)
    })?;
    let record = view.health("readiness").cloned().unwrap_or_default();
    let text = |k: &str| {
        record
            .get(k)
            .and_then(toml::Value::as_str)
            .unwrap_or_default()
    };
    ensure!(
        text("last").contains("no answer within 500ms"),
        "the hanging check should end at its timeout:\n{view}"
    );
    // The first check starts with the QEMU: its failure is recorded about one timeout
    // after the start event (which the daemon stamps a little after the agent began
    // probing), not at once (a refused or closed connection fails in milliseconds: this
    // request really hung) and not much later (nothing piled up).
    let at = |t: &str| humantime::parse_rfc3339_weak(t.trim_end_matches('Z'));
    let started = view
        .events_of("start")
        .last()
        .map(|e| e.at.clone())
        .unwrap_or_default();
    let took = at(text("since"))?.duration_since(at(&started)?)?;
    ensure!(
        (Duration::from_millis(300)..Duration::from_millis(2500)).contains(&took),
        "QEMU started at {started}, the probe's failure recorded {took:?} later:\n{view}"
    );
    // Nothing wedged: the agent's other checks go on, and a commit is carried out.
    repo.wait_vm("mute", "its guest agent answering", BOOT_TIMEOUT, |v| {
        v.health_flag("guest_agent", "answering") == Some(true)
    })?;
    repo.set_stop_timeout("2s")?;
    repo.write_vm("mute", &spec.clone().power("stopped"))?;
    repo.commit("mute stopped")?;
    repo.wait_vm("mute", "stopped", ACT_TIMEOUT, |v| v.phase == "stopped")?;
    ensure!(!is_alive(pid), "QEMU {pid} still runs");
    eprintln!("hanging http readiness (timeout 500ms): QEMU started -> failure recorded {took:?}");
    Ok(())
}
