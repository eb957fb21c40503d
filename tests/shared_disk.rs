//! A fence that lies, with the VM's disk on shared storage: QEMU's image lock as the
//! last line of defence, end to end. `plasmavmc watch`, two simulated hosts in one
//! storage pool sharing one folder (`<tmp>/shared`), real QEMU (TCG), the tiny guest.
//! Heartbeat every 200 ms, a host is down after 1 s of silence.
//!
//! What this file proves: an `ha` VM whose disk is on shared storage runs on hv1; hv1
//! is partitioned (agent stopped, its QEMU running on) and its fence command exits 0
//! without powering anything off. The recovery on hv2 is refused because another QEMU
//! holds the disk's image lock — before any second QEMU of the VM is spawned — and the
//! VM is `failed` with a message that names the image lock and hv1, the host that may
//! still run it; it is tried once, never again. No second QEMU of the VM ever exists
//! (sampled every 50 ms). When hv1 comes back, its copy is the one kept (same QEMU,
//! never restarted) and hv2's never-started instance is removed without touching the
//! shared disk: the disk file is still there, the same file, held open by hv1's QEMU.
//!
//! Every test has its own repository, state dir, host roots and shared folder in a
//! temp folder; the cleanup resumes stopped agents and kills every process under it,
//! even on failure.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use plasmavmc_e2e::fault::{shared_failover_repo, Fence};
use plasmavmc_e2e::proc::open_files;
use plasmavmc_e2e::{is_alive, CopyWatch, Daemon, LogLine, TestRepo, VmSpec};

/// Fast host health for tests.
const HEARTBEAT: &str = "[heartbeat]\ninterval = \"200ms\"\ndown_after = \"1s\"\n";

/// Bound for host loss → the recovery attempt on hv2, and for a returning host's stale
/// copy to be removed: 10× the ~1.5 s they should take.
const RECOVER: Duration = Duration::from_secs(15);

/// Bound for one SIGHUP-triggered reconcile to start.
const RESYNC: Duration = Duration::from_secs(30);

/// A "failed" line of the executor for a start of `vm`.
fn start_failed(vm: &str) -> impl Fn(&LogLine) -> bool + '_ {
    move |l| l.is("failed", Some(vm)) && l.str("op") == Some("start")
}

/// The shared disk of ha1 as hv1's QEMU uses it: its path (canonical, as `/proc` shows
/// it) and inode.
struct InUse {
    path: PathBuf,
    inode: u64,
}

impl InUse {
    /// Checks that `qemu` holds the disk at `path` open; remembers which file it is.
    fn of(qemu: i32, path: &Path) -> Result<Self> {
        let inode = std::fs::metadata(path)
            .with_context(|| format!("ha1's shared disk {}", path.display()))?
            .ino();
        let disk = Self {
            path: path.canonicalize()?,
            inode,
        };
        disk.still_used_by(qemu)?;
        Ok(disk)
    }

    /// Fails unless the disk is still there, the same file, open in `qemu`.
    fn still_used_by(&self, qemu: i32) -> Result<()> {
        let meta = std::fs::metadata(&self.path)
            .with_context(|| format!("ha1's shared disk {} is gone", self.path.display()))?;
        ensure!(
            meta.ino() == self.inode,
            "ha1's shared disk was replaced (inode {} → {})",
            self.inode,
            meta.ino()
        );
        ensure!(
            open_files(qemu).contains(&self.path),
            "QEMU {qemu} does not hold ha1's shared disk {}",
            self.path.display()
        );
        Ok(())
    }
}

/// hv1 is cut off (`old` keeps running there) and "fenced" by its lying command: the
/// recovery on hv2 must be refused by the image lock, reported, and never retried.
/// Returns hv1's stopped agent.
fn refused_by_the_lock(
    repo: &TestRepo,
    daemon: &Daemon<'_>,
    copies: &mut CopyWatch<'_>,
    old: i32,
) -> Result<i32> {
    let since = daemon.lines().len();
    let agent = repo.partition("hv1")?;
    let failed = repo.wait_vm("ha1", "failed on hv2: its disk is locked", RECOVER, |v| {
        copies.sample();
        v.phase == "failed"
    })?;
    ensure!(
        repo.fence_runs("hv1") >= 1 && repo.fenced_by("hv1")?.as_deref() == Some("fence command"),
        "hv1 was not fenced by its (lying) fence command: {:?}",
        repo.fence_record("hv1")?
    );
    ensure!(
        failed.host == "hv2"
            && failed
                .message
                .contains("in use by another QEMU (image lock")
            && failed
                .message
                .contains("Failed to get shared \"write\" lock")
            && failed.message.contains("do not answer: hv1 (hv1 fenced"),
        "ha1's status should name the image lock and hv1, where it may still run:\n{failed}"
    );
    ensure!(
        failed.has_event("start-failed", "image lock")
            && failed.has_event("start-failed", "may still run elsewhere"),
        "ha1 has no start-failed event naming the image lock:\n{failed}"
    );
    ensure!(
        repo.last_error().contains("ha1: failed: not started"),
        "engine.toml's last_error does not say why ha1 does not run: {}",
        repo.last_error()
    );

    // Never tried again: three more reconciles, still one attempt, no QEMU on hv2.
    for _ in 0..3 {
        daemon.hup_then(RESYNC, || {
            copies.sample();
        })?;
    }
    let attempts = daemon
        .lines_since(since)
        .iter()
        .filter(|l| start_failed("ha1")(l))
        .count();
    ensure!(
        attempts == 1,
        "ha1's start on hv2 was attempted {attempts} times, expected once\n{}",
        daemon.describe()
    );
    ensure!(
        repo.host_qemus("hv2").is_empty() && repo.serial_on("hv2", "ha1").is_empty(),
        "a QEMU ran on hv2: QEMUs {:?}, console {:?}",
        repo.host_qemus("hv2"),
        repo.serial_on("hv2", "ha1")
    );
    ensure!(
        repo.qemus_of("ha1") == [old] && is_alive(old),
        "ha1's QEMUs are {:?}, expected only the original {old} on hv1",
        repo.qemus_of("ha1")
    );
    Ok(agent)
}

/// hv1 comes back (its `agent` resumed): its copy `old` is kept, never restarted, and
/// hv2's never-started instance is removed; nothing is retained anywhere.
fn holder_returns(
    repo: &TestRepo,
    daemon: &Daemon<'_>,
    copies: &mut CopyWatch<'_>,
    old: i32,
    agent: i32,
) -> Result<()> {
    let since = daemon.lines().len();
    repo.resume(agent)?;
    copies
        .wait_until(
            "hv2's instance of ha1 removed, hv1's copy the only one",
            RECOVER,
            |pids| pids == [old] && !repo.instance_dir_on("hv2", "ha1").exists(),
        )
        .with_context(|| daemon.describe())?;
    let view = repo.wait_vm("ha1", "running on hv1, the same QEMU", RECOVER, |v| {
        copies.sample();
        v.phase == "running" && v.host == "hv1" && v.pid == Some(old)
    })?;
    ensure!(view.restarts == 0, "ha1 was restarted:\n{view}");
    ensure!(
        daemon
            .lines_since(since)
            .iter()
            .any(|l| l.is("done", Some("ha1")) && l.str("op") == Some("delete")),
        "no \"done\" line for the delete of hv2's instance\n{}",
        daemon.describe()
    );
    daemon.wait_rejoined("hv1", RECOVER)?;
    for host in ["hv1", "hv2"] {
        let kept: Vec<PathBuf> = std::fs::read_dir(repo.host_root(host).join("retained"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        ensure!(kept.is_empty(), "disks were retained on {host}: {kept:?}");
    }
    Ok(())
}

#[test]
fn lying_fence_with_a_shared_disk_is_stopped_by_the_image_lock() -> Result<()> {
    let spec = VmSpec::new()
        .no_disks()
        .disk("data", 1)
        .shared_disks()
        .memory(96)
        .ha(true);
    let repo = shared_failover_repo(Some(Fence::Lies), &[("ha1", spec)], HEARTBEAT)?;
    let daemon = repo.watch(&[])?;
    let old = daemon.wait_running_on("ha1", "hv1")?;
    let disk = InUse::of(old, &repo.shared_dir().join("ha1").join("data.qcow2"))?;
    let mut copies = CopyWatch::new(&repo, "ha1");

    let agent = refused_by_the_lock(&repo, &daemon, &mut copies, old)?;
    holder_returns(&repo, &daemon, &mut copies, old, agent)?;

    disk.still_used_by(old)?;
    copies.ensure_never_two()?;
    println!("lying fence, shared disk: {}", copies.summary());
    Ok(())
}
