use super::*;
use crate::plan::MoveMode;

fn start(vm: &str, host: &str) -> Action {
    Action::Start {
        vm: vm.to_owned(),
        host: host.to_owned(),
        reason: String::new(),
    }
}

fn create(vm: &str, host: &str) -> Action {
    Action::Create {
        vm: vm.to_owned(),
        host: host.to_owned(),
        reason: String::new(),
    }
}

fn stop(vm: &str, host: &str) -> Action {
    Action::Stop {
        vm: vm.to_owned(),
        host: host.to_owned(),
        reason: String::new(),
    }
}

fn migrate(vm: &str, host: &str, to: &str) -> Action {
    Action::Migrate {
        vm: vm.to_owned(),
        host: host.to_owned(),
        to: to.to_owned(),
        mode: MoveMode::Live,
        reason: String::new(),
    }
}

fn limits(per_host: u32, migrations_per_host: u32, migrations: u32) -> ConcurrencySettings {
    ConcurrencySettings {
        per_host,
        migrations_per_host,
        migrations,
    }
}

/// Starts everything that may start; returns the actions as `op vm`.
fn drain(q: &mut Queue<()>) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    while let Some(next) = q.next() {
        match next {
            Next::Run(id, a, ()) => out.push((id, format!("{} {}", a.op(), a.vm()))),
            Next::Skip(id, a) => out.push((id, format!("skip {} {}", a.op(), a.vm()))),
        }
    }
    out
}

fn names(started: &[(u64, String)]) -> Vec<&str> {
    started.iter().map(|(_, s)| s.as_str()).collect()
}

#[test]
fn different_vms_run_at_once_and_one_vms_actions_in_order() {
    let mut q = Queue::new(ConcurrencySettings::default());
    q.push(create("a", "h1"), ());
    q.push(start("a", "h1"), ());
    q.push(start("b", "h1"), ());
    let first = drain(&mut q);
    assert_eq!(names(&first), ["create a", "start b"]);
    q.ended(first[0].0, true);
    assert_eq!(names(&drain(&mut q)), ["start a"]);
}

#[test]
fn a_failed_step_skips_the_vms_later_steps_only() {
    let mut q = Queue::new(ConcurrencySettings::default());
    let c = q.push(create("a", "h1"), ());
    q.push(start("a", "h1"), ());
    q.push(create("b", "h1"), ());
    drain(&mut q);
    q.ended(c, false);
    assert_eq!(names(&drain(&mut q)), ["skip start a"]);
    assert_eq!(q.vms().into_iter().collect::<Vec<_>>(), ["b"]);
}

#[test]
fn an_action_that_adds_load_waits_for_room_freed_on_its_host_only() {
    let mut q = Queue::new(ConcurrencySettings::default());
    let away = q.push(migrate("big", "h1", "h2"), ());
    q.push(stop("old", "h3"), ());
    q.push(create("new", "h1"), ());
    q.push(create("other", "h3"), ());
    q.push(start("crashed", "h1"), ());
    let first = drain(&mut q);
    // The new VM on h1 waits for the move away from h1; the restart of a VM already
    // placed on h1 does not; the create on h3 waits for the stop on h3.
    assert_eq!(names(&first), ["migrate big", "stop old", "start crashed"]);
    q.ended(away, true);
    assert_eq!(names(&drain(&mut q)), ["create new"]);
}

#[test]
fn moves_are_bounded_per_host_at_both_ends_and_in_all() {
    let mut q = Queue::new(limits(8, 1, 5));
    let m1 = q.push(migrate("a", "h1", "h2"), ());
    q.push(migrate("b", "h3", "h2"), ());
    q.push(migrate("c", "h3", "h4"), ());
    q.push(start("d", "h2"), ());
    let first = drain(&mut q);
    assert_eq!(names(&first), ["migrate a", "migrate c", "start d"]);
    q.ended(m1, true);
    assert!(drain(&mut q).is_empty(), "h3 still sends c");
    let mut q = Queue::new(limits(8, 2, 1));
    q.push(migrate("a", "h1", "h2"), ());
    q.push(migrate("b", "h3", "h4"), ());
    assert_eq!(names(&drain(&mut q)), ["migrate a"]);
}

#[test]
fn actions_per_host_are_bounded() {
    let mut q = Queue::new(limits(2, 2, 5));
    let a = q.push(start("a", "h1"), ());
    q.push(start("b", "h1"), ());
    q.push(start("c", "h1"), ());
    q.push(start("d", "h2"), ());
    assert_eq!(names(&drain(&mut q)), ["start a", "start b", "start d"]);
    q.ended(a, true);
    assert_eq!(names(&drain(&mut q)), ["start c"]);
}

#[test]
fn actions_queued_later_wait_for_those_already_queued() {
    let mut q = Queue::new(ConcurrencySettings::default());
    let m = q.push(migrate("a", "h1", "h2"), ());
    drain(&mut q);
    q.push(start("a", "h2"), ());
    q.push(create("n", "h1"), ());
    assert!(drain(&mut q).is_empty());
    q.ended(m, true);
    assert_eq!(names(&drain(&mut q)), ["start a", "create n"]);
    assert_eq!(q.vms().into_iter().collect::<Vec<_>>(), ["a", "n"]);
}
