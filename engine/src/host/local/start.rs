//! Starting an instance: the start recorded before QEMU is spawned, QEMU spawned in the
//! instance folder, and a start that does not bring the guest up recorded as an exit, so
//! the restart policy backs off instead of retrying at every reconcile.

use std::fs;
use std::time::{Duration, Instant};

use plasmavmc_specs::Power;
use tracing::{debug, info, warn};

use super::{taps, LocalHost, QMP_PROBE};
use crate::failpoint::failpoint;
use crate::host::HostError;
use crate::qemu::args::{qemu_args, Accel};
use crate::qemu::exit::{ExitReason, ExitRecord};
use crate::qemu::instance::{self, InstanceDir, InstanceFile, QEMU_LOG, QMP_SOCKET, SERIAL_LOG};
use crate::qemu::{img, process};

impl LocalHost {
    pub(super) async fn start_here(&self, vm: &str) -> Result<u32, HostError> {
        let (dir, mut inst) = self.read(vm)?;
        if let Some(pid) = Self::live_pid(&dir, &inst) {
            let qmp = self.monitor.qmp(&dir, vm, &inst.uuid, pid, QMP_PROBE).await;
            let running = match &qmp {
                Ok(q) => q.query_status().await.is_ok_and(|s| s.running),
                Err(_) => false,
            };
            if running {
                debug!(vm, pid, "already running");
                return Ok(pid);
            }
            // Alive but not running its guest: a migration target to resume, or a source
            // whose migration was cut short.
            return self.resume_here(&dir, inst, pid).await;
        }
        if inst.incoming.is_some() {
            return Err(HostError::Refused {
                vm: vm.to_owned(),
                reason:
                    "this migration target's QEMU is gone before it was resumed; it holds no guest"
                        .to_owned(),
            });
        }
        if let Err(e) = self.ensure_disks(&dir, &inst.vm).await {
            // Disks that cannot be made (the host's disk is full) fail the start as a
            // QEMU that cannot start does: an exit, so the restart policy backs off
            // instead of retrying at every reconcile.
            inst.power = Power::Running;
            Self::write(&dir, &inst)?;
            let message = crate::errors::error_chain(&e);
            Self::record_failed_start(&dir, ExitReason::StartFailed, 0, message);
            return Err(e);
        }
        if inst.power == Power::Running && !inst.starting {
            // It should have been running: this start recovers from an exit.
            inst.restarts += 1;
        }
        inst.power = Power::Running;
        inst.starting = true;
        inst.started_at = Some(crate::time::now());
        // The exit being recovered from is history now (status events keep it); an exit
        // of the new QEMU is recorded afresh.
        inst.last_exit = None;
        // A fresh QEMU boots the guest from its disks: whatever a postcopy move left in
        // the old one's memory is gone, and this one may run.
        inst.postcopy = None;
        Self::write(&dir, &inst)?;
        failpoint!("agent.start.recorded");
        if let Err(e) = self.ensure_disks_free(&inst.vm).await {
            if let HostError::DiskLocked {
                disk, path, qemu, ..
            } = &e
            {
                let message = format!("disk {disk} ({}): {qemu}", path.display());
                warn!(vm, disk = %message, "not starting: another QEMU holds a disk; the VM may run elsewhere");
                Self::record_failed_start(&dir, ExitReason::ImageLocked, 0, message);
            }
            return Err(e);
        }
        // Held until QEMU answers (it has opened its taps by then): no release of the
        // taps comes between their making and QEMU opening them.
        let net_lock = self.monitor.net_lock(vm);
        let net_held = net_lock.lock().await;
        if let Err(e) = self.make_taps(&inst.vm).await {
            // A missing bridge is a failed start: the restart policy backs off.
            let message = crate::errors::error_chain(&e);
            Self::record_failed_start(&dir, ExitReason::StartFailed, 0, message);
            taps::release(vm, &dir, None).await;
            return Err(e);
        }
        let args = qemu_args(&inst, self.accel_for(&inst));
        let pid = match Self::spawn(&dir, vm, &args) {
            Ok(pid) => pid,
            Err(e) => {
                // No QEMU binary (or no way to run it): a failed start all the same, so
                // the restart policy backs off instead of retrying at every reconcile.
                let message = crate::errors::error_chain(&e);
                Self::record_failed_start(&dir, ExitReason::StartFailed, 0, message);
                taps::release(vm, &dir, None).await;
                return Err(e);
            }
        };
        failpoint!("agent.start.spawned");
        let up = self.wait_qmp(&dir, vm, &inst.uuid, pid, true).await;
        if up.is_err() {
            // wait_qmp leaves no QEMU behind when it fails.
            taps::release(vm, &dir, Some(&inst.uuid)).await;
        }
        drop(net_held);
        if let Err(e) = up {
            let message = match &e {
                HostError::StartFailed { reason, .. } => reason.clone(),
                other => other.to_string(),
            };
            // QEMU's own image lock: the last line of defence, when another QEMU took the
            // disk after the check above.
            let reason = if img::is_lock_refusal(&message) {
                ExitReason::ImageLocked
            } else {
                ExitReason::StartFailed
            };
            Self::record_failed_start(&dir, reason, pid, message);
            return Err(e);
        }
        if let Ok(mut now) = dir.read() {
            now.starting = false;
            if let Err(e) = dir.write(&now) {
                warn!(vm, error = %e, "cannot record that the start finished; the next inventory does");
            }
        }
        info!(vm, pid, "started");
        Ok(pid)
    }

    /// Makes the taps of `vm`'s bridged NICs, on their bridges (the VM's network lock
    /// held, no QEMU of it running).
    pub(super) async fn make_taps(
        &self,
        vm: &crate::qemu::instance::VmInstance,
    ) -> Result<(), HostError> {
        taps::make(vm)
            .await
            .map(drop)
            .map_err(|source| HostError::Network {
                vm: vm.name.clone(),
                source: Box::new(source),
            })
    }

    pub(super) fn accel_for(&self, inst: &InstanceFile) -> Accel {
        match inst.vm.spec.qemu.accel {
            plasmavmc_specs::Accel::Auto => self.default_accel(),
            plasmavmc_specs::Accel::Tcg => Accel::Tcg,
            plasmavmc_specs::Accel::Kvm => Accel::Kvm,
        }
    }

    /// The accelerator of a VM whose spec says `auto`: the host's, `auto` meaning KVM
    /// when `/dev/kvm` opens.
    pub(super) fn default_accel(&self) -> Accel {
        match self.accel {
            plasmavmc_specs::Accel::Tcg => Accel::Tcg,
            plasmavmc_specs::Accel::Kvm => Accel::Kvm,
            plasmavmc_specs::Accel::Auto => {
                let kvm = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok();
                if kvm {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                }
            }
        }
    }

    /// Records a start that did not bring QEMU up as an exit, so that the restart policy
    /// backs off (or gives up) instead of retrying at every reconcile.
    pub(super) fn record_failed_start(
        dir: &InstanceDir,
        reason: ExitReason,
        pid: u32,
        message: String,
    ) {
        let Ok(mut now) = dir.read() else {
            return;
        };
        let at_ms = crate::time::now_ms();
        now.starting = false;
        now.last_exit = Some(ExitRecord {
            reason,
            at_ms,
            pid,
            status: Some(message),
        });
        now.exits.push(at_ms);
        let excess = now.exits.len().saturating_sub(instance::EXIT_HISTORY);
        now.exits.drain(..excess);
        if let Err(e) = dir.write(&now) {
            warn!(vm = %now.vm.name, error = %e, "cannot record the failed start");
        }
    }

    fn failure_reason(dir: &InstanceDir) -> String {
        let log = fs::read_to_string(dir.file(QEMU_LOG)).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        if tail.is_empty() {
            "QEMU exited without a message".to_owned()
        } else {
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        }
    }

    /// Waits until a freshly spawned QEMU (`pid`) answers QMP and, with `guest_running`,
    /// runs its guest; a QEMU that dies, or does not get there within `qmp_ready`
    /// (then killed), is a failed start.
    pub(super) async fn wait_qmp(
        &self,
        dir: &InstanceDir,
        vm: &str,
        uuid: &str,
        pid: u32,
        guest_running: bool,
    ) -> Result<crate::qemu::qmp::Qmp, HostError> {
        let deadline = Instant::now() + self.qmp_ready;
        loop {
            if !process::is_alive(pid) {
                return Err(HostError::StartFailed {
                    vm: vm.to_owned(),
                    reason: Self::failure_reason(dir),
                });
            }
            if let Ok(qmp) = self
                .monitor
                .qmp(dir, vm, uuid, pid, Duration::from_secs(1))
                .await
            {
                if !guest_running {
                    return Ok(qmp);
                }
                let status = qmp.query_status().await.map_err(|source| HostError::Qmp {
                    vm: vm.to_owned(),
                    source: Box::new(source),
                })?;
                if status.running {
                    return Ok(qmp);
                }
                debug!(vm, status = %status.status, "QEMU up, guest not running yet");
            }
            if Instant::now() >= deadline {
                process::kill_hard(pid);
                return Err(HostError::StartFailed {
                    vm: vm.to_owned(),
                    reason: format!(
                        "QMP did not answer within {:?}; QEMU killed",
                        self.qmp_ready
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Spawns QEMU with `args` in instance folder `dir`: the previous run's logs are
    /// kept as `.1`, a stale socket and pid file removed first.
    pub(super) fn spawn(dir: &InstanceDir, vm: &str, args: &[String]) -> Result<u32, HostError> {
        rotate(dir, SERIAL_LOG);
        rotate(dir, QEMU_LOG);
        for stale in [QMP_SOCKET, instance::CONSOLE_SOCKET, instance::PID_FILE] {
            let _ = fs::remove_file(dir.file(stale));
        }
        process::spawn_detached(&process::qemu_binary(), args, &dir.dir, &dir.file(QEMU_LOG))
            .map_err(|source| HostError::Io {
                vm: vm.to_owned(),
                what: format!("cannot run {}", process::qemu_binary()),
                source,
            })
    }
}

fn rotate(dir: &InstanceDir, file: &str) {
    let from = dir.file(file);
    if from.exists() {
        let _ = fs::rename(&from, dir.file(&format!("{file}.1")));
    }
}
