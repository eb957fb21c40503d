//! The failure modes a drill runs, one function each, on a [`Sandbox`] with the daemon
//! running. Each returns what it measured; times are from the fault (or the step that
//! starts the row) to what the daemon logged (QMP-ready QEMU: its `started`, `adopted`
//! or `done` line) and to the first guest output seen by polling its console.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _, Result};

mod health;
mod host;
pub mod moves;
mod vm;

use super::console::{boot_count, last_tick};
use super::log::LogLine;
use super::ms;
use super::sandbox::{wait, Sandbox};

/// The VM most rows act on: `ha`, its disk on shared storage.
pub const APP: &str = "app";

/// Bound for any one step of a row.
const STEP: Duration = Duration::from_secs(120);

/// What one run of one row measured, in ms.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Sample {
    pub detection_ms: Option<f64>,
    pub running_ms: Option<f64>,
    pub guest_ms: Option<f64>,
    /// Copies of a VM seen at once (QEMU processes; a migration has two by design);
    /// `None` when they could not be sampled (hosts on other machines).
    pub most_copies: Option<usize>,
    /// True when the VM's disk was checked to keep its data (the guest's boot counter).
    pub data_checked: bool,
    /// An invariant that broke, if any.
    pub broken: Option<String>,
    pub note: String,
}

/// One row of the table, run on a `C` (the sandbox, or a real cluster).
pub struct Mode<C> {
    pub name: &'static str,
    pub automatic: &'static str,
    pub manual: &'static str,
    /// Copies allowed at once (2 while a live migration runs).
    pub copies_allowed: usize,
    pub run: fn(&mut C) -> Result<Sample>,
}

pub const MODES: [Mode<Sandbox>; 12] = [
    Mode {
        name: "engine crash (kill -9)",
        automatic: "yes (a service manager restarts the engine)",
        manual: "none",
        copies_allowed: 1,
        run: vm::engine_crash,
    },
    Mode {
        name: "QEMU crash (kill -9)",
        automatic: "yes",
        manual: "none",
        copies_allowed: 1,
        run: vm::qemu_crash,
    },
    Mode {
        name: "guest panic",
        automatic: "yes",
        manual: "none",
        copies_allowed: 1,
        run: vm::guest_panic,
    },
    Mode {
        name: "guest power-off (restart = always)",
        automatic: "yes",
        manual: "none",
        copies_allowed: 1,
        run: vm::guest_poweroff,
    },
    Mode {
        name: "host reboot (its QEMUs die while the engine is down)",
        automatic: "yes",
        manual: "none",
        copies_allowed: 1,
        run: host::host_reboot,
    },
    Mode {
        name: "host power-off, fence command",
        automatic: "yes",
        manual: "none",
        copies_allowed: 1,
        run: host::host_power_off,
    },
    Mode {
        name: "network partition, no fence command",
        automatic: "no: recovered after the operator's step",
        manual: "power the host off, `plasmavmc fence confirm HOST`",
        copies_allowed: 1,
        run: host::partition,
    },
    Mode {
        name: "live migration round trip",
        automatic: "yes (by commit)",
        manual: "commit `host = ...`",
        copies_allowed: 2,
        run: moves::live_round_trip,
    },
    Mode {
        name: "cold migration",
        automatic: "yes (by commit)",
        manual: "commit `host = ...`",
        copies_allowed: 1,
        run: moves::cold_move,
    },
    Mode {
        name: "guest hang (QEMU alive), watchdog",
        automatic: "yes",
        manual: "none",
        copies_allowed: 1,
        run: health::hang_watchdog,
    },
    Mode {
        name: "guest hang (QEMU alive), liveness probe",
        automatic: "yes",
        manual: "none",
        copies_allowed: 1,
        run: health::hang_liveness,
    },
    Mode {
        name: "guest service down (readiness probe)",
        automatic: "shown (`ready = false`); nothing restarted, by design",
        manual: "the service's own",
        copies_allowed: 1,
        run: health::service_down,
    },
];

/// Samples how many QEMUs `vm` has, every 10 ms, while `body` runs.
fn watching<T>(
    sb: &mut Sandbox,
    vm: &str,
    body: impl FnOnce(&mut Sandbox) -> Result<T>,
) -> Result<(T, usize)> {
    let root = sb.root().to_path_buf();
    sampling(sb, &|| super::sandbox::qemus_of(&root, vm).len(), body)
}

/// Runs `body` while sampling `count` (copies of a VM) every 10 ms; returns the most seen.
pub fn sampling<C, T>(
    ctx: &mut C,
    count: &(dyn Fn() -> usize + Sync),
    body: impl FnOnce(&mut C) -> Result<T>,
) -> Result<(T, usize)> {
    let stop = AtomicBool::new(false);
    let most = AtomicUsize::new(0);
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                most.fetch_max(count(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let r = body(ctx);
        stop.store(true, Ordering::Relaxed);
        r
    });
    Ok((result?, most.load(Ordering::Relaxed)))
}

/// The boot count the guest found on its disk at its last boot on `host`.
fn boots(sb: &Sandbox, host: &str, vm: &str) -> Option<u64> {
    let n = boot_count(&sb.serial(host, vm));
    sb.saw_boots(vm, n);
    n
}

/// The boot count `vm`'s guest last found on its disk, wherever it booted: the count
/// only grows, so it is the highest any console shows or the drill saw before (a live
/// move discards the console where the guest booted).
fn boots_anywhere(sb: &Sandbox, vm: &str) -> Option<u64> {
    for host in super::sandbox::HOSTS {
        boots(sb, host, vm);
    }
    sb.saw_boots(vm, None)
}

/// How far `vm`'s console on `host` has come: its last `tick N` (the test guest), or
/// its size in bytes (any other guest).
fn progress(sb: &Sandbox, host: &str, vm: &str) -> u64 {
    let serial = sb.serial(host, vm);
    if sb.guest.ticks() {
        last_tick(&serial).unwrap_or(0)
    } else {
        serial.len() as u64
    }
}

/// Waits until `vm`'s console on `host` shows the guest (after a restart: a new
/// console): a tick, or any output from a guest that does not count ticks.
fn first_tick(sb: &Sandbox, host: &str, vm: &str) -> Result<SystemTime> {
    tick_after(sb, host, vm, 0)
}

/// Waits until the console has come further than `after` (see [`progress`]).
fn tick_after(sb: &Sandbox, host: &str, vm: &str, after: u64) -> Result<SystemTime> {
    wait(
        &format!("{vm}'s console on {host} past {after}"),
        STEP,
        || progress(sb, host, vm) > after,
    )?;
    Ok(SystemTime::now())
}

/// Rows that need the test guest's kernel command line knobs (it panics, powers off,
/// hangs or closes its port on cue): they cannot run on an image.
pub fn needs_knobs(row: &str) -> bool {
    [
        "guest panic",
        "guest power-off",
        "guest hang",
        "guest service down",
    ]
    .iter()
    .any(|r| row.starts_with(r))
}

/// Rows that need the test guest's generic-kernel flavour (a watchdog driver).
pub fn needs_generic(row: &str) -> bool {
    row.ends_with("watchdog")
}

/// Commits `app` (pinned to `pin` when given).
fn write_app(sb: &Sandbox, pin: Option<&str>) -> Result<()> {
    let extra = match pin {
        Some(h) => format!("ha = true\nhost = {h:?}\n"),
        None => "ha = true\n".to_owned(),
    };
    sb.write("vms/app.toml", &sb.vm_toml(&extra, "", Some("shared")))
}

/// `app` running (created the first time), moved to `host` when given: pinned there
/// (a live move), then unpinned (placement is sticky). Returns where it runs.
pub fn app_on(sb: &mut Sandbox, host: Option<&str>) -> Result<String> {
    let now = sb.running_on(APP);
    if now.is_none() && sb.qemus_of(APP).is_empty() {
        write_app(sb, host)?;
        sb.commit("drill: app")?;
    } else if let Some(h) = host.filter(|h| now.as_deref() != Some(*h)) {
        write_app(sb, Some(h))?;
        sb.commit(&format!("drill: app to {h}"))?;
    }
    wait("app running where wanted", STEP, || {
        let on = sb.running_on(APP);
        on.is_some() && (host.is_none() || on.as_deref() == host) && sb.qemus_of(APP).len() == 1
    })?;
    let on = sb.running_on(APP).context("app runs nowhere")?;
    first_tick(sb, &on, APP)?;
    if host.is_some() {
        write_app(sb, None)?;
        sb.commit("drill: app unpinned")?;
    }
    Ok(on)
}

/// Removes `vm`'s file in a commit of its own and waits until none of its QEMUs is left.
fn removed(sb: &Sandbox, vm: &str) -> Result<()> {
    sb.remove(&format!("vms/{vm}.toml"))?;
    sb.commit(&format!("drill: {vm} removed"))?;
    wait(&format!("{vm} removed"), STEP, || {
        sb.qemus_of(vm).is_empty()
    })
}

fn the_pid(sb: &Sandbox, vm: &str) -> Result<(String, i32)> {
    match sb.qemus_of(vm).as_slice() {
        [one] => Ok(one.clone()),
        other => bail!("{vm} should have one QEMU, has {other:?}"),
    }
}

fn find_after(
    sb: &Sandbox,
    what: &str,
    since: usize,
    pred: impl FnMut(&LogLine) -> bool,
) -> Result<LogLine> {
    sb.wait_log(what, STEP, since, pred)
}
