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
    /// Whether the guest works. It arms at its first success on a QEMU (a booting guest
    /// is not unhealthy); then after `failure_threshold` failures in a row the VM is
    /// `unhealthy`, and its QEMU is replaced by a fresh one (exit reason `unhealthy`, the
    /// restart policy's backoff applies; under `restart = "never"` it stays unhealthy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Probe>,
    /// Whether the guest serves: shown in the status as `ready`, never acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Probe>,
}

/// A check run by the host's agent, beside the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// What is checked.
    pub kind: ProbeKind,
    /// The guest's port (`tcp`, `http`): reached through the `forward` of a `user` NIC
    /// that forwards it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The URL path (`http`, default `/`): a 2xx answer is a success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The command `exec` runs in the guest, as a program and its arguments (the guest
    /// agent looks the program up in its `PATH`; no shell unless you name one, e.g.
    /// `["sh", "-c", "test -e /run/ready"]`). Exit status 0 is a success.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// How often it runs (default 10s; from 100ms to 1h).
    #[serde(default = "default_period")]
    pub period: HumanDuration,
    /// How long one check may take (default 1s; at most `period`).
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Failures in a row that count (default 3, at least 1).
    #[serde(default = "default_threshold")]
    pub failure_threshold: u32,
    /// Wait this long after QEMU starts before the first check (default 0s).
    #[serde(default = "default_delay")]
    pub initial_delay: HumanDuration,
}

/// What a probe checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeKind {
    /// The guest agent answers `guest-sync` and `guest-ping` (needs `guest_agent`).
    GuestAgent,
    /// `command` runs in the guest through its guest agent (`guest-exec`, needs
    /// `guest_agent`) and exits 0 within `timeout`. A command still running at the
    /// timeout is a failure; it is left to end in the guest (the guest agent cannot kill
    /// it), and no new one starts until it has.
    Exec,
    /// A TCP connection to `port` opens and is not closed by the guest.
    Tcp,
    /// `GET path` on `port` answers 2xx.
    Http,
}

fn default_period() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

fn default_threshold() -> u32 {
    3
}

fn default_delay() -> HumanDuration {
    HumanDuration(Duration::ZERO)
}

/// The guest agent's ping period when none is given.
pub const DEFAULT_GUEST_AGENT_PERIOD: Duration = Duration::from_secs(10);

impl Health {
    /// Whether nothing is asked for (the table can be left out).
    pub fn is_empty(&self) -> bool {
        self.watchdog.is_none()
            && !self.guest_agent
            && self.guest_agent_period.is_none()
            && self.liveness.is_none()
            && self.readiness.is_none()
    }

    /// How often the guest agent is pinged.
    pub fn guest_agent_period(&self) -> Duration {
        self.guest_agent_period
            .as_ref()
            .map_or(DEFAULT_GUEST_AGENT_PERIOD, |p| p.0)
    }

    /// Everything wrong with `[health]`, given the guest ports the VM forwards, each with
    /// its key path.
    pub fn problems(&self, forwarded: &[u16], bad: &mut impl FnMut(Vec<Seg<'static>>, String)) {
        for (key, probe) in [("liveness", &self.liveness), ("readiness", &self.readiness)] {
            if let Some(probe) = probe {
                probe.problems(self.guest_agent, forwarded, &mut |k, msg| {
                    bad(vec![Seg::Key("health"), Seg::Key(key), Seg::Key(k)], msg);
                });
            }
        }
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

impl Probe {
    fn problems(
        &self,
        guest_agent: bool,
        forwarded: &[u16],
        bad: &mut impl FnMut(&'static str, String),
    ) {
        let within = Duration::from_millis(100)..=Duration::from_secs(3600);
        if !within.contains(&self.period.0) {
            bad("period", "period must be between 100ms and 1h".to_owned());
        }
        if self.timeout.0.is_zero() || self.timeout.0 > self.period.0 {
            bad(
                "timeout",
                "timeout must be above 0s and at most period".to_owned(),
            );
        }
        if self.failure_threshold == 0 || self.failure_threshold > 100 {
            bad(
                "failure_threshold",
                "failure_threshold must be between 1 and 100".to_owned(),
            );
        }
        if self.initial_delay.0 > Duration::from_secs(3600) {
            bad(
                "initial_delay",
                "initial_delay must be at most 1h".to_owned(),
            );
        }
        match self.kind {
            ProbeKind::GuestAgent | ProbeKind::Exec if !guest_agent => {
                bad(
                    "kind",
                    format!(
                        "kind = \"{}\" needs [health] guest_agent = true",
                        self.kind.as_str()
                    ),
                );
            }
            ProbeKind::Tcp | ProbeKind::Http => match self.port {
                None => bad("port", format!("kind = \"{}\" needs a port", self.kind.as_str())),
                Some(port) if !forwarded.contains(&port) => bad(
                    "port",
                    format!("port {port} is not forwarded: a `user` NIC needs forward = [\"tcp:HOSTPORT:{port}\"] (the host's agent reaches the guest through it)"),
                ),
                Some(_) => {}
            },
            ProbeKind::GuestAgent | ProbeKind::Exec => {}
        }
        self.command_problems(bad);
        if self.kind != ProbeKind::Http && self.path.is_some() {
            bad("path", "path is for kind = \"http\" only".to_owned());
        }
        if let Some(path) = &self.path {
            if !path.starts_with('/') || path.chars().any(|c| c.is_control() || c == ' ') {
                bad(
                    "path",
                    format!("path {path:?} must start with '/' and hold no spaces"),
                );
            }
        }
    }
}

impl Probe {
    /// `command` is there for `exec` alone, and holds a program name.
    fn command_problems(&self, bad: &mut impl FnMut(&'static str, String)) {
        match (self.kind, self.command.first()) {
            (ProbeKind::Exec, None) => bad(
                "command",
                "kind = \"exec\" needs a command, e.g. command = [\"systemctl\", \"is-active\", \"nginx\"]"
                    .to_owned(),
            ),
            (ProbeKind::Exec, Some(program)) if program.trim().is_empty() => {
                bad("command", "the command's program name is empty".to_owned());
            }
            (kind, Some(_)) if kind != ProbeKind::Exec => {
                bad("command", "command is for kind = \"exec\" only".to_owned());
            }
            _ => {}
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            bad("command", "the command holds a NUL character".to_owned());
        }
    }
}

impl ProbeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::GuestAgent => "guest-agent",
            ProbeKind::Exec => "exec",
            ProbeKind::Tcp => "tcp",
            ProbeKind::Http => "http",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        let health: Health = toml::from_str(text).expect("health table");
        let mut out = Vec::new();
        health.problems(&[22], &mut |_, msg| out.push(msg));
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
        assert!(problems("[liveness]\nkind = \"tcp\"\nport = 22").is_empty());
        let refused = problems("[liveness]\nkind = \"tcp\"\nport = 80\ntimeout = \"20s\"\n[readiness]\nkind = \"guest-agent\"\npath = \"/\"");
        assert_eq!(refused.len(), 4, "{refused:?}");
        let exec = "guest_agent = true\n[readiness]\nkind = \"exec\"\n";
        assert!(problems(&format!(
            "{exec}command = [\"systemctl\", \"is-active\", \"ssh\"]"
        ))
        .is_empty());
        assert!(problems(exec)[0].contains("needs a command"));
        assert!(problems(&format!("{exec}command = [\" \"]"))[0].contains("program name is empty"));
        assert!(
            problems("[readiness]\nkind = \"exec\"\ncommand = [\"true\"]")[0]
                .contains("kind = \"exec\" needs [health] guest_agent = true")
        );
        assert!(
            problems("[liveness]\nkind = \"tcp\"\nport = 22\ncommand = [\"true\"]")[0]
                .contains("for kind = \"exec\" only")
        );
        assert_eq!(
            Health::default().guest_agent_period(),
            DEFAULT_GUEST_AGENT_PERIOD
        );
    }
}
