//! Table tests of the pure planner: (desired, observed) -> actions.

mod fleet;
mod lock;
mod network;
mod priority;
mod unknown;

use std::collections::BTreeMap;

use plasmavmc_specs::{Desired, Power};

use super::{plan, Action, SavedPlan, StalePlan};
use crate::observe::{Inventory, Observed, ObservedVm, RunState};

const NOW: u64 = 1_800_000_000_000;

use crate::test_utils::desired;

/// An instance observed on `local` as it would be after applying `vm` from `d`.
fn running(d: &Desired, vm: &str, state: RunState) -> ObservedVm {
    let e = &d.vms[vm];
    ObservedVm {
        name: vm.to_owned(),
        uuid: format!("uuid-{vm}"),
        state,
        pid: state.has_process().then_some(100),
        power: if state.has_process() || state == RunState::Exited {
            Power::Running
        } else {
            Power::Stopped
        },
        revision: "0123456789abcdef".to_owned(),
        spec_hash: e.hash.clone(),
        spec: e.spec.clone(),
        started_at: None,
        detail: None,
        paused: None,
        last_exit: None,
        exits: vec![],
        restarts: 0,
        watchdog_resets: 0,
        guest_agent: None,
        liveness: None,
        readiness: None,
        incoming: false,
        postcopy: false,
        seed: None,
        file_digests: std::collections::BTreeMap::new(),
    }
}

fn observed(vms: Vec<ObservedVm>) -> Observed {
    let inv = Inventory {
        bridges: Vec::new(),
        cpu: None,
        vms: vms.into_iter().map(|v| (v.name.clone(), v)).collect(),
        capacity: crate::observe::Capacity {
            vcpus: 8,
            memory_mb: 16_384,
        },
        ..Inventory::default()
    };
    Observed {
        hosts: BTreeMap::from([("local".to_owned(), inv)]),
        ..Observed::default()
    }
}

/// The same instances (and capacity) on each of `hosts`.
fn on_hosts(hosts: &[&str], vms: Vec<ObservedVm>) -> Observed {
    let inv = observed(vms).hosts.remove("local").expect("local");
    Observed {
        hosts: hosts
            .iter()
            .map(|h| ((*h).to_owned(), inv.clone()))
            .collect(),
        ..Observed::default()
    }
}

fn ops(p: &super::Plan) -> Vec<String> {
    p.actions
        .iter()
        .map(|a| format!("{} {}", a.op(), a.vm()))
        .collect()
}

#[test]
fn new_vms_are_created_and_started_when_running() {
    let d = desired(&[("vms/a.toml", ""), ("vms/b.toml", "power = \"stopped\"")]);
    let p = plan(&d, &observed(vec![]), NOW);
    assert_eq!(ops(&p), ["create a", "start a", "create b"]);
    assert!(p.actions[0].reason().contains("vms/a.toml"));
}

#[test]
fn nothing_to_do_when_observed_matches() {
    let d = desired(&[("vms/a.toml", ""), ("vms/b.toml", "power = \"stopped\"")]);
    let o = observed(vec![
        running(&d, "a", RunState::Running),
        running(&d, "b", RunState::Stopped),
    ]);
    assert!(plan(&d, &o, NOW).is_empty());
}

#[test]
fn power_changes_start_and_stop() {
    let d = desired(&[("vms/a.toml", ""), ("vms/b.toml", "power = \"stopped\"")]);
    let o = observed(vec![
        running(&d, "a", RunState::Stopped),
        running(&d, "b", RunState::Running),
    ]);
    assert_eq!(ops(&plan(&d, &o, NOW)), ["stop b", "start a"]);
}

#[test]
fn an_exited_vm_is_started_again_and_the_reason_says_so() {
    let d = desired(&[("vms/a.toml", "")]);
    let p = plan(&d, &observed(vec![running(&d, "a", RunState::Exited)]), NOW);
    assert_eq!(ops(&p), ["start a"]);
    assert!(
        p.actions[0].reason().contains("unexpected exit"),
        "{}",
        p.actions[0].reason()
    );
}

#[test]
fn memory_change_on_a_running_vm_restarts_it_with_a_diff() {
    let old = desired(&[("vms/a.toml", "memory_mb = 128")]);
    let new = desired(&[("vms/a.toml", "memory_mb = 256")]);
    let p = plan(
        &new,
        &observed(vec![running(&old, "a", RunState::Running)]),
        NOW,
    );
    assert_eq!(ops(&p), ["restart a"]);
    let Action::Restart { reason, diff, .. } = &p.actions[0] else {
        panic!("restart expected")
    };
    assert!(reason.starts_with("memory_mb changed"), "{reason}");
    assert!(
        diff.contains("-memory_mb = 128") && diff.contains("+memory_mb = 256"),
        "{diff}"
    );
}

#[test]
fn changes_that_need_no_reboot_update_in_place() {
    let old = desired(&[("vms/a.toml", "restart = \"always\"")]);
    let new = desired(&[("vms/a.toml", "restart = \"never\"")]);
    let p = plan(
        &new,
        &observed(vec![running(&old, "a", RunState::Running)]),
        NOW,
    );
    assert_eq!(ops(&p), ["update a"]);
}

#[test]
fn a_change_with_power_off_stops_then_updates() {
    let old = desired(&[("vms/a.toml", "memory_mb = 128")]);
    let new = desired(&[("vms/a.toml", "memory_mb = 256\npower = \"stopped\"")]);
    let p = plan(
        &new,
        &observed(vec![running(&old, "a", RunState::Running)]),
        NOW,
    );
    assert_eq!(ops(&p), ["stop a", "update a"]);
    let p = plan(
        &desired(&[("vms/a.toml", "memory_mb = 256")]),
        &observed(vec![running(&old, "a", RunState::Stopped)]),
        NOW,
    );
    assert_eq!(ops(&p), ["update a", "start a"]);
}

#[test]
fn removed_files_stop_then_delete_and_say_disks_are_kept() {
    let old = desired(&[("vms/a.toml", ""), ("vms/b.toml", "")]);
    let new = desired(&[("vms/b.toml", "")]);
    let p = plan(
        &new,
        &observed(vec![
            running(&old, "a", RunState::Running),
            running(&old, "b", RunState::Running),
        ]),
        NOW,
    );
    assert_eq!(ops(&p), ["stop a", "delete a"]);
    assert!(p.actions[1].reason().contains("retained"));
    let p = plan(
        &new,
        &observed(vec![
            running(&old, "a", RunState::Stopped),
            running(&old, "b", RunState::Running),
        ]),
        NOW,
    );
    assert_eq!(ops(&p), ["delete a"]);
}

#[test]
fn an_unresponsive_qemu_is_reported_not_touched() {
    let d = desired(&[("vms/a.toml", "")]);
    let p = plan(
        &d,
        &observed(vec![running(&d, "a", RunState::Unresponsive)]),
        NOW,
    );
    assert!(p.actions.is_empty());
    assert_eq!(p.notes.len(), 1);
}

#[test]
fn unreachable_or_unplaceable_hosts_give_notes_not_actions() {
    let d = desired(&[
        ("hosts/hv1.toml", "address = \"local\""),
        ("hosts/hv2.toml", "address = \"local\""),
        ("vms/a.toml", ""),
        ("vms/b.toml", "host = \"hv2\""),
    ]);
    let p = plan(&d, &Observed::default(), NOW);
    assert!(p.actions.is_empty());
    assert_eq!(p.notes.len(), 2, "{:?}", p.notes);
}

#[test]
fn planning_is_deterministic() {
    let d = desired(&[
        ("vms/c.toml", ""),
        ("vms/a.toml", ""),
        ("vms/b.toml", "power = \"stopped\""),
    ]);
    let o = observed(vec![]);
    assert_eq!(plan(&d, &o, NOW), plan(&d, &o, NOW));
}

#[test]
fn a_saved_plan_is_refused_when_the_hosts_changed() {
    let d = desired(&[("vms/a.toml", "")]);
    let before = observed(vec![running(&d, "a", RunState::Running)]);
    let saved = SavedPlan::new("abc", "", &before, plan(&d, &before, NOW));
    assert_eq!(saved.check("", &before), Ok(()));
    let after = observed(vec![running(&d, "a", RunState::Exited)]);
    let Err(StalePlan::Observed { changes }) = saved.check("", &after) else {
        panic!("stale expected")
    };
    assert_eq!(
        changes,
        ["  local/a: was running pid 100 spec ".to_owned()
            + &d.vms["a"].hash
            + ", now exited pid - spec "
            + &d.vms["a"].hash]
    );
    assert!(matches!(
        saved.check("other", &before),
        Err(StalePlan::Folder { .. })
    ));
}

#[test]
fn no_second_qemu_starts_where_an_orphan_runs() {
    let d = desired(&[("vms/a.toml", ""), ("vms/b.toml", "")]);
    let mut o = observed(vec![running(&d, "a", RunState::Exited)]);
    let inv = o.hosts.get_mut("local").expect("local");
    inv.orphans.push(crate::observe::Orphan {
        pid: 7,
        folder: "a".into(),
    });
    inv.orphans.push(crate::observe::Orphan {
        pid: 8,
        folder: "b".into(),
    });
    let p = plan(&d, &o, NOW);
    // a would restart and b would be created and started: only b's create remains.
    assert_eq!(ops(&p), ["create b"]);
    assert!(p.notes.iter().any(|n| n.contains("orphan QEMU pid 7")));
    let pruned = super::prune_actions(&o);
    assert_eq!(
        pruned.iter().map(Action::op).collect::<Vec<_>>(),
        ["prune", "prune"]
    );
}

#[test]
fn a_vm_last_seen_on_an_unreachable_host_is_never_started_elsewhere() {
    let d = desired(&[
        ("hosts/hv1.toml", "address = \"local\""),
        ("hosts/hv2.toml", "address = \"local\""),
        ("vms/a.toml", ""),
        ("vms/b.toml", ""),
    ]);
    let mut o = on_hosts(&["hv1"], vec![]);
    o.unreachable.insert(
        "hv2".into(),
        "host hv2 is unreachable: the agent channel closed".into(),
    );
    o.whereabouts.insert("a".into(), vec!["hv2".into()]);
    o.whereabouts.insert("b".into(), vec!["hv1".into()]);
    let p = plan(&d, &o, NOW);
    // a may still run on hv2: unknown, left alone. b is not on hv1 any more: placed anew.
    assert_eq!(ops(&p), ["create b", "start b"]);
    assert!(
        p.notes
            .iter()
            .any(|n| n.starts_with("a: unknown: last seen on hv2")),
        "{:?}",
        p.notes
    );
    assert!(
        p.notes
            .iter()
            .any(|n| n.starts_with("host hv2 is unreachable")),
        "{:?}",
        p.notes
    );
}

#[test]
fn a_fenced_hosts_ha_vms_are_recovered_elsewhere_and_the_rest_explained() {
    let d = desired(&[
        (
            "hosts/hv1.toml",
            "address = \"local\"\nfence = [\"/bin/true\"]",
        ),
        ("hosts/hv2.toml", "address = \"local\""),
        ("vms/ha.toml", "ha = true"),
        ("vms/plain.toml", ""),
        (
            "vms/disky.toml",
            "ha = true\n[[disks]]\nname = \"d\"\nsize_gb = 1",
        ),
    ]);
    let mut o = on_hosts(&["hv2"], vec![]);
    o.unreachable.insert(
        "hv1".into(),
        "host hv1 is unreachable: the agent exited".into(),
    );
    for vm in ["ha", "plain", "disky"] {
        o.whereabouts.insert(vm.into(), vec!["hv1".into()]);
    }
    // Not fenced yet: all unknown, nothing moves.
    let p = plan(&d, &o, NOW);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(p.pending_lines().len(), 3);
    assert!(p
        .notes
        .iter()
        .any(|n| n.contains("fence command has not succeeded")));
    // Fenced: the ha VM without local disks comes back on hv2; the others are explained.
    o.fenced
        .insert("hv1".into(), "fenced by operator at now".into());
    let p = plan(&d, &o, NOW);
    assert_eq!(ops(&p), ["recover ha", "start ha"]);
    assert_eq!(p.actions[0].host(), "hv2");
    assert!(p
        .notes
        .iter()
        .any(|n| n.starts_with("plain: on fenced host hv1") && n.contains("ha = false")));
    assert!(p
        .notes
        .iter()
        .any(|n| n.starts_with("disky: on fenced host hv1 with local disk d")));
}

#[test]
fn a_returning_host_loses_its_stale_copy() {
    let d = desired(&[
        ("hosts/hv1.toml", "address = \"local\""),
        ("hosts/hv2.toml", "address = \"local\""),
        ("vms/a.toml", "ha = true"),
    ]);
    let mut o = on_hosts(&["hv1", "hv2"], vec![running(&d, "a", RunState::Running)]);
    o.whereabouts
        .insert("a".into(), vec!["hv1".into(), "hv2".into()]);
    let p = plan(&d, &o, NOW);
    assert_eq!(
        p.actions
            .iter()
            .map(|a| format!("{} {} {}", a.op(), a.vm(), a.host()))
            .collect::<Vec<_>>(),
        ["stop a hv1", "delete a hv1"]
    );
}

#[test]
fn vms_on_shared_storage_are_recovered_within_their_pool() {
    let shared = "address = \"local\"\nshared_storage = \"/mnt/vms\"\nstorage_pool = \"nfs1\"";
    let d = desired(&[
        ("hosts/hv1.toml", shared),
        ("hosts/hv2.toml", "address = \"local\""),
        ("hosts/hv3.toml", shared),
        (
            "vms/db.toml",
            "ha = true\n[[disks]]\nname = \"data\"\nsize_gb = 1",
        ),
    ]);
    let mut o = on_hosts(&["hv2", "hv3"], vec![]);
    o.unreachable.insert(
        "hv1".into(),
        "host hv1 is unreachable: the agent exited".into(),
    );
    o.fenced.insert("hv1".into(), "fenced by operator".into());
    o.whereabouts.insert("db".into(), vec!["hv1".into()]);
    let p = plan(&d, &o, NOW);
    // hv2 has more room for nothing in particular but no access to the pool: hv3 it is.
    assert_eq!(ops(&p), ["recover db", "start db"]);
    assert_eq!(p.actions[0].host(), "hv3");
}

#[test]
fn the_only_running_copy_is_kept_even_when_last_seen_elsewhere() {
    // A fence command that lied: hv1's copy still runs, the recovery on hv2 never started.
    let d = desired(&[
        ("hosts/hv1.toml", "address = \"local\""),
        ("hosts/hv2.toml", "address = \"local\""),
        ("vms/a.toml", "ha = true"),
    ]);
    let mut o = observed(vec![]);
    let base = o.hosts.remove("local").expect("local");
    let mut hv1 = base.clone();
    hv1.vms
        .insert("a".into(), running(&d, "a", RunState::Running));
    let mut hv2 = base;
    hv2.vms
        .insert("a".into(), running(&d, "a", RunState::Exited));
    o.hosts.insert("hv1".into(), hv1);
    o.hosts.insert("hv2".into(), hv2);
    o.whereabouts
        .insert("a".into(), vec!["hv1".into(), "hv2".into()]);
    let p = plan(&d, &o, NOW);
    assert_eq!(
        p.actions
            .iter()
            .map(|a| format!("{} {} {}", a.op(), a.vm(), a.host()))
            .collect::<Vec<_>>(),
        ["delete a hv2"]
    );
}

#[test]
fn a_suspect_host_is_planned_like_an_unreachable_one_that_is_not_fenced() {
    let d = desired(&[
        (
            "hosts/hv1.toml",
            "address = \"local\"\nfence = [\"/bin/true\"]",
        ),
        ("hosts/hv2.toml", "address = \"local\""),
        ("vms/ha.toml", "ha = true"),
    ]);
    let whereabouts = BTreeMap::from([("ha".to_owned(), vec!["hv1".to_owned()])]);
    let fences = BTreeMap::from([("hv1".to_owned(), "fenced by operator".to_owned())]);
    let mut suspect = crate::observe::Unreachable::default();
    suspect.suspect.insert(
        "hv1".into(),
        crate::observe::Suspect {
            why: "host hv1 missed heartbeats".into(),
            last_heard_ms: NOW - 600,
        },
    );
    // Even with a fence record (an operator's word, given early), a host that is still
    // connected is not fenced: nothing of it moves.
    let o = on_hosts(&["hv2"], vec![]).with_context(&suspect, whereabouts.clone(), fences.clone());
    let p = plan(&d, &o, NOW);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert!(
        p.pending_lines()
            .iter()
            .any(|n| n.starts_with("ha: unknown: last seen on hv1")),
        "{:?}",
        p.pending_lines()
    );
    // The same host unreachable without a fence record plans the same.
    let mut down = crate::observe::Unreachable::default();
    down.down
        .insert("hv1".into(), "host hv1 missed heartbeats".into());
    let not_fenced =
        on_hosts(&["hv2"], vec![]).with_context(&down, whereabouts.clone(), BTreeMap::new());
    assert_eq!(plan(&d, &not_fenced, NOW), p);
    // Once down, the record counts.
    let once_down = on_hosts(&["hv2"], vec![]).with_context(&down, whereabouts, fences);
    assert_eq!(ops(&plan(&d, &once_down, NOW)), ["recover ha", "start ha"]);
}

#[test]
fn huge_memory_of_placed_vms_saturates_instead_of_overflowing() {
    // Specs accept any TOML integer: VMs whose shares add up past u64 must not panic
    // the planner (they could never have started, but their records may exist).
    let huge = format!("memory_mb = {}", i64::MAX);
    let d = desired(&[
        ("vms/a.toml", huge.as_str()),
        ("vms/b.toml", huge.as_str()),
        ("vms/c.toml", huge.as_str()),
    ]);
    let o = observed(
        ["a", "b", "c"]
            .map(|v| running(&d, v, RunState::Running))
            .to_vec(),
    );
    let p = plan(&d, &o, NOW);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
}

#[test]
fn files_replaced_in_place_are_noticed_by_their_digests() {
    let digests = |kernel: &str, image: &str| {
        BTreeMap::from([
            ("kernel".to_owned(), kernel.to_owned()),
            ("image root".to_owned(), image.to_owned()),
        ])
    };
    let mut d = desired(&[("vms/a.toml", "")]);
    let mut have = running(&d, "a", RunState::Running);
    have.file_digests = digests("k1", "i1");
    d.vms.get_mut("a").expect("a").file_digests = digests("k2", "i1");
    let p = plan(&d, &observed(vec![have.clone()]), NOW);
    assert_eq!(ops(&p), ["restart a"], "{p:#?}");
    let reason = p.actions[0].reason();
    assert!(
        reason.starts_with("kernel (sha256 k1 → k2) changed; needs a reboot"),
        "{reason}"
    );

    // A base image: the disk keeps its own; no reboot, the record learns the new one.
    d.vms.get_mut("a").expect("a").file_digests = digests("k1", "i2");
    let p = plan(&d, &observed(vec![have.clone()]), NOW);
    assert_eq!(ops(&p), ["update a"], "{p:#?}");
    assert!(
        p.actions[0].reason().contains("new disks use this one")
            && p.actions[0].reason().contains("no reboot needed"),
        "{}",
        p.actions[0].reason()
    );

    // A record older than digests: nothing to compare, nothing to do.
    have.file_digests.clear();
    assert!(plan(&d, &observed(vec![have]), NOW).is_empty());
}
