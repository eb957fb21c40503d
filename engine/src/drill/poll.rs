//! Waiting with a deadline: a condition polled until it holds or the time is up, never
//! a sleep that hopes. The drill waits this way, and so do the end-to-end tests
//! (`tests/harness/wait.rs`); each picks how often it looks.

use std::fmt::Display;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Calls `check` every `period` until it returns `Some`, or fails after `timeout`
/// naming `what`.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_is_polled_until_it_holds_or_the_time_is_up() {
        let mut n = 0;
        let found = poll_every(Duration::ZERO, "three", Duration::from_secs(5), || {
            n += 1;
            (n == 3).then_some(n)
        });
        assert_eq!(found.ok(), Some(3));
        let err = poll_every(Duration::ZERO, "never", Duration::ZERO, || None::<()>)
            .expect_err("times out");
        assert_eq!(err.to_string(), "timed out after 0ns waiting for never");
    }
}
