//! Table tests of networks in placement: a VM with a NIC on a declared network goes only
//! where the host lists the network and has its bridge — when created, recovered, moved
//! or started where it is — and a changed NIC restarts a running VM.

use plasmavmc_specs::Desired;

use super::{on_hosts, ops, running, NOW};
use crate::observe::{Observed, RunState};
use crate::plan::{plan, Plan};
use crate::test_utils::desired;

const CLUSTER: &str = "[networks.lan]\nbridge = \"br-lan\"\n";

/// hv1 and hv2 list lan, hv3 does not; plus `vms` as `(name, text)`.
fn world(vms: &[(&str, &str)]) -> Desired {
    let mut files = vec![
        ("plasmavmc.toml".to_owned(), CLUSTER.to_owned()),
        (
            "hosts/hv1.toml".to_owned(),
            "address = \"local\"\nnetworks = [\"lan\"]".to_owned(),
        ),
        (
            "hosts/hv2.toml".to_owned(),
            "address = \"local\"\nnetworks = [\"lan\"]".to_owned(),
        ),
        (
            "hosts/hv3.toml".to_owned(),
            "address = \"local\"".to_owned(),
        ),
    ];
    files.extend(
        vms.iter()
            .map(|(name, text)| (format!("vms/{name}.toml"), (*text).to_owned())),
    );
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    desired(&refs)
}

/// `hosts` answering, empty, with the bridges given per host.
fn hosts(list: &[(&str, &[&str])]) -> Observed {
    let names: Vec<&str> = list.iter().map(|(h, _)| *h).collect();
    let mut o = on_hosts(&names, vec![]);
    for (host, bridges) in list {
        let inv = o.hosts.get_mut(*host).expect("host");
        inv.bridges = bridges.iter().map(|b| (*b).to_owned()).collect();
    }
    o
}

/// `vm` of `d` found on `host` in `state`.
fn put(o: &mut Observed, host: &str, d: &Desired, vm: &str, state: RunState) {
    let have = running(d, vm, state);
    o.hosts
        .get_mut(host)
        .expect("known host")
        .vms
        .insert(vm.into(), have);
}

fn placed(p: &Plan) -> Vec<String> {
    p.actions
        .iter()
        .map(|a| format!("{} {} {}", a.op(), a.vm(), a.host()))
        .collect()
}

const ON_LAN: &str = "[[nics]]\nnetwork = \"lan\"\n";

#[test]
fn a_new_vm_goes_only_where_the_network_is_listed_and_its_bridge_exists() {
    let d = world(&[("web", ON_LAN), ("plain", "")]);
    // hv1 lists lan but has no bridge; hv3 has the bridge but does not list lan.
    let o = hosts(&[("hv1", &[]), ("hv2", &["br-lan"]), ("hv3", &["br-lan"])]);
    let p = plan(&d, &o, NOW);
    assert!(placed(&p).contains(&"create web hv2".to_owned()), "{p:?}");
    // A VM on user networking alone goes anywhere, as before.
    assert!(placed(&p).iter().any(|a| a.starts_with("create plain")));
    // Nowhere: the pending reason says why, per host.
    let o = hosts(&[("hv1", &[]), ("hv2", &["br-other"]), ("hv3", &["br-lan"])]);
    let p = plan(&d, &o, NOW);
    assert!(!ops(&p).iter().any(|a| a.ends_with(" web")), "{p:?}");
    assert_eq!(
        p.pending_lines(),
        ["web: cannot be placed: needs network lan: hv1 has no bridge br-lan, hv2 has no bridge br-lan, hv3 does not list it in networks"]
    );
}

#[test]
fn lacking_a_network_and_lacking_room_are_both_said() {
    let d = world(&[("web", &format!("memory_mb = 20000\n{ON_LAN}"))]);
    let o = hosts(&[("hv1", &["br-lan"]), ("hv2", &[]), ("hv3", &[])]);
    let p = plan(&d, &o, NOW);
    assert_eq!(
        p.pending_lines(),
        ["web: cannot be placed: needs network lan: hv2 has no bridge br-lan, hv3 does not list it in networks; needs 20000 MB and 1 vCPUs: hv1 has 16384 MB free"]
    );
}

#[test]
fn a_vm_pinned_to_a_host_without_the_network_is_pending_and_nothing_starts() {
    let d = world(&[
        ("web", &format!("host = \"hv1\"\n{ON_LAN}")),
        ("db", &format!("host = \"hv3\"\n{ON_LAN}")),
    ]);
    let o = hosts(&[("hv1", &[]), ("hv2", &["br-lan"]), ("hv3", &["br-lan"])]);
    let p = plan(&d, &o, NOW);
    assert!(p.actions.is_empty(), "{p:?}");
    assert_eq!(
        p.pending_lines(),
        [
            "db: cannot be placed: needs network lan: hv3 does not list it in networks",
            "web: cannot be placed: needs network lan: hv1 has no bridge br-lan",
        ]
    );
}

#[test]
fn recovery_chooses_only_hosts_with_the_network() {
    let d = world(&[("web", &format!("ha = true\n{ON_LAN}"))]);
    let mut o = hosts(&[("hv2", &[]), ("hv3", &["br-lan"])]);
    o.unreachable
        .insert("hv1".into(), "host hv1 is unreachable: gone".into());
    o.fenced
        .insert("hv1".into(), "fenced by its fence command".into());
    o.whereabouts.insert("web".into(), vec!["hv1".into()]);
    let p = plan(&d, &o, NOW);
    assert!(p.actions.is_empty(), "{p:?}");
    assert_eq!(
        p.pending_lines(),
        ["web: on fenced host hv1; cannot be recovered: needs network lan: hv2 has no bridge br-lan, hv3 does not list it in networks; needs 256 MB and 1 vCPUs: hv1 unreachable"]
    );
    o.hosts.get_mut("hv2").expect("hv2").bridges = vec!["br-lan".into()];
    let p = plan(&d, &o, NOW);
    assert_eq!(placed(&p), ["recover web hv2", "start web hv2"]);
}

#[test]
fn a_drain_moves_only_to_a_host_with_the_network() {
    let before = world(&[("web", ON_LAN)]);
    let mut after = before.clone();
    after.hosts.get_mut("hv1").expect("hv1").spec.state = plasmavmc_specs::HostState::Maintenance;
    let mut o = hosts(&[("hv1", &["br-lan"]), ("hv2", &[]), ("hv3", &["br-lan"])]);
    put(&mut o, "hv1", &before, "web", RunState::Running);
    let p = plan(&after, &o, NOW);
    assert!(p.actions.is_empty(), "{p:?}");
    assert_eq!(
        p.pending_lines(),
        ["web: must move (hv1 is in maintenance (drain)) but cannot be placed: needs network lan: hv2 has no bridge br-lan, hv3 does not list it in networks; needs 256 MB and 1 vCPUs: hv1 is where it runs"]
    );
    o.hosts.get_mut("hv2").expect("hv2").bridges = vec!["br-lan".into()];
    let p = plan(&after, &o, NOW);
    assert_eq!(placed(&p), ["migrate web hv1"]);
    assert!(matches!(&p.actions[0], crate::plan::Action::Migrate { to, .. } if to == "hv2"));
}

#[test]
fn a_changed_network_or_mac_on_a_running_vm_needs_a_restart() {
    let before = world(&[("web", "host = \"hv1\"\n[[nics]]\n")]);
    let o = {
        let mut o = hosts(&[("hv1", &["br-lan"])]);
        put(&mut o, "hv1", &before, "web", RunState::Running);
        o
    };
    for nic in [ON_LAN, "[[nics]]\nmac = \"52:54:00:12:ab:cd\"\n"] {
        let after = world(&[("web", &format!("host = \"hv1\"\n{nic}"))]);
        let p = plan(&after, &o, NOW);
        assert_eq!(placed(&p), ["restart web hv1"], "{nic}");
        assert_eq!(
            p.actions[0].reason(),
            "nics changed; needs a reboot (disks are kept)"
        );
    }
}

#[test]
fn a_vm_whose_host_lacks_its_new_network_is_not_started_there() {
    let before = world(&[("web", "host = \"hv3\"\n[[nics]]\n"), ("db", "[[nics]]\n")]);
    let after = world(&[
        ("web", &format!("host = \"hv3\"\n{ON_LAN}")),
        ("db", ON_LAN),
    ]);
    let mut o = hosts(&[("hv3", &["br-lan"])]);
    put(&mut o, "hv3", &before, "web", RunState::Running);
    put(&mut o, "hv3", &before, "db", RunState::Stopped);
    let p = plan(&after, &o, NOW);
    // db's new spec is recorded where it is, but neither is (re)started on hv3.
    assert_eq!(placed(&p), ["update db hv3"], "{p:?}");
    assert_eq!(
        p.pending_lines(),
        [
            "db: needs network lan: hv3 does not list it in networks; not started on hv3, where it is placed: pin it to a host that has it (it moves there), or provide it on hv3",
            "web: needs network lan: hv3 does not list it in networks; not started on hv3, where it is placed (the running QEMU is left as it is): change its pin to a host that has it, or provide it on hv3",
        ]
    );
}

#[test]
fn a_named_cpu_model_goes_where_its_accelerator_can_run_it() {
    // Under KVM a host runs only what its CPU has; under TCG QEMU emulates many more.
    let vm = |accel: &str| format!("[qemu]\naccel = \"{accel}\"\ncpu = \"Westmere\"\n");
    let mut o = hosts(&[("hv1", &[]), ("hv2", &[])]);
    for (host, kvm, tcg) in [
        ("hv1", &["Westmere"][..], &[][..]),
        ("hv2", &[], &["Westmere"]),
    ] {
        o.hosts.get_mut(host).expect("host").cpu = Some(crate::observe::HostCpu {
            model: "x".to_owned(),
            digest: host.to_owned(),
            models: kvm.iter().map(|m| (*m).to_owned()).collect(),
            tcg_models: tcg.iter().map(|m| (*m).to_owned()).collect(),
        });
    }
    for (accel, host) in [("kvm", "hv1"), ("tcg", "hv2")] {
        let d = world(&[("web", &vm(accel))]);
        let p = plan(&d, &o, NOW);
        assert_eq!(
            placed(&p)[0],
            format!("create web {host}"),
            "{accel}: {p:?}"
        );
    }
    // Pinned where it cannot run under its accelerator: pending, and says so.
    let d = world(&[("web", &format!("host = \"hv1\"\n{}", vm("tcg")))]);
    let p = plan(&d, &o, NOW);
    assert!(placed(&p).is_empty(), "{p:?}");
    let pending = p.pending_lines().join("\n");
    assert!(
        pending.contains("needs CPU model Westmere: hv1 cannot run it under tcg"),
        "{pending}"
    );
}

#[test]
fn a_changed_bridge_restarts_the_running_vms_on_that_network_only() {
    let vms = [
        ("web", format!("host = \"hv1\"\n{ON_LAN}")),
        ("plain", "host = \"hv1\"\n".to_owned()),
    ];
    let refs: Vec<(&str, &str)> = vms.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let before = world(&refs);
    let mut o = hosts(&[("hv1", &["br-lan", "br-new"])]);
    for vm in ["web", "plain"] {
        put(&mut o, "hv1", &before, vm, RunState::Running);
    }
    assert!(plan(&before, &o, NOW).actions.is_empty());
    let mut files = vec![
        ("plasmavmc.toml", "[networks.lan]\nbridge = \"br-new\"\n"),
        (
            "hosts/hv1.toml",
            "address = \"local\"\nnetworks = [\"lan\"]",
        ),
    ];
    let paths: Vec<String> = vms.iter().map(|(n, _)| format!("vms/{n}.toml")).collect();
    files.extend(
        paths
            .iter()
            .map(String::as_str)
            .zip(refs.iter().map(|(_, t)| *t)),
    );
    let after = desired(&files);
    let p = plan(&after, &o, NOW);
    assert_eq!(placed(&p), ["restart web hv1"], "{p:?}");
    assert_eq!(
        p.actions[0].reason(),
        "the definition of its networks in plasmavmc.toml changed; needs a reboot (disks are kept)"
    );
}
