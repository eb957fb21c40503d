//! The status branch of a remote repository, sent back to it: beside the reconcile,
//! never in its way.
//!
//! In: the [`Remote`] followed and the status branch the daemon commits to its clone.
//! Out: `git push origin refs/heads/<branch>:refs/heads/<branch>` (that one ref, never
//! forced), run in a task of its own, and the reason the last push failed, for the
//! status to show. A push asked for while one runs is run once more when it ends; a
//! failed push is tried again when asked (the daemon asks at each status commit and
//! each reconcile while the last push failed).
//!
//! When origin's status branch is not in the clone's history (someone else pushed to
//! it, or this state directory is new and origin kept an older history), the push is
//! refused as not a fast-forward; the task then fetches origin's tip, commits the
//! engine's status on top of both ([`crate::status::branch::adopt_tip`]) and pushes
//! once more. Nothing of origin's branch is ever overwritten.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing::{info, warn};

use crate::errors::error_chain;
use crate::source::remote::Remote;
use crate::status::branch::adopt_tip;

/// How long one `git push` (or the fetch before a second push) may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// Pushes one status branch of a remote's clone, in the background.
pub(super) struct Pusher {
    remote: Remote,
    branch: String,
    state: Arc<Mutex<State>>,
    /// A push was asked for since the daemon started.
    started: bool,
}

#[derive(Debug, Default)]
struct State {
    running: bool,
    /// Asked again while running.
    again: bool,
    /// Why the last push failed; `None` once one succeeded.
    failure: Option<String>,
}

impl Pusher {
    /// A pusher of `branch` to `remote`; `None` unless both are given (a local
    /// repository, or no status branch: nothing to push).
    pub(super) fn for_remote(remote: Option<&Remote>, branch: Option<&str>) -> Option<Self> {
        Some(Self {
            remote: remote?.clone(),
            branch: branch?.to_owned(),
            state: Arc::default(),
            started: false,
        })
    }

    /// Pushes the branch now, in a task, or once more after the push that runs.
    /// Never waits.
    fn kick(&self) {
        {
            let mut state = lock(&self.state);
            if state.running {
                state.again = true;
                return;
            }
            state.running = true;
        }
        let (remote, branch, state) = (
            self.remote.clone(),
            self.branch.clone(),
            Arc::clone(&self.state),
        );
        tokio::spawn(async move {
            loop {
                let failure = match push(&remote, &branch).await {
                    Ok(()) => None,
                    Err(why) => {
                        warn!(%branch, url = %remote.shown_url(), error = %why, "status branch not pushed; retrying at the next change or interval");
                        Some(why)
                    }
                };
                let mut state = lock(&state);
                state.failure = failure;
                if !std::mem::take(&mut state.again) {
                    state.running = false;
                    return;
                }
            }
        });
    }

    /// Why the last push failed, said for the status; `None` when it succeeded (or
    /// none ended yet).
    pub(super) fn failure(&self) -> Option<String> {
        lock(&self.state).failure.as_ref().map(|why| {
            format!(
                "status branch {} not pushed to {}: {why}",
                self.branch,
                self.remote.shown_url()
            )
        })
    }

    /// After the status was written (and `committed` to the branch, or not): pushes
    /// when something was committed, on the daemon's first status (a commit of an
    /// earlier run may be unpushed), and while the last push failed.
    pub(super) fn after_status(&mut self, committed: bool) {
        let retry = {
            let state = lock(&self.state);
            state.failure.is_some() && !state.running
        };
        if committed || retry || !self.started {
            self.started = true;
            self.kick();
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One push; when refused, origin's tip taken in and one more push. The error is the
/// first push's unless origin's branch had moved.
async fn push(remote: &Remote, branch: &str) -> Result<(), String> {
    let refname = format!("refs/heads/{branch}");
    let open = || git2::Repository::open_bare(remote.dir()).map_err(|e| error_chain(&e));
    if open()?.find_reference(&refname).is_err() {
        return Ok(()); // nothing committed yet
    }
    let Err(refused) = remote.push(branch, PUSH_TIMEOUT).await else {
        info!(%branch, url = %remote.shown_url(), "status branch pushed");
        return Ok(());
    };
    // Refused, failed or timed out: if origin's branch holds commits the clone's does
    // not, take them in and push again; otherwise the first reason stands.
    let refused = error_chain(&refused);
    let Ok(fetched) = remote.fetch_other(branch, PUSH_TIMEOUT).await else {
        return Err(refused);
    };
    let joined = {
        let repo = open()?;
        let theirs = repo
            .find_reference(&fetched)
            .and_then(|r| r.peel_to_commit())
            .map_err(|e| error_chain(&e))?;
        let message = format!("status: joined {branch} as pushed by another writer");
        adopt_tip(&repo, branch, theirs.id(), &message).map_err(|e| error_chain(&e))?
    };
    if joined.is_none() {
        return Err(refused);
    }
    info!(%branch, "origin's status branch had moved; committed on top of it");
    remote
        .push(branch, PUSH_TIMEOUT)
        .await
        .map_err(|e| error_chain(&e))?;
    info!(%branch, url = %remote.shown_url(), "status branch pushed");
    Ok(())
}
