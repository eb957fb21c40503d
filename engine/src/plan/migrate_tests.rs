//! Table tests of moves and of what a cut-short migration leaves behind.

use std::collections::BTreeMap;

use plasmavmc_specs::{Desired, Power};

use super::{plan, Action, MoveMode, Plan};
use crate::observe::{Capacity, Inventory, Observed, ObservedVm, RunState};
use crate::test_utils::desired;

const NOW: u64 = 1_800_000_000_000;

const HOSTS: [(&str, &str); 3] = [
    ("hosts/hv1.toml", "address = \"local\""),
    ("hosts/hv2.toml", "address = \"local\""),
    ("hosts/hv3.toml", "address = \"local\""),
];

fn specs(extra: &[(&str, &str)]) -> Desired {
    let mut list = HOSTS.to_vec();
    list.extend_from_slice(extra);
    desired(&list)
}

/// `vm` of `d` as observed in `state` (`detail` as QEMU's run state).
fn copy(
    d: &Desired,
    vm: &str,
    state: RunState,
    detail: Option<&str>,
    incoming: bool,
) -> ObservedVm {
    let e = &d.vms[vm];
    ObservedVm {
        name: vm.to_owned(),
        uuid: format!("uuid-{vm}"),
        state,
        pid: state.has_process().then_some(100),
        power: if incoming {
            Power::Stopped
        } else {
            Power::Running
        },
        revision: "0123456789abcdef".to_owned(),
        spec_hash: e.hash.clone(),
        seed: e.seed.clone(),
        file_digests: e.file_digests.clone(),
        spec: e.spec.clone(),
        started_at: None,
        paused: detail.map(crate::observe::Paused::of),
        detail: detail.map(str::to_owned),
        last_exit: None,
        exits: vec![],
        restarts: 0,
        watchdog_resets: 0,
        guest_agent: None,
        liveness: None,
        readiness: None,
        incoming,
        postcopy: false,
    }
}

/// hv1..hv3, each with 8 vCPUs and 4 GiB, holding `vms` as `(host, copy)`.
fn world(vms: Vec<(&str, ObservedVm)>) -> Observed {
    let mut hosts: BTreeMap<String, Inventory> = ["hv1", "hv2", "hv3"]
        .iter()
        .map(|h| {
            // Hosts of one kind: a guest on the host's CPU moves live between them.
            let inv = Inventory {
                bridges: Vec::new(),
                cpu: Some(crate::observe::HostCpu {
                    model: "same".to_owned(),
                    digest: "same".to_owned(),
                    ..crate::observe::HostCpu::default()
                }),
                capacity: Capacity {
                    vcpus: 8,
                    memory_mb: 4096,
                },
                ..Inventory::default()
            };
            ((*h).to_owned(), inv)
        })
        .collect();
    for (host, vm) in vms {
        hosts
            .get_mut(host)
            .expect("known host")
            .vms
            .insert(vm.name.clone(), vm);
    }
    Observed {
        hosts,
        ..Observed::default()
    }
}

fn lines(p: &Plan) -> Vec<String> {
    p.actions
        .iter()
        .map(|a| match a {
            Action::Migrate { to, mode, .. } => {
                format!("migrate {} {}>{to} {}", a.vm(), a.host(), mode.as_str())
            }
            _ => format!("{} {} {}", a.op(), a.vm(), a.host()),
        })
        .collect()
}

#[test]
fn a_new_pin_moves_a_running_vm_live_and_says_why() {
    let before = specs(&[("vms/web.toml", "host = \"hv1\"")]);
    let after = specs(&[("vms/web.toml", "host = \"hv2\"")]);
    let o = world(vec![(
        "hv1",
        copy(&before, "web", RunState::Running, None, false),
    )]);
    let p = plan(&after, &o, NOW);
    assert_eq!(lines(&p), ["migrate web hv1>hv2 live"]);
    assert!(
        p.actions[0]
            .reason()
            .starts_with("pinned to hv2 (runs on hv1)"),
        "{p:?}"
    );
}

#[test]
fn a_move_with_a_change_that_needs_a_reboot_is_cold() {
    let before = specs(&[("vms/web.toml", "host = \"hv1\"")]);
    let after = specs(&[("vms/web.toml", "host = \"hv2\"\nmemory_mb = 512")]);
    let o = world(vec![(
        "hv1",
        copy(&before, "web", RunState::Running, None, false),
    )]);
    let p = plan(&after, &o, NOW);
    assert_eq!(lines(&p), ["migrate web hv1>hv2 cold"]);
    assert!(
        p.notes.iter().any(|n| n.contains("needs a reboot")),
        "{p:?}"
    );
}

#[test]
fn stopped_or_cold_policy_vms_move_cold_and_none_stays_with_a_reason() {
    let before = specs(&[
        ("vms/a.toml", "host = \"hv1\"\nmigration = \"cold\""),
        ("vms/b.toml", "host = \"hv1\"\npower = \"stopped\""),
        ("vms/c.toml", "host = \"hv1\"\nmigration = \"none\""),
    ]);
    let after = specs(&[
        ("vms/a.toml", "host = \"hv2\"\nmigration = \"cold\""),
        ("vms/b.toml", "host = \"hv2\"\npower = \"stopped\""),
        ("vms/c.toml", "host = \"hv2\"\nmigration = \"none\""),
    ]);
    let o = world(vec![
        ("hv1", copy(&before, "a", RunState::Running, None, false)),
        ("hv1", copy(&before, "b", RunState::Stopped, None, false)),
        ("hv1", copy(&before, "c", RunState::Running, None, false)),
    ]);
    let p = plan(&after, &o, NOW);
    let l = lines(&p);
    assert!(l.contains(&"migrate a hv1>hv2 cold".to_owned()), "{l:?}");
    assert!(l.contains(&"migrate b hv1>hv2 cold".to_owned()), "{l:?}");
    assert!(!l.iter().any(|a| a.starts_with("migrate c")), "{l:?}");
    assert!(
        p.pending_lines()
            .iter()
            .any(|n| n.starts_with("c: must move") && n.contains("\"none\"")),
        "{p:?}"
    );
}

#[test]
fn maintenance_moves_every_vm_off_by_the_placement_rules() {
    let before = specs(&[
        ("vms/a1.toml", "group = \"a\"\nhost = \"hv1\""),
        ("vms/a2.toml", "group = \"a\"\nhost = \"hv2\""),
    ]);
    let mut after = specs(&[
        ("vms/a1.toml", "group = \"a\""),
        ("vms/a2.toml", "group = \"a\"\nhost = \"hv2\""),
    ]);
    after.hosts.get_mut("hv1").expect("hv1").spec.state = plasmavmc_specs::HostState::Maintenance;
    let o = world(vec![
        ("hv1", copy(&before, "a1", RunState::Running, None, false)),
        ("hv2", copy(&before, "a2", RunState::Running, None, false)),
    ]);
    let p = plan(&after, &o, NOW);
    // hv2 has a VM of group a already: hv3.
    assert_eq!(lines(&p), ["migrate a1 hv1>hv3 live"]);
    assert!(matches!(
        p.actions[0],
        Action::Migrate {
            mode: MoveMode::Live,
            ..
        }
    ));
}

#[test]
fn a_migration_cut_short_before_completion_keeps_the_source() {
    let d = specs(&[("vms/web.toml", "host = \"hv1\"")]);
    let o = world(vec![
        ("hv1", copy(&d, "web", RunState::Running, None, false)),
        (
            "hv2",
            copy(&d, "web", RunState::Paused, Some("inmigrate"), true),
        ),
    ]);
    let p = plan(&d, &o, NOW);
    assert_eq!(lines(&p), ["stop web hv2", "delete web hv2"]);
}

#[test]
fn a_completed_migration_resumes_the_target_and_never_the_source() {
    let d = specs(&[("vms/web.toml", "host = \"hv2\"")]);
    let o = world(vec![
        (
            "hv1",
            copy(&d, "web", RunState::Paused, Some("postmigrate"), false),
        ),
        (
            "hv2",
            copy(&d, "web", RunState::Paused, Some("paused"), true),
        ),
    ]);
    let p = plan(&d, &o, NOW);
    assert_eq!(
        lines(&p),
        ["stop web hv1", "delete web hv1", "start web hv2"]
    );
}

#[test]
fn a_source_resumes_only_when_its_target_is_known_dead() {
    let d = specs(&[("vms/web.toml", "host = \"hv2\"")]);
    // The target's QEMU died after `completed`: the source is the only guest left.
    let dead = world(vec![
        (
            "hv1",
            copy(&d, "web", RunState::Paused, Some("postmigrate"), false),
        ),
        ("hv2", copy(&d, "web", RunState::Stopped, None, true)),
    ]);
    let p = plan(&d, &dead, NOW);
    // Still pinned to hv2: the move resumes the source, then moves it again.
    assert_eq!(lines(&p), ["delete web hv2", "migrate web hv1>hv2 live"]);
    // Pinned back to hv1: resumed where it is.
    let back = specs(&[("vms/web.toml", "host = \"hv1\"")]);
    let p = plan(&back, &dead, NOW);
    assert_eq!(lines(&p), ["delete web hv2", "start web hv1"]);
    // The target's host does not answer: nothing is resumed on a guess.
    let mut away = world(vec![(
        "hv1",
        copy(&d, "web", RunState::Paused, Some("postmigrate"), false),
    )]);
    away.hosts.remove("hv2");
    away.unreachable.insert("hv2".into(), "no answer".into());
    let p = plan(&d, &away, NOW);
    assert!(lines(&p).is_empty(), "{:?}", lines(&p));
}

#[test]
fn a_source_alone_resumes_when_its_migration_was_cut_short_or_its_target_is_gone() {
    let d = specs(&[("vms/web.toml", "host = \"hv2\"")]);
    // The target was removed (or never found again) while every host answers.
    let gone = world(vec![(
        "hv1",
        copy(&d, "web", RunState::Paused, Some("postmigrate"), false),
    )]);
    let p = plan(&d, &gone, NOW);
    assert_eq!(lines(&p), ["migrate web hv1>hv2 live"]);
    let mut away = gone.clone();
    away.hosts.remove("hv3");
    away.unreachable.insert("hv3".into(), "no answer".into());
    assert!(lines(&plan(&d, &away, NOW)).is_empty());
    // Paused before the switchover (its agent died there): the guest went nowhere.
    let cut = world(vec![(
        "hv1",
        copy(&d, "web", RunState::Paused, Some("finish-migrate"), false),
    )]);
    assert_eq!(lines(&plan(&d, &cut, NOW)), ["migrate web hv1>hv2 live"]);
    let stay = specs(&[("vms/web.toml", "host = \"hv1\"")]);
    let cut = world(vec![(
        "hv1",
        copy(
            &stay,
            "web",
            RunState::Paused,
            Some("finish-migrate"),
            false,
        ),
    )]);
    assert_eq!(lines(&plan(&stay, &cut, NOW)), ["start web hv1"]);
    // A source paused for another reason (not a finished migration) is left alone.
    let other = world(vec![(
        "hv1",
        copy(&d, "web", RunState::Paused, Some("paused"), false),
    )]);
    assert!(lines(&plan(&d, &other, NOW)).is_empty());
}

#[test]
fn a_target_that_ran_and_exited_is_kept_over_its_migrated_source() {
    let d = specs(&[("vms/web.toml", "host = \"hv2\"")]);
    // Resumed on hv2, then its QEMU exited before the source was removed: hv2 holds the
    // newer guest (and disks); the source's memory is stale and is never resumed.
    let o = world(vec![
        (
            "hv1",
            copy(&d, "web", RunState::Paused, Some("postmigrate"), false),
        ),
        ("hv2", copy(&d, "web", RunState::Exited, None, false)),
    ]);
    let p = plan(&d, &o, NOW);
    assert_eq!(
        lines(&p),
        ["stop web hv1", "delete web hv1", "start web hv2"]
    );
}

#[test]
fn a_cold_move_cut_short_keeps_the_copy_that_ran_whatever_the_status_says() {
    let d = specs(&[("vms/db.toml", "host = \"hv1\"\nmigration = \"cold\"")]);
    let stopped = |started: Option<&str>| ObservedVm {
        power: Power::Stopped,
        started_at: started.map(str::to_owned),
        ..copy(&d, "db", RunState::Stopped, None, false)
    };
    // The target on hv1 was created (empty disks) and never started; no status file says
    // where db was last seen: the source on hv2, which ran, keeps the VM.
    let o = world(vec![
        ("hv1", stopped(None)),
        ("hv2", stopped(Some("2026-11-26T20:00:00Z"))),
    ]);
    let p = plan(&d, &o, NOW);
    assert_eq!(lines(&p), ["delete db hv1", "migrate db hv2>hv1 cold"]);
}

/// `o` with `host` reporting a CPU of `digest` that can run `models` (`None`: no CPU).
fn with_cpu(mut o: Observed, host: &str, digest: Option<&str>, models: &[&str]) -> Observed {
    o.hosts.get_mut(host).expect("known host").cpu = digest.map(|d| crate::observe::HostCpu {
        model: format!("cpu {d}"),
        digest: d.to_owned(),
        models: models.iter().map(|m| (*m).to_owned()).collect(),
        tcg_models: Vec::new(),
    });
    o
}

/// VM settings, hv1's CPU digest, hv2's, the move expected, words its reason holds.
type Row<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a str, &'a str);

#[test]
fn a_guest_on_the_host_cpu_moves_live_only_between_equal_cpus() {
    let table: [Row; 11] = [
        ("cpu = \"host\"", Some("aa"), Some("aa"), "live", ""),
        (
            "cpu = \"host\"",
            Some("aa"),
            Some("bb"),
            "cold",
            "cpu = host: hv1 and hv2 have different CPUs; moving cold",
        ),
        (
            "cpu = \"host\"",
            Some("aa"),
            None,
            "cold",
            "cpu = host: hv2 has not reported its CPU, so the CPUs cannot be compared; moving cold",
        ),
        (
            "cpu = \"host\"",
            None,
            None,
            "cold",
            "hv1 and hv2 have not reported their CPU",
        ),
        // No cpu is the host's CPU under KVM, and auto may be KVM: only tcg is not.
        (
            "accel = \"kvm\"",
            Some("aa"),
            Some("bb"),
            "cold",
            "cpu = host by default (no cpu, accel not \"tcg\"): hv1 and hv2 have different CPUs",
        ),
        ("accel = \"kvm\"", Some("aa"), Some("aa"), "live", ""),
        ("", Some("aa"), Some("aa"), "live", ""),
        ("", None, Some("aa"), "cold", "hv1 has not reported its CPU"),
        ("accel = \"tcg\"", Some("aa"), Some("bb"), "live", ""),
        ("accel = \"tcg\"", None, None, "live", ""),
        // A named model is the same CPU wherever it runs.
        ("cpu = \"x86-64-v2\"", Some("aa"), Some("bb"), "live", ""),
    ];
    for (qemu, cpu1, cpu2, mode, says) in table {
        let vm = |host: &str| format!("host = \"{host}\"\n[qemu]\n{qemu}\n");
        let before = specs(&[("vms/web.toml", &vm("hv1"))]);
        let after = specs(&[("vms/web.toml", &vm("hv2"))]);
        let mut o = world(vec![(
            "hv1",
            copy(&before, "web", RunState::Running, None, false),
        )]);
        for (host, digest) in [("hv1", cpu1), ("hv2", cpu2)] {
            o = with_cpu(o, host, digest, &["x86-64-v2"]);
        }
        let p = plan(&after, &o, NOW);
        assert_eq!(
            lines(&p),
            [format!("migrate web hv1>hv2 {mode}")],
            "{qemu} {cpu1:?} {cpu2:?}"
        );
        let reason = p.actions[0].reason();
        if says.is_empty() {
            assert!(!reason.contains("cold"), "{qemu}: {reason}");
        } else {
            assert!(reason.contains(says), "{qemu} {cpu1:?} {cpu2:?}: {reason}");
        }
    }
}

#[test]
fn the_cpu_check_leaves_cold_and_none_policies_as_they_were() {
    let before = specs(&[
        (
            "vms/a.toml",
            "host = \"hv1\"\nmigration = \"none\"\n[qemu]\ncpu = \"host\"",
        ),
        (
            "vms/b.toml",
            "host = \"hv1\"\nmigration = \"cold\"\n[qemu]\ncpu = \"host\"",
        ),
    ]);
    let after = specs(&[
        (
            "vms/a.toml",
            "host = \"hv2\"\nmigration = \"none\"\n[qemu]\ncpu = \"host\"",
        ),
        (
            "vms/b.toml",
            "host = \"hv2\"\nmigration = \"cold\"\n[qemu]\ncpu = \"host\"",
        ),
    ]);
    let o = world(vec![
        ("hv1", copy(&before, "a", RunState::Running, None, false)),
        ("hv1", copy(&before, "b", RunState::Running, None, false)),
    ]);
    let o = with_cpu(with_cpu(o, "hv1", Some("aa"), &[]), "hv2", Some("bb"), &[]);
    let p = plan(&after, &o, NOW);
    // a records its new pin where it is (as before); it does not move.
    assert_eq!(lines(&p), ["migrate b hv1>hv2 cold", "update a hv1"]);
    assert!(!p.actions[0].reason().contains("CPU"), "{p:?}");
    assert!(
        p.pending_lines()
            .iter()
            .any(|n| n.starts_with("a: must move") && n.contains("\"none\"")),
        "{p:?}"
    );
}

#[test]
fn a_named_cpu_model_moves_only_to_a_host_that_can_run_it() {
    let spec = |host: &str| format!("host = \"{host}\"\n[qemu]\ncpu = \"Skylake-Server\"\n");
    let before = specs(&[("vms/web.toml", &spec("hv1"))]);
    let after = specs(&[("vms/web.toml", &spec("hv2"))]);
    let o = world(vec![(
        "hv1",
        copy(&before, "web", RunState::Running, None, false),
    )]);
    let o = with_cpu(o, "hv1", Some("aa"), &["Skylake-Server"]);
    let o = with_cpu(o, "hv2", None, &[]);
    let p = plan(&after, &o, NOW);
    assert_eq!(
        lines(&p),
        ["update web hv1"],
        "it stays; its pin is recorded"
    );
    assert_eq!(
        p.pending_lines(),
        ["web: must move (pinned to hv2 (runs on hv1)) but cannot be placed: needs CPU model Skylake-Server: hv2 has not reported its CPU"]
    );
    let o = with_cpu(o, "hv2", Some("bb"), &["x86-64-v2"]);
    let p = plan(&after, &o, NOW);
    assert!(
        p.pending_lines()[0].ends_with("needs CPU model Skylake-Server: hv2 cannot run it"),
        "{p:?}"
    );
    let o = with_cpu(o, "hv2", Some("bb"), &["x86-64-v2", "Skylake-Server"]);
    assert_eq!(lines(&plan(&after, &o, NOW)), ["migrate web hv1>hv2 live"]);
}

/// `copy` of a source whose move switched to postcopy.
fn postcopy_source(d: &Desired, vm: &str, detail: &str) -> ObservedVm {
    ObservedVm {
        postcopy: true,
        ..copy(d, vm, RunState::Paused, Some(detail), false)
    }
}

#[test]
fn a_postcopy_source_is_never_resumed() {
    let d = specs(&[("vms/web.toml", "host = \"hv2\"")]);
    // The engine died during postcopy and the target runs the guest: the source feeds it
    // the rest of its memory, and is left alone until the move completes.
    let feeding = world(vec![
        ("hv1", postcopy_source(&d, "web", "finish-migrate")),
        ("hv2", copy(&d, "web", RunState::Running, None, false)),
    ]);
    let p = plan(&d, &feeding, NOW);
    assert!(lines(&p).is_empty(), "{:?}", lines(&p));
    assert!(p.notes.iter().any(|n| n.contains("postcopy")), "{p:?}");
    // Done: the source is postmigrate and removed as any stale copy.
    let done = world(vec![
        ("hv1", postcopy_source(&d, "web", "postmigrate")),
        ("hv2", copy(&d, "web", RunState::Running, None, false)),
    ]);
    assert_eq!(
        lines(&plan(&d, &done, NOW)),
        ["stop web hv1", "delete web hv1"]
    );
    // The target resumed by nobody yet (-S, paused in postcopy): it is resumed there.
    let held = world(vec![
        ("hv1", postcopy_source(&d, "web", "finish-migrate")),
        (
            "hv2",
            copy(&d, "web", RunState::Paused, Some("paused"), true),
        ),
    ]);
    assert_eq!(lines(&plan(&d, &held, NOW)), ["start web hv2"]);
    // The target is gone (its QEMU died, or its host lost it): the guest is lost. The
    // source is stopped, never resumed, alone or next to the dead target's folder.
    for (detail, with_dead_target) in [
        ("finish-migrate", false),
        ("postmigrate", false),
        ("finish-migrate", true),
    ] {
        let mut vms = vec![("hv1", postcopy_source(&d, "web", detail))];
        if with_dead_target {
            vms.push(("hv2", copy(&d, "web", RunState::Stopped, None, true)));
        }
        let p = plan(&d, &world(vms), NOW);
        let l = lines(&p);
        assert!(l.contains(&"stop web hv1".to_owned()), "{detail}: {l:?}");
        assert!(
            !l.iter()
                .any(|a| a.starts_with("start web hv1") || a.starts_with("migrate")),
            "{detail}: {l:?}"
        );
    }
    // While a host does not answer, the target may run there: nothing is done.
    let mut away = world(vec![("hv1", postcopy_source(&d, "web", "finish-migrate"))]);
    away.hosts.remove("hv3");
    away.unreachable.insert("hv3".into(), "no answer".into());
    assert!(lines(&plan(&d, &away, NOW)).is_empty());
}
