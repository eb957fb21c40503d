//! Table tests of a start refused by a disk's image lock: another QEMU holds the disk, so
//! a copy of the VM may run where the engine cannot see. Never retried; the plan says
//! which hosts may hold it; when the holder shows up, its copy is the one kept.

use plasmavmc_specs::Desired;

use super::{on_hosts, running, NOW};
use crate::observe::{Observed, RunState};
use crate::plan::plan;
use crate::qemu::exit::{ExitReason, ExitRecord};
use crate::test_utils::desired;

const SHARED: &str =
    "address = \"local\"\nshared_storage = \"/mnt/vms\"\nstorage_pool = \"nfs1\"\nfence = [\"/bin/true\"]";

fn specs() -> Desired {
    desired(&[
        ("hosts/hv1.toml", SHARED),
        ("hosts/hv2.toml", SHARED),
        ("hosts/hv3.toml", "address = \"local\""),
        (
            "vms/db.toml",
            "ha = true\n[[disks]]\nname = \"data\"\nsize_gb = 1\nstorage = \"shared\"",
        ),
    ])
}

/// db recovered on hv2, whose start was refused by the lock; hv1 (where db ran) and hv3
/// (another pool) do not answer; hv1 is fenced when `fenced`.
fn refused_on_hv2(d: &Desired, fenced: bool) -> Observed {
    let mut db = running(d, "db", RunState::Exited);
    db.last_exit = Some(ExitRecord {
        reason: ExitReason::ImageLocked,
        at_ms: NOW - 1000,
        pid: 0,
        status: Some(
            "disk data (/mnt/vms/db/data.qcow2): Failed to get shared \"write\" lock".into(),
        ),
    });
    db.exits = vec![NOW - 1000];
    let mut o = on_hosts(&["hv2"], vec![db]);
    for h in ["hv1", "hv3"] {
        o.unreachable
            .insert(h.into(), format!("host {h} is unreachable: gone"));
    }
    if fenced {
        o.fenced
            .insert("hv1".into(), "fenced by its fence command".into());
    }
    o.whereabouts.insert("db".into(), vec!["hv2".into()]);
    o
}

#[test]
fn a_start_refused_by_the_image_lock_is_not_retried_and_names_the_hosts_that_may_hold_it() {
    let d = specs();
    let p = plan(&d, &refused_on_hv2(&d, true), NOW);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(p.wake_at_ms, None, "nothing to wake for: no retry");
    assert_eq!(
        p.pending,
        [
            "db: failed: not started: a disk is in use by another QEMU (image lock: disk data \
          (/mnt/vms/db/data.qcow2): Failed to get shared \"write\" lock); the VM may still run \
          elsewhere, so it is not started again until a commit changes its spec; hosts of its \
          storage pool that do not answer: hv1 (hv1 fenced: its fence command may have lied)"
        ]
    );
    // Later, at any time: still nothing (no backoff that runs out).
    let later = plan(&d, &refused_on_hv2(&d, true), NOW + 3_600_000);
    assert!(later.actions.is_empty(), "{:?}", later.actions);
}

#[test]
fn with_every_host_of_the_pool_answering_the_holder_is_not_ours() {
    let d = specs();
    let mut o = refused_on_hv2(&d, false);
    o.unreachable.remove("hv1");
    o.hosts
        .insert("hv1".into(), crate::observe::Inventory::default());
    let p = plan(&d, &o, NOW);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert!(
        p.pending[0].ends_with(
            "every host of its storage pool answers: a QEMU this engine does not manage holds the disk"
        ),
        "{:?}",
        p.pending
    );
}

#[test]
fn when_the_holder_answers_its_copy_is_kept_and_the_refused_one_deleted() {
    let d = specs();
    let mut o = refused_on_hv2(&d, true);
    o.unreachable.remove("hv1");
    o.fenced.clear();
    let mut hv1 = crate::observe::Inventory::default();
    hv1.vms
        .insert("db".into(), running(&d, "db", RunState::Running));
    o.hosts.insert("hv1".into(), hv1);
    let p = plan(&d, &o, NOW);
    let ops: Vec<String> = p
        .actions
        .iter()
        .map(|a| format!("{} {} {}", a.op(), a.vm(), a.host()))
        .collect();
    assert_eq!(ops, ["delete db hv2"]);
    assert!(
        p.actions[0]
            .reason()
            .ends_with("local disks are retained, shared ones left in place"),
        "{}",
        p.actions[0].reason()
    );
    assert!(p.pending.is_empty(), "{:?}", p.pending);
}
