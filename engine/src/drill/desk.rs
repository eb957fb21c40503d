//! Fault requests of `plasmavmc drill` to the running daemon, and its answers.
//!
//! While `plasmavmc watch` runs, it alone talks to the hosts (one controller per state
//! directory; a QMP socket serves one client), so a drill against a real cluster cannot
//! reach a VM's QEMU itself. It writes `<state>/drill/<id>.request.toml` and sends the
//! daemon SIGHUP; the daemon inflicts the fault through the VM's host and writes
//! `<id>.answer.toml`. A request older than [`FRESH`] is answered as expired and never
//! carried out: a drill that died must not strike later.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::records::{create_private_dir, write_atomic, StateError};
use crate::wire::Fault;

/// How long a request may wait for the daemon.
pub const FRESH: Duration = Duration::from_secs(30);

/// "Do this to that VM", from `plasmavmc drill`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillRequest {
    pub id: String,
    pub vm: String,
    /// Where the drill saw it run (its status); the host refuses when it does not.
    pub host: String,
    pub fault: Fault,
    pub at: String,
}

/// What the daemon did about a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillAnswer {
    pub id: String,
    /// The QEMU the fault struck.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// When the daemon asked the host (RFC 3339, ms).
    pub at: String,
    /// Why it was not carried out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The `drill` folder of a state directory.
#[derive(Debug, Clone)]
pub struct DrillDesk {
    dir: PathBuf,
}

impl DrillDesk {
    pub fn new(state_root: &Path) -> Self {
        Self {
            dir: state_root.join("drill"),
        }
    }

    /// Files a request; returns it (its id names the answer to wait for).
    pub fn ask(&self, vm: &str, host: &str, fault: Fault) -> Result<DrillRequest, StateError> {
        create_private_dir(&self.dir)?;
        let request = DrillRequest {
            id: format!(
                "{}-{}-{}",
                crate::time::now_compact(),
                std::process::id(),
                crate::time::now_ms() % 1000
            ),
            vm: vm.to_owned(),
            host: host.to_owned(),
            fault,
            at: crate::time::stamp_ms(),
        };
        let text = toml::to_string(&request).expect("a drill request serialises");
        write_atomic(&self.request_path(&request.id), text.as_bytes())?;
        Ok(request)
    }

    /// Every request waiting, oldest first; unreadable ones are removed.
    pub fn requests(&self) -> Vec<DrillRequest> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<DrillRequest> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".request.toml"))
            .filter_map(|p| {
                let parsed = fs::read_to_string(&p)
                    .ok()
                    .and_then(|t| toml::from_str(&t).ok());
                if parsed.is_none() {
                    let _ = fs::remove_file(&p);
                }
                parsed
            })
            .collect();
        out.sort_by(|a, b| a.at.cmp(&b.at));
        out
    }

    /// True when `request` waited too long to be carried out.
    pub fn expired(request: &DrillRequest, now: SystemTime) -> bool {
        crate::time::parse(&request.at)
            .is_none_or(|at| now.duration_since(at).unwrap_or_default() > FRESH)
    }

    /// Writes the answer and removes its request.
    pub fn answer(&self, answer: &DrillAnswer) -> Result<(), StateError> {
        let text = toml::to_string(answer).expect("a drill answer serialises");
        write_atomic(&self.answer_path(&answer.id), text.as_bytes())?;
        let _ = fs::remove_file(self.request_path(&answer.id));
        Ok(())
    }

    /// Takes the answer to request `id`, when there is one.
    pub fn take_answer(&self, id: &str) -> Option<DrillAnswer> {
        let path = self.answer_path(id);
        let answer = toml::from_str(&fs::read_to_string(&path).ok()?).ok()?;
        let _ = fs::remove_file(path);
        Some(answer)
    }

    /// Withdraws a request nobody answered.
    pub fn withdraw(&self, id: &str) {
        let _ = fs::remove_file(self.request_path(id));
    }

    fn request_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.request.toml"))
    }

    fn answer_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.answer.toml"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_answered_once_and_an_old_one_expires() -> Result<(), StateError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let desk = DrillDesk::new(dir.path());
        assert!(desk.requests().is_empty());
        let req = desk.ask("app", "hv1", Fault::KillQemu)?;
        assert_eq!(desk.requests(), vec![req.clone()]);
        assert!(!DrillDesk::expired(&req, SystemTime::now()));
        assert!(DrillDesk::expired(
            &req,
            SystemTime::now() + FRESH + Duration::from_secs(1)
        ));
        let answer = DrillAnswer {
            id: req.id.clone(),
            pid: Some(7),
            at: crate::time::stamp_ms(),
            error: None,
        };
        desk.answer(&answer)?;
        assert!(desk.requests().is_empty(), "answered requests are gone");
        assert_eq!(desk.take_answer(&req.id), Some(answer));
        assert_eq!(desk.take_answer(&req.id), None, "an answer is taken once");
        Ok(())
    }

    #[test]
    fn garbage_in_the_folder_is_dropped() -> Result<(), StateError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let desk = DrillDesk::new(dir.path());
        desk.ask("app", "hv1", Fault::Nmi)?;
        fs::write(dir.path().join("drill/x.request.toml"), "not = [toml").expect("write garbage");
        assert_eq!(desk.requests().len(), 1);
        assert!(!dir.path().join("drill/x.request.toml").exists());
        Ok(())
    }
}
