//! Property tests of the planner over random specs and random observed states:
//! - planning is a fixed point: applying a plan to what runs, then planning again,
//!   gives no actions;
//! - a plan never places one VM on two hosts, nor starts it beside a running copy.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use plasmavmc_specs::{Desired, Power};
use proptest::prelude::*;

use super::{plan, Action, Plan};
use crate::observe::{Capacity, Inventory, Observed, ObservedVm, RunState};
use crate::qemu::exit::{ExitReason, ExitRecord};
use crate::test_utils::desired;

const NOW: u64 = 1_800_000_000_000;
const HOSTS: [&str; 3] = ["hv1", "hv2", "hv3"];

/// One VM as the generator sees it: spec knobs, and what (if anything) runs.
#[derive(Debug, Clone)]
struct Case {
    in_specs: bool,
    memory: u64,
    running: bool,
    restart: &'static str,
    group: Option<u8>,
    pin: Option<usize>,
    priority: i32,
    /// Where an instance exists and in what state: (host index, state, same spec?).
    instance: Option<(usize, RunState, bool)>,
    /// A second copy on another host (offset from the first), as after a host returned.
    copy: Option<(usize, RunState)>,
}

fn case() -> impl Strategy<Value = Case> {
    let state = prop_oneof![
        Just(RunState::Running),
        Just(RunState::Stopped),
        Just(RunState::Exited)
    ];
    (
        any::<bool>(),
        prop_oneof![Just(64u64), Just(128), Just(512)],
        any::<bool>(),
        prop_oneof![Just("always"), Just("on-failure"), Just("never")],
        proptest::option::of(0u8..2),
        proptest::option::of(0usize..3),
        prop_oneof![Just(0i32), Just(-5), Just(10)],
        proptest::option::of((0usize..3, state.clone(), any::<bool>())),
        proptest::option::weighted(0.2, (1usize..3, state)),
    )
        .prop_map(
            |(in_specs, memory, running, restart, group, pin, priority, instance, copy)| Case {
                in_specs,
                memory,
                running,
                restart,
                group,
                pin,
                priority,
                instance,
                copy,
            },
        )
}

#[allow(clippy::too_many_lines)] // one ObservedVm written out field by field
fn world(cases: &[Case]) -> (Desired, Observed) {
    let mut files: Vec<(String, String)> = HOSTS
        .iter()
        .map(|h| {
            (
                format!("hosts/{h}.toml"),
                "address = \"local\"\nmemory_mb = 1024\nvcpus = 4\n".to_owned(),
            )
        })
        .collect();
    for (i, c) in cases.iter().enumerate().filter(|(_, c)| c.in_specs) {
        let mut text = format!(
            "memory_mb = {}\npower = \"{}\"\nrestart = \"{}\"\n",
            c.memory,
            if c.running { "running" } else { "stopped" },
            c.restart
        );
        if let Some(g) = c.group {
            let _ = writeln!(text, "group = \"g{g}\"");
        }
        if let Some(p) = c.pin {
            let _ = writeln!(text, "host = \"{}\"", HOSTS[p]);
        }
        if c.priority != 0 {
            let _ = writeln!(text, "priority = {}", c.priority);
        }
        files.push((format!("vms/vm{i}.toml"), text));
    }
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    let d = desired(&refs);
    let mut observed = Observed::default();
    for h in HOSTS {
        observed.hosts.insert(
            h.to_owned(),
            Inventory {
                capacity: Capacity {
                    vcpus: 4,
                    memory_mb: 1024,
                },
                ..Inventory::default()
            },
        );
    }
    for (i, c) in cases.iter().enumerate() {
        let Some((first, first_state, same)) = c.instance else {
            continue;
        };
        let copy = c
            .copy
            .map(|(offset, state)| ((first + offset) % HOSTS.len(), state));
        for (host, state) in std::iter::once((first, first_state)).chain(copy) {
            let name = format!("vm{i}");
            let spec = running_spec(&d, &name, same);
            let hash = match d.vms.get(&name) {
                Some(e) if same => e.hash.clone(),
                _ => "old".to_owned(),
            };
            let vm = ObservedVm {
                name: name.clone(),
                uuid: format!("u{i}"),
                state,
                pid: state.has_process().then_some(100 + i as u32),
                power: if state == RunState::Stopped {
                    Power::Stopped
                } else {
                    Power::Running
                },
                revision: "r".into(),
                spec_hash: hash,
                spec,
                started_at: None,
                detail: None,
                paused: None,
                last_exit: (state == RunState::Exited).then_some(ExitRecord {
                    reason: ExitReason::Crash,
                    at_ms: NOW - 1,
                    pid: 1,
                    status: None,
                }),
                exits: (state == RunState::Exited)
                    .then_some(NOW - 1)
                    .into_iter()
                    .collect(),
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
            observed
                .hosts
                .get_mut(HOSTS[host])
                .expect("host")
                .vms
                .insert(name, vm);
        }
    }
    (d, observed)
}

/// The spec an instance of `name` runs: the desired one, or (`same` false) an older one
/// that differs in what needs no reboot (an equal spec under another hash is a changed
/// network definition, which does).
fn running_spec(d: &Desired, name: &str, same: bool) -> plasmavmc_specs::VmSpec {
    let mut spec = d.vms.get(name).map_or_else(
        || desired(&[("vms/x.toml", "")]).vms["x"].spec.clone(),
        |e| e.spec.clone(),
    );
    if !same {
        spec.priority = spec.priority.saturating_add(1);
    }
    spec
}

/// What the hosts would look like after every action of `plan` succeeded.
fn simulate(d: &Desired, observed: &Observed, plan: &Plan) -> Observed {
    let mut out = observed.clone();
    for action in &plan.actions {
        let inv = out
            .hosts
            .get_mut(action.host())
            .expect("plans only name reachable hosts");
        let want = d.vms.get(action.vm());
        match action {
            Action::Create { vm, .. } | Action::Recover { vm, .. } => {
                let want = want.expect("creates are for VMs in the specs");
                let o = ObservedVm {
                    name: vm.clone(),
                    uuid: format!("new-{vm}"),
                    state: RunState::Stopped,
                    pid: None,
                    power: Power::Stopped,
                    revision: "new".into(),
                    spec_hash: want.hash.clone(),
                    spec: want.spec.clone(),
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
                };
                inv.vms.insert(vm.clone(), o);
            }
            Action::Start { vm, .. }
            | Action::Restart { vm, .. }
            | Action::Update { vm, .. }
            | Action::Stop { vm, .. } => {
                let o = inv.vms.get_mut(vm).expect("acts on an existing instance");
                if let (Action::Restart { .. } | Action::Update { .. }, Some(w)) = (action, want) {
                    o.spec_hash.clone_from(&w.hash);
                    o.spec = w.spec.clone();
                    o.exits.clear();
                }
                match action {
                    Action::Start { .. } | Action::Restart { .. } => {
                        o.state = RunState::Running;
                        o.power = Power::Running;
                        o.pid = Some(1);
                        o.last_exit = None;
                    }
                    Action::Stop { .. } => {
                        o.state = RunState::Stopped;
                        o.power = Power::Stopped;
                        o.pid = None;
                    }
                    _ => {}
                }
            }
            Action::Delete { vm, .. } => {
                inv.vms.remove(vm);
            }
            Action::Prune { pid, .. } => inv.orphans.retain(|o| o.pid != *pid),
            Action::Migrate { vm, to, .. } => {
                let mut o = inv.vms.remove(vm).expect("moves an existing instance");
                let w = want.expect("moves are for VMs in the specs");
                o.spec_hash.clone_from(&w.hash);
                o.spec = w.spec.clone();
                if w.spec.power == Power::Running {
                    o.state = RunState::Running;
                    o.power = Power::Running;
                    o.pid = Some(1);
                } else {
                    o.state = RunState::Stopped;
                    o.power = Power::Stopped;
                    o.pid = None;
                }
                out.hosts
                    .get_mut(to)
                    .expect("moves go to reachable hosts")
                    .vms
                    .insert(vm.clone(), o);
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn planning_again_after_applying_finds_nothing(cases in proptest::collection::vec(case(), 0..8)) {
        let (d, observed) = world(&cases);
        let first = plan(&d, &observed, NOW);
        let after = simulate(&d, &observed, &first);
        let second = plan(&d, &after, NOW);
        // Restarts of VMs whose policy says no (never / on-failure + poweroff) stay
        // notes; whatever the first plan did, the second has nothing left to do.
        prop_assert!(second.actions.is_empty(), "first: {:?}\nsecond: {:?}", first.actions, second.actions);
    }

    #[test]
    fn a_plan_never_runs_one_vm_in_two_places(cases in proptest::collection::vec(case(), 0..8)) {
        let (d, observed) = world(&cases);
        let p = plan(&d, &observed, NOW);
        let mut placed: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for a in &p.actions {
            if matches!(a, Action::Create { .. } | Action::Recover { .. } | Action::Start { .. } | Action::Restart { .. }) {
                placed.entry(a.vm()).or_default().insert(a.host());
            }
        }
        for (vm, hosts) in &placed {
            prop_assert!(hosts.len() == 1, "{vm} placed on {hosts:?}");
            let host = hosts.iter().next().copied().unwrap_or_default();
            let elsewhere = observed.copies(vm).iter().any(|(h, o)| *h != host && o.state.has_process());
            prop_assert!(!elsewhere, "{vm} started on {host} while a copy runs elsewhere");
        }
        let after = simulate(&d, &observed, &p);
        for vm in d.vms.keys() {
            let running = after.copies(vm).iter().filter(|(_, o)| o.state.has_process()).count();
            prop_assert!(running <= 1, "{vm} runs {running} times after the plan");
        }
    }
}
