//! `plasmavmc drill --chaos DURATION [--seed N]`: a soak under random faults, the way
//! trusted systems test themselves (Jepsen's nemesis, `FoundationDB`'s simulation).
//!
//! In: how long, a seed, the guest. Out: a [`Report`] — faults injected by kind,
//! invariant samples taken, every violation with its time and step, how to replay.
//!
//! ```text
//! seed ──> schedule (pure: steps and pauses) ──> nemesis ──> sandbox (3 hosts, watch, QEMU)
//!                                                                 │ /proc, consoles, fence marker
//!                                  checker thread, every 10 ms <──┘ ──> violations (stop the run)
//! ```
//! The sandbox is the drill's ([`super::sandbox`]); [`schedule`] draws the steps,
//! [`nemesis`] carries them out, [`checker`] judges what it sees. The same seed replays
//! the same steps with the same pauses; the engine's own timing varies.

mod checker;
mod nemesis;
mod schedule;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::sandbox::Sandbox;
use checker::{Checker, Shared, Violation};
use nemesis::{Nemesis, Outcome};
use schedule::{Step, VMS};

/// The soak's heartbeat: fast, so host losses are seen and fenced within a second.
const HEARTBEAT: &str = "[heartbeat]\ninterval = \"200ms\"\ndown_after = \"1s\"\n";

/// How a soak runs.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    pub duration: Duration,
    pub seed: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub memory_mb: u64,
}

/// What a soak saw.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: u64,
    pub duration_s: f64,
    /// From the first fault to the end (the sandbox's set-up not counted).
    pub ran_s: f64,
    pub steps_done: usize,
    pub steps_planned: usize,
    /// Steps carried out, by kind (heals included).
    pub faults: BTreeMap<&'static str, usize>,
    /// Steps with nothing to do (a VM to kill was not running).
    pub skipped: usize,
    /// Invariant samples taken (every 10 ms).
    pub samples: u64,
    pub violations: Vec<Violation>,
    /// The daemon's last log lines about each violation's VM and the hosts.
    pub evidence: BTreeMap<String, Vec<String>>,
    /// Heals that timed out (the cluster did not recover in time), with the step.
    pub not_healed: Vec<String>,
    /// Steps the nemesis could not carry out, with why.
    pub errors: Vec<String>,
    /// The highest boot count each VM with a disk found on it.
    pub boots: BTreeMap<&'static str, u64>,
    pub replay: String,
}

impl Report {
    pub fn clean(&self) -> bool {
        self.violations.is_empty()
    }
}

/// A seed from the clock, for a soak not given one.
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() ^ u64::from(d.subsec_nanos()) << 20)
}

/// How to run the soak `cfg` again.
pub fn replay(cfg: &ChaosConfig) -> String {
    format!(
        "plasmavmc drill --chaos {} --seed {}",
        humantime::format_duration(cfg.duration),
        cfg.seed
    )
}

/// Runs the soak; `progress` hears every step.
pub fn run_chaos(cfg: &ChaosConfig, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    let guest = super::kernel_guest(&cfg.kernel, &cfg.initrd)?;
    let mut sb = Sandbox::new(guest, cfg.memory_mb, HEARTBEAT)?;
    progress(&format!("sandbox in {}", sb.root().display()));
    sb.start_watch().context("starting the engine")?;
    let root = sb.root().to_path_buf();
    let plan = schedule::generate(cfg.seed, cfg.duration);
    let shared = Shared::new();
    let disk_vms = VMS
        .iter()
        .filter(|(_, d, _)| d.is_some())
        .map(|v| v.0)
        .collect();
    let mut report = Report {
        seed: cfg.seed,
        duration_s: cfg.duration.as_secs_f64(),
        ran_s: 0.0,
        steps_done: 0,
        steps_planned: plan.len(),
        faults: BTreeMap::new(),
        skipped: 0,
        samples: 0,
        violations: Vec::new(),
        evidence: BTreeMap::new(),
        not_healed: Vec::new(),
        errors: Vec::new(),
        boots: BTreeMap::new(),
        replay: replay(cfg),
    };
    let boots = std::thread::scope(|s| -> Result<_> {
        let checker = s.spawn(|| Checker::new(root, &shared, disk_vms).run());
        let result = soak(&mut sb, &shared, cfg, &plan, &mut report, progress);
        shared.stop.store(true, Ordering::Relaxed);
        let boots = checker.join().expect("the checker does not panic");
        result.map(|()| boots)
    })?;
    report.boots = boots;
    report.samples = shared.samples.load(Ordering::Relaxed);
    report
        .violations
        .clone_from(&shared.violations.lock().expect("violations"));
    let log = sb.log();
    for v in &mut report.violations {
        v.during = match v.step.checked_sub(1).and_then(|i| plan.get(i)) {
            Some(p) => p.step.to_string(),
            None => "setting up".to_owned(),
        };
        // The VM's lines and the hosts' (lost, fenced, connected), oldest first.
        let mut lines: Vec<String> = log
            .iter()
            .rev()
            .filter(|l| match l.str("vm") {
                Some(vm) => vm == v.vm,
                None => l.str("host").is_some(),
            })
            .take(20)
            .map(ToString::to_string)
            .collect();
        lines.reverse();
        report.evidence.insert(v.vm.clone(), lines);
    }
    Ok(report)
}

/// The nemesis's part: the VMs created, the schedule carried out until the deadline or
/// the first violation, the world brought back, a last heal.
fn soak(
    sb: &mut Sandbox,
    shared: &Shared,
    cfg: &ChaosConfig,
    plan: &[schedule::Planned],
    report: &mut Report,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let mut nemesis = Nemesis::new(sb, shared, cfg.memory_mb);
    nemesis.create_vms()?;
    if let Outcome::NotHealed(why) = nemesis.heal() {
        anyhow::bail!("the soak's VMs did not start: {why}");
    }
    progress(&format!("{} VMs running; faults begin", VMS.len()));
    let t0 = Instant::now();
    for (i, planned) in plan.iter().enumerate() {
        if t0.elapsed() >= cfg.duration || shared.violated() {
            break;
        }
        nemesis.pause(planned.after);
        if shared.violated() {
            break;
        }
        let index = i + 1;
        shared.step.store(index, Ordering::Relaxed);
        let at = t0.elapsed().as_secs_f64();
        progress(&format!("{at:7.2}s step {index}: {}", planned.step));
        report.steps_done = index;
        let began = Instant::now();
        let outcome = nemesis.apply(index, &planned.step);
        if matches!(planned.step, Step::Heal) {
            progress(&format!("         the heal took {:.2?}", began.elapsed()));
        }
        *report.faults.entry(planned.step.kind()).or_default() += 1;
        match outcome {
            Ok(Outcome::Done) => {}
            Ok(Outcome::Skipped(why)) => {
                report.skipped += 1;
                progress(&format!("         skipped: {why}"));
            }
            Ok(Outcome::NotHealed(why)) => {
                progress(&format!("         {why}"));
                report.not_healed.push(format!("step {index}: {why}"));
            }
            Err(e) => {
                progress(&format!("         failed: {e:#}"));
                report
                    .errors
                    .push(format!("step {index} ({}): {e:#}", planned.step));
                if matches!(planned.step, Step::RestartDaemon) && !nemesis.sb.watch_running() {
                    let _ = nemesis.sb.start_watch();
                }
            }
        }
    }
    report.ran_s = t0.elapsed().as_secs_f64();
    if !shared.violated() {
        progress("time is up: every host back, a last heal");
        nemesis.restore()?;
        if let Outcome::NotHealed(why) = nemesis.heal() {
            report.not_healed.push(format!("at the end: {why}"));
        }
    }
    Ok(())
}

/// The summary for humans.
pub fn summary(r: &Report) -> String {
    let mut out = String::new();
    let verdict = if r.clean() { "CLEAN" } else { "VIOLATED" };
    let _ = writeln!(out, "chaos soak: {verdict}");
    let _ = writeln!(
        out,
        "seed {}, asked {:.0} s, ran {:.1} s, {} of {} planned steps",
        r.seed, r.duration_s, r.ran_s, r.steps_done, r.steps_planned
    );
    let kinds: Vec<String> = r.faults.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(
        out,
        "steps by kind: {} ({} skipped: nothing to do)",
        kinds.join(", "),
        r.skipped
    );
    let _ = writeln!(out, "invariant samples: {} (every 10 ms)", r.samples);
    let boots: Vec<String> = r.boots.iter().map(|(vm, n)| format!("{vm} {n}")).collect();
    let _ = writeln!(out, "disk boot counters at the end: {}", boots.join(", "));
    if r.violations.is_empty() {
        let _ = writeln!(out, "violations: none");
    }
    for v in &r.violations {
        let _ = writeln!(
            out,
            "VIOLATION at {:.2} s, step {} ({}): {} ({}): {}",
            v.at_s, v.step, v.during, v.invariant, v.vm, v.seen
        );
        for line in r.evidence.get(&v.vm).into_iter().flatten() {
            let _ = writeln!(out, "    daemon: {line}");
        }
    }
    for n in &r.not_healed {
        let _ = writeln!(out, "not healed: {n}");
    }
    for e in &r.errors {
        let _ = writeln!(out, "nemesis error: {e}");
    }
    let _ = writeln!(out, "replay: {}", r.replay);
    out
}
