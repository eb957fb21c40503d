//! Benchmark: host loss → the VM running elsewhere. Real daemon, two simulated hosts,
//! real QEMU (TCG), the tiny test guest.
//!
//! Run: `cargo bench -p plasmavmc-e2e --bench failover` (`FAILOVER_RUNS=N` changes the
//! number of runs with a fast heartbeat, `FAILOVER_DEFAULT_RUNS=N` the number with the
//! default one; `PLASMAVMC_BIN` picks the binary, default a release build).
//!
//! Each run is the scenario of `host_power_off_with_fence_command_recovers_ha_vms` in
//! `tests/failover.rs`, on a fresh repository: `ha1` (`ha = true`) and `plain`
//! (`ha = false`) run on hv1; hv1 is powered off (its agent, then its QEMUs, killed
//! with SIGKILL; its agent cannot start again); hv1's fence command exits 0. Times
//! from the power-off (wall clock just before the first kill) to:
//! - lost: the daemon's first line about hv1 (`agent channel closed` or `host
//!   unreachable`);
//! - reconcile: the first `reconcile` line after the power-off (its trigger is
//!   printed: `health` is the host health check);
//! - fenced: the `fenced` line of hv1;
//! - started: the `started` line of ha1's new QEMU (it answers QMP on hv2);
//! - first tick: the first `tick` line in ha1's new serial.log on hv2 (polled every
//!   5 ms by this process).
//!
//! Runs use `[heartbeat] interval = "200ms", down_after = "1s"`; the default settings
//! (1 s / 5 s) get their own runs. It prints figures; it asserts nothing.

use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use plasmavmc_e2e::bench::{env_count, machine, percentile, release_binary};
use plasmavmc_e2e::fault::{failover_repo, Fence};
use plasmavmc_e2e::{ticks, LogLine};

const RUNS: usize = 5;
const DEFAULT_RUNS: usize = 1;

/// The fast settings of the main runs.
const FAST: &str = "[heartbeat]\ninterval = \"200ms\"\ndown_after = \"1s\"\n";

/// Bound for one run's host loss → first tick.
const RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// One run, in milliseconds after the power-off.
#[derive(Debug, Clone)]
struct Sample {
    lost: f64,
    reconcile: f64,
    trigger: String,
    fenced: f64,
    started: f64,
    first_tick: f64,
}

fn main() -> Result<()> {
    let runs = env_count("FAILOVER_RUNS", RUNS)?;
    let default_runs = env_count("FAILOVER_DEFAULT_RUNS", DEFAULT_RUNS)?;
    let bin = release_binary()?;

    let mut fast = Vec::new();
    for i in 0..runs {
        let sample = run(FAST).with_context(|| format!("fast run {i}"))?;
        eprintln!("fast run {i}: {sample:?}");
        fast.push(sample);
    }
    let mut defaults = Vec::new();
    for i in 0..default_runs {
        let sample = run("").with_context(|| format!("default run {i}"))?;
        eprintln!("default run {i}: {sample:?}");
        defaults.push(sample);
    }
    report(&bin, &fast, &defaults);
    Ok(())
}

/// One power-off of hv1 on a fresh repository with `settings` in `plasmavmc.toml`.
fn run(settings: &str) -> Result<Sample> {
    let repo = failover_repo(
        Some(Fence::Kills),
        &[("ha1", true), ("plain", false)],
        settings,
    )?;
    let daemon = repo.watch(&[])?;
    let old = daemon.wait_running_on("ha1", "hv1")?;
    daemon.wait_running_on("plain", "hv1")?;

    let since = daemon.lines().len();
    let off = repo.power_off("hv1")?;
    let deadline = Instant::now() + RUN_TIMEOUT;
    let first_tick = loop {
        if !ticks(&repo.serial_on("hv2", "ha1")).is_empty() {
            break SystemTime::now();
        }
        if Instant::now() >= deadline || !daemon.is_running() {
            bail!(
                "no tick from ha1 on hv2 {RUN_TIMEOUT:?} after the power-off\n{}",
                daemon.describe()
            );
        }
        thread::sleep(Duration::from_millis(5));
    };
    let log = daemon.lines_since(since);
    let find = |what: &str, pred: &dyn Fn(&LogLine) -> bool| -> Result<LogLine> {
        log.iter()
            .find(|l| pred(l))
            .cloned()
            .with_context(|| format!("no {what} line\n{}", daemon.describe()))
    };
    let about_hv1 = |l: &LogLine| l.str("host") == Some("hv1");
    let lost = find("agent channel closed / host unreachable", &|l| {
        about_hv1(l) && (l.is("agent channel closed", None) || l.is("host unreachable", None))
    })?;
    let reconcile = find("reconcile", &|l| l.is("reconcile", None))?;
    let fenced = find("fenced", &|l| about_hv1(l) && l.is("fenced", None))?;
    let started = find("started (ha1, new pid)", &|l| {
        l.is("started", Some("ha1")) && l.int("pid").is_some_and(|p| p != i64::from(old))
    })?;
    let sample = Sample {
        lost: lost.ms_after(off)?,
        reconcile: reconcile.ms_after(off)?,
        trigger: reconcile.str("trigger").unwrap_or("?").to_owned(),
        fenced: fenced.ms_after(off)?,
        started: started.ms_after(off)?,
        first_tick: first_tick
            .duration_since(off)
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3,
    };
    drop(daemon);
    repo.cleanup()?;
    Ok(sample)
}

/// How to read one figure from a sample.
type Figure = fn(&Sample) -> f64;

fn report(bin: &str, fast: &[Sample], defaults: &[Sample]) {
    println!("\nplasmavmc watch: host loss → VM running on another host");
    println!("binary      {bin}");
    for (k, v) in machine() {
        println!("{k:<11} {v}");
    }
    println!("scenario    2 simulated hosts; ha1 (ha) + plain on hv1, 96 MB each, TCG; hv1 powered off, fence command exits 0");
    let figures: [(&str, Figure); 5] = [
        ("lost (hv1 line)", |s| s.lost),
        ("first reconcile", |s| s.reconcile),
        ("fenced", |s| s.fenced),
        ("started on hv2", |s| s.started),
        ("first tick on hv2", |s| s.first_tick),
    ];
    for (title, samples) in [
        ("heartbeat 200ms, down_after 1s", fast),
        ("defaults: heartbeat 1s, down_after 5s", defaults),
    ] {
        if samples.is_empty() {
            continue;
        }
        let mut triggers: Vec<&str> = samples.iter().map(|s| s.trigger.as_str()).collect();
        triggers.dedup();
        println!(
            "\n{title}: {} runs; first reconcile trigger(s): {triggers:?}",
            samples.len()
        );
        println!(
            "{:<28} {:>10} {:>10} {:>10}",
            "power-off → (ms)", "min", "median", "max"
        );
        for (name, f) in figures {
            let values: Vec<f64> = samples.iter().map(f).collect();
            println!(
                "{name:<28} {:>10.0} {:>10.0} {:>10.0}",
                percentile(&values, 1),
                percentile(&values, 50),
                percentile(&values, 100),
            );
        }
    }
}
