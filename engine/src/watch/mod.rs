//! `plasmavmc watch`: the daemon that keeps the hosts equal to the newest valid commit.
//!
//! In: a repository (local path or remote URL) and a branch. Out: actions on the hosts,
//! status files, logs. It holds the state lock for its whole life and reconciles on
//! every [`Trigger`]: a new commit, a QEMU exit, SIGHUP, a restart's backoff running
//! out, the periodic resync, an action that ended. Each reconcile is the same
//! idempotent step — read the branch tip, observe, plan, hand the actions to the runner
//! (which carries them out, journaled, several at once, while the daemon goes on
//! reacting), write status — so the daemon never needs to know why it ran. SIGTERM/SIGINT end it and leave every VM running; so does
//! `kill -9`, after which the next daemon adopts what runs.
//!
//! ```text
//! startup ─> reconcile ─> wait for trigger ─┬─> reconcile ─> …
//!                                            └─> SIGTERM/SIGINT ─> exit 0 (VMs keep running)
//! ```

mod daemon;
mod fleet;
mod health;
mod push;
#[cfg(test)]
mod tests;
mod triggers;

use std::path::PathBuf;
use std::time::Duration;

pub use daemon::run;
pub use triggers::Trigger;

/// How the daemon was asked to run.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// A local path, or a URL (`ssh://`, `https://`, `file://`, `user@host:path`).
    pub repo: String,
    /// Folder of the repository holding the specs.
    pub path: Option<PathBuf>,
    /// Branch to follow; default: the checked-out branch (local) or `main` (remote).
    pub branch: Option<String>,
    /// Periodic resync (and fetch, for a remote).
    pub interval: Duration,
    pub state_dir: Option<PathBuf>,
    /// Commit the status files to this branch after each change.
    pub status_branch: Option<String>,
    /// Stop orphan QEMUs (ours, with no instance record) instead of only reporting them.
    pub prune: bool,
}
