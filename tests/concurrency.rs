//! Healing never waits for a long action, end to end: simulated hosts (agents on roots
//! of their own, one shared-storage pool), real QEMU (TCG), the tiny test guest, and
//! `plasmavmc watch`.
//!
//! What this file proves:
//! - a QEMU killed with `kill -9` while another VM moves live at a crawl (3 MiB/s:
//!   about 30 s for the test guest) from the same host is running again while that
//!   move still runs — restarted in its normal time, not when the move ends — and the
//!   move then ends with exactly one copy of each VM.
//!
//! Every test has its own repository, state dir and host roots in a temp folder; the
//! cleanup kills every process under it, even on failure.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use plasmavmc_e2e::proc::kill_and_wait;
use plasmavmc_e2e::{is_alive, HostSpec, TestRepo, VmSpec, ACT_TIMEOUT};

/// Memory of every test VM: the least the test guest boots with.
const VM_MB: u64 = 96;

/// Crash → running again, on an idle engine about 0.1 s (BENCHMARKS.md): 10× and more
/// for a loaded 2-core machine and a debug build.
const HEAL: Duration = Duration::from_secs(10);

/// Bound for the crawling move of a test guest (about 30 s at 3 MiB/s).
const MOVE_TIMEOUT: Duration = Duration::from_secs(180);

#[test]
fn a_crash_is_healed_while_another_vm_moves_slowly() -> Result<()> {
    let repo = TestRepo::new()?;
    let pool = repo.root().join("shared");
    std::fs::create_dir_all(&pool)?;
    for name in ["hv1", "hv2"] {
        repo.write_host(name, &HostSpec::agent().memory(2048).shared(&pool, "pool1"))?;
    }
    repo.set_cluster_settings("[migration]\nmax_bandwidth_mib = 3\n")?;
    let web = VmSpec::new().memory(VM_MB);
    let db = VmSpec::new().no_disks().memory(VM_MB).pin("hv1");
    repo.write_vm("web", &web.clone().pin("hv1"))?;
    repo.write_vm("db", &db)?;
    repo.commit("web and db on hv1")?;
    let daemon = repo.watch(&[])?;
    let source = daemon.wait_running_on("web", "hv1")?;
    let old = daemon.wait_running_on("db", "hv1")?;

    repo.write_vm("web", &web.clone().pin("hv2"))?;
    repo.commit("move web to hv2")?;
    repo.wait_vm("web", "migrating, with its progress", MOVE_TIMEOUT, |v| {
        v.phase == "migrating" && v.message.contains("MiB sent") && v.message.contains("to hv2")
    })?;

    let killed = Instant::now();
    kill_and_wait(old, Duration::from_secs(5))?;
    let new = daemon.poll("a new live QEMU for db on hv1", HEAL, || {
        repo.qemu_on("hv1", "db")
            .ok()
            .filter(|&p| p != old && is_alive(p))
    })?;
    let healed = killed.elapsed();
    // The move is still under way: its source runs and holds its instance on hv1.
    let moving = is_alive(source) && repo.instance_dir_on("hv1", "web").exists();
    eprintln!(
        "kill -9 -> new QEMU alive during the move: {healed:?} (move still running: {moving})"
    );
    ensure!(
        moving,
        "the slow move of web ended before db was running again: the crash waited for it\n{}",
        daemon.describe()
    );
    repo.wait_vm(
        "db",
        "db running again with the new pid",
        ACT_TIMEOUT,
        |v| v.phase == "running" && v.pid == Some(new),
    )?;

    // The move ends as it would have: one copy of web, on hv2; one of db.
    daemon.wait("web moved to hv2, hv1's copy removed", MOVE_TIMEOUT, || {
        repo.hosts_with_instance("web") == ["hv2"]
    })?;
    let view = repo.wait_vm("web", "running on hv2", ACT_TIMEOUT, |v| {
        v.phase == "running" && v.host == "hv2"
    })?;
    ensure!(
        view.pid.is_some_and(|p| repo.qemus_of("web") == [p]),
        "web's QEMUs are {:?}, its status says {:?}",
        repo.qemus_of("web"),
        view.pid
    );
    ensure!(
        repo.qemus_of("db") == [new],
        "db's QEMUs are {:?}, expected only {new}",
        repo.qemus_of("db")
    );
    Ok(())
}
