//! The planner at fleet scale keeps its answers: the copies index says what
//! `Observed::copies` says, and placement by scan picks what the sorted list did.

use std::collections::BTreeMap;

use super::{desired, running};
use crate::observe::{Capacity, Inventory, Observed, RunState};
use crate::plan::place::Load;
use crate::plan::{copies_by_vm, copies_in};

fn host(memory_mb: u64, vms: Vec<crate::observe::ObservedVm>) -> Inventory {
    Inventory {
        vms: vms.into_iter().map(|v| (v.name.clone(), v)).collect(),
        capacity: Capacity {
            vcpus: 8,
            memory_mb,
        },
        ..Inventory::default()
    }
}

#[test]
fn the_copies_index_lists_each_vm_on_every_host_in_host_order() {
    let d = desired(&[
        ("hosts/hv1.toml", "address = \"local\""),
        ("hosts/hv2.toml", "address = \"local\""),
        ("hosts/hv3.toml", "address = \"local\""),
        ("vms/a.toml", ""),
        ("vms/b.toml", ""),
    ]);
    let a = running(&d, "a", RunState::Running);
    let b = running(&d, "b", RunState::Running);
    let o = Observed {
        hosts: BTreeMap::from([
            ("hv3".to_owned(), host(4096, vec![a.clone()])),
            ("hv1".to_owned(), host(4096, vec![a, b])),
            ("hv2".to_owned(), host(4096, vec![])),
        ]),
        ..Observed::default()
    };
    let index = copies_by_vm(&o);
    for vm in ["a", "b", "c"] {
        let hosts: Vec<&str> = copies_in(&index, vm).iter().map(|(h, _)| *h).collect();
        let expected: Vec<&str> = o.copies(vm).iter().map(|(h, _)| *h).collect();
        assert_eq!(hosts, expected, "{vm}");
    }
    assert_eq!(
        copies_in(&index, "a")
            .iter()
            .map(|(h, _)| *h)
            .collect::<Vec<_>>(),
        ["hv1", "hv3"]
    );
}

#[test]
fn placement_takes_the_roomiest_host_then_the_first_name_and_counts_the_fitting() {
    let d = desired(&[
        ("hosts/hv1.toml", "address = \"local\""),
        ("hosts/hv2.toml", "address = \"local\""),
        ("hosts/hv3.toml", "address = \"local\""),
        ("hosts/hv4.toml", "address = \"local\""),
        ("vms/a.toml", "memory_mb = 1024"),
    ]);
    let o = Observed {
        hosts: BTreeMap::from([
            ("hv1".to_owned(), host(2048, vec![])),
            ("hv2".to_owned(), host(8192, vec![])),
            ("hv3".to_owned(), host(8192, vec![])),
            ("hv4".to_owned(), host(512, vec![])),
        ]),
        ..Observed::default()
    };
    let mut load = Load::new(&d, &o, &copies_by_vm(&o));
    let placed = load.place(&d, &d.vms["a"]).expect("fits");
    assert_eq!(placed.host, "hv2");
    assert_eq!(placed.why, "8192 MB free, the most of 3 fitting hosts");
    // hv2 now has less free than hv3.
    let again = load.place(&d, &d.vms["a"]).expect("fits");
    assert_eq!(again.host, "hv3");
}
