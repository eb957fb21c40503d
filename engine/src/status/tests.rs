//! Status of hosts that are not asked (suspect, down, fenced) and of their VMs.

use std::collections::BTreeMap;

use super::*;
use crate::observe::{Suspect, Unreachable};

/// A previous status file saying `vm` runs on `host` with pid 100.
fn ran_before(dir: &StatusDir, vm: &str, host: &str) {
    let snap = Snapshot {
        vms: vec![VmStatus {
            name: vm.to_owned(),
            phase: VmPhase::Running,
            host: Some(host.to_owned()),
            pid: Some(100),
            since: Some("2026-11-26T20:00:00Z".to_owned()),
            restarts: 0,
            health: super::GuestHealth::default(),
            spec_revision: None,
            spec_hash: None,
            up_to_date: true,
            message: None,
            events: Vec::new(),
            nics: Vec::new(),
        }],
        ..Snapshot::default()
    };
    dir.write(&snap).expect("status written");
}

/// `hv2` answers (empty); `hv1` is not asked: suspect when `last_heard_ms` is given,
/// else down. `a` was last seen on hv1; `fences` are the fence records.
fn observed(last_heard_ms: Option<u64>, fences: &[&str]) -> Observed {
    let why = "host hv1 missed heartbeats: nothing heard for 0.6s (down after 1s)".to_owned();
    let mut unreachable = Unreachable::default();
    match last_heard_ms {
        Some(ms) => {
            unreachable.suspect.insert(
                "hv1".into(),
                Suspect {
                    why,
                    last_heard_ms: ms,
                },
            );
        }
        None => {
            unreachable
                .down
                .insert("hv1".into(), "host hv1 is unreachable: gone".into());
        }
    }
    Observed {
        hosts: BTreeMap::from([("hv2".to_owned(), Inventory::default())]),
        ..Observed::default()
    }
    .with_context(
        &unreachable,
        BTreeMap::from([("a".to_owned(), vec!["hv1".to_owned()])]),
        fences
            .iter()
            .map(|h| ((*h).to_owned(), "fenced by operator".to_owned()))
            .collect(),
    )
}

fn build(observed: &Observed) -> Snapshot {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = StatusDir::new(tmp.path());
    ran_before(&dir, "a", "hv1");
    dir.build(EngineStatus::default(), None, observed, None, &[])
}

fn host<'s>(snap: &'s Snapshot, name: &str) -> &'s HostStatus {
    snap.hosts
        .iter()
        .find(|h| h.name == name)
        .expect("host status")
}

#[test]
fn a_suspect_host_says_since_when_it_is_silent_and_its_vms_are_unknown() {
    let o = observed(Some(1_800_000_000_000), &[]);
    assert!(
        o.lost_on("a") == Some("hv1"),
        "a planner sees hv1 as unreachable"
    );
    let snap = build(&o);
    let hv1 = host(&snap, "hv1");
    assert_eq!(hv1.phase.as_str(), "suspect");
    assert_eq!(hv1.last_heartbeat.as_deref(), Some("2027-01-15T08:00:00Z"));
    assert_eq!(
        hv1.message.as_deref(),
        Some("host hv1 missed heartbeats: nothing heard for 0.6s (down after 1s)")
    );
    assert_eq!(hv1.vms, ["a"]);
    assert_eq!(host(&snap, "hv2").phase.as_str(), "ready");
    let a = &snap.vms[0];
    assert_eq!(
        a.phase,
        VmPhase::Unknown,
        "never running while hv1 is suspect"
    );
    assert_eq!((a.pid, a.since.as_deref()), (None, None));
    assert_eq!(a.host.as_deref(), Some("hv1"));
    assert!(a
        .message
        .as_deref()
        .is_some_and(|m| m.contains("missed heartbeats")));
}

#[test]
fn a_fence_record_does_not_count_while_the_host_is_only_suspect() {
    let suspect = observed(Some(1_800_000_000_000), &["hv1"]);
    assert!(suspect.fenced.is_empty(), "{:?}", suspect.fenced);
    assert_eq!(host(&build(&suspect), "hv1").phase.as_str(), "suspect");
    let down = observed(None, &["hv1"]);
    assert_eq!(down.fenced.len(), 1);
    assert_eq!(host(&build(&down), "hv1").phase.as_str(), "fenced");
    assert_eq!(
        host(&build(&observed(None, &[])), "hv1").phase.as_str(),
        "down"
    );
}

/// A stopped copy of `a` on hv2 (a cold move's source) while the record says `a` may
/// also be on hv1, which does not answer.
fn stopped_on_hv2_recorded_on_hv1(fenced: bool) -> Observed {
    let mut o = observed(None, if fenced { &["hv1"] } else { &[] });
    let spec: plasmavmc_specs::VmSpec = toml::from_str("").expect("an empty spec");
    let copy = ObservedVm {
        name: "a".to_owned(),
        uuid: "uuid-a".to_owned(),
        state: RunState::Stopped,
        pid: None,
        power: plasmavmc_specs::Power::Stopped,
        revision: "0123456789ab".to_owned(),
        spec_hash: "hash".to_owned(),
        spec,
        started_at: None,
        detail: None,
        paused: None,
        last_exit: None,
        exits: Vec::new(),
        restarts: 0,
        watchdog_resets: 0,
        guest_agent: None,
        liveness: None,
        readiness: None,
        incoming: false,
        postcopy: false,
        seed: None,
        file_digests: std::collections::BTreeMap::new(),
    };
    o.hosts
        .get_mut("hv2")
        .expect("hv2")
        .vms
        .insert("a".to_owned(), copy);
    o.whereabouts
        .insert("a".to_owned(), vec!["hv2".to_owned(), "hv1".to_owned()]);
    o
}

#[test]
fn a_copy_that_does_not_run_is_unknown_while_another_host_may_run_the_vm() {
    let snap = build(&stopped_on_hv2_recorded_on_hv1(false));
    let a = &snap.vms[0];
    assert_eq!(
        a.phase,
        VmPhase::Unknown,
        "never `stopped` while hv1 may run it"
    );
    assert_eq!(a.host.as_deref(), Some("hv1"));
    // hv1 fenced: the copy that answers speaks.
    let snap = build(&stopped_on_hv2_recorded_on_hv1(true));
    assert_eq!(snap.vms[0].phase, VmPhase::Stopped);
    assert_eq!(snap.vms[0].host.as_deref(), Some("hv2"));
}

#[test]
fn a_copy_that_runs_unhealthy_is_reported_as_it_is_not_unknown() {
    let mut o = stopped_on_hv2_recorded_on_hv1(false);
    let copy = o
        .hosts
        .get_mut("hv2")
        .and_then(|h| h.vms.get_mut("a"))
        .expect("a on hv2");
    copy.state = RunState::Running;
    copy.pid = Some(42);
    copy.liveness = Some(crate::observe::ProbeState {
        ok: false,
        since: "2026-12-06T00:00:00Z".to_owned(),
        pid: 42,
        last: "no answer within 1s".to_owned(),
    });
    let snap = build(&o);
    assert_eq!(snap.vms[0].phase, VmPhase::Unhealthy);
    assert_eq!(snap.vms[0].host.as_deref(), Some("hv2"));
}

#[test]
fn an_attempt_counts_as_applied_only_without_failures_or_pending_vms() {
    let mut engine = EngineStatus::default();
    assert_eq!(engine.attempted("r1", None, &[]), "");
    assert_eq!(engine.last_applied_revision.as_deref(), Some("r1"));
    let pending = [crate::plan::Pending {
        vm: "a".to_owned(),
        why: "cannot be placed: no room".to_owned(),
    }];
    assert_eq!(
        engine.attempted("r2", None, &pending),
        "a: cannot be placed: no room"
    );
    assert_eq!(engine.last_attempted_revision.as_deref(), Some("r2"));
    assert_eq!(engine.last_applied_revision.as_deref(), Some("r1"));
    assert_eq!(
        engine.last_error.as_deref(),
        Some("a: cannot be placed: no room")
    );
    engine.attempted("r2", None, &[]);
    assert_eq!(
        (engine.last_applied_revision.as_deref(), engine.last_error),
        (Some("r2"), None)
    );
}

#[test]
fn a_download_shows_in_the_message_and_keeps_the_phase() {
    use crate::execute::Doing;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = StatusDir::new(tmp.path());
    // A VM new to the status: pending, with the download as its message.
    dir.set_live(
        "new",
        Doing::Downloading,
        "hv1: downloading d.qcow2 1 MiB/4 MiB",
    )
    .expect("set");
    let new = dir.vm("new").expect("read").expect("written");
    assert_eq!(new.phase, VmPhase::Pending);
    assert_eq!(
        new.message.as_deref(),
        Some("hv1: downloading d.qcow2 1 MiB/4 MiB")
    );
    // A running VM stays running while its host downloads; a migration says so.
    ran_before(&dir, "web", "hv1");
    dir.set_live("web", Doing::Downloading, "hv2: downloading d.qcow2 0 B")
        .expect("set");
    assert_eq!(
        dir.vm("web").expect("read").expect("there").phase,
        VmPhase::Running
    );
    dir.set_live("web", Doing::Migrating, "migrating live to hv2")
        .expect("set");
    assert_eq!(
        dir.vm("web").expect("read").expect("there").phase,
        VmPhase::Migrating
    );
}
