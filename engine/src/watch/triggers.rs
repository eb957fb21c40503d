//! What wakes the daemon: new commits (file notifications on the git refs), host
//! events (QEMU exits), signals, and timers. Each becomes a [`Trigger`] on one channel.

use std::path::Path;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc::UnboundedSender;
use tracing::warn;

use crate::wire::HostEvent;

/// Why the daemon reconciles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    Startup,
    /// A ref of the repository changed (or a remote fetch is due).
    Commit,
    /// The periodic resync.
    Timer,
    /// SIGHUP.
    Signal,
    /// A restart's backoff is over.
    Wake,
    /// A host's health changed: its channel closed, it went silent, or it is due for fencing.
    Health,
    /// A host reported something.
    Host(HostEvent),
    /// An action the runner carried out ended.
    Ended(Box<crate::execute::Step>),
}

impl Trigger {
    pub fn name(&self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::Commit => "commit",
            Trigger::Timer => "timer",
            Trigger::Signal => "signal",
            Trigger::Wake => "wake",
            Trigger::Health => "health",
            Trigger::Host(HostEvent::Exited { .. }) => "exit",
            Trigger::Host(HostEvent::Migrating { .. }) => "migration",
            Trigger::Host(HostEvent::Downloading { .. }) => "download",
            Trigger::Host(HostEvent::Watchdog { .. }) => "watchdog",
            Trigger::Host(HostEvent::GuestAgent { .. }) => "guest-agent",
            Trigger::Host(HostEvent::Probe { .. }) => "probe",
            Trigger::Ended(_) => "action-ended",
        }
    }
}

/// Watches the refs of the git repository at `git_dir` (loose refs, packed-refs, HEAD)
/// and sends [`Trigger::Commit`] on every change. Keep the returned watcher alive.
pub fn watch_refs(
    git_dir: &Path,
    tx: UnboundedSender<Trigger>,
) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(e) if touches_refs(&e) => {
                let _ = tx.send(Trigger::Commit);
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "watching the repository's refs"),
        })?;
    let refs = git_dir.join("refs");
    watcher.watch(&refs, RecursiveMode::Recursive)?;
    // packed-refs and HEAD live at the top of the git folder (objects/ is not watched).
    watcher.watch(git_dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

fn touches_refs(event: &notify::Event) -> bool {
    if event.kind.is_access() {
        return false;
    }
    event.paths.iter().any(|p| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        // A ref update writes `<ref>.lock` and renames it onto `<ref>`.
        !name.ends_with(".lock")
            && (name == "packed-refs"
                || name == "HEAD"
                || p.components().any(|c| c.as_os_str() == "refs"))
    })
}
