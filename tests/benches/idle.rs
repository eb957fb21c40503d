//! Benchmark: the `watch` daemon idle with 50 running VMs on 3 simulated hosts — its
//! CPU and memory, and each agent's. Real daemon, real QEMU (TCG), the tiny test guest.
//!
//! Run: `cargo bench -p plasmavmc-e2e --bench idle` (`IDLE_VMS=N` VMs, default 50;
//! `IDLE_SETTLE_S` seconds waited once every guest ticks, default 20; `IDLE_WINDOW_S`
//! seconds measured, default 60; `PLASMAVMC_BIN` picks the binary, default a release
//! build).
//!
//! The VMs (96 MiB, no disk, pinned round-robin to hv1..hv3, each host an agent of the
//! binary under test through `exec`) are applied by the daemon itself; once every one
//! is `running` and has a tick on its console (or 10 minutes passed: how many tick is
//! printed), the bench waits `IDLE_SETTLE_S` for the boots to settle, then reads `/proc/<pid>/stat` (user + system time, all threads)
//! of the daemon and of each agent at the start and the end of the window: CPU is that
//! time over the window, in % of one core. RSS is `VmRSS` at the end (and `VmHWM`, the
//! peak). The machine's load average is printed: the 50 guests themselves keep the two
//! cores busy. Goals (issue 17): daemon < 1 % of one core, < 40 MB RSS; each agent's
//! printed beside. It prints figures; it asserts nothing.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use plasmavmc_e2e::bench::{env_count, machine, release_binary};
use plasmavmc_e2e::fleet::{
    clock_ticks, cpu_ticks, fleet_repo, load_average, round_robin, rss_kib, ticking,
    wait_all_running, wait_ticking, EAGER_RESTART,
};

const VMS: usize = 50;
const HOSTS: usize = 3;
const SETTLE_S: usize = 20;
const WINDOW_S: usize = 60;

/// Bound for the daemon to start every VM, and then for every guest to tick (50 TCG
/// boots on two shared cores take minutes; past it the window starts all the same).
const BOOT_ALL: Duration = Duration::from_secs(600);

/// One process's figures over the window.
struct Usage {
    who: String,
    pid: i32,
    cpu_pct: f64,
    rss_mib: f64,
    peak_mib: f64,
}

fn main() -> Result<()> {
    let vms = env_count("IDLE_VMS", VMS)?;
    let settle = env_count("IDLE_SETTLE_S", SETTLE_S)?;
    let window = env_count("IDLE_WINDOW_S", WINDOW_S)?;
    let bin = release_binary()?;

    let placed = round_robin(vms, HOSTS);
    let repo = fleet_repo(HOSTS, &placed, EAGER_RESTART)?;
    let daemon = repo.watch(&[])?;
    let t0 = Instant::now();
    let pids = wait_all_running(&daemon, &placed, BOOT_ALL)?;
    let running = t0.elapsed();
    let ticked = wait_ticking(&repo, &placed, BOOT_ALL);
    let booted = t0.elapsed();
    eprintln!(
        "all {vms} VMs running after {:.1} s, {ticked} ticking after {:.1} s; settling {settle} s",
        running.as_secs_f64(),
        booted.as_secs_f64()
    );
    // The measurement window, not a synchronisation: the boots settle, then the idle
    // daemon is watched for a fixed time.
    thread::sleep(Duration::from_secs(u64::try_from(settle)?));

    let mut procs = vec![("daemon".to_owned(), daemon.pid())];
    for h in 1..=HOSTS {
        let host = format!("hv{h}");
        for pid in repo.host_agents(&host) {
            procs.push((format!("agent {host}"), pid));
        }
    }
    let ticking_before = ticking(&repo, &placed);
    let load_before = load_average();
    let before: Vec<u64> = procs
        .iter()
        .map(|(_, pid)| cpu_ticks(*pid))
        .collect::<Result<_>>()?;
    let started = Instant::now();
    thread::sleep(Duration::from_secs(u64::try_from(window)?));
    let span = started.elapsed().as_secs_f64();
    let hz = clock_ticks();
    let mut usage = Vec::new();
    for ((who, pid), was) in procs.iter().zip(before) {
        let now = cpu_ticks(*pid).with_context(|| format!("{who} (pid {pid}) ended"))?;
        let (rss, peak) = rss_kib(*pid)?;
        let cpu_pct = (now - was) as f64 / hz / span * 100.0;
        usage.push(Usage {
            who: who.clone(),
            pid: *pid,
            cpu_pct,
            rss_mib: rss as f64 / 1024.0,
            peak_mib: peak as f64 / 1024.0,
        });
    }
    let load_after = load_average();
    let restarted = pids
        .iter()
        .filter(|(vm, pid)| {
            repo.vm_view(vm)
                .ok()
                .flatten()
                .is_none_or(|v| v.pid != Some(**pid))
        })
        .count();

    println!("\nplasmavmc watch idle: {vms} running VMs on {HOSTS} hosts");
    println!("binary      {bin}");
    for (k, v) in machine() {
        println!("{k:<11} {v}");
    }
    println!(
        "boot        all {vms} running (QMP) {:.1} s after the daemon started, {ticked} ticking after {:.1} s; settled {settle} s; {ticking_before} ticking at the window's start",
        running.as_secs_f64(),
        booted.as_secs_f64()
    );
    println!("window      {span:.1} s; load average {load_before} before, {load_after} after");
    println!("VMs whose QEMU changed during the window: {restarted}");
    println!(
        "\n{:<12} {:>8} {:>12} {:>10} {:>10}  goal",
        "process", "pid", "CPU (% core)", "RSS (MiB)", "peak (MiB)"
    );
    for u in &usage {
        let goal = if u.who == "daemon" {
            "< 1 %, < 40 MB"
        } else {
            ""
        };
        println!(
            "{:<12} {:>8} {:>12.2} {:>10.1} {:>10.1}  {goal}",
            u.who, u.pid, u.cpu_pct, u.rss_mib, u.peak_mib
        );
    }
    drop(daemon);
    repo.cleanup()?;
    Ok(())
}
