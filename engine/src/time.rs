//! The engine's one clock: milliseconds since the Unix epoch ([`now_ms`]), and wall-clock
//! timestamps as the status files write them (RFC 3339, UTC). Ground floor: imports
//! nothing of the crate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, in milliseconds since the Unix epoch (what the planner is given as `now`).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Now, as `2026-11-26T20:45:51Z`.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Now, compact and file-name safe: `20261126T204551Z`.
pub fn now_compact() -> String {
    now().replace(['-', ':'], "")
}

/// Now, to the millisecond (`2026-11-26T20:45:51.123Z`): when things happened to a VM,
/// so that `plasmavmc drill` (and an operator) can tell how long each step took.
pub fn stamp_ms() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Reads a time [`now`] or [`stamp_ms`] wrote.
pub fn parse(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text.trim_end_matches('Z')).ok()
}

/// A time in ms since the Unix epoch, as [`now`] writes it.
pub fn at_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}
