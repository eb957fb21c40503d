//! `plasmavmc drill`: the failure table, filled in by measurement.
//!
//! In: a guest to boot (the tiny test guest by default), how many runs per row, the
//! heartbeat settings. Out: one row per failure mode — detection time, time until the
//! VM runs again (QMP-ready) and until its guest is seen again, whether recovery was
//! automatic, the manual steps, and whether any VM ran twice or lost disk data.
//!
//! Every row runs against the real engine (`plasmavmc watch`, a child process), real
//! agents and real QEMU on a throw-away cluster of three simulated hosts
//! ([`sandbox`]); the rows are in [`modes`]. [`chaos`] is the soak on the same sandbox.
//!
//! Against a real cluster ([`cluster`]) the daemon owns the hosts, so the drill reaches
//! a VM's QEMU only through it: the drill files a fault on the [`desk`], the daemon
//! carries it out ([`serve()`], called by `watch` after each reconcile) and answers there.
//! Both sides live here; nothing here imports `watch` or `cli` (the layers of `lib.rs`).
//!
//! What the sandbox reads back the way the end-to-end tests do is public, and their
//! harness uses it: the test guest's [`console`], the daemon's JSON [`log`], the
//! deadline loop ([`poll`]).

mod chaos;
mod cluster;
pub mod console;
pub mod desk;
pub mod log;
mod modes;
pub mod poll;
mod sandbox;
mod serve;

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use serde::Serialize;

pub use chaos::{clock_seed, replay, run_chaos, summary, ChaosConfig, Report};
pub use cluster::{run_cluster, ClusterConfig};
pub use desk::DrillDesk;
pub use modes::Sample;
use sandbox::{Guest, Sandbox};
pub use serve::serve;

/// How a drill on the sandbox runs.
#[derive(Debug, Clone)]
pub struct DrillConfig {
    pub runs: usize,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// A disk image the VMs boot through the firmware instead of kernel and initrd.
    pub image: Option<PathBuf>,
    /// Memory of every VM of the sandbox.
    pub memory_mb: u64,
    /// `[heartbeat]` of the sandbox (`None`: the defaults, 1 s / 5 s).
    pub heartbeat: Option<(String, String)>,
    /// Only the rows whose name contains one of these (all when empty).
    pub only: Vec<String>,
}

/// One row of the table: every run's sample, or why the row could not be measured.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub mode: String,
    pub automatic: String,
    pub manual: String,
    pub samples: Vec<Sample>,
    pub errors: Vec<String>,
    /// Invariants that broke (a VM ran twice, data lost, a healthy VM restarted).
    pub broken: Vec<String>,
    /// Why the row was not run at all (a real cluster that cannot show it safely).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Why fewer runs than asked for were made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capped: Option<String>,
}

impl Row {
    fn times(&self, pick: fn(&Sample) -> Option<f64>) -> Vec<f64> {
        self.samples.iter().filter_map(pick).collect()
    }
}

/// Runs every row `cfg.runs` times on a throw-away sandbox; `progress` hears what
/// happens.
pub fn run(cfg: &DrillConfig, progress: &mut dyn FnMut(&str)) -> Result<Vec<Row>> {
    let settings = cfg.heartbeat.as_ref().map_or_else(String::new, |(i, d)| {
        format!("[heartbeat]\ninterval = {i:?}\ndown_after = {d:?}\n")
    });
    let guest = match &cfg.image {
        Some(image) => {
            ensure_file(image)?;
            Guest::Image {
                image: std::path::absolute(image)?,
            }
        }
        None => kernel_guest(&cfg.kernel, &cfg.initrd)?,
    };
    let image = cfg.image.is_some();
    let generic = guest.generic().is_some();
    let mut sb = Sandbox::new(guest, cfg.memory_mb, &settings)?;
    progress(&format!("sandbox in {}", sb.root().display()));
    sb.start_watch().context("starting the engine")?;
    let plan = |mode: &modes::Mode<Sandbox>| {
        if image && modes::needs_knobs(mode.name) {
            Err(
                "needs the test guest: its kernel command line makes it panic or power off on cue"
                    .to_owned(),
            )
        } else if !generic && modes::needs_generic(mode.name) {
            Err(
                "needs the test guest's generic flavour (a watchdog driver): tests/guest/build.sh builds it beside the kernel, in generic/"
                    .to_owned(),
            )
        } else {
            Ok(cfg.runs)
        }
    };
    let recover = |sb: &mut Sandbox| {
        // A failed row may leave the daemon gone: bring it back for the next.
        if !sb.watch_running() {
            let _ = sb.start_watch();
        }
    };
    Ok(run_rows(
        &mut sb,
        &modes::MODES,
        &cfg.only,
        cfg.runs,
        &plan,
        &recover,
        progress,
    ))
}

/// The guest booting `kernel` and `initrd`, which must exist.
fn kernel_guest(kernel: &std::path::Path, initrd: &std::path::Path) -> Result<Guest> {
    ensure_file(kernel)?;
    ensure_file(initrd)?;
    Ok(Guest::Kernel {
        kernel: std::path::absolute(kernel)?,
        initrd: std::path::absolute(initrd)?,
    })
}

fn ensure_file(file: &std::path::Path) -> Result<()> {
    anyhow::ensure!(
        file.is_file(),
        "{} does not exist: build the test guest (tests/guest/build.sh) or pass --kernel and --initrd (or --image)",
        file.display()
    );
    Ok(())
}

/// How many runs a row gets (`Err`: why it is skipped).
type RunPlan<'a, C> = dyn Fn(&modes::Mode<C>) -> Result<usize, String> + 'a;

/// Runs `modes` on `ctx`, each as often as `plan` says; `after_error` puts `ctx` back
/// in shape after a run failed.
fn run_rows<C>(
    ctx: &mut C,
    modes: &[modes::Mode<C>],
    only: &[String],
    runs: usize,
    plan: &RunPlan<'_, C>,
    after_error: &dyn Fn(&mut C),
    progress: &mut dyn FnMut(&str),
) -> Vec<Row> {
    let mut rows = Vec::new();
    for mode in modes {
        if !only.is_empty() && !only.iter().any(|o| mode.name.contains(o.as_str())) {
            continue;
        }
        let mut row = Row {
            mode: mode.name.to_owned(),
            automatic: mode.automatic.to_owned(),
            manual: mode.manual.to_owned(),
            samples: Vec::new(),
            errors: Vec::new(),
            broken: Vec::new(),
            skipped: None,
            capped: None,
        };
        let n = match plan(mode) {
            Ok(n) => n,
            Err(why) => {
                progress(&format!("{}: skipped: {why}", mode.name));
                row.skipped = Some(why);
                rows.push(row);
                continue;
            }
        };
        if n < runs {
            row.capped = Some(format!("{n} of {runs} runs"));
        }
        for i in 1..=n {
            progress(&format!("{}: run {i}/{n}", mode.name));
            match (mode.run)(ctx) {
                Ok(sample) => {
                    if sample.most_copies.is_some_and(|m| m > mode.copies_allowed) {
                        row.broken.push(format!(
                            "run {i}: {} QEMUs of one VM at once",
                            sample.most_copies.unwrap_or_default()
                        ));
                    }
                    row.broken
                        .extend(sample.broken.iter().map(|b| format!("run {i}: {b}")));
                    progress(&format!("  {sample:?}"));
                    row.samples.push(sample);
                }
                Err(e) => {
                    progress(&format!("  failed: {e:#}"));
                    row.errors.push(format!("run {i}: {e:#}"));
                    after_error(ctx);
                }
            }
        }
        rows.push(row);
    }
    rows
}

/// How often the drill looks at what it waits for.
const POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Polls `cond` every 20 ms until it holds (true) or `timeout` passes (false).
fn poll_until(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    poll::poll_every(POLL, "", timeout, || cond().then_some(())).is_ok()
}

/// Milliseconds from `from` to `to` (0 when `to` is earlier).
fn ms(from: std::time::SystemTime, to: std::time::SystemTime) -> f64 {
    to.duration_since(from)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// True when no invariant broke, every row that ran was measured, and something was
/// (rows a real cluster cannot show safely are skipped, but a drill of nothing fails).
pub fn passed(rows: &[Row]) -> bool {
    rows.iter()
        .all(|r| r.errors.is_empty() && r.broken.is_empty())
        && rows.iter().any(|r| !r.samples.is_empty())
}

/// The table in Markdown.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| failure mode | runs | detection | running again (QMP-ready) | guest output again | automatic | manual steps | VM ran twice / data lost |\n|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let fig = |pick: fn(&Sample) -> Option<f64>| figure(&row.times(pick));
        let invariants = if !row.broken.is_empty() {
            format!("**BROKEN**: {}", row.broken.join("; "))
        } else if row.samples.is_empty() {
            "—".to_owned()
        } else {
            let twice = if row.samples.iter().all(|s| s.most_copies.is_some()) {
                "no"
            } else {
                "not sampled"
            };
            let data = if row.samples.iter().any(|s| s.data_checked) {
                "no"
            } else {
                "not checked"
            };
            format!("{twice} / {data}")
        };
        let runs = match (&row.skipped, row.errors.len()) {
            (Some(_), _) => "skipped".to_owned(),
            (None, 0) => row.samples.len().to_string(),
            (None, failed) => format!("{} ({failed} failed)", row.samples.len()),
        };
        let _ = writeln!(
            out,
            "| {} | {runs} | {} | {} | {} | {} | {} | {invariants} |",
            row.mode,
            fig(|s| s.detection_ms),
            fig(|s| s.running_ms),
            fig(|s| s.guest_ms),
            row.automatic,
            row.manual,
        );
    }
    out.push('\n');
    for row in rows {
        if let Some(last) = row.samples.last() {
            let _ = writeln!(out, "- {}: {}", row.mode, last.note);
        }
        if let Some(why) = &row.skipped {
            let _ = writeln!(out, "- {}: **skipped**: {why}", row.mode);
        }
        if let Some(why) = &row.capped {
            let _ = writeln!(out, "- {}: {why}", row.mode);
        }
        for e in &row.errors {
            let _ = writeln!(out, "- {}: **not measured**: {e}", row.mode);
        }
    }
    out
}

/// `median / max` in ms (or s), `—` when nothing was measured.
fn figure(samples: &[f64]) -> String {
    if samples.is_empty() {
        return "—".to_owned();
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[(sorted.len() - 1) / 2];
    let max = sorted[sorted.len() - 1];
    let show = |v: f64| {
        if v >= 1000.0 {
            format!("{:.2} s", v / 1000.0)
        } else {
            format!("{v:.0} ms")
        }
    };
    if sorted.len() == 1 {
        show(median)
    } else {
        format!("{} / {}", show(median), show(max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_median_and_max_in_readable_units() {
        assert_eq!(figure(&[]), "—");
        assert_eq!(figure(&[12.4]), "12 ms");
        assert_eq!(figure(&[3000.0, 10.0, 2500.0]), "2.50 s / 3.00 s");
    }

    #[test]
    fn a_broken_invariant_or_a_failed_run_fails_the_drill() {
        let row = |broken: Vec<String>, errors: Vec<String>| Row {
            mode: "m".into(),
            automatic: "yes".into(),
            manual: "none".into(),
            samples: vec![Sample::default()],
            errors,
            broken,
            skipped: None,
            capped: None,
        };
        assert!(passed(&[row(vec![], vec![])]));
        assert!(!passed(&[row(vec!["twice".into()], vec![])]));
        assert!(!passed(&[row(vec![], vec!["timed out".into()])]));
        let mut skipped = row(vec![], vec![]);
        skipped.samples.clear();
        skipped.skipped = Some("no other host".into());
        assert!(passed(&[row(vec![], vec![]), skipped.clone()]));
        assert!(!passed(&[skipped]), "nothing measured is no pass");
        let table = markdown(&[row(vec!["run 1: 2 QEMUs".into()], vec![])]);
        assert!(table.contains("**BROKEN**: run 1: 2 QEMUs"), "{table}");
    }
}
