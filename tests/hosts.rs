//! Many hosts and placement, end to end: simulated hosts (each `hosts/<name>.toml`
//! runs the binary's own agent, `exec = [bin, "agent", "--stdio", "--root", R]`, on a
//! root of its own), real QEMU (TCG) and the tiny test guest.
//!
//! What this file proves, one test each:
//! - VMs of one anti-affinity `group` are spread one per host even where memory alone
//!   would stack them; each runs in its own host's root, which received the kernel
//!   and initrd as `files/<sha256>`; the status names the host; the agents exit with
//!   the engine; a second plan has nothing to do;
//! - a VM that fits nowhere is not created, and the plan's note says why for each
//!   host (too little memory, unreachable, in maintenance), while a pinned VM of the
//!   same commit is created on its host;
//! - memory is never overcommitted, and placement is sticky: VMs never move when a
//!   new commit would place them elsewhere;
//! - a second engine cannot take an agent root another engine holds: the host is
//!   reported refused, naming the holder, and the first engine's VMs are untouched.
//! - a host port forwarded to a guest has one VM per host: a second VM forwarding it
//!   is not placed there, and the note names the port and the VM that has it.
//!
//! Every test has its own repository, state dir and host roots in a temp folder; the
//! repository's cleanup kills every QEMU and agent under it, even on failure.

use anyhow::{ensure, Context, Result};
use plasmavmc_e2e::artifacts::sha256_file;
use plasmavmc_e2e::proc::qemus_under;
use plasmavmc_e2e::{is_alive, HostSpec, TestRepo, VmSpec, ACT_TIMEOUT, BOOT_TIMEOUT};
use serde_json::Value;

/// Memory of every test VM: the least the test guest boots with (64 MB does not).
const VM_MB: u64 = 96;

/// A VM spec that boots the guest with [`VM_MB`] and no disk.
fn small() -> VmSpec {
    VmSpec::new().no_disks().memory(VM_MB)
}

/// `(op, vm, host)` of every action of a `plan --json`.
fn actions(plan: &Value) -> Vec<(String, String, String)> {
    let field = |a: &Value, k: &str| a[k].as_str().unwrap_or_default().to_owned();
    plan["actions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| (field(a, "op"), field(a, "vm"), field(a, "host")))
        .collect()
}

/// The `notes` of a `plan --json`.
fn notes(plan: &Value) -> Vec<String> {
    plan["notes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect()
}

/// The one note about `vm` (the planner starts each with `<vm>: `).
fn note_for(plan: &Value, vm: &str) -> Result<String> {
    let prefix = format!("{vm}: ");
    let found: Vec<String> = notes(plan)
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    ensure!(
        found.len() == 1,
        "expected one note about {vm}, got {found:?}\n{plan:#}"
    );
    Ok(found[0].clone())
}

/// Fails unless `vm` has an instance on `host` only, and its `qemu.pid` there names a
/// live QEMU running in that host's root. Returns the pid.
fn running_on(repo: &TestRepo, vm: &str, host: &str) -> Result<i32> {
    let hosts = repo.hosts_with_instance(vm);
    ensure!(
        hosts == [host],
        "{vm} has instances on {hosts:?}, expected only on {host}"
    );
    repo.qemu_on(host, vm)
}

/// Fails unless `root/files/` holds the guest's kernel and initrd under their SHA-256.
fn has_guest_files(repo: &TestRepo, host: &str) -> Result<()> {
    let files = repo.host_root(host).join("files");
    for file in [&repo.guest().kernel, &repo.guest().initrd] {
        let copy = files.join(sha256_file(file)?);
        ensure!(
            copy.is_file() && copy.metadata()?.len() == file.metadata()?.len(),
            "{host} has no complete copy of {} at {}",
            file.display(),
            copy.display()
        );
    }
    Ok(())
}

// ---- tests ----------------------------------------------------------------------

#[test]
fn vms_spread_over_exec_hosts_by_group() -> Result<()> {
    let repo = TestRepo::new()?;
    // Unequal memory: by free memory alone, all three would land on hv1 (1024 - 2×96
    // still beats 512); only the group rule spreads them.
    for (host, mb) in [("hv1", 1024), ("hv2", 512), ("hv3", 384)] {
        repo.write_host(host, &HostSpec::agent().memory(mb))?;
    }
    let placed = [("web-1", "hv1"), ("web-2", "hv2"), ("web-3", "hv3")];
    for (vm, _) in placed {
        repo.write_vm(vm, &small().group("web"))?;
    }
    repo.commit("three web VMs on three hosts")?;

    let plan = repo.plan_json(&[])?;
    let creates: Vec<_> = actions(&plan)
        .into_iter()
        .filter(|(op, _, _)| op == "create")
        .map(|(_, vm, host)| (vm, host))
        .collect();
    let expected: Vec<_> = placed
        .iter()
        .map(|&(vm, host)| (vm.to_owned(), host.to_owned()))
        .collect();
    ensure!(
        creates == expected,
        "planned creates {creates:?}, expected {expected:?}\n{plan:#}"
    );
    ensure!(
        plan["actions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["op"] == "create")
            .all(|a| a["reason"]
                .as_str()
                .is_some_and(|r| r.contains("0 other VMs of group web there"))),
        "the create reasons do not give the group rule\n{plan:#}"
    );
    repo.wait_agents_exit("plan")?;

    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    repo.wait_agents_exit("apply")?;
    for (vm, host) in placed {
        let pid = running_on(&repo, vm, host)?;
        let root = repo.host_root(host);
        ensure!(
            qemus_under(&root) == [pid],
            "{host}'s root runs QEMUs {:?}, expected only {vm}'s {pid}",
            qemus_under(&root)
        );
        has_guest_files(&repo, host)?;
        let view = repo
            .vm_view(vm)?
            .with_context(|| format!("no status for {vm}"))?;
        ensure!(
            view.host == host && view.phase == "running" && view.pid == Some(pid),
            "status of {vm}: expected running on {host} with pid {pid}:\n{view}"
        );
        let hv = repo
            .host_view(host)?
            .with_context(|| format!("no status/hosts/{host}.toml"))?;
        ensure!(
            hv.vms == [vm]
                && hv.allocated.memory_mb == i64::try_from(VM_MB)?
                && hv.allocated.vcpus == 1,
            "status of host {host}: expected {vm} alone, {VM_MB} MB and 1 vCPU allocated:\n{hv}"
        );
    }
    for (vm, _) in placed {
        repo.wait_serial(vm, "tick 3", BOOT_TIMEOUT)?;
    }

    repo.run(&["plan", "--detailed-exitcode"])?
        .expect_code(0)
        .context("a second plan should have nothing to do")?;
    repo.wait_agents_exit("the second plan")?;
    for (vm, host) in placed {
        running_on(&repo, vm, host)?;
    }
    Ok(())
}

#[test]
fn placement_explains_what_is_missing() -> Result<()> {
    let repo = TestRepo::new()?;
    repo.write_host("hv1", &HostSpec::agent().memory(256))?;
    repo.write_host("hv2", &HostSpec::exec(&["/bin/false"]).memory(4096))?;
    repo.write_host("hv3", &HostSpec::agent().memory(4096).maintenance())?;
    // "big" sorts before "pinned": the note sees hv1 before the pinned VM took its share.
    repo.write_vm("big", &small().memory(512))?;
    repo.write_vm("pinned", &small().pin("hv1"))?;
    repo.commit("one VM too big for the hosts, one pinned")?;

    let out = repo.run(&["plan", "--json"])?;
    out.expect_code(0)?;
    ensure!(
        out.stderr.contains("warning: host hv2 is unreachable"),
        "plan does not warn that hv2 is unreachable\n{out}"
    );
    let plan: Value = serde_json::from_str(&out.stdout).context("plan --json")?;
    let note = note_for(&plan, "big")?;
    for part in [
        "big: cannot be placed",
        "needs 512 MB",
        "hv1 has 256 MB free",
        "hv2 unreachable",
        "hv3 in maintenance",
    ] {
        ensure!(note.contains(part), "the note lacks {part:?}: {note}");
    }
    let planned = actions(&plan);
    ensure!(
        planned
            .iter()
            .all(|(_, vm, host)| vm == "pinned" && host == "hv1")
            && planned.iter().any(|(op, _, _)| op == "create"),
        "expected actions for pinned on hv1 only, got {planned:?}\n{plan:#}"
    );
    repo.run(&["plan", "--detailed-exitcode"])?
        .expect_code(2)
        .context("the pinned VM is a change")?;

    // The pinned VM is applied; the commit as a whole is not (big has nowhere to go):
    // apply says so and exits 1, and engine.toml keeps the reason.
    let apply = repo.run(&["apply", "--auto-approve"])?;
    apply.expect_code(1)?;
    ensure!(
        apply.stderr.contains("is not fully applied") && apply.all().contains("cannot be placed"),
        "apply does not say that big cannot be placed\n{apply}"
    );
    let pid = running_on(&repo, "pinned", "hv1").with_context(|| apply.to_string())?;
    ensure!(
        repo.hosts_with_instance("big").is_empty() && repo.qemus_of("big").is_empty(),
        "big was created: instances on {:?}, QEMUs {:?}\n{apply}",
        repo.hosts_with_instance("big"),
        repo.qemus_of("big")
    );
    ensure!(
        qemus_under(&repo.host_root("hv3")).is_empty(),
        "a host in maintenance runs QEMUs {:?}",
        qemus_under(&repo.host_root("hv3"))
    );
    repo.wait_agents_exit("apply")?;

    // A fresh `status` says why big is not running, as apply did.
    let status = repo.run(&["status", "--json"])?;
    status.expect_code(0)?;
    let snap: Value = serde_json::from_str(&status.stdout).context("status --json")?;
    let message = snap["vms"]
        .as_array()
        .and_then(|vms| vms.iter().find(|v| v["name"] == "big"))
        .and_then(|v| v["message"].as_str())
        .unwrap_or_default();
    ensure!(
        message.contains("cannot be placed") && message.contains("needs 512 MB"),
        "status does not say why big is not running: {message:?}\n{status}"
    );
    repo.wait_agents_exit("status")?;

    // The note now counts what the pinned VM takes on hv1.
    let plan = repo.plan_json(&[])?;
    let note = note_for(&plan, "big")?;
    let free = 256 - VM_MB;
    ensure!(
        note.contains(&format!("hv1 has {free} MB free")),
        "after the pinned VM started, the note should say hv1 has {free} MB free: {note}"
    );
    ensure!(
        actions(&plan).is_empty(),
        "nothing else to do, got {:?}",
        actions(&plan)
    );
    ensure!(is_alive(pid), "the pinned VM's QEMU {pid} died");
    repo.wait_serial("pinned", "tick 3", BOOT_TIMEOUT)?;
    Ok(())
}

#[test]
fn placement_is_sticky_and_memory_is_not_overcommitted() -> Result<()> {
    let repo = TestRepo::new()?;
    for host in ["hv1", "hv2"] {
        repo.write_host(host, &HostSpec::agent().memory(200))?;
    }
    repo.write_vm("a", &small())?;
    repo.write_vm("b", &small())?;
    repo.commit("a and b")?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    // a takes hv1 (a tie broken by name), then b the host with the most free memory.
    let pa = running_on(&repo, "a", "hv1")?;
    let pb = running_on(&repo, "b", "hv2")?;

    // Both hosts have 104 MB free: c fits on either, exactly once.
    repo.write_vm("c", &small())?;
    repo.commit("c")?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    let c_hosts = repo.hosts_with_instance("c");
    ensure!(c_hosts.len() == 1, "c has instances on {c_hosts:?}");
    let c_host = c_hosts[0].clone();
    let pc = running_on(&repo, "c", &c_host)?;
    ensure!(
        running_on(&repo, "a", "hv1")? == pa && running_on(&repo, "b", "hv2")? == pb,
        "adding c moved or restarted a or b"
    );

    // d needs 150 MB: no host has that much left.
    let free = |host: &str| if host == c_host { 8 } else { 104 };
    repo.write_vm("d", &small().memory(150))?;
    repo.commit("d, too big for what is left")?;
    let plan = repo.plan_json(&[])?;
    let note = note_for(&plan, "d")?;
    for part in [
        "d: cannot be placed".to_owned(),
        "needs 150 MB".to_owned(),
        format!("hv1 has {} MB free", free("hv1")),
        format!("hv2 has {} MB free", free("hv2")),
    ] {
        ensure!(note.contains(&part), "the note lacks {part:?}: {note}");
    }
    ensure!(
        actions(&plan).is_empty(),
        "d cannot be placed and nothing else changed, got {:?}",
        actions(&plan)
    );
    repo.run(&["apply", "--auto-approve"])?.expect_code(1)?; // d cannot be placed: not fully applied
    ensure!(
        repo.hosts_with_instance("d").is_empty() && repo.qemus_of("d").is_empty(),
        "d was created although it fits nowhere"
    );
    for (host, capacity) in [("hv1", 200), ("hv2", 200)] {
        let used: u64 = ["a", "b", "c"]
            .iter()
            .filter(|vm| repo.hosts_with_instance(vm) == [host])
            .map(|_| VM_MB)
            .sum();
        ensure!(
            used <= capacity,
            "{host} holds {used} MB of VMs, over its {capacity} MB"
        );
    }
    ensure!(
        running_on(&repo, "a", "hv1")? == pa
            && running_on(&repo, "b", "hv2")? == pb
            && running_on(&repo, "c", &c_host)? == pc,
        "a, b or c moved or restarted"
    );

    // hv2 grows: placed afresh, a would now go there; placement is sticky, so only
    // d (which has no instance yet) is placed, on hv2.
    repo.write_host("hv2", &HostSpec::agent().memory(2000))?;
    repo.commit("hv2 grows")?;
    let plan = repo.plan_json(&[])?;
    let planned = actions(&plan);
    ensure!(
        planned
            == [
                ("create".to_owned(), "d".to_owned(), "hv2".to_owned()),
                ("start".to_owned(), "d".to_owned(), "hv2".to_owned()),
            ],
        "expected only d created and started on hv2, got {planned:?}\n{plan:#}"
    );
    ensure!(
        notes(&plan).is_empty(),
        "unexpected notes: {:?}",
        notes(&plan)
    );
    ensure!(
        running_on(&repo, "a", "hv1")? == pa
            && running_on(&repo, "b", "hv2")? == pb
            && running_on(&repo, "c", &c_host)? == pc,
        "planning moved a VM"
    );
    repo.wait_agents_exit("the last plan")?;
    Ok(())
}

#[test]
fn a_second_engine_cannot_take_an_agent_root() -> Result<()> {
    let first = TestRepo::new()?;
    first.write_host("hv1", &HostSpec::agent())?;
    first.write_vm("web", &small())?;
    first.commit("web on hv1")?;
    let daemon = first.watch(&[])?;
    let pid = daemon.wait_running("web")?;
    let root = first.host_root("hv1");
    let agent = daemon.poll("the watch's agent of hv1", ACT_TIMEOUT, || {
        first.agent_pids().first().copied()
    })?;

    // A second repository whose hv1 is the same root; its own VM would go there.
    let second = TestRepo::new()?;
    second.write_host("hv1", &HostSpec::agent().root(&root))?;
    second.write_vm("other", &small())?;
    second.commit("other on the same hv1 root")?;

    let plan = second.run(&["plan"])?;
    let refusal = plan
        .stderr
        .lines()
        .find(|l| l.contains("host hv1 is unreachable"))
        .with_context(|| format!("the second plan does not report hv1 unreachable\n{plan}"))?
        .to_owned();
    // The holder is the first engine's agent, which names its engine.
    ensure!(
        refusal.contains("in use by")
            && refusal.contains("plasmavmc agent")
            && refusal.contains(&format!("pid {agent}"))
            && refusal.contains(&format!("pid {}", daemon.pid())),
        "the refusal does not name the holder (agent pid {agent} of the engine pid {}): \
         {refusal}\n{plan}",
        daemon.pid()
    );
    ensure!(
        !plan.stdout.contains("web"),
        "the second engine planned something about the first engine's VM\n{plan}"
    );
    let json = second.plan_json(&[])?;
    ensure!(
        actions(&json).is_empty() && note_for(&json, "other")?.contains("hv1 unreachable"),
        "the second engine should plan nothing and say why\n{json:#}"
    );
    let apply = second.run(&["apply", "--auto-approve"])?;
    ensure!(
        apply.code == Some(0) || apply.code == Some(1),
        "apply on the second repository: unexpected exit\n{apply}"
    );

    // The first engine's VM and agent are untouched.
    ensure!(
        !root.join("vms").join("other").exists(),
        "the second engine created `other` in the first engine's root\n{apply}"
    );
    ensure!(
        qemus_under(&root) == [pid] && first.qemu_pid("web")? == pid,
        "the first engine's VM was touched: QEMUs {:?}\n{apply}",
        qemus_under(&root)
    );
    ensure!(
        daemon.is_running() && is_alive(agent),
        "the first engine or its agent died\n{}",
        daemon.describe()
    );
    daemon.resync(ACT_TIMEOUT)?;
    let view = first.wait_vm("web", "running, same pid", ACT_TIMEOUT, |v| {
        v.phase == "running" && v.pid == Some(pid) && v.host == "hv1"
    })?;
    ensure!(view.restarts == 0, "web was restarted:\n{view}");
    ensure!(
        first.agent_pids() == [agent],
        "the first engine's agent changed: {:?}, was {agent}",
        first.agent_pids()
    );
    Ok(())
}

#[test]
fn a_forwarded_host_port_has_one_vm_per_host() -> Result<()> {
    let repo = TestRepo::new()?;
    repo.write_host("hv1", &HostSpec::agent().memory(4096))?;
    let port = std::net::TcpListener::bind("0.0.0.0:0")?
        .local_addr()?
        .port();
    let vm = format!(
        "{}\n[[nics]]\nnetwork = \"user\"\nforward = [\"tcp:{port}:22\"]\n",
        small().to_toml(repo.guest())
    );
    repo.write("vms/a.toml", &vm)?;
    repo.write("vms/b.toml", &vm)?;
    repo.commit("two VMs forwarding one host port, one host")?;

    let plan = repo.plan_json(&[])?;
    let note = note_for(&plan, "b")?;
    ensure!(
        note.contains("cannot be placed")
            && note.contains(&format!("hv1 has host port tcp:{port} forwarded to VM a")),
        "the note does not name the port and its user: {note}"
    );
    let apply = repo.run(&["apply", "--auto-approve"])?;
    apply.expect_code(1)?;
    running_on(&repo, "a", "hv1").with_context(|| apply.to_string())?;
    ensure!(
        repo.hosts_with_instance("b").is_empty() && repo.qemus_of("b").is_empty(),
        "b was created on a host where its port is taken\n{apply}"
    );
    Ok(())
}
