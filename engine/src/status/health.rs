//! The `[health]` table of a VM's status: what is known of the guest from the inside.

use serde::{Deserialize, Serialize};

use crate::observe::{GuestAgentInfo, ObservedVm, ProbeState};

/// What the VM's `[health]` shows: watchdog resets, the guest agent, the probes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestHealth {
    /// Times the guest's watchdog reset it in place (`watchdog = "reset"`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub watchdog_resets: u32,
    /// What its guest agent says (`guest_agent`): whether it answers, since when, the
    /// guest's OS and addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent: Option<GuestAgentInfo>,
    /// Whether its readiness probe passes; absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// Its readiness probe: since when, the last check's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<ProbeState>,
    /// Its liveness probe: since when, the last check's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<ProbeState>,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl GuestHealth {
    /// What `o`'s host observed.
    pub fn of(o: &ObservedVm) -> Self {
        Self {
            watchdog_resets: o.watchdog_resets,
            guest_agent: o.guest_agent.clone(),
            ready: o
                .spec
                .health
                .readiness
                .as_ref()
                .map(|_| o.readiness.as_ref().is_some_and(|r| r.ok)),
            readiness: o.readiness.clone(),
            liveness: o.liveness.clone(),
        }
    }

    /// Nothing to show (the table is left out).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}
