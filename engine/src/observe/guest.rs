//! What is known of a guest from the inside: its guest agent's answers.

use serde::{Deserialize, Serialize};

/// What the host's agent last learnt from a VM's guest agent (`[health] guest_agent`),
/// kept in the instance folder (`guest-agent.toml`) and rewritten only when it changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAgentInfo {
    /// Whether the guest agent answered the last ping (`guest-sync`, `guest-ping`).
    pub answering: bool,
    /// Since when it answers, or does not.
    pub since: String,
    /// The QEMU this is about (a record of an earlier QEMU is not shown).
    pub pid: u32,
    /// The guest's OS in its own words (`guest-get-osinfo`), while it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// The guest's addresses, `ADDR/PREFIX` (`guest-network-get-interfaces`, loopback
    /// left out), while it answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Why the last ping failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl GuestAgentInfo {
    /// Whether `other` tells something new: it answers or not, another OS, other
    /// addresses (a new error text alone is no news).
    pub fn differs(&self, other: &Self) -> bool {
        self.answering != other.answering
            || self.os != other.os
            || self.addresses != other.addresses
            || self.pid != other.pid
    }
}

/// A probe's state (`[health.liveness]`, `[health.readiness]`), kept by the host's agent
/// in the instance folder (`liveness.toml`, `readiness.toml`), rewritten when it flips.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeState {
    /// Liveness: the guest works; readiness: it serves.
    pub ok: bool,
    /// Since when (RFC 3339, to the millisecond).
    pub since: String,
    /// The QEMU this is about.
    pub pid: u32,
    /// What the last check said (its output or its error).
    pub last: String,
}
