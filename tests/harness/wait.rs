//! Polling with deadlines: the only way tests wait for something to happen. The loop is
//! the drill's ([`plasmavmc::drill::poll`]); the tests look every 50 ms.

use std::fmt::Display;
use std::time::Duration;

use anyhow::Result;
/// [`poll_for`] every `period` (for states that last a fraction of a second).
pub use plasmavmc::drill::poll::poll_every;

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

/// Polls `cond` every 50 ms until it holds, or fails after `timeout` naming `what`.
pub fn wait_for(
    what: impl Display,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<()> {
    poll_for(what, timeout, || cond().then_some(()))
}
