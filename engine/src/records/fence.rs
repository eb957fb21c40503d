//! Fencing records: which hosts are known to be powered off, how, and since when.
//!
//! `<state>/fence/<host>.toml`, written when a host's `fence` command exits 0 or an
//! operator runs `plasmavmc fence confirm HOST`, and removed when the host answers
//! again (it has rejoined; its stale copies are cleaned up). Only a fenced host's VMs
//! are ever recovered elsewhere.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{create_private_dir, write_atomic, StateError};

/// One fencing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    pub host: String,
    pub at: String,
    /// `fence command` or `operator`.
    pub by: String,
}

/// The fence folder of a state directory.
#[derive(Debug, Clone)]
pub struct FenceRecords {
    dir: PathBuf,
}

impl FenceRecords {
    pub fn new(state_root: &Path) -> Self {
        Self {
            dir: state_root.join("fence"),
        }
    }

    /// Records that `host` is powered off.
    pub fn record(&self, host: &str, by: &str) -> Result<FenceRecord, StateError> {
        create_private_dir(&self.dir)?;
        let record = FenceRecord {
            host: host.to_owned(),
            at: crate::time::now(),
            by: by.to_owned(),
        };
        let text = toml::to_string(&record).expect("a fence record serialises");
        write_atomic(&self.dir.join(format!("{host}.toml")), text.as_bytes())?;
        Ok(record)
    }

    /// Every fenced host, described (`fenced by operator at 2026-...`).
    pub fn all(&self) -> BTreeMap<String, String> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return BTreeMap::new();
        };
        entries
            .flatten()
            .filter_map(|e| toml::from_str::<FenceRecord>(&fs::read_to_string(e.path()).ok()?).ok())
            .map(|r| (r.host.clone(), format!("fenced by {} at {}", r.by, r.at)))
            .collect()
    }

    /// Forgets the fencing of `host` (it answers again); true when there was one.
    pub fn clear(&self, host: &str) -> bool {
        fs::remove_file(self.dir.join(format!("{host}.toml"))).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_listed_and_cleared() -> Result<(), StateError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let fences = FenceRecords::new(dir.path());
        assert!(fences.all().is_empty());
        fences.record("hv1", "operator")?;
        assert!(fences.all()["hv1"].starts_with("fenced by operator at "));
        assert!(fences.clear("hv1"));
        assert!(fences.all().is_empty());
        assert!(!fences.clear("hv1"), "nothing left to clear");
        Ok(())
    }
}
