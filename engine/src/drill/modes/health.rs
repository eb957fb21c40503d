//! Rows about a guest that stops working while its QEMU runs on (`[health]`): a hang
//! the watchdog or a guest-agent liveness probe catches (the QEMU is replaced), and a
//! service that goes down (a readiness probe shows it; nothing is restarted).
//!
//! The test guest stages each with a knob of its kernel command line and says on its
//! console when it stopped (`plasmavmc.watchdog=N`: `watchdog: stopped feeding`;
//! `plasmavmc.qga=N`: `qga: stopped answering`; `plasmavmc.echo_stop=N`: `net: echo
//! closed`); times are from the moment the drill sees that line (polled every 20 ms).
//! Each row's VM is made for the run and removed after it.

use std::time::SystemTime;

use anyhow::{Context as _, Result};

use super::{find_after, first_tick, ms, removed, the_pid, watching, Sample, STEP};
use crate::drill::sandbox::{wait, Sandbox};

/// The i6300esb driver's heartbeat (`i6300esb.heartbeat`): Linux gives each of the
/// device's two stages half of it, so it fires 2 s after the guest's last feed (which
/// is 0.5 s before its console says it stopped: it feeds twice a second).
const HEARTBEAT_S: u64 = 2;

/// The probes' settings: `period`, `timeout`, `failure_threshold`.
const PERIOD: &str = "500ms";
const TIMEOUT: &str = "400ms";
const THRESHOLD: u32 = 2;

/// How long the guest feeds its watchdog, answers its guest agent, or serves its port
/// before it stops: long enough to boot and be seen healthy first.
const HEALTHY_S: u64 = 8;

/// `[health] watchdog = "restart"`, the guest stops feeding: the QEMU is replaced.
pub(super) fn hang_watchdog(sb: &mut Sandbox) -> Result<Sample> {
    let guest = sb
        .guest
        .generic()
        .context("needs the test guest's generic flavour (tests/guest/build.sh)")?;
    let vm = "hangdog";
    let text = sb.vm_toml_booting(
        &guest,
        "[health]\nwatchdog = \"restart\"\n",
        &format!("plasmavmc.watchdog={HEALTHY_S} i6300esb.heartbeat={HEARTBEAT_S}"),
    );
    let settings = format!(
        "watchdog = \"restart\", i6300esb heartbeat {HEARTBEAT_S} s (the device fires {HEARTBEAT_S} s after the last feed, 0.5 s before the console's `stopped feeding`)"
    );
    staged(sb, vm, &text, |sb, host, pid| {
        replaced(
            sb,
            vm,
            host,
            pid,
            "watchdog: stopped feeding",
            &settings,
            |sb, since| {
                find_after(sb, "the watchdog fired", since, |l| {
                    l.is("watchdog fired", Some(vm))
                })?
                .timestamp()
            },
        )
    })
}

/// A guest-agent liveness probe, the guest agent stops answering: the VM is unhealthy
/// and its QEMU replaced.
pub(super) fn hang_liveness(sb: &mut Sandbox) -> Result<Sample> {
    let vm = "hangprobe";
    let text = sb.vm_toml(
        &format!(
            "[health]\nguest_agent = true\n[health.liveness]\nkind = \"guest-agent\"\n{}",
            probe_settings()
        ),
        &format!("plasmavmc.qga={HEALTHY_S}"),
        None,
    );
    let settings = format!(
        "guest-agent liveness probe, period {PERIOD}, timeout {TIMEOUT}, failure_threshold {THRESHOLD}"
    );
    staged(sb, vm, &text, |sb, host, pid| {
        replaced(
            sb,
            vm,
            host,
            pid,
            "qga: stopped answering",
            &settings,
            |sb, _| event_at(sb, vm, "unhealthy"),
        )
    })
}

/// A `tcp` readiness probe, the guest's service closes its port: `ready = false`, and
/// the same QEMU runs on.
pub(super) fn service_down(sb: &mut Sandbox) -> Result<Sample> {
    let vm = "service";
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let text = sb.vm_toml(
        &format!(
            "[[nics]]\nnetwork = \"user\"\nforward = [\"tcp:{port}:7\"]\n\n[health.readiness]\nkind = \"tcp\"\nport = 7\n{}",
            probe_settings()
        ),
        &format!("plasmavmc.ip=10.0.2.15/24 plasmavmc.echo=7 plasmavmc.echo_stop={HEALTHY_S}"),
        None,
    );
    staged(sb, vm, &text, |sb, host, pid| {
        wait(&format!("{vm} ready"), STEP, || {
            sb.vm_status(vm)
                .is_some_and(|s| s.health.ready == Some(true))
        })?;
        let t0 = console_says(sb, host, vm, "net: echo closed")?;
        let detected = event_at(sb, vm, "not-ready")?;
        let status = sb.vm_status(vm).context("no status")?;
        let now = sb.qemus_of(vm);
        let kept = now == [(host.to_owned(), pid)]
            && status.pid == Some(pid.unsigned_abs())
            && status.restarts == 0;
        Ok(Sample {
            detection_ms: Some(ms(t0, detected)),
            running_ms: None,
            guest_ms: None,
            most_copies: Some(now.len()),
            data_checked: false,
            broken: (!kept).then(|| {
                format!(
                    "readiness restarted {vm}: QEMU {pid} -> {now:?}, {} restarts",
                    status.restarts
                )
            }),
            note: format!(
                "tcp readiness probe, period {PERIOD}, timeout {TIMEOUT}, failure_threshold {THRESHOLD}; `ready = false`, the same QEMU (pid {pid}) runs on"
            ),
        })
    })
}

fn probe_settings() -> String {
    format!("period = {PERIOD:?}\ntimeout = {TIMEOUT:?}\nfailure_threshold = {THRESHOLD}\n")
}

/// Commits `vm` as `text`, waits until it runs, measures with `body` (given its host and
/// QEMU), and removes it whatever `body` returned.
fn staged(
    sb: &mut Sandbox,
    vm: &str,
    text: &str,
    body: impl FnOnce(&mut Sandbox, &str, i32) -> Result<Sample>,
) -> Result<Sample> {
    sb.write(&format!("vms/{vm}.toml"), text)?;
    sb.commit(&format!("drill: {vm}"))?;
    let sample = match running(sb, vm) {
        Ok((host, pid)) => body(sb, &host, pid),
        Err(e) => Err(e),
    };
    removed(sb, vm)?;
    sample
}

/// Where `vm` runs, and its QEMU, once its status says so.
fn running(sb: &Sandbox, vm: &str) -> Result<(String, i32)> {
    wait(&format!("{vm} running"), STEP, || {
        sb.running_on(vm).is_some() && sb.qemus_of(vm).len() == 1
    })?;
    the_pid(sb, vm)
}

/// Waits until `vm`'s console on `host` has `line`; returns when the drill saw it.
fn console_says(sb: &Sandbox, host: &str, vm: &str, line: &str) -> Result<SystemTime> {
    wait(&format!("{vm}'s console to say {line:?}"), STEP, || {
        sb.serial(host, vm).contains(line)
    })?;
    Ok(SystemTime::now())
}

/// When the daemon recorded `vm`'s last event of `kind`, once its status has one.
fn event_at(sb: &Sandbox, vm: &str, kind: &str) -> Result<SystemTime> {
    let mut at = None;
    wait(&format!("a {kind} event of {vm}"), STEP, || {
        at = sb.vm_status(vm).and_then(|s| {
            s.events
                .iter()
                .rev()
                .find(|e| e.kind == kind)
                .and_then(|e| crate::time::parse(&e.at))
        });
        at.is_some()
    })?;
    at.context("checked")
}

/// Measures a hung guest's recovery: from the console's `stopped` line to the detection
/// (`detected`, given the log index before the hang) and to a new QEMU's start, then
/// to the new guest's first output.
fn replaced(
    sb: &mut Sandbox,
    vm: &str,
    host: &str,
    pid: i32,
    stopped: &str,
    settings: &str,
    detected: impl FnOnce(&Sandbox, usize) -> Result<SystemTime>,
) -> Result<Sample> {
    let since = sb.log().len();
    let ((t0, detected, exited, started), most) = watching(sb, vm, |sb| {
        let t0 = console_says(sb, host, vm, stopped)?;
        let detected = detected(sb, since)?;
        let exited = find_after(sb, "the hung QEMU's exit", since, |l| {
            l.is("vm exited", Some(vm))
        })?;
        let started = find_after(sb, "a new QEMU", since, |l| {
            l.is("started", Some(vm)) && l.int("pid") != Some(i64::from(pid))
        })?;
        Ok((t0, detected, exited, started.timestamp()?))
    })?;
    let guest = first_tick(sb, host, vm)?;
    Ok(Sample {
        detection_ms: Some(ms(t0, detected)),
        running_ms: Some(ms(t0, started)),
        guest_ms: Some(ms(t0, guest)),
        most_copies: Some(most),
        data_checked: false,
        broken: None,
        note: format!(
            "{settings}; exit reason {}; running again {:.0} ms after detection",
            exited.str("reason").unwrap_or("?"),
            ms(detected, started)
        ),
    })
}
