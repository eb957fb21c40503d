//! The spine of `PlasmaVMC`, end to end: the real `plasmavmc` binary against real git
//! repositories and real QEMU (TCG) running the tiny test guest.
//!
//! What this file proves, one test each:
//! - `apply` starts a committed VM with the committed size, writes its status, and a
//!   plan right after has nothing to do;
//! - a memory change is planned as a restart (with a spec diff) and applied as one,
//!   keeping the disk's content;
//! - `power = "stopped"` stops the VM; removing its file deletes the instance but
//!   retains its disk (never deleted);
//! - a commit with invalid files is refused as a whole, with `path:line:col:` for
//!   every error, and nothing running is touched;
//! - a saved plan is refused once the observed state changed since it was made;
//! - `apply` with no tty and no `--auto-approve` refuses and starts nothing;
//! - a second engine on the same state dir is refused while one applies, naming it.
//!
//! Every test has its own repository and state dir in a temp folder and kills every
//! process it started, even when it fails (see the harness, `tests/harness/`).

use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use plasmavmc_e2e::proc::{qemu_memory_mb, qemu_vcpus};
use plasmavmc_e2e::{
    cmdline, diagnostic, is_alive, poll_for, wait_for, TestRepo, VmSpec, BOOT_TIMEOUT, MEMORY_LINE,
    RUN_TIMEOUT,
};

/// Fails unless `pid` is a live QEMU running with `memory_mb` MiB and `vcpus` vCPUs.
fn check_qemu(pid: i32, memory_mb: u64, vcpus: u32) -> Result<()> {
    ensure!(is_alive(pid), "QEMU pid {pid} is not alive");
    let args = cmdline(pid)?;
    let joined = args.join(" ");
    ensure!(
        args.first().is_some_and(|a| a.contains("qemu-system")),
        "pid {pid} is not QEMU: {joined}"
    );
    ensure!(
        qemu_memory_mb(&args) == Some(memory_mb),
        "expected -m {memory_mb} in: {joined}"
    );
    ensure!(
        qemu_vcpus(&args) == Some(vcpus),
        "expected -smp {vcpus} in: {joined}"
    );
    Ok(())
}

/// The `pid` field of a status table, as written (integer or string).
fn status_pid(table: &toml::Table) -> Option<i64> {
    match table.get("pid")? {
        toml::Value::Integer(n) => Some(*n),
        toml::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A repository with one committed VM `web` (default spec) applied and booted past
/// its disk header (`disk: boots=1`) and `tick 3`. Returns the repo and QEMU's pid.
fn running_web() -> Result<(TestRepo, i32)> {
    running_web_with(&VmSpec::new())
}

fn running_web_with(spec: &VmSpec) -> Result<(TestRepo, i32)> {
    let repo = TestRepo::new()?;
    repo.write_vm("web", spec)?;
    repo.commit("add web")?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    let pid = repo.wait_qemu_alive("web", Duration::from_secs(10))?;
    repo.wait_serial_seq("web", &["disk: boots=1", "tick 3"], BOOT_TIMEOUT)?;
    Ok((repo, pid))
}

/// Harness self-check: the binary runs, the guest exists, commits land in git.
#[test]
fn harness_smoke() -> Result<()> {
    let repo = TestRepo::new()?;
    ensure!(
        repo.guest().kernel.is_file() && repo.guest().initrd.is_file(),
        "guest missing"
    );
    repo.write_vm("web", &VmSpec::new())?;
    let first = repo.commit("one")?;
    repo.write(
        "vms/web.toml",
        &VmSpec::new().memory(192).to_toml(repo.guest()),
    )?;
    let second = repo.commit("two")?;
    ensure!(
        first != second && second.len() == 40,
        "commit ids {first} {second}"
    );
    let help = repo.run(&["--help"])?;
    help.expect_code(0)?;
    for sub in ["validate", "plan", "apply", "status"] {
        ensure!(
            help.stdout.contains(sub),
            "--help does not list {sub}\n{help}"
        );
    }
    Ok(())
}

#[test]
fn apply_starts_the_vm() -> Result<()> {
    let repo = TestRepo::new()?;
    repo.write_vm("web", &VmSpec::new().memory(128).vcpus(1))?;
    repo.commit("add web")?;
    let apply = repo.run(&["apply", "--auto-approve"])?;
    apply.expect_code(0)?;

    let pid = repo
        .qemu_pid("web")
        .with_context(|| format!("after\n{apply}"))?;
    check_qemu(pid, 128, 1)?;
    repo.wait_serial("web", "tick 3", BOOT_TIMEOUT)?;

    let status = repo
        .vm_status("web")?
        .context("no status/vms/web.toml after apply")?;
    let phase = status.get("phase").and_then(|p| p.as_str());
    ensure!(
        phase == Some("running"),
        "status phase {phase:?}, expected running:\n{status}"
    );
    ensure!(
        status_pid(&status) == Some(i64::from(pid)),
        "status pid differs from qemu.pid {pid}:\n{status}"
    );

    let json = repo.status_json()?;
    let vms = json
        .get("vms")
        .and_then(|v| v.as_array())
        .with_context(|| format!("no `vms` array: {json}"))?;
    let web = vms
        .iter()
        .find(|v| v["name"] == "web")
        .with_context(|| format!("no web in status --json: {json}"))?;
    ensure!(
        web["phase"] == "running",
        "status --json phase of web: {}",
        web["phase"]
    );

    let plan = repo.run(&["plan", "--detailed-exitcode"])?;
    plan.expect_code(0)
        .context("a plan right after apply must find no changes")?;
    ensure!(
        is_alive(pid) && repo.qemu_pid("web")? == pid,
        "plan touched the VM"
    );
    Ok(())
}

/// The user id a process runs as (`Uid:` of /proc/PID/status, the real one).
fn uid_of(pid: i32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn qemu_drops_to_its_runas_user_inside_its_chroot() -> Result<()> {
    let repo = TestRepo::new()?;
    let jail = repo.root().join("empty");
    std::fs::create_dir_all(&jail)?;
    let spec = VmSpec::new()
        .memory(128)
        .qemu_line("runas = \"nobody\"")
        .qemu_line(&format!("chroot = {:?}", jail.display().to_string()));
    repo.write_vm("web", &spec)?;
    repo.commit("web as nobody, chrooted")?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    let pid = repo.qemu_pid("web")?;
    repo.wait_serial("web", "tick 3", BOOT_TIMEOUT)?;
    let nobody = nix::unistd::User::from_name("nobody")?
        .context("no user nobody on this machine")?
        .uid
        .as_raw();
    ensure!(
        uid_of(pid) == Some(nobody),
        "QEMU {pid} runs as uid {:?}, not nobody ({nobody})",
        uid_of(pid)
    );
    let root = std::fs::read_link(format!("/proc/{pid}/root"))?;
    ensure!(
        root == jail.canonicalize()?,
        "QEMU's root is {}, not {}",
        root.display(),
        jail.display()
    );
    Ok(())
}

#[test]
fn memory_change_restarts_and_keeps_the_disk() -> Result<()> {
    let (repo, old_pid) = running_web()?;
    repo.write_vm("web", &VmSpec::new().memory(192))?;
    repo.commit("web: 192 MiB")?;

    let plan = repo.run(&["plan"])?;
    plan.expect_code(0)?;
    let lines: Vec<&str> = plan.stdout.lines().map(str::trim).collect();
    ensure!(
        lines
            .iter()
            .any(|l| l.contains("restart") && l.contains("web")),
        "plan does not announce a restart of web\n{plan}"
    );
    ensure!(
        lines.contains(&"-memory_mb = 128"),
        "plan diff lacks `-memory_mb = 128`\n{plan}"
    );
    ensure!(
        lines.contains(&"+memory_mb = 192"),
        "plan diff lacks `+memory_mb = 192`\n{plan}"
    );
    repo.run(&["plan", "--detailed-exitcode"])?.expect_code(2)?;
    ensure!(
        repo.qemu_pid("web")? == old_pid && is_alive(old_pid),
        "plan touched the VM"
    );

    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    let new_pid = repo.qemu_pid("web")?;
    ensure!(
        new_pid != old_pid,
        "qemu.pid still names the old QEMU {old_pid}"
    );
    ensure!(!is_alive(old_pid), "the old QEMU {old_pid} still runs");
    check_qemu(new_pid, 192, 1)?;
    repo.wait_serial_seq("web", &["disk: found boots=1", "tick 3"], BOOT_TIMEOUT)?;

    let previous =
        fs::read_to_string(repo.instance_dir("web").join("serial.log.1")).unwrap_or_default();
    ensure!(
        previous.contains("disk: fresh"),
        "serial.log.1 does not hold the first boot:\n{previous}"
    );
    Ok(())
}

#[test]
fn power_stopped_then_file_removed() -> Result<()> {
    let (repo, pid) = running_web()?;
    repo.write_vm("web", &VmSpec::new().power("stopped"))?;
    repo.commit("web: stopped")?;
    let apply = repo.run(&["apply", "--auto-approve"])?;
    apply.expect_code(0)?;
    // The stop is graceful: the guest saw the ACPI power button and powered off.
    ensure!(
        apply.stdout.contains("stopped gracefully"),
        "not a graceful stop\n{apply}"
    );
    ensure!(
        repo.serial("web").contains("power button, powering off"),
        "the guest never saw the power button"
    );
    ensure!(
        !is_alive(pid),
        "QEMU {pid} still runs after power = stopped"
    );
    ensure!(
        repo.qemu_pids().is_empty(),
        "a QEMU runs: {:?}",
        repo.qemu_pids()
    );
    ensure!(
        repo.vm_phase("web")?.as_deref() == Some("stopped"),
        "phase: {:?}",
        repo.vm_phase("web")?
    );

    repo.remove("vms/web.toml")?;
    repo.commit("remove web")?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    ensure!(
        !repo.instance_dir("web").exists(),
        "instance folder still exists"
    );

    let retained = repo.state_dir().join("local").join("retained");
    let dirs: Vec<_> = fs::read_dir(&retained)
        .with_context(|| format!("reading {}", retained.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("web-"))
        })
        .collect();
    ensure!(
        dirs.len() == 1,
        "expected one retained/web-*, found {dirs:?}"
    );
    let disk = dirs[0].join("disks").join("data.qcow2");
    ensure!(disk.is_file(), "{} missing", disk.display());
    ensure!(
        dirs[0].join("retained.toml").is_file(),
        "retained.toml missing beside the disks"
    );
    ensure!(
        contains(&disk, b"PLASMAVMC-DISK boots=1")?,
        "the retained disk lost the guest's data"
    );

    ensure!(
        repo.vm_phase("web")?.is_none(),
        "status of a deleted VM: {:?}",
        repo.vm_status("web")?
    );
    repo.run(&["plan", "--detailed-exitcode"])?.expect_code(0)?;
    Ok(())
}

/// True if the file's bytes contain `needle` (qcow2 stores written clusters raw).
fn contains(path: &Path, needle: &[u8]) -> Result<bool> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes.windows(needle.len()).any(|w| w == needle))
}

#[test]
fn invalid_commit_touches_nothing() -> Result<()> {
    let (repo, pid) = running_web()?;
    let last_applied = repo
        .engine_status()?
        .and_then(|t| t.get("last_applied_revision")?.as_str().map(str::to_owned));
    ensure!(
        last_applied.is_some(),
        "status/engine.toml has no last_applied_revision: {:?}",
        repo.engine_status()?
    );

    let spec = VmSpec::new().no_disks().to_toml(repo.guest());
    repo.write(
        "vms/bad.toml",
        &format!(
            "vcpus = 1\ncolour = \"blue\"\n{}",
            spec.replacen("vcpus = 1\n", "", 1)
        ),
    )?;
    repo.write(
        "vms/zero.toml",
        &VmSpec::new().no_disks().memory(0).to_toml(repo.guest()),
    )?;
    repo.write_vm("web", &VmSpec::new().memory(192))?;
    repo.commit("two bad files and a change to web")?;

    for args in [&["validate"][..], &["plan"], &["apply", "--auto-approve"]] {
        let out = repo.run(args)?;
        out.expect_code(1)?;
        let bad = diagnostic(&out.stderr, "vms/bad.toml")
            .with_context(|| format!("no vms/bad.toml:L:C: error\n{out}"))?;
        let zero = diagnostic(&out.stderr, "vms/zero.toml")
            .with_context(|| format!("no vms/zero.toml:L:C: error\n{out}"))?;
        ensure!(
            bad.0 == 2,
            "vms/bad.toml error on line {} (the unknown field is on line 2)\n{out}",
            bad.0
        );
        ensure!(
            zero.0 == MEMORY_LINE,
            "vms/zero.toml error on line {} (memory_mb is on line {MEMORY_LINE})\n{out}",
            zero.0
        );
    }

    ensure!(
        is_alive(pid) && repo.qemu_pid("web")? == pid,
        "the running VM was touched\n{}",
        repo.describe_vm("web")
    );
    check_qemu(pid, 128, 1)?;
    for vm in ["bad", "zero"] {
        ensure!(
            !repo.instance_dir(vm).exists(),
            "an instance folder for {vm} was created"
        );
    }
    let now = repo
        .engine_status()?
        .and_then(|t| t.get("last_applied_revision")?.as_str().map(str::to_owned));
    ensure!(
        now == last_applied,
        "last_applied_revision moved from {last_applied:?} to {now:?}"
    );
    Ok(())
}

#[test]
fn stale_saved_plan_is_refused() -> Result<()> {
    let (repo, pid) = running_web()?;
    repo.write_vm("web", &VmSpec::new().memory(192))?;
    repo.commit("web: 192 MiB")?;
    let plan_file = repo.root().join("p.json");
    let plan_path = plan_file.to_str().context("utf-8 temp path")?;
    repo.run(&["plan", "--out", plan_path])?.expect_code(0)?;
    ensure!(plan_file.is_file(), "plan --out wrote no file");

    plasmavmc_e2e::proc::kill_and_wait(pid, Duration::from_secs(10))?;
    let apply = repo.run(&["apply", plan_path])?;
    apply.expect_code(1)?;
    ensure!(
        apply.all().contains("changed since the plan"),
        "refusal does not say why\n{apply}"
    );
    ensure!(
        repo.qemu_pids().is_empty(),
        "a stale plan started QEMU {:?}",
        repo.qemu_pids()
    );

    let fresh = repo.root().join("p2.json");
    let fresh_path = fresh.to_str().context("utf-8 temp path")?;
    repo.run(&["plan", "--out", fresh_path])?.expect_code(0)?;
    repo.run(&["apply", fresh_path])?.expect_code(0)?;
    let new_pid = repo.wait_qemu_alive("web", Duration::from_secs(10))?;
    check_qemu(new_pid, 192, 1)?;
    repo.wait_serial_seq("web", &["disk: found boots=1", "tick 3"], BOOT_TIMEOUT)?;
    Ok(())
}

#[test]
fn apply_without_tty_or_approval_refuses() -> Result<()> {
    let repo = TestRepo::new()?;
    repo.write_vm("web", &VmSpec::new())?;
    repo.commit("add web")?;
    repo.run(&["plan", "--detailed-exitcode"])?.expect_code(2)?;
    let apply = repo.run(&["apply"])?;
    apply.expect_code(1)?;
    ensure!(
        !apply.stderr.trim().is_empty(),
        "refused without saying why\n{apply}"
    );
    ensure!(
        repo.try_qemu_pid("web").is_none(),
        "qemu.pid written\n{apply}"
    );
    let owned = plasmavmc_e2e::proc::processes_under(repo.root());
    ensure!(owned.is_empty(), "processes left running: {owned:?}");
    repo.run(&["plan", "--detailed-exitcode"])?.expect_code(2)?;
    Ok(())
}

#[test]
fn second_apply_is_refused_while_one_runs() -> Result<()> {
    // A guest that ignores the ACPI power button: stopping it waits the whole stop
    // timeout, which keeps the first apply (and its lock) busy for 10 s.
    let slow = || VmSpec::new().cmdline("plasmavmc.ignore_acpi=1");
    let (repo, pid) = running_web_with(&slow())?;
    repo.set_stop_timeout("10s")?;
    repo.write_vm("web", &slow().power("stopped"))?;
    repo.commit("web: stopped, slowly")?;

    let mut first = repo.spawn(&["apply", "--auto-approve"])?;
    let lock = repo.state_dir().join("lock");
    let holder = format!("(pid {}", first.pid());
    let held = poll_for(
        "the first apply to hold the state lock",
        Duration::from_secs(30),
        || {
            if !matches!(first.try_wait(), Ok(None)) {
                return Some(false);
            }
            let text = fs::read_to_string(&lock).unwrap_or_default();
            (text.contains("apply") && text.contains(&holder)).then_some(true)
        },
    )?;
    if !held {
        let out = first.finish(RUN_TIMEOUT)?;
        bail!("the first apply ended before taking the lock\n{out}");
    }

    let second = repo.run(&["apply", "--auto-approve"])?;
    let first_running = matches!(first.try_wait(), Ok(None));
    let elapsed = first.elapsed();
    second.expect_code(1).with_context(|| {
        format!("second apply not refused; first apply still running: {first_running} (after {elapsed:?})")
    })?;
    ensure!(
        second.stderr.contains("in use by"),
        "refusal does not name the holder\n{second}"
    );
    ensure!(
        second.stderr.contains(&holder),
        "refusal does not name the first apply's pid\n{second}"
    );

    first.finish(RUN_TIMEOUT)?.expect_code(0)?;
    wait_for("QEMU to be gone", Duration::from_secs(5), || !is_alive(pid))?;
    ensure!(
        repo.vm_phase("web")?.as_deref() == Some("stopped"),
        "phase: {:?}",
        repo.vm_phase("web")?
    );
    Ok(())
}
