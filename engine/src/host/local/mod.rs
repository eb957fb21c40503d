//! [`Host`] on this machine: QEMU processes in instance folders under a root.
//!
//! Layout and instance file: [`crate::qemu::instance`]. Every method re-reads the
//! folder, so a restarted engine (or a second one after the first died) sees the same
//! truth. The power state is written to `instance.toml` *before* acting, so a stop the
//! engine asked for is never mistaken for a crash, and a crash mid-start is visible.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use plasmavmc_specs::Power;
use tracing::{info, warn};

mod disks;
mod folder;
mod migrate;
mod start;
mod stop;

use super::monitor::Monitor;
use super::{Host, HostError};
use crate::observe::{Capacity, Inventory, ObservedVm, Orphan, Retained, RunState};
use crate::qemu::instance::{self, InstanceDir, InstanceFile, VmInstance};
use crate::qemu::process;
use crate::wire::StopOutcome;

/// How long to wait for a QMP answer when only asking what QEMU does.
const QMP_PROBE: Duration = Duration::from_secs(3);
/// How long QEMU may take to exit after `quit` or SIGKILL.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// This machine, rooted at a folder.
#[derive(Debug, Clone)]
pub struct LocalHost {
    name: String,
    root: PathBuf,
    accel: plasmavmc_specs::Accel,
    qmp_ready: Duration,
    monitor: Arc<Monitor>,
}

impl LocalHost {
    /// `accel` is the host's default for VMs whose spec says `auto`; `qmp_ready` bounds
    /// spawn → QMP answering.
    pub fn new(
        name: &str,
        root: &Path,
        accel: plasmavmc_specs::Accel,
        qmp_ready: Duration,
    ) -> Self {
        Self {
            name: name.to_owned(),
            root: root.to_path_buf(),
            accel,
            qmp_ready,
            monitor: Monitor::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, vm: &str) -> InstanceDir {
        InstanceDir::new(&self.root, vm)
    }

    fn read(&self, vm: &str) -> Result<(InstanceDir, InstanceFile), HostError> {
        let dir = self.dir(vm);
        if !dir.exists() {
            return Err(HostError::NoInstance { vm: vm.to_owned() });
        }
        let inst = dir.read().map_err(|source| HostError::Instance {
            vm: vm.to_owned(),
            source: Box::new(source),
        })?;
        Ok((dir, inst))
    }

    fn write(dir: &InstanceDir, inst: &InstanceFile) -> Result<(), HostError> {
        dir.write(inst).map_err(|source| HostError::Instance {
            vm: inst.vm.name.clone(),
            source: Box::new(source),
        })
    }

    /// The pid of this instance's QEMU when it is alive (checked by uuid). Without a
    /// valid pid file (QEMU killed before writing it, file lost), `/proc` is searched, so
    /// a running QEMU is never missed and never started twice.
    fn live_pid(dir: &InstanceDir, inst: &InstanceFile) -> Option<u32> {
        dir.pid()
            .filter(|pid| process::is_instance(*pid, &inst.uuid))
            .or_else(|| process::find_by_uuid(&inst.uuid).into_iter().min())
    }

    async fn observe_one(&self, dir: &InstanceDir, mut inst: InstanceFile) -> ObservedVm {
        let pid = Self::live_pid(dir, &inst);
        let (state, detail): (RunState, Option<String>) = match pid {
            // Nothing ran: the next start is the same start again, not a restart.
            None if inst.power == Power::Running && inst.starting => (
                RunState::Stopped,
                Some("its start was cut short before QEMU ran".to_owned()),
            ),
            None if inst.power == Power::Running => {
                (RunState::Exited, Some("QEMU is not running".to_owned()))
            }
            None => (RunState::Stopped, None),
            Some(pid) => match self
                .monitor
                .qmp(dir, &inst.vm.name, &inst.uuid, pid, QMP_PROBE)
                .await
            {
                Ok(qmp) => match qmp.query_status().await {
                    Ok(s) if s.running => (RunState::Running, None),
                    Ok(s) => (RunState::Paused, Some(s.status)),
                    Err(e) => (RunState::Unresponsive, Some(format!("query-status: {e}"))),
                },
                Err(e) => (RunState::Unresponsive, Some(format!("QMP: {e}"))),
            },
        };
        if state == RunState::Running {
            Self::settle(dir, &mut inst);
        }
        ObservedVm {
            name: inst.vm.name,
            uuid: inst.uuid,
            state,
            pid,
            power: inst.power,
            revision: inst.vm.revision,
            spec_hash: inst.vm.spec_hash,
            spec: inst.vm.spec,
            started_at: inst.started_at,
            paused: (state == RunState::Paused)
                .then(|| crate::observe::Paused::of(detail.as_deref().unwrap_or_default())),
            detail,
            last_exit: inst.last_exit,
            exits: inst.exits,
            restarts: inst.restarts,
            incoming: inst.incoming.is_some(),
        }
    }

    fn scan_retained(&self) -> Vec<Retained> {
        let Ok(entries) = fs::read_dir(instance::retained_dir(&self.root)) else {
            return Vec::new();
        };
        let mut out: Vec<Retained> = entries
            .flatten()
            .filter_map(|e| fs::read_to_string(e.path().join("retained.toml")).ok())
            .filter_map(|t| toml::from_str(&t).ok())
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    /// Brings the record of an instance whose guest runs up to date when the agent died
    /// between a step and writing it down: a start whose QEMU came up (`starting` still
    /// set), a migration target resumed (`incoming` still set, power still `stopped`).
    /// Left stale, a later exit of this QEMU would not count as a crash, and the target
    /// would be taken for a half-made copy holding no data.
    fn settle(dir: &InstanceDir, inst: &mut InstanceFile) {
        if !inst.starting && inst.incoming.is_none() {
            return;
        }
        if inst.incoming.take().is_some() {
            inst.power = Power::Running;
            inst.started_at = Some(crate::time::now());
            info!(vm = %inst.vm.name, "the migrated guest runs here: its migration record is done");
        }
        inst.starting = false;
        if let Err(e) = dir.write(inst) {
            warn!(vm = %inst.vm.name, error = %e, "cannot bring the instance record up to date");
        }
    }
}

/// QEMUs running in an instance folder of `root` that no observed instance accounts for.
fn scan_orphans(root: &Path, vms: &std::collections::BTreeMap<String, ObservedVm>) -> Vec<Orphan> {
    let Ok(dir) = instance::vms_dir(root).canonicalize() else {
        return Vec::new();
    };
    let known: std::collections::HashSet<u32> = vms.values().filter_map(|v| v.pid).collect();
    let mut out: Vec<Orphan> = process::qemus_in(&dir)
        .into_iter()
        .filter(|(pid, _)| !known.contains(pid))
        .map(|(pid, cwd)| {
            let folder = cwd
                .strip_prefix(&dir)
                .ok()
                .and_then(|p| p.iter().next())
                .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
            Orphan { pid, folder }
        })
        .collect();
    out.sort_by_key(|o| o.pid);
    out
}

/// What this machine has: online CPUs and total memory.
pub fn local_capacity() -> Capacity {
    let vcpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let memory_mb = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024);
    Capacity { vcpus, memory_mb }
}

impl Host for LocalHost {
    fn name(&self) -> &str {
        &self.name
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<super::HostEvent> {
        self.monitor.subscribe()
    }

    async fn inventory(&self) -> Result<Inventory, HostError> {
        let mut inv = Inventory {
            capacity: local_capacity(),
            retained: self.scan_retained(),
            ..Inventory::default()
        };
        let vms = instance::vms_dir(&self.root);
        let entries = match fs::read_dir(&vms) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(inv),
            Err(source) => return Err(HostError::Scan { path: vms, source }),
        };
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let dir = self.dir(&name);
            if !dir.exists() {
                continue;
            }
            match dir.read() {
                Ok(inst) if inst.vm.name == name => {
                    inv.vms.insert(name, self.observe_one(&dir, inst).await);
                }
                Ok(inst) => {
                    warn!(folder = %dir.dir.display(), vm = %inst.vm.name, "instance folder and VM name differ; ignored");
                }
                Err(e) => {
                    warn!(folder = %dir.dir.display(), error = %e, "unreadable instance; ignored");
                }
            }
        }
        inv.orphans = scan_orphans(&self.root, &inv.vms);
        Ok(inv)
    }

    async fn create(&self, vm: &VmInstance) -> Result<(), HostError> {
        self.create_here(vm).await
    }

    async fn recover(&self, vm: &VmInstance) -> Result<(), HostError> {
        self.recover_here(vm).await
    }

    async fn update(&self, vm: &VmInstance) -> Result<(), HostError> {
        self.update_here(vm).await
    }

    async fn start(&self, vm: &str) -> Result<u32, HostError> {
        self.start_here(vm).await
    }

    async fn stop(&self, vm: &str, timeout: Duration) -> Result<StopOutcome, HostError> {
        self.stop_here(vm, timeout).await
    }

    async fn prune(&self, folder: &str, pid: u32) -> Result<(), HostError> {
        let still_orphan = self
            .inventory()
            .await?
            .orphans
            .iter()
            .any(|o| o.pid == pid && o.folder == folder);
        if !still_orphan {
            return Err(HostError::Refused {
                vm: folder.to_owned(),
                reason: format!("pid {pid} is no longer an orphan QEMU of this host; not touched"),
            });
        }
        process::terminate(pid);
        if !process::wait_gone(pid, EXIT_GRACE).await {
            process::kill_hard(pid);
            if !process::wait_gone(pid, EXIT_GRACE).await {
                return Err(HostError::StopFailed {
                    vm: folder.to_owned(),
                    pid,
                });
            }
        }
        warn!(folder, pid, "pruned orphan QEMU");
        Ok(())
    }

    async fn delete(&self, vm: &str) -> Result<Option<PathBuf>, HostError> {
        self.delete_here(vm)
    }

    async fn prepare_incoming(
        &self,
        vm: &VmInstance,
        from: &str,
        listen: &str,
        mirror: &[String],
    ) -> Result<super::Incoming, HostError> {
        self.prepare_incoming_here(vm, from, listen, mirror).await
    }

    async fn migrate_out(
        &self,
        vm: &str,
        to: &super::Incoming,
        tuning: &crate::qemu::migrate::Tuning,
    ) -> Result<crate::qemu::migrate::Stats, HostError> {
        self.migrate_out_here(vm, to, tuning).await
    }

    async fn discard(&self, vm: &str) -> Result<(), HostError> {
        self.discard_here(vm).await
    }

    async fn migration_stats(&self, vm: &str) -> Result<crate::qemu::migrate::Stats, HostError> {
        self.migration_stats_here(vm).await
    }

    async fn inject(&self, vm: &str, fault: super::Fault) -> Result<u32, HostError> {
        self.inject_here(vm, fault).await
    }

    async fn read_disk(
        &self,
        vm: &str,
        disk: &str,
        offset: u64,
    ) -> Result<super::DiskChunk, HostError> {
        self.read_disk_here(vm, disk, offset)
    }

    async fn write_disk(
        &self,
        vm: &str,
        disk: &str,
        offset: u64,
        chunk: &super::DiskChunk,
        finish: Option<&str>,
    ) -> Result<(), HostError> {
        self.write_disk_here(vm, disk, offset, chunk, finish).await
    }
}
