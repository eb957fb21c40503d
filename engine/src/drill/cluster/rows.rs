//! The rows a real cluster's designated VM goes through. Each starts from the VM running
//! and measures from the fault (the daemon's answer says when it struck) to the events
//! the daemon writes in the VM's status.

use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use plasmavmc_specs::MigrationPolicy;

use super::{ms, poll_until, Cluster, STEP};
use crate::drill::modes::moves::downtime_in;
use crate::drill::modes::{sampling, Mode, Sample};
use crate::wire::Fault;

pub const ROWS: [Mode<Cluster>; 4] = [
    Mode {
        name: "QEMU crash (kill -9)",
        automatic: "yes",
        manual: "none",
        copies_allowed: 1,
        run: qemu_crash,
    },
    Mode {
        name: "guest panic (NMI)",
        automatic: "yes",
        manual: "none",
        copies_allowed: 1,
        run: guest_panic,
    },
    Mode {
        name: "engine crash (kill -9)",
        automatic: "yes (its service manager restarts the engine)",
        manual: "none",
        copies_allowed: 1,
        run: engine_crash,
    },
    Mode {
        name: "live migration round trip",
        automatic: "yes (by commit)",
        manual: "commit `host = ...`",
        copies_allowed: 2,
        run: round_trip,
    },
];

/// True for the rows that end the VM's QEMU (they count against its restart policy).
pub fn ends_qemu(row: &str) -> bool {
    row.starts_with("QEMU crash") || row.starts_with("guest panic")
}

/// Why a row cannot run on this cluster, decided before anything is touched.
pub fn refusal(c: &Cluster, row: &str, daemon: i32) -> Option<String> {
    match row {
        r if r.starts_with("engine crash") => {
            (!c.cfg.supervised && !under_systemd(daemon)).then(|| format!(
                "the daemon (pid {daemon}) was not started by systemd, so nothing would start it again after a kill -9; run it as a service (examples/systemd) or pass --supervised if another service manager restarts it"
            ))
        }
        r if r.starts_with("live migration") => {
            if c.spec.migration != MigrationPolicy::Live {
                return Some(format!("{} has migration = {:?}, not live", c.vm, c.spec.migration));
            }
            let home = c.status().and_then(|s| s.host);
            if c.cfg.to.is_none() && c.ready_hosts().iter().all(|h| Some(h) == home.as_ref()) {
                return Some("no other ready host to move it to".to_owned());
            }
            match c.engine() {
                Ok(e) if e.repo.as_deref() == Some(c.source.canonical_git_dir().as_str()) && e.branch.is_some() => None,
                Ok(e) => Some(format!(
                    "the daemon follows {} (branch {}), not this repository: the drill moves the VM by committing to the branch the daemon reads",
                    e.repo.as_deref().unwrap_or("an unknown repository"),
                    e.branch.as_deref().unwrap_or("?")
                )),
                Err(e) => Some(format!("{e:#}")),
            }
        }
        _ => None,
    }
}

/// True when `pid` runs under a systemd unit (its environment has `INVOCATION_ID`).
fn under_systemd(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
        env.split(|b| *b == 0)
            .any(|var| var.starts_with(b"INVOCATION_ID="))
    })
}

fn qemu_crash(c: &mut Cluster) -> Result<Sample> {
    exit_row(c, Fault::KillQemu)
}

/// How often the guest panic row presses the NMI button, and how long it waits for the
/// exit after each press (30 s in all).
const NMI_PRESSES: usize = 6;
const NMI_WAIT: Duration = Duration::from_secs(5);

fn guest_panic(c: &mut Cluster) -> Result<Sample> {
    exit_row(c, Fault::Nmi)
}

/// Samples the VM's QEMUs on this machine while `body` runs, when its QEMU is here.
fn watching<T>(
    c: &mut Cluster,
    body: impl FnOnce(&mut Cluster) -> Result<T>,
) -> Result<(T, Option<usize>)> {
    let pid = c.settled()?.pid;
    if !pid.is_some_and(|p| c.local_copies().contains(&p)) {
        return Ok((body(c)?, None));
    }
    let vm = c.vm.clone();
    // The hosts' roots do not change while the rows run (a new daemon starts the same
    // agents): looked up once, not at every sample.
    let roots = c.local_roots();
    let copies = move || super::local_copies_of(&vm, &roots).len();
    let (out, most) = sampling(c, &copies, body)?;
    Ok((out, Some(most)))
}

/// Inflicts `fault`, then measures until the daemon saw the exit and the VM runs again.
fn exit_row(c: &mut Cluster, fault: Fault) -> Result<Sample> {
    let ((answer, t0, exited, started, earlier, sent), most) = watching(c, |c| {
        // An NMI that reaches a guest still booting (slower than `--settle` on a loaded
        // host) is lost: press the button again, every few seconds, for up to 30 s. The
        // times count from the press that worked.
        let presses = if fault == Fault::Nmi { NMI_PRESSES } else { 1 };
        let mut sent = 0;
        let (answer, t0, exited) = loop {
            let answer = c.inflict(fault)?;
            sent += 1;
            let t0 = crate::time::parse(&answer.at).context("the daemon's answer has no time")?;
            let bound = if fault == Fault::Nmi { NMI_WAIT } else { STEP };
            match c.event_after("its QEMU's exit", t0, bound, |e| e.kind == "exited") {
                Ok(exited) => break (answer, t0, exited),
                Err(_) if sent < presses => {}
                Err(e) if fault == Fault::Nmi => {
                    return Err(e.context(format!("the guest did not panic on {sent} NMIs: boot it with `unknown_nmi_panic` on its kernel command line (or sysctl kernel.unknown_nmi_panic=1) and a pvpanic driver to measure this row")));
                }
                Err(e) => return Err(e),
            }
        };
        let started = c.event_after("a new QEMU", t0, STEP, |e| {
            matches!(e.kind.as_str(), "start" | "restart")
        })?;
        let earlier = c.exits_before(t0);
        Ok((answer, t0, exited, started, earlier, sent))
    })?;
    let reason = exited.1.message.split(' ').next().unwrap_or("?").to_owned();
    let after = c.settled()?;
    let broken = (fault == Fault::Nmi && reason != "panic")
        .then(|| format!("the NMI ended the QEMU as {reason}, not as a guest panic"));
    Ok(Sample {
        detection_ms: Some(ms(t0, exited.0)),
        running_ms: Some(ms(t0, started.0)),
        guest_ms: None,
        most_copies: most,
        data_checked: false,
        broken,
        note: format!(
            "{}{} struck QEMU pid {}; exit reason {reason}; running again as pid {} on {}; {}",
            fault.as_str(),
            if sent > 1 {
                format!(" (sent {sent} times: the first ones reached a guest still booting)")
            } else {
                String::new()
            },
            answer.pid.unwrap_or_default(),
            after.pid.unwrap_or_default(),
            after.host.unwrap_or_default(),
            if earlier == 0 {
                "a first failure in the [restart] window: restarted at once".to_owned()
            } else {
                format!(
                    "exit {} in the [restart] window: the restart waited its backoff",
                    earlier + 1
                )
            }
        ),
    })
}

fn engine_crash(c: &mut Cluster) -> Result<Sample> {
    let before = c.settled()?;
    let daemon = c.daemon()?;
    let ((t0, back_at, new, adopted), most) = watching(c, |c| {
        let t0 = SystemTime::now();
        kill(Pid::from_raw(daemon), Signal::SIGKILL).context("killing the daemon")?;
        let mut new = None;
        if !poll_until(STEP, || {
            new = c.daemon_now().filter(|p| *p != daemon);
            new.is_some()
        }) {
            bail!(
                "nothing started `plasmavmc watch` again within {STEP:?}: start it by hand (the VM kept running: an engine's death never stops a VM)"
            );
        }
        let back_at = SystemTime::now();
        let adopted = c.event_after("the new daemon adopting the VM", t0, STEP, |e| {
            e.kind == "adopted"
        })?;
        Ok((t0, back_at, new.expect("waited"), adopted))
    })?;
    let after = c.settled()?;
    let broken = (after.pid != before.pid).then(|| {
        format!(
            "{} was restarted (pid {:?} -> {:?}) instead of adopted",
            c.vm, before.pid, after.pid
        )
    });
    Ok(Sample {
        detection_ms: None,
        running_ms: Some(ms(t0, adopted.0)),
        guest_ms: None,
        most_copies: most,
        data_checked: false,
        broken,
        note: format!(
            "the VM never stopped; a new daemon (pid {new}) held the state directory {:.0} ms after the kill and adopted QEMU pid {}",
            ms(t0, back_at),
            after.pid.unwrap_or_default()
        ),
    })
}

fn round_trip(c: &mut Cluster) -> Result<Sample> {
    let home = c.settled()?.host.expect("settled");
    let away = match &c.cfg.to {
        Some(to) if *to == home => bail!("--to {to}: the VM already runs there"),
        Some(to) => to.clone(),
        None => c
            .ready_hosts()
            .into_iter()
            .find(|h| *h != home)
            .context("no other ready host to move the VM to")?,
    };
    let branch = c.engine()?.branch.context("the daemon's branch")?;
    let original = c.spec_text(&branch)?;
    let ((t0, there, back), most) = watching(c, |c| {
        let t0 = SystemTime::now();
        let moved = c
            .move_to(&branch, &original, &away)
            .and_then(|there| Ok((there, c.move_to(&branch, &original, &home)?)));
        // Whatever happened: the spec file goes back to what it was.
        let restored = c.restore(&branch, &original);
        let (there, back) = moved?;
        restored?;
        Ok((t0, there, back))
    })?;
    let after = c.settled()?;
    let legs = [&there.1.message, &back.1.message];
    let broken = if let Some(cold) = legs.iter().find(|m| !m.starts_with("live")) {
        Some(format!("a leg was not live: {cold}"))
    } else if after.host.as_deref() != Some(home.as_str()) {
        Some(format!(
            "{} ended on {:?}, not back on {home}",
            c.vm, after.host
        ))
    } else {
        None
    };
    let worst = legs
        .iter()
        .filter_map(|m| downtime_in(m))
        .fold(0.0_f64, f64::max);
    Ok(Sample {
        detection_ms: None,
        running_ms: Some(worst),
        guest_ms: None,
        most_copies: most,
        data_checked: false,
        broken,
        note: format!(
            "{home} -> {away} -> {home} by commits to {branch} (the spec file committed back as it was); running again = worst downtime; legs {:.0} / {:.0} ms from commit",
            ms(t0, there.0),
            ms(there.0, back.0)
        ),
    })
}
