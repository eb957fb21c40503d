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
}
