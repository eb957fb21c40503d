//! Rows about a whole host: reboot, power-off with a fence command, partition without one.

use std::time::SystemTime;

use anyhow::{bail, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{
    app_on, boots, boots_anywhere, find_after, first_tick, ms, watching, Sample, APP, STEP,
};
use crate::drill::sandbox::{wait, Sandbox};

pub(super) fn host_reboot(sb: &mut Sandbox) -> Result<Sample> {
    let host = app_on(sb, Some("hv2"))?;
    let boots_before = boots_anywhere(sb, APP);
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
        detection_ms: Some(ms(t0, seen.timestamp()?)),
        running_ms: Some(ms(t0, started.timestamp()?)),
        guest_ms: Some(ms(t0, guest)),
        most_copies: Some(most),
        data_checked: boots_before.is_some(),
        broken: lost,
        note: "times from the engine's start after the reboot".to_owned(),
    })
}

/// Where app runs after a recovery, once its status says so.
pub(super) fn recovered(sb: &Sandbox, lost: &str) -> Result<String> {
    let mut on = None;
    wait("app running on another host", STEP, || {
        on = sb.running_on(APP).filter(|h| h != lost);
        on.is_some()
    })?;
    Ok(on.expect("checked"))
}

/// Powers `host` on again and waits until the daemon has it back.
pub(super) fn rejoin(sb: &Sandbox, host: &str) -> Result<()> {
    let since = sb.log().len();
    sb.power_on(host);
    find_after(sb, "the host back", since, |l| {
        l.is("connected to the agent", None) && l.str("host") == Some(host)
    })?;
    Ok(())
}

pub(super) fn host_power_off(sb: &mut Sandbox) -> Result<Sample> {
    let host = app_on(sb, Some("hv1"))?;
    let boots_before = boots_anywhere(sb, APP);
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
        detection_ms: Some(ms(t0, lost.timestamp()?)),
        running_ms: Some(ms(t0, started.timestamp()?)),
        guest_ms: Some(ms(t0, guest)),
        most_copies: Some(most),
        data_checked: boots_before.is_some(),
        broken: data,
        note: format!(
            "{host} fenced at {} ms; app recovered on {to}",
            fenced
                .and_then(|f| f.timestamp().ok())
                .map_or_else(|| "?".to_owned(), |at| format!("{:.0}", ms(t0, at)))
        ),
    })
}

pub(super) fn partition(sb: &mut Sandbox) -> Result<Sample> {
    let host = app_on(sb, Some("hv3"))?;
    let boots_before = boots_anywhere(sb, APP);
    let since = sb.log().len();
    let ((t0, unknown, confirmed, started, to), most) = watching(sb, APP, |sb| {
        let t0 = SystemTime::now();
        sb.partition(&host)?;
        wait("app unknown", STEP, || {
            sb.vm_status(APP)
                .is_some_and(|s| s.phase == crate::status::VmPhase::Unknown)
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
    let data = match (boots_before, boots(sb, &to, APP)) {
        (Some(b), Some(a)) if a <= b => Some(format!("app's disk lost its data: boots {b} -> {a}")),
        _ => None,
    };
    rejoin(sb, &host)?;
    Ok(Sample {
        detection_ms: Some(ms(t0, unknown)),
        running_ms: Some(ms(confirmed, started.timestamp()?)),
        guest_ms: Some(ms(confirmed, guest)),
        most_copies: Some(most),
        data_checked: boots_before.is_some(),
        broken: data,
        note: format!("recovery times from `fence confirm`; app recovered on {to}"),
    })
}
