//! Why a QEMU exited, told from its last words.
//!
//! In: the SHUTDOWN event QMP sent before the socket closed (if any) and the exit
//! status when the engine is the parent. Out: an [`ExitReason`]. QEMU 7.2 facts:
//! `guest-shutdown` = the guest powered off; `host-qmp-quit` / `host-signal` = someone
//! stopped it; `guest-panic` = panic (with `-device pvpanic -action panic=exit-failure`);
//! EOF with no SHUTDOWN = it died (SIGKILL, segfault, OOM killer).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why QEMU exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitReason {
    /// The guest powered itself off.
    GuestPoweroff,
    /// QEMU was told to quit (QMP) or got a termination signal.
    Stopped,
    /// The guest kernel panicked.
    Panic,
    /// QEMU died without a word: killed, crashed.
    Crash,
    /// The guest stopped feeding its watchdog (`[health] watchdog`): its QEMU was ended.
    Watchdog,
    /// Its liveness probe failed (`[health.liveness]`): its QEMU was ended.
    Unhealthy,
    /// It exited while no engine was watching; the reason is lost.
    Unknown,
    /// QEMU never came up (bad machine type, missing firmware...).
    StartFailed,
    /// QEMU was not started, or refused to start, because another QEMU holds the image
    /// lock of one of its disks: a copy of the VM may run elsewhere.
    ImageLocked,
}

impl ExitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::GuestPoweroff => "guest-poweroff",
            ExitReason::Stopped => "stopped",
            ExitReason::Panic => "panic",
            ExitReason::Crash => "crash",
            ExitReason::Watchdog => "watchdog",
            ExitReason::Unhealthy => "unhealthy",
            ExitReason::Unknown => "unknown",
            ExitReason::StartFailed => "start-failed",
            ExitReason::ImageLocked => "image-locked",
        }
    }

    /// A failure for `restart = "on-failure"`: crash, panic, a fired watchdog, or unknown
    /// (assume the worst).
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            ExitReason::Panic
                | ExitReason::Crash
                | ExitReason::Watchdog
                | ExitReason::Unhealthy
                | ExitReason::Unknown
                | ExitReason::StartFailed
                | ExitReason::ImageLocked
        )
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An exit the engine did not ask for, as recorded in `instance.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub reason: ExitReason,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub pid: u32,
    /// Exit status or signal, when known (`exit status 1`, `signal 9 (SIGKILL)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// Classifies an exit from QMP's SHUTDOWN event data (`None` = the socket closed without one).
pub fn classify(shutdown: Option<&serde_json::Value>) -> ExitReason {
    let Some(data) = shutdown else {
        return ExitReason::Crash;
    };
    match data.get("reason").and_then(serde_json::Value::as_str) {
        Some("guest-shutdown") => ExitReason::GuestPoweroff,
        Some("guest-panic") => ExitReason::Panic,
        Some(_) | None => ExitReason::Stopped,
    }
}

/// `exit status 1` / `signal 9 (SIGKILL)`.
pub fn describe_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => {
            let name = nix::sys::signal::Signal::try_from(sig)
                .map_or_else(|_| "?".to_owned(), |s| s.as_str().to_owned());
            format!("signal {sig} ({name})")
        }
        (None, None) => "unknown status".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shutdown_reasons_map_to_exit_reasons() {
        assert_eq!(
            classify(Some(&json!({"guest": true, "reason": "guest-shutdown"}))),
            ExitReason::GuestPoweroff
        );
        assert_eq!(
            classify(Some(&json!({"guest": true, "reason": "guest-panic"}))),
            ExitReason::Panic
        );
        assert_eq!(
            classify(Some(&json!({"guest": false, "reason": "host-qmp-quit"}))),
            ExitReason::Stopped
        );
        assert_eq!(
            classify(Some(&json!({"guest": false, "reason": "host-signal"}))),
            ExitReason::Stopped
        );
        assert_eq!(classify(None), ExitReason::Crash);
        assert!(
            ExitReason::Crash.is_failure()
                && ExitReason::Watchdog.is_failure()
                && ExitReason::Panic.is_failure()
                && ExitReason::Unknown.is_failure()
        );
        assert!(!ExitReason::GuestPoweroff.is_failure() && !ExitReason::Stopped.is_failure());
    }

    #[test]
    fn statuses_read_like_a_shell_would_say() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            describe_status(std::process::ExitStatus::from_raw(1 << 8)),
            "exit status 1"
        );
        assert_eq!(
            describe_status(std::process::ExitStatus::from_raw(9)),
            "signal 9 (SIGKILL)"
        );
    }
}
