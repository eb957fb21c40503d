//! Rows about one VM: the engine, its QEMU or its guest ends.

use std::time::SystemTime;

use anyhow::Result;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{
    app_on, boots, boots_anywhere, find_after, first_tick, ms, progress, removed, the_pid,
    tick_after, watching, Sample, APP, STEP,
};
use crate::drill::sandbox::{wait, Sandbox};

pub(super) fn engine_crash(sb: &mut Sandbox) -> Result<Sample> {
    let host = app_on(sb, None)?;
    let (_, pid) = the_pid(sb, APP)?;
    let before = progress(sb, &host, APP);
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
        running_ms: Some(ms(t0, adopted.timestamp()?)),
        guest_ms: Some(ms(t0, guest)),
        most_copies: Some(most),
        data_checked: false,
        broken: (after != pid).then(|| format!("app was restarted (pid {pid} -> {after})")),
        note: "the VM never stopped; a new engine adopted the same QEMU".to_owned(),
    })
}

/// Kills `vm`'s QEMU (or waits for the guest to end it, `by_guest`) and measures until
/// it runs again where it was, checking its disk kept its data when it has one.
pub(super) fn exit_and_restart(sb: &mut Sandbox, vm: &str, by_guest: bool) -> Result<Sample> {
    let (host, pid) = the_pid(sb, vm)?;
    let boots_before = boots_anywhere(sb, vm);
    let since = sb.log().len();
    let ((t0, exited, started), most) = watching(sb, vm, |sb| {
        let t0 = if by_guest {
            wait("the guest to end its QEMU", STEP, || {
                !crate::qemu::process::is_alive(pid.unsigned_abs())
            })?;
            SystemTime::now()
        } else {
            let t0 = SystemTime::now();
            kill(Pid::from_raw(pid), Signal::SIGKILL)?;
            t0
        };
        let exited = find_after(sb, "the exit seen", since, |l| l.is("vm exited", Some(vm)))?;
        let started = find_after(sb, "a new QEMU", since, |l| {
            l.is("started", Some(vm)) && l.int("pid") != Some(i64::from(pid))
        })?;
        Ok((t0, exited, started))
    })?;
    let guest = first_tick(sb, &host, vm)?;
    let boots_after = boots(sb, &host, vm);
    let lost = match (boots_before, boots_after) {
        (Some(b), Some(a)) if a <= b => {
            Some(format!("{vm}'s disk lost its data: boots {b} -> {a}"))
        }
        _ => None,
    };
    Ok(Sample {
        detection_ms: Some(ms(t0, exited.timestamp()?)),
        running_ms: Some(ms(t0, started.timestamp()?)),
        guest_ms: Some(ms(t0, guest)),
        most_copies: Some(most),
        data_checked: boots_before.is_some() && boots_after.is_some(),
        broken: lost,
        note: format!("exit reason {}", exited.str("reason").unwrap_or("?")),
    })
}

pub(super) fn qemu_crash(sb: &mut Sandbox) -> Result<Sample> {
    app_on(sb, None)?;
    exit_and_restart(sb, APP, false)
}

/// A VM whose guest ends itself after a few seconds (`knob`), measured once, removed.
pub(super) fn self_ending(sb: &mut Sandbox, vm: &str, knob: &str) -> Result<Sample> {
    sb.write(&format!("vms/{vm}.toml"), &sb.vm_toml("", knob, None))?;
    sb.commit(&format!("drill: {vm}"))?;
    wait(&format!("{vm} running"), STEP, || {
        sb.qemus_of(vm).len() == 1
    })?;
    let sample = exit_and_restart(sb, vm, true);
    removed(sb, vm)?;
    sample
}

pub(super) fn guest_panic(sb: &mut Sandbox) -> Result<Sample> {
    self_ending(sb, "panicky", "plasmavmc.panic=15")
}

pub(super) fn guest_poweroff(sb: &mut Sandbox) -> Result<Sample> {
    self_ending(sb, "quitter", "plasmavmc.poweroff=15")
}
