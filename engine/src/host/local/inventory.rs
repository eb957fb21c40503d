//! What this host runs, read afresh from its instance folders at every look: each
//! instance's QEMU asked over QMP, the disks retained under `retained/`, and orphan QEMUs
//! (running in an instance folder no instance accounts for), which only `prune` ends.

use std::fs;
use std::path::Path;

use plasmavmc_specs::Power;
use tracing::{info, warn};

use super::{taps, LocalHost, EXIT_GRACE, QMP_PROBE};
use crate::host::HostError;
use crate::observe::{Capacity, Inventory, ObservedVm, Orphan, Retained, RunState};
use crate::qemu::instance::{self, InstanceDir, InstanceFile};
use crate::qemu::process;

impl LocalHost {
    pub(super) async fn inventory_here(&self) -> Result<Inventory, HostError> {
        let mut inv = Inventory {
            bridges: taps::bridges(),
            cpu: self.cpu().await,
            qemu: Some(self.emulator().await),
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

    async fn observe_one(&self, dir: &InstanceDir, mut inst: InstanceFile) -> ObservedVm {
        let mut pid = Self::live_pid(dir, &inst);
        if pid.is_none() && inst.power == Power::Running && !inst.starting {
            // Its QEMU ended: its watcher may be recording why right now. Read the record
            // again once it has, or a plan restarts the VM without its exit counted (a
            // VM long down has no watcher: nothing to wait for, nothing to read again).
            if self.monitor.settled_exit(&inst.vm.name).await {
                if let Ok(now) = dir.read() {
                    inst = now;
                    pid = Self::live_pid(dir, &inst);
                }
            }
        }
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
        if pid.is_none() && !inst.starting {
            self.tidy_taps(dir, &inst).await;
        }
        let guest_agent = pid
            .filter(|_| inst.vm.spec.health.guest_agent)
            .and_then(|pid| crate::host::guest_agent::read(dir).filter(|g| g.pid == pid));
        let probe = |file: &str| {
            pid.and_then(|pid| crate::host::probes::read(dir, file).filter(|s| s.pid == pid))
        };
        let liveness =
            probe(instance::LIVENESS_FILE).filter(|_| inst.vm.spec.health.liveness.is_some());
        let readiness =
            probe(instance::READINESS_FILE).filter(|_| inst.vm.spec.health.readiness.is_some());
        ObservedVm {
            name: inst.vm.name,
            uuid: inst.uuid,
            state,
            pid,
            power: inst.power,
            revision: inst.vm.revision,
            spec_hash: inst.vm.spec_hash,
            spec: inst.vm.spec,
            seed: inst.vm.files.seed.map(|s| s.instance_id),
            file_digests: inst.vm.files.digests,
            started_at: inst.started_at,
            paused: (state == RunState::Paused)
                .then(|| crate::observe::Paused::of(detail.as_deref().unwrap_or_default())),
            detail,
            last_exit: inst.last_exit,
            exits: inst.exits,
            restarts: inst.restarts,
            watchdog_resets: inst.watchdog_resets,
            guest_agent,
            liveness,
            readiness,
            incoming: inst.incoming.is_some(),
            postcopy: inst.postcopy.is_some(),
        }
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

    /// Removes the taps of an instance whose QEMU is gone when the agent did not see
    /// it go (it was not running then). Skipped while a start or stop of the VM works
    /// on them: that one tidies up.
    async fn tidy_taps(&self, dir: &InstanceDir, inst: &InstanceFile) {
        let vm = inst.vm.name.as_str();
        if taps::taps_of(vm).is_empty() {
            return;
        }
        let lock = self.monitor.net_lock(vm);
        let Ok(_held) = lock.try_lock() else {
            return;
        };
        taps::release(vm, dir, Some(&inst.uuid)).await;
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

    pub(super) async fn prune_here(&self, folder: &str, pid: u32) -> Result<(), HostError> {
        let still_orphan = self
            .inventory_here()
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
