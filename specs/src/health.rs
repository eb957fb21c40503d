//! `[health]` of a VM spec: how the engine tells a hung guest from a running one.
//!
//! Types only, like the rest of the VM spec. A QEMU that exits is noticed without any of
//! this; `[health]` covers the guest that stops working while QEMU keeps running.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Guest health checks. All optional; absent = only QEMU's own exit is watched.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// A watchdog device (i6300esb) the guest must keep feeding; when it stops (its kernel
    /// hangs, or its watchdog daemon dies) QEMU reports it and this says what follows.
    /// The guest needs the `i6300esb` driver (Debian's generic kernel has it, its cloud
    /// kernel does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog: Option<WatchdogAction>,
}

impl Health {
    /// Whether nothing is asked for (the table can be left out).
    pub fn is_empty(&self) -> bool {
        self.watchdog.is_none()
    }
}

/// What happens when the guest's watchdog fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum WatchdogAction {
    /// QEMU resets the guest in place (same QEMU process, like pressing reset); the
    /// engine records it as a `watchdog` event and counts it in the status.
    Reset,
    /// The VM goes off (exit reason `watchdog`, a failure); the restart policy decides
    /// what follows: `always` and `on-failure` start it again with their backoff,
    /// `never` keeps it stopped.
    Poweroff,
    /// The engine replaces the QEMU with a fresh one (exit reason `watchdog`), even under
    /// `restart = "never"`: the watchdog is the more specific instruction. The restart
    /// policy's backoff and its give-up limit still apply.
    Restart,
}

impl WatchdogAction {
    pub fn as_str(self) -> &'static str {
        match self {
            WatchdogAction::Reset => "reset",
            WatchdogAction::Poweroff => "poweroff",
            WatchdogAction::Restart => "restart",
        }
    }
}
