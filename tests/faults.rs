//! Faults of the outside world, end to end: a host's disk fills up, an agent dies in
//! the middle of a command, a QEMU stops answering QMP.
//!
//! What this file proves, one test each:
//! - **disk full while creating a disk**: the host root of `full` is a real 8 MiB
//!   tmpfs (mounted by the test, which runs as root), filled with ballast up to its
//!   last 64 KiB, so `qemu-img create` of VM `big`'s disk fails with ENOSPC. `apply`
//!   exits 1 naming the VM, the disk and the reason, no QEMU starts for `big`, its
//!   status says why, VM `small` of the same commit on another host starts and
//!   ticks, no half-made disk is left, `watch` does not retry the create at every
//!   reconcile, and once the ballast is gone the next `apply` creates the disk and
//!   starts `big`;
//! - **agent killed mid-command**: the agent of host `hv1` is killed (SIGKILL) while it waits
//!   for a guest that ignores the ACPI power button to stop (a 30 s stop timeout):
//!   `apply` exits 1 at once (~0.1 s) naming the host as unreachable, status says so,
//!   both QEMUs of that host keep running (the one being stopped too: no VM lost, and
//!   the other is never touched), and the next `apply` converges;
//! - **QMP dropped**: the QEMU of a guest that ignores the ACPI power button is
//!   frozen (SIGSTOP) once its stop began: the first QMP command it leaves unanswered
//!   (10 s) shows it is frozen, and SIGKILL ends it, reported as "QEMU did not quit and
//!   was killed", with a bounded `apply` (under 2 s stop timeout + 10 s) that exits 0
//!   and a next plan that is empty.
//!
//! Each test has its own repository, state dir and hosts in a temp folder and kills
//! every process it started, even when it fails; the tmpfs is unmounted by the same
//! cleanup (see `tests/harness/`).

use std::fs;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use plasmavmc_e2e::{
    is_alive, poll_for, HostSpec, Output, TestRepo, VmSpec, ACT_TIMEOUT as ACT, BOOT_TIMEOUT,
    RUN_TIMEOUT,
};

/// Size of the tmpfs that holds the root of host `full`.
const TMPFS: &str = "8m";

/// Room left on it by the ballast: enough for the agent's and the instance's small
/// files, far from the ~200 KiB a new 1 GiB qcow2 takes.
const LEAVE: u64 = 64 << 10;

#[test]
fn disk_full_while_creating_a_disk_fails_that_vm_alone_until_space_returns() -> Result<()> {
    let repo = TestRepo::new()?;
    let full = repo.host_root("full");
    repo.mount_tmpfs(&full, TMPFS)?;
    repo.write_host("full", &HostSpec::agent())?;
    repo.write_host("roomy", &HostSpec::agent())?;
    // `big` boots through the firmware: no kernel to copy onto the full host, so the
    // first thing that needs room there is its disk.
    let big = VmSpec::new()
        .firmware()
        .no_disks()
        .disk("root", 1)
        .pin("full");
    repo.write_vm("big", &big)?;
    repo.write_vm("small", &VmSpec::new().no_disks().pin("roomy"))?;
    repo.commit("big on a full host, small elsewhere")?;
    let ballast = repo.fill(&full, LEAVE)?;

    let apply = repo.run(&["apply", "--auto-approve"])?;
    apply.expect_code(1)?;
    eprintln!("{apply}");
    let fail = apply.fail_line("big")?;
    ensure!(
        fail.contains("disk root") && fail.contains("No space left on device"),
        "the FAIL line does not name the disk and the reason: {fail}\n{apply}"
    );
    ensure!(
        !apply.all().contains("panicked"),
        "the engine panicked\n{apply}"
    );
    ensure!(
        repo.qemus_of("big").is_empty(),
        "a QEMU runs for big: {:?}",
        repo.qemus_of("big")
    );
    let status = repo.vm_view("big")?.context("no status/vms/big.toml")?;
    ensure!(
        status.message.contains("No space left on device"),
        "the status of big does not say why: {status}"
    );
    let disk = repo.instance_dir_on("full", "big").join("disks/root.qcow2");
    ensure!(
        !disk.exists(),
        "a half-made disk was left at {}",
        disk.display()
    );
    // The other VM of the commit went on.
    let small = repo.wait_qemu_alive("small", ACT)?;
    repo.wait_serial("small", "tick 1", BOOT_TIMEOUT)?;

    // Under watch, on the same commit: a failed create is a failed start, so retries
    // back off (immediate, then 1 s, 2 s, ...) instead of running at every reconcile.
    let daemon = repo.watch(&["--interval", "1s"])?;
    daemon.wait_log("the startup reconcile", ACT, |l| {
        l.is("reconcile", None) && l.str("trigger") == Some("startup")
    })?;
    for _ in 0..4 {
        daemon.hup(ACT)?;
    }
    let lines = daemon.lines();
    let reconciles = lines.iter().filter(|l| l.is("reconcile", None)).count();
    let tries = lines.iter().filter(|l| l.is("failed", Some("big"))).count();
    eprintln!("big: {tries} failed tries in {reconciles} reconciles under watch");
    ensure!(
        tries < reconciles,
        "big's disk was tried at every reconcile ({tries} failures in {reconciles} \
         reconciles)\n{}",
        daemon.describe()
    );
    let waiting = repo.vm_view("big")?.context("no status/vms/big.toml")?;
    ensure!(
        waiting.message.contains("No space left on device"),
        "under watch, the status of big does not say why: {waiting}"
    );
    ensure!(repo.qemus_of("big").is_empty(), "a QEMU runs for big");

    // Room again: the next try (when its backoff ends) makes the disk and starts big;
    // small is untouched.
    fs::remove_file(&ballast)?;
    let pid = daemon.poll("a live QEMU for big", ACT, || {
        repo.try_qemu_pid("big").filter(|&p| is_alive(p))
    })?;
    repo.wait_vm("big", "phase running", ACT, |v| {
        v.phase == "running" && v.pid == Some(pid)
    })?;
    drop(daemon);
    ensure!(disk.is_file(), "no disk at {}", disk.display());
    ensure!(
        repo.qemu_pid("small")? == small && is_alive(small),
        "small was restarted"
    );
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    repo.run(&["plan", "--detailed-exitcode"])?.expect_code(0)?;
    Ok(())
}

/// A guest that ignores the ACPI power button: a stop waits the whole stop timeout.
fn deaf() -> VmSpec {
    VmSpec::new().no_disks().cmdline("plasmavmc.ignore_acpi=1")
}

/// Commits `spec` (the VM `vm` with `power = "stopped"`), runs `apply`, and once it has
/// begun to stop the VM (its instance on `host` records `power = "stopped"`, written
/// before the power button is pressed) calls `fault`. Returns the apply's output and
/// how long it ran after the fault.
fn stop_with_fault(
    repo: &TestRepo,
    vm: &str,
    host: &str,
    spec: &VmSpec,
    fault: impl FnOnce() -> Result<()>,
) -> Result<(Output, Duration)> {
    repo.write_vm(vm, spec)?;
    repo.commit(&format!("stop {vm}"))?;
    let file = repo.instance_dir_on(host, vm).join("instance.toml");
    let mut apply = repo.spawn(&["apply", "--auto-approve"])?;
    let begun = poll_for(format!("the stop of {vm} to begin"), ACT, || {
        if !matches!(apply.try_wait(), Ok(None)) {
            return Some(false);
        }
        let table: toml::Table = fs::read_to_string(&file).ok()?.parse().ok()?;
        (table.get("power")?.as_str()? == "stopped").then_some(true)
    })?;
    if !begun {
        bail!(
            "the apply ended before the stop of {vm} began\n{}",
            apply.finish(RUN_TIMEOUT)?
        );
    }
    fault()?;
    let at = Instant::now();
    let out = apply.finish(RUN_TIMEOUT)?;
    Ok((out, at.elapsed()))
}

#[test]
fn agent_killed_mid_stop_reports_the_host_unreachable_and_loses_no_vm() -> Result<()> {
    let repo = TestRepo::new()?;
    // Long enough that an apply waiting for it could not pass for a quick failure.
    repo.set_stop_timeout("30s")?;
    repo.write_host("hv1", &HostSpec::agent())?;
    repo.write_vm("deaf", &deaf().pin("hv1"))?;
    repo.write_vm("steady", &VmSpec::new().no_disks().pin("hv1"))?;
    repo.commit("two VMs on hv1")?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    let deaf_pid = repo.qemu_on("hv1", "deaf")?;
    let steady = repo.qemu_on("hv1", "steady")?;
    repo.wait_serial("deaf", "tick 1", BOOT_TIMEOUT)?;

    let stopped = deaf().pin("hv1").power("stopped");
    let (out, took) = stop_with_fault(&repo, "deaf", "hv1", &stopped, || {
        let agent = repo.wait_host_agent("hv1", ACT)?;
        kill(Pid::from_raw(agent), Signal::SIGKILL).context("killing hv1's agent")
    })?;
    eprintln!("apply ended {took:.2?} after hv1's agent was killed mid-stop\n{out}");
    out.expect_code(1)?;
    ensure!(
        took < Duration::from_secs(10),
        "apply took {took:?} after the agent died (the stop timeout is 30 s)\n{out}"
    );
    let fail = out.fail_line("deaf")?;
    ensure!(
        fail.contains("host hv1 is unreachable"),
        "the FAIL line does not say hv1 is unreachable: {fail}\n{out}"
    );
    ensure!(
        !out.all().contains("panicked"),
        "the engine panicked\n{out}"
    );
    // No VM lost: the QEMU being stopped and its neighbour both run on.
    for (vm, pid) in [("deaf", deaf_pid), ("steady", steady)] {
        ensure!(
            is_alive(pid) && repo.qemu_on("hv1", vm)? == pid,
            "{vm}'s QEMU {pid} is gone after the agent died\n{out}"
        );
    }
    // Status: what runs on hv1 is unknown (never reported stopped on a guess), and why.
    for vm in ["deaf", "steady"] {
        let view = repo
            .vm_view(vm)?
            .with_context(|| format!("no status/vms/{vm}.toml"))?;
        ensure!(
            view.phase == "unknown" && view.message.contains("host hv1 is unreachable"),
            "the status of {vm} does not say hv1 is unreachable: {view}"
        );
    }
    let engine = repo.engine_status()?.context("no status/engine.toml")?;
    let last_error = engine
        .get("last_error")
        .and_then(|e| e.as_str())
        .unwrap_or("");
    ensure!(
        last_error.contains("host hv1 is unreachable"),
        "last_error does not say hv1 is unreachable: {last_error:?}"
    );

    // The next apply (a shorter stop timeout, not to wait 30 s) reaches a new agent and
    // converges: deaf stopped (quit after the timeout), steady untouched.
    repo.set_stop_timeout("2s")?;
    repo.commit("stop timeout 2s")?;
    let next = repo.run(&["apply", "--auto-approve"])?;
    next.expect_code(0)?;
    ensure!(!is_alive(deaf_pid), "deaf's QEMU still runs\n{next}");
    ensure!(
        repo.qemu_on("hv1", "steady")? == steady,
        "steady was restarted\n{next}"
    );
    repo.wait_vm("deaf", "phase stopped", ACT, |v| v.phase == "stopped")?;
    repo.run(&["plan", "--detailed-exitcode"])?.expect_code(0)?;
    Ok(())
}

#[test]
fn qemu_frozen_mid_stop_is_killed_as_the_last_resort() -> Result<()> {
    // The default test stop timeout: 2 s.
    let repo = TestRepo::with_vm("deaf", &deaf())?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    let pid = repo.wait_qemu_alive("deaf", ACT)?;
    repo.wait_serial("deaf", "tick 1", BOOT_TIMEOUT)?;

    let (out, took) = stop_with_fault(&repo, "deaf", "local", &deaf().power("stopped"), || {
        repo.freeze(pid)
    })?;
    eprintln!("apply ended {took:.2?} after deaf's QEMU was frozen mid-stop\n{out}");
    out.expect_code(0)?;
    // What stop promises: the power button, `quit` after the stop timeout, SIGKILL last;
    // one unanswered QMP command (10 s) is enough to know QEMU is frozen, so at most
    // 2 s + 10 s before the SIGKILL (it was 2 s + 3 × 10 s + 10 s before).
    ensure!(
        took < Duration::from_secs(20),
        "the stop of a frozen QEMU took {took:?}\n{out}"
    );
    ensure!(
        out.stdout.contains("QEMU did not quit and was killed"),
        "apply does not say the QEMU was killed\n{out}"
    );
    if is_alive(pid) {
        bail!("the frozen QEMU {pid} still exists\n{out}");
    }
    repo.wait_vm("deaf", "phase stopped", ACT, |v| v.phase == "stopped")?;
    repo.run(&["plan", "--detailed-exitcode"])?.expect_code(0)?;
    Ok(())
}
