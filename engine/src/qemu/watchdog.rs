//! The guest watchdog: its QEMU arguments and QEMU's word that it fired.
//!
//! In: a VM's `[health] watchdog`, QMP events and `query-status` words. Out: argv and
//! [`Fired`]. QEMU 7.2 facts: `-device i6300esb` with `-action watchdog=ACTION`; when the
//! guest stops feeding it, QEMU sends `WATCHDOG {"action": ACTION}` and carries the action
//! out. `reset` resets the guest in place; for `poweroff` and `restart` QEMU *pauses* it
//! (run state `watchdog`) and the host's agent ends that QEMU after recording why: the
//! record is written before anything is lost, and a watchdog that fired while no agent was
//! attached is still seen (`query-status` says `watchdog`) when one attaches.

use plasmavmc_specs::WatchdogAction;

use super::qmp::QmpEvent;

/// QMP's event name.
pub const EVENT: &str = "WATCHDOG";
/// QEMU's run state of a guest its watchdog paused.
pub const PAUSED_STATE: &str = "watchdog";

/// The arguments that give a guest its watchdog (none without `[health] watchdog`).
pub fn args(action: Option<WatchdogAction>) -> &'static [&'static str] {
    match action {
        None => &[],
        Some(WatchdogAction::Reset) => &["-device", "i6300esb", "-action", "watchdog=reset"],
        Some(WatchdogAction::Poweroff | WatchdogAction::Restart) => {
            &["-device", "i6300esb", "-action", "watchdog=pause"]
        }
    }
}

/// What QEMU did when the watchdog fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    /// It reset the guest; the same QEMU goes on.
    Reset,
    /// It paused the guest: the agent ends this QEMU.
    Paused,
    /// Any other action (set by hand in QEMU): recorded, nothing done.
    Other,
}

impl Fired {
    /// QEMU's `WATCHDOG` event, or `None` for any other event.
    pub fn of_event(event: &QmpEvent) -> Option<Self> {
        if event.event != EVENT {
            return None;
        }
        Some(
            match event.data.get("action").and_then(serde_json::Value::as_str) {
                Some("reset") => Self::Reset,
                Some("pause") => Self::Paused,
                _ => Self::Other,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_action_gets_the_device_and_qemu_s_action() {
        assert!(args(None).is_empty());
        assert_eq!(
            args(Some(WatchdogAction::Reset)),
            ["-device", "i6300esb", "-action", "watchdog=reset"]
        );
        for a in [WatchdogAction::Poweroff, WatchdogAction::Restart] {
            assert_eq!(
                args(Some(a)),
                ["-device", "i6300esb", "-action", "watchdog=pause"]
            );
        }
    }

    #[test]
    fn the_event_is_read_into_what_qemu_did() {
        let ev = |name: &str, action: &str| QmpEvent {
            event: name.into(),
            data: json!({ "action": action }),
            timestamp: None,
        };
        assert_eq!(Fired::of_event(&ev(EVENT, "reset")), Some(Fired::Reset));
        assert_eq!(Fired::of_event(&ev(EVENT, "pause")), Some(Fired::Paused));
        assert_eq!(Fired::of_event(&ev(EVENT, "none")), Some(Fired::Other));
        assert_eq!(Fired::of_event(&ev("STOP", "pause")), None);
    }
}
