//! The plan's vocabulary: a closed set of actions that serialise.
//!
//! Saved plans are JSON files operators keep and apply later, so the wire form
//! (`{"op": "start", ...}`) is frozen by a fixture test: old plan files keep parsing.

use serde::{Deserialize, Serialize};

/// One step of a plan, about one VM on one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Action {
    /// Create the instance folder and disks (does not start it).
    Create {
        vm: String,
        host: String,
        reason: String,
    },
    /// Start QEMU.
    Start {
        vm: String,
        host: String,
        reason: String,
    },
    /// Stop QEMU gracefully (ACPI, then quit after the stop timeout).
    Stop {
        vm: String,
        host: String,
        reason: String,
    },
    /// Stop, apply the new spec, start again: the change needs a reboot. Disks are kept.
    Restart {
        vm: String,
        host: String,
        reason: String,
        diff: String,
    },
    /// Apply a new spec that needs no reboot (or to a stopped VM).
    Update {
        vm: String,
        host: String,
        reason: String,
        diff: String,
    },
    /// Remove a stopped instance; its disks move to `retained/`, never deleted.
    Delete {
        vm: String,
        host: String,
        reason: String,
    },
    /// Create the instance of a VM whose host was lost and fenced on another host
    /// (disks on shared storage, or none); it is started by a following `start`.
    Recover {
        vm: String,
        host: String,
        reason: String,
        from: String,
    },
    /// Move a VM from `host` to `to`: `live` (the guest keeps running; memory, and local
    /// disks through NBD, stream to a QEMU waiting on the target) or `cold` (graceful stop,
    /// local disks copied through the agents, start on the target). The source copy is
    /// removed only once the VM runs on the target.
    Migrate {
        vm: String,
        host: String,
        to: String,
        mode: MoveMode,
        reason: String,
    },
    /// Stop an orphan QEMU (only with `--prune`); `vm` is the folder it runs in.
    Prune {
        vm: String,
        host: String,
        reason: String,
        pid: u32,
    },
}

/// How a VM moves between hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MoveMode {
    Live,
    Cold,
}

impl MoveMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveMode::Live => "live",
            MoveMode::Cold => "cold",
        }
    }
}

impl Action {
    pub fn vm(&self) -> &str {
        match self {
            Action::Create { vm, .. }
            | Action::Start { vm, .. }
            | Action::Stop { vm, .. }
            | Action::Restart { vm, .. }
            | Action::Update { vm, .. }
            | Action::Delete { vm, .. }
            | Action::Prune { vm, .. }
            | Action::Recover { vm, .. }
            | Action::Migrate { vm, .. } => vm,
        }
    }

    pub fn host(&self) -> &str {
        match self {
            Action::Create { host, .. }
            | Action::Start { host, .. }
            | Action::Stop { host, .. }
            | Action::Restart { host, .. }
            | Action::Update { host, .. }
            | Action::Delete { host, .. }
            | Action::Prune { host, .. }
            | Action::Recover { host, .. }
            | Action::Migrate { host, .. } => host,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Action::Create { reason, .. }
            | Action::Start { reason, .. }
            | Action::Stop { reason, .. }
            | Action::Restart { reason, .. }
            | Action::Update { reason, .. }
            | Action::Delete { reason, .. }
            | Action::Prune { reason, .. }
            | Action::Recover { reason, .. }
            | Action::Migrate { reason, .. } => reason,
        }
    }

    /// The spec diff, for actions that change a spec.
    pub fn diff(&self) -> Option<&str> {
        match self {
            Action::Restart { diff, .. } | Action::Update { diff, .. } => Some(diff),
            _ => None,
        }
    }

    /// The operation's name as in JSON (`create`, `start`, ...).
    pub fn op(&self) -> &'static str {
        match self {
            Action::Create { .. } => "create",
            Action::Start { .. } => "start",
            Action::Stop { .. } => "stop",
            Action::Restart { .. } => "restart",
            Action::Update { .. } => "update",
            Action::Delete { .. } => "delete",
            Action::Prune { .. } => "prune",
            Action::Recover { .. } => "recover",
            Action::Migrate { .. } => "migrate",
        }
    }

    /// One line for humans: `+ create web on local: new VM (vms/web.toml)`.
    pub fn describe(&self) -> String {
        let sign = match self {
            Action::Create { .. } | Action::Recover { .. } => '+',
            Action::Start { .. } => '>',
            Action::Stop { .. } => '.',
            Action::Restart { .. } | Action::Update { .. } => '~',
            Action::Delete { .. } | Action::Prune { .. } => '-',
            Action::Migrate { to, mode, .. } => {
                return format!(
                    "> migrate {} from {} to {to} ({}): {}",
                    self.vm(),
                    self.host(),
                    mode.as_str(),
                    self.reason()
                );
            }
        };
        format!(
            "{sign} {} {} on {}: {}",
            self.op(),
            self.vm(),
            self.host(),
            self.reason()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plan files written by earlier versions must keep parsing: this is their form.
    const FROZEN: &str = r#"[
  {"op": "create", "vm": "a", "host": "local", "reason": "new VM"},
  {"op": "start", "vm": "a", "host": "local", "reason": "power = running"},
  {"op": "stop", "vm": "b", "host": "local", "reason": "power = stopped"},
  {"op": "restart", "vm": "c", "host": "local", "reason": "memory_mb changed", "diff": "-memory_mb = 1\n+memory_mb = 2\n"},
  {"op": "update", "vm": "d", "host": "local", "reason": "restart changed", "diff": ""},
    {"op": "delete", "vm": "e", "host": "local", "reason": "file removed"},
    {"op": "prune", "vm": "f", "host": "local", "reason": "orphan", "pid": 42},
  {"op": "recover", "vm": "g", "host": "hv2", "reason": "hv1 fenced", "from": "hv1"},
  {"op": "migrate", "vm": "h", "host": "hv1", "to": "hv2", "mode": "live", "reason": "pin changed"}
]"#;

    #[test]
    fn frozen_plan_json_still_parses_and_round_trips() {
        let actions: Vec<Action> = serde_json::from_str(FROZEN).expect("frozen fixture parses");
        assert_eq!(actions.len(), 9);
        assert_eq!(
            actions[8].describe(),
            "> migrate h from hv1 to hv2 (live): pin changed"
        );
        assert_eq!(actions[3].diff(), Some("-memory_mb = 1\n+memory_mb = 2\n"));
        let again: Vec<Action> =
            serde_json::from_str(&serde_json::to_string(&actions).expect("ser")).expect("de");
        assert_eq!(actions, again);
        assert_eq!(actions[0].describe(), "+ create a on local: new VM");
    }
}
