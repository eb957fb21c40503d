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

/// A time in ms since the Unix epoch, as [`now`] writes it.
pub fn at_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}
