//! What every command needs: the repository, the state directory, the hosts.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context as _;
use plasmavmc_specs::{Desired, Diagnostic};

use super::RepoArgs;
use crate::host::{connect_hosts, AgentHost, ConnectOptions};
use crate::observe::{Observed, Unreachable};
use crate::records::StateDir;
use crate::source::{Source, Target, TargetError};
use crate::step::Fleet;

/// The hosts one command connected to, and the ones it could not reach with the reason.
pub struct Hosts {
    pub up: BTreeMap<String, AgentHost>,
    pub down: BTreeMap<String, String>,
    state: StateDir,
}

impl Fleet for Hosts {
    type Host = AgentHost;

    fn hosts(&self) -> &BTreeMap<String, AgentHost> {
        &self.up
    }

    /// What the hosts run, plus what is known of the unreachable ones: where each VM
    /// may be (the whereabouts record), which are fenced.
    async fn look(&mut self) -> Observed {
        crate::step::look(
            self.up.values(),
            &Unreachable::down(&self.down),
            &self.state,
            None,
        )
        .await
    }
}

/// The repository and the state directory of one command.
pub struct Ctx {
    pub source: Source,
    pub state: PathBuf,
    pub rev: String,
}

impl Ctx {
    pub fn open(args: &RepoArgs) -> anyhow::Result<Self> {
        let source = Source::open(&args.repo, args.path.as_deref())?;
        let state = match (&args.state_dir, source.spec_root()) {
            (Some(dir), _) => dir.clone(),
            (None, Some(root)) => root.join(".plasmavmc"),
            (None, None) => anyhow::bail!("the repository has no working tree; pass --state-dir"),
        };
        let state = std::path::absolute(&state).unwrap_or(state);
        Ok(Self {
            source,
            state,
            rev: args.rev.clone(),
        })
    }

    /// Reads and validates the commit; `Ok(Err(..))` carries the diagnostics of an invalid one.
    pub fn target(&self) -> anyhow::Result<Result<Target, (String, Vec<Diagnostic>)>> {
        match Target::load(&self.source, &self.rev) {
            Ok(t) => Ok(Ok(t)),
            Err(TargetError::Invalid {
                commit,
                diagnostics,
            }) => Ok(Err((commit, diagnostics))),
            Err(TargetError::Source(e)) => Err(e.into()),
        }
    }

    pub fn state_dir(&self) -> anyhow::Result<StateDir> {
        StateDir::open(&self.state)
            .with_context(|| format!("state directory {}", self.state.display()))
    }

    /// The hosts this engine reaches: every `address = "local"` host of `desired`.
    /// Connects to every host's agent; unreachable ones are reported on stderr and
    /// returned apart with the reason.
    pub async fn hosts(&self, desired: &Desired) -> Hosts {
        let (up, down) = connect_hosts(
            desired,
            &StateDir::at(&self.state),
            ConnectOptions::default(),
        )
        .await;
        for why in down.values() {
            eprintln!("warning: {why}");
        }
        Hosts {
            up,
            down,
            state: StateDir::at(&self.state),
        }
    }

    /// Prints a note about uncommitted spec changes (they are never used).
    pub fn warn_uncommitted(&self) {
        let changed = self.source.uncommitted();
        if !changed.is_empty() {
            eprintln!("note: uncommitted changes are not used (only committed specs count):");
            for path in changed {
                eprintln!("  {path}");
            }
        }
    }
}

/// Prints each diagnostic on its own line, then a summary.
pub fn print_invalid(commit: &str, diags: &[Diagnostic]) {
    for d in diags {
        eprintln!("{d}");
    }
    let n = diags.len();
    eprintln!(
        "error: commit {commit} is invalid ({n} error{}); nothing was changed",
        if n == 1 { "" } else { "s" }
    );
}
