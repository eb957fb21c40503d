//! [`Host`] on this machine: QEMU processes in instance folders under a root.
//!
//! Layout and instance file: [`crate::qemu::instance`]. Every method re-reads the
//! folder, so a restarted engine (or a second one after the first died) sees the same
//! truth. The power state is written to `instance.toml` *before* acting, so a stop the
//! engine asked for is never mistaken for a crash, and a crash mid-start is visible.
//!
//! One concern a file: `folder` (create, recover, update, delete: the folder and its
//! record, never QEMU), `disks` (disk files made, grown, retained, checked for another
//! QEMU's lock), `start` (spawning QEMU; a failed start recorded as an exit), `stop`
//! (ending QEMU on order, and the drill's faults), `inventory` (what runs here, orphan
//! QEMUs), `migrate` (live and cold migration, discarding a copy left behind). This file
//! holds the host and the instance-record helpers they all use; `impl Host` only
//! delegates, each `Host::x` to the `x_here` of its file (documented on the trait).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod cpu;
pub mod disk_files;
mod disks;
mod emulator;
mod folder;
mod inventory;
mod migrate;
mod seed;
mod start;
mod stop;
pub(super) mod taps;

pub use inventory::local_capacity;

use super::monitor::Monitor;
use super::{Host, HostError};
use crate::observe::Inventory;
use crate::qemu::instance::{InstanceDir, InstanceFile, VmInstance};
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
    /// This machine's CPU, learnt at the first inventory (see [`cpu`]).
    cpu: Arc<tokio::sync::OnceCell<Option<crate::observe::HostCpu>>>,
    /// This machine's QEMU, learnt at the first inventory (see [`emulator`]).
    emulator: Arc<tokio::sync::OnceCell<crate::observe::HostQemu>>,
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
            cpu: Arc::default(),
            emulator: Arc::default(),
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

    /// Removes `vm`'s taps once no QEMU of it runs (see [`taps`]).
    async fn release_taps(&self, vm: &str, uuid: Option<&str>) {
        let lock = self.monitor.net_lock(vm);
        let _held = lock.lock().await;
        taps::release(vm, &self.dir(vm), uuid).await;
    }

    /// The pid of this instance's QEMU when it is alive (checked by uuid). Without a
    /// valid pid file (QEMU killed before writing it, file lost), `/proc` is searched, so
    /// a running QEMU is never missed and never started twice.
    fn live_pid(dir: &InstanceDir, inst: &InstanceFile) -> Option<u32> {
        dir.pid()
            .filter(|pid| process::is_instance(*pid, &inst.uuid))
            .or_else(|| process::find_by_uuid(&inst.uuid).into_iter().min())
    }
}

impl Host for LocalHost {
    fn name(&self) -> &str {
        &self.name
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<super::HostEvent> {
        self.monitor.subscribe()
    }

    async fn inventory(&self) -> Result<Inventory, HostError> {
        self.inventory_here().await
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
        self.prune_here(folder, pid).await
    }

    async fn delete_disk(&self, path: &Path, shared: Option<&Path>) -> Result<u64, HostError> {
        self.delete_disk_file(path, shared).await
    }

    async fn delete(&self, vm: &str) -> Result<Option<PathBuf>, HostError> {
        self.delete_here(vm).await
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
