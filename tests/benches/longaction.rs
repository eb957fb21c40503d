//! Benchmark: crash → running of one VM while a long action runs elsewhere — the
//! figure issue 17 is about. Real daemon, two simulated hosts, real QEMU (TCG), the
//! tiny test guest.
//!
//! Run: `cargo bench -p plasmavmc-e2e --bench longaction` (`LONGACTION_CASES=cold,drain`
//! picks the cases; `LONGACTION_IDLE_KILLS=N` the kills with nothing else running,
//! default 3; `PLASMAVMC_BIN` picks the binary, default a release build).
//!
//! In each case `victim` (96 MiB, no disk, `restart = "always"`, restarted at once)
//! runs on hv2, and first gets `LONGACTION_IDLE_KILLS` `kill -9`s of its QEMU with the
//! daemon idle (the baseline). Then a commit starts the long action, and once a VM of
//! it shows `migrating` in its status, victim's QEMU is killed again. Times from that
//! kill (wall clock just before it) to the daemon's "vm exited" line (detection) and to
//! the "started" line of victim's new QEMU (running again), beside when the long action
//! ended (its last "done" line of a `migrate` step):
//! - `cold`: VM `big` (96 MiB, a 2 GiB local disk filled with 2 GiB of non-zero bytes by
//!   `qemu-io` while `big` is stopped, `migration = "cold"`) is pinned from hv1 to hv2 and
//!   started: the disk streams through the two agents.
//! - `drain`: ten VMs (96 MiB, 24 MiB of it non-zero: `plasmavmc.fill=24`) run on hv1;
//!   hv1 goes into maintenance, so all ten move live to hv2, one after another, with
//!   `[migration] max_bandwidth_mib = 8` to make each move last seconds.
//!
//! Before the concurrent executor the daemon carries a plan out one action after
//! another, so the crash waits for the long action. It prints figures; it asserts
//! nothing.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use plasmavmc_e2e::bench::{env_count, machine, release_binary};
use plasmavmc_e2e::fault::FAILOVER_VM_MB;
use plasmavmc_e2e::fleet::{fleet_host, load_average, poll_fast, small_vm, EAGER_RESTART};
use plasmavmc_e2e::{Daemon, LogLine, TestRepo, VmSpec};

const IDLE_KILLS: usize = 3;
/// Bound for the long action to end and the victim to be back.
const LONG: Duration = Duration::from_secs(600);
const DRAINED: usize = 10;

/// One case's figures, in milliseconds after the kill during the long action.
struct Case {
    name: &'static str,
    what: String,
    idle_recovery: Vec<f64>,
    detection: f64,
    recovery: f64,
    action_started: f64,
    action_ended: f64,
    load: String,
}

fn main() -> Result<()> {
    let cases = std::env::var("LONGACTION_CASES").unwrap_or_else(|_| "cold,drain".to_owned());
    let idle_kills = env_count("LONGACTION_IDLE_KILLS", IDLE_KILLS)?;
    let bin = release_binary()?;
    let mut done = Vec::new();
    for case in cases.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let figures = match case {
            "cold" => cold(idle_kills),
            "drain" => drain(idle_kills),
            other => bail!("LONGACTION_CASES: no case {other:?} (cold, drain)"),
        }
        .with_context(|| format!("case {case}"))?;
        done.push(figures);
    }
    report(&bin, &done);
    Ok(())
}

/// A repository with hosts hv1 and hv2 and `victim` on hv2, plus `extra` VMs.
fn repo_with(settings: &str, extra: &[(String, VmSpec)]) -> Result<TestRepo> {
    let repo = TestRepo::new()?;
    repo.set_cluster_settings(settings)?;
    repo.write_host("hv1", &fleet_host())?;
    repo.write_host("hv2", &fleet_host())?;
    repo.write_vm("victim", &small_vm("hv2"))?;
    for (vm, spec) in extra {
        repo.write_vm(vm, spec)?;
    }
    repo.commit("victim and the long action's VMs")?;
    Ok(repo)
}

fn cold(idle_kills: usize) -> Result<Case> {
    let big = |host: &str, power: &str| {
        VmSpec::new()
            .no_disks()
            .disk("data", 2)
            .memory(FAILOVER_VM_MB)
            .migration("cold")
            .pin(host)
            .power(power)
    };
    let repo = repo_with(EAGER_RESTART, &[("big".to_owned(), big("hv1", "stopped"))])?;
    let daemon = repo.watch(&[])?;
    let mut pid = daemon.wait_running_on("victim", "hv2")?;
    let idle = idle_kills_of(&daemon, &mut pid, idle_kills)?;
    let disk = poll_fast("big's disk on hv1", LONG, || {
        find_file(&repo.instance_dir_on("hv1", "big"), "data.qcow2")
    })?;
    daemon.wait("big stopped on hv1", LONG, || {
        repo.vm_view("big")
            .ok()
            .flatten()
            .is_some_and(|v| v.phase == "stopped")
    })?;
    fill(&disk, 2)?;
    repo.write_vm("big", &big("hv2", "running"))?;
    let since = daemon.lines().len();
    repo.commit("big: move cold to hv2")?;
    let during = kill_during(&daemon, since, pid, &["big"])?;
    Ok(Case {
        name: "cold",
        what: "cold move of big (2 GiB local disk, 2 GiB of data) hv1 → hv2".to_owned(),
        idle_recovery: idle,
        ..during
    })
}

fn drain(idle_kills: usize) -> Result<Case> {
    let names: Vec<String> = (0..DRAINED).map(|i| format!("d-{i:02}")).collect();
    let spec = |pin: Option<&str>| {
        let s = VmSpec::new()
            .no_disks()
            .memory(FAILOVER_VM_MB)
            .cmdline("plasmavmc.fill=24");
        match pin {
            Some(h) => s.pin(h),
            None => s,
        }
    };
    let vms: Vec<(String, VmSpec)> = names
        .iter()
        .map(|n| (n.clone(), spec(Some("hv1"))))
        .collect();
    let settings = format!("{EAGER_RESTART}\n[migration]\nmax_bandwidth_mib = 8\n");
    let repo = repo_with(&settings, &vms)?;
    let daemon = repo.watch(&[])?;
    let mut pid = daemon.wait_running_on("victim", "hv2")?;
    for n in &names {
        daemon.wait_running_on(n, "hv1")?;
    }
    let idle = idle_kills_of(&daemon, &mut pid, idle_kills)?;
    repo.write_host("hv1", &fleet_host().maintenance())?;
    for n in &names {
        repo.write_vm(n, &spec(None))?;
    }
    let since = daemon.lines().len();
    repo.commit("hv1 into maintenance: drain its ten VMs")?;
    let moving: Vec<&str> = names.iter().map(String::as_str).collect();
    let during = kill_during(&daemon, since, pid, &moving)?;
    Ok(Case {
        name: "drain",
        what: format!("drain of hv1: {DRAINED} live moves to hv2 at 8 MiB/s, 24 MiB filled each"),
        idle_recovery: idle,
        ..during
    })
}

/// Kills victim's QEMU `n` times with the daemon idle; returns kill → started (ms).
fn idle_kills_of(daemon: &Daemon<'_>, pid: &mut i32, n: usize) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let since = daemon.lines().len();
        let killed = kill9(*pid)?;
        let started = started_after(daemon, since, *pid, Duration::from_secs(60))?;
        out.push(started.ms_after(killed)?);
        *pid = started.pid()?;
    }
    Ok(out)
}

/// Waits until one of `moving` shows `migrating`, kills victim's QEMU `pid`, waits for
/// it to be back and for the long action to end (every `moving` VM's migrate step done).
fn kill_during(daemon: &Daemon<'_>, since: usize, pid: i32, moving: &[&str]) -> Result<Case> {
    let repo = daemon.repo();
    let committed = SystemTime::now();
    poll_fast("a VM of the long action migrating", LONG, || {
        moving
            .iter()
            .any(|vm| {
                repo.vm_view(vm)
                    .ok()
                    .flatten()
                    .is_some_and(|v| v.phase == "migrating")
            })
            .then_some(())
    })?;
    let action_seen = SystemTime::now();
    let load = load_average();
    let killed = kill9(pid)?;
    let started = started_after(daemon, since, pid, LONG)?;
    let (_, exited) = daemon.wait_log_since("victim's \"vm exited\"", LONG, since, |l| {
        l.is("vm exited", Some("victim")) && l.int("pid") == Some(i64::from(pid))
    })?;
    let mut ends = Vec::new();
    for vm in moving {
        let (_, done) =
            daemon.wait_log_since(format!("{vm}'s migrate step done"), LONG, since, |l| {
                l.is("done", Some(vm)) && l.str("op") == Some("migrate")
            })?;
        ends.push(done.ms_after(killed)?);
    }
    let ms = |t: SystemTime| -> f64 {
        match t.duration_since(killed) {
            Ok(d) => d.as_secs_f64() * 1e3,
            Err(e) => -e.duration().as_secs_f64() * 1e3,
        }
    };
    eprintln!(
        "commit → action seen {:.0} ms",
        action_seen
            .duration_since(committed)
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3
    );
    Ok(Case {
        name: "",
        what: String::new(),
        idle_recovery: Vec::new(),
        detection: exited.ms_after(killed)?,
        recovery: started.ms_after(killed)?,
        action_started: ms(action_seen),
        action_ended: ends.into_iter().fold(f64::MIN, f64::max),
        load,
    })
}

/// SIGKILLs `pid`; returns the wall clock just before.
fn kill9(pid: i32) -> Result<SystemTime> {
    let at = SystemTime::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .with_context(|| format!("kill -9 {pid}"))?;
    Ok(at)
}

/// Victim's first "started" line from index `since` on with a pid other than `old`.
fn started_after(
    daemon: &Daemon<'_>,
    since: usize,
    old: i32,
    timeout: Duration,
) -> Result<LogLine> {
    daemon
        .wait_log_since("victim started again", timeout, since, |l| {
            l.is("started", Some("victim")) && l.int("pid") != Some(i64::from(old))
        })
        .map(|(_, l)| l)
}

/// The first file named `name` under `dir` (depth-first).
fn find_file(dir: &std::path::Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if entry.file_name() == name {
            return Some(path);
        }
    }
    None
}

/// Writes `gib` GiB of non-zero bytes into the qcow2 at `disk` (no QEMU holds it).
fn fill(disk: &std::path::Path, gib: u64) -> Result<()> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for i in 0..gib * 4 {
        cmd.args(["-c", &format!("write -P 0x5a {}M 256M", i * 256)]);
    }
    let out = cmd.arg(disk).output().context("running qemu-io")?;
    if !out.status.success() {
        bail!(
            "qemu-io on {}: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let size = std::fs::metadata(disk)?.len();
    eprintln!("filled {} ({} MiB on disk)", disk.display(), size >> 20);
    Ok(())
}

fn report(bin: &str, cases: &[Case]) {
    println!("\nplasmavmc watch: crash → running while a long action runs");
    println!("binary      {bin}");
    for (k, v) in machine() {
        println!("{k:<11} {v}");
    }
    for c in cases {
        let idle: Vec<String> = c.idle_recovery.iter().map(|v| format!("{v:.0}")).collect();
        println!("\ncase {}: {}", c.name, c.what);
        println!("  load average at the kill    {}", c.load);
        println!("  idle: kill → started (ms)   {}", idle.join(", "));
        println!(
            "  long action seen            {:>9.0} ms before the kill",
            -c.action_started
        );
        println!("  kill → vm exited            {:>9.0} ms", c.detection);
        println!(
            "  kill → started              {:>9.0} ms   (goal ≤ 1000 ms)",
            c.recovery
        );
        println!("  kill → long action ended    {:>9.0} ms", c.action_ended);
    }
}
