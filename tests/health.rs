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
//!   the VM `unhealthy`, and its QEMU is replaced.
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
    poll_every(
        Duration::from_millis(10),
        "the guest to stop feeding its watchdog",
        BOOT_TIMEOUT,
        || serial_has_line(&repo.serial(vm), "watchdog: stopped feeding").then(Instant::now),
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
    let ended = poll_every(
        Duration::from_millis(5),
        "the QEMU whose watchdog fired to end",
        ACT_TIMEOUT,
        || (!is_alive(first)).then(Instant::now),
    )?;
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
        health(v)
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

/// The `[health]` table of a VM's status.
fn health(view: &plasmavmc_e2e::VmView) -> Option<&toml::Table> {
    view.raw.get("health").and_then(toml::Value::as_table)
}

/// The `[health.guest_agent]` table of a VM's status.
fn guest_agent(view: &plasmavmc_e2e::VmView) -> Option<&toml::Table> {
    health(view)
        .and_then(|h| h.get("guest_agent"))
        .and_then(toml::Value::as_table)
}

fn answering(view: &plasmavmc_e2e::VmView) -> Option<bool> {
    guest_agent(view)
        .and_then(|g| g.get("answering"))
        .and_then(toml::Value::as_bool)
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
        answering(v) == Some(true)
    })?;
    let info = guest_agent(&view).cloned().unwrap_or_default();
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
    let stopped = poll_every(
        Duration::from_millis(10),
        "the test guest's agent to stop answering",
        BOOT_TIMEOUT,
        || serial_has_line(&repo.serial("qga"), "qga: stopped answering").then(Instant::now),
    )?;
    let view = repo.wait_vm("qga", "its guest agent silent", ACT_TIMEOUT, |v| {
        answering(v) == Some(false)
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

/// `[health] ready` of a VM's status.
fn ready(view: &plasmavmc_e2e::VmView) -> Option<bool> {
    health(view)
        .and_then(|h| h.get("ready"))
        .and_then(toml::Value::as_bool)
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
    let view = repo.wait_vm("svc", "ready", BOOT_TIMEOUT, |v| ready(v) == Some(true))?;
    ensure!(view.has_event("ready", "open"), "no ready event:\n{view}");
    let closed = poll_every(
        Duration::from_millis(10),
        "the echo port to close",
        BOOT_TIMEOUT,
        || serial_has_line(&repo.serial("svc"), "net: echo closed").then(Instant::now),
    )?;
    let view = repo.wait_vm("svc", "not ready", ACT_TIMEOUT, |v| ready(v) == Some(false))?;
    let noticed = Instant::now();
    ensure!(
        view.pid == Some(pid) && is_alive(pid) && view.restarts == 0 && view.phase == "running",
        "readiness restarts nothing:\n{view}"
    );
    ensure!(
        view.has_event("not-ready", "closed"),
        "no not-ready event:\n{view}"
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
        .health_line("kind = \"guest-agent\"\nperiod = \"500ms\"\ntimeout = \"400ms\"\nfailure_threshold = 2");
    started(&repo, "live", &spec)?;
    let daemon = repo.watch(&[])?;
    let first = daemon.wait_running("live")?;
    let stopped = poll_every(
        Duration::from_millis(10),
        "the test guest's agent to stop answering",
        BOOT_TIMEOUT,
        || serial_has_line(&repo.serial("live"), "qga: stopped answering").then(Instant::now),
    )?;
    let ended = poll_every(
        Duration::from_millis(5),
        "the unhealthy QEMU to end",
        ACT_TIMEOUT,
        || (!is_alive(first)).then(Instant::now),
    )?;
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
        "guest-agent liveness (period 500ms, timeout 400ms, threshold 2): stopped answering -> QEMU ended {:?}; -> running again (status) {:?}",
        ended - stopped,
        running - ended
    );
    Ok(())
}
