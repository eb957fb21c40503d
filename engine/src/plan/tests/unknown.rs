//! Table tests of "when in doubt, do not start": a VM that the record of where VMs are
//! places on a host that does not answer, and that is not fenced, is started nowhere
//! else — whatever the specs say and whatever the other hosts hold.

use std::collections::BTreeMap;

use plasmavmc_specs::Desired;

use super::{on_hosts, ops, running, NOW};
use crate::observe::{Observed, RunState, Unreachable};
use crate::plan::plan;
use crate::test_utils::desired;

const SHARED: &str =
    "address = \"local\"\nshared_storage = \"/mnt/vms\"\nstorage_pool = \"p\"\nfence = [\"/bin/true\"]";

fn specs(app: &str) -> Desired {
    desired(&[
        ("hosts/hv1.toml", SHARED),
        ("hosts/hv2.toml", SHARED),
        (
            "hosts/hv3.toml",
            "address = \"local\"\nshared_storage = \"/mnt/vms\"\nstorage_pool = \"p\"",
        ),
        ("vms/app.toml", app),
    ])
}

const APP: &str = "ha = true\n[[disks]]\nname = \"root\"\nsize_gb = 1\nstorage = \"shared\"";

/// hv1 and hv2 answer with `found` on hv1; hv3 is down (its agent froze mid-call); the
/// record says app may be on `app_on`.
fn hv3_down(found: Vec<crate::observe::ObservedVm>, app_on: &[&str], fenced: bool) -> Observed {
    let mut o = on_hosts(&["hv1"], found);
    o.hosts.extend(on_hosts(&["hv2"], vec![]).hosts);
    let down = Unreachable::down(&BTreeMap::from([(
        "hv3".to_owned(),
        "host hv3 is unreachable: its agent sent nothing for 1s".to_owned(),
    )]));
    let fence_records = if fenced {
        BTreeMap::from([("hv3".to_owned(), "fenced by operator".to_owned())])
    } else {
        BTreeMap::new()
    };
    let record = BTreeMap::from([(
        "app".to_owned(),
        app_on.iter().map(|h| (*h).to_owned()).collect(),
    )]);
    o.with_context(&down, record, fence_records)
}

#[test]
fn an_update_cut_short_on_a_frozen_host_leaves_the_vm_unknown_not_created_elsewhere() {
    // The sequence: app moved live to hv3, then unpinned; the update on hv3 failed
    // because hv3's agent froze. Nothing of app runs on hv1 or hv2.
    let d = specs(APP);
    let o = hv3_down(vec![], &["hv3"], false);
    let p = plan(&d, &o, NOW);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert!(
        p.pending
            .iter()
            .any(|n| n.starts_with("app: unknown: last seen on hv3")),
        "{:?}",
        p.pending
    );
    // Fenced: recovered once, on a host of the pool.
    let p = plan(&d, &hv3_down(vec![], &["hv3"], true), NOW);
    assert_eq!(ops(&p), ["recover app", "start app"]);
}

#[test]
fn a_copy_that_answers_is_not_started_while_another_may_run_on_a_host_that_does_not() {
    // A cold move from hv1 to hv3 was cut short after hv3 started the VM: hv1 holds the
    // stopped source, hv3 froze. Starting the source would run the VM twice.
    let d = specs("ha = true\nhost = \"hv1\"");
    let source = running(&d, "app", RunState::Stopped);
    let o = hv3_down(vec![source.clone()], &["hv1", "hv3"], false);
    let p = plan(&d, &o, NOW);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert!(
        p.pending.iter().any(|n| n
            == "app: unknown: it may still run on hv3, which is unreachable and not fenced; nothing of it is started on hv1 until hv3 answers or is fenced"),
        "{:?}",
        p.pending
    );
    // The same after a crash (exited, restart = always).
    let mut exited = running(&d, "app", RunState::Exited);
    exited.exits = vec![NOW - 10_000];
    let p = plan(&d, &hv3_down(vec![exited], &["hv1", "hv3"], false), NOW);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    // hv3 fenced: the source starts where it is.
    let p = plan(&d, &hv3_down(vec![source], &["hv1", "hv3"], true), NOW);
    assert_eq!(ops(&p), ["start app"]);
}

#[test]
fn a_running_copy_is_left_running_and_may_still_be_stopped() {
    let d = specs("ha = true\nhost = \"hv1\"\npower = \"stopped\"");
    let o = hv3_down(
        vec![running(&d, "app", RunState::Running)],
        &["hv3", "hv1"],
        false,
    );
    assert_eq!(ops(&plan(&d, &o, NOW)), ["stop app"]);
}

#[test]
fn a_host_of_the_record_that_was_not_asked_counts_as_unreachable() {
    // A host dropped from the connections (or from the specs) between two looks is in
    // neither list: what it holds is unknown all the same.
    let d = specs(APP);
    let o = on_hosts(&["hv1", "hv2"], vec![]).with_context(
        &Unreachable::default(),
        BTreeMap::from([("app".to_owned(), vec!["hv3".to_owned()])]),
        BTreeMap::new(),
    );
    assert_eq!(
        o.unreachable.get("hv3").map(String::as_str),
        Some("host hv3 was not asked (no connection to its agent)")
    );
    assert_eq!(o.unknown_on("app"), Some("hv3"));
    assert!(plan(&d, &o, NOW).actions.is_empty());
}
