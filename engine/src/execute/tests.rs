//! The executor against a fake host that records calls and fails on demand.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use super::{execute, Outcome};
use crate::host::{Host, HostError};
use crate::observe::Inventory;
use crate::plan::{Action, Plan};
use crate::qemu::instance::VmInstance;
use crate::qemu::migrate::{Stats, Tuning};
use crate::source::{Commit, Target};
use crate::wire::{DiskChunk, Incoming, StopOutcome};

#[derive(Debug, Default)]
struct FakeHost {
    calls: Mutex<Vec<String>>,
    fail_on: Option<String>,
}

impl FakeHost {
    fn record(&self, call: String) -> Result<(), HostError> {
        let fail = self.fail_on.as_deref() == Some(call.as_str());
        let reason = format!("{call} failed on purpose");
        self.calls.lock().expect("lock").push(call);
        if fail {
            return Err(HostError::Refused {
                vm: "x".into(),
                reason,
            });
        }
        Ok(())
    }
}

impl Host for FakeHost {
    #[allow(clippy::unnecessary_literal_bound)] // the trait returns a borrowed name
    fn name(&self) -> &str {
        "local"
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::wire::HostEvent> {
        tokio::sync::broadcast::channel(1).1
    }
    async fn inventory(&self) -> Result<Inventory, HostError> {
        Ok(Inventory::default())
    }
    async fn create(&self, vm: &VmInstance) -> Result<(), HostError> {
        self.record(format!("create {} {}", vm.name, vm.spec.memory_mb))
    }
    async fn recover(&self, vm: &VmInstance) -> Result<(), HostError> {
        self.record(format!("recover {} {}", vm.name, vm.spec.memory_mb))
    }
    async fn update(&self, vm: &VmInstance) -> Result<(), HostError> {
        self.record(format!("update {} {}", vm.name, vm.spec.memory_mb))
    }
    async fn start(&self, vm: &str) -> Result<u32, HostError> {
        self.record(format!("start {vm}")).map(|()| 42)
    }
    async fn stop(&self, vm: &str, timeout: Duration) -> Result<StopOutcome, HostError> {
        self.record(format!("stop {vm} {}s", timeout.as_secs()))
            .map(|()| StopOutcome::Quit)
    }
    async fn delete_disk(
        &self,
        path: &std::path::Path,
        _shared: Option<&std::path::Path>,
    ) -> Result<u64, HostError> {
        Err(HostError::Refused {
            vm: path.display().to_string(),
            reason: "a fake host keeps no disks".to_owned(),
        })
    }
    async fn prune(&self, folder: &str, pid: u32) -> Result<(), HostError> {
        self.record(format!("prune {folder} {pid}"))
    }
    async fn delete(&self, vm: &str) -> Result<Option<PathBuf>, HostError> {
        self.record(format!("delete {vm}"))
            .map(|()| Some(PathBuf::from("/r")))
    }
    async fn prepare_incoming(
        &self,
        vm: &VmInstance,
        from: &str,
        listen: &str,
        mirror: &[String],
    ) -> Result<Incoming, HostError> {
        self.record(format!(
            "incoming {} from {from} on {listen} mirror {mirror:?}",
            vm.name
        ))
        .map(|()| Incoming {
            uri: "tcp:127.0.0.1:1".into(),
            nbd: None,
        })
    }
    async fn migrate_out(
        &self,
        vm: &str,
        to: &Incoming,
        _tuning: &Tuning,
    ) -> Result<Stats, HostError> {
        self.record(format!("migrate {vm} to {}", to.uri))
            .map(|()| Stats::default())
    }
    async fn migration_stats(&self, vm: &str) -> Result<Stats, HostError> {
        self.record(format!("stats {vm}"))
            .map(|()| Stats::default())
    }
    async fn discard(&self, vm: &str) -> Result<(), HostError> {
        self.record(format!("discard {vm}"))
    }
    async fn inject(&self, vm: &str, fault: crate::wire::Fault) -> Result<u32, HostError> {
        self.record(format!("inject {vm} {fault:?}")).map(|()| 42)
    }
    async fn read_disk(&self, vm: &str, disk: &str, offset: u64) -> Result<DiskChunk, HostError> {
        self.record(format!("read {vm} {disk} {offset}"))?;
        let size = 3 << 20;
        Ok(DiskChunk {
            size,
            len: 1 << 20,
            data: if offset == 0 {
                vec![7; 1 << 20]
            } else {
                vec![]
            },
        })
    }
    async fn write_disk(
        &self,
        vm: &str,
        disk: &str,
        offset: u64,
        chunk: &DiskChunk,
        finish: Option<&str>,
    ) -> Result<(), HostError> {
        self.record(format!(
            "write {vm} {disk} {offset} {} {}",
            if chunk.data.is_empty() {
                "hole"
            } else {
                "data"
            },
            finish.map_or("-", |s| &s[..8])
        ))
    }
}

fn target(list: &[(&str, &str)]) -> Target {
    let files = crate::test_utils::files(list);
    let desired = plasmavmc_specs::load(&files).expect("valid");
    Target {
        commit: Commit {
            id: "c0ffee".into(),
            summary: String::new(),
            files,
            refused: vec![],
        },
        desired,
        files: BTreeMap::new(),
    }
}

fn act(op: &str, vm: &str) -> Action {
    let (vm, host, reason, diff) = (
        vm.to_owned(),
        "local".to_owned(),
        "test".to_owned(),
        String::new(),
    );
    match op {
        "create" => Action::Create { vm, host, reason },
        "start" => Action::Start { vm, host, reason },
        "stop" => Action::Stop { vm, host, reason },
        "restart" => Action::Restart {
            vm,
            host,
            reason,
            diff,
        },
        "update" => Action::Update {
            vm,
            host,
            reason,
            diff,
        },
        _ => Action::Delete { vm, host, reason },
    }
}

#[tokio::test]
async fn actions_become_host_calls_in_order_with_the_commit_spec() {
    let t = target(&[
        ("plasmavmc.toml", "[timeouts]\nstop = \"7s\""),
        ("vms/a.toml", "memory_mb = 64"),
        ("vms/b.toml", ""),
    ]);
    let plan = Plan {
        actions: vec![
            act("create", "a"),
            act("start", "a"),
            act("restart", "b"),
            act("stop", "c"),
            act("delete", "c"),
        ],
        notes: vec![],
        wake_at_ms: None,
        pending: vec![],
    };
    let hosts = BTreeMap::from([("local".to_owned(), FakeHost::default())]);
    let mut seen = 0;
    let report = execute(&plan, &t, &hosts, &|_, _, _| {}, |_| seen += 1).await;
    assert!(!report.failed());
    assert_eq!(seen, 5);
    let calls = hosts["local"].calls.lock().expect("lock").clone();
    // Different VMs' actions run at once: each VM's calls are in plan order.
    let of = |vm: &str| -> Vec<String> {
        calls
            .iter()
            .filter(|c| c.split(' ').nth(1) == Some(vm))
            .cloned()
            .collect()
    };
    assert_eq!(of("a"), ["create a 64", "start a"]);
    assert_eq!(of("b"), ["stop b 7s", "update b 256", "start b"]);
    assert_eq!(of("c"), ["stop c 7s", "delete c"]);
    assert_eq!(calls.len(), 7);
}

#[tokio::test]
async fn a_failed_step_skips_the_rest_of_that_vm_only() {
    let t = target(&[("vms/a.toml", ""), ("vms/b.toml", "")]);
    let plan = Plan {
        actions: vec![
            act("create", "a"),
            act("start", "a"),
            act("create", "b"),
            act("start", "b"),
        ],
        notes: vec![],
        wake_at_ms: None,
        pending: vec![],
    };
    let hosts = BTreeMap::from([(
        "local".to_owned(),
        FakeHost {
            fail_on: Some("create a 256".into()),
            ..FakeHost::default()
        },
    )]);
    let report = execute(&plan, &t, &hosts, &|_, _, _| {}, |_| {}).await;
    assert!(report.failed());
    let outcomes: Vec<&str> = report
        .steps
        .iter()
        .map(|s| match s.outcome {
            Outcome::Done { .. } => "done",
            Outcome::Failed { .. } => "failed",
            Outcome::Skipped { .. } => "skipped",
        })
        .collect();
    assert_eq!(outcomes, ["failed", "skipped", "done", "done"]);
    let Outcome::Failed { error } = &report.steps[0].outcome else {
        panic!("failed expected")
    };
    assert!(error.contains("failed on purpose"), "{error}");
}

#[tokio::test]
async fn unknown_hosts_fail_the_action_without_calls() {
    let t = target(&[("vms/a.toml", "")]);
    let plan = Plan {
        actions: vec![Action::Start {
            vm: "a".into(),
            host: "hv9".into(),
            reason: String::new(),
        }],
        notes: vec![],
        wake_at_ms: None,
        pending: vec![],
    };
    let hosts = BTreeMap::from([("local".to_owned(), FakeHost::default())]);
    let report = execute(&plan, &t, &hosts, &|_, _, _| {}, |_| {}).await;
    assert!(report.failed());
    assert!(hosts["local"].calls.lock().expect("lock").is_empty());
}

fn two_hosts(fail_on: Option<&str>) -> BTreeMap<String, FakeHost> {
    ["hv1", "hv2"]
        .map(|h| {
            let host = FakeHost {
                fail_on: fail_on.map(str::to_owned),
                ..FakeHost::default()
            };
            (h.to_owned(), host)
        })
        .into_iter()
        .collect()
}

fn move_plan(mode: crate::plan::MoveMode) -> Plan {
    Plan {
        actions: vec![Action::Migrate {
            vm: "web".into(),
            host: "hv1".into(),
            to: "hv2".into(),
            mode,
            reason: "test".into(),
        }],
        ..Plan::default()
    }
}

const MOVING: [(&str, &str); 3] = [
    ("hosts/hv1.toml", "address = \"local\""),
    ("hosts/hv2.toml", "address = \"local\""),
    (
        "vms/web.toml",
        "host = \"hv2\"\n[[disks]]\nname = \"data\"\nsize_gb = 1",
    ),
];

#[tokio::test]
async fn a_cold_move_stops_streams_every_chunk_checks_and_only_then_discards() {
    let hosts = two_hosts(None);
    let report = execute(
        &move_plan(crate::plan::MoveMode::Cold),
        &target(&MOVING),
        &hosts,
        &|_, _, _| {},
        |_| {},
    )
    .await;
    assert!(!report.failed(), "{}", report.failures());
    let calls = |h: &str| hosts[h].calls.lock().expect("lock").clone();
    assert_eq!(
        calls("hv1"),
        [
            "stop web 30s",
            "read web data 0",
            "read web data 1048576",
            "read web data 2097152",
            "discard web"
        ]
    );
    let hv2 = calls("hv2");
    assert_eq!(hv2[0], "create web 256");
    assert_eq!(&hv2[1][..22], "write web data 0 data ");
    assert_eq!(hv2[2], "write web data 1048576 hole -");
    // The last chunk carries the SHA-256 of the whole stream (holes as zeros).
    assert!(hv2[3].starts_with("write web data 2097152 hole ") && !hv2[3].ends_with(" -"));
    assert_eq!(hv2[4], "start web");
}

#[tokio::test]
async fn a_failed_live_migration_removes_the_target_and_keeps_the_source() {
    let hosts = two_hosts(Some("migrate web to tcp:127.0.0.1:1"));
    let report = execute(
        &move_plan(crate::plan::MoveMode::Live),
        &target(&MOVING),
        &hosts,
        &|_, _, _| {},
        |_| {},
    )
    .await;
    assert!(report.failed());
    let calls = |h: &str| hosts[h].calls.lock().expect("lock").clone();
    assert_eq!(calls("hv1"), ["migrate web to tcp:127.0.0.1:1"]);
    assert_eq!(
        calls("hv2"),
        [
            "incoming web from hv1 on 127.0.0.1 mirror [\"data\"]",
            "discard web"
        ]
    );
}
