//! Rows about moving a VM by commit: a live round trip, a cold move.

use std::time::SystemTime;

use anyhow::Result;

use super::{
    app_on, boots, find_after, ms, removed, the_pid, tick_after, watching, write_app, Sample, APP,
    STEP,
};
use crate::drill::console::last_tick;
use crate::drill::log::LogLine;
use crate::drill::sandbox::{wait, Sandbox, HOSTS};

/// Commits `app` pinned to `to` and waits for the move; returns its `done` line.
pub(super) fn move_app(sb: &mut Sandbox, to: &str) -> Result<LogLine> {
    let since = sb.log().len();
    write_app(sb, Some(to))?;
    sb.commit(&format!("drill: app to {to}"))?;
    find_after(sb, "the move done", since, |l| {
        l.is("done", Some(APP)) && l.str("op") == Some("migrate")
    })
}

/// `downtime N ms` of a migrate step's log line.
pub(super) fn downtime(line: &LogLine) -> Option<f64> {
    downtime_in(line.str("detail")?)
}

/// `downtime N ms` of a migrate step's detail (its log line, its status event).
pub fn downtime_in(detail: &str) -> Option<f64> {
    let rest = &detail[detail.find("downtime ")? + 9..];
    rest.split(' ').next()?.parse().ok()
}

pub(super) fn live_round_trip(sb: &mut Sandbox) -> Result<Sample> {
    let home = app_on(sb, None)?;
    let away = HOSTS
        .iter()
        .find(|h| **h != home)
        .copied()
        .unwrap_or("hv2")
        .to_owned();
    let (_, pid) = the_pid(sb, APP)?;
    // A guest moved while still booting prints "booted" where it arrives, which reads as
    // a reboot: wait until it ticks (the row before may have just restarted it, and a
    // loaded machine boots it slowly).
    if sb.guest.ticks() {
        super::tick_after(sb, &home, APP, 0)?;
    }
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
    // Only a guest counting ticks tells a reboot from a move (a new count, or "booted").
    let rebooted = sb.guest.ticks()
        && (first.is_some_and(|t| t <= before) || sb.serial(&home, APP).contains("booted"));
    let (_, now) = the_pid(sb, APP)?;
    let worst = downtime(&there)
        .unwrap_or(0.0)
        .max(downtime(&back).unwrap_or(0.0));
    Ok(Sample {
        detection_ms: None,
        running_ms: Some(worst),
        guest_ms: Some(ms(t0, guest)),
        most_copies: Some(most),
        data_checked: false,
        broken: (rebooted || now == pid).then(|| "the guest rebooted instead of moving".to_owned()),
        note: format!(
            "{home} -> {away} -> {home}; running again = worst downtime; legs {:.0} / {:.0} ms from commit{}",
            ms(t0, there.timestamp()?),
            ms(there.timestamp()?, back.timestamp()?),
            if sb.guest.ticks() {
                ""
            } else {
                " (whether the guest rebooted cannot be told from its console)"
            }
        ),
    })
}

pub(super) fn cold_move(sb: &mut Sandbox) -> Result<Sample> {
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
    removed(sb, "cold")?;
    Ok(Sample {
        detection_ms: None,
        running_ms: Some(ms(t0, done.timestamp()?)),
        guest_ms: Some(ms(t0, guest)),
        most_copies: Some(most),
        data_checked: true,
        broken: match (before, after) {
            (Some(b), Some(a)) if a > b => None,
            other => Some(format!("the disk did not arrive whole: boots {other:?}")),
        },
        note: "local disk copied through the agents; times from the commit".to_owned(),
    })
}
