//! Moving VMs between hosts, end to end: simulated hosts (each `hosts/<name>.toml` runs
//! the binary's own agent on a root of its own, optionally with one shared-storage
//! folder in one pool), real QEMU (TCG) and the tiny test guest, which prints `tick N`
//! every 0.2 s and counts its boots on its disk.
//!
//! What this file proves, one test each:
//! - live migration with the disk on shared storage, by changing `host` in a commit: the
//!   plan shows one `migrate` action (from, to, live); the guest's ticks continue on the
//!   target without starting again at 1; one QEMU afterwards, on the target, whose disk
//!   is the same shared file; status names the target;
//! - live migration with local disks (NBD mirror): what the guest wrote to its disk
//!   before the migration is on the target's disk (its boot counter, read back by a
//!   reboot there); the source's copy is gone;
//! - cold migration (`migration = "cold"`) between hosts without shared storage: the
//!   disk is copied through the agents, the guest boots on the target and finds its data;
//! - `migration = "none"`: a pin change is refused with the reason in the plan, nothing
//!   moves;
//! - drain: `state = "maintenance"` on a host with three VMs moves them all, live, to
//!   the other hosts, respecting anti-affinity; the host ends empty;
//! - the target QEMU killed mid-migration (while the status shows the migration's
//!   progress): the source keeps running the same QEMU, the apply fails saying why, the
//!   half-made target is removed, a later plan retries;
//! - the engine killed (kill -9) mid-migration and run again: exactly one copy runs,
//!   where the status says, and the new run says at which step the move was cut short;
//! - `plasmavmc watch` moves a VM live when a commit pins it elsewhere.
//! - postcopy as an escalation: a guest dirtying memory faster than a 2 MiB/s cap lets
//!   precopy converge switches to postcopy after `postcopy_after = "2s"`; the move
//!   completes, the guest goes on ticking on the target (one QEMU, there), and the move's
//!   figures and events say postcopy.
//!
//! Every test has its own repository, state dir and host roots in a temp folder; the
//! cleanup kills every process under it, even on failure.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use plasmavmc_e2e::proc::kill_and_wait;
use plasmavmc_e2e::{
    is_alive, ticks, wait_for, HostSpec, TestRepo, VmSpec, ACT_TIMEOUT, BOOT_TIMEOUT,
};
use serde_json::Value;

/// Memory of every test VM: the least the test guest boots with.
const VM_MB: u64 = 96;

/// Bound for one migration of a test guest (a second or two here): 10× and more.
const MOVE_TIMEOUT: Duration = Duration::from_secs(60);

/// `(op, vm, host, to, mode)` of every action of a `plan --json`.
fn actions(plan: &Value) -> Vec<[String; 5]> {
    let field = |a: &Value, k: &str| a[k].as_str().unwrap_or_default().to_owned();
    plan["actions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| ["op", "vm", "host", "to", "mode"].map(|k| field(a, k)))
        .collect()
}

/// A repository with hosts `names` (agents on their own roots), in one storage pool on
/// `<tmp>/shared` when `shared`.
fn hosts(names: &[&str], shared: bool) -> Result<TestRepo> {
    let repo = TestRepo::new()?;
    let pool = repo.root().join("shared");
    std::fs::create_dir_all(&pool)?;
    for name in names {
        let mut spec = HostSpec::agent().memory(2048);
        if shared {
            spec = spec.shared(&pool, "pool1");
        }
        repo.write_host(name, &spec)?;
    }
    Ok(repo)
}

/// Applies the current commit; fails unless it exits 0.
fn apply(repo: &TestRepo) -> Result<String> {
    let out = repo.run(&["apply", "--auto-approve"])?;
    out.expect_code(0)?;
    Ok(out.all())
}

/// Commits `vm` pinned to `to` and checks the plan has exactly one move of it.
fn repin(repo: &TestRepo, spec: &VmSpec, vm: &str, from: &str, to: &str, mode: &str) -> Result<()> {
    repo.write_vm(vm, &spec.clone().pin(to))?;
    repo.commit(&format!("move {vm} to {to}"))?;
    let plan = repo.plan_json(&[])?;
    ensure!(
        actions(&plan) == [["migrate", vm, from, to, mode].map(str::to_owned)],
        "expected one {mode} move of {vm} from {from} to {to}:\n{plan:#}"
    );
    Ok(())
}

#[test]
fn live_migration_with_a_shared_disk_keeps_the_guest_running() -> Result<()> {
    let repo = hosts(&["hv1", "hv2"], true)?;
    let spec = VmSpec::new().memory(VM_MB);
    repo.write_vm("web", &spec.clone().pin("hv1"))?;
    repo.commit("web on hv1")?;
    apply(&repo)?;
    let before = repo.qemu_on("hv1", "web")?;
    let seen = repo.ticking_on("hv1", "web", 5)?;
    let disk = repo.root().join("shared/web/data.qcow2");
    ensure!(
        disk.exists(),
        "web's disk is not on shared storage at {}",
        disk.display()
    );

    repin(&repo, &spec, "web", "hv1", "hv2", "live")?;
    let out = apply(&repo)?;
    println!("{out}");
    let after = repo.only_on("hv2", "web")?;
    ensure!(after != before, "the same pid {before} runs on hv2?");
    // The guest went on: the target's console starts where the source's left off.
    repo.ticking_on("hv2", "web", seen)?;
    let there = ticks(&repo.serial_on("hv2", "web"));
    ensure!(
        there.first().is_some_and(|t| *t > seen) && !repo.serial_on("hv2", "web").contains("booted"),
        "web rebooted on hv2 instead of continuing (ticks {there:?}, last seen on hv1 {seen})\n{out}"
    );
    let args = plasmavmc_e2e::cmdline(after)?.join(" ");
    ensure!(
        args.contains(&disk.display().to_string()),
        "hv2's QEMU does not use the shared disk {}: {args}",
        disk.display()
    );
    let view = repo.vm_view("web")?.context("no status")?;
    ensure!(
        view.events.iter().any(|e| e.message.contains("downtime")),
        "web's events do not record the migration's figures:\n{view}"
    );
    Ok(())
}

/// Reboots `vm` where it runs (a memory change restarts it, disks kept) and waits for the
/// guest to report its boot counter on that disk.
fn reboot_and_count(repo: &TestRepo, spec: &VmSpec, vm: &str, host: &str) -> Result<()> {
    repo.write_vm(vm, &spec.clone().pin(host).memory(VM_MB + 32))?;
    repo.commit(&format!("reboot {vm}"))?;
    apply(repo)?;
    wait_for(
        format!("{vm} to boot again on {host} and count boot 2"),
        BOOT_TIMEOUT,
        || repo.serial_on(host, vm).contains("disk: boots=2"),
    )
    .with_context(|| repo.serial_on(host, vm))
}

#[test]
fn live_migration_with_local_disks_carries_what_the_guest_wrote() -> Result<()> {
    let repo = hosts(&["hv1", "hv2"], false)?;
    let spec = VmSpec::new().memory(VM_MB);
    repo.write_vm("web", &spec.clone().pin("hv1"))?;
    repo.commit("web on hv1")?;
    apply(&repo)?;
    let seen = repo.ticking_on("hv1", "web", 10)?;
    ensure!(
        repo.serial_on("hv1", "web").contains("disk: boots=1"),
        "the guest did not write its boot counter on hv1"
    );

    repin(&repo, &spec, "web", "hv1", "hv2", "live")?;
    let out = apply(&repo)?;
    println!("{out}");
    repo.only_on("hv2", "web")?;
    repo.ticking_on("hv2", "web", seen)?;
    let there = ticks(&repo.serial_on("hv2", "web"));
    ensure!(
        there.first().is_some_and(|t| *t > seen),
        "web did not continue on hv2 (ticks {there:?}, last seen on hv1 {seen})\n{out}"
    );
    ensure!(
        out.contains("MiB disk"),
        "the move does not say its disk was mirrored:\n{out}"
    );
    ensure!(
        !repo.instance_dir_on("hv1", "web").exists(),
        "hv1 still has web's instance (and its stale disk)"
    );
    // The disk on hv2 holds what the guest wrote on hv1: its boot counter.
    reboot_and_count(&repo, &spec, "web", "hv2")
}

#[test]
fn cold_migration_copies_the_disk_and_boots_on_the_target() -> Result<()> {
    let repo = hosts(&["hv1", "hv2"], false)?;
    let spec = VmSpec::new().memory(VM_MB).migration("cold");
    repo.write_vm("db", &spec.clone().pin("hv1"))?;
    repo.commit("db on hv1")?;
    apply(&repo)?;
    repo.ticking_on("hv1", "db", 5)?;

    repin(&repo, &spec, "db", "hv1", "hv2", "cold")?;
    let out = apply(&repo)?;
    println!("{out}");
    repo.only_on("hv2", "db")?;
    wait_for("db to boot on hv2 and find its disk", BOOT_TIMEOUT, || {
        repo.serial_on("hv2", "db").contains("disk: boots=2")
    })
    .with_context(|| repo.serial_on("hv2", "db"))?;
    ensure!(
        !repo.instance_dir_on("hv1", "db").exists(),
        "hv1 still has db's instance after the move"
    );
    Ok(())
}

#[test]
fn migration_none_refuses_to_move_and_says_why() -> Result<()> {
    let repo = hosts(&["hv1", "hv2"], true)?;
    let spec = VmSpec::new().no_disks().memory(VM_MB).migration("none");
    repo.write_vm("pet", &spec.clone().pin("hv1"))?;
    repo.commit("pet on hv1")?;
    apply(&repo)?;
    let pid = repo.qemu_on("hv1", "pet")?;
    repo.write_vm("pet", &spec.clone().pin("hv2"))?;
    repo.commit("pin pet to hv2")?;
    let plan = repo.plan_json(&[])?;
    ensure!(
        !actions(&plan).iter().any(|a| a[0] == "migrate"),
        "a VM with migration = none was moved:\n{plan:#}"
    );
    let notes: Vec<&str> = plan["notes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        notes
            .iter()
            .any(|n| n.starts_with("pet: must move (pinned to hv2")
                && n.contains(r#"migration = "none""#)),
        "the plan does not say why pet stays:\n{plan:#}"
    );
    let _ = repo.run(&["apply", "--auto-approve"])?;
    ensure!(
        repo.qemus_of("pet") == [pid] && is_alive(pid),
        "pet's QEMU changed: {:?}, was {pid}",
        repo.qemus_of("pet")
    );
    Ok(())
}

#[test]
fn maintenance_drains_a_host_live_keeping_anti_affinity() -> Result<()> {
    let repo = hosts(&["hv1", "hv2", "hv3"], false)?;
    let vm = |group: Option<&str>| {
        let spec = VmSpec::new().no_disks().memory(VM_MB);
        match group {
            Some(g) => spec.group(g),
            None => spec,
        }
    };
    let layout = [
        ("a1", Some("a"), "hv1"),
        ("b1", Some("b"), "hv1"),
        ("c1", None, "hv1"),
        ("a2", Some("a"), "hv2"),
        ("b2", Some("b"), "hv3"),
    ];
    for (name, group, host) in layout {
        repo.write_vm(name, &vm(group).pin(host))?;
    }
    repo.commit("three VMs on hv1")?;
    apply(&repo)?;
    let mut seen = Vec::new();
    for (name, _, host) in layout {
        seen.push(repo.ticking_on(host, name, 3)?);
    }

    // One commit: hv1 in maintenance, its VMs no longer pinned.
    repo.write_host("hv1", &HostSpec::agent().memory(2048).maintenance())?;
    for (name, group, _) in &layout[..3] {
        repo.write_vm(name, &vm(*group))?;
    }
    repo.commit("drain hv1")?;
    let plan = repo.plan_json(&[])?;
    let moves = actions(&plan);
    ensure!(
        moves.len() == 3
            && moves
                .iter()
                .all(|a| a[0] == "migrate" && a[2] == "hv1" && a[4] == "live"),
        "expected three live moves off hv1:\n{plan:#}"
    );
    let out = apply(&repo)?;
    println!("{out}");
    ensure!(
        repo.host_qemus("hv1").is_empty(),
        "hv1 still runs QEMUs {:?}",
        repo.host_qemus("hv1")
    );
    // Anti-affinity: a1 avoids hv2 (a2), b1 avoids hv3 (b2).
    for (name, host) in [("a1", "hv3"), ("b1", "hv2")] {
        repo.only_on(host, name)?;
    }
    let c1 = repo.hosts_with_instance("c1");
    ensure!(c1 == ["hv2"] || c1 == ["hv3"], "c1 is on {c1:?}");
    repo.only_on(&c1[0], "c1")?;
    for ((name, _, _), before) in layout[..3].iter().zip(&seen) {
        let host = repo.hosts_with_instance(name).remove(0);
        repo.ticking_on(&host, name, *before)?;
        let first = ticks(&repo.serial_on(&host, name)).first().copied();
        ensure!(
            first.is_some_and(|t| t > 1),
            "{name} restarted on {host} instead of moving live (first tick {first:?}, had {before})"
        );
    }
    let hv1 = repo.host_view("hv1")?.context("no status for hv1")?;
    let message = hv1
        .raw
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or_default();
    ensure!(
        hv1.phase == "maintenance" && hv1.vms.is_empty() && message == "drained: no VM left",
        "hv1's status after the drain: {hv1:?}"
    );
    Ok(())
}

/// A repository whose migrations crawl (1 MiB/s), with `web` (shared disk) running on
/// hv1 and a commit moving it to hv2; returns the repo and hv1's QEMU pid.
fn slow_move() -> Result<(TestRepo, VmSpec, i32)> {
    let repo = hosts(&["hv1", "hv2"], true)?;
    repo.set_cluster_settings("[migration]\nmax_bandwidth_mib = 1\n")?;
    let spec = VmSpec::new().memory(VM_MB);
    repo.write_vm("web", &spec.clone().pin("hv1"))?;
    repo.commit("web on hv1")?;
    apply(&repo)?;
    repo.ticking_on("hv1", "web", 5)?;
    let pid = repo.qemu_on("hv1", "web")?;
    repin(&repo, &spec, "web", "hv1", "hv2", "live")?;
    Ok((repo, spec, pid))
}

/// Waits until hv2 runs the incoming QEMU of `web` and the status shows memory on its
/// way (the source reports progress about once a second); returns the target's pid.
fn target_receiving(repo: &TestRepo) -> Result<i32> {
    let mut target = 0;
    wait_for("the migration target's QEMU on hv2", ACT_TIMEOUT, || {
        target = repo.host_qemus("hv2").first().copied().unwrap_or(0);
        target != 0
    })?;
    repo.wait_vm("web", "migrating, with its progress", MOVE_TIMEOUT, |v| {
        v.phase == "migrating" && v.message.contains("MiB sent") && v.message.contains("to hv2")
    })?;
    Ok(target)
}

#[test]
fn target_killed_mid_migration_leaves_the_source_running() -> Result<()> {
    let (repo, _spec, source) = slow_move()?;
    let engine = repo.spawn(&["apply", "--auto-approve"])?;
    // While it runs, the status shows how far it got.
    let target = target_receiving(&repo)?;
    kill_and_wait(target, ACT_TIMEOUT)?;
    let out = engine.finish(MOVE_TIMEOUT)?;
    ensure!(
        out.code != Some(0) && out.all().contains("migrate web"),
        "apply should fail naming the migration:\n{}",
        out.all()
    );
    println!("{}", out.all());
    ensure!(
        is_alive(source) && repo.qemus_of("web") == [source],
        "web's QEMUs are {:?}; the source {source} should run alone",
        repo.qemus_of("web")
    );
    let seen = ticks(&repo.serial_on("hv1", "web"))
        .last()
        .copied()
        .unwrap_or(0);
    repo.ticking_on("hv1", "web", seen)?;
    ensure!(
        !repo.instance_dir_on("hv2", "web").exists(),
        "the half-made target on hv2 was not removed"
    );
    let view = repo.vm_view("web")?.context("no status")?;
    ensure!(
        view.host == "hv1" && view.phase == "running" && view.message.contains("migrat"),
        "web's status should say it runs on hv1 and why it did not move:\n{view}"
    );
    // A later plan tries again.
    let plan = repo.plan_json(&[])?;
    ensure!(
        actions(&plan) == [["migrate", "web", "hv1", "hv2", "live"].map(str::to_owned)],
        "the next plan does not retry the move:\n{plan:#}"
    );
    Ok(())
}

#[test]
fn engine_killed_mid_migration_ends_with_one_copy() -> Result<()> {
    let (repo, _spec, source) = slow_move()?;
    let engine = repo.spawn(&["apply", "--auto-approve"])?;
    let target = target_receiving(&repo)?;
    // The target's memory also grows while QEMU starts: kill once the engine journaled
    // that the migration is under way.
    repo.wait_vm("web", "migrating, with its progress", MOVE_TIMEOUT, |v| {
        v.phase == "migrating" && v.message.contains("MiB sent")
    })?;
    kill_and_wait(engine.pid(), ACT_TIMEOUT)?;
    drop(engine);
    // The QEMUs outlive the engine; only the source runs the guest.
    ensure!(
        is_alive(source) && is_alive(target),
        "a QEMU died with the engine"
    );
    // Its agents see their channel close and exit; one that has not yet still holds its
    // host (the next apply would find the host unreachable and, rightly, leave it be).
    plasmavmc_e2e::wait::wait_for("the dead engine's agents to exit", ACT_TIMEOUT, || {
        repo.host_agents("hv1").is_empty() && repo.host_agents("hv2").is_empty()
    })?;

    repo.set_cluster_settings("")?;
    repo.commit("full speed")?;
    let out = apply(&repo)?;
    println!("{out}");
    ensure!(
        out.contains("was interrupted") && out.contains("last step: web: migrating live to hv2"),
        "the next apply does not say where the migration was cut short:\n{out}"
    );
    let pid = repo.only_on("hv2", "web")?;
    repo.ticking_on("hv2", "web", 1)?;
    let first = ticks(&repo.serial_on("hv2", "web")).first().copied();
    ensure!(
        first.is_some_and(|t| t > 1),
        "web rebooted instead of moving (first tick on hv2 {first:?})\n{out}"
    );
    ensure!(
        !is_alive(source),
        "the source QEMU {source} still runs beside {pid}"
    );
    Ok(())
}

#[test]
fn watch_moves_a_vm_live_when_a_commit_pins_it_elsewhere() -> Result<()> {
    let repo = hosts(&["hv1", "hv2"], true)?;
    let spec = VmSpec::new().no_disks().memory(VM_MB);
    repo.write_vm("web", &spec.clone().pin("hv1"))?;
    repo.commit("web on hv1")?;
    let daemon = repo.watch(&[])?;
    daemon.wait_running_on("web", "hv1")?;
    let seen = repo.ticking_on("hv1", "web", 3)?;

    repo.write_vm("web", &spec.clone().pin("hv2"))?;
    repo.commit("move web to hv2")?;
    // (Not `wait_running_on`: a guest that moved live never prints `tick 3` again.)
    daemon.wait("web moved to hv2, hv1's copy removed", MOVE_TIMEOUT, || {
        repo.hosts_with_instance("web") == ["hv2"]
    })?;
    let view = repo.wait_vm("web", "running on hv2", MOVE_TIMEOUT, |v| {
        v.phase == "running" && v.host == "hv2"
    })?;
    let pid = view.pid.context("no pid in web's status")?;
    ensure!(
        repo.qemus_of("web") == [pid],
        "web's QEMUs are {:?}, expected only {pid}",
        repo.qemus_of("web")
    );
    // The source's end, removed by the engine, is no exit to report or react to.
    daemon.resync(ACT_TIMEOUT)?;
    let unexpected = daemon
        .lines()
        .into_iter()
        .find(|l| l.is("vm exited", Some("web")) && l.field("expected") == Some(&false.into()));
    ensure!(
        unexpected.is_none(),
        "the discarded source's exit was taken for a crash: {unexpected:?}\n{}",
        daemon.describe()
    );
    let view = repo.vm_view("web")?.context("web's status")?;
    ensure!(
        view.events.iter().all(|e| e.kind != "exited"),
        "web's status reports an exit after the move: {:?}",
        view.events
    );
    repo.ticking_on("hv2", "web", seen)?;
    let first = ticks(&repo.serial_on("hv2", "web")).first().copied();
    ensure!(
        first.is_some_and(|t| t > 1),
        "web rebooted on hv2 (first tick {first:?})\n{}",
        daemon.describe()
    );
    Ok(())
}

#[test]
fn a_move_that_does_not_converge_escalates_to_postcopy() -> Result<()> {
    let repo = hosts(&["hv1", "hv2"], true)?;
    // 2 MiB/s and no throttling: a guest rewriting 8 MiB over and over never converges.
    repo.set_cluster_settings(
        "[migration]\nmax_bandwidth_mib = 2\nauto_converge = false\npostcopy_after = \"2s\"\n",
    )?;
    let spec = VmSpec::new()
        .no_disks()
        .memory(128)
        .cmdline("plasmavmc.dirty=8");
    repo.write_vm("busy", &spec.clone().pin("hv1"))?;
    repo.commit("busy on hv1")?;
    apply(&repo)?;
    wait_for("busy to dirty its memory", BOOT_TIMEOUT, || {
        repo.serial_on("hv1", "busy").contains("dirtying 8 MiB")
    })
    .with_context(|| repo.serial_on("hv1", "busy"))?;
    let seen = repo.ticking_on("hv1", "busy", 5)?;

    repin(&repo, &spec, "busy", "hv1", "hv2", "live")?;
    let started = std::time::Instant::now();
    let out = apply(&repo)?;
    println!("{out}");
    ensure!(
        started.elapsed() < MOVE_TIMEOUT,
        "the move took {:?}",
        started.elapsed()
    );
    ensure!(
        out.contains("switched to postcopy") && out.contains("postcopy after"),
        "the move does not say it switched to postcopy:\n{out}"
    );
    let pid = repo.only_on("hv2", "busy")?;
    ensure!(
        repo.qemus_of("busy") == [pid],
        "more than one QEMU of busy: {:?}",
        repo.qemus_of("busy")
    );
    // The guest went on from where it was, and goes on ticking there.
    let there = repo.ticking_on("hv2", "busy", seen + 10)?;
    let ticks_there = ticks(&repo.serial_on("hv2", "busy"));
    ensure!(
        ticks_there.first().is_some_and(|t| *t > seen)
            && !repo.serial_on("hv2", "busy").contains("booted"),
        "busy rebooted on hv2 (ticks {ticks_there:?}, last seen on hv1 {seen}, now {there})"
    );
    ensure!(
        !repo.instance_dir_on("hv1", "busy").exists(),
        "hv1 still has busy's instance after the move"
    );
    let view = repo.vm_view("busy")?.context("no status")?;
    ensure!(
        view.events
            .iter()
            .any(|e| e.message.contains("postcopy after")),
        "busy's events do not say the move switched to postcopy:\n{view}"
    );
    Ok(())
}
