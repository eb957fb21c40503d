//! Benchmark: `plasmavmc apply --auto-approve` of 100 new VMs over 4 simulated hosts,
//! until it exits 0 with all 100 QMP-ready; and raw QEMU starting the same 100. Real
//! binary, real QEMU (TCG), the tiny test guest.
//!
//! Run: `cargo bench -p plasmavmc-e2e --bench apply100` (`APPLY_VMS=N` VMs, default
//! 100; `APPLY_RUNS=N` runs, default 1; `APPLY_PIN=1` pins the VMs round-robin instead
//! of letting the engine place them; `APPLY_PER_HOST=N` sets `[concurrency] per_host`;
//! `APPLY_OUT=FILE` keeps apply's output; `PLASMAVMC_BIN` picks the binary, default a
//! release build).
//!
//! Each run, on a fresh repository: one commit with hosts hv1..hv4 (agents of the
//! binary under test through `exec`, 64 vCPUs each) and the VMs (96 MiB, no disk,
//! `restart = "always"`; placed by the engine unless `APPLY_PIN`). Engine: the wall time
//! from spawning `apply --auto-approve` until it exited 0 and every VM's status says
//! `running` with the pid of a live QEMU (each start waited for QMP and vCPUs running).
//! Raw: the same command lines (read from `/proc`), each in its instance folder,
//! spawned at once after the engine's QEMUs are gone; the time to the last one
//! answering QMP with `query-status` running. It prints figures; it asserts nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use plasmavmc_e2e::bench::{env_count, machine, percentile, release_binary};
use plasmavmc_e2e::fleet::{
    fleet_host, load_average, per_host_setting, poll_fast, qemu_lines, raw_starts, small_vm,
    unpinned_vm, EAGER_RESTART,
};
use plasmavmc_e2e::{is_alive, TestRepo};

const VMS: usize = 100;
const HOSTS: usize = 4;
const RUNS: usize = 1;
/// Bound for the apply of 100 TCG guests on two shared cores.
const APPLY_ALL: Duration = Duration::from_secs(1200);
/// Bound for one raw QEMU to answer QMP.
const QMP_UP: Duration = Duration::from_secs(300);

/// One run.
#[derive(Debug)]
struct Run {
    /// Spawn of `apply` → it exited 0, ms.
    apply: f64,
    /// Spawn of `apply` → every VM `running` with a live QEMU, ms.
    ready: f64,
    /// The `start` steps' own times as `apply` printed them, sorted, ms.
    starts: Vec<f64>,
    /// The `create` steps' own times, sorted, ms.
    creates: Vec<f64>,
    /// VMs per host.
    spread: BTreeMap<String, usize>,
    /// Spawn of the first raw QEMU → each raw QEMU running, sorted, ms.
    raw: Vec<f64>,
    load: String,
    mem_available: String,
}

fn main() -> Result<()> {
    let vms = env_count("APPLY_VMS", VMS)?;
    let runs = env_count("APPLY_RUNS", RUNS)?;
    let pin = std::env::var("APPLY_PIN").is_ok_and(|v| v == "1");
    let per_host = per_host_setting("APPLY_PER_HOST")?;
    let bin = release_binary()?;
    let mut done = Vec::new();
    for i in 0..runs {
        let run = one(vms, pin, &per_host).with_context(|| format!("run {i}"))?;
        eprintln!(
            "run {i}: apply {:.0} ms, all ready {:.0} ms, raw last {:.0} ms",
            run.apply,
            run.ready,
            run.raw.last().copied().unwrap_or(f64::NAN)
        );
        done.push(run);
    }
    report(&bin, vms, pin, &per_host, &done);
    Ok(())
}

fn one(vms: usize, pin: bool, per_host: &str) -> Result<Run> {
    let repo = TestRepo::new()?;
    let result = measure(&repo, vms, pin, per_host);
    repo.cleanup()?;
    result
}

fn measure(repo: &TestRepo, vms: usize, pin: bool, per_host: &str) -> Result<Run> {
    repo.set_cluster_settings(&format!("{EAGER_RESTART}{per_host}"))?;
    for h in 1..=HOSTS {
        repo.write_host(&format!("hv{h}"), &fleet_host())?;
    }
    let names: Vec<String> = (0..vms).map(|i| format!("vm-{i:03}")).collect();
    for (i, vm) in names.iter().enumerate() {
        let spec = if pin {
            small_vm(&format!("hv{}", 1 + i % HOSTS))
        } else {
            unpinned_vm()
        };
        repo.write_vm(vm, &spec)?;
    }
    repo.commit(&format!("{vms} new VMs on {HOSTS} hosts"))?;

    let load = load_average();
    let mem_available = mem_available();
    let t0 = Instant::now();
    let out = repo
        .spawn(&["apply", "--auto-approve"])?
        .finish(APPLY_ALL)?;
    let apply = t0.elapsed().as_secs_f64() * 1e3;
    out.expect_code(0)?;
    let mut pids = BTreeMap::new();
    poll_fast(format!("all {vms} VMs running"), APPLY_ALL, || {
        for vm in &names {
            if pids.contains_key(vm) {
                continue;
            }
            let view = repo.vm_view(vm).ok().flatten()?;
            let pid = view
                .pid
                .filter(|&p| view.phase == "running" && is_alive(p))?;
            pids.insert(vm.clone(), (pid, view.host));
        }
        Some(())
    })?;
    let ready = t0.elapsed().as_secs_f64() * 1e3;
    let mut spread = BTreeMap::new();
    for (_, host) in pids.values() {
        *spread.entry(host.clone()).or_insert(0) += 1;
    }
    if let Some(path) = std::env::var_os("APPLY_OUT") {
        std::fs::write(&path, &out.stdout).context("writing APPLY_OUT")?;
    }
    let mut starts = step_times(&out.stdout, "start");
    starts.sort_by(f64::total_cmp);
    let mut creates = step_times(&out.stdout, "create");
    creates.sort_by(f64::total_cmp);

    let lines = qemu_lines(pids.values().map(|(pid, _)| *pid))?;
    for h in 1..=HOSTS {
        repo.kill_host_qemus(&format!("hv{h}"))?;
    }
    let raw = raw_starts(&lines, QMP_UP)?;
    Ok(Run {
        apply,
        ready,
        starts,
        creates,
        spread,
        raw,
        load,
        mem_available,
    })
}

/// The times of the `op` steps in `apply`'s output
/// (`  ok   start vm-000 (0.12s): running, pid 7`), in ms.
fn step_times(stdout: &str, op: &str) -> Vec<f64> {
    let prefix = format!("ok   {op} ");
    stdout
        .lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix(prefix.as_str())?;
            let open = rest.find(" (")? + 2;
            let close = rest[open..].find("s)")? + open;
            rest[open..close].parse::<f64>().ok().map(|s| s * 1e3)
        })
        .collect()
}

/// `MemAvailable` of `/proc/meminfo`.
fn mem_available() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned())
}

fn report(bin: &str, vms: usize, pin: bool, per_host: &str, runs: &[Run]) {
    println!("\napply --auto-approve: {vms} new VMs on {HOSTS} hosts → exit 0, all QMP-ready");
    println!("binary      {bin}");
    for (k, v) in machine() {
        println!("{k:<11} {v}");
    }
    let placement = if pin {
        "pinned round-robin"
    } else {
        "placed by the engine"
    };
    println!("placement   {placement}");
    println!(
        "concurrency {}",
        if per_host.is_empty() {
            "the default".to_owned()
        } else {
            per_host.trim().replace('\n', " ")
        }
    );
    println!(
        "\n{:<4} {:>10} {:>10} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10} {:>7}  spread / load average / MemAvailable",
        "run", "apply", "all ready", "create med", "create max", "start med", "start max", "raw med", "raw last", "ratio"
    );
    for (i, r) in runs.iter().enumerate() {
        let raw_last = r.raw.last().copied().unwrap_or(f64::NAN);
        println!(
            "{i:<4} {:>7.0} ms {:>7.0} ms {:>8.0} ms {:>8.0} ms {:>8.0} ms {:>8.0} ms {:>7.0} ms {:>7.0} ms {:>6.2}×  {:?} / {} / {}",
            r.apply,
            r.ready,
            percentile(&r.creates, 50),
            percentile(&r.creates, 100),
            percentile(&r.starts, 50),
            percentile(&r.starts, 100),
            percentile(&r.raw, 50),
            raw_last,
            r.ready / raw_last,
            r.spread,
            r.load,
            r.mem_available
        );
    }
}
