//! The executor against a fake host that records calls and fails on demand.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use super::{execute, Outcome};
use crate::host::{Host, HostError, StopOutcome};
use crate::observe::Inventory;
use crate::plan::{Action, Plan};
use crate::qemu::instance::VmInstance;
use crate::source::{Commit, Target};

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
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::host::HostEvent> {
        tokio::sync::broadcast::channel(1).1
    }
    async fn inventory(&self) -> Result<Inventory, HostError> {
        Ok(Inventory::default())
    }
    async fn create(&self, vm: &VmInstance) -> Result<(), HostError> {
        self.record(format!("create {} {}", vm.name, vm.spec.memory_mb))
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
    async fn prune(&self, folder: &str, pid: u32) -> Result<(), HostError> {
        self.record(format!("prune {folder} {pid}"))
    }
    async fn delete(&self, vm: &str) -> Result<Option<PathBuf>, HostError> {
        self.record(format!("delete {vm}"))
            .map(|()| Some(PathBuf::from("/r")))
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
    let report = execute(&plan, &t, &hosts, |_| seen += 1).await;
    assert!(!report.failed());
    assert_eq!(seen, 5);
    let calls = hosts["local"].calls.lock().expect("lock").clone();
    assert_eq!(
        calls,
        [
            "create a 64",
            "start a",
            "stop b 7s",
            "update b 256",
            "start b",
            "stop c 7s",
            "delete c"
        ]
    );
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
    let report = execute(&plan, &t, &hosts, |_| {}).await;
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
    let report = execute(&plan, &t, &hosts, |_| {}).await;
    assert!(report.failed());
    assert!(hosts["local"].calls.lock().expect("lock").is_empty());
}
