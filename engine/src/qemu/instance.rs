//! A VM instance on a host is a folder, `<root>/vms/<name>/`:
//!
//! ```text
//! instance.toml   spec snapshot, uuid, revision, last power command (this file)
//! qemu.pid        written by QEMU (-pidfile)
//! qmp.sock        QMP control socket
//! console.sock    the serial port's socket (`plasmavmc console`; one client)
//! console.lock    flock of the console attached now
//! qga.sock        the guest agent's channel (`[health] guest_agent`)
//! guest-agent.toml what the guest agent last said (written by the host's agent)
//! liveness.toml, readiness.toml   the probes' states (written by the host's agent)
//! serial.log      the guest's serial console (previous run: serial.log.1)
//! qemu.log        QEMU's stdout/stderr (previous run: qemu.log.1)
//! disks/          the VM's local disks, <disk>.qcow2
//! cidata.img      the cloud-init seed (0600), when the VM has one
//! ```
//! Inventory is scanning these folders; nothing else is needed to rediscover every
//! VM after any restart. This module only knows the layout and the instance file.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use plasmavmc_specs::{Power, VmSpec};
use serde::{Deserialize, Serialize};

use super::exit::ExitRecord;
use crate::records::{write_atomic, StateError};

pub const INSTANCE_FILE: &str = "instance.toml";
pub const PID_FILE: &str = "qemu.pid";
pub const QMP_SOCKET: &str = "qmp.sock";
pub const SERIAL_LOG: &str = "serial.log";
pub const CONSOLE_SOCKET: &str = "console.sock";
/// Held (flock) by the one `plasmavmc console` attached to the VM.
pub const CONSOLE_LOCK: &str = "console.lock";
pub const QEMU_LOG: &str = "qemu.log";
pub const DISKS_DIR: &str = "disks";
pub const GUEST_AGENT_FILE: &str = "guest-agent.toml";
pub const LIVENESS_FILE: &str = "liveness.toml";
pub const READINESS_FILE: &str = "readiness.toml";

/// Errors reading or writing an instance folder.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is damaged")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error(transparent)]
    Write(#[from] StateError),
}

/// What the engine asks a host to run: the spec of one commit plus the files it names,
/// resolved to absolute paths on that host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInstance {
    pub name: String,
    /// Commit the spec came from.
    pub revision: String,
    pub spec_hash: String,
    pub spec: VmSpec,
    #[serde(default)]
    pub files: ResolvedFiles,
    /// The host's shared storage folder (`<shared>/<vm>/<disk>.qcow2`), for disks stored
    /// there: `storage = "shared"`, or `"auto"` on a host that has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_storage: Option<PathBuf>,
    /// The networks the VM's NICs are on (all but `user`), as the cluster declares them:
    /// the bridge each NIC's tap joins, and its VLAN. Empty in records older than bridged
    /// networks (their NICs were all `user`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub networks: BTreeMap<String, plasmavmc_specs::NetworkDef>,
}

/// Kernel, initrd and base images named by a spec, as absolute paths.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedFiles {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Base image per disk name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub images: BTreeMap<String, PathBuf>,
    /// The cloud-init seed (`[cloud_init]`), built by the engine from the commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<super::seed::SeedFile>,
    /// SHA-256 of the kernel, initrd and base images given by path (`kernel`, `initrd`,
    /// `image <disk>`) when the commit was read: a file replaced in place is noticed.
    /// Empty in records older than this.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub digests: BTreeMap<String, String>,
}

/// `instance.toml`: the durable record of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceFile {
    /// Identity of this instance: passed to QEMU as `-uuid`, so a pid can be checked to be
    /// really this VM's QEMU (its cmdline holds the uuid).
    pub uuid: String,
    pub created_at: String,
    /// The last power state the engine commanded. `running` with no QEMU alive means the
    /// VM exited without the engine asking.
    pub power: Power,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// The last exit the engine did not ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitRecord>,
    /// When recent unexpected exits happened (ms since the epoch), for backoff and giving
    /// up; cleared when the spec changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exits: Vec<u64>,
    /// Automatic restarts so far.
    #[serde(default)]
    pub restarts: u32,
    /// Times the guest's watchdog reset it in place (`[health] watchdog = "reset"`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub watchdog_resets: u32,
    /// Set with `power = running` when a start begins, cleared once its QEMU runs the
    /// guest (or its exit is recorded): a record that still says so with no QEMU alive is
    /// a start cut short (the agent died mid-start), not an exit of the VM.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub starting: bool,
    /// Set while this instance is the target of a live migration that has not been
    /// resumed here yet; its QEMU (`-S -incoming defer`) holds no guest until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoming: Option<IncomingRecord>,
    /// Set (when, RFC 3339) right before this instance's outgoing live migration
    /// switches to postcopy: from then on its QEMU never runs the guest again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<String>,
    pub vm: VmInstance,
}

impl InstanceFile {
    /// The record of a new instance of `vm`: a fresh uuid, stopped, no history;
    /// `incoming` when it is a live migration's target.
    pub fn fresh(vm: &VmInstance, incoming: Option<IncomingRecord>) -> Self {
        Self {
            uuid: uuid::Uuid::new_v4().to_string(),
            created_at: crate::time::now(),
            power: Power::Stopped,
            started_at: None,
            last_exit: None,
            exits: Vec::new(),
            restarts: 0,
            watchdog_resets: 0,
            starting: false,
            incoming,
            postcopy: None,
            vm: vm.clone(),
        }
    }
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What a migration target remembers until it is resumed or discarded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingRecord {
    /// The host the VM comes from.
    pub from: String,
    /// Disks exported over NBD for the source's mirror (local disks, created here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nbd_disks: Vec<String>,
}

/// Unexpected exits remembered per instance (older ones are forgotten).
pub const EXIT_HISTORY: usize = 32;

/// Paths of one instance folder.
#[derive(Debug, Clone)]
pub struct InstanceDir {
    pub dir: PathBuf,
}

impl InstanceDir {
    pub fn new(root: &Path, name: &str) -> Self {
        Self {
            dir: vms_dir(root).join(name),
        }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn disk(&self, disk: &str) -> PathBuf {
        self.dir.join(DISKS_DIR).join(format!("{disk}.qcow2"))
    }

    pub fn exists(&self) -> bool {
        self.file(INSTANCE_FILE).exists()
    }

    pub fn read(&self) -> Result<InstanceFile, InstanceError> {
        let path = self.file(INSTANCE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| InstanceError::Read {
            path: path.clone(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| InstanceError::Parse { path, source })
    }

    pub fn write(&self, inst: &InstanceFile) -> Result<(), InstanceError> {
        let text = toml::to_string_pretty(inst).expect("an instance file always serialises");
        write_atomic(&self.file(INSTANCE_FILE), text.as_bytes())?;
        Ok(())
    }

    /// The pid QEMU wrote, if the file exists and holds a number.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.file(PID_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl VmInstance {
    /// Where disk `disk` lives: relative to the instance folder for local disks (QEMU
    /// runs there), absolute for shared ones. `None` when it wants shared storage and
    /// the host has none.
    pub fn disk_path(&self, disk: &plasmavmc_specs::Disk) -> Option<PathBuf> {
        use plasmavmc_specs::Storage;
        let local = || Some(PathBuf::from(DISKS_DIR).join(format!("{}.qcow2", disk.name)));
        let shared = |root: &Path| Some(root.join(&self.name).join(format!("{}.qcow2", disk.name)));
        match (disk.storage, &self.shared_storage) {
            (Storage::Local, _) | (Storage::Auto, None) => local(),
            (Storage::Shared | Storage::Auto, Some(root)) => shared(root),
            (Storage::Shared, None) => None,
        }
    }
}

/// `<root>/vms`: one folder per instance.
pub fn vms_dir(root: &Path) -> PathBuf {
    root.join("vms")
}

/// `<root>/retained`: disks of deleted VMs and disks removed from specs, never deleted.
pub fn retained_dir(root: &Path) -> PathBuf {
    root.join("retained")
}
