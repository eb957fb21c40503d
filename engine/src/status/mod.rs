//! Status files: what really runs, written back for operators and tools.
//!
//! In: the observed hosts (fresh, after acting), the desired state when the commit was
//! valid, and what this run did. Out: `<state>/status/engine.toml`,
//! `status/vms/<name>.toml`, `status/hosts/<name>.toml`, each written atomically.
//! Events of earlier runs are kept (the most recent [`MAX_EVENTS`]).

pub mod branch;
mod health;

pub use health::GuestHealth;
mod nics;
mod table;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use plasmavmc_specs::Desired;
use serde::{Deserialize, Serialize};

pub use nics::NicStatus;
pub use table::print_table;

use crate::execute::{Outcome, Report};
use crate::observe::{Capacity, Inventory, Observed, ObservedVm, Orphan, Retained, RunState};
use crate::plan::restart::{describe_exit, verdict, Verdict};
use crate::records::{create_private_dir, write_atomic, StateError};

/// Events kept per VM.
pub const MAX_EVENTS: usize = 20;

/// `status/engine.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineStatus {
    pub version: String,
    pub updated_at: String,
    /// Spec folder, relative to the repository top.
    pub spec_dir: String,
    /// What `plasmavmc watch` follows: the repository's git folder (or the remote's URL)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// …and the branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// The newest commit the engine read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision_seen: Option<String>,
    /// The newest commit applied completely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_revision: Option<String>,
    /// The newest commit the engine tried to apply (valid or not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempted_revision: Option<String>,
    /// Why the last attempt failed (validation errors as `path:line:col: message`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl EngineStatus {
    /// Marks this status as written now, by this version, for specs in `spec_dir`.
    pub fn stamp(&mut self, spec_dir: &str) {
        self.updated_at = crate::time::now();
        env!("CARGO_PKG_VERSION").clone_into(&mut self.version);
        spec_dir.clone_into(&mut self.spec_dir);
    }

    /// Puts `why`, a problem found beside an attempt (a damaged journal), first in the
    /// last error; returns the last error.
    pub fn add_problem(&mut self, why: &str) -> String {
        let error = match self.last_error.take() {
            Some(rest) => format!("{why}\n{rest}"),
            None => why.to_owned(),
        };
        self.last_error = Some(error.clone());
        error
    }

    /// Records an attempt to apply `revision` that ended with `report` (none: nothing was
    /// to be done) and left `pending` VMs: applied when nothing failed and nothing is
    /// pending, else the problems, one a line, are the last error. Returns them (empty
    /// when there are none).
    pub fn attempted(
        &mut self,
        revision: &str,
        report: Option<&Report>,
        pending: &[crate::plan::Pending],
    ) -> String {
        self.last_attempted_revision = Some(revision.to_owned());
        let problems = [
            report.map(Report::failures).unwrap_or_default(),
            crate::plan::Pending::lines(pending),
        ]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
        if problems.is_empty() {
            self.last_applied_revision = Some(revision.to_owned());
            self.last_error = None;
        } else {
            self.last_error = Some(problems.clone());
        }
        problems
    }
}

/// Phase of a VM as status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmPhase {
    Pending,
    Starting,
    Running,
    Stopping,
    Stopped,
    Migrating,
    /// Its QEMU runs but its liveness probe fails (until it is recovered).
    Unhealthy,
    Crashed,
    Failed,
    Unknown,
}

impl VmPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            VmPhase::Pending => "pending",
            VmPhase::Starting => "starting",
            VmPhase::Running => "running",
            VmPhase::Stopping => "stopping",
            VmPhase::Stopped => "stopped",
            VmPhase::Migrating => "migrating",
            VmPhase::Unhealthy => "unhealthy",
            VmPhase::Crashed => "crashed",
            VmPhase::Failed => "failed",
            VmPhase::Unknown => "unknown",
        }
    }

    /// True when the VM's QEMU runs its guest: `running`, and `unhealthy` (its QEMU
    /// runs, its liveness probe fails until it is recovered).
    pub fn runs_qemu(self) -> bool {
        matches!(self, VmPhase::Running | VmPhase::Unhealthy)
    }
}

/// Phase of a host as status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostPhase {
    /// It answers; placement uses it.
    Ready,
    /// It answers but is being drained (`state = "maintenance"`).
    Maintenance,
    /// Connected, but it missed heartbeats: not asked, its VMs unknown.
    Suspect,
    /// It does not answer (channel closed, silent for `down_after`, cannot be reached).
    Down,
    /// It does not answer and is known to be powered off.
    Fenced,
}

impl HostPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            HostPhase::Ready => "ready",
            HostPhase::Maintenance => "maintenance",
            HostPhase::Suspect => "suspect",
            HostPhase::Down => "down",
            HostPhase::Fenced => "fenced",
        }
    }
}

impl std::fmt::Display for HostPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing that happened to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEvent {
    pub at: String,
    pub kind: String,
    pub message: String,
}

/// `status/vms/<name>.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub phase: VmPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// When the current QEMU started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Starts after an exit the engine did not ask for.
    #[serde(default)]
    pub restarts: u32,
    /// What is known of the guest from the inside (`[health]` of its spec).
    #[serde(default, skip_serializing_if = "GuestHealth::is_empty")]
    pub health: GuestHealth,
    /// Commit of the spec the instance runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_revision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_hash: Option<String>,
    /// True when the instance runs the committed spec.
    #[serde(default)]
    pub up_to_date: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<VmEvent>,
    /// Its NICs: network, MAC, and the tap of bridged ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicStatus>,
}

impl VmStatus {
    /// The status of a VM nothing is known of yet but its name and `phase`.
    fn blank(name: &str, phase: VmPhase) -> Self {
        Self {
            name: name.to_owned(),
            phase,
            host: None,
            pid: None,
            since: None,
            restarts: 0,
            health: GuestHealth::default(),
            spec_revision: None,
            spec_hash: None,
            up_to_date: false,
            message: None,
            events: Vec::new(),
            nics: Vec::new(),
        }
    }
}

/// `status/hosts/<name>.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    pub name: String,
    pub phase: HostPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
    pub capacity: Capacity,
    pub allocated: Capacity,
    pub vms: Vec<String>,
    /// Why the host is not ready, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// QEMUs of ours that no instance accounts for (stopped only by `--prune`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orphans: Vec<Orphan>,
    /// Disks kept after their VM or disk left the specs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retained: Vec<Retained>,
    /// The Linux bridges the host has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bridges: Vec<String>,
    /// Networks its spec lists that it cannot serve, and why (`lan (no bridge br-lan)`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_networks: Vec<String>,
    /// Its CPU: model name, flags digest, the QEMU CPU models it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<crate::observe::HostCpu>,
}

/// Everything the status folder holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub engine: EngineStatus,
    pub vms: Vec<VmStatus>,
    pub hosts: Vec<HostStatus>,
}

impl Snapshot {
    /// Puts what the plan could not do (`vm: why` lines) into those VMs' messages: the
    /// status of a VM that will not run says why and what is needed.
    pub fn explain_pending(&mut self, pending: &[crate::plan::Pending]) {
        for p in pending {
            if let Some(status) = self.vms.iter_mut().find(|v| v.name == p.vm) {
                status.message = Some(p.why.clone());
            }
        }
    }

    /// Keeps what a long action in flight shows of its VM (the phase `migrating` and its
    /// progress, written by [`StatusDir::set_live`]) over what a look saw half-way.
    pub fn keep_live(&mut self, status: &StatusDir, in_flight: &BTreeMap<String, Vec<String>>) {
        for vm in self
            .vms
            .iter_mut()
            .filter(|v| in_flight.contains_key(&v.name))
        {
            if let Ok(Some(shown)) = status.vm(&vm.name) {
                if shown.phase == VmPhase::Migrating {
                    vm.phase = shown.phase;
                    vm.message = shown.message;
                }
            }
        }
    }
}

/// Errors reading or writing status files.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Write(#[from] StateError),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

/// The status folder.
#[derive(Debug, Clone)]
pub struct StatusDir {
    dir: PathBuf,
}

impl StatusDir {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn vm_path(&self, vm: &str) -> PathBuf {
        self.dir.join("vms").join(format!("{vm}.toml"))
    }

    /// Shows what a long action (a migration) is doing now: `vm`'s phase becomes
    /// `migrating` and its message `what`, until the next full status write.
    pub fn set_migrating(&self, vm: &str, what: &str) -> Result<(), StatusError> {
        let Some(mut status) = self.vm(vm)? else {
            return Ok(());
        };
        status.phase = VmPhase::Migrating;
        status.message = Some(what.to_owned());
        write_toml(&self.vm_path(vm), &status)
    }

    /// Shows what a long action is doing now, until the next full status write: `what`
    /// becomes `vm`'s message; a migration also sets the phase `migrating`, a download
    /// keeps the phase (a VM new to the status is `pending` meanwhile).
    pub fn set_live(
        &self,
        vm: &str,
        doing: crate::execute::Doing,
        what: &str,
    ) -> Result<(), StatusError> {
        use crate::execute::Doing;
        match doing {
            Doing::Migrating => self.set_migrating(vm, what),
            Doing::Downloading => {
                let mut status = self
                    .vm(vm)?
                    .unwrap_or_else(|| VmStatus::blank(vm, VmPhase::Pending));
                status.message = Some(what.to_owned());
                // The first apply of a repository downloads before any status exists.
                create_private_dir(&self.dir)?;
                create_private_dir(&self.dir.join("vms"))?;
                write_toml(&self.vm_path(vm), &status)
            }
        }
    }

    /// `vm`'s status file, if there is one.
    pub fn vm(&self, vm: &str) -> Result<Option<VmStatus>, StatusError> {
        read_toml(&self.vm_path(vm))
    }

    /// `engine.toml`, if there is one.
    pub fn engine(&self) -> Result<Option<EngineStatus>, StatusError> {
        read_toml(&self.dir.join("engine.toml"))
    }

    /// Reads what the status folder holds; missing files give defaults.
    pub fn read(&self) -> Result<Snapshot, StatusError> {
        let mut snap = Snapshot {
            engine: self.engine()?.unwrap_or_default(),
            ..Snapshot::default()
        };
        for (sub, push) in [("vms", 0), ("hosts", 1)] {
            let Ok(entries) = fs::read_dir(self.dir.join(sub)) else {
                continue;
            };
            let mut paths: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect();
            paths.sort();
            for path in paths {
                if push == 0 {
                    snap.vms.extend(read_toml::<VmStatus>(&path)?);
                } else {
                    snap.hosts.extend(read_toml::<HostStatus>(&path)?);
                }
            }
        }
        Ok(snap)
    }

    /// Where each VM was last seen, by the VM status files (what seeds the engine's
    /// record of where VMs are when it has none yet).
    pub fn last_known(&self) -> BTreeMap<String, Vec<String>> {
        self.read()
            .map(|s| {
                s.vms
                    .into_iter()
                    .filter_map(|v| Some((v.name, vec![v.host?])))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Writes the engine file only (e.g. after a refused commit).
    pub fn write_engine(&self, engine: &EngineStatus) -> Result<(), StatusError> {
        create_private_dir(&self.dir)?;
        write_toml(&self.dir.join("engine.toml"), engine)
    }

    /// Writes every file of `snap` and removes VM/host files that are no longer in it.
    pub fn write(&self, snap: &Snapshot) -> Result<(), StatusError> {
        self.write_engine(&snap.engine)?;
        for (sub, names) in [
            (
                "vms",
                snap.vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            ),
            (
                "hosts",
                snap.hosts.iter().map(|h| h.name.as_str()).collect(),
            ),
        ] {
            let dir = self.dir.join(sub);
            create_private_dir(&dir)?;
            for entry in fs::read_dir(&dir)
                .map_err(|source| StatusError::Read {
                    path: dir.clone(),
                    source,
                })?
                .flatten()
            {
                let path = entry.path();
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                if path.extension().is_some_and(|e| e == "toml") && !names.contains(&stem) {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        for vm in &snap.vms {
            write_toml(&self.vm_path(&vm.name), vm)?;
        }
        for host in &snap.hosts {
            write_toml(
                &self.dir.join("hosts").join(format!("{}.toml", host.name)),
                host,
            )?;
        }
        Ok(())
    }

    /// Builds the new snapshot from what runs now, keeping earlier events and counters.
    pub fn build(
        &self,
        engine: EngineStatus,
        desired: Option<&Desired>,
        observed: &Observed,
        report: Option<&Report>,
        extra: &[(String, VmEvent)],
    ) -> Snapshot {
        let now_ms = crate::time::now_ms();
        let mut vms: BTreeMap<String, VmStatus> = BTreeMap::new();
        // VMs that entered `failed` now: their event goes after the exits that caused it.
        let mut newly_failed: Vec<(String, String)> = Vec::new();
        let previous = |name: &str| read_toml::<VmStatus>(&self.vm_path(name)).ok().flatten();
        for (host, inv) in &observed.hosts {
            for (name, o) in &inv.vms {
                let prev = previous(name);
                let want = desired.and_then(|d| d.vms.get(name));
                let (phase, message) = observed_phase(desired, o, now_ms);
                let events = prev.as_ref().map(|p| p.events.clone()).unwrap_or_default();
                if phase == VmPhase::Failed
                    && prev.as_ref().is_none_or(|p| p.phase != VmPhase::Failed)
                {
                    newly_failed.push((name.clone(), message.clone().unwrap_or_default()));
                }
                // Two copies (a move in progress, a returning host): the running one speaks.
                if vms.contains_key(name) && o.state != RunState::Running {
                    continue;
                }
                vms.insert(
                    name.clone(),
                    VmStatus {
                        name: name.clone(),
                        phase,
                        host: Some(host.clone()),
                        pid: o.pid,
                        since: o.started_at.clone().filter(|_| o.state.has_process()),
                        restarts: o.restarts,
                        health: GuestHealth::of(o),
                        spec_revision: Some(o.revision.clone()),
                        spec_hash: Some(o.spec_hash.clone()),
                        up_to_date: want.is_some_and(|w| w.hash == o.spec_hash),
                        message,
                        events,
                        nics: nics::nics_of(name, &o.spec),
                    },
                );
            }
        }
        // VMs that may be on a host that does not answer: unknown, never reported
        // running (nor pending, nor stopped: they may still run there), unless a copy
        // that answers runs (healthy or not).
        for name in observed.whereabouts.keys() {
            if vms.get(name).is_some_and(|v| v.phase.runs_qemu()) {
                continue;
            }
            let found = vms.remove(name);
            let lost = match &found {
                Some(_) => observed.unknown_on(name),
                None => observed.lost_on(name),
            };
            let Some(host) = lost else {
                vms.extend(found.map(|f| (name.clone(), f)));
                continue;
            };
            let why = observed.unreachable.get(host).cloned().unwrap_or_default();
            let want = desired.and_then(|d| d.vms.get(name));
            let prev = found.or_else(|| previous(name));
            vms.insert(name.clone(), unknown(name, host, why, prev, want));
        }
        if let Some(d) = desired {
            let missing: Vec<&String> = d.vms.keys().filter(|n| !vms.contains_key(*n)).collect();
            for name in missing {
                vms.insert(name.clone(), pending(&d.vms[name], previous(name)));
            }
        }
        for (vm, event) in extra {
            if let Some(status) = vms.get_mut(vm) {
                status.events.push(event.clone());
            }
        }
        if let Some(report) = report {
            apply_report(&mut vms, report);
        }
        for (vm, why) in newly_failed {
            if let Some(status) = vms.get_mut(&vm) {
                status.events.push(VmEvent {
                    at: crate::time::stamp_ms(),
                    kind: "failed".to_owned(),
                    message: why,
                });
            }
        }
        for status in vms.values_mut() {
            let excess = status.events.len().saturating_sub(MAX_EVENTS);
            status.events.drain(..excess);
        }
        let mut hosts: Vec<HostStatus> = observed
            .hosts
            .iter()
            .map(|(name, inv)| host_status(name, inv, desired))
            .collect();
        hosts.extend(
            observed
                .unreachable
                .iter()
                .map(|(name, why)| unreachable_host(name, why, observed)),
        );
        Snapshot {
            engine,
            vms: vms.into_values().collect(),
            hosts,
        }
    }
}

/// Phase and message of an instance from what its host observed.
fn observed_phase(
    desired: Option<&Desired>,
    o: &ObservedVm,
    now_ms: u64,
) -> (VmPhase, Option<String>) {
    match o.state {
        RunState::Running => match o.liveness.as_ref().filter(|l| !l.ok) {
            Some(l) => (
                VmPhase::Unhealthy,
                Some(format!(
                    "its liveness probe fails since {}: {}",
                    l.since, l.last
                )),
            ),
            None => (VmPhase::Running, None),
        },
        RunState::Paused if migrating(o) => (
            VmPhase::Migrating,
            Some(format!(
                "QEMU is {}{}",
                o.detail.as_deref().unwrap_or("paused"),
                if o.incoming {
                    " (migration target)"
                } else {
                    ""
                }
            )),
        ),
        RunState::Paused => (VmPhase::Starting, o.detail.clone()),
        RunState::Unresponsive => (VmPhase::Unknown, o.detail.clone()),
        RunState::Stopped => (VmPhase::Stopped, None),
        RunState::Exited => exited_phase(desired, o, now_ms),
    }
}

/// A QEMU paused by a live migration: its target, or a source mid-way or done.
fn migrating(o: &ObservedVm) -> bool {
    o.incoming || o.paused.is_some_and(crate::observe::Paused::by_migration)
}

/// A VM that may be on `host`, which does not answer (`why`).
fn unknown(
    name: &str,
    host: &str,
    why: String,
    prev: Option<VmStatus>,
    want: Option<&plasmavmc_specs::VmEntry>,
) -> VmStatus {
    let mut status = prev.unwrap_or_else(|| VmStatus::blank(name, VmPhase::Unknown));
    if let Some(w) = want {
        status.nics = nics::nics_of(name, &w.spec);
    }
    status.phase = VmPhase::Unknown;
    status.host = Some(host.to_owned());
    status.pid = None;
    status.since = None;
    status.up_to_date = want.is_some_and(|w| status.spec_hash.as_deref() == Some(w.hash.as_str()));
    status.message = Some(why);
    status
}

/// A VM of the specs with no instance anywhere (yet).
fn pending(want: &plasmavmc_specs::VmEntry, prev: Option<VmStatus>) -> VmStatus {
    VmStatus {
        name: want.name.clone(),
        phase: VmPhase::Pending,
        host: want.spec.host.clone(),
        pid: None,
        since: None,
        restarts: prev.as_ref().map_or(0, |p| p.restarts),
        health: GuestHealth::default(),
        spec_revision: None,
        spec_hash: None,
        up_to_date: false,
        message: Some("not created yet".to_owned()),
        events: prev.map(|p| p.events).unwrap_or_default(),
        nics: nics::nics_of(&want.name, &want.spec),
    }
}

/// A host that was not asked (down, fenced, or suspect: connected but missing
/// heartbeats): what is known is which VMs were last seen there.
fn unreachable_host(name: &str, why: &str, observed: &Observed) -> HostStatus {
    let fenced = observed.fenced.get(name);
    let last_heard = observed.suspect.get(name);
    let phase = match (last_heard, fenced) {
        (Some(_), _) => HostPhase::Suspect,
        (None, Some(_)) => HostPhase::Fenced,
        (None, None) => HostPhase::Down,
    };
    HostStatus {
        name: name.to_owned(),
        phase,
        last_heartbeat: last_heard.map(|ms| crate::time::at_ms(*ms)),
        capacity: Capacity::default(),
        allocated: Capacity::default(),
        vms: observed
            .whereabouts
            .iter()
            .filter(|(_, hosts)| hosts.iter().any(|h| h == name))
            .map(|(vm, _)| vm.clone())
            .collect(),
        orphans: Vec::new(),
        retained: Vec::new(),
        bridges: Vec::new(),
        missing_networks: Vec::new(),
        cpu: None,
        message: Some(fenced.map_or_else(|| why.to_owned(), |how| format!("{why}; {how}"))),
    }
}

/// A host's status from its inventory: what it has, what running VMs take.
fn host_status(name: &str, inv: &Inventory, desired: Option<&Desired>) -> HostStatus {
    let running: Vec<_> = inv.vms.values().filter(|v| v.state.has_process()).collect();
    let spec = desired.and_then(|d| d.hosts.get(name)).map(|h| &h.spec);
    let missing_networks = match (desired, spec) {
        (Some(d), Some(s)) => {
            nics::missing_networks(&s.networks, &d.cluster.networks, &inv.bridges)
        }
        _ => Vec::new(),
    };
    let maintenance = spec.is_some_and(|s| s.state == plasmavmc_specs::HostState::Maintenance);
    HostStatus {
        name: name.to_owned(),
        phase: if maintenance {
            HostPhase::Maintenance
        } else {
            HostPhase::Ready
        },
        last_heartbeat: Some(crate::time::now()),
        capacity: Capacity {
            vcpus: spec.and_then(|s| s.vcpus).unwrap_or(inv.capacity.vcpus),
            memory_mb: spec
                .and_then(|s| s.memory_mb)
                .unwrap_or(inv.capacity.memory_mb),
        },
        allocated: Capacity {
            // Saturating: specs accept any u64, and a status must never panic on one.
            vcpus: running
                .iter()
                .fold(0, |n: u32, v| n.saturating_add(v.spec.vcpus)),
            memory_mb: running
                .iter()
                .fold(0, |n: u64, v| n.saturating_add(v.spec.memory_mb)),
        },
        vms: inv.vms.keys().cloned().collect(),
        orphans: inv.orphans.clone(),
        retained: inv.retained.clone(),
        bridges: inv.bridges.clone(),
        missing_networks,
        cpu: inv.cpu.clone(),
        // A drain's progress.
        message: maintenance.then(|| match inv.vms.len() {
            0 => "drained: no VM left".to_owned(),
            n => format!(
                "draining: {n} VM{} left ({})",
                if n == 1 { "" } else { "s" },
                inv.vms.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        }),
    }
}

/// Phase and message of a VM whose QEMU exited without being asked: what the restart
/// policy makes of it.
fn exited_phase(
    desired: Option<&Desired>,
    o: &ObservedVm,
    now_ms: u64,
) -> (VmPhase, Option<String>) {
    let Some(want) = desired.and_then(|d| d.vms.get(&o.name).map(|w| (d, w))) else {
        return (
            VmPhase::Crashed,
            Some("QEMU exited without the engine asking".to_owned()),
        );
    };
    let (d, want) = want;
    match verdict(want.spec.restart, &d.cluster.restart, o, now_ms) {
        Verdict::Restart { .. } => (
            VmPhase::Crashed,
            Some(format!("{}; restarting", describe_exit(o))),
        ),
        Verdict::Wait { until_ms, .. } => {
            let secs = until_ms.saturating_sub(now_ms).div_ceil(1000);
            (
                VmPhase::Crashed,
                Some(format!(
                    "{}; restart in {secs}s (backoff)",
                    describe_exit(o)
                )),
            )
        }
        Verdict::Stay { why } => (VmPhase::Stopped, Some(why)),
        Verdict::GiveUp { why } => (VmPhase::Failed, Some(why)),
    }
}

/// Records this run's steps as events; a failure becomes the VM's message.
fn apply_report(vms: &mut BTreeMap<String, VmStatus>, report: &Report) {
    for step in &report.steps {
        let Some(status) = vms.get_mut(step.action.vm()) else {
            continue;
        };
        let (kind, message) = match &step.outcome {
            Outcome::Done { detail, .. } => (step.action.op().to_owned(), detail.clone()),
            Outcome::Failed { error } => {
                status.message = Some(format!("{} failed: {error}", step.action.op()));
                (format!("{}-failed", step.action.op()), error.clone())
            }
            Outcome::Skipped { .. } => continue,
        };
        status.events.push(VmEvent {
            at: step.at.clone(),
            kind,
            message,
        });
    }
}

fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, StatusError> {
    match fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .map(Some)
            .map_err(|source| StatusError::Parse {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StatusError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write_toml<T: Serialize>(path: &Path, value: &T) -> Result<(), StatusError> {
    let text = toml::to_string_pretty(value).expect("status always serialises");
    Ok(write_atomic(path, text.as_bytes())?)
}

#[cfg(test)]
mod tests;
