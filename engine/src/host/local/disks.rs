//! An instance's disk files on this host: made and grown to the spec, moved aside to
//! `retained/` (never deleted) when the spec drops them, and checked for another QEMU's
//! lock before a start. Copying disks between hosts is in `migrate`.

use std::fs;
use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use super::LocalHost;
use crate::host::HostError;
use crate::observe::Retained;
use crate::qemu::img;
use crate::qemu::instance::{self, InstanceDir, VmInstance};

impl LocalHost {
    /// Creates missing disks and grows enlarged ones, and puts the cloud-init seed in
    /// place. Never shrinks, never deletes.
    pub(super) async fn ensure_disks(
        &self,
        dir: &InstanceDir,
        vm: &VmInstance,
    ) -> Result<(), HostError> {
        crate::records::create_private_dir(&dir.dir.join(instance::DISKS_DIR)).map_err(
            |source| HostError::State {
                vm: vm.name.clone(),
                source: Box::new(source),
            },
        )?;
        for disk in &vm.spec.disks {
            let Some(path) = vm.disk_path(disk).map(|p| dir.dir.join(p)) else {
                return Err(HostError::Refused {
                    vm: vm.name.clone(),
                    reason: format!(
                        "disk {} wants shared storage; host {} has none",
                        disk.name, self.name
                    ),
                });
            };
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| HostError::Io {
                    vm: vm.name.clone(),
                    what: format!("cannot create {}", parent.display()),
                    source,
                })?;
            }
            let disk_err = |source| HostError::Disk {
                vm: vm.name.clone(),
                disk: disk.name.clone(),
                source: Box::new(source),
            };
            if !path.exists() {
                match (disk.size_gb, vm.files.images.get(&disk.name)) {
                    (_, Some(base)) => img::create_overlay(&path, base).await.map_err(disk_err)?,
                    (Some(gb), None) => img::create(&path, gb).await.map_err(disk_err)?,
                    (None, None) => {
                        return Err(HostError::Refused {
                            vm: vm.name.clone(),
                            reason: format!("disk {} has no size and no image", disk.name),
                        })
                    }
                }
                info!(vm = %vm.name, disk = %disk.name, "created disk");
            } else if let Some(gb) = disk.size_gb {
                let current = img::info(&path).await.map_err(disk_err)?.virtual_size;
                if current < gb << 30 {
                    img::grow(&path, gb).await.map_err(disk_err)?;
                    info!(vm = %vm.name, disk = %disk.name, size_gb = gb, "grew disk");
                } else if current > gb << 30 {
                    warn!(vm = %vm.name, disk = %disk.name, size_gb = gb, current_bytes = current, "not shrinking the disk: that would lose data");
                }
            }
        }
        Self::ensure_seed(dir, vm)
    }

    /// Moves `what` (a disk file or a disks folder) to `retained/<vm>-<time>/`, with a
    /// note saying why. Returns the new folder.
    pub(super) fn retain(&self, vm: &str, what: &Path, reason: &str) -> Result<PathBuf, HostError> {
        let io_err = |source| HostError::Io {
            vm: vm.to_owned(),
            what: format!("cannot retain {}", what.display()),
            source,
        };
        let base = instance::retained_dir(&self.root);
        let stamp = crate::time::now_compact();
        let mut target = base.join(format!("{vm}-{stamp}"));
        let mut n = 1;
        while target.exists() {
            n += 1;
            target = base.join(format!("{vm}-{stamp}-{n}"));
        }
        fs::create_dir_all(&target).map_err(io_err)?;
        let name = what
            .file_name()
            .map_or_else(|| "disks".into(), std::ffi::OsStr::to_os_string);
        fs::rename(what, target.join(name)).map_err(io_err)?;
        let note = Retained {
            vm: vm.to_owned(),
            path: target.clone(),
            since: crate::time::now(),
            reason: reason.to_owned(),
        };
        let text = toml::to_string(&note).expect("a retained note serialises");
        crate::records::write_atomic(&target.join("retained.toml"), text.as_bytes()).map_err(
            |source| HostError::State {
                vm: vm.to_owned(),
                source: Box::new(source),
            },
        )?;
        info!(vm, path = %target.display(), reason, "retained disks");
        Ok(target)
    }

    /// Refuses to start `vm` while another process holds the image lock of one of its
    /// shared disks: that is another host's QEMU, maybe running this very VM (a fence
    /// that lied). Asked before QEMU is spawned, so no second QEMU of the VM ever exists,
    /// not even one that would die on the lock at once; QEMU's own lock still guards the
    /// moment between this check and its start.
    pub(super) async fn ensure_disks_free(&self, vm: &VmInstance) -> Result<(), HostError> {
        for disk in &vm.spec.disks {
            let Some(path) = vm.disk_path(disk).filter(|p| p.is_absolute()) else {
                continue;
            };
            match img::lock_holder(&path).await {
                Ok(None) => {}
                Ok(Some(qemu)) => {
                    return Err(HostError::DiskLocked {
                        vm: vm.name.clone(),
                        disk: disk.name.clone(),
                        path,
                        qemu,
                    })
                }
                // Not a lock: QEMU will say what is wrong with the image in its own words.
                Err(e) => {
                    debug!(vm = %vm.name, disk = %disk.name, error = %e, "cannot check the disk's lock");
                }
            }
        }
        Ok(())
    }
}
