//! `[health]` of a VM spec: how the engine tells a hung guest from a running one.
//!
//! Types only, like the rest of the VM spec. A QEMU that exits is noticed without any of
//! this; `[health]` covers the guest that stops working while QEMU keeps running.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cluster::HumanDuration;
use crate::diag::Seg;

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
    /// A virtio-serial channel for qemu-guest-agent (`org.qemu.guest_agent.0`). The host's
    /// agent pings it every `guest_agent_period`; the status shows whether it answers,
    /// and the guest's OS and IP addresses when it does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guest_agent: bool,
    /// How often the guest agent is pinged (default 10s; from 100ms to 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent_period: Option<HumanDuration>,
}

/// The guest agent's ping period when none is given.
pub const DEFAULT_GUEST_AGENT_PERIOD: Duration = Duration::from_secs(10);

impl Health {
    /// Whether nothing is asked for (the table can be left out).
    pub fn is_empty(&self) -> bool {
        self.watchdog.is_none() && !self.guest_agent && self.guest_agent_period.is_none()
    }

    /// How often the guest agent is pinged.
    pub fn guest_agent_period(&self) -> Duration {
        self.guest_agent_period
            .as_ref()
            .map_or(DEFAULT_GUEST_AGENT_PERIOD, |p| p.0)
    }

    /// Everything wrong with `[health]` on its own, each with its key path.
    pub fn problems(&self, bad: &mut impl FnMut(Vec<Seg<'static>>, String)) {
        let at = |k: &'static str| vec![Seg::Key("health"), Seg::Key(k)];
        if let Some(period) = &self.guest_agent_period {
            if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&period.0) {
                bad(
                    at("guest_agent_period"),
                    format!(
                        "guest_agent_period = {:?} must be between 100ms and 1h",
                        humantime::format_duration(period.0).to_string()
                    ),
                );
            }
            if !self.guest_agent {
                bad(
                    at("guest_agent_period"),
                    "guest_agent_period needs guest_agent = true".to_owned(),
                );
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        let health: Health = toml::from_str(text).expect("health table");
        let mut out = Vec::new();
        health.problems(&mut |_, msg| out.push(msg));
        out
    }

    #[test]
    fn the_guest_agent_period_is_bounded_and_needs_the_guest_agent() {
        assert!(problems("guest_agent = true\nguest_agent_period = \"1s\"").is_empty());
        assert!(problems("watchdog = \"reset\"").is_empty());
        assert!(
            problems("guest_agent = true\nguest_agent_period = \"10ms\"")[0]
                .contains("between 100ms and 1h")
        );
        assert!(problems("guest_agent_period = \"1s\"")[0].contains("needs guest_agent = true"));
        assert_eq!(
            Health::default().guest_agent_period(),
            DEFAULT_GUEST_AGENT_PERIOD
        );
    }
}
