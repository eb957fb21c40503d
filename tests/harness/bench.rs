//! What the benchmark binaries share: the release binary they run, percentiles, and
//! the machine they ran on.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::artifacts::{target_dir, workspace_root};

/// `$PLASMAVMC_BIN`, or a release build of the binary (built now), exported as
/// `PLASMAVMC_BIN` so the harness runs it. Call it before starting any thread.
pub fn release_binary() -> Result<String> {
    if let Some(bin) = std::env::var_os("PLASMAVMC_BIN").filter(|b| !b.is_empty()) {
        return Ok(bin.to_string_lossy().into_owned());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "plasmavmc",
            "--bin",
            "plasmavmc",
        ])
        .current_dir(workspace_root())
        .status()
        .context("running cargo build --release")?;
    if !status.success() {
        bail!("cargo build --release -p plasmavmc failed: {status}");
    }
    let bin = target_dir().join("release").join("plasmavmc");
    // Set before any thread that reads the environment exists.
    std::env::set_var("PLASMAVMC_BIN", &bin);
    Ok(bin.display().to_string())
}

/// A count from the environment variable `name`, or `default`.
pub fn env_count(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v:?} is not a count")),
        Err(_) => Ok(default),
    }
}

/// Nearest-rank percentile (`pct` in 1..=100) of `samples`; NaN if empty.
pub fn percentile(samples: &[f64], pct: usize) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (pct * sorted.len()).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// What `plasmavmc apply` says about one live move, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MoveFigures {
    /// The migrate step's wall time.
    pub wall: f64,
    /// QEMU's own total time and downtime.
    pub total: f64,
    pub downtime: f64,
    /// Passes over memory (`dirty-sync-count`).
    pub passes: f64,
}

/// The figures of `vm`'s migrate step in `apply`'s stdout, e.g.
/// `ok   migrate web (0.61s): live to hv2, pid 1: 241 ms, downtime 121 ms, 74 MiB memory, 3 passes`.
pub fn migrate_step(stdout: &str, vm: &str) -> Result<MoveFigures> {
    let prefix = format!("ok   migrate {vm} ");
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with(&prefix))
        .with_context(|| format!("no migrate step of {vm} in:\n{stdout}"))?;
    let num_before = |text: &str, unit: &str| -> Option<f64> {
        let end = text.find(unit)?;
        let start = text[..end].rfind(|c: char| !(c.is_ascii_digit() || c == '.'))? + 1;
        text[start..end].parse().ok()
    };
    let wall = num_before(line, "s):").context("step time")? * 1000.0;
    let after_pid = &line[line.find("pid").context("pid")?..];
    let total = num_before(after_pid, " ms, downtime").context("total")?;
    let downtime = num_before(
        &after_pid[after_pid.find("downtime").context("downtime")?..],
        " ms",
    )
    .context("downtime figure")?;
    let passes = num_before(line, " passes").context("passes")?;
    Ok(MoveFigures {
        wall,
        total,
        downtime,
        passes,
    })
}

/// nproc, memory, QEMU version, kernel.
pub fn machine() -> Vec<(&'static str, String)> {
    let nproc = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .map(|l| l.trim_start_matches("MemTotal:").trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned());
    let first_line = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "?".to_owned())
    };
    vec![
        ("nproc", nproc.to_string()),
        ("MemTotal", mem),
        ("qemu", first_line("qemu-system-x86_64", "--version")),
        ("kernel", first_line("uname", "-r")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert!((percentile(&samples, 50) - 3.0).abs() < f64::EPSILON);
        assert!((percentile(&samples, 100) - 5.0).abs() < f64::EPSILON);
        assert!((percentile(&samples, 1) - 1.0).abs() < f64::EPSILON);
        assert!(percentile(&[], 50).is_nan());
    }

    #[test]
    fn a_migrate_step_gives_its_figures() {
        let out = "plan: 1 action\nok   migrate web (0.61s): live to hv2, pid 1: 241 ms, downtime 121 ms, 74 MiB memory, 3 passes\n";
        let f = migrate_step(out, "web").expect("parses");
        assert_eq!(
            f,
            MoveFigures {
                wall: 610.0,
                total: 241.0,
                downtime: 121.0,
                passes: 3.0
            }
        );
        assert!(migrate_step(out, "db").is_err());
    }
}
