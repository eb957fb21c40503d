//! Benchmark: how fast `plasmavmc watch` notices a dead QEMU, brings it back, and
//! reacts to a commit. Real daemon, real QEMU (TCG), the tiny test guest.
//!
//! Run: `cargo bench -p plasmavmc-e2e --bench heal` (`HEAL_KILLS=N`, `HEAL_COMMITS=N`
//! change the sample sizes; `PLASMAVMC_BIN` picks the binary, default a release build).
//!
//! - detection: `kill -9` of QEMU → the daemon's "vm exited" log line for that pid;
//! - recovery: `kill -9` → the next "started" line (new QEMU answers QMP, guest runs);
//! - commit → reconcile: the branch ref update (clock read just before it; the
//!   commit object is already written) → the "reconcile" line with trigger "commit"
//!   for that revision.
//!
//! Times are log timestamps (`--log-format json`) minus the wall clock at the kill or
//! commit. It prints figures and goals; it asserts nothing.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use plasmavmc_e2e::bench::{env_count, machine, percentile, release_binary};
use plasmavmc_e2e::{Daemon, LogLine, TestRepo, VmSpec};

const KILLS: usize = 20;
const COMMITS: usize = 10;

/// Samples in milliseconds.
#[derive(Debug, Default)]
struct Figures {
    detection: Vec<f64>,
    recovery: Vec<f64>,
    reasons: Vec<String>,
    reconcile: Vec<f64>,
}

fn main() -> Result<()> {
    let kills = env_count("HEAL_KILLS", KILLS)?;
    let commits = env_count("HEAL_COMMITS", COMMITS)?;
    let bin = release_binary()?;

    let repo = TestRepo::new()?;
    repo.set_cluster_settings(
        "[restart]\nbackoff = \"1ms\"\nbackoff_max = \"1ms\"\nmax_failures = 1000\nwindow = \"10m\"\n",
    )?;
    repo.write_vm("web", &VmSpec::new().restart("always"))?;
    repo.commit("web")?;
    let daemon = repo.watch(&["--interval", "1h"])?;

    let mut figures = Figures::default();
    kill_loop(&daemon, kills, &mut figures)?;
    commit_loop(&repo, &daemon, commits, &mut figures)?;
    print_report(&bin, &figures);
    drop(daemon);
    repo.cleanup()?;
    Ok(())
}

/// Kills web's QEMU `kills` times, each time once the previous one is "started".
fn kill_loop(daemon: &Daemon<'_>, kills: usize, figures: &mut Figures) -> Result<()> {
    let (mut at, first) = daemon.wait_log_since(
        "the first \"started\" line for web",
        Duration::from_secs(60),
        0,
        |l| l.is("started", Some("web")),
    )?;
    let mut pid = pid_of(&first)?;
    for i in 0..kills {
        let killed = SystemTime::now();
        kill(Pid::from_raw(pid), Signal::SIGKILL).with_context(|| format!("kill -9 {pid}"))?;
        let (_, exited) = daemon.wait_log_since(
            format!("kill {i}: \"vm exited\" for pid {pid}"),
            Duration::from_secs(10),
            at + 1,
            |l| l.is("vm exited", Some("web")) && l.int("pid") == Some(i64::from(pid)),
        )?;
        let (next_at, started) = daemon.wait_log_since(
            format!("kill {i}: a \"started\" line for a new QEMU"),
            Duration::from_secs(30),
            at + 1,
            |l| l.is("started", Some("web")) && l.int("pid") != Some(i64::from(pid)),
        )?;
        figures.detection.push(ms_since(killed, &exited)?);
        figures.recovery.push(ms_since(killed, &started)?);
        figures
            .reasons
            .push(exited.str("reason").unwrap_or("?").to_owned());
        at = next_at;
        pid = pid_of(&started)?;
    }
    Ok(())
}

/// Makes `commits` commits (README.md only), each once the previous one is applied.
fn commit_loop(
    repo: &TestRepo,
    daemon: &Daemon<'_>,
    commits: usize,
    figures: &mut Figures,
) -> Result<()> {
    for i in 0..commits {
        let since = daemon.lines().len();
        repo.write("README.md", &format!("benchmark commit {i}\n"))?;
        let (id, committed) = repo.commit_timed(&format!("bench {i}"))?;
        let (_, line) = daemon.wait_log_since(
            format!("commit {i}: a \"reconcile\" line with trigger commit for {id}"),
            Duration::from_secs(30),
            since,
            |l| {
                l.is("reconcile", None)
                    && l.str("trigger") == Some("commit")
                    && l.str("revision")
                        .is_some_and(|r| r.len() >= 7 && id.starts_with(r))
            },
        )?;
        figures.reconcile.push(ms_since(committed, &line)?);
        daemon.poll(
            format!("commit {i} applied"),
            Duration::from_secs(30),
            || {
                repo.engine_view()
                    .ok()
                    .flatten()
                    .filter(|e| e.last_applied_revision.as_deref() == Some(id.as_str()))
            },
        )?;
    }
    Ok(())
}

fn print_report(bin: &str, figures: &Figures) {
    let mut reasons: Vec<(&str, usize)> = Vec::new();
    for r in &figures.reasons {
        match reasons.iter_mut().find(|(k, _)| k == r) {
            Some((_, n)) => *n += 1,
            None => reasons.push((r, 1)),
        }
    }
    println!("\nplasmavmc watch: self-healing and commit latency");
    println!("binary      {bin}");
    for (k, v) in machine() {
        println!("{k:<11} {v}");
    }
    println!("exit reasons (all should be crash): {reasons:?}");
    println!(
        "\n{:<24} {:>4} {:>10} {:>10} {:>10}  goal",
        "figure (ms)", "n", "median", "p95", "max"
    );
    for (name, samples, goal) in [
        ("detection (kill→exited)", &figures.detection, "≤ 50"),
        ("recovery (kill→started)", &figures.recovery, "≤ 1000"),
        ("commit → reconcile", &figures.reconcile, "≤ 200"),
    ] {
        println!(
            "{name:<24} {:>4} {:>10.1} {:>10.1} {:>10.1}  {goal}",
            samples.len(),
            percentile(samples, 50),
            percentile(samples, 95),
            percentile(samples, 100),
        );
    }
}

fn pid_of(line: &LogLine) -> Result<i32> {
    line.int("pid")
        .and_then(|p| i32::try_from(p).ok())
        .with_context(|| format!("no pid in {line}"))
}

/// Milliseconds from `start` to the line's timestamp (negative if the log clock is
/// behind: printed as is, not hidden).
fn ms_since(start: SystemTime, line: &LogLine) -> Result<f64> {
    let at = line.timestamp()?;
    Ok(match at.duration_since(start) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    })
}
