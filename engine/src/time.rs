//! Wall-clock timestamps as the status files write them (RFC 3339, UTC, seconds).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
pub fn now_ms() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Reads a time [`now`] or [`now_ms`] wrote.
pub fn parse(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text.trim_end_matches('Z')).ok()
}

/// A time in ms since the Unix epoch, as [`now`] writes it.
pub fn at_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}
