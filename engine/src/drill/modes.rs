//! The failure modes a drill runs, one function each, on a [`Sandbox`] with the daemon
//! running. Each returns what it measured; times are from the fault (or the step that
//! starts the row) to what the daemon logged (QMP-ready QEMU: its `started`, `adopted`
//! or `done` line) and to the first guest output seen by polling its console.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::sandbox::{wait, LogLine, Sandbox, HOSTS};

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
    /// Copies of a VM seen at once (QEMU processes; a migration has two by design).
    pub most_copies: usize,
    /// An invariant that broke, if any.
    pub broken: Option<String>,
    pub note: String,
}

/// One row of the table.
pub struct Mode {
    pub name: &'static str,
    pub automatic: &'static str,
    pub manual: &'static str,
    /// Copies allowed at once (2 while a live migration runs).
    pub copies_allowed: usize,
    pub run: fn(&mut Sandbox) -> Result<Sample>,
}

pub const MODES: [Mode; 9] = [
    Mode {
        name: "engine crash (kill -9)",
        automatic: "yes (a service manager restarts the engine)",
        manual: "none",
        copies_allowed: 1,
        run: engine_crash,
    },
    Mode {
        name: "QEMU crash (kill -9)",
        automatic: "yes",
        manual: "none",
        copies_allowed: 1,
        run: qemu_crash,
    },
    Mode {
        name: "guest panic",
        automatic: "yes",
        manual: "none",
        copies_allowed: 1,
        run: guest_panic,
    },
    Mode {
        name: "guest power-off (restart = always)",
        automatic: "yes",
        manual: "none",
        copies_allowed: 1,
        run: guest_poweroff,
    },
    Mode {
        name: "host reboot (its QEMUs die while the engine is down)",
        automatic: "yes",
        manual: "none",
        copies_allowed: 1,
        run: host_reboot,
    },
    Mode {
        name: "host power-off, fence command",
        automatic: "yes",
        manual: "none",
        copies_allowed: 1,
        run: host_power_off,
    },
    Mode {
        name: "network partition, no fence command",
        automatic: "no: recovered after the operator's step",
        manual: "power the host off, `plasmavmc fence confirm HOST`",
        copies_allowed: 1,
        run: partition,
    },
    Mode {
        name: "live migration round trip",
        automatic: "yes (by commit)",
        manual: "commit `host = ...`",
        copies_allowed: 2,
        run: live_round_trip,
    },
    Mode {
        name: "cold migration",
        automatic: "yes (by commit)",
        manual: "commit `host = ...`",
        copies_allowed: 1,
        run: cold_move,
    },
];

fn ms(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Samples how many QEMUs `vm` has, every 10 ms, while `body` runs.
fn watching<T>(
    sb: &mut Sandbox,
    vm: &str,
    body: impl FnOnce(&mut Sandbox) -> Result<T>,
) -> Result<(T, usize)> {
    let stop = AtomicBool::new(false);
    let most = AtomicUsize::new(0);
    let root = sb.root().to_path_buf();
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let n = super::sandbox::qemus_of(&root, vm).len();
                most.fetch_max(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let r = body(sb);
        stop.store(true, Ordering::Relaxed);
        r
    });
    Ok((result?, most.load(Ordering::Relaxed)))
}

/// The boot count the guest found on its disk at its last boot on `host`.
fn boots(sb: &Sandbox, host: &str, vm: &str) -> Option<u64> {
    sb.serial(host, vm)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("disk: boots="))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
}

/// Waits until `vm`'s console on `host` shows a tick (after a restart: a new console).
fn first_tick(sb: &Sandbox, host: &str, vm: &str) -> Result<SystemTime> {
    wait(&format!("{vm} ticking on {host}"), STEP, || {
        sb.serial(host, vm).contains("tick ")
    })?;
    Ok(SystemTime::now())
}

/// Waits until the console shows a tick later than `after`.
fn tick_after(sb: &Sandbox, host: &str, vm: &str, after: u64) -> Result<SystemTime> {
    wait(
        &format!("{vm} ticking past {after} on {host}"),
        STEP,
        || last_tick(&sb.serial(host, vm)).is_some_and(|t| t > after),
    )?;
    Ok(SystemTime::now())
}

fn last_tick(serial: &str) -> Option<u64> {
    serial
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tick ")?.parse().ok())
        .next_back()
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

fn engine_crash(sb: &mut Sandbox) -> Result<Sample> {
    let host = app_on(sb, None)?;
    let (_, pid) = the_pid(sb, APP)?;
    let before = last_tick(&sb.serial(&host, APP)).unwrap_or(0);
    let ((adopted, t0), most) = watching(sb, APP, |sb| {
        let t0 = SystemTime::now();
        sb.kill_watch();
        sb.start_watch()?;
        let adopted = find_after(sb, "app adopted", 0, |l| l.is("adopted", Some(APP)))?;
        Ok((adopted, t0))
    })?;
    let guest = tick_after(sb, &host, APP, before)?;
    let (_, after) = the_pid(sb, APP)?;
    Ok(Sample {
        detection_ms: None,
        running_ms: Some(ms(t0, adopted.at)),
        guest_ms: Some(ms(t0, guest)),
        most_copies: most,
        broken: (after != pid).then(|| format!("app was restarted (pid {pid} -> {after})")),
        note: "the VM never stopped; a new engine adopted the same QEMU".to_owned(),
    })
}

/// Kills `vm`'s QEMU (or waits for the guest to end it, `by_guest`) and measures until
/// it runs again where it was, checking its disk kept its data when it has one.
fn exit_and_restart(sb: &mut Sandbox, vm: &str, by_guest: bool) -> Result<Sample> {
    let (host, pid) = the_pid(sb, vm)?;
    let boots_before = boots(sb, &host, vm);
    let since = sb.log().len();
    let ((t0, exited, started), most) = watching(sb, vm, |sb| {
        let t0 = if by_guest {
            wait("the guest to end its QEMU", STEP, || {
                super::sandbox::is_zombie(pid)
            })?;
            SystemTime::now()
        } else {
            let t0 = SystemTime::now();
            kill(Pid::from_raw(pid), Signal::SIGKILL)?;
            t0
        };
        let exited = find_after(sb, "the exit seen", since, |l| l.is("vm exited", Some(vm)))?;
        let started = find_after(sb, "a new QEMU", since, |l| {
            l.is("started", Some(vm)) && l.fields["pid"].as_i64() != Some(i64::from(pid))
        })?;
        Ok((t0, exited, started))
    })?;
    let guest = first_tick(sb, &host, vm)?;
    let lost = match (boots_before, boots(sb, &host, vm)) {
        (Some(b), Some(a)) if a <= b => {
            Some(format!("{vm}'s disk lost its data: boots {b} -> {a}"))
        }
        _ => None,
    };
    Ok(Sample {
        detection_ms: Some(ms(t0, exited.at)),
        running_ms: Some(ms(t0, started.at)),
        guest_ms: Some(ms(t0, guest)),
        most_copies: most,
        broken: lost,
        note: format!("exit reason {}", exited.str("reason").unwrap_or("?")),
    })
}

fn qemu_crash(sb: &mut Sandbox) -> Result<Sample> {
    app_on(sb, None)?;
    exit_and_restart(sb, APP, false)
}

/// A VM whose guest ends itself after a few seconds (`knob`), measured once, removed.
fn self_ending(sb: &mut Sandbox, vm: &str, knob: &str) -> Result<Sample> {
    sb.write(&format!("vms/{vm}.toml"), &sb.vm_toml("", knob, None))?;
    sb.commit(&format!("drill: {vm}"))?;
    wait(&format!("{vm} running"), STEP, || {
        sb.qemus_of(vm).len() == 1
    })?;
    let sample = exit_and_restart(sb, vm, true);
    sb.remove(&format!("vms/{vm}.toml"))?;
    sb.commit(&format!("drill: {vm} removed"))?;
    wait(&format!("{vm} removed"), STEP, || {
        sb.qemus_of(vm).is_empty()
    })?;
    sample
}

fn guest_panic(sb: &mut Sandbox) -> Result<Sample> {
    self_ending(sb, "panicky", "plasmavmc.panic=15")
}

fn guest_poweroff(sb: &mut Sandbox) -> Result<Sample> {
    self_ending(sb, "quitter", "plasmavmc.poweroff=15")
}

fn host_reboot(sb: &mut Sandbox) -> Result<Sample> {
    let host = app_on(sb, Some("hv2"))?;
    let boots_before = boots(sb, &host, APP);
    sb.kill_watch();
    for pid in sb.host_qemus(&host) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    wait("the host's QEMUs to die", STEP, || {
        sb.host_qemus(&host).is_empty()
    })?;
    let ((t0, seen, started), most) = watching(sb, APP, |sb| {
        let t0 = sb.start_watch()?;
        let seen = find_after(sb, "a reconcile", 0, |l| l.is("reconcile", None))?;
        let started = find_after(sb, "app started again", 0, |l| l.is("started", Some(APP)))?;
        Ok((t0, seen, started))
    })?;
    let guest = first_tick(sb, &host, APP)?;
    let lost = match (boots_before, boots(sb, &host, APP)) {
        (Some(b), Some(a)) if a <= b => Some(format!("app's disk lost its data: boots {b} -> {a}")),
        _ => None,
    };
    Ok(Sample {
        detection_ms: Some(ms(t0, seen.at)),
        running_ms: Some(ms(t0, started.at)),
        guest_ms: Some(ms(t0, guest)),
        most_copies: most,
        broken: lost,
        note: "times from the engine's start after the reboot".to_owned(),
    })
}

/// Where app runs after a recovery, once its status says so.
fn recovered(sb: &Sandbox, lost: &str) -> Result<String> {
    let mut on = None;
    wait("app running on another host", STEP, || {
        on = sb.running_on(APP).filter(|h| h != lost);
        on.is_some()
    })?;
    Ok(on.expect("checked"))
}

/// Powers `host` on again and waits until the daemon has it back.
fn rejoin(sb: &Sandbox, host: &str) -> Result<()> {
    let since = sb.log().len();
    sb.power_on(host);
    find_after(sb, "the host back", since, |l| {
        l.is("connected to the agent", None) && l.str("host") == Some(host)
    })?;
    Ok(())
}

fn host_power_off(sb: &mut Sandbox) -> Result<Sample> {
    let host = app_on(sb, Some("hv1"))?;
    let boots_before = boots(sb, &host, APP);
    let since = sb.log().len();
    let ((t0, lost, started, to), most) = watching(sb, APP, |sb| {
        let t0 = SystemTime::now();
        sb.power_off(&host)?;
        let lost = find_after(sb, "the host lost", since, |l| {
            l.str("host") == Some(host.as_str())
                && matches!(l.message(), "agent channel closed" | "host unreachable")
        })?;
        let started = find_after(sb, "app started elsewhere", since, |l| {
            l.is("started", Some(APP))
        })?;
        let to = recovered(sb, &host)?;
        Ok((t0, lost, started, to))
    })?;
    let guest = first_tick(sb, &to, APP)?;
    let fenced = sb
        .log()
        .into_iter()
        .skip(since)
        .find(|l| l.is("fenced", None) && l.str("host") == Some(host.as_str()));
    let data = match (boots_before, boots(sb, &to, APP)) {
        (Some(b), Some(a)) if a <= b => Some(format!("app's disk lost its data: boots {b} -> {a}")),
        _ => None,
    };
    rejoin(sb, &host)?;
    Ok(Sample {
        detection_ms: Some(ms(t0, lost.at)),
        running_ms: Some(ms(t0, started.at)),
        guest_ms: Some(ms(t0, guest)),
        most_copies: most,
        broken: data,
        note: format!(
            "{host} fenced at {} ms; app recovered on {to}",
            fenced.map_or_else(|| "?".to_owned(), |f| format!("{:.0}", ms(t0, f.at)))
        ),
    })
}

fn partition(sb: &mut Sandbox) -> Result<Sample> {
    let host = app_on(sb, Some("hv3"))?;
    let since = sb.log().len();
    let ((t0, unknown, confirmed, started, to), most) = watching(sb, APP, |sb| {
        let t0 = SystemTime::now();
        sb.partition(&host)?;
        wait("app unknown", STEP, || {
            sb.vm_status(APP)
                .and_then(|s| s.get("phase")?.as_str().map(|p| p == "unknown"))
                .unwrap_or(false)
        })?;
        let unknown = SystemTime::now();
        // Nothing may start elsewhere before the operator acts.
        if sb.qemus_of(APP).iter().any(|(h, _)| *h != host) {
            bail!("app was started elsewhere before the partitioned host was fenced");
        }
        // The operator powers the host off, then says so.
        sb.power_off(&host)?;
        let confirmed = SystemTime::now();
        sb.fence_confirm(&host)?;
        let started = find_after(sb, "app started elsewhere", since, |l| {
            l.is("started", Some(APP))
        })?;
        let to = recovered(sb, &host)?;
        Ok((t0, unknown, confirmed, started, to))
    })?;
    let guest = first_tick(sb, &to, APP)?;
    rejoin(sb, &host)?;
    Ok(Sample {
        detection_ms: Some(ms(t0, unknown)),
        running_ms: Some(ms(confirmed, started.at)),
        guest_ms: Some(ms(confirmed, guest)),
        most_copies: most,
        broken: None,
        note: format!("recovery times from `fence confirm`; app recovered on {to}"),
    })
}

/// Commits `app` pinned to `to` and waits for the move; returns its `done` line.
fn move_app(sb: &mut Sandbox, to: &str) -> Result<LogLine> {
    let since = sb.log().len();
    write_app(sb, Some(to))?;
    sb.commit(&format!("drill: app to {to}"))?;
    find_after(sb, "the move done", since, |l| {
        l.is("done", Some(APP)) && l.str("op") == Some("migrate")
    })
}

/// `downtime N ms` of a migrate step's detail.
fn downtime(line: &LogLine) -> Option<f64> {
    let detail = line.str("detail")?;
    let rest = &detail[detail.find("downtime ")? + 9..];
    rest.split(' ').next()?.parse().ok()
}

fn live_round_trip(sb: &mut Sandbox) -> Result<Sample> {
    let home = app_on(sb, None)?;
    let away = HOSTS
        .iter()
        .find(|h| **h != home)
        .copied()
        .unwrap_or("hv2")
        .to_owned();
    let (_, pid) = the_pid(sb, APP)?;
    let before = last_tick(&sb.serial(&home, APP)).unwrap_or(0);
    let ((t0, there, back), most) = watching(sb, APP, |sb| {
        let t0 = SystemTime::now();
        let there = move_app(sb, &away)?;
        let back = move_app(sb, &home)?;
        Ok((t0, there, back))
    })?;
    write_app(sb, None)?;
    sb.commit("drill: app unpinned")?;
    let guest = tick_after(sb, &home, APP, 0)?;
    let first = sb
        .serial(&home, APP)
        .lines()
        .find_map(|l| l.trim().strip_prefix("tick ")?.parse::<u64>().ok());
    let rebooted = first.is_some_and(|t| t <= before) || sb.serial(&home, APP).contains("booted");
    let (_, now) = the_pid(sb, APP)?;
    let worst = downtime(&there)
        .unwrap_or(0.0)
        .max(downtime(&back).unwrap_or(0.0));
    Ok(Sample {
        detection_ms: None,
        running_ms: Some(worst),
        guest_ms: Some(ms(t0, guest)),
        most_copies: most,
        broken: (rebooted || now == pid).then(|| "the guest rebooted instead of moving".to_owned()),
        note: format!(
            "{home} -> {away} -> {home}; running again = worst downtime; legs {:.0} / {:.0} ms from commit",
            ms(t0, there.at),
            ms(there.at, back.at)
        ),
    })
}

fn cold_move(sb: &mut Sandbox) -> Result<Sample> {
    let spec = |sb: &Sandbox, host: &str| {
        sb.vm_toml(
            &format!("migration = \"cold\"\nhost = {host:?}\n"),
            "",
            Some("local"),
        )
    };
    sb.write("vms/cold.toml", &spec(sb, "hv1"))?;
    sb.commit("drill: cold on hv1")?;
    wait("cold running on hv1, its disk counted", STEP, || {
        boots(sb, "hv1", "cold").is_some()
    })?;
    let before = boots(sb, "hv1", "cold");
    let since = sb.log().len();
    let ((t0, done), most) = watching(sb, "cold", |sb| {
        sb.write("vms/cold.toml", &spec(sb, "hv2"))?;
        let t0 = SystemTime::now();
        sb.commit("drill: cold to hv2")?;
        let done = find_after(sb, "the cold move done", since, |l| {
            l.is("done", Some("cold")) && l.str("op") == Some("migrate")
        })?;
        Ok((t0, done))
    })?;
    wait("cold booted on hv2", STEP, || {
        boots(sb, "hv2", "cold").is_some()
    })?;
    let guest = SystemTime::now();
    let after = boots(sb, "hv2", "cold");
    sb.remove("vms/cold.toml")?;
    sb.commit("drill: cold removed")?;
    wait("cold removed", STEP, || sb.qemus_of("cold").is_empty())?;
    Ok(Sample {
        detection_ms: None,
        running_ms: Some(ms(t0, done.at)),
        guest_ms: Some(ms(t0, guest)),
        most_copies: most,
        broken: match (before, after) {
            (Some(b), Some(a)) if a > b => None,
            other => Some(format!("the disk did not arrive whole: boots {other:?}")),
        },
        note: "local disk copied through the agents; times from the commit".to_owned(),
    })
}
