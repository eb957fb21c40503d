//! What the hosts really run, as data.
//!
//! In: one [`Inventory`] per host, each gathered by its `Host` (instance folders + QMP;
//! see `step::look`), and what the engine remembers of the hosts that did not answer.
//! Out: [`Observed`], the planner's second input, and a fingerprint that saved plans
//! record to detect that the world moved on. Data only: no I/O here.

mod guest;

use std::collections::BTreeMap;
use std::path::PathBuf;

use plasmavmc_specs::{Power, VmSpec};
use serde::{Deserialize, Serialize};

pub use guest::{GuestAgentInfo, ProbeState};

/// What QEMU is doing for one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// QEMU alive and the guest running.
    Running,
    /// QEMU alive but the guest not running (paused, in migration, ...).
    Paused,
    /// QEMU alive but its QMP socket does not answer.
    Unresponsive,
    /// No QEMU, and the engine last asked it to stop (or never started it).
    Stopped,
    /// No QEMU, but the engine last asked it to run: it exited on its own.
    Exited,
}

impl RunState {
    /// True when a QEMU process exists for the instance.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            RunState::Running | RunState::Paused | RunState::Unresponsive
        )
    }
}

/// One instance found on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedVm {
    pub name: String,
    pub uuid: String,
    pub state: RunState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The last power state the engine commanded.
    pub power: Power,
    pub revision: String,
    pub spec_hash: String,
    pub spec: VmSpec,
    /// The instance-id of the cloud-init seed it was started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<String>,
    /// SHA-256 of the kernel, initrd and base images it was made with (empty in records
    /// older than that).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub file_digests: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// QEMU's own words for its state (`query-status`), or why it could not be asked:
    /// for people. Decisions read [`ObservedVm::paused`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// What a paused QEMU (state [`RunState::Paused`]) is paused for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<Paused>,
    /// The last exit the engine did not ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<crate::qemu::exit::ExitRecord>,
    /// When recent unexpected exits happened (ms since the epoch).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exits: Vec<u64>,
    /// Automatic restarts so far.
    #[serde(default)]
    pub restarts: u32,
    /// Times the guest's watchdog reset it in place.
    #[serde(default)]
    pub watchdog_resets: u32,
    /// Its guest agent's last answers (`[health] guest_agent`), for this QEMU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent: Option<GuestAgentInfo>,
    /// Its liveness probe's state, for this QEMU (`ok = false`: unhealthy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<ProbeState>,
    /// Its readiness probe's state, for this QEMU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<ProbeState>,
    /// A live-migration target not resumed yet: its QEMU holds no guest of its own until
    /// the migration completes and it is started.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub incoming: bool,
}

/// The QEMU run states of a paused QEMU that recovery decides by (QMP `query-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Paused {
    /// Stopped (`-S`, `stop`), or a live-migration target whose migration completed.
    Paused,
    /// A live-migration target still receiving.
    Inmigrate,
    /// A live-migration source in the migration's last stage (e.g. before switchover).
    FinishMigrate,
    /// A live-migration source whose migration completed: its guest went to the target.
    Postmigrate,
    /// Any other run state (QEMU's word is in `detail`): nothing is decided by it.
    #[serde(other)]
    Other,
}

impl Paused {
    /// The state of QEMU's `query-status` word.
    pub fn of(word: &str) -> Self {
        match word {
            "paused" => Self::Paused,
            "inmigrate" => Self::Inmigrate,
            "finish-migrate" => Self::FinishMigrate,
            "postmigrate" => Self::Postmigrate,
            _ => Self::Other,
        }
    }

    /// Paused by a live migration (either end).
    pub fn by_migration(self) -> bool {
        matches!(
            self,
            Self::Inmigrate | Self::FinishMigrate | Self::Postmigrate
        )
    }
}

impl ObservedVm {
    /// A live-migration target whose incoming migration completed: it holds the guest,
    /// paused (QEMU `paused` after `-incoming`) until it is started.
    pub fn holds_completed_migration(&self) -> bool {
        self.incoming && self.state == RunState::Paused && self.paused == Some(Paused::Paused)
    }

    /// A live-migration source paused in the migration's last stage (QEMU
    /// `finish-migrate`, e.g. waiting before the switchover): an engine or agent that
    /// died there leaves it so. Its guest has not gone anywhere yet.
    pub fn paused_mid_migration(&self) -> bool {
        !self.incoming
            && self.state == RunState::Paused
            && self.paused == Some(Paused::FinishMigrate)
    }

    /// A live-migration source whose migration completed (QEMU `postmigrate`): its guest
    /// went to the target; resuming it is safe only once the target is known dead.
    pub fn is_migrated_source(&self) -> bool {
        !self.incoming && self.state == RunState::Paused && self.paused == Some(Paused::Postmigrate)
    }
}

/// Disks kept after their VM (or the disk) was removed from the specs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retained {
    pub vm: String,
    pub path: PathBuf,
    pub since: String,
    pub reason: String,
}

/// A disk file a host keeps (`plasmavmc disks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskFile {
    pub path: PathBuf,
    pub kind: DiskKind,
    /// The VM it belongs (or belonged) to: its instance, retained note or shared folder.
    pub vm: String,
    /// Bytes it takes on disk.
    pub bytes: u64,
    /// Its length (a qcow2's file, not its virtual size).
    pub size: u64,
    /// Retained: since when and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Where a disk file is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskKind {
    /// A local disk of an instance (`vms/<vm>/disks/`).
    Instance,
    /// Moved aside when its VM or disk left the specs (`retained/`).
    Retained,
    /// On shared storage (`<shared>/<vm>/`).
    Shared,
}

/// A QEMU of ours (its working directory is an instance folder of this host) that no
/// instance record accounts for: left behind by a lost record or a foreign start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orphan {
    pub pid: u32,
    /// The instance folder it runs in.
    pub folder: String,
}

/// Everything one host runs and keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub vms: BTreeMap<String, ObservedVm>,
    /// QEMUs of ours that no instance accounts for; stopped only by `--prune`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orphans: Vec<Orphan>,
    pub retained: Vec<Retained>,
    /// vCPUs and memory the host has (what it reports).
    pub capacity: Capacity,
    /// The Linux bridges that exist on the host: a network is usable there only when
    /// its bridge is among them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bridges: Vec<String>,
    /// The host's CPU and the QEMU CPU models it can run (none: not reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<HostCpu>,
    /// The host's QEMU: its version and machine types, or why it cannot run (none: not
    /// reported, an older agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<HostQemu>,
}

/// A host's QEMU, as its agent reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostQemu {
    /// The binary the agent runs (`qemu-system-x86_64`, or `PLASMAVMC_QEMU`).
    pub binary: String,
    /// Its version (`7.2.22`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The machine types it knows, aliases included (`q35`, `pc-q35-7.2`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<String>,
    /// Why it cannot be run (not found, fails): no VM can start there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// A host's CPU, as its agent reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCpu {
    /// The CPU's model name (`/proc/cpuinfo`).
    pub model: String,
    /// SHA-256 (hex) of the CPU's vendor, model name and flags: VMs with `cpu = "host"`
    /// move live only between hosts of equal digests.
    pub digest: String,
    /// The QEMU CPU models this host can run under the accelerator its VMs get by
    /// default (KVM when it has it; `query-cpu-definitions`, usable ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// The models it can run under TCG (software emulation), for VMs with
    /// `accel = "tcg"`: more than under KVM, which offers only what the CPU has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcg_models: Vec<String>,
}

impl HostCpu {
    /// The models a VM under `accel` can run here (`auto`: the host's default).
    pub fn models_for(&self, accel: plasmavmc_specs::Accel) -> &[String] {
        match accel {
            plasmavmc_specs::Accel::Tcg => &self.tcg_models,
            _ => &self.models,
        }
    }
}

impl Inventory {
    /// The VMs this host may run: its instances, and the folders orphan QEMUs run in.
    pub fn holds(&self) -> Vec<&str> {
        let mut vms: Vec<&str> = self.vms.keys().map(String::as_str).collect();
        vms.extend(self.orphans.iter().map(|o| o.folder.as_str()));
        vms.sort_unstable();
        vms.dedup();
        vms
    }
}

/// Host resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub vcpus: u32,
    pub memory_mb: u64,
}

/// The observed state of every reachable host, and what is known of the others.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    pub hosts: BTreeMap<String, Inventory>,
    /// VMs with actions in flight (the daemon runs several at once), or whose actions
    /// ended while the hosts were asked, with every host those actions touched: what was
    /// seen of them may be half-way, so the planner leaves them alone this time and counts
    /// them on each of those hosts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub in_flight: BTreeMap<String, Vec<String>>,
    /// Hosts that could not be asked, and why.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unreachable: BTreeMap<String, String>,
    /// Where each VM may be, by the engine's durable record
    /// ([`crate::records::whereabouts`]): every host that may hold an instance of it, the
    /// one noted last at the end. A VM that may be on an unreachable host that is not
    /// fenced is unknown: it may still run there, so it is never started anywhere else.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub whereabouts: BTreeMap<String, Vec<String>>,
    /// Hosts known to be powered off (fence command succeeded, or an operator confirmed),
    /// with how and when.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fenced: BTreeMap<String, String>,
    /// Connected hosts that missed heartbeats but are not down yet, with when they were
    /// last heard from (ms since the epoch). Each is also in `unreachable` (not asked,
    /// its VMs unknown) and is never counted as fenced: only status tells them apart.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub suspect: BTreeMap<String, u64>,
}

impl Observed {
    /// Adds what is known beyond the hosts that answered: the ones that could not be
    /// reached (and why), the suspect ones, and where each VM may be. A host of the
    /// record that neither answered nor is known to be unreachable (it was not asked at
    /// all: dropped, or no longer in the specs) counts as unreachable too: what it holds
    /// is unknown.
    pub fn with_context(
        mut self,
        unreachable: &Unreachable,
        whereabouts: BTreeMap<String, Vec<String>>,
        fenced: BTreeMap<String, String>,
    ) -> Self {
        let suspect = unreachable.suspect.iter().map(|(h, s)| (h, &s.why));
        for (host, why) in unreachable.down.iter().chain(suspect) {
            self.unreachable
                .entry(host.clone())
                .or_insert_with(|| why.clone());
        }
        for host in whereabouts.values().flatten() {
            if !self.hosts.contains_key(host) && !self.unreachable.contains_key(host) {
                self.unreachable.insert(
                    host.clone(),
                    format!("host {host} was not asked (no connection to its agent)"),
                );
            }
        }
        self.suspect = unreachable
            .suspect
            .iter()
            .map(|(h, s)| (h.clone(), s.last_heard_ms))
            .collect();
        self.whereabouts = whereabouts;
        // A fencing only counts while the host is away: not while it answers, nor while
        // it is only suspect (still connected, not down).
        self.fenced = fenced
            .into_iter()
            .filter(|(h, _)| self.unreachable.contains_key(h) && !self.suspect.contains_key(h))
            .collect();
        self
    }

    /// An unreachable host `vm` may be on: one that is not fenced first (the VM is then
    /// unknown), else a fenced one (the VM is lost with it and may be recovered).
    pub fn lost_on(&self, vm: &str) -> Option<&str> {
        self.unknown_on(vm)
            .or_else(|| self.away_hosts(vm).find(|h| self.fenced.contains_key(*h)))
    }

    /// An unreachable host that is not fenced and may hold `vm`: while there is one, `vm`
    /// may still run there and is started nowhere else.
    pub fn unknown_on(&self, vm: &str) -> Option<&str> {
        self.away_hosts(vm).find(|h| !self.fenced.contains_key(*h))
    }

    /// The host `vm` was noted on last (where it was put or seen most recently).
    pub fn last_seen(&self, vm: &str) -> Option<&str> {
        self.whereabouts
            .get(vm)
            .and_then(|hosts| hosts.last())
            .map(String::as_str)
    }

    /// The unreachable hosts of the record that may hold `vm`, noted last first.
    fn away_hosts(&self, vm: &str) -> impl Iterator<Item = &str> {
        self.whereabouts
            .get(vm)
            .into_iter()
            .flat_map(|hosts| hosts.iter().rev())
            .filter(|h| self.unreachable.contains_key(*h))
            .map(String::as_str)
    }

    /// Every host that has an instance of `vm` (normally one; several after a fenced host
    /// with a recovered VM comes back).
    pub fn copies(&self, vm: &str) -> Vec<(&str, &ObservedVm)> {
        self.hosts
            .iter()
            .filter_map(|(h, inv)| inv.vms.get(vm).map(|o| (h.as_str(), o)))
            .collect()
    }

    /// Where `vm` runs or is kept, if anywhere.
    pub fn find(&self, vm: &str) -> Option<(&str, &ObservedVm)> {
        self.hosts
            .iter()
            .find_map(|(h, inv)| inv.vms.get(vm).map(|o| (h.as_str(), o)))
    }

    /// One line per VM (`host/vm state pid spec`), the facts a saved plan depends on.
    pub fn summary(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (host, inv) in &self.hosts {
            for (name, vm) in &inv.vms {
                let state = serde_json::to_value(vm.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                let pid = vm.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
                out.insert(
                    format!("{host}/{name}"),
                    format!("{state} pid {pid} spec {}", vm.spec_hash),
                );
            }
        }
        for host in self.unreachable.keys() {
            out.insert(format!("{host}/"), "unreachable".to_owned());
        }
        out
    }

    /// Hash of [`Observed::summary`].
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_vec(&self.summary()).expect("a map of strings serialises");
        plasmavmc_specs::short_hash(&json, 12)
    }
}

/// The hosts an observation does not ask, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unreachable {
    /// Hosts that could not be reached (down), and why.
    pub down: BTreeMap<String, String>,
    /// Connected hosts that missed heartbeats.
    pub suspect: BTreeMap<String, Suspect>,
}

/// A connected host that missed heartbeats (not down yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspect {
    /// Why it is not asked (what its VMs' status says).
    pub why: String,
    /// When its agent last sent anything, in ms since the epoch.
    pub last_heard_ms: u64,
}

impl Unreachable {
    /// Only hosts that could not be reached (no suspect ones).
    pub fn down(down: &BTreeMap<String, String>) -> Self {
        Self {
            down: down.clone(),
            ..Self::default()
        }
    }
}
