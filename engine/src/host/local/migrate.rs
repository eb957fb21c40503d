//! The local host's side of moving VMs: live-migration targets and sources (the QMP
//! sequences are in [`crate::qemu::migrate`]), discarding the copy a VM left behind, and
//! reading and writing disk files for cold migration.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::path::PathBuf;

use plasmavmc_specs::Power;
use tracing::{info, warn};

use super::{LocalHost, EXIT_GRACE, QMP_PROBE};
use crate::failpoint::failpoint;
use crate::host::HostError;
use crate::qemu::args::qemu_args;
use crate::qemu::instance::{IncomingRecord, InstanceDir, InstanceFile, VmInstance};
use crate::qemu::migrate::{self, NbdTarget, Stats, Tuning};
use crate::qemu::{img, process};
use crate::wire::{DiskChunk, Incoming};

/// Suffix of a disk file being received.
const PART: &str = "part";

impl LocalHost {
    fn migration_err(vm: &str, source: migrate::MigrateError) -> HostError {
        HostError::Migration {
            vm: vm.to_owned(),
            source: Box::new(source),
        }
    }

    pub(super) async fn prepare_incoming_here(
        &self,
        vm: &VmInstance,
        from: &str,
        listen: &str,
        mirror: &[String],
    ) -> Result<Incoming, HostError> {
        let name = vm.name.as_str();
        let dir = self.dir(name);
        if dir.exists() {
            // A target left by an earlier attempt is replaced; anything else is refused.
            let old = self.read(name)?.1;
            if old.incoming.is_none() {
                return Err(HostError::Refused {
                    vm: name.to_owned(),
                    reason: format!(
                        "an instance of {name} already exists on {}; not a migration target",
                        self.name
                    ),
                });
            }
            self.discard_here(name).await?;
        }
        missing_shared_disk(vm, mirror)?;
        crate::records::create_private_dir(&dir.dir).map_err(|source| HostError::State {
            vm: name.to_owned(),
            source: Box::new(source),
        })?;
        // Stopped: not ours to run until resumed, so an exit of this QEMU is no crash.
        let record = IncomingRecord {
            from: from.to_owned(),
            nbd_disks: mirror.to_vec(),
        };
        let inst = InstanceFile::fresh(vm, Some(record));
        Self::write(&dir, &inst)?;
        self.ensure_disks(&dir, vm).await?;
        let spawn = async {
            let port = free_port(name, listen)?;
            // The taps exist before the target's QEMU starts (it opens them at once);
            // the lock is held until it has (see `taps`).
            let net_lock = self.monitor.net_lock(name);
            let net_held = net_lock.lock().await;
            self.make_taps(vm).await?;
            let mut args = qemu_args(&inst, self.accel_for(&inst));
            args.extend(["-S", "-incoming", "defer"].map(String::from));
            let pid = Self::spawn(&dir, name, &args)?;
            failpoint!("agent.incoming.spawned");
            let qmp = self.wait_qmp(&dir, name, &inst.uuid, pid, false).await?;
            drop(net_held);
            let nbd = if mirror.is_empty() {
                None
            } else {
                Some(NbdTarget {
                    host: listen.to_owned(),
                    port: free_port(name, listen)?,
                    disks: mirror.to_vec(),
                })
            };
            let uri = format!("tcp:{}:{port}", bracketed(listen));
            let postcopy = migrate::start_incoming(&qmp, &uri, nbd.as_ref())
                .await
                .map_err(|e| Self::migration_err(name, e))?;
            info!(vm = name, pid, %uri, postcopy, "waiting for the incoming migration");
            Ok(Incoming { uri, nbd, postcopy })
        };
        match spawn.await {
            Ok(incoming) => Ok(incoming),
            Err(e) => {
                if let Err(cleanup) = self.discard_here(name).await {
                    warn!(vm = name, error = %cleanup, "cannot remove the half-made migration target");
                }
                Err(e)
            }
        }
    }

    pub(super) async fn migrate_out_here(
        &self,
        vm: &str,
        to: &Incoming,
        tuning: &Tuning,
    ) -> Result<Stats, HostError> {
        let (dir, inst, pid, qmp) = self
            .live_qmp(vm, "not running here; nothing to migrate")
            .await?;
        let now = qmp.query_status().await.map_err(|source| HostError::Qmp {
            vm: vm.to_owned(),
            source: Box::new(source),
        })?;
        if !now.running {
            // An earlier migration, cut short, left the guest paused: it goes on here
            // before it moves (never one that switched to postcopy: refused there).
            self.resume_here(&dir, inst, pid).await?;
        } else if inst.postcopy.is_some() {
            // Its guest runs here: a mark left by a switch QEMU refused is stale.
            let mut fresh = inst;
            fresh.postcopy = None;
            Self::write(&dir, &fresh)?;
        }
        let monitor = self.monitor.clone();
        let announce = move |progress| {
            monitor.announce(crate::wire::HostEvent::Migrating {
                vm: vm.to_owned(),
                progress,
            });
        };
        // Journal before the act: the record says the source must never run the guest
        // again before QEMU is told to switch.
        let record = || {
            let marked = dir.read().and_then(|mut now| {
                now.postcopy = Some(crate::time::now());
                dir.write(&now)
            });
            marked
                .inspect_err(|e| warn!(vm, error = %e, "cannot record the switch to postcopy"))
                .is_ok()
        };
        let escalation = match tuning.postcopy_after_ms {
            Some(ms) if to.postcopy => Some(migrate::Escalation {
                after: std::time::Duration::from_millis(ms),
                record: &record,
            }),
            Some(_) => {
                warn!(
                    vm,
                    "the target cannot take postcopy; this move stays precopy"
                );
                None
            }
            None => None,
        };
        let stats = migrate::outgoing(
            &qmp,
            &to.uri,
            to.nbd.as_ref(),
            tuning,
            escalation.as_ref(),
            &announce,
        )
        .await
        .map_err(|e| Self::migration_err(vm, e))?;
        failpoint!("agent.migrate-out.completed");
        info!(
            vm,
            pid,
            total_ms = stats.total_ms,
            downtime_ms = stats.downtime_ms,
            ram_bytes = stats.ram_bytes,
            disk_bytes = stats.disk_bytes,
            "migration completed"
        );
        Ok(stats)
    }

    /// `vm`'s instance, its live QEMU's pid and QMP connection; `gone` says why not when
    /// its QEMU does not run.
    async fn live_qmp(
        &self,
        vm: &str,
        gone: &str,
    ) -> Result<(InstanceDir, InstanceFile, u32, crate::qemu::qmp::Qmp), HostError> {
        let (dir, inst) = self.read(vm)?;
        let pid = Self::live_pid(&dir, &inst).ok_or_else(|| HostError::Refused {
            vm: vm.to_owned(),
            reason: gone.to_owned(),
        })?;
        let qmp = self
            .monitor
            .qmp(&dir, vm, &inst.uuid, pid, QMP_PROBE)
            .await
            .map_err(|source| HostError::Qmp {
                vm: vm.to_owned(),
                source: Box::new(source),
            })?;
        Ok((dir, inst, pid, qmp))
    }

    pub(super) async fn migration_stats_here(&self, vm: &str) -> Result<Stats, HostError> {
        let (_, _, _, qmp) = self
            .live_qmp(vm, "its QEMU is gone; no migration figures")
            .await?;
        migrate::final_stats(&qmp)
            .await
            .map_err(|e| Self::migration_err(vm, e))
    }

    /// A live QEMU that is not running its guest is resumed: a migration target that
    /// completed (`cont` after the NBD exports end), or a source whose migration was cut
    /// short (cancelled, then `cont`). Returns the pid.
    pub(super) async fn resume_here(
        &self,
        dir: &InstanceDir,
        mut inst: InstanceFile,
        pid: u32,
    ) -> Result<u32, HostError> {
        let vm = inst.vm.name.clone();
        let qmp = self
            .monitor
            .qmp(dir, &vm, &inst.uuid, pid, QMP_PROBE)
            .await
            .map_err(|source| HostError::Qmp {
                vm: vm.clone(),
                source: Box::new(source),
            })?;
        if let Some(incoming) = &inst.incoming {
            migrate::finish_incoming(&qmp, &incoming.nbd_disks)
                .await
                .map_err(|e| Self::migration_err(&vm, e))?;
            failpoint!("agent.resume.continued");
            inst.incoming = None;
            inst.power = Power::Running;
            inst.started_at = Some(crate::time::now());
            Self::write(dir, &inst)?;
            info!(vm, pid, "resumed the migrated guest");
            return Ok(pid);
        }
        let status = qmp.query_status().await.map_err(|source| HostError::Qmp {
            vm: vm.clone(),
            source: Box::new(source),
        })?;
        if let (false, Some(at)) = (status.running, &inst.postcopy) {
            return Err(HostError::Refused {
                vm,
                reason: format!(
                    "its live move switched to postcopy at {at}: the guest ran on the target since, and this paused copy lacks its memory; it is never resumed (stop it)"
                ),
            });
        }
        if !status.running {
            let disks: Vec<String> = inst.vm.spec.disks.iter().map(|d| d.name.clone()).collect();
            migrate::cancel(&qmp, &disks).await;
            if status.status == "postmigrate" {
                qmp.execute("cont", None)
                    .await
                    .map_err(|source| HostError::Qmp {
                        vm: vm.clone(),
                        source: Box::new(source),
                    })?;
            }
            warn!(vm, pid, was = %status.status, "resumed a source whose migration did not finish");
        }
        if inst.power != Power::Running {
            inst.power = Power::Running;
            Self::write(dir, &inst)?;
        }
        Ok(pid)
    }

    pub(super) async fn discard_here(&self, vm: &str) -> Result<(), HostError> {
        let dir = self.dir(vm);
        if !dir.dir.exists() {
            return Ok(());
        }
        if let Ok(mut inst) = dir.read() {
            if let Some(pid) = Self::live_pid(&dir, &inst) {
                let qmp = self.monitor.qmp(&dir, vm, &inst.uuid, pid, QMP_PROBE).await;
                let running = match &qmp {
                    Ok(q) => q.query_status().await.map(|s| s.running),
                    Err(_) => Ok(false),
                };
                if running.unwrap_or(true) && inst.incoming.is_none() {
                    return Err(HostError::Refused {
                        vm: vm.to_owned(),
                        reason: format!(
                            "its guest runs here (pid {pid}) or cannot be asked; not discarded"
                        ),
                    });
                }
                inst.power = Power::Stopped;
                Self::write(&dir, &inst)?;
                if let Ok(q) = &qmp {
                    let _ = q.quit().await;
                }
                if !process::wait_gone(pid, EXIT_GRACE).await {
                    process::kill_hard(pid);
                    if !process::wait_gone(pid, EXIT_GRACE).await {
                        return Err(HostError::StopFailed {
                            vm: vm.to_owned(),
                            pid,
                        });
                    }
                }
            }
        }
        failpoint!("agent.discard.stopped");
        // Its QEMU is gone (the VM runs elsewhere): its taps here go too.
        self.release_taps(vm, None).await;
        fs::remove_dir_all(&dir.dir).map_err(|source| HostError::Io {
            vm: vm.to_owned(),
            what: "cannot remove instance folder".to_owned(),
            source,
        })?;
        info!(vm, "discarded this host's copy: the VM lives elsewhere");
        Ok(())
    }

    /// The instance's local disk file `disk`, refusing while its QEMU runs.
    fn quiet_disk(
        &self,
        vm: &str,
        disk: &str,
    ) -> Result<(InstanceDir, InstanceFile, PathBuf), HostError> {
        let (dir, inst) = self.read(vm)?;
        if let Some(pid) = Self::live_pid(&dir, &inst) {
            return Err(HostError::Refused {
                vm: vm.to_owned(),
                reason: format!("QEMU runs (pid {pid}); disks are copied only while stopped"),
            });
        }
        let local = inst
            .vm
            .spec
            .disks
            .iter()
            .find(|d| d.name == disk)
            .and_then(|d| inst.vm.disk_path(d))
            .filter(|p| p.is_relative());
        if local.is_none() {
            return Err(HostError::Refused {
                vm: vm.to_owned(),
                reason: format!("{disk} is not a local disk of this instance"),
            });
        }
        let path = dir.disk(disk);
        Ok((dir, inst, path))
    }

    pub(super) fn read_disk_here(
        &self,
        vm: &str,
        disk: &str,
        offset: u64,
    ) -> Result<DiskChunk, HostError> {
        let (_, _, path) = self.quiet_disk(vm, disk)?;
        let io = |source| HostError::Io {
            vm: vm.to_owned(),
            what: format!("cannot read {}", path.display()),
            source,
        };
        let mut file = fs::File::open(&path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        file.seek(SeekFrom::Start(offset)).map_err(io)?;
        let mut data = Vec::with_capacity(crate::wire::CHUNK);
        file.take(crate::wire::CHUNK as u64)
            .read_to_end(&mut data)
            .map_err(io)?;
        let len = data.len() as u64;
        if data.iter().all(|b| *b == 0) {
            data.clear();
        }
        Ok(DiskChunk { size, len, data })
    }

    pub(super) async fn write_disk_here(
        &self,
        vm: &str,
        disk: &str,
        offset: u64,
        chunk: &DiskChunk,
        finish: Option<&str>,
    ) -> Result<(), HostError> {
        let (_, inst, path) = self.quiet_disk(vm, disk)?;
        let part = path.with_extension(PART);
        let io = |what: &str, source| HostError::Io {
            vm: vm.to_owned(),
            what: format!("{what} {}", part.display()),
            source,
        };
        {
            let mut file = fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(offset == 0)
                .open(&part)
                .map_err(|e| io("cannot open", e))?;
            if !chunk.data.is_empty() {
                file.seek(SeekFrom::Start(offset))
                    .map_err(|e| io("cannot seek", e))?;
                file.write_all(&chunk.data)
                    .map_err(|e| io("cannot write", e))?;
            }
            // Zero chunks stay holes; the length is the source file's.
            file.set_len(chunk.size).map_err(|e| io("cannot size", e))?;
            if finish.is_some() {
                file.sync_all().map_err(|e| io("cannot sync", e))?;
            }
        }
        failpoint!("agent.disk.partial");
        let Some(expected) = finish else {
            return Ok(());
        };
        let actual = crate::digest::sha256_file(&part).map_err(|e| io("cannot hash", e))?;
        if actual != expected {
            let _ = fs::remove_file(&part);
            return Err(HostError::Refused {
                vm: vm.to_owned(),
                reason: format!(
                    "disk {disk} arrived with SHA-256 {actual}, sent {expected}; discarded"
                ),
            });
        }
        if let Some(base) = inst.vm.files.images.get(disk) {
            img::rebase_unsafe(&part, base)
                .await
                .map_err(|source| HostError::Disk {
                    vm: vm.to_owned(),
                    disk: disk.to_owned(),
                    source: Box::new(source),
                })?;
        }
        fs::rename(&part, &path).map_err(|e| io("cannot move into place", e))?;
        info!(vm, disk, bytes = chunk.size, "disk received and checked");
        Ok(())
    }
}

/// Refuses when a disk of `vm` on shared storage (other than the `except` ones) is not
/// there: it holds the VM's data, and must never be created empty in its place.
pub(super) fn missing_shared_disk(vm: &VmInstance, except: &[String]) -> Result<(), HostError> {
    for disk in &vm.spec.disks {
        let Some(path) = vm.disk_path(disk) else {
            continue;
        };
        if path.is_absolute() && !except.contains(&disk.name) && !path.exists() {
            return Err(HostError::Refused {
                vm: vm.name.clone(),
                reason: format!(
                    "disk {} should be on shared storage at {} but is not there (is the storage mounted on this host?); not creating it empty",
                    disk.name,
                    path.display()
                ),
            });
        }
    }
    Ok(())
}

/// A free TCP port on `addr` (bound and released: QEMU binds it right after).
fn free_port(vm: &str, addr: &str) -> Result<u16, HostError> {
    TcpListener::bind((addr, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| HostError::Io {
            vm: vm.to_owned(),
            what: format!("cannot find a free port on {addr}"),
            source,
        })
}

/// `addr` as QEMU URIs want it: IPv6 in brackets.
fn bracketed(addr: &str) -> String {
    if addr.contains(':') && !addr.starts_with('[') {
        format!("[{addr}]")
    } else {
        addr.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Host;

    #[tokio::test]
    async fn a_recovery_never_creates_a_missing_shared_disk_empty() {
        let tmp = tempfile::tempdir().expect("tmp");
        let shared = tmp.path().join("shared");
        let d = crate::test_utils::desired(&[
            (
                "hosts/hv2.toml",
                "address = \"local\"\nshared_storage = \"/mnt/s\"\nstorage_pool = \"p\"",
            ),
            (
                "vms/db.toml",
                "[[disks]]\nname = \"data\"\nsize_gb = 1\nstorage = \"shared\"",
            ),
        ]);
        let e = &d.vms["db"];
        let vm = VmInstance {
            name: "db".into(),
            revision: "r".into(),
            spec_hash: e.hash.clone(),
            spec: e.spec.clone(),
            files: crate::qemu::instance::ResolvedFiles::default(),
            shared_storage: Some(shared.clone()),
            networks: std::collections::BTreeMap::default(),
        };
        let host = LocalHost::new(
            "hv2",
            &tmp.path().join("root"),
            plasmavmc_specs::Accel::Tcg,
            std::time::Duration::from_secs(1),
        );
        let err = host.recover(&vm).await.expect_err("refused");
        assert!(err.to_string().contains("not creating it empty"), "{err}");
        assert!(!shared.join("db/data.qcow2").exists());
        assert!(!tmp.path().join("root/vms/db").exists());
    }
}
