//! An instance's cloud-init seed on this host: the volume the engine sent to the file
//! store, copied into the instance folder as `cidata.img` (atomically), readable by root only (user
//! data may hold secrets), before each QEMU of it starts.

use std::fs;

use tracing::debug;

use super::LocalHost;
use crate::digest::sha256_file;
use crate::host::HostError;
use crate::qemu::instance::{InstanceDir, VmInstance};
use crate::qemu::seed::SEED_FILE;

impl LocalHost {
    /// Puts the seed `vm` names in its folder (or removes one it no longer names).
    pub(super) fn ensure_seed(dir: &InstanceDir, vm: &VmInstance) -> Result<(), HostError> {
        let target = dir.dir.join(SEED_FILE);
        let io = |what: String, source| HostError::Io {
            vm: vm.name.clone(),
            what,
            source,
        };
        let Some(seed) = &vm.files.seed else {
            return match fs::remove_file(&target) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(io(format!("cannot remove {}", target.display()), e))
                }
                _ => Ok(()),
            };
        };
        if sha256_file(&target).is_ok_and(|have| have == seed.sha256) {
            return Ok(());
        }
        let Some(source) = &seed.path else {
            return Err(HostError::Refused {
                vm: vm.name.clone(),
                reason: "its cloud-init seed was not sent to this host".to_owned(),
            });
        };
        let bytes =
            fs::read(source).map_err(|e| io(format!("cannot read {}", source.display()), e))?;
        crate::records::write_atomic(&target, &bytes).map_err(|source| HostError::State {
            vm: vm.name.clone(),
            source: Box::new(source),
        })?;
        debug!(vm = %vm.name, instance_id = %seed.instance_id, "cloud-init seed in place");
        Ok(())
    }
}
