//! The apply journal: the plan being carried out, written before its first action,
//! when each action starts and after each one, removed when the plan is done. Several
//! actions may run at once (different VMs'): `running` names them. The daemon's runner
//! keeps one journal for everything it has in flight, adding actions as it takes them.
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
use crate::records::{write_atomic, StateError};

/// `<state>/journal.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub revision: String,
    pub started_at: String,
    pub actions: Vec<Action>,
    /// How many actions ended (done, failed or skipped).
    pub done: usize,
    /// The actions running now, as indexes into `actions`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub running: Vec<usize>,
    /// The last step reported inside each running action (a migration's), one per VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<JournalStep>,
    /// The one step older engines, which ran one action at a time, wrote.
    #[serde(default, skip_serializing)]
    pub step: Option<JournalStep>,
}

/// A step inside a running action: which VM, and what it was doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StepForm")]
pub struct JournalStep {
    pub vm: String,
    pub what: String,
}

/// How a step is written: a table, or (journals of older engines) `vm: what`.
#[derive(Deserialize)]
#[serde(untagged)]
enum StepForm {
    Table { vm: String, what: String },
    Text(String),
}

impl From<StepForm> for JournalStep {
    fn from(form: StepForm) -> Self {
        match form {
            StepForm::Table { vm, what } => Self { vm, what },
            StepForm::Text(text) => {
                let (vm, what) = text.split_once(": ").unwrap_or(("", &text));
                Self {
                    vm: vm.to_owned(),
                    what: what.to_owned(),
                }
            }
        }
    }
}

impl std::fmt::Display for JournalStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.vm, self.what)
    }
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

    /// The journal of an interrupted run, if any. One that cannot be read is an error,
    /// never taken for "none" (see [`JournalFile::set_aside`]).
    pub fn interrupted(&self) -> Result<Option<Journal>, StateError> {
        let Some(text) = crate::records::read_if_there(&self.path)? else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| StateError::Parse {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }

    /// Moves a journal that cannot be read out of the way (`journal.json.damaged-<time>`),
    /// keeping it for the operator; returns where it went.
    pub fn set_aside(&self) -> Option<PathBuf> {
        let to = self.path.with_file_name(format!(
            "journal.json.damaged-{}",
            crate::time::now_compact()
        ));
        std::fs::rename(&self.path, &to).ok().map(|()| to)
    }

    /// [`JournalFile::interrupted`], for a run about to start: describes the interrupted
    /// run (`Ok`), or says that the journal was damaged and where it was set aside
    /// (`Err`); `Ok(None)` when the last run ended.
    pub fn before_run(&self) -> Result<Option<String>, String> {
        match self.interrupted() {
            Ok(journal) => Ok(journal.map(|j| j.describe())),
            Err(e) => {
                let kept = self.set_aside().map_or_else(
                    || "it could not be moved aside".to_owned(),
                    |p| format!("kept as {}", p.display()),
                );
                Err(format!(
                    "{}; {kept}; what an interrupted run left is planned from what runs",
                    crate::errors::error_chain(&e)
                ))
            }
        }
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
    /// A journal for `actions` of commit `revision`, none started yet.
    pub fn new(revision: &str, actions: Vec<Action>) -> Self {
        Self {
            revision: revision.to_owned(),
            started_at: crate::time::now(),
            actions,
            done: 0,
            running: Vec::new(),
            steps: Vec::new(),
            step: None,
        }
    }

    /// Action `index` starts.
    pub fn started(&mut self, index: usize) {
        self.running.push(index);
    }

    /// Action `index` ended (done, failed or skipped).
    pub fn ended(&mut self, index: usize) {
        self.done += 1;
        self.running.retain(|i| *i != index);
        if let Some(vm) = self.actions.get(index).map(Action::vm) {
            self.steps.retain(|s| s.vm != vm);
        }
    }

    /// The last step inside `vm`'s running action.
    pub fn stepped(&mut self, vm: &str, what: &str) {
        self.steps.retain(|s| s.vm != vm);
        self.steps.push(JournalStep {
            vm: vm.to_owned(),
            what: what.to_owned(),
        });
    }

    /// One line for logs and status: what was cut short.
    pub fn describe(&self) -> String {
        let cut: Vec<String> = if self.running.is_empty() {
            // Nothing running (or an older engine's journal): the next one was.
            self.actions
                .get(self.done)
                .map(Action::describe)
                .into_iter()
                .collect()
        } else {
            self.running
                .iter()
                .filter_map(|i| self.actions.get(*i).map(Action::describe))
                .collect()
        };
        let cut = if cut.is_empty() {
            "nothing".to_owned()
        } else {
            cut.join("; ")
        };
        let short = self.revision.get(..12).unwrap_or(&self.revision);
        let steps: Vec<String> = self
            .steps
            .iter()
            .chain(self.step.as_ref())
            .map(|s| format!(", last step: {s}"))
            .collect();
        format!(
            "an apply of commit {short} (started {}) was interrupted after {} of {} actions (cut short: {cut}{}); planning again from what runs finishes it",
            self.started_at,
            self.done,
            self.actions.len(),
            steps.concat()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_a_table_and_an_older_engines_text_still_reads() {
        let step = JournalStep {
            vm: "web".to_owned(),
            what: "migrating live to hv2".to_owned(),
        };
        let json = serde_json::to_string(&step).expect("ser");
        assert_eq!(json, r#"{"vm":"web","what":"migrating live to hv2"}"#);
        assert_eq!(
            serde_json::from_str::<JournalStep>(&json).expect("de"),
            step
        );
        let old: JournalStep =
            serde_json::from_str(r#""web: migrating live to hv2""#).expect("old form");
        assert_eq!(old, step);
        assert_eq!(step.to_string(), "web: migrating live to hv2");
    }

    #[test]
    fn several_running_actions_are_all_named_and_an_older_journal_still_reads() {
        let action = |vm: &str| Action::Start {
            vm: vm.to_owned(),
            host: "hv1".to_owned(),
            reason: "new".to_owned(),
        };
        let mut j = Journal::new(
            "0123456789abcdef",
            vec![action("a"), action("b"), action("c")],
        );
        j.started(0);
        j.started(2);
        j.stepped("c", "migrating live to hv2");
        j.started(1);
        j.ended(1);
        let text = j.describe();
        assert!(text.contains("after 1 of 3 actions"), "{text}");
        assert!(
            text.contains("start a on hv1") && text.contains("start c on hv1"),
            "{text}"
        );
        assert!(!text.contains("start b"), "{text}");
        assert!(
            text.contains("last step: c: migrating live to hv2"),
            "{text}"
        );
        let back: Journal =
            serde_json::from_str(&serde_json::to_string(&j).expect("ser")).expect("de");
        assert_eq!(back, j);
        let old = r#"{"revision":"0123456789abcdef","started_at":"t","actions":[],"done":0,"step":"web: migrating live to hv2"}"#;
        let old: Journal = serde_json::from_str(old).expect("an older engine's journal");
        assert!(old
            .describe()
            .contains("last step: web: migrating live to hv2"));
    }

    #[test]
    fn a_damaged_journal_is_reported_and_set_aside_never_taken_for_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = JournalFile::new(dir.path());
        assert_eq!(file.before_run(), Ok(None));
        std::fs::write(dir.path().join("journal.json"), "{\"revision\": ").expect("write");
        assert!(matches!(file.interrupted(), Err(StateError::Parse { .. })));
        let why = file
            .before_run()
            .expect_err("a damaged journal is an error");
        assert!(
            why.contains("journal.json is damaged") && why.contains("kept as"),
            "{why}"
        );
        assert!(!dir.path().join("journal.json").exists(), "set aside");
        let kept = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("journal.json.damaged-")
            })
            .count();
        assert_eq!(kept, 1, "the damaged journal is kept for the operator");
        assert_eq!(file.before_run(), Ok(None));
    }
}
