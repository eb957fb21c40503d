//! Polling with deadlines: the only way tests wait for something to happen.

use std::fmt::Display;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(50);

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout`
/// naming `what`.
pub fn poll_for<T>(
    what: impl Display,
    timeout: Duration,
    check: impl FnMut() -> Option<T>,
) -> Result<T> {
    poll_every(POLL, what, timeout, check)
}

/// [`poll_for`] every `period` (for states that last a fraction of a second).
pub fn poll_every<T>(
    period: Duration,
    what: impl Display,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(period);
    }
}

/// Polls `cond` every 50 ms until it holds, or fails after `timeout` naming `what`.
pub fn wait_for(
    what: impl Display,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<()> {
    poll_for(what, timeout, || cond().then_some(()))
}
