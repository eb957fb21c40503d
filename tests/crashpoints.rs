//! A crash at every step: the engine, or an agent, is killed at each fail point of apply,
//! restart and migration in turn (`FAILPOINTS=<point>=return(kill)`, the binary built
//! with the `failpoints` feature: see `plasmavmc::failpoint`), then `apply` runs again
//! without faults. After each crash this file checks:
//! - the point fired (the process says so on stderr; an engine point leaves the apply
//!   killed by a signal), and the next apply converges in one run: it exits 0, says that
//!   the interrupted apply was cut short when the engine died, and a plan afterwards is
//!   empty;
//! - every VM is where the commit says: one that should run runs on the host its status
//!   names, as the only QEMU of its VM, and its instance record agrees (power running, no
//!   migration pending); one that should be stopped is stopped;
//! - no VM ran twice: the QEMUs of each VM are sampled every 50 ms through both applies
//!   and every wait — never two at once where one VM has one QEMU (starts, stops,
//!   restarts, cold moves, recovery), never two guests running at once where a live
//!   move's target waits beside its source by design (their consoles never take turns
//!   back and forth);
//! - no running VM was lost: one that ran before the crash runs after it; a VM moved live
//!   ticks on where the move was headed without booting again;
//! - no disk was lost: the guest's boot counter on its disk counts on (one more per
//!   boot, never "fresh"), the disk file is there, and a removed VM's disk is in
//!   `retained/`.
//!
//! With the `error` action at a few points, a step fails with a message naming the
//! point (for whichever of two VMs running at once reaches it first), the rest of the
//! plan proceeds, and the next apply converges.
//!
//! Points are grouped in flows that share a repository: each point's scenario starts
//! where the previous one converged, one commit away from the state before its step, so
//! guests boot a few times per flow and not once per point. Every point of
//! `plasmavmc::failpoint::POINTS` is crashed at by at least one flow
//! (`every_fail_point_is_crashed_at`).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use plasmavmc_e2e::fault::failover_repo_with;
use plasmavmc_e2e::proc::qemu_memory_mb;
use plasmavmc_e2e::wait::poll_for;
use plasmavmc_e2e::{
    cmdline, ticks, CopyWatch, HostSpec, Output, Running, TestRepo, VmSpec, BOOT_TIMEOUT,
    RUN_TIMEOUT,
};

/// Memory of every test VM: the least the test guest boots with (restarts add 16 MiB).
const VM_MB: u64 = 96;

/// Starting and stopping `app` (restart = "never": a start cut short is no exit).
const START_STOP: &[&str] = &[
    "engine.start.before",
    "engine.stop.before",
    "agent.start.recorded",
    "agent.stop.recorded",
    "agent.start.spawned",
    "engine.stop.after",
    "engine.start.after",
];

/// Creating, updating and deleting stopped VMs `s1`..`s3`.
const CREATE_UPDATE_DELETE: &[(&str, &str)] = &[
    ("engine.create.before", "s1"),
    ("agent.create.disks", "s2"),
    ("engine.create.after", "s3"),
    ("engine.update.before", "s1"),
    ("engine.update.after", "s2"),
    ("engine.delete.before", "s1"),
    ("agent.delete.retained", "s2"),
    ("engine.delete.after", "s3"),
];

/// Restarting `big` for a memory change.
const RESTART: &[&str] = &[
    "engine.restart.before",
    "agent.stop.recorded",
    "engine.restart.stopped",
    "engine.restart.updated",
    "engine.restart.after",
];

/// Recovering `ha1` on the other host once its host is fenced.
const RECOVER: &[&str] = &["engine.recover.before", "engine.recover.after"];

/// Moving `web` live back and forth, its disk on shared storage.
const LIVE_SHARED: &[&str] = &[
    "engine.migrate.before",
    "agent.incoming.spawned",
    "engine.migrate.live.prepared",
    "agent.migrate-out.completed",
    "engine.migrate.live.completed",
    "agent.resume.continued",
    "engine.migrate.live.resumed",
    "engine.migrate.live.discarding",
    "agent.discard.stopped",
    "engine.migrate.after",
];

/// Moving `slow` live at 32 MiB/s: the engine dies while the migration is under way.
const LIVE_UNDER_WAY: &[&str] = &["engine.migrate.live.progress"];

/// Moving `db` live back and forth, its local disk mirrored over NBD.
const LIVE_LOCAL: &[&str] = &[
    "agent.migrate-out.mirroring",
    "agent.migrate-out.switchover",
    "engine.migrate.live.completed",
    "agent.resume.continued",
];

/// Moving `cold1` cold back and forth.
const COLD: &[&str] = &[
    "engine.migrate.cold.stopped",
    "engine.migrate.cold.created",
    "agent.disk.partial",
    "engine.migrate.cold.copied",
    "engine.migrate.cold.started",
];

#[test]
fn every_fail_point_is_crashed_at() {
    let mut crashed: Vec<&str> = [
        START_STOP,
        RESTART,
        RECOVER,
        LIVE_SHARED,
        LIVE_UNDER_WAY,
        LIVE_LOCAL,
        COLD,
    ]
    .concat()
    .into_iter()
    .chain(CREATE_UPDATE_DELETE.iter().map(|(p, _)| *p))
    .collect();
    crashed.sort_unstable();
    crashed.dedup();
    let mut all: Vec<&str> = plasmavmc::failpoint::POINTS
        .iter()
        .map(|p| p.name)
        .collect();
    all.sort_unstable();
    assert_eq!(crashed, all, "the flows must crash at every fail point");
}

/// Whether a VM may have two QEMUs at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copies {
    /// Never: starts, stops, restarts, cold moves.
    One,
    /// Source and target of a live move: only one guest may run.
    Live,
}

/// One flow: its repository, a watch on each of its VMs, and the applies it runs.
struct Flow<'r> {
    repo: &'r TestRepo,
    watches: Vec<CopyWatch<'r>>,
    copies: Copies,
    /// The last crash and the apply after it: told with any failure that follows, so
    /// a red run shows the one crash it is about (not every crash of the flow).
    last: String,
}

impl<'r> Flow<'r> {
    fn new(repo: &'r TestRepo, vms: &[&str], copies: Copies) -> Self {
        Self {
            repo,
            watches: vms.iter().map(|vm| CopyWatch::new(repo, vm)).collect(),
            copies,
            last: "(before the first crash)".to_owned(),
        }
    }

    fn sample(&mut self) {
        for watch in &mut self.watches {
            watch.sample();
        }
    }

    /// Waits until `cond` holds, sampling the VMs' copies meanwhile.
    fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&TestRepo) -> bool,
    ) -> Result<()> {
        let repo = self.repo;
        poll_for(what, timeout, || {
            self.sample();
            cond(repo).then_some(())
        })
    }

    /// `apply --auto-approve` to its end (with `FAILPOINTS = failpoints` when given),
    /// sampling the VMs' copies while it runs; then waits for its agents to go.
    fn apply(&mut self, failpoints: Option<&str>) -> Result<Output> {
        let mut cmd = self.repo.command(&["apply", "--auto-approve"]);
        match failpoints {
            Some(f) => cmd.env("FAILPOINTS", f),
            None => cmd.env_remove("FAILPOINTS"),
        };
        let mut run = Running::spawn(cmd)?;
        poll_for("apply to end", RUN_TIMEOUT, || {
            self.sample();
            match run.try_wait() {
                Ok(None) => None,
                _ => Some(()),
            }
        })?;
        let out = run.finish(RUN_TIMEOUT)?;
        self.repo.wait_agents_exit("apply")?;
        Ok(out)
    }

    /// Commits the working tree and applies it without faults.
    fn commit_and_apply(&mut self, message: &str) -> Result<Output> {
        self.repo.commit(message)?;
        let out = self.apply(None)?;
        out.expect_code(0)?;
        Ok(out)
    }

    /// Applies the commit with `point` killing its process, then applies again: that
    /// run must converge. Checks the copies seen meanwhile; returns the converging run.
    fn crash(&mut self, point: &str) -> Result<Output> {
        let crashed = self.apply(Some(&format!("{point}=return(kill)")))?;
        ensure!(
            crashed
                .stderr
                .contains(&format!("fail point {point}: killing this process")),
            "fail point {point} did not fire (built without --features failpoints?)\n{crashed}"
        );
        let engine = point.starts_with("engine.");
        if engine {
            ensure!(
                crashed.code.is_none(),
                "the engine was not killed at {point}\n{crashed}"
            );
        }
        let again = self.apply(None)?;
        self.last = format!("=== crash at {point}\n{crashed}\n=== the next apply\n{again}");
        again.expect_code(0).with_context(|| {
            format!("after a crash at {point}, the next apply did not converge\n--- the crashed apply:\n{crashed}")
        })?;
        if engine {
            ensure!(
                again.stderr.contains("was interrupted"),
                "the apply after a crash at {point} does not say what was cut short\n{again}"
            );
        }
        let plan = self.repo.plan_json(&[])?;
        self.repo.wait_agents_exit("plan")?;
        ensure!(
            plan["actions"].as_array().is_some_and(Vec::is_empty),
            "after a crash at {point} and one apply, there is still something to do:\n{plan:#}\n{again}"
        );
        self.check_copies(point)?;
        Ok(again)
    }

    /// No VM ran twice since the last check.
    fn check_copies(&mut self, point: &str) -> Result<()> {
        for watch in &mut self.watches {
            match self.copies {
                Copies::One => watch.ensure_never_two(),
                Copies::Live => {
                    ensure!(
                        watch.most().len() <= 2,
                        "more than a source and a target: {}",
                        watch.summary()
                    );
                    watch.ensure_never_two_running()
                }
            }
            .with_context(|| format!("around the crash at {point}\n{}", self.last))?;
            watch.reset();
        }
        Ok(())
    }

    /// `vm` runs on `host` alone, as its status and its instance record say, and every
    /// disk file its QEMU was started with is there; returns its pid.
    fn runs_on(&self, host: &str, vm: &str) -> Result<i32> {
        let checked = self.runs_on_now(host, vm);
        checked.with_context(|| self.last.clone())
    }

    fn runs_on_now(&self, host: &str, vm: &str) -> Result<i32> {
        let pid = self.repo.only_on(host, vm)?;
        let record = self.record(host, vm)?;
        ensure!(
            record.get("power").and_then(toml::Value::as_str) == Some("running")
                && !record.contains_key("incoming"),
            "{vm} runs on {host} but its instance record says otherwise:\n{record}"
        );
        let dir = self.repo.instance_dir_on(host, vm);
        let files: Vec<String> = cmdline(pid)?
            .iter()
            .filter_map(|arg| arg.strip_prefix("driver=file,filename="))
            .filter_map(|rest| rest.split(",node-name=").next())
            .map(|file| file.replace(",,", ","))
            .collect();
        let disks = record
            .get("vm")
            .and_then(|v| v.get("spec"))
            .and_then(|s| s.get("disks"))
            .and_then(toml::Value::as_array)
            .map_or(0, Vec::len);
        ensure!(
            files.len() == disks,
            "{vm}'s QEMU has disk files {files:?}, its spec {disks} disks"
        );
        for file in files {
            let path = dir.join(file);
            ensure!(path.is_file(), "{vm}'s disk {} is gone", path.display());
        }
        Ok(pid)
    }

    /// `vm` has a stopped instance on `host` and nowhere else, as its status says.
    fn stopped_on(&self, host: &str, vm: &str) -> Result<()> {
        let checked = self.stopped_on_now(host, vm);
        checked.with_context(|| self.last.clone())
    }

    fn stopped_on_now(&self, host: &str, vm: &str) -> Result<()> {
        ensure!(
            self.repo.qemus_of(vm).is_empty(),
            "{vm} should be stopped; QEMUs {:?}",
            self.repo.qemus_of(vm)
        );
        ensure!(
            self.repo.hosts_with_instance(vm) == [host],
            "{vm} has instances on {:?}, expected only on {host}",
            self.repo.hosts_with_instance(vm)
        );
        let view = self.repo.vm_view(vm)?.context("no status")?;
        ensure!(
            view.phase == "stopped" && view.host == host,
            "{vm}'s status does not say stopped on {host}:\n{view}"
        );
        Ok(())
    }

    /// `<root of host>/vms/<vm>/instance.toml`.
    fn record(&self, host: &str, vm: &str) -> Result<toml::Table> {
        let path = self.repo.instance_dir_on(host, vm).join("instance.toml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(text.parse()?)
    }

    /// Waits until `vm`'s guest on `host` booted and counted boot `n` on its disk.
    fn booted(&mut self, host: &str, vm: &str, n: u32) -> Result<()> {
        let checked = self.booted_now(host, vm, n);
        checked.with_context(|| self.last.clone())
    }

    fn booted_now(&mut self, host: &str, vm: &str, n: u32) -> Result<()> {
        let line = format!("disk: boots={n}");
        self.wait(
            &format!("{vm} to boot on {host} and count boot {n} on its disk"),
            BOOT_TIMEOUT,
            |repo| repo.serial_on(host, vm).contains(&line),
        )
        .with_context(|| self.repo.serial_on(host, vm))?;
        let serial = self.repo.serial_on(host, vm);
        ensure!(
            !serial.contains("disk: fresh") || n == 1,
            "{vm}'s disk on {host} came up empty:\n{serial}"
        );
        Ok(())
    }

    /// Waits until `vm`'s guest on `host` ticks past `seen` without having booted there:
    /// it moved live.
    fn went_on(&mut self, host: &str, vm: &str, seen: u64) -> Result<()> {
        let checked = self.went_on_now(host, vm, seen);
        checked.with_context(|| self.last.clone())
    }

    fn went_on_now(&mut self, host: &str, vm: &str, seen: u64) -> Result<()> {
        self.wait(
            &format!("{vm} ticking past {seen} on {host}"),
            BOOT_TIMEOUT,
            |repo| ticks(&repo.serial_on(host, vm)).last() > Some(&seen),
        )?;
        let serial = self.repo.serial_on(host, vm);
        let first = ticks(&serial).first().copied();
        ensure!(
            first > Some(seen) && !serial.contains("booted"),
            "{vm} booted again on {host} instead of going on from tick {seen}:\n{serial}"
        );
        Ok(())
    }
}

/// The other host of a two-host flow.
fn other(host: &str) -> &'static str {
    if host == "hv1" {
        "hv2"
    } else {
        "hv1"
    }
}

/// One simulated host, `hv1`: its agent is the binary under test, on its own root.
fn one_host() -> Result<TestRepo> {
    let repo = TestRepo::new()?;
    repo.write_host("hv1", &HostSpec::agent().memory(2048))?;
    Ok(repo)
}

#[test]
fn crashes_while_starting_and_stopping() -> Result<()> {
    let repo = one_host()?;
    let mut flow = Flow::new(&repo, &["app"], Copies::One);
    let spec = VmSpec::new().memory(VM_MB).restart("never");
    let mut boots = 0;
    for (i, point) in START_STOP.iter().enumerate() {
        let start = i % 2 == 0;
        let power = if start { "running" } else { "stopped" };
        repo.write_vm("app", &spec.clone().power(power))?;
        repo.commit(&format!("app {power}"))?;
        flow.crash(point)?;
        if start {
            boots += 1;
            flow.runs_on("hv1", "app")?;
            flow.booted("hv1", "app", boots)?;
        } else {
            flow.stopped_on("hv1", "app")?;
        }
    }
    Ok(())
}

#[test]
fn crashes_while_creating_updating_and_deleting() -> Result<()> {
    let repo = one_host()?;
    let mut flow = Flow::new(&repo, &["s1", "s2", "s3"], Copies::One);
    let spec = VmSpec::new().memory(VM_MB).power("stopped");
    let mut priority = 0;
    for (point, vm) in CREATE_UPDATE_DELETE {
        let dir = repo.instance_dir_on("hv1", vm);
        if point.contains(".create.") {
            repo.write_vm(vm, &spec)?;
            repo.commit(&format!("add {vm}"))?;
            flow.crash(point)?;
            flow.stopped_on("hv1", vm)?;
            ensure!(
                dir.join("disks/data.qcow2").is_file(),
                "{vm}'s disk was not created"
            );
        } else if point.contains(".update.") {
            priority += 1;
            repo.write_vm(vm, &spec.clone().priority(priority))?;
            repo.commit(&format!("{vm} priority {priority}"))?;
            flow.crash(point)?;
            flow.stopped_on("hv1", vm)?;
            let record = flow.record("hv1", vm)?;
            let kept = record
                .get("vm")
                .and_then(|v| v.get("spec"))
                .and_then(|s| s.get("priority"))
                .and_then(toml::Value::as_integer);
            ensure!(
                kept == Some(i64::from(priority)),
                "{vm}'s instance does not hold the new spec:\n{record}"
            );
        } else {
            repo.remove(&format!("vms/{vm}.toml"))?;
            repo.commit(&format!("remove {vm}"))?;
            flow.crash(point)?;
            ensure!(!dir.exists(), "{vm}'s instance is still there");
            ensure!(
                retained_disks(&repo, vm)? == 1,
                "{vm}'s disk is not in retained/ (once)"
            );
        }
    }
    Ok(())
}

/// How many `data.qcow2` of `vm` host hv1 keeps in `retained/<vm>-*/disks/`.
fn retained_disks(repo: &TestRepo, vm: &str) -> Result<usize> {
    let dir = repo.host_root("hv1").join("retained");
    let prefix = format!("{vm}-");
    Ok(std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter(|e| e.path().join("disks/data.qcow2").is_file())
        .count())
}

#[test]
fn crashes_while_restarting() -> Result<()> {
    let repo = one_host()?;
    let mut flow = Flow::new(&repo, &["big"], Copies::One);
    let spec = VmSpec::new().memory(VM_MB);
    repo.write_vm("big", &spec)?;
    flow.commit_and_apply("add big")?;
    flow.booted("hv1", "big", 1)?;
    for (i, point) in RESTART.iter().enumerate() {
        let mb = VM_MB + 16 * (i as u64 % 2 + 1);
        repo.write_vm("big", &spec.clone().memory(mb))?;
        repo.commit(&format!("big with {mb} MiB"))?;
        flow.crash(point)?;
        let pid = flow.runs_on("hv1", "big")?;
        let has = qemu_memory_mb(&cmdline(pid)?);
        ensure!(
            has == Some(mb),
            "after a crash at {point}, big runs with {has:?} MiB, not {mb}"
        );
        flow.booted("hv1", "big", i as u32 + 2)?;
    }
    Ok(())
}

#[test]
fn crashes_while_recovering_a_vm_of_a_fenced_host() -> Result<()> {
    let ha = VmSpec::new().no_disks().memory(VM_MB).ha(true);
    let repo = failover_repo_with(None, &[("ha1", ha)], "")?;
    let mut flow = Flow::new(&repo, &["ha1"], Copies::One);
    let out = flow.apply(None)?;
    out.expect_code(0)?;
    let mut host = "hv1";
    flow.runs_on(host, "ha1")?;
    for point in RECOVER {
        repo.power_off(host)?;
        repo.fence_confirm(host)?.expect_code(0)?;
        let lost = host;
        host = other(host);
        // Nothing to commit: the fence record makes the plan.
        flow.crash(point)?;
        // The lost host keeps its (dead) copy's folder until it returns.
        let pid = repo.qemu_on(host, "ha1")?;
        let view = repo.vm_view("ha1")?.context("no status")?;
        ensure!(
            repo.qemus_of("ha1") == [pid] && view.phase == "running" && view.host == host,
            "ha1 is not running alone on {host}: QEMUs {:?}\n{view}",
            repo.qemus_of("ha1")
        );
        flow.wait("ha1 to tick after its recovery", BOOT_TIMEOUT, |repo| {
            ticks(&repo.serial_on(host, "ha1")).len() > 2
        })?;
        // The lost host comes back; its stale copy goes.
        repo.power_on(lost)?;
        flow.apply(None)?.expect_code(0)?;
        flow.runs_on(host, "ha1")?;
        flow.check_copies(point)?;
    }
    Ok(())
}

/// Hosts `hv1` and `hv2`, with one storage pool on `<tmp>/shared` when `shared`.
fn two_hosts(shared: bool) -> Result<TestRepo> {
    let repo = TestRepo::new()?;
    let pool = repo.shared_dir();
    std::fs::create_dir_all(&pool)?;
    for name in ["hv1", "hv2"] {
        let mut spec = HostSpec::agent().memory(2048);
        if shared {
            spec = spec.shared(&pool, "pool1");
        }
        repo.write_host(name, &spec)?;
    }
    Ok(repo)
}

/// Moves `vm` live between hv1 and hv2 with a crash at each of `points`.
fn live_moves(repo: &TestRepo, vm: &str, points: &[&str], shared: bool) -> Result<()> {
    let mut flow = Flow::new(repo, &[vm], Copies::Live);
    let spec = VmSpec::new().memory(VM_MB);
    repo.write_vm(vm, &spec.clone().pin("hv1"))?;
    flow.commit_and_apply(&format!("{vm} on hv1"))?;
    flow.booted("hv1", vm, 1)?;
    let mut host = "hv1";
    for point in points {
        let seen = repo.ticking_on(host, vm, 3)?;
        let to = other(host);
        repo.write_vm(vm, &spec.clone().pin(to))?;
        repo.commit(&format!("move {vm} to {to}"))?;
        flow.crash(point)?;
        flow.runs_on(to, vm)?;
        flow.went_on(to, vm, seen)?;
        if shared {
            let disk = repo.shared_dir().join(vm).join("data.qcow2");
            ensure!(disk.is_file(), "{} is gone", disk.display());
        }
        host = to;
    }
    // Every write of the guest went with it: a reboot where it ended finds its disk.
    repo.write_vm(vm, &spec.clone().pin(host).memory(VM_MB + 16))?;
    flow.commit_and_apply(&format!("reboot {vm}"))?;
    flow.booted(host, vm, 2)?;
    flow.check_copies("the final reboot")
}

#[test]
fn crashes_while_moving_live_with_a_shared_disk() -> Result<()> {
    let repo = two_hosts(true)?;
    live_moves(&repo, "web", LIVE_SHARED, true)
}

#[test]
fn a_crash_while_a_live_move_is_under_way() -> Result<()> {
    let repo = two_hosts(true)?;
    // Slow enough for the engine to report the migration's progress (once a second).
    repo.set_cluster_settings("[migration]\nmax_bandwidth_mib = 32\n")?;
    live_moves(&repo, "slow", LIVE_UNDER_WAY, true)
}

#[test]
fn crashes_while_moving_live_with_a_mirrored_local_disk() -> Result<()> {
    let repo = two_hosts(false)?;
    live_moves(&repo, "db", LIVE_LOCAL, false)
}

#[test]
fn crashes_while_moving_cold() -> Result<()> {
    let repo = two_hosts(false)?;
    let mut flow = Flow::new(&repo, &["cold1"], Copies::One);
    let spec = VmSpec::new().memory(VM_MB).migration("cold");
    repo.write_vm("cold1", &spec.clone().pin("hv1"))?;
    flow.commit_and_apply("cold1 on hv1")?;
    flow.booted("hv1", "cold1", 1)?;
    let mut host = "hv1";
    for (i, point) in COLD.iter().enumerate() {
        let to = other(host);
        repo.write_vm("cold1", &spec.clone().pin(to))?;
        repo.commit(&format!("move cold1 to {to}"))?;
        flow.crash(point)?;
        flow.runs_on(to, "cold1")?;
        flow.booted(to, "cold1", i as u32 + 2)?;
        host = to;
    }
    Ok(())
}

#[test]
fn an_injected_error_fails_its_step_and_the_rest_of_the_plan_proceeds() -> Result<()> {
    let repo = two_hosts(false)?;
    let mut flow = Flow::new(&repo, &["e1", "e2"], Copies::Live);
    let spec = VmSpec::new().memory(VM_MB);
    let cases: [(&str, &str, &str); 3] = [
        // (point, e1 and e2 become, the step that fails: of whichever VM reaches the
        // point first, as they run at once)
        ("engine.create.before", "hv1", "create"),
        ("agent.migrate-out.mirroring", "hv2", "migrate"),
        ("engine.restart.updated", "hv2+", "restart"),
    ];
    for (point, to, op) in cases {
        let (host, memory) = match to.strip_suffix('+') {
            Some(h) => (h, VM_MB + 16),
            None => (to, VM_MB),
        };
        for vm in ["e1", "e2"] {
            repo.write_vm(vm, &spec.clone().pin(host).memory(memory))?;
        }
        repo.commit(&format!("e1 and e2 to {to}"))?;
        let before = [repo.qemus_of("e1"), repo.qemus_of("e2")];
        let failed = flow.apply(Some(&format!("{point}=1*return(error)")))?;
        let injected = format!("injected fault at fail point {point}");
        let failed_at = |vm: &str| {
            failed.stdout.lines().any(|l| {
                l.trim_start().starts_with(&format!("FAIL {op} {vm}:")) && l.ends_with(&injected)
            })
        };
        let Some(which) = [0, 1].into_iter().find(|i| failed_at(["e1", "e2"][*i])) else {
            anyhow::bail!(
                "expected the apply to fail with \"FAIL {op} e1|e2: ...{injected}\"\n{failed}"
            );
        };
        let (vm, other) = (["e1", "e2"][which], ["e1", "e2"][1 - which]);
        ensure!(
            failed.code == Some(1) && !failed_at(other),
            "expected only {vm}'s {op} to fail, and the apply to say so\n{failed}"
        );
        if op == "migrate" {
            ensure!(
                repo.qemus_of(vm) == before[which]
                    && repo.qemu_on("hv1", vm).ok() == before[which].first().copied(),
                "{vm}'s failed move did not leave its QEMU {:?} running on hv1: {:?}",
                before[which],
                repo.qemus_of(vm)
            );
        }
        // The rest of the plan went on: the other VM is done.
        flow.runs_on(host, other)?;
        let again = flow.apply(None)?;
        again.expect_code(0).with_context(|| format!("{failed}"))?;
        for vm in ["e1", "e2"] {
            let pid = flow.runs_on(host, vm)?;
            ensure!(
                qemu_memory_mb(&cmdline(pid)?) == Some(memory),
                "{vm} does not run with {memory} MiB"
            );
        }
        flow.check_copies(point)?;
    }
    Ok(())
}
