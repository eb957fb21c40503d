//! The apply journal: the plan being carried out, written before its first action and
//! after each one, removed when the plan is done.
//!
//! If the engine dies half-way, the next run finds the journal, says what was cut
//! short, and plans again from what really runs: every action is idempotent, so the
//! new plan finishes what the old one started (a stopped-but-not-restarted VM is
//! started, a created-but-not-started one is started) and never starts anything twice.
//! A migration also records each of its steps (`step`); what to do after one is cut
//! short is read from both hosts (see `plan/recover.rs`), the step says where it was.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plan::Action;
use crate::state::{write_atomic, StateError};

/// `<state>/journal.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub revision: String,
    pub started_at: String,
    pub actions: Vec<Action>,
    /// How many actions finished (successfully or not).
    pub done: usize,
    /// The last step reported inside the running action (a migration's), `vm: what`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// Where the journal lives.
#[derive(Debug, Clone)]
pub struct JournalFile {
    path: PathBuf,
}

impl JournalFile {
    pub fn new(state_root: &Path) -> Self {
        Self {
            path: state_root.join("journal.json"),
        }
    }

    /// The journal of an interrupted run, if any.
    pub fn interrupted(&self) -> Option<Journal> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn write(&self, journal: &Journal) -> Result<(), StateError> {
        let text = serde_json::to_vec_pretty(journal).expect("a journal serialises");
        write_atomic(&self.path, &text)
    }

    pub fn clear(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Journal {
    /// One line for logs and status: what was cut short.
    pub fn describe(&self) -> String {
        let next = self
            .actions
            .get(self.done)
            .map_or_else(|| "nothing".to_owned(), Action::describe);
        let short = self.revision.get(..12).unwrap_or(&self.revision);
        let step = self
            .step
            .as_ref()
            .map_or_else(String::new, |s| format!(", last step: {s}"));
        format!(
            "an apply of commit {short} (started {}) was interrupted after {} of {} actions (next was: {next}{step}); planning again from what runs finishes it",
            self.started_at,
            self.done,
            self.actions.len()
        )
    }
}
