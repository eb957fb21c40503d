//! The QEMU command line of an instance: pure, argv only, never a shell.
//!
//! QEMU runs with its working directory in the instance folder, so the socket, pid
//! file, logs and disks are relative paths (unix socket paths are limited to 108
//! bytes; instance folders can be deeper than that).

use std::fmt::Write as _;

use plasmavmc_specs::{Forward, Nic};

use super::instance::{InstanceFile, VmInstance, CONSOLE_SOCKET, PID_FILE, QMP_SOCKET, SERIAL_LOG};
use super::net::tap_name;
use super::seed::SEED_FILE;

/// The accelerator actually used (the spec's `auto` resolved on the host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// QEMU option values are comma-separated lists; a comma inside a value is written twice.
fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// The arguments (without the program) that start `inst`.
pub fn qemu_args(inst: &InstanceFile, accel: Accel) -> Vec<String> {
    let vm = &inst.vm;
    let spec = &vm.spec;
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
    push(&["-name", &format!("guest={},debug-threads=on", vm.name)]);
    push(&["-uuid", &inst.uuid]);
    push(&[
        "-machine",
        &format!("{},accel={}", spec.qemu.machine, accel.as_str()),
    ]);
    // A named model (or `host`) as the spec says; else `host` under KVM and QEMU's own
    // default under TCG.
    match (&spec.qemu.cpu, accel) {
        (Some(model), _) => push(&["-cpu", model]),
        (None, Accel::Kvm) => push(&["-cpu", "host"]),
        (None, Accel::Tcg) => {}
    }
    push(&[
        "-m",
        &spec.memory_mb.to_string(),
        "-smp",
        &spec.vcpus.to_string(),
    ]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    if spec.qemu.sandbox {
        // Dropping to `runas` is a privilege change QEMU makes after the filter is in
        // place: the filter must let it (measured: SIGSYS otherwise, even `children`).
        let elevate = if spec.qemu.runas.is_some() {
            "allow"
        } else {
            "deny"
        };
        push(&[
            "-sandbox",
            &format!(
                "on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny"
            ),
        ]);
    }
    if let Some(user) = &spec.qemu.runas {
        push(&["-runas", user]);
    }
    if let Some(dir) = &spec.qemu.chroot {
        push(&["-chroot", dir]);
    }
    push(&[
        "-chardev",
        &format!("socket,id=qmp,path={QMP_SOCKET},server=on,wait=off"),
    ]);
    push(&["-mon", "chardev=qmp,mode=control"]);
    push(&["-pidfile", PID_FILE]);
    // The serial port: a socket `plasmavmc console` attaches to (one client at a time),
    // every byte the guest writes also appended to serial.log, attached or not.
    push(&[
        "-chardev",
        &format!(
            "socket,id=serial0,path={CONSOLE_SOCKET},server=on,wait=off,\
             logfile={SERIAL_LOG},logappend=on"
        ),
    ]);
    push(&["-serial", "chardev:serial0"]);
    push(&failure_devices(spec));
    if let Some(boot) = &spec.boot {
        if let Some(kernel) = &vm.files.kernel {
            push(&["-kernel", &kernel.to_string_lossy()]);
        }
        if let Some(initrd) = &vm.files.initrd {
            push(&["-initrd", &initrd.to_string_lossy()]);
        }
        if let Some(cmdline) = &boot.cmdline {
            push(&["-append", cmdline]);
        }
    }
    push(&drives(vm).iter().map(String::as_str).collect::<Vec<_>>());
    for (i, nic) in spec.nics.iter().enumerate() {
        push(&["-netdev", &netdev(&vm.name, i, nic)]);
        push(&[
            "-device",
            &format!(
                "virtio-net-pci,netdev=net{i},id=nic{i},mac={}",
                escape(&nic.mac_of(&vm.name, i))
            ),
        ]);
    }
    a
}

/// The `-blockdev`/`-device` arguments of `vm`'s disks, in spec order, then its
/// cloud-init seed.
fn drives(vm: &VmInstance) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
    for disk in &vm.spec.disks {
        let Some(file) = vm.disk_path(disk) else {
            continue;
        };
        let file = file.to_string_lossy();
        push(&[
            "-blockdev",
            &format!(
                "driver=file,filename={},node-name=file-{}",
                escape(&file),
                disk.name
            ),
        ]);
        push(&[
            "-blockdev",
            &format!("driver=qcow2,file=file-{0},node-name=disk-{0}", disk.name),
        ]);
        push(&[
            "-device",
            &format!("virtio-blk-pci,drive=disk-{0},id=dev-{0}", disk.name),
        ]);
    }
    if vm.files.seed.is_some() {
        // After the VM's own disks, so its root stays the first; read-only, raw. Node
        // names with `_`, which disk names cannot hold: no clash with a disk of the VM.
        push(&[
            "-blockdev",
            &format!("driver=file,filename={SEED_FILE},node-name=seed_file,read-only=on"),
        ]);
        push(&[
            "-blockdev",
            "driver=raw,file=seed_file,node-name=seed_disk,read-only=on",
        ]);
        push(&["-device", "virtio-blk-pci,drive=seed_disk,id=seed_dev"]);
    }
    a
}

/// The devices a guest's health shows through: a guest panic ends QEMU with a failure
/// status instead of hanging (exit classification); a watchdog the guest stops feeding
/// fires (`[health] watchdog`, see `qemu::watchdog`); the guest agent's channel
/// (`[health] guest_agent`, see `qemu::qga`).
fn failure_devices(spec: &plasmavmc_specs::VmSpec) -> Vec<&'static str> {
    let mut a = vec!["-device", "pvpanic", "-action", "panic=exit-failure"];
    a.extend_from_slice(super::watchdog::args(spec.health.watchdog));
    a.extend_from_slice(super::qga::args(spec.health.guest_agent));
    a
}

/// The `-netdev` of NIC `i` of `vm`: user-mode with its port forwards, or the tap the
/// host made and put on the bridge before QEMU starts. QEMU only opens that tap, so no
/// helper script runs (the sandbox denies spawning).
fn netdev(vm: &str, i: usize, nic: &Nic) -> String {
    if !nic.network.is_user() {
        return format!(
            "tap,id=net{i},ifname={},script=no,downscript=no",
            tap_name(vm, i)
        );
    }
    let mut netdev = format!("user,id=net{i}");
    for fwd in nic.forward.iter().filter_map(|f| Forward::parse(f).ok()) {
        let proto = if fwd.udp { "udp" } else { "tcp" };
        let _ = write!(
            netdev,
            ",hostfwd={proto}::{}-:{}",
            fwd.host_port, fwd.guest_port
        );
    }
    netdev
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::instance::{ResolvedFiles, VmInstance};
    use plasmavmc_specs::{Boot, Disk, Power, VmSpec};

    fn instance() -> InstanceFile {
        let mut spec: VmSpec = toml::from_str("vcpus = 2\nmemory_mb = 128\n").expect("spec");
        spec.name = Some("web".into());
        spec.boot = Some(Boot {
            kernel: "k".into(),
            initrd: Some("i".into()),
            cmdline: Some("console=ttyS0 a=b,c".into()),
        });
        spec.disks = vec![Disk {
            name: "root".into(),
            size_gb: Some(1),
            image: None,
            storage: plasmavmc_specs::Storage::Auto,
        }];
        spec.nics = vec![Nic {
            network: plasmavmc_specs::Network::user(),
            mac: None,
            forward: vec!["tcp:2222:22".into()],
        }];
        InstanceFile {
            uuid: "0f0e0d0c-0000-4000-8000-000000000001".into(),
            created_at: "now".into(),
            power: Power::Running,
            started_at: None,
            last_exit: None,
            exits: vec![],
            restarts: 0,
            watchdog_resets: 0,
            starting: false,
            incoming: None,
            postcopy: None,
            vm: VmInstance {
                name: "web".into(),
                revision: "abc".into(),
                spec_hash: "h".into(),
                spec,
                files: ResolvedFiles {
                    kernel: Some("/g/vmlinuz".into()),
                    initrd: Some("/g/initrd,x".into()),
                    images: std::collections::BTreeMap::default(),
                    seed: None,
                    digests: std::collections::BTreeMap::default(),
                },
                shared_storage: None,
                networks: std::collections::BTreeMap::default(),
            },
        }
    }

    #[test]
    fn argv_carries_identity_sizes_and_relative_paths() {
        let a = qemu_args(&instance(), Accel::Tcg);
        let joined = a.join(" ");
        assert!(
            joined.contains("-uuid 0f0e0d0c-0000-4000-8000-000000000001"),
            "{joined}"
        );
        assert!(
            joined.contains("-machine q35,accel=tcg -m 128 -smp 2"),
            "{joined}"
        );
        assert!(joined.contains("path=qmp.sock"), "{joined}");
        assert!(
            joined.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny"),
            "{joined}"
        );
        assert!(joined.contains("-pidfile qemu.pid"), "{joined}");
        assert!(joined.contains("filename=disks/root.qcow2"), "{joined}");
        assert!(joined.contains("hostfwd=tcp::2222-:22"), "{joined}");
        // The kernel command line is one argv element, untouched.
        assert!(a.iter().any(|x| x == "console=ttyS0 a=b,c"));
        assert!(a.iter().any(|x| x == "/g/initrd,x"));
        assert!(!a.iter().any(|x| x == "-cpu"));
        assert!(qemu_args(&instance(), Accel::Kvm)
            .iter()
            .any(|x| x == "-cpu"));
    }

    #[test]
    fn every_nic_gets_its_mac_and_a_bridged_one_opens_its_tap() {
        let mut inst = instance();
        inst.vm.spec.nics.push(Nic {
            network: plasmavmc_specs::Network("lan".into()),
            mac: Some("52:54:00:12:ab:cd".into()),
            forward: vec![],
        });
        inst.vm.networks.insert(
            "lan".into(),
            plasmavmc_specs::NetworkDef {
                bridge: "br-lan".into(),
                vlan: Some(10),
            },
        );
        let a = qemu_args(&inst, Accel::Tcg);
        let user_mac = plasmavmc_specs::derived_mac("web", 0);
        let tap = crate::qemu::net::tap_name("web", 1);
        let after = |flag: &str| -> Vec<&str> {
            a.windows(2)
                .filter(|w| w[0] == flag)
                .map(|w| w[1].as_str())
                .collect()
        };
        assert_eq!(
            after("-netdev"),
            [
                "user,id=net0,hostfwd=tcp::2222-:22".to_owned(),
                format!("tap,id=net1,ifname={tap},script=no,downscript=no"),
            ]
        );
        let devices = after("-device");
        assert!(
            devices
                .contains(&format!("virtio-net-pci,netdev=net0,id=nic0,mac={user_mac}").as_str()),
            "{devices:?}"
        );
        assert!(
            devices.contains(&"virtio-net-pci,netdev=net1,id=nic1,mac=52:54:00:12:ab:cd"),
            "{devices:?}"
        );
        // The bridge is the host's business, not QEMU's: no helper, no bridge name.
        assert!(!a
            .iter()
            .any(|x| x.contains("br-lan") || x.contains("helper")));
    }

    #[test]
    fn a_named_cpu_model_is_used_under_either_accelerator() {
        let mut inst = instance();
        inst.vm.spec.qemu.cpu = Some("x86-64-v2".into());
        for accel in [Accel::Tcg, Accel::Kvm] {
            let a = qemu_args(&inst, accel);
            let cpus: Vec<_> = a
                .windows(2)
                .filter(|w| w[0] == "-cpu")
                .map(|w| w[1].clone())
                .collect();
            assert_eq!(cpus, ["x86-64-v2"], "{accel:?}");
        }
    }

    #[test]
    fn runas_and_chroot_drop_privileges_and_let_the_sandbox_allow_it() {
        let mut inst = instance();
        inst.vm.spec.qemu.runas = Some("qemu-vm".into());
        inst.vm.spec.qemu.chroot = Some("/var/lib/plasmavmc/empty".into());
        let joined = qemu_args(&inst, Accel::Tcg).join(" ");
        assert!(
            joined.contains("-runas qemu-vm -chroot /var/lib/plasmavmc/empty"),
            "{joined}"
        );
        assert!(joined.contains("elevateprivileges=allow"), "{joined}");
        assert!(!qemu_args(&instance(), Accel::Tcg)
            .iter()
            .any(|x| x == "-runas" || x == "-chroot"));
    }
}
