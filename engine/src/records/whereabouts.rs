//! Where each VM may be: the engine's own durable record of the hosts that may hold an
//! instance of each VM (a running or stopped QEMU, or only its folder).
//!
//! `<state>/whereabouts.toml`, one line per VM: `app = ["hv1", "hv3"]` (several hosts while
//! a move is in flight, or after a fenced host returns), the host noted last at the end.
//!
//! - A host is added *before* an action may put the VM on it (create, recover, start, a
//!   move's target), fsync'd, so a crash, a failed call or a timeout never leaves a copy
//!   the record does not name.
//! - A host is removed only when that host answers and does not have the VM (see
//!   [`Whereabouts::settle`]); a host that does not answer keeps its VMs, for as long as
//!   it takes. While it is not fenced, those VMs are `unknown` and are started nowhere
//!   else (DESIGN.md §4, invariant 1).
//!
//! - While an action of a VM is in flight (the daemon runs several at once), no host
//!   of that VM is removed: a look that began before the action ended may have missed
//!   the copy it made.
//!
//! Every change is a read, change, write under one lock of the process, so an action
//! noting a host and a look settling the record never lose each other's change.
//!
//! It is not derived from the status files (an output, rewritten from whatever the last
//! look saw): only the first run of an engine without this file seeds it from them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{write_atomic, StateError};

/// VM name -> the hosts that may hold it, the one noted last at the end.
pub type Places = BTreeMap<String, Vec<String>>;

/// What each host that answered holds: host name -> the VMs (instances and orphan
/// QEMUs' folders) it reported.
pub type Answers<'a> = BTreeMap<&'a str, Vec<&'a str>>;

/// Held across each read, change and write of a record (one state directory has one
/// engine process: its state lock).
static CHANGING: Mutex<()> = Mutex::new(());

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordFile {
    #[serde(default)]
    vms: Places,
}

/// The record file of a state directory.
#[derive(Debug, Clone)]
pub struct Whereabouts {
    path: PathBuf,
}

impl Whereabouts {
    pub fn new(state_root: &Path) -> Self {
        Self {
            path: state_root.join("whereabouts.toml"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record; `Ok(None)` when there is none yet (a new state directory, or one
    /// written by an older engine).
    pub fn read(&self) -> Result<Option<Places>, StateError> {
        let Some(text) = super::read_if_there(&self.path)? else {
            return Ok(None);
        };
        toml::from_str::<RecordFile>(&text)
            .map(|f| Some(f.vms))
            .map_err(|e| StateError::Parse {
                path: self.path.clone(),
                message: e.message().to_owned(),
            })
    }

    /// Replaces the record (atomically, fsync'd).
    pub fn write(&self, places: &Places) -> Result<(), StateError> {
        let file = RecordFile {
            vms: places.clone(),
        };
        let body = toml::to_string(&file).expect("a record of strings serialises");
        let text = format!(
            "# Where each VM may be (PlasmaVMC's own record; never edit it while an engine runs).\n{body}"
        );
        write_atomic(&self.path, text.as_bytes())
    }

    /// Notes that `vm` may be on each of `hosts` from now on, before anything is done
    /// there. Writes only when the record changes (a host noted again moves to the end).
    pub fn note(&self, vm: &str, hosts: &[&str]) -> Result<(), StateError> {
        let _changing = CHANGING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut places = self.read()?.unwrap_or_default();
        let before = places.get(vm).cloned();
        let entry = places.entry(vm.to_owned()).or_default();
        for host in hosts {
            entry.retain(|h| h != host);
            entry.push((*host).to_owned());
        }
        if places.get(vm) == before.as_ref() {
            return Ok(());
        }
        self.write(&places)
    }

    /// Reads the record (or, when there is none or it is damaged, `rebuild`s it: the
    /// error is returned beside), settles it with `answers` keeping every host of the VMs
    /// in `in_flight`, and writes it when it changed or was rebuilt — all under the
    /// record's lock. Returns the places, and why the record had to be rebuilt.
    pub fn settled(
        &self,
        rebuild: impl FnOnce() -> Places,
        answers: &Answers<'_>,
        in_flight: &BTreeSet<&str>,
    ) -> (Places, Option<StateError>) {
        let _changing = CHANGING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut places, damaged, fresh) = match self.read() {
            Ok(Some(places)) => (places, None, false),
            Ok(None) => (rebuild(), None, true),
            Err(e) => (rebuild(), Some(e), true),
        };
        if Self::settle(&mut places, answers, in_flight) || fresh {
            if let Err(e) = self.write(&places) {
                tracing::error!(error = %crate::errors::error_chain(&e), "cannot update the record of where VMs are");
            }
        }
        (places, damaged)
    }

    /// Brings `places` up to date with the hosts that answered: each of them holds exactly
    /// the VMs it reported, except that the VMs `in_flight` lose no host. Hosts that did
    /// not answer keep what the record says of them. True when anything changed.
    pub fn settle(places: &mut Places, answers: &Answers<'_>, in_flight: &BTreeSet<&str>) -> bool {
        let before = places.clone();
        for (vm, hosts) in places.iter_mut() {
            if in_flight.contains(vm.as_str()) {
                continue;
            }
            hosts.retain(|h| {
                answers
                    .get(h.as_str())
                    .is_none_or(|vms| vms.contains(&vm.as_str()))
            });
        }
        places.retain(|_, hosts| !hosts.is_empty());
        for (host, vms) in answers {
            for vm in vms {
                let entry = places.entry((*vm).to_owned()).or_default();
                if !entry.iter().any(|h| h == host) {
                    entry.push((*host).to_owned());
                }
            }
        }
        *places != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn places(rows: &[(&str, &[&str])]) -> Places {
        rows.iter()
            .map(|(vm, hosts)| {
                (
                    (*vm).to_owned(),
                    hosts.iter().map(|h| (*h).to_owned()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn a_host_that_does_not_answer_keeps_its_vms() {
        let mut p = places(&[
            ("app", &["hv3"]),
            ("web", &["hv1"]),
            ("db", &["hv1", "hv2"]),
        ]);
        // hv1 answers with web only; hv2 answers with nothing; hv3 is silent.
        let answers = Answers::from([("hv1", vec!["web"]), ("hv2", vec![])]);
        assert!(Whereabouts::settle(&mut p, &answers, &BTreeSet::new()));
        assert_eq!(p, places(&[("app", &["hv3"]), ("web", &["hv1"])]));
        // Nothing new: nothing changes.
        assert!(!Whereabouts::settle(&mut p, &answers, &BTreeSet::new()));
    }

    #[test]
    fn a_vm_with_an_action_in_flight_loses_no_host() {
        // The look asked hv2 before the move put db there: hv2's answer lacks it.
        let mut p = places(&[("db", &["hv1", "hv2"]), ("web", &["hv2"])]);
        let answers = Answers::from([("hv1", vec!["db"]), ("hv2", vec![])]);
        assert!(Whereabouts::settle(
            &mut p,
            &answers,
            &BTreeSet::from(["db"])
        ));
        assert_eq!(p, places(&[("db", &["hv1", "hv2"])]));
    }

    #[test]
    fn notes_and_settles_at_once_lose_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = Whereabouts::new(dir.path());
        std::thread::scope(|s| {
            for i in 0..8 {
                let record = &record;
                s.spawn(move || {
                    for j in 0..20 {
                        let vm = format!("vm{i}-{j}");
                        record.note(&vm, &["hv1"]).expect("note");
                        let answers = Answers::new();
                        record.settled(Places::new, &answers, &BTreeSet::new());
                    }
                });
            }
        });
        let all = record.read().expect("read").expect("some");
        assert_eq!(all.len(), 160, "every note survives the others");
    }

    #[test]
    fn what_an_answering_host_reports_is_added_at_the_end() {
        let mut p = places(&[("app", &["hv3"])]);
        let answers = Answers::from([("hv1", vec!["app", "new"])]);
        assert!(Whereabouts::settle(&mut p, &answers, &BTreeSet::new()));
        assert_eq!(p, places(&[("app", &["hv3", "hv1"]), ("new", &["hv1"])]));
    }

    #[test]
    fn notes_are_durable_and_the_last_noted_host_comes_last() -> Result<(), StateError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = Whereabouts::new(dir.path());
        assert_eq!(record.read()?, None);
        record.note("app", &["hv1"])?;
        record.note("app", &["hv1", "hv2"])?;
        record.note("app", &["hv1"])?;
        assert_eq!(record.read()?, Some(places(&[("app", &["hv2", "hv1"])])));
        Ok(())
    }

    #[test]
    fn a_damaged_record_is_an_error_not_an_empty_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = Whereabouts::new(dir.path());
        std::fs::write(record.path(), "vms = [").expect("write");
        assert!(matches!(record.read(), Err(StateError::Parse { .. })));
        assert!(record.note("app", &["hv1"]).is_err(), "never overwrites it");
    }
}
