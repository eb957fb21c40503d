//! VM specs that boot the test guest under TCG, and host specs for simulated hosts.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::artifacts::Guest;

/// The kernel command line every test VM gets (serial console, no reboot loop).
pub const BASE_CMDLINE: &str = "console=ttyS0 quiet panic=-1";

/// A VM spec with knobs; defaults: 1 vCPU, 128 MiB, running, one 1 GiB disk "data".
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub vcpus: u32,
    pub memory_mb: u64,
    pub power: String,
    /// `restart = "..."` when set (`always`, `on-failure`, `never`).
    pub restart: Option<String>,
    /// `(name, size_gb)`.
    pub disks: Vec<(String, u64)>,
    /// Appended to [`BASE_CMDLINE`], e.g. `plasmavmc.poweroff=5`.
    pub cmdline_extra: String,
    /// `[qemu] machine = "..."` when set (default: the engine's, q35).
    pub machine: Option<String>,
    /// More `[qemu]` lines, as written (e.g. `runas = "nobody"`).
    pub qemu_lines: Vec<String>,
    /// `group = "..."` (anti-affinity) when set.
    pub group: Option<String>,
    /// `host = "..."` (a pin) when set.
    pub host: Option<String>,
    /// `ha = ...` when set (recover on another host once its host is fenced).
    pub ha: Option<bool>,
    /// `migration = "..."` when set (`live`, `cold`, `none`).
    pub migration: Option<String>,
    /// `priority = ...` when set (who goes first when VMs compete for capacity).
    pub priority: Option<i32>,
    /// `storage = "..."` of every disk when set (`auto`, `shared`, `local`).
    pub storage: Option<String>,
    /// No `[boot]` table: the firmware boots the first disk (no kernel is copied to
    /// the host; on an empty disk the guest never gets past the BIOS).
    pub firmware: bool,
    /// `[[nics]]`: `(network, mac)`, the MAC written only when given.
    pub nics: Vec<(String, Option<String>)>,
    /// Boot the generic-kernel flavour of the guest (it has a watchdog driver).
    pub generic: bool,
    /// `[health]` lines, as written (e.g. `watchdog = "reset"`); `[health.*]` tables too.
    pub health_lines: Vec<String>,
    /// `forward = [...]` of the first NIC (a `user` one).
    pub forwards: Vec<String>,
}

impl Default for VmSpec {
    fn default() -> Self {
        Self {
            vcpus: 1,
            memory_mb: 128,
            power: "running".to_owned(),
            restart: None,
            disks: vec![("data".to_owned(), 1)],
            cmdline_extra: String::new(),
            machine: None,
            qemu_lines: Vec::new(),
            group: None,
            host: None,
            ha: None,
            migration: None,
            priority: None,
            storage: None,
            firmware: false,
            nics: Vec::new(),
            generic: false,
            health_lines: Vec::new(),
            forwards: Vec::new(),
        }
    }
}

impl VmSpec {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn memory(mut self, mb: u64) -> Self {
        self.memory_mb = mb;
        self
    }

    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = n;
        self
    }

    pub fn power(mut self, power: &str) -> Self {
        power.clone_into(&mut self.power);
        self
    }

    pub fn restart(mut self, policy: &str) -> Self {
        self.restart = Some(policy.to_owned());
        self
    }

    pub fn no_disks(mut self) -> Self {
        self.disks.clear();
        self
    }

    pub fn disk(mut self, name: &str, size_gb: u64) -> Self {
        self.disks.push((name.to_owned(), size_gb));
        self
    }

    pub fn cmdline(mut self, extra: &str) -> Self {
        extra.clone_into(&mut self.cmdline_extra);
        self
    }

    /// A QEMU machine type; one the host's QEMU does not know (`no-such-machine`)
    /// passes validation and is refused at plan time.
    pub fn machine(mut self, machine: &str) -> Self {
        self.machine = Some(machine.to_owned());
        self
    }

    /// An anti-affinity group: the scheduler spreads its VMs over hosts.
    pub fn group(mut self, group: &str) -> Self {
        self.group = Some(group.to_owned());
        self
    }

    /// Pins the VM to `host`.
    pub fn pin(mut self, host: &str) -> Self {
        self.host = Some(host.to_owned());
        self
    }

    /// `ha = true`: recovered on another host once its host is fenced; `ha = false`
    /// (the default when absent) written explicitly.
    pub fn ha(mut self, ha: bool) -> Self {
        self.ha = Some(ha);
        self
    }

    /// One more line of the `[qemu]` table, as written.
    pub fn qemu_line(mut self, line: &str) -> Self {
        self.qemu_lines.push(line.to_owned());
        self
    }

    /// `migration = policy`: how the VM moves when its placement changes.
    pub fn migration(mut self, policy: &str) -> Self {
        self.migration = Some(policy.to_owned());
        self
    }

    /// `storage = "shared"` for every disk: on the host's shared storage,
    /// `<shared_storage>/<vm>/<disk>.qcow2`.
    pub fn shared_disks(mut self) -> Self {
        self.storage = Some("shared".to_owned());
        self
    }

    /// `priority = n`: placed (and recovered) before VMs of lower priority.
    pub fn priority(mut self, n: i32) -> Self {
        self.priority = Some(n);
        self
    }

    /// No `[boot]`: the firmware boots the first disk (see [`Self::firmware`]).
    pub fn firmware(mut self) -> Self {
        self.firmware = true;
        self
    }

    /// One more `[[nics]]` on `network` (`"user"` or a declared network), with `mac` when
    /// given (else the engine derives it).
    pub fn nic(mut self, network: &str, mac: Option<&str>) -> Self {
        self.nics.push((network.to_owned(), mac.map(str::to_owned)));
        self
    }

    /// The TOML text. `memory_mb` is always on line 2 (tests point at it).
    /// Boots the generic-kernel guest, whose initrd loads the i6300esb watchdog driver.
    pub fn generic_kernel(mut self) -> Self {
        self.generic = true;
        self
    }

    /// Adds a port forward (`tcp:HOST:GUEST`) to the first NIC.
    pub fn forward(mut self, fwd: &str) -> Self {
        self.forwards.push(fwd.to_owned());
        self
    }

    /// Adds a line to `[health]`.
    pub fn health_line(mut self, line: &str) -> Self {
        self.health_lines.push(line.to_owned());
        self
    }

    pub fn to_toml(&self, guest: &Guest) -> String {
        let mut cmdline = BASE_CMDLINE.to_owned();
        if !self.cmdline_extra.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&self.cmdline_extra);
        }
        let mut s = String::new();
        let _ = writeln!(s, "vcpus = {}", self.vcpus);
        let _ = writeln!(s, "memory_mb = {}", self.memory_mb);
        let _ = writeln!(s, "power = {:?}", self.power);
        if let Some(restart) = &self.restart {
            let _ = writeln!(s, "restart = {restart:?}");
        }
        if let Some(group) = &self.group {
            let _ = writeln!(s, "group = {group:?}");
        }
        if let Some(host) = &self.host {
            let _ = writeln!(s, "host = {host:?}");
        }
        if let Some(ha) = self.ha {
            let _ = writeln!(s, "ha = {ha}");
        }
        if let Some(policy) = &self.migration {
            let _ = writeln!(s, "migration = {policy:?}");
        }
        if let Some(priority) = self.priority {
            let _ = writeln!(s, "priority = {priority}");
        }
        if !self.firmware {
            let _ = writeln!(s, "\n[boot]");
            let (kernel, initrd) = if self.generic {
                (&guest.generic_kernel, &guest.generic_initrd)
            } else {
                (&guest.kernel, &guest.initrd)
            };
            let _ = writeln!(s, "kernel = {:?}", kernel.display().to_string());
            let _ = writeln!(s, "initrd = {:?}", initrd.display().to_string());
            let _ = writeln!(s, "cmdline = {cmdline:?}");
        }
        for (name, size_gb) in &self.disks {
            let _ = writeln!(s, "\n[[disks]]\nname = {name:?}\nsize_gb = {size_gb}");
            if let Some(storage) = &self.storage {
                let _ = writeln!(s, "storage = {storage:?}");
            }
        }
        for (i, (network, mac)) in self.nics.iter().enumerate() {
            let _ = writeln!(s, "\n[[nics]]\nnetwork = {network:?}");
            if i == 0 && !self.forwards.is_empty() {
                let _ = writeln!(s, "forward = {:?}", self.forwards);
            }
            if let Some(mac) = mac {
                let _ = writeln!(s, "mac = {mac:?}");
            }
        }
        let _ = writeln!(s, "\n[qemu]\naccel = \"tcg\"");
        if let Some(machine) = &self.machine {
            let _ = writeln!(s, "machine = {machine:?}");
        }
        for line in &self.qemu_lines {
            let _ = writeln!(s, "{line}");
        }
        if !self.health_lines.is_empty() {
            let _ = writeln!(s, "\n[health]");
            for line in &self.health_lines {
                let _ = writeln!(s, "{line}");
            }
        }
        s
    }
}

/// The line of [`VmSpec::to_toml`]'s output that holds `memory_mb`.
pub const MEMORY_LINE: usize = 2;

/// A host spec (`hosts/<name>.toml`). By default the host is simulated on this
/// machine: `exec` runs the binary under test as `agent --stdio --root <root>`, where
/// `<root>` is [`HostSpec::root`] or the test's `<tmp>/hosts/<name>` (see
/// [`crate::TestRepo::write_host`]).
#[derive(Debug, Clone, Default)]
pub struct HostSpec {
    /// A custom `exec` argv (e.g. `["/bin/false"]` for a host that cannot be reached);
    /// `None` = the agent of the binary under test.
    pub exec: Option<Vec<String>>,
    /// The agent's `--root` when `exec` is `None`; `None` = `<tmp>/hosts/<name>`.
    pub root: Option<PathBuf>,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u64>,
    /// `state = "..."` when set (`active`, `maintenance`).
    pub state: Option<String>,
    /// `fence = [...]` when set: the argv `watch` runs once the host is down.
    pub fence: Option<Vec<String>>,
    /// Reached by ssh instead of `exec`: `address`, `known_hosts` and `identity_file`
    /// (see [`crate::Sshd::host_spec`]), with the host's root written as `root`.
    pub ssh: Option<SshLogin>,
    /// The agent is started through `sh -c` and refuses to start while the host's
    /// power-off marker ([`HostSpec::power_marker`]) exists: a host that can be
    /// powered off (see [`crate::TestRepo::power_off`]). Ignored with [`Self::exec`].
    pub switchable: bool,
    /// `shared_storage` and `storage_pool` when set.
    pub shared: Option<(PathBuf, String)>,
    /// The agent runs in this network namespace (`ip netns exec NS …`, see
    /// [`crate::netns::Lan`]). Ignored with [`Self::exec`] and [`Self::ssh`].
    pub netns: Option<String>,
    /// `networks = [...]` when not empty: the networks this host says it has.
    pub networks: Vec<String>,
    /// `migration_address = "..."` when set: where other hosts reach this one for live
    /// migration (a host in a namespace of a [`crate::Lan`]: [`crate::Lan::host_ip`]).
    pub migration_address: Option<String>,
}

/// How a [`HostSpec`] of an `ssh://` host logs in: the values of its `address`,
/// `known_hosts` and `identity_file` fields.
#[derive(Debug, Clone)]
pub struct SshLogin {
    pub address: String,
    pub known_hosts: String,
    pub identity_file: String,
}

impl HostSpec {
    /// A host reached over ssh at `address` (`ssh://user@host:port`), its key pinned in
    /// `known_hosts`, logging in with `identity_file`; its agent is whatever `plasmavmc`
    /// the remote PATH finds, on the host's root.
    pub fn ssh(address: &str, known_hosts: &str, identity_file: &str) -> Self {
        Self {
            ssh: Some(SshLogin {
                address: address.to_owned(),
                known_hosts: known_hosts.to_owned(),
                identity_file: identity_file.to_owned(),
            }),
            ..Self::default()
        }
    }

    /// A simulated host: the agent of the binary under test on its own root.
    pub fn agent() -> Self {
        Self::default()
    }

    /// A host reached by running `argv` instead of the agent.
    pub fn exec(argv: &[&str]) -> Self {
        Self {
            exec: Some(argv.iter().map(|&a| a.to_owned()).collect()),
            ..Self::default()
        }
    }

    /// The agent's root folder (default: `<tmp>/hosts/<name>`).
    pub fn root(mut self, root: &Path) -> Self {
        self.root = Some(root.to_path_buf());
        self
    }

    /// Schedulable memory.
    pub fn memory(mut self, mb: u64) -> Self {
        self.memory_mb = Some(mb);
        self
    }

    /// Schedulable vCPUs.
    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = Some(n);
        self
    }

    /// `state = "maintenance"`: nothing new is placed here.
    pub fn maintenance(mut self) -> Self {
        self.state = Some("maintenance".to_owned());
        self
    }

    /// `fence = argv`: what `watch` runs once the host is down (exit 0 = powered off).
    pub fn fence(mut self, argv: &[String]) -> Self {
        self.fence = Some(argv.to_vec());
        self
    }

    /// `shared_storage = path`, `storage_pool = pool`: disks (`storage = "auto"`) live in
    /// `path`, which every host of `pool` sees.
    pub fn shared(mut self, path: &Path, pool: &str) -> Self {
        self.shared = Some((path.to_path_buf(), pool.to_owned()));
        self
    }

    /// The agent runs in network namespace `ns` (`ip netns exec ns plasmavmc agent …`).
    pub fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_owned());
        self
    }

    /// `networks = [...]`: the host has these networks (their bridges).
    pub fn networks(mut self, networks: &[&str]) -> Self {
        self.networks = networks.iter().map(|&n| n.to_owned()).collect();
        self
    }

    /// `migration_address = addr`.
    pub fn migration_address(mut self, addr: &str) -> Self {
        self.migration_address = Some(addr.to_owned());
        self
    }

    /// A host that can be powered off: its agent does not start while
    /// [`HostSpec::power_marker`] of its root exists.
    pub fn switchable(mut self) -> Self {
        self.switchable = true;
        self
    }

    /// The power-off marker of a switchable host on `root`: `<root>.off`, beside the
    /// root (so it is not part of what the host keeps).
    pub fn power_marker(root: &Path) -> PathBuf {
        let mut name = root.file_name().unwrap_or_default().to_os_string();
        name.push(".off");
        root.with_file_name(name)
    }

    /// The TOML text; the agent runs `bin` on `root` unless [`Self::root`],
    /// [`Self::exec`] or [`Self::ssh`] say otherwise.
    pub fn to_toml(&self, bin: &Path, root: &Path) -> String {
        let mut s = String::new();
        if let Some(ssh) = &self.ssh {
            let root = self.root.as_deref().unwrap_or(root);
            let _ = writeln!(s, "address = {:?}", ssh.address);
            let _ = writeln!(s, "root = {:?}", root.display().to_string());
            let _ = writeln!(s, "known_hosts = {:?}", ssh.known_hosts);
            let _ = writeln!(s, "identity_file = {:?}", ssh.identity_file);
        } else {
            let _ = writeln!(s, "exec = {}", toml_strings(&self.agent_argv(bin, root)));
        }
        if let Some(vcpus) = self.vcpus {
            let _ = writeln!(s, "vcpus = {vcpus}");
        }
        if let Some(mb) = self.memory_mb {
            let _ = writeln!(s, "memory_mb = {mb}");
        }
        if let Some(state) = &self.state {
            let _ = writeln!(s, "state = {state:?}");
        }
        if let Some(fence) = &self.fence {
            let _ = writeln!(s, "fence = {}", toml_strings(fence));
        }
        if let Some((path, pool)) = &self.shared {
            let _ = writeln!(s, "shared_storage = {:?}", path.display().to_string());
            let _ = writeln!(s, "storage_pool = {pool:?}");
        }
        if let Some(addr) = &self.migration_address {
            let _ = writeln!(s, "migration_address = {addr:?}");
        }
        if !self.networks.is_empty() {
            let _ = writeln!(s, "networks = {}", toml_strings(&self.networks));
        }
        s
    }

    /// The `exec` argv: [`Self::exec`], or the agent of `bin` on [`Self::root`] (default
    /// `root`), through `sh -c` when [`Self::switchable`], in [`Self::netns`] when set.
    fn agent_argv(&self, bin: &Path, root: &Path) -> Vec<String> {
        if let Some(exec) = &self.exec {
            return exec.clone();
        }
        let argv = self.local_agent_argv(bin, root);
        match &self.netns {
            Some(ns) => ["ip", "netns", "exec", ns]
                .into_iter()
                .map(str::to_owned)
                .chain(argv)
                .collect(),
            None => argv,
        }
    }

    /// The agent of `bin` on [`Self::root`] (default `root`), through `sh -c` when
    /// [`Self::switchable`].
    fn local_agent_argv(&self, bin: &Path, root: &Path) -> Vec<String> {
        let root = self.root.as_deref().unwrap_or(root);
        if self.switchable {
            let marker = Self::power_marker(root);
            let script = format!(
                "test -e {m} && {{ echo \"host powered off: {p} exists\" >&2; exit 1; }}; \
                 exec {b} agent --stdio --root {r}",
                m = shell_quote(&marker.display().to_string()),
                p = marker.display(),
                b = shell_quote(&bin.display().to_string()),
                r = shell_quote(&root.display().to_string()),
            );
            return vec!["sh".to_owned(), "-c".to_owned(), script];
        }
        vec![
            bin.display().to_string(),
            "agent".to_owned(),
            "--stdio".to_owned(),
            "--root".to_owned(),
            root.display().to_string(),
        ]
    }
}

/// A TOML array of strings.
fn toml_strings(items: &[String]) -> String {
    toml::Value::Array(items.iter().cloned().map(toml::Value::String).collect()).to_string()
}

/// `text` as one single-quoted shell word.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_spec_runs_the_agent_on_its_root_or_a_given_command() {
        let bin = Path::new("/x/plasmavmc");
        let parse = |text: &str| text.parse::<toml::Table>().expect("valid TOML");
        let exec = |t: &toml::Table| -> Vec<String> {
            t["exec"]
                .as_array()
                .expect("exec is an array")
                .iter()
                .map(|a| a.as_str().expect("strings").to_owned())
                .collect()
        };
        let agent = parse(
            &HostSpec::agent()
                .memory(256)
                .vcpus(2)
                .maintenance()
                .to_toml(bin, Path::new("/t/hosts/hv1")),
        );
        assert_eq!(
            exec(&agent),
            ["/x/plasmavmc", "agent", "--stdio", "--root", "/t/hosts/hv1"]
        );
        assert_eq!(agent["memory_mb"].as_integer(), Some(256));
        assert_eq!(agent["vcpus"].as_integer(), Some(2));
        assert_eq!(agent["state"].as_str(), Some("maintenance"));

        let shared = parse(
            &HostSpec::agent()
                .root(Path::new("/other/root"))
                .to_toml(bin, Path::new("/t/hosts/hv1")),
        );
        assert_eq!(exec(&shared)[4], "/other/root");
        assert!(!shared.contains_key("memory_mb") && !shared.contains_key("state"));

        let in_ns = parse(
            &HostSpec::agent()
                .netns("pvn-1-0-h0")
                .networks(&["lan"])
                .migration_address("10.77.0.200")
                .to_toml(bin, Path::new("/t/hosts/hv1")),
        );
        assert_eq!(
            exec(&in_ns),
            [
                "ip",
                "netns",
                "exec",
                "pvn-1-0-h0",
                "/x/plasmavmc",
                "agent",
                "--stdio",
                "--root",
                "/t/hosts/hv1"
            ]
        );
        assert_eq!(in_ns["networks"].as_array().map(Vec::len), Some(1));
        assert_eq!(in_ns["migration_address"].as_str(), Some("10.77.0.200"));

        let down = parse(&HostSpec::exec(&["/bin/false"]).to_toml(bin, Path::new("/r")));
        assert_eq!(exec(&down), ["/bin/false"]);

        let fence = vec!["/bin/sh".to_owned(), "/t/fence-hv1.sh".to_owned()];
        let switchable = parse(
            &HostSpec::agent()
                .switchable()
                .fence(&fence)
                .to_toml(bin, Path::new("/t/hosts/hv1")),
        );
        let argv = exec(&switchable);
        assert_eq!(argv[..2], ["sh", "-c"]);
        assert_eq!(
            argv[2],
            "test -e '/t/hosts/hv1.off' && { echo \"host powered off: /t/hosts/hv1.off exists\" >&2; \
             exit 1; }; exec '/x/plasmavmc' agent --stdio --root '/t/hosts/hv1'"
        );
        assert_eq!(
            switchable["fence"].as_array().map(Vec::len),
            Some(2),
            "fence argv: {switchable:?}"
        );
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }

    #[test]
    fn ssh_host_spec_names_its_address_root_and_files_instead_of_exec() {
        let text = HostSpec::ssh("ssh://me@127.0.0.1:2222", "keys/kh", "/t/sshd/client_key")
            .memory(512)
            .to_toml(Path::new("/x/plasmavmc"), Path::new("/t/hosts/hv1"));
        let t: toml::Table = text.parse().expect("valid TOML");
        let s = |k: &str| t.get(k).and_then(toml::Value::as_str);
        assert_eq!(s("address"), Some("ssh://me@127.0.0.1:2222"));
        assert_eq!(s("root"), Some("/t/hosts/hv1"));
        assert_eq!(s("known_hosts"), Some("keys/kh"));
        assert_eq!(s("identity_file"), Some("/t/sshd/client_key"));
        assert_eq!(t["memory_mb"].as_integer(), Some(512));
        assert!(!t.contains_key("exec"), "{text}");
    }
}
