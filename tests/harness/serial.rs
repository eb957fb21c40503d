//! The test guest's serial console: its `tick N` lines and waiting for them. Reading
//! the guest's words is the drill's too ([`plasmavmc::drill::console`]): one reader.

use std::time::Duration;

use anyhow::{Context, Result};
pub use plasmavmc::drill::console::{last_tick, ticks};

use crate::repo::TestRepo;
use crate::wait::wait_for;

/// True if the log has a line that is exactly `line` (surrounding blanks aside).
pub fn serial_has_line(serial: &str, line: &str) -> bool {
    serial.lines().any(|l| l.trim() == line)
}

impl TestRepo {
    /// Waits (without any daemon: it may be dead on purpose) until `vm`'s console
    /// shows ticks at least 3 past `after`: the guest keeps running.
    pub fn wait_ticks_past(&self, vm: &str, after: u64, timeout: Duration) -> Result<()> {
        wait_for(
            format!("{vm}'s console to tick past {}", after + 3),
            timeout,
            || last_tick(&self.serial(vm)).is_some_and(|t| t > after + 3),
        )
        .with_context(|| self.describe_vm(vm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ticks themselves are read by the drill's reader (its tests are there).
    #[test]
    fn a_line_is_matched_whole() {
        let log = "boot\ntick 1\n tick 2 \ntick x\ndisk: boots=1\ntick 3\n";
        assert!(serial_has_line(log, "tick 2"));
        assert!(!serial_has_line(log, "tick"));
    }
}
