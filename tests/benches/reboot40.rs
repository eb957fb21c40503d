//! Benchmark: a host reboot with 40 VMs — their QEMUs die while the engine is down —
//! until all 40 answer QMP again; and raw QEMU starting the same 40. Real daemon, one
//! simulated host, real QEMU (TCG), the tiny test guest.
//!
//! Run: `cargo bench -p plasmavmc-e2e --bench reboot40` (`REBOOT_VMS=N` VMs, default
//! 40; `REBOOT_RUNS=N` reboots, default 3; `REBOOT_PER_HOST=N` sets `[concurrency]
//! per_host`, default the engine's default; `REBOOT_TIMELINE=DIR` writes the new
//! daemon's log lines, each with its ms after the spawn, to `DIR/reboot-<n>.log`;
//! `PLASMAVMC_BIN` picks the binary, default a release build).
//!
//! The VMs (96 MiB, no disk, `restart = "always"`) run on hv1, an agent of the binary
//! under test through `exec`. Each run: every VM is `running` (its QEMU answered
//! QMP; under a boot storm of TCG guests not every guest ticks yet); the daemon's process group
//! (the daemon and its agent) is killed with SIGKILL, then every QEMU; a new daemon is
//! started (wall clock just before the spawn) and its "started" lines give each VM's
//! time to QMP-ready (the engine's start: spawn, QMP answers, vCPUs running). Then the
//! same 40 command lines (read from `/proc` before the kill, each run in its instance
//! folder as the engine ran it) are started by hand, all at once, and each waited for
//! until QMP answers and `query-status` says running; the last of the 40 is the raw
//! figure. A run where the engine fails starts (its agent silent too long under the
//! start-up storm: "host unreachable") says how many and has no engine figure. Goals
//! (issue 17): all 40 ≤ 2 s; engine / raw ≤ 1.1×. It prints figures; it asserts
//! nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use plasmavmc_e2e::bench::{env_count, machine, percentile, release_binary};
use plasmavmc_e2e::fleet::{
    fleet_repo, load_average, per_host_setting, qemu_lines, raw_starts, round_robin, started_since,
    timeline, wait_all_running, EAGER_RESTART,
};
use plasmavmc_e2e::{Daemon, LogLine, TestRepo};

const VMS: usize = 40;
const RUNS: usize = 3;
/// Bound for 40 TCG boots on two shared cores.
const BOOT_ALL: Duration = Duration::from_secs(600);
/// Bound for one QEMU to answer QMP.
const QMP_UP: Duration = Duration::from_secs(120);

/// One run, in milliseconds.
#[derive(Debug)]
struct Run {
    /// Daemon spawn → each VM's "started" line, sorted.
    engine: Vec<f64>,
    /// VMs whose start failed instead (none in a good run).
    failed: usize,
    /// Spawn of the first raw QEMU → each raw QEMU running, sorted.
    raw: Vec<f64>,
    load: String,
}

fn main() -> Result<()> {
    let vms = env_count("REBOOT_VMS", VMS)?;
    let runs = env_count("REBOOT_RUNS", RUNS)?;
    let per_host = per_host_setting("REBOOT_PER_HOST")?;
    let bin = release_binary()?;
    let placed = round_robin(vms, 1);
    let repo = fleet_repo(1, &placed, &format!("{EAGER_RESTART}{per_host}"))?;
    let mut done = Vec::new();
    for i in 0..runs {
        let run = one(&repo, &placed).with_context(|| format!("run {i}"))?;
        eprintln!(
            "run {i}: engine last {:.0} ms, raw last {:.0} ms",
            run.engine.last().copied().unwrap_or(f64::NAN),
            run.raw.last().copied().unwrap_or(f64::NAN)
        );
        done.push(run);
    }
    report(&bin, vms, &per_host, &done);
    repo.cleanup()?;
    Ok(())
}

fn one(repo: &TestRepo, placed: &[(String, String)]) -> Result<Run> {
    // Start (or, after a previous run's raw QEMUs were killed, restart) the 40: QMP-ready
    // is what is measured, so guests still booting do not matter.
    let daemon = repo.watch(&[])?;
    let pids = wait_all_running(&daemon, placed, BOOT_ALL)?;
    let lines = qemu_lines(pids.values().copied())?;
    // The reboot: engine and agent gone, then every QEMU.
    drop(daemon);
    repo.wait_agents_exit("the daemon's process group was killed")?;
    repo.kill_host_qemus("hv1")?;

    let load = load_average();
    let spawned = SystemTime::now();
    let daemon = repo.watch(&[])?;
    let (started, failed) = wait_started_or_failed(&daemon, placed)?;
    timeline("REBOOT_TIMELINE", "reboot", &daemon.lines(), spawned)?;
    let mut engine: Vec<f64> = started
        .values()
        .map(|l| l.ms_after(spawned))
        .collect::<Result<_>>()?;
    engine.sort_by(f64::total_cmp);
    drop(daemon);
    repo.wait_agents_exit("the daemon's process group was killed")?;
    repo.kill_host_qemus("hv1")?;

    let raw = raw_starts(&lines, QMP_UP)?;
    repo.kill_host_qemus("hv1")?;
    Ok(Run {
        engine,
        failed,
        raw,
        load,
    })
}

/// Waits until each VM of `placed` has a "started" line or a failed start (`failed`,
/// `op = start`) in the daemon's log; returns the "started" lines by VM and how many
/// starts failed (a failed start is not retried at once: its VM may run all the same,
/// adopted by the next look, with no "started" line).
fn wait_started_or_failed(
    daemon: &Daemon<'_>,
    placed: &[(String, String)],
) -> Result<(BTreeMap<String, LogLine>, usize)> {
    daemon.poll(
        format!(
            "a \"started\" line or a failed start for each of {} VMs",
            placed.len()
        ),
        BOOT_ALL,
        || {
            let lines = daemon.lines();
            let failed: BTreeSet<&str> = lines
                .iter()
                .filter(|l| l.is("failed", None) && l.str("op") == Some("start"))
                .filter_map(|l| l.str("vm"))
                .collect();
            let seen = started_since(daemon, 0);
            placed
                .iter()
                .all(|(vm, _)| seen.contains_key(vm) || failed.contains(vm.as_str()))
                .then(|| {
                    let n = placed
                        .iter()
                        .filter(|(vm, _)| !seen.contains_key(vm))
                        .count();
                    (seen, n)
                })
        },
    )
}

fn report(bin: &str, vms: usize, per_host: &str, runs: &[Run]) {
    println!("\nhost reboot: {vms} VMs whose QEMUs died while the engine was down → all QMP-ready");
    println!("binary      {bin}");
    let bound = if per_host.is_empty() {
        "the default"
    } else {
        per_host.trim()
    };
    println!("concurrency {}", bound.replace('\n', " "));
    for (k, v) in machine() {
        println!("{k:<11} {v}");
    }
    println!(
        "\n{:<5} {:>14} {:>14} {:>14} {:>14} {:>14} {:>8} {:>14}  load average",
        "run",
        "engine first",
        "engine median",
        "engine last",
        "raw median",
        "raw last",
        "ratio",
        "failed starts"
    );
    let mut ratios = Vec::new();
    let mut lasts = Vec::new();
    let mut raw_lasts = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        // A run with failed starts has no "last start": its figure is not comparable.
        let e = if r.failed == 0 {
            r.engine.last().copied().unwrap_or(f64::NAN)
        } else {
            f64::NAN
        };
        let w = r.raw.last().copied().unwrap_or(f64::NAN);
        ratios.push(e / w);
        lasts.push(e);
        raw_lasts.push(w);
        println!(
            "{i:<5} {:>11.0} ms {:>11.0} ms {:>11.0} ms {:>11.0} ms {:>11.0} ms {:>7.2}× {:>14}  {}",
            percentile(&r.engine, 1),
            percentile(&r.engine, 50),
            e,
            percentile(&r.raw, 50),
            w,
            e / w,
            r.failed,
            r.load
        );
    }
    println!(
        "\nall {vms} QMP-ready: engine {:.0} ms median of runs (goal ≤ 2000), raw {:.0} ms, engine / raw {:.2}× (goal ≤ 1.1×)",
        percentile(&lasts, 50),
        percentile(&raw_lasts, 50),
        percentile(&ratios, 50)
    );
}
