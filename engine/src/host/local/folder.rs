//! An instance folder made, changed and removed: `create` (and `recover`), `update` and
//! `delete`. None of these runs QEMU; disks dropped by the spec or left by a deleted VM
//! are retained, never deleted.

use std::fs;
use std::path::PathBuf;

use tracing::info;

use super::{migrate, LocalHost};
use crate::failpoint::failpoint;
use crate::host::HostError;
use crate::qemu::instance::{self, InstanceFile, VmInstance};

impl LocalHost {
    pub(super) async fn create_here(&self, vm: &VmInstance) -> Result<(), HostError> {
        let dir = self.dir(&vm.name);
        if dir.exists() {
            return self.update_here(vm).await;
        }
        crate::records::create_private_dir(&dir.dir).map_err(|source| HostError::State {
            vm: vm.name.clone(),
            source: Box::new(source),
        })?;
        let inst = InstanceFile::fresh(vm, None);
        // The record last: until it exists the folder is no instance (inventory skips
        // it), so a create cut short (the agent killed) is done again in full, never
        // taken as done.
        if let Err(e) = self.ensure_disks(&dir, vm).await {
            // A disk that cannot be made (a full disk) is a failure the engine must see
            // and back off from: with the record, the next step is a start, which fails
            // the same way and counts as a failed start (backoff), instead of a create
            // at every reconcile.
            Self::write(&dir, &inst)?;
            return Err(e);
        }
        failpoint!("agent.create.disks");
        Self::write(&dir, &inst)
    }

    pub(super) async fn recover_here(&self, vm: &VmInstance) -> Result<(), HostError> {
        migrate::missing_shared_disk(vm, &[])?;
        self.create_here(vm).await
    }

    pub(super) async fn update_here(&self, vm: &VmInstance) -> Result<(), HostError> {
        let (dir, mut inst) = self.read(&vm.name)?;
        for old in &inst.vm.spec.disks {
            let path = dir.disk(&old.name);
            if path.exists() && !vm.spec.disks.iter().any(|d| d.name == old.name) {
                self.retain(
                    &vm.name,
                    &path,
                    &format!("disk {} removed from the spec", old.name),
                )?;
            }
        }
        if inst.vm.spec_hash != vm.spec_hash {
            // A new spec is a fresh start for the restart policy (a `failed` VM retries).
            inst.exits.clear();
        }
        inst.vm = vm.clone();
        Self::write(&dir, &inst)?;
        if Self::live_pid(&dir, &inst).is_none() {
            self.ensure_disks(&dir, vm).await?;
        }
        Ok(())
    }

    pub(super) async fn delete_here(&self, vm: &str) -> Result<Option<PathBuf>, HostError> {
        let dir = self.dir(vm);
        if !dir.dir.exists() {
            return Ok(None);
        }
        let mut half_made = false;
        if let Ok(inst) = dir.read() {
            if let Some(pid) = Self::live_pid(&dir, &inst) {
                return Err(HostError::Refused {
                    vm: vm.to_owned(),
                    reason: format!("still running (pid {pid}); stop it first"),
                });
            }
            // A migration target never resumed holds no data of the VM's own.
            half_made = inst.incoming.is_some();
        }
        // No QEMU of it runs: taps left behind go with the folder.
        self.release_taps(vm, None).await;
        let disks = dir.dir.join(instance::DISKS_DIR);
        let has_disks = !half_made && fs::read_dir(&disks).is_ok_and(|mut d| d.next().is_some());
        let kept = if has_disks {
            Some(self.retain(vm, &disks, "VM removed from the specs")?)
        } else {
            None
        };
        failpoint!("agent.delete.retained");
        fs::remove_dir_all(&dir.dir).map_err(|source| HostError::Io {
            vm: vm.to_owned(),
            what: "cannot remove instance folder".to_owned(),
            source,
        })?;
        info!(vm, "deleted instance");
        Ok(kept)
    }
}
