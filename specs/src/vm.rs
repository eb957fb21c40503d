//! The VM spec: one `vms/**/<name>.toml` file.
//!
//! Types only, strict (`deny_unknown_fields`) and schema-backed; the doc comments
//! become the JSON Schema descriptions editors show. Cross-field checks live in
//! [`VmSpec::problems`]; checks across files live in `load`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::diag::Seg;
use crate::name::name_problem;

/// A virtual machine: what should run, how big, and what to do when it stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The VM's name. Defaults to the file name without `.toml`. Must match
    /// `^[a-z][a-z0-9-]{0,62}$` and be unique across the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Number of virtual CPUs (at least 1).
    #[serde(default = "default_vcpus")]
    #[schemars(range(min = 1, max = 1024))]
    pub vcpus: u32,
    /// Guest memory in MiB (at least 16).
    #[serde(default = "default_memory_mb")]
    #[schemars(range(min = 16))]
    pub memory_mb: u64,
    /// Whether the VM should be running or stopped.
    #[serde(default)]
    pub power: Power,
    /// Pin the VM to this host (a name from `hosts/`). Absent: the scheduler places it and
    /// keeps it there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// What to do after the VM stops without the engine asking it to.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Recover the VM on another host when its host is lost (after fencing).
    #[serde(default)]
    pub ha: bool,
    /// Who goes first when VMs compete for capacity — placing new VMs, recovering the
    /// VMs of a lost host: higher first, equal ones by name. From -1000 to 1000, default
    /// 0. Changing it never restarts or moves a VM that is placed.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,
    /// How to move the VM when its placement changes.
    #[serde(default)]
    pub migration: MigrationPolicy,
    /// Anti-affinity group: VMs of one group are spread over different hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Direct kernel boot. Absent: the VM boots from its first disk (firmware).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,
    /// Disks, attached as virtio block devices in this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    /// Network interfaces, attached as virtio-net devices in this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
    /// QEMU machine settings.
    #[serde(default)]
    pub qemu: QemuSettings,
    /// Guest health: a watchdog device, the guest agent. Absent: only QEMU's exit is
    /// watched.
    #[serde(default, skip_serializing_if = "crate::health::Health::is_empty")]
    pub health: crate::health::Health,
    /// A cloud-init NoCloud seed, attached read-only after the disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<crate::cloud_init::CloudInit>,
}

fn default_vcpus() -> u32 {
    1
}

/// The default priority is left out of the normalised spec, so specs written before
/// `priority` existed keep their hash (and their instances are not updated for it).
#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// The range `priority` must be in.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;

fn default_memory_mb() -> u64 {
    256
}

/// Desired power state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Power {
    /// The VM should run.
    #[default]
    Running,
    /// The VM should be stopped (gracefully, by ACPI power-down).
    Stopped,
}

/// Restart policy after an exit the engine did not ask for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart after any exit, including the guest powering itself off.
    #[default]
    Always,
    /// Restart only after a crash or a guest panic.
    OnFailure,
    /// Never restart; the VM stays stopped and status says why.
    Never,
}

/// How to move a VM between hosts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPolicy {
    /// Live migration: the guest keeps running.
    #[default]
    Live,
    /// Stop, copy the disks, start on the target.
    Cold,
    /// Never move automatically: the plan says a restart elsewhere is needed.
    None,
}

/// Direct kernel boot. Paths are read from the filesystem, never from git: absolute, or
/// relative to the spec folder (the `--path` folder of the repository), inside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    /// Kernel image (bzImage/vmlinuz).
    pub kernel: String,
    /// Initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// A disk. Exactly one of `size_gb` (a new empty disk) or `image` (a copy-on-write
/// overlay of a base image) must be set. Disks are never deleted implicitly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Disk name, unique within the VM; the file is `<name>.qcow2`.
    pub name: String,
    /// Size of a new empty qcow2 disk, in GiB (at least 1). Growing it later resizes the
    /// disk on the next restart; a smaller size never shrinks it (that would lose data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub size_gb: Option<u64>,
    /// Base image (qcow2 or raw, told apart by its content) the disk is created from as a
    /// qcow2 overlay; the image itself is never written. A path, read from the filesystem
    /// like `boot.kernel`, or `{ url, sha256 }`: downloaded by each host once and checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<crate::image::Image>,
    /// Where the disk lives.
    #[serde(default)]
    pub storage: Storage,
}

/// Disk placement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Storage {
    /// Shared when the host has `shared_storage`, else local.
    #[default]
    Auto,
    /// On the host's shared storage (required).
    Shared,
    /// Under the host's root.
    Local,
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// `user` (QEMU user-mode networking: outbound access and port forwards), or a
    /// network declared in `plasmavmc.toml` (`[networks.NAME]`: a bridge on each host
    /// that has it).
    #[serde(default)]
    pub network: Network,
    /// The NIC's MAC address, unicast and unique in the repository. Default: derived
    /// from the VM's name and the NIC's index (locally administered, `52:54:…`), so it
    /// never changes across restarts, recoveries and moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Port forwards from the host to the guest: `"tcp:HOSTPORT:GUESTPORT"` or
    /// `"udp:HOSTPORT:GUESTPORT"` (`user` networks only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward: Vec<String>,
}

impl Nic {
    /// The MAC of this NIC, the `index`th of VM `vm`: the one given, or the derived one.
    pub fn mac_of(&self, vm: &str, index: usize) -> String {
        self.mac.clone().unwrap_or_else(|| derived_mac(vm, index))
    }
}

/// The MAC a NIC gets when its spec names none: `52:54` (locally administered,
/// unicast; QEMU's own prefix) and four bytes of SHA-256 of the VM's name and the NIC's
/// index. Stable for as long as the VM keeps its name.
pub fn derived_mac(vm: &str, index: usize) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("plasmavmc nic {vm} {index}").as_bytes());
    format!(
        "52:54:{:02x}:{:02x}:{:02x}:{:02x}",
        digest[0], digest[1], digest[2], digest[3]
    )
}

/// The network a NIC is on: `user`, or the name of a declared network.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct Network(pub String);

impl Network {
    /// QEMU user-mode networking (slirp), which every host has.
    pub const USER: &'static str = "user";

    pub fn user() -> Self {
        Self(Self::USER.to_owned())
    }

    pub fn is_user(&self) -> bool {
        self.0 == Self::USER
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Network {
    fn default() -> Self {
        Self::user()
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// QEMU settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QemuSettings {
    /// Accelerator: `kvm`, `tcg` (software emulation) or `auto` (kvm when /dev/kvm opens).
    #[serde(default)]
    pub accel: Accel,
    /// QEMU machine type, e.g. `q35` or `pc`.
    #[serde(default = "default_machine")]
    pub machine: String,
    /// Confine QEMU with its seccomp sandbox (`-sandbox on`, denying obsolete calls,
    /// privilege changes, spawning processes and resource control). Turn off only for
    /// setups that need QEMU to spawn helpers (e.g. `qemu-bridge-helper`).
    #[serde(default = "default_true")]
    pub sandbox: bool,
    /// The guest's CPU model: a QEMU CPU model name (`x86-64-v2`, `Skylake-Server`, …)
    /// or `host` (the host's own CPU: fastest, but it moves live only between hosts
    /// with the same CPU). Default: `host` under KVM, QEMU's default under TCG.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Drop to this user once QEMU has set up (`-runas`): it opens disks, sockets and logs
    /// as the agent's user, then runs as this one. Needs an agent running as root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runas: Option<String>,
    /// Change QEMU's root to this folder once it has set up (`-chroot`); an empty folder
    /// owned by root is the usual choice. Absolute; needs an agent running as root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chroot: Option<String>,
}

fn default_true() -> bool {
    true
}

impl Default for QemuSettings {
    fn default() -> Self {
        Self {
            accel: Accel::default(),
            machine: default_machine(),
            sandbox: true,
            cpu: None,
            runas: None,
            chroot: None,
        }
    }
}

fn default_machine() -> String {
    "q35".to_owned()
}

/// CPU accelerator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Accel {
    /// KVM when /dev/kvm can be opened, else TCG.
    #[default]
    Auto,
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// A port forward parsed from `"tcp:2222:22"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Forward {
    pub udp: bool,
    pub host_port: u16,
    pub guest_port: u16,
}

impl Forward {
    /// Parses `"tcp:HOSTPORT:GUESTPORT"` / `"udp:HOSTPORT:GUESTPORT"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let [proto, host, guest] = parts.as_slice() else {
            return Err(format!("forward {text:?} must look like \"tcp:2222:22\""));
        };
        let udp = match *proto {
            "tcp" => false,
            "udp" => true,
            other => {
                return Err(format!(
                    "forward protocol {other:?} must be \"tcp\" or \"udp\""
                ))
            }
        };
        let port = |p: &str| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "port {p:?} in forward {text:?} must be a number 1-65535"
            )),
        };
        Ok(Self {
            udp,
            host_port: port(host)?,
            guest_port: port(guest)?,
        })
    }
}

/// A problem inside one VM spec: where (key path) and what.
pub type Problem = (Vec<Seg<'static>>, String);

impl VmSpec {
    /// Everything wrong with this spec on its own (not counting other files or the
    /// filesystem), each with the key path it concerns.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out: Vec<Problem> = Vec::new();
        let mut bad = |key: Vec<Seg<'static>>, msg: String| out.push((key, msg));
        if let Some(name) = &self.name {
            if let Some(p) = name_problem(name) {
                bad(vec![Seg::Key("name")], p);
            }
        }
        if self.vcpus == 0 || self.vcpus > 1024 {
            bad(
                vec![Seg::Key("vcpus")],
                format!("vcpus = {} must be between 1 and 1024", self.vcpus),
            );
        }
        if !PRIORITY_RANGE.contains(&self.priority) {
            bad(
                vec![Seg::Key("priority")],
                format!(
                    "priority = {} must be between {} and {}",
                    self.priority,
                    PRIORITY_RANGE.start(),
                    PRIORITY_RANGE.end()
                ),
            );
        }
        if self.memory_mb < 16 {
            bad(
                vec![Seg::Key("memory_mb")],
                format!("memory_mb = {} must be at least 16", self.memory_mb),
            );
        }
        if let Some(group) = &self.group {
            if let Some(p) = name_problem(group) {
                bad(vec![Seg::Key("group")], format!("group: {p}"));
            }
        }
        if let Some(boot) = &self.boot {
            for (key, value) in [
                ("kernel", Some(&boot.kernel)),
                ("initrd", boot.initrd.as_ref()),
            ] {
                if let Some(p) = value.and_then(|v| path_problem(v)) {
                    bad(vec![Seg::Key("boot"), Seg::Key(key)], p);
                }
            }
            if boot
                .cmdline
                .as_deref()
                .is_some_and(|c| c.contains(['\n', '\0']))
            {
                bad(
                    vec![Seg::Key("boot"), Seg::Key("cmdline")],
                    "cmdline must be one line".to_owned(),
                );
            }
        }
        self.disk_problems(&mut bad);
        self.nic_problems(&mut bad);
        self.qemu_problems(&mut bad);
        let forwarded: Vec<u16> = self
            .forwards()
            .filter(|f| !f.udp)
            .map(|f| f.guest_port)
            .collect();
        self.health.problems(&forwarded, &mut bad);
        if let Some(seed) = &self.cloud_init {
            seed.problems(&mut bad);
        }
        out
    }

    fn qemu_problems(&self, bad: &mut impl FnMut(Vec<Seg<'static>>, String)) {
        let machine = &self.qemu.machine;
        if machine.is_empty()
            || !machine
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            bad(
                vec![Seg::Key("qemu"), Seg::Key("machine")],
                format!("machine {machine:?} may only hold letters, digits, '.', '-' and '_'"),
            );
        }
        if let Some(p) = self
            .qemu
            .cpu
            .as_deref()
            .and_then(crate::net::cpu_model_problem)
        {
            bad(vec![Seg::Key("qemu"), Seg::Key("cpu")], p);
        }
        if let Some(user) = &self.qemu.runas {
            let ok = !user.is_empty()
                && user.len() <= 32
                && user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && user.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-')
                });
            if !ok {
                bad(
                    vec![Seg::Key("qemu"), Seg::Key("runas")],
                    format!(
                        "runas {user:?} is not a user name (lowercase letters, digits, '_', '-')"
                    ),
                );
            }
        }
        if let Some(dir) = &self.qemu.chroot {
            if !dir.starts_with('/') || dir.split('/').any(|c| c == "..") || dir.contains(',') {
                bad(
                    vec![Seg::Key("qemu"), Seg::Key("chroot")],
                    format!("chroot {dir:?} must be an absolute path without '..' or ','"),
                );
            }
        }
    }

    fn disk_problems(&self, bad: &mut impl FnMut(Vec<Seg<'static>>, String)) {
        let mut seen = std::collections::BTreeSet::new();
        for (i, disk) in self.disks.iter().enumerate() {
            let at = |k: &'static str| vec![Seg::Key("disks"), Seg::Index(i), Seg::Key(k)];
            if let Some(p) = name_problem(&disk.name) {
                bad(at("name"), format!("disk {p}"));
            } else if !seen.insert(disk.name.as_str()) {
                bad(
                    at("name"),
                    format!("disk name {:?} is used twice in this VM", disk.name),
                );
            }
            match (disk.size_gb, &disk.image) {
                (None, None) => bad(at("name"), "disk needs `size_gb` or `image`".to_owned()),
                (Some(_), Some(_)) => {
                    bad(
                        at("image"),
                        "set either `size_gb` or `image`, not both".to_owned(),
                    );
                }
                (Some(0), None) => bad(at("size_gb"), "size_gb must be at least 1".to_owned()),
                (Some(n), None) if n > 64 * 1024 => {
                    bad(
                        at("size_gb"),
                        format!("size_gb = {n} is larger than 64 TiB"),
                    );
                }
                (None, Some(image)) => {
                    for (below, p) in image.problems() {
                        let mut key = at("image");
                        key.extend(below.map(Seg::Key));
                        bad(key, p);
                    }
                }
                _ => {}
            }
        }
    }

    fn nic_problems(&self, bad: &mut impl FnMut(Vec<Seg<'static>>, String)) {
        let mut ports = std::collections::BTreeSet::new();
        for (i, nic) in self.nics.iter().enumerate() {
            let at = |k: &'static str| vec![Seg::Key("nics"), Seg::Index(i), Seg::Key(k)];
            if let Some(p) = nic.mac.as_deref().and_then(crate::net::mac_problem) {
                bad(at("mac"), p);
            }
            if !nic.network.is_user() && !nic.forward.is_empty() {
                bad(
                    at("forward"),
                    format!(
                        "forward is only for network = \"user\" NICs; a NIC on {:?} is reached through its bridge",
                        nic.network.as_str()
                    ),
                );
                continue;
            }
            for (j, fwd) in nic.forward.iter().enumerate() {
                let at = vec![
                    Seg::Key("nics"),
                    Seg::Index(i),
                    Seg::Key("forward"),
                    Seg::Index(j),
                ];
                match Forward::parse(fwd) {
                    Err(p) => bad(at, p),
                    Ok(f) if !ports.insert((f.udp, f.host_port)) => {
                        bad(at, format!("host port {} is forwarded twice", f.host_port));
                    }
                    Ok(_) => {}
                }
            }
        }
    }

    /// All host ports this VM forwards.
    pub fn forwards(&self) -> impl Iterator<Item = Forward> + '_ {
        self.nics
            .iter()
            .flat_map(|n| n.forward.iter())
            .filter_map(|f| Forward::parse(f).ok())
    }
}

/// Why a file path given in a spec is unusable on its own, or `None`.
pub(crate) fn path_problem(path: &str) -> Option<String> {
    if path.is_empty() {
        return Some("path is empty".to_owned());
    }
    if path.contains(['\0', '\n']) {
        return Some(format!("path {path:?} contains a control character"));
    }
    None
}
