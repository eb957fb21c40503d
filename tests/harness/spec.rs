//! VM specs that boot the test guest under TCG.

use std::fmt::Write;

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

    /// A QEMU machine type; one QEMU does not know (`no-such-machine`) passes
    /// validation and fails at start.
    pub fn machine(mut self, machine: &str) -> Self {
        self.machine = Some(machine.to_owned());
        self
    }

    /// The TOML text. `memory_mb` is always on line 2 (tests point at it).
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
        let _ = writeln!(s, "\n[boot]");
        let _ = writeln!(s, "kernel = {:?}", guest.kernel.display().to_string());
        let _ = writeln!(s, "initrd = {:?}", guest.initrd.display().to_string());
        let _ = writeln!(s, "cmdline = {cmdline:?}");
        for (name, size_gb) in &self.disks {
            let _ = writeln!(s, "\n[[disks]]\nname = {name:?}\nsize_gb = {size_gb}");
        }
        let _ = writeln!(s, "\n[qemu]\naccel = \"tcg\"");
        if let Some(machine) = &self.machine {
            let _ = writeln!(s, "machine = {machine:?}");
        }
        s
    }
}

/// The line of [`VmSpec::to_toml`]'s output that holds `memory_mb`.
pub const MEMORY_LINE: usize = 2;
