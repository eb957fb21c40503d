//! The quick pick against the walk: on random fleets (hosts of any size, some in
//! maintenance, unreachable, without a network's bridge, without shared storage, with a
//! QEMU that lacks a machine type or does not run) and random VMs (groups, host ports,
//! pins, networks, shared disks, machine types), placed one after another with some
//! moving away between, [`Load::place`] and [`Load::place_new`] give exactly what the
//! walk ([`Load::place_where`]) gives: the same host, reason and refusal.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use plasmavmc_specs::{Desired, VmEntry};
use proptest::prelude::*;

use super::Load;
use crate::observe::{Capacity, HostQemu, Inventory, Observed};
use crate::plan::copies_by_vm;
use crate::test_utils::desired;

#[allow(clippy::struct_excessive_bools)] // independent knobs of a random host
#[derive(Debug, Clone)]
struct HostCase {
    memory: u64,
    vcpus: u32,
    maintenance: bool,
    reachable: bool,
    lists_lan: bool,
    has_bridge: bool,
    shared: bool,
    /// 0: no QEMU reported, 1: knows q35 only, 2: knows q35 and pc, 3: cannot run.
    qemu: u8,
}

#[allow(clippy::struct_excessive_bools)] // independent knobs of a random VM
#[derive(Debug, Clone)]
struct VmCase {
    memory: u64,
    vcpus: u32,
    group: Option<u8>,
    port: Option<u16>,
    pin: Option<usize>,
    lan: bool,
    shared: bool,
    pc: bool,
    /// Before it is placed, a VM placed earlier (this many back) moves away.
    release: Option<usize>,
}

fn host_case() -> impl Strategy<Value = HostCase> {
    (
        prop_oneof![Just(256u64), Just(1024), Just(2048), Just(8192)],
        1u32..5,
        proptest::bool::weighted(0.15),
        proptest::bool::weighted(0.85),
        any::<bool>(),
        proptest::bool::weighted(0.8),
        any::<bool>(),
        0u8..4,
    )
        .prop_map(
            |(memory, vcpus, maintenance, reachable, lists_lan, has_bridge, shared, qemu)| {
                HostCase {
                    memory,
                    vcpus,
                    maintenance,
                    reachable,
                    lists_lan,
                    has_bridge,
                    shared,
                    qemu,
                }
            },
        )
}

fn vm_case(hosts: usize) -> impl Strategy<Value = VmCase> {
    (
        prop_oneof![Just(64u64), Just(128), Just(256), Just(512), Just(1024)],
        1u32..5,
        proptest::option::of(0u8..3),
        proptest::option::weighted(0.3, 2222u16..2225),
        proptest::option::weighted(0.1, 0..hosts),
        proptest::bool::weighted(0.2),
        proptest::bool::weighted(0.2),
        proptest::bool::weighted(0.2),
        proptest::option::weighted(0.15, 1usize..5),
    )
        .prop_map(
            |(memory, vcpus, group, port, pin, lan, shared, pc, release)| VmCase {
                memory,
                vcpus,
                group,
                port,
                // Validation refuses a pin to a host without the shared storage or with
                // the host port of another pinned VM: pins only for plain VMs.
                pin: pin.filter(|_| port.is_none() && !shared),
                lan,
                shared,
                pc,
                release,
            },
        )
}

fn fleet() -> impl Strategy<Value = (Vec<HostCase>, Vec<VmCase>, u8)> {
    // Up to 40 hosts: a group on few of them (under 1 in 16) is kept as a map.
    prop::collection::vec(host_case(), 1..40).prop_flat_map(|hosts| {
        let n = hosts.len();
        (
            Just(hosts),
            prop::collection::vec(vm_case(n), 1..40),
            prop_oneof![Just(1u8), Just(2), Just(4)],
        )
    })
}

fn world(hosts: &[HostCase], vms: &[VmCase], ratio: u8) -> (Desired, Observed) {
    let mut files = vec![(
        "plasmavmc.toml".to_owned(),
        format!(
            "[placement]\nvcpu_overcommit = {ratio}.0\n\n[networks.lan]\nbridge = \"br-lan\"\n"
        ),
    )];
    let mut observed = Observed::default();
    for (i, h) in hosts.iter().enumerate() {
        let mut text = "address = \"local\"\n".to_owned();
        if h.maintenance {
            text.push_str("state = \"maintenance\"\n");
        }
        if h.lists_lan {
            text.push_str("networks = [\"lan\"]\n");
        }
        if h.shared {
            text.push_str("shared_storage = \"/srv/pool\"\nstorage_pool = \"p\"\n");
        }
        files.push((format!("hosts/hv{i}.toml"), text));
        if !h.reachable {
            continue;
        }
        let machines = match h.qemu {
            1 => vec!["q35".to_owned()],
            _ => vec!["q35".to_owned(), "pc".to_owned()],
        };
        let qemu = (h.qemu > 0).then(|| HostQemu {
            binary: "qemu-system-x86_64".to_owned(),
            version: Some("7.2.22".to_owned()),
            machines,
            problem: (h.qemu == 3).then(|| "not found".to_owned()),
        });
        let inventory = Inventory {
            capacity: Capacity {
                vcpus: h.vcpus,
                memory_mb: h.memory,
            },
            bridges: if h.has_bridge {
                vec!["br-lan".to_owned()]
            } else {
                Vec::new()
            },
            qemu,
            ..Inventory::default()
        };
        observed.hosts.insert(format!("hv{i}"), inventory);
    }
    // Validation refuses a shared disk or a network no host has.
    let any_shared = hosts.iter().any(|h| h.shared);
    let any_lan = hosts.iter().any(|h| h.lists_lan);
    for (i, vm) in vms.iter().enumerate() {
        let mut text = format!("memory_mb = {}\nvcpus = {}\n", vm.memory, vm.vcpus);
        if let Some(g) = vm.group {
            let _ = writeln!(text, "group = \"g{g}\"");
        }
        if let Some(p) = vm.pin {
            let _ = writeln!(text, "host = \"hv{p}\"");
        }
        if vm.pc {
            text.push_str("\n[qemu]\nmachine = \"pc\"\n");
        }
        if vm.shared && any_shared {
            text.push_str("\n[[disks]]\nname = \"d\"\nsize_gb = 1\nstorage = \"shared\"\n");
        }
        if vm.lan && any_lan {
            text.push_str("\n[[nics]]\nnetwork = \"lan\"\n");
        }
        if let Some(port) = vm.port {
            let _ = writeln!(text, "\n[[nics]]\nforward = [\"tcp:{port}:22\"]");
        }
        files.push((format!("vms/vm{i:02}.toml"), text));
    }
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    (desired(&refs), observed)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_quick_pick_is_the_walks_pick((hosts, vms, ratio) in fleet()) {
        let (d, o) = world(&hosts, &vms, ratio);
        let copies = copies_by_vm(&o);
        let mut quick = Load::new(&d, &o, &copies);
        let mut quick_new = Load::new(&d, &o, &copies);
        let mut walk = Load::new(&d, &o, &copies);
        let mut walk_new = Load::new(&d, &o, &copies);
        let mut placed: Vec<(&VmEntry, String)> = Vec::new();
        for (i, case) in vms.iter().enumerate() {
            if let Some(back) = case.release {
                if let Some((gone, host)) = placed.len().checked_sub(back).map(|k| placed.remove(k)) {
                    for load in [&mut quick, &mut quick_new, &mut walk, &mut walk_new] {
                        load.release(&host, gone);
                    }
                }
            }
            let vm = &d.vms[&format!("vm{i:02}")];
            let want = walk.place_where(&d, vm, |_| Ok(()));
            prop_assert_eq!(&quick.place(&d, vm), &want, "{}", vm.name);
            let fit = crate::plan::migrate::storage_fit(&d, vm);
            let want_new = walk_new.place_where(&d, vm, fit);
            prop_assert_eq!(&quick_new.place_new(&d, vm), &want_new, "{}", vm.name);
            if let Ok(p) = want {
                placed.push((vm, p.host));
            }
        }
    }
}

#[test]
fn another_desired_than_the_loads_takes_the_walk() {
    let files = [
        ("hosts/hv1.toml", "address = \"local\""),
        ("hosts/hv2.toml", "address = \"local\""),
        ("vms/a.toml", "memory_mb = 512"),
    ];
    let d = desired(&files);
    let copy = desired(&files);
    let o = Observed {
        hosts: BTreeMap::from([("hv1".to_owned(), Inventory::default())]),
        ..Observed::default()
    };
    let mut load = Load::new(&d, &o, &copies_by_vm(&o));
    assert!(load.place_quick(&copy, &copy.vms["a"]).is_none());
}
