//! Table tests of `priority`: when VMs compete for capacity, higher first, equal ones by
//! name — for new VMs, for VMs recovered from a fenced host, and for both at once.

use plasmavmc_specs::Desired;

use super::{on_hosts, ops, running, NOW};
use crate::observe::{Observed, RunState};
use crate::plan::{plan, Plan};
use crate::test_utils::desired;

/// Hosts `(name, memory_mb)` and VMs `(name, extra lines)` of 300 MB each.
fn world(hosts: &[(&str, u64)], vms: &[(&str, &str)]) -> Desired {
    let files: Vec<(String, String)> = hosts
        .iter()
        .map(|(name, mb)| {
            (
                format!("hosts/{name}.toml"),
                format!("address = \"local\"\nmemory_mb = {mb}"),
            )
        })
        .chain(vms.iter().map(|(name, extra)| {
            (
                format!("vms/{name}.toml"),
                format!("memory_mb = 300\n{extra}"),
            )
        }))
        .collect();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(path, text)| (path.as_str(), text.as_str()))
        .collect();
    desired(&refs)
}

/// hv2 answers (empty); hv1 is unreachable and fenced, and `lost` were last seen there.
fn hv1_fenced(lost: &[&str]) -> Observed {
    let mut o = on_hosts(&["hv2"], vec![]);
    o.unreachable
        .insert("hv1".into(), "host hv1 is unreachable: gone".into());
    o.fenced
        .insert("hv1".into(), "fenced by its fence command".into());
    for vm in lost {
        o.whereabouts.insert((*vm).into(), vec!["hv1".into()]);
    }
    o
}

/// `op vm host` of every action.
fn placed(p: &Plan) -> Vec<String> {
    p.actions
        .iter()
        .map(|a| format!("{} {} {}", a.op(), a.vm(), a.host()))
        .collect()
}

#[test]
fn new_vms_are_placed_highest_priority_first_then_by_name() {
    let d = world(
        &[("hv1", 700)],
        &[
            ("a", ""),
            ("b", "priority = 10"),
            ("c", "priority = 10"),
            ("d", "priority = -5"),
        ],
    );
    let p = plan(&d, &on_hosts(&["hv1"], vec![]), NOW);
    // 700 MB hold two: b and c (priority 10, by name); a (0) and d (-5) do not fit.
    assert_eq!(
        ops(&p),
        ["create b", "start b", "create c", "start c"],
        "{:?}",
        p.notes
    );
    assert_eq!(
        p.pending,
        [
            "a: cannot be placed: needs 300 MB and 1 vCPUs: hv1 has 100 MB free",
            "d: cannot be placed: needs 300 MB and 1 vCPUs: hv1 has 100 MB free",
        ]
    );
}

#[test]
fn a_fenced_hosts_vms_are_recovered_highest_priority_first() {
    let hosts = [("hv1", 1024), ("hv2", 512)];
    let d = world(
        &hosts,
        &[("alpha", "ha = true"), ("zulu", "ha = true\npriority = 10")],
    );
    let p = plan(&d, &hv1_fenced(&["alpha", "zulu"]), NOW);
    // hv2 holds one: zulu, though alpha comes first by name.
    assert_eq!(placed(&p), ["recover zulu hv2", "start zulu hv2"]);
    assert_eq!(
        p.pending,
        ["alpha: on fenced host hv1; cannot be recovered: needs 300 MB and 1 vCPUs: hv1 unreachable, hv2 has 212 MB free"]
    );
    // Equal priorities: by name, alpha.
    let tie = world(
        &hosts,
        &[
            ("alpha", "ha = true\npriority = 10"),
            ("zulu", "ha = true\npriority = 10"),
        ],
    );
    assert_eq!(
        placed(&plan(&tie, &hv1_fenced(&["alpha", "zulu"]), NOW)),
        ["recover alpha hv2", "start alpha hv2"]
    );
}

#[test]
fn new_and_recovered_vms_compete_in_one_order() {
    let d = world(
        &[("hv1", 1024), ("hv2", 512)],
        &[("lost", "ha = true"), ("fresh", "priority = 1")],
    );
    let p = plan(&d, &hv1_fenced(&["lost"]), NOW);
    assert_eq!(placed(&p), ["create fresh hv2", "start fresh hv2"]);
    assert!(
        p.pending[0].starts_with("lost: on fenced host hv1; cannot be recovered"),
        "{:?}",
        p.pending
    );
}

#[test]
fn priority_never_moves_a_placed_vm() {
    // b runs on hv1 and takes its room; a new VM of higher priority does not evict it.
    let d = world(&[("hv1", 400)], &[("a", "priority = 100"), ("b", "")]);
    let b_runs = running(&d, "b", RunState::Running);
    let p = plan(&d, &on_hosts(&["hv1"], vec![b_runs]), NOW);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(
        p.pending,
        ["a: cannot be placed: needs 300 MB and 1 vCPUs: hv1 has 100 MB free"]
    );
}
