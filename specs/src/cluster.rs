//! Cluster settings: the optional `plasmavmc.toml` at the top of the spec folder.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Settings that apply to the whole repository. Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Timeouts for VM operations.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// How the engine restarts VMs that exit without being asked to.
    #[serde(default)]
    pub restart: RestartSettings,
    /// Where the scheduler may put VMs that are not pinned.
    #[serde(default)]
    pub placement: PlacementSettings,
    /// How hosts are watched and when one is declared down.
    #[serde(default)]
    pub heartbeat: HeartbeatSettings,
    /// How VMs move between hosts (live migration tuning and bounds).
    #[serde(default)]
    pub migration: MigrationSettings,
    /// The networks VMs may be put on besides `user`, by name (`[networks.lan]`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub networks: BTreeMap<String, NetworkDef>,
    /// How many actions the engine carries out at once.
    #[serde(default)]
    pub concurrency: ConcurrencySettings,
}

/// Bounds on the actions carried out at once. Different VMs' actions run concurrently;
/// each VM's own actions always run in order. A slow action (a move, a download) holds
/// only its own slots: a crashed VM elsewhere is restarted meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencySettings {
    /// Actions touching one host at once (creates, starts, stops, moves in and out).
    #[serde(default = "default_per_host")]
    #[schemars(range(min = 1))]
    pub per_host: u32,
    /// Moves (live or cold) into or out of one host at once: both ends count, since a
    /// move shares the host's link and disk.
    #[serde(default = "default_migrations_per_host")]
    #[schemars(range(min = 1))]
    pub migrations_per_host: u32,
    /// Moves at once across all hosts.
    #[serde(default = "default_migrations")]
    #[schemars(range(min = 1))]
    pub migrations: u32,
}

impl Default for ConcurrencySettings {
    fn default() -> Self {
        Self {
            per_host: default_per_host(),
            migrations_per_host: default_migrations_per_host(),
            migrations: default_migrations(),
        }
    }
}

fn default_per_host() -> u32 {
    8
}

fn default_migrations_per_host() -> u32 {
    2
}

fn default_migrations() -> u32 {
    5
}

/// A network: a Linux bridge of the same name on every host that has it (hosts list
/// theirs in `networks = [...]`). Each NIC on it gets a tap on that bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkDef {
    /// The bridge's name on each host (at most 15 characters, as Linux allows).
    pub bridge: String,
    /// An 802.1Q VLAN tag for the VMs' taps (the bridge must filter VLANs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4094))]
    pub vlan: Option<u16>,
}

/// Live migration tuning. QEMU's own defaults (128 MiB/s, no auto-converge) make
/// migrations several times slower than the link allows and let a busy guest never
/// converge; these defaults were measured on 2-vCPU TCG hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationSettings {
    /// Bandwidth cap for the memory stream, in MiB/s.
    #[serde(default = "default_max_bandwidth")]
    #[schemars(range(min = 1))]
    pub max_bandwidth_mib: u64,
    /// Longest pause of the guest allowed at switchover.
    #[serde(default = "default_downtime_limit")]
    pub downtime_limit: HumanDuration,
    /// Throttle a guest that dirties memory faster than it can be sent.
    #[serde(default = "default_true")]
    pub auto_converge: bool,
    /// Cancel when no byte moved for this long.
    #[serde(default = "default_progress_timeout")]
    pub progress_timeout: HumanDuration,
    /// Cancel when the migration takes longer than this per GiB of memory and local disk
    /// (at least one GiB's worth).
    #[serde(default = "default_timeout_per_gib")]
    pub timeout_per_gib: HumanDuration,
}

impl Default for MigrationSettings {
    fn default() -> Self {
        Self {
            max_bandwidth_mib: default_max_bandwidth(),
            downtime_limit: default_downtime_limit(),
            auto_converge: true,
            progress_timeout: default_progress_timeout(),
            timeout_per_gib: default_timeout_per_gib(),
        }
    }
}

fn default_max_bandwidth() -> u64 {
    1024
}

fn default_downtime_limit() -> HumanDuration {
    HumanDuration(Duration::from_millis(300))
}

fn default_true() -> bool {
    true
}

fn default_progress_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn default_timeout_per_gib() -> HumanDuration {
    HumanDuration(Duration::from_secs(120))
}

/// Host health. A host that sends nothing (not even a heartbeat answer) for
/// `down_after` is down: its VMs are unknown, and once it is fenced (its `fence`
/// command exits 0, or `plasmavmc fence confirm HOST`) its `ha` VMs are recovered
/// elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatSettings {
    /// A heartbeat every this long on each agent channel.
    #[serde(default = "default_heartbeat")]
    pub interval: HumanDuration,
    /// Silence after which a host is down.
    #[serde(default = "default_down_after")]
    pub down_after: HumanDuration,
}

impl Default for HeartbeatSettings {
    fn default() -> Self {
        Self {
            interval: default_heartbeat(),
            down_after: default_down_after(),
        }
    }
}

fn default_heartbeat() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

fn default_down_after() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

/// Scheduler limits. Memory is never overcommitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementSettings {
    /// How many vCPUs a host may hand out per CPU it has (e.g. 4.0: a 16-CPU host takes
    /// VMs totalling 64 vCPUs).
    #[serde(default = "default_vcpu_overcommit")]
    #[schemars(range(min = 0.1, max = 64.0))]
    pub vcpu_overcommit: f64,
}

impl Default for PlacementSettings {
    fn default() -> Self {
        Self {
            vcpu_overcommit: default_vcpu_overcommit(),
        }
    }
}

fn default_vcpu_overcommit() -> f64 {
    4.0
}

/// Restart backoff and give-up rule, for VMs whose `restart` policy asks for restarts.
/// The first restart after an exit is immediate; each further exit within `window`
/// waits twice as long as the one before (from `backoff`, at most `backoff_max`); after
/// `max_failures` exits within `window` the VM is `failed` until a commit changes its spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartSettings {
    /// Wait before the second restart; doubles for each further one.
    #[serde(default = "default_backoff")]
    pub backoff: HumanDuration,
    /// Longest wait between restarts.
    #[serde(default = "default_backoff_max")]
    pub backoff_max: HumanDuration,
    /// Unexpected exits within `window` after which the engine gives up (phase `failed`).
    #[serde(default = "default_max_failures")]
    #[schemars(range(min = 1))]
    pub max_failures: u32,
    /// The window `max_failures` counts in.
    #[serde(default = "default_window")]
    pub window: HumanDuration,
}

impl ClusterSpec {
    /// Everything wrong with these settings on their own.
    pub fn problems(&self) -> Vec<crate::vm::Problem> {
        use crate::diag::Seg;
        let mut out = Vec::new();
        if self.restart.max_failures == 0 {
            out.push((
                vec![Seg::Key("restart"), Seg::Key("max_failures")],
                "max_failures must be at least 1".to_owned(),
            ));
        }
        let hb = &self.heartbeat;
        if hb.interval.0 < Duration::from_millis(100) {
            out.push((
                vec![Seg::Key("heartbeat"), Seg::Key("interval")],
                "interval must be at least 100ms".to_owned(),
            ));
        } else if hb.down_after.0 < hb.interval.0.saturating_mul(2) {
            out.push((
                vec![Seg::Key("heartbeat"), Seg::Key("down_after")],
                "down_after must be at least twice the heartbeat interval".to_owned(),
            ));
        }
        if !(0.1..=64.0).contains(&self.placement.vcpu_overcommit) {
            out.push((
                vec![Seg::Key("placement"), Seg::Key("vcpu_overcommit")],
                "vcpu_overcommit must be between 0.1 and 64".to_owned(),
            ));
        }
        let mig = &self.migration;
        if mig.max_bandwidth_mib == 0 {
            out.push((
                vec![Seg::Key("migration"), Seg::Key("max_bandwidth_mib")],
                "max_bandwidth_mib must be at least 1".to_owned(),
            ));
        }
        if mig.downtime_limit.0 < Duration::from_millis(1) {
            out.push((
                vec![Seg::Key("migration"), Seg::Key("downtime_limit")],
                "downtime_limit must be at least 1ms".to_owned(),
            ));
        }
        for (key, value) in [
            ("progress_timeout", mig.progress_timeout),
            ("timeout_per_gib", mig.timeout_per_gib),
        ] {
            if value.0 < Duration::from_secs(1) {
                out.push((
                    vec![Seg::Key("migration"), Seg::Key(key)],
                    format!("{key} must be at least 1s"),
                ));
            }
        }
        let c = &self.concurrency;
        for (key, value) in [
            ("per_host", c.per_host),
            ("migrations_per_host", c.migrations_per_host),
            ("migrations", c.migrations),
        ] {
            if value == 0 {
                out.push((
                    vec![Seg::Key("concurrency"), Seg::Key(key)],
                    format!("{key} must be at least 1"),
                ));
            }
        }
        if self.restart.backoff_max < self.restart.backoff {
            out.push((
                vec![Seg::Key("restart"), Seg::Key("backoff_max")],
                "backoff_max must not be shorter than backoff".to_owned(),
            ));
        }
        out
    }
}

impl Default for RestartSettings {
    fn default() -> Self {
        Self {
            backoff: default_backoff(),
            backoff_max: default_backoff_max(),
            max_failures: default_max_failures(),
            window: default_window(),
        }
    }
}

fn default_backoff() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

fn default_backoff_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

fn default_max_failures() -> u32 {
    5
}

fn default_window() -> HumanDuration {
    HumanDuration(Duration::from_secs(600))
}

/// Timeouts for VM operations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// How long a graceful stop (ACPI power-down) may take before QEMU is told to quit.
    #[serde(default = "default_stop")]
    pub stop: HumanDuration,
    /// How long QEMU may take from spawn until its QMP socket answers.
    #[serde(default = "default_qmp_ready")]
    pub qmp_ready: HumanDuration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            stop: default_stop(),
            qmp_ready: default_qmp_ready(),
        }
    }
}

fn default_stop() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn default_qmp_ready() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// A duration written for humans: `"30s"`, `"500ms"`, `"2m 30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[schemars(
    with = "String",
    description = "A duration such as \"30s\", \"500ms\" or \"2m\"."
)]
pub struct HumanDuration(pub Duration);

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// The longest duration a setting may hold: a year (`"1y"` is 365.25 days). Every
/// setting is a timeout, an interval or a window of minutes; far longer values are typos,
/// and times that large overflow the clock arithmetic that uses them.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let duration = humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); write e.g. \"30s\" or \"500ms\""
            ))
        })?;
        if duration > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "duration {text:?} is longer than a year"
            )));
        }
        Ok(HumanDuration(duration))
    }
}
