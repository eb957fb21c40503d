//! `plasmavmc drill`, end to end: the real binary builds its throw-away cluster (three
//! simulated hosts, shared storage, the real daemon, real QEMU booting the test guest)
//! and runs every failure mode once, with a fast heartbeat (200 ms, down after 1 s).
//!
//! What this proves: every row of the failure table is measured (no run failed), the
//! rows the design makes automatic are automatic and the partition row names its manual
//! step, every measured row has its figures, and no invariant broke (no VM ran twice,
//! no disk lost data, no healthy VM restarted) — and the drill says so with exit 0. The
//! drill cleans up its own sandbox; this test checks nothing of it is left running.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use plasmavmc_e2e::artifacts::{binary, guest};
use plasmavmc_e2e::proc::processes_under;
use plasmavmc_e2e::wait_for;
use serde_json::Value;

/// The rows of the failure table, in order.
const ROWS: [&str; 9] = [
    "engine crash (kill -9)",
    "QEMU crash (kill -9)",
    "guest panic",
    "guest power-off (restart = always)",
    "host reboot (its QEMUs die while the engine is down)",
    "host power-off, fence command",
    "network partition, no fence command",
    "live migration round trip",
    "cold migration",
];

#[test]
fn drill_measures_every_failure_mode_and_nothing_breaks() -> Result<()> {
    let guest = guest()?;
    let out = Command::new(binary()?)
        .args([
            "drill",
            "--runs",
            "1",
            "--heartbeat",
            "200ms",
            "--down-after",
            "1s",
            "--json",
        ])
        .arg("--kernel")
        .arg(&guest.kernel)
        .arg("--initrd")
        .arg(&guest.initrd)
        .env_remove("RUST_LOG")
        .output()
        .context("running plasmavmc drill")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    ensure!(
        out.status.success(),
        "the drill failed ({}):\n{all}",
        out.status
    );
    let rows: Vec<Value> = serde_json::from_str(&stdout).with_context(|| all.clone())?;
    let names: Vec<&str> = rows.iter().filter_map(|r| r["mode"].as_str()).collect();
    ensure!(names == ROWS, "rows {names:?}\n{all}");
    for row in &rows {
        let mode = row["mode"].as_str().unwrap_or_default();
        let samples = row["samples"].as_array().context("samples")?;
        ensure!(
            samples.len() == 1
                && row["errors"].as_array().is_some_and(Vec::is_empty)
                && row["broken"].as_array().is_some_and(Vec::is_empty),
            "{mode}: not measured cleanly: {row:#}"
        );
        let s = &samples[0];
        ensure!(
            s["running_ms"].as_f64().is_some() && s["guest_ms"].as_f64().is_some(),
            "{mode}: no recovery figures: {row:#}"
        );
        let automatic = row["automatic"].as_str().unwrap_or_default();
        if mode.starts_with("network partition") {
            ensure!(
                automatic.starts_with("no")
                    && row["manual"]
                        .as_str()
                        .is_some_and(|m| m.contains("fence confirm")),
                "{mode}: the manual step is not named: {row:#}"
            );
        } else {
            ensure!(
                automatic.starts_with("yes"),
                "{mode}: not automatic: {row:#}"
            );
        }
        let detected = s["detection_ms"].as_f64();
        let by_detection = !matches!(
            mode,
            "engine crash (kill -9)" | "live migration round trip" | "cold migration"
        );
        ensure!(
            detected.is_some() == by_detection,
            "{mode}: detection {detected:?}: {row:#}"
        );
    }
    // The sandbox is gone, and nothing of it runs.
    wait_for(
        "the drill's processes to be gone",
        Duration::from_secs(10),
        || {
            // Every process of a sandbox names its folder in its command line.
            processes_under(&std::env::temp_dir().join("plasmavmc-drill-")).is_empty()
        },
    )?;
    println!("{stderr}");
    Ok(())
}
