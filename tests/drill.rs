//! `plasmavmc drill`, end to end: the real binary builds its throw-away cluster (three
//! simulated hosts, shared storage, the real daemon, real QEMU booting the test guest)
//! and runs every failure mode once, with a fast heartbeat (200 ms, down after 1 s).
//!
//! What this proves: every row of the failure table is measured (no run failed), the
//! rows the design makes automatic are automatic and the partition row names its manual
//! step, every measured row has its figures (the guest-service-down row: detection
//! only, its QEMU never replaced), and no invariant broke (no VM ran twice, no disk
//! lost data, no healthy VM restarted) — and the drill says so with exit 0. The
//! drill cleans up its own sandbox; this test checks nothing of it is left running.
//!
//! Then the drill against a "real" cluster (two agent hosts, a running `watch` kept
//! alive by the test as a service manager would): only after `--yes-disrupt NAME`, its
//! four rows measured on the designated VM, a bystander VM never touched, and the
//! repository's spec file back as it was.

use std::ffi::OsStr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use plasmavmc_e2e::artifacts::{binary, guest};
use plasmavmc_e2e::proc::drill_sandbox_left_nothing;
use plasmavmc_e2e::{Daemon, HostSpec, Output, TestRepo, VmSpec, BOOT_TIMEOUT};
use serde_json::Value;

/// The rows of the failure table, in order.
const ROWS: [&str; 12] = [
    "engine crash (kill -9)",
    "QEMU crash (kill -9)",
    "guest panic",
    "guest power-off (restart = always)",
    "host reboot (its QEMUs die while the engine is down)",
    "host power-off, fence command",
    "network partition, no fence command",
    "live migration round trip",
    "cold migration",
    "guest hang (QEMU alive), watchdog",
    "guest hang (QEMU alive), liveness probe",
    "guest service down (readiness probe)",
];

/// The row whose VM never stops: readiness only shows the service down.
const SHOWN_ONLY: &str = "guest service down (readiness probe)";

#[test]
fn drill_measures_every_failure_mode_and_nothing_breaks() -> Result<()> {
    let guest = guest()?;
    let (rows, stderr, all) = sandbox_drill(&[
        "--kernel".as_ref(),
        guest.kernel.as_os_str(),
        "--initrd".as_ref(),
        guest.initrd.as_os_str(),
    ])?;
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
            s["running_ms"].as_f64().is_some() == (mode != SHOWN_ONLY)
                && s["guest_ms"].as_f64().is_some() == (mode != SHOWN_ONLY),
            "{mode}: recovery figures wrong: {row:#}"
        );
        let automatic = row["automatic"].as_str().unwrap_or_default();
        if mode == SHOWN_ONLY {
            ensure!(
                automatic.contains("nothing restarted"),
                "{mode}: should say it restarts nothing: {row:#}"
            );
        } else if mode.starts_with("network partition") {
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
    drill_sandbox_left_nothing(&stderr)?;
    println!("{stderr}");
    Ok(())
}

/// `plasmavmc drill --runs 1 --heartbeat 200ms --down-after 1s --json` plus `args` on
/// a sandbox; it must exit 0. Returns its rows, its stderr, and all it printed (for
/// messages).
fn sandbox_drill(args: &[&OsStr]) -> Result<(Vec<Value>, String, String)> {
    let out = Command::new(binary()?)
        .args([
            "drill",
            "--runs",
            "1",
            "--heartbeat",
            "200ms",
            "--down-after",
            "1s",
        ])
        .args(args)
        .arg("--json")
        .env_remove("RUST_LOG")
        .output()
        .context("running plasmavmc drill")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let all = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    ensure!(
        out.status.success(),
        "the drill failed ({}):\n{all}",
        out.status
    );
    let rows = serde_json::from_str(&stdout).with_context(|| all.clone())?;
    Ok((rows, stderr, all))
}

/// The drill on a disk image the firmware boots (the test guest packed as one, with
/// SYSLINUX): the rows that need the test guest's kernel command line are skipped and
/// say why, the others are measured from the console's growth.
#[test]
fn drill_boots_a_disk_image_through_the_firmware() -> Result<()> {
    let guest = guest()?;
    let (rows, _, all) = sandbox_drill(&[
        "--only".as_ref(),
        "QEMU crash".as_ref(),
        "--only".as_ref(),
        "guest panic".as_ref(),
        "--only".as_ref(),
        "cold".as_ref(),
        "--image".as_ref(),
        guest.boot_image.as_os_str(),
    ])?;
    let names: Vec<&str> = rows.iter().filter_map(|r| r["mode"].as_str()).collect();
    ensure!(
        names == ["QEMU crash (kill -9)", "guest panic", "cold migration"],
        "rows {names:?}\n{all}"
    );
    ensure!(
        rows[1]["skipped"]
            .as_str()
            .is_some_and(|w| w.contains("needs the test guest"))
            && rows[1]["samples"].as_array().is_some_and(Vec::is_empty),
        "guest panic was not skipped with its reason: {:#}",
        rows[1]
    );
    for row in [&rows[0], &rows[2]] {
        let s = &row["samples"][0];
        ensure!(
            row["errors"].as_array().is_some_and(Vec::is_empty)
                && row["broken"].as_array().is_some_and(Vec::is_empty)
                && s["running_ms"].as_f64().is_some()
                && s["guest_ms"].as_f64().is_some(),
            "not measured cleanly: {row:#}"
        );
    }
    // The image's guest counts its boots on its second disk: the cold move kept them.
    ensure!(
        rows[2]["samples"][0]["data_checked"] == true,
        "the cold move did not check the disk: {:#}",
        rows[2]
    );
    Ok(())
}

/// The rows of a real cluster's drill, in order.
const CLUSTER_ROWS: [&str; 4] = [
    "QEMU crash (kill -9)",
    "guest panic (NMI)",
    "engine crash (kill -9)",
    "live migration round trip",
];

#[test]
fn drill_on_a_real_cluster_disrupts_only_the_named_vm() -> Result<()> {
    let repo = TestRepo::new()?;
    let pool = repo.root().join("shared");
    std::fs::create_dir_all(&pool)?;
    for host in ["hv1", "hv2"] {
        repo.write_host(host, &HostSpec::agent().memory(2048).shared(&pool, "pool1"))?;
    }
    // The drilled guest panics on an NMI, as an operator sets up a test VM for the drill.
    let drillee = VmSpec::new()
        .no_disks()
        .memory(96)
        .cmdline("unknown_nmi_panic");
    let bystander = VmSpec::new().no_disks().memory(96).pin("hv1");
    repo.write_vm("drillee", &drillee)?;
    repo.write_vm("bystander", &bystander)?;
    repo.commit("two VMs")?;
    let spec_before = std::fs::read(repo.repo_dir().join("vms/drillee.toml"))?;
    let started = Instant::now();
    let daemon = repo.watch(&[])?;
    daemon.wait_running("drillee")?;
    let bystander_pid = daemon.wait_running_on("bystander", "hv1")?;
    let drillee_pid = repo.qemus_of("drillee");
    // How long a boot takes on this machine now (daemon start to the guest's first
    // tick): the drill must not strike before the guest has booted (an NMI during early
    // boot can wedge it), and a loaded 2-core machine boots several times slower.
    plasmavmc_e2e::wait::poll_for("drillee's first tick", BOOT_TIMEOUT, || {
        ["hv1", "hv2"]
            .iter()
            .any(|h| repo.serial_on(h, "drillee").contains("tick 1"))
            .then_some(())
    })?;
    let settle = (started.elapsed() * 3).max(Duration::from_secs(15));
    let settle = format!("{}s", settle.as_secs());

    // Without the confirmation (or with another name) nothing happens.
    for extra in [&[][..], &["--yes-disrupt", "bystander"][..]] {
        let mut args = vec!["drill", "--vm", "drillee", "--runs", "1"];
        args.extend_from_slice(extra);
        let out = repo.run(&args)?;
        out.expect_code(1)?;
        ensure!(
            out.stderr.contains("--yes-disrupt") && out.stderr.contains("nothing was done"),
            "no clear refusal:\n{out}"
        );
    }
    ensure!(
        repo.qemus_of("drillee") == drillee_pid,
        "a refused drill touched drillee"
    );

    let out = drill_supervised(&repo, daemon, &settle)?;
    check_cluster_rows(&out)?;

    // Nothing else was touched: the bystander's QEMU is the one it had, and its status
    // never saw an exit or a drill.
    ensure!(
        repo.qemus_of("bystander") == [bystander_pid],
        "bystander's QEMUs are {:?}, was {bystander_pid}",
        repo.qemus_of("bystander")
    );
    let view = repo.vm_view("bystander")?.context("bystander's status")?;
    ensure!(
        view.events
            .iter()
            .all(|e| e.kind != "exited" && e.kind != "drill"),
        "bystander was disrupted: {view:?}"
    );
    check_spec_restored(&repo, &spec_before)?;
    ensure!(
        std::fs::read_dir(repo.state_dir().join("drill"))?
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().ends_with(".request.toml")),
        "a drill request was left behind"
    );
    println!("{}", out.stderr);
    Ok(())
}

/// Runs the drill on `drillee` (with `--settle SETTLE`) while acting as the daemon's
/// service manager: a daemon killed by the drill is reaped and started again. It must
/// have ended exactly once.
fn drill_supervised<'r>(
    repo: &'r TestRepo,
    mut daemon: Daemon<'r>,
    settle: &str,
) -> Result<Output> {
    let mut drill = repo.spawn(&[
        "drill",
        "--vm",
        "drillee",
        "--yes-disrupt",
        "drillee",
        "--runs",
        "1",
        "--supervised",
        "--settle",
        settle,
        "--json",
    ])?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut ended = Vec::new();
    while drill.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            bail!(
                "the drill did not finish within 5 minutes\n{}",
                daemon.describe()
            );
        }
        if daemon.try_exit()?.is_some() {
            ended.push(daemon.describe());
            daemon = repo.watch(&[])?;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = drill.finish(Duration::from_secs(1))?;
    ensure!(
        out.code == Some(0),
        "the drill failed:\n{out}\n{}",
        daemon.describe()
    );
    ensure!(
        ended.len() == 1,
        "the daemon ended {} times\n{out}\nthe daemons that ended:\n{}",
        ended.len(),
        ended.join("\n")
    );
    Ok(out)
}

/// Every row of a real cluster's drill measured once, cleanly.
fn check_cluster_rows(out: &Output) -> Result<()> {
    let rows: Vec<Value> = serde_json::from_str(&out.stdout).with_context(|| out.to_string())?;
    let names: Vec<&str> = rows.iter().filter_map(|r| r["mode"].as_str()).collect();
    ensure!(names == CLUSTER_ROWS, "rows {names:?}\n{out}");
    for row in &rows {
        let mode = row["mode"].as_str().unwrap_or_default();
        let samples = row["samples"].as_array().context("samples")?;
        ensure!(
            samples.len() == 1
                && row["errors"].as_array().is_some_and(Vec::is_empty)
                && row["broken"].as_array().is_some_and(Vec::is_empty)
                && row.get("skipped").is_none(),
            "{mode}: not measured cleanly: {row:#}"
        );
        let s = &samples[0];
        ensure!(
            s["running_ms"].as_f64().is_some(),
            "{mode}: no recovery figure: {row:#}"
        );
        // The hosts are on this machine: the drillee's QEMUs were sampled.
        ensure!(
            s["most_copies"].as_u64().is_some(),
            "{mode}: copies not sampled: {row:#}"
        );
        let detected = s["detection_ms"].as_f64().is_some();
        ensure!(
            detected == (mode.starts_with("QEMU") || mode.starts_with("guest")),
            "{mode}: detection: {row:#}"
        );
    }
    ensure!(
        rows[1]["samples"][0]["note"]
            .as_str()
            .is_some_and(|n| n.contains("exit reason panic")),
        "the NMI did not make a guest panic: {:#}",
        rows[1]
    );
    Ok(())
}

/// The drill committed drillee's spec file back as it was; the working tree matches it.
fn check_spec_restored(repo: &TestRepo, before: &[u8]) -> Result<()> {
    let git = git2::Repository::open(repo.repo_dir())?;
    let head = git.head()?.peel_to_commit()?;
    let entry = head
        .tree()?
        .get_path(std::path::Path::new("vms/drillee.toml"))?;
    ensure!(
        git.find_blob(entry.id())?.content() == before,
        "drillee's spec at HEAD differs from the original"
    );
    ensure!(
        head.summary()
            .is_some_and(|s| s.starts_with("plasmavmc drill:")),
        "the last commit is not the drill's restore: {:?}",
        head.summary()
    );
    ensure!(
        git.statuses(None)?
            .iter()
            .all(|s| s.path() != Some("vms/drillee.toml")),
        "the working tree's drillee.toml no longer matches HEAD"
    );
    Ok(())
}
