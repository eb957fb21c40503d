//! The only way the engine touches a hypervisor: the [`Host`] trait.
//!
//! In: requests about one VM instance. Out: inventories and outcomes. One
//! implementation runs QEMU on this machine ([`LocalHost`]); tests use a fake that
//! records calls. Every request is idempotent: asking twice is harmless.

mod client;
mod guest_agent;
mod local;
mod monitor;
mod probes;
mod transport;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use client::{AgentHost, ConnectOptions};
pub use local::disk_files::list as list_disks;
pub use local::{local_capacity, LocalHost};
pub use transport::{agent_argv, connect_hosts, serial_argv};

use crate::observe::Inventory;
use crate::qemu::instance::VmInstance;
use crate::wire::{DiskChunk, Fault, HostEvent, Incoming, StopOutcome};

/// Errors a host reports.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("host {host} is unreachable: {reason}")]
    Unreachable { host: String, reason: String },
    #[error("host {host}: {reason}")]
    Remote {
        host: String,
        vm: String,
        reason: String,
    },
    #[error("VM {vm}: no instance on this host")]
    NoInstance { vm: String },
    #[error("VM {vm}: {what}")]
    Io {
        vm: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {vm}")]
    Instance {
        vm: String,
        #[source]
        source: Box<crate::qemu::instance::InstanceError>,
    },
    #[error("VM {vm}: disk {disk}")]
    Disk {
        vm: String,
        disk: String,
        #[source]
        source: Box<crate::qemu::img::ImgError>,
    },
    #[error("VM {vm}: QEMU failed to start: {reason}")]
    StartFailed { vm: String, reason: String },
    /// Another QEMU holds the image lock of a disk: a copy of the VM may run elsewhere.
    #[error("VM {vm}: not started: disk {disk} ({}) is in use by another QEMU (image lock: {qemu}); the VM may still run elsewhere", path.display())]
    DiskLocked {
        vm: String,
        disk: String,
        path: PathBuf,
        /// QEMU's words (`Failed to get shared "write" lock`).
        qemu: String,
    },
    #[error("VM {vm}: QMP")]
    Qmp {
        vm: String,
        #[source]
        source: Box<crate::qemu::qmp::QmpError>,
    },
    #[error("VM {vm}: QEMU (pid {pid}) did not exit")]
    StopFailed { vm: String, pid: u32 },
    #[error("cannot scan {path}")]
    Scan {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {vm}")]
    State {
        vm: String,
        #[source]
        source: Box<crate::records::StateError>,
    },
    #[error("VM {vm}: {reason}")]
    Refused { vm: String, reason: String },
    /// Its NICs cannot be wired: a bridge missing, a tap held by another process.
    #[error("VM {vm}: network")]
    Network {
        vm: String,
        #[source]
        source: Box<local::taps::TapError>,
    },
    #[error("VM {vm}: live migration")]
    Migration {
        vm: String,
        #[source]
        source: Box<crate::qemu::migrate::MigrateError>,
    },
    /// A fail point's `error` action (test builds only).
    #[cfg(feature = "failpoints")]
    #[error(transparent)]
    Injected(#[from] crate::failpoint::Injected),
}

/// The hosts this engine reaches directly: every `address = "local"` host of `desired`,
/// rooted at its `root` or at `<state>/<name>`.
pub fn local_hosts(
    desired: &plasmavmc_specs::Desired,
    state: &crate::records::StateDir,
) -> std::collections::BTreeMap<String, LocalHost> {
    desired
        .hosts
        .values()
        .filter(|h| h.spec.address.as_deref() == Some("local"))
        .map(|h| {
            let root = h
                .spec
                .root
                .as_ref()
                .map_or_else(|| state.host_root(&h.name), PathBuf::from);
            (
                h.name.clone(),
                LocalHost::new(
                    &h.name,
                    &root,
                    h.spec.accel,
                    desired.cluster.timeouts.qmp_ready.0,
                ),
            )
        })
        .collect()
}

/// A hypervisor host.
pub trait Host: Send + Sync {
    /// The host's name in the specs.
    fn name(&self) -> &str;

    /// Every instance on the host, its real state, and the retained disks.
    fn inventory(&self) -> impl Future<Output = Result<Inventory, HostError>> + Send;

    /// Creates the instance folder and its disks; does not start it. Creating an
    /// instance that exists only updates its spec.
    fn create(&self, vm: &VmInstance) -> impl Future<Output = Result<(), HostError>> + Send;

    /// Creates the instance of a VM recovered from a lost host: as [`Host::create`], but
    /// its disks on shared storage hold the VM's data and must be there already; a missing
    /// one (storage not mounted here?) is refused, never created empty.
    fn recover(&self, vm: &VmInstance) -> impl Future<Output = Result<(), HostError>> + Send;

    /// Replaces the spec of an existing instance (effective at its next start); creates
    /// disks the new spec adds, grows disks it enlarges, retains disks it drops.
    fn update(&self, vm: &VmInstance) -> impl Future<Output = Result<(), HostError>> + Send;

    /// Starts QEMU and waits until QMP answers and the guest runs; returns the pid.
    /// Starting a running instance returns its pid and starts nothing.
    fn start(&self, vm: &str) -> impl Future<Output = Result<u32, HostError>> + Send;

    /// ACPI power-down, QMP `quit` after `timeout`, SIGKILL as a last resort.
    fn stop(
        &self,
        vm: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<StopOutcome, HostError>> + Send;

    /// Stops an orphan QEMU (`pid`, running in instance folder `folder`) after checking it
    /// still is one: SIGTERM, then SIGKILL.
    fn prune(&self, folder: &str, pid: u32) -> impl Future<Output = Result<(), HostError>> + Send;

    /// Deletes the retained or shared disk file `path` (the operator's explicit request):
    /// refused for an instance's disk and while a QEMU holds it. Returns the bytes freed.
    fn delete_disk(
        &self,
        path: &Path,
        shared: Option<&Path>,
    ) -> impl Future<Output = Result<u64, HostError>> + Send;

    /// Events the host reports on its own (QEMU exits), from now on.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<HostEvent>;

    /// Removes a stopped instance's folder; its disks move to `retained/`. Returns where.
    fn delete(&self, vm: &str) -> impl Future<Output = Result<Option<PathBuf>, HostError>> + Send;

    /// Creates `vm`'s instance as the target of a live migration from host `from`: disks
    /// on shared storage must exist; the `mirror` disks are created here to receive the
    /// source's mirror over NBD. QEMU waits (`-S -incoming defer`) on `listen`, an address
    /// of this host. Starting the instance later resumes the migrated guest.
    fn prepare_incoming(
        &self,
        vm: &VmInstance,
        from: &str,
        listen: &str,
        mirror: &[String],
    ) -> impl Future<Output = Result<Incoming, HostError>> + Send;

    /// Migrates `vm`'s running guest to `to` and returns when it completed: the QEMU here
    /// is then paused for good (`postmigrate`). On any failure the migration is cancelled
    /// and the guest keeps running here.
    fn migrate_out(
        &self,
        vm: &str,
        to: &Incoming,
        tuning: &crate::qemu::migrate::Tuning,
    ) -> impl Future<Output = Result<crate::qemu::migrate::Stats, HostError>> + Send;

    /// The final figures of the migration that completed from `vm` here (QEMU settles
    /// them a moment after `completed`).
    fn migration_stats(
        &self,
        vm: &str,
    ) -> impl Future<Output = Result<crate::qemu::migrate::Stats, HostError>> + Send;

    /// Removes an instance whose VM lives on another host now (a migration source after
    /// the target runs), or a migration target that was never resumed: its QEMU is ended
    /// and its folder and local disks are deleted — they are stale or half-made copies.
    /// Refused while its guest runs here.
    fn discard(&self, vm: &str) -> impl Future<Output = Result<(), HostError>> + Send;

    /// Reads local disk `disk` of stopped instance `vm` at `offset` (a chunk of at most
    /// [`crate::wire::CHUNK`] bytes).
    fn read_disk(
        &self,
        vm: &str,
        disk: &str,
        offset: u64,
    ) -> impl Future<Output = Result<DiskChunk, HostError>> + Send;

    /// Writes a chunk of local disk `disk` of stopped instance `vm` at `offset` into a
    /// partial file. With `finish` (the SHA-256 of the whole file) the partial file is
    /// checked and replaces the instance's disk, rebased on this host's copy of its base
    /// image when it has one.
    fn write_disk(
        &self,
        vm: &str,
        disk: &str,
        offset: u64,
        chunk: &DiskChunk,
        finish: Option<&str>,
    ) -> impl Future<Output = Result<(), HostError>> + Send;

    /// For `plasmavmc drill` only: inflicts `fault` on `vm`'s running QEMU and returns
    /// its pid. Nothing is recorded: the engine learns of what follows as of any failure.
    fn inject(&self, vm: &str, fault: Fault)
        -> impl Future<Output = Result<u32, HostError>> + Send;
}
