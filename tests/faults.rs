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
//!   `apply` exits 1 within seconds naming the host as unreachable, status says so,
//!   both QEMUs of that host keep running (the one being stopped too: no VM lost, and
//!   the other is never touched), and the next `apply` converges;
//! - **QMP dropped**: the QEMU of a guest that ignores the ACPI power button is
//!   frozen (SIGSTOP) once its stop began: its QMP commands time out, and the stop
//!   ends as designed: `quit` unanswered, then SIGKILL, reported as "QEMU did not quit
//!   and was killed", with a bounded `apply` that exits 0 and a next plan that is
//!   empty.
//!
//! Each test has its own repository, state dir and hosts in a temp folder and kills
//! every process it started, even when it fails; the tmpfs is unmounted by the same
//! cleanup (see `tests/harness/`).

use std::fs;

use anyhow::{ensure, Context, Result};
use plasmavmc_e2e::{is_alive, HostSpec, TestRepo, VmSpec, ACT_TIMEOUT as ACT, BOOT_TIMEOUT};

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
    let fail = apply
        .stdout
        .lines()
        .find(|l| l.contains("FAIL") && l.contains("big"))
        .with_context(|| format!("no FAIL line for big\n{apply}"))?;
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
