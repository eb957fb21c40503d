//! Robustness, end to end: what the engine does when the world is not as it left it.
//!
//! What this file proves, one test each:
//! - a QEMU that lost its instance record (an orphan) is reported by `plan` and in
//!   `status/hosts/local.toml`, left running, and no second QEMU is started in its
//!   folder; `--prune` stops it and the next run starts the VM, once, on its disk;
//! - an `apply` killed half-way leaves its journal; the next `apply` says so and
//!   finishes the job without redoing what was done;
//! - `watch --status-branch` commits the status files to a branch after each change
//!   (a crash and its restart are in `git log`), without touching the working tree,
//!   the index or `HEAD`;
//! - `watch --repo file://...` follows a remote: a bare clone in the state dir,
//!   fetched every `--interval`;
//! - a QEMU that cannot start fails `apply` with QEMU's own words, leaves the other
//!   VMs alone, and `watch` backs off instead of spawning it at every reconcile, then
//!   gives up (phase `failed`); ignored until the engine does it: the retry comes when
//!   the backoff ends, not at the next `--interval` tick;
//! - a machine type the host's QEMU does not know, and a host whose QEMU cannot run,
//!   are refused at plan time with the host's own answer: nothing is created;
//! - an initrd replaced in place (same path, same spec) is noticed by its digest: the
//!   plan restarts the VM, which boots the new file.
//!
//! Each test has its own repository and state dir in a temp folder and kills every
//! process it started, even when it fails (see `tests/harness/`).

use std::fs;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use plasmavmc_e2e::proc::{kill_and_wait, qemu_memory_mb};
use plasmavmc_e2e::{
    cmdline, is_alive, poll_for, wait_for, LogLine, Orphan, Running, TestRepo, VmSpec,
    ACT_TIMEOUT as ACT, BOOT_TIMEOUT, BRANCH, RUN_TIMEOUT,
};

/// Bound for crash detection plus restart, or a fetch at a 1 s interval: 10× the goal.
const HEAL: Duration = Duration::from_secs(15);

/// Rewrites the `uuid` of `vm`'s `instance.toml`, as if the record of the QEMU running
/// there were lost: that QEMU (whose argv holds the old uuid) becomes an orphan.
fn lose_instance_record(repo: &TestRepo, vm: &str) -> Result<()> {
    let path = repo.instance_dir(vm).join("instance.toml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("uuid"))
        .with_context(|| format!("no uuid in {}:\n{text}", path.display()))?;
    let fresh = "uuid = \"00000000-0000-4000-8000-00000000beef\"";
    ensure!(line.trim() != fresh, "the uuid is already the fake one");
    fs::write(&path, text.replacen(line, fresh, 1))
        .with_context(|| format!("writing {}", path.display()))
}

#[test]
fn orphan_is_reported_not_started_beside_and_pruned_on_request() -> Result<()> {
    let repo = TestRepo::with_vm("web", &VmSpec::new())?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    let orphan = repo.wait_qemu_alive("web", ACT)?;
    // The first run writes its disk header: proof later that the VM kept its disk.
    repo.wait_serial("web", "disk: boots=1", BOOT_TIMEOUT)?;
    lose_instance_record(&repo, "web")?;

    let plan = repo.run(&["plan", "--detailed-exitcode"])?;
    ensure!(
        matches!(plan.code, Some(0 | 2)),
        "plan failed with an orphan around\n{plan}"
    );
    ensure!(
        plan.stdout.contains(&format!("orphan QEMU pid {orphan}")),
        "plan does not name the orphan pid {orphan}\n{plan}"
    );
    let actions = repo.plan_json(&[])?["actions"].clone();
    ensure!(
        actions
            .as_array()
            .is_some_and(|a| a.iter().all(|a| a["op"] != "prune")),
        "plan without --prune plans to prune: {actions:#}"
    );

    // Without --prune: the orphan keeps running, alone in its folder.
    let apply = repo.run(&["apply", "--auto-approve"])?;
    ensure!(
        is_alive(orphan),
        "apply without --prune stopped the orphan\n{apply}"
    );
    ensure!(
        repo.qemus_in_folder("web") == vec![orphan],
        "QEMUs in vms/web: {:?}, expected only the orphan {orphan}\n{apply}",
        repo.qemus_in_folder("web")
    );
    let orphans = repo.orphans("local")?;
    ensure!(
        orphans
            == vec![Orphan {
                pid: orphan,
                folder: "web".to_owned()
            }],
        "status/hosts/local.toml lists orphans {orphans:?}, expected pid {orphan} in web\n{apply}"
    );

    // With --prune: a prune action comes first and stops it.
    let planned = repo.plan_json(&["--prune"])?;
    let first = &planned["actions"][0];
    ensure!(
        first["op"] == "prune" && first["vm"] == "web" && first["pid"] == orphan,
        "the first action of plan --prune is not the prune of pid {orphan} in web: {planned:#}"
    );
    let pruned = repo.run(&["apply", "--auto-approve", "--prune"])?;
    pruned.expect_code(0)?;
    wait_for(
        format!("the orphan {orphan} to be gone"),
        Duration::from_secs(10),
        || !is_alive(orphan),
    )
    .with_context(|| pruned.to_string())?;
    ensure!(
        repo.qemus_in_folder("web").len() <= 1,
        "two QEMUs in vms/web after the prune: {:?}\n{pruned}",
        repo.qemus_in_folder("web")
    );
    ensure!(
        repo.orphans("local")?.is_empty(),
        "status still lists orphans: {:?}",
        repo.orphans("local")?
    );

    // The next run starts the VM: one QEMU, a new one, on the same disk.
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    let new = repo.wait_qemu_alive("web", ACT)?;
    ensure!(new != orphan, "qemu.pid still names the orphan {orphan}");
    ensure!(
        repo.qemus_in_folder("web") == vec![new],
        "QEMUs in vms/web: {:?}, expected only {new}",
        repo.qemus_in_folder("web")
    );
    repo.wait_vm("web", "phase running with the new pid", ACT, |v| {
        v.phase == "running" && v.pid == Some(new)
    })?;
    repo.wait_serial_seq("web", &["disk: found boots=1", "tick 3"], BOOT_TIMEOUT)?;
    repo.run(&["plan", "--detailed-exitcode"])?.expect_code(0)?;
    Ok(())
}

/// A 5 s stop timeout, and one action at a time on the host, so an apply can be killed
/// between two restarts (they would run at once otherwise: see tests/concurrency.rs).
const ONE_AT_A_TIME: &str = "[timeouts]\nstop = \"5s\"\n\n[concurrency]\nper_host = 1\n";

#[test]
fn apply_killed_half_way_is_finished_by_the_next_run() -> Result<()> {
    // Guests that ignore the ACPI power button: each stop waits the whole 5 s stop
    // timeout, so restarting both takes over 10 s.
    let slow = |mb| {
        VmSpec::new()
            .memory(mb)
            .no_disks()
            .cmdline("plasmavmc.ignore_acpi=1")
    };
    let repo = TestRepo::new()?;
    repo.write("plasmavmc.toml", ONE_AT_A_TIME)?;
    for vm in ["a", "b"] {
        repo.write_vm(vm, &slow(128))?;
    }
    repo.commit("a and b")?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    for vm in ["a", "b"] {
        repo.wait_serial(vm, "tick 1", BOOT_TIMEOUT)?;
    }
    for vm in ["a", "b"] {
        repo.write_vm(vm, &slow(192))?;
    }
    repo.commit("a and b: 192 MiB")?;

    // Kill the apply once the first restart is done and the second under way.
    let mut apply = repo.spawn(&["apply", "--auto-approve"])?;
    let journal = poll_for(
        "the apply's journal to record 1 action done",
        RUN_TIMEOUT,
        || {
            if !matches!(apply.try_wait(), Ok(None)) {
                return Some(None);
            }
            repo.journal()
                .filter(|j| j["done"].as_u64() == Some(1))
                .map(Some)
        },
    )?;
    let Some(journal) = journal else {
        let out = apply.finish(RUN_TIMEOUT)?;
        bail!("the apply ended before its journal recorded 1 action done\n{out}");
    };
    kill(Pid::from_raw(apply.pid()), Signal::SIGKILL).context("killing the apply")?;
    let killed = apply.finish(RUN_TIMEOUT)?;
    ensure!(killed.code.is_none(), "the apply was not killed\n{killed}");
    let actions = journal["actions"].as_array().cloned().unwrap_or_default();
    ensure!(
        actions.len() == 2
            && actions
                .iter()
                .all(|a| a["op"] == "restart" && (a["vm"] == "a" || a["vm"] == "b")),
        "the journal does not plan two restarts: {journal:#}"
    );
    ensure!(
        repo.journal_path().is_file(),
        "journal.json vanished with the killed apply\n{killed}"
    );
    let done_vm = actions[0]["vm"].as_str().context("no vm in the journal")?;
    let todo_vm = actions[1]["vm"].as_str().context("no vm in the journal")?;
    let done_pid = repo.qemu_pid(done_vm)?;
    ensure!(
        qemu_memory_mb(&cmdline(done_pid)?) == Some(192),
        "{done_vm} was restarted but does not run with 192 MiB"
    );
    let todo_pid = repo.qemu_pid(todo_vm)?;
    ensure!(
        is_alive(todo_pid) && qemu_memory_mb(&cmdline(todo_pid)?) == Some(128),
        "the kill did not land half-way: {todo_vm} no longer runs its old QEMU\n{killed}"
    );

    let rerun = repo.run(&["apply", "--auto-approve"])?;
    rerun.expect_code(0)?;
    ensure!(
        rerun.stderr.contains("was interrupted") && rerun.stderr.contains("after 1 of 2 actions"),
        "the second apply does not report the interrupted one\n{rerun}"
    );
    ensure!(
        !repo.journal_path().exists(),
        "journal.json left after a complete apply\n{rerun}"
    );
    ensure!(
        repo.qemu_pid(done_vm)? == done_pid && is_alive(done_pid),
        "{done_vm}, restarted before the kill, was restarted again\n{rerun}"
    );
    ensure!(
        rerun.stdout.contains(&format!("restart {todo_vm}")),
        "the second apply did not restart {todo_vm}\n{rerun}"
    );
    for vm in ["a", "b"] {
        let pid = repo.wait_qemu_alive(vm, ACT)?;
        let args = cmdline(pid)?;
        ensure!(
            qemu_memory_mb(&args) == Some(192),
            "{vm} runs without -m 192: {}",
            args.join(" ")
        );
        ensure!(
            repo.qemus_in_folder(vm) == vec![pid],
            "QEMUs in vms/{vm}: {:?}, expected only {pid}",
            repo.qemus_in_folder(vm)
        );
    }
    repo.run(&["plan", "--detailed-exitcode"])?.expect_code(0)?;
    Ok(())
}

#[test]
fn status_branch_records_what_ran() -> Result<()> {
    let repo = TestRepo::with_vm("web", &VmSpec::new().no_disks())?;
    let head = repo.head_id()?;
    let head_ref = repo.head_ref()?;
    let index = repo.index_bytes();
    let changes = repo.worktree_changes()?;
    ensure!(changes.is_empty(), "not clean before the test: {changes:?}");

    let daemon = repo.watch(&["--status-branch", "status"])?;
    let old = daemon.wait_running("web")?;
    kill_and_wait(old, Duration::from_secs(5))?;
    let new = daemon.poll("a new live QEMU for web", HEAL, || {
        repo.try_qemu_pid("web")
            .filter(|&p| p != old && is_alive(p))
    })?;
    repo.wait_vm("web", "running again, restarts >= 1", ACT, |v| {
        v.phase == "running" && v.pid == Some(new) && v.restarts >= 1
    })?;

    // The branch catches up with what ran: its tip has web running again.
    let tip = daemon.poll(
        "the status branch's vms/web.toml: running, the new pid, restarts >= 1",
        ACT,
        || {
            repo.vm_view_at("status", "web")
                .ok()
                .flatten()
                .filter(|v| v.phase == "running" && v.pid == Some(new) && v.restarts >= 1)
        },
    )?;
    let history = repo.branch_history("status")?;
    ensure!(
        history.len() >= 2,
        "git log status has {} commit(s), expected >= 2; tip:\n{tip}",
        history.len()
    );
    for file in ["engine.toml", "hosts/local.toml"] {
        ensure!(
            repo.file_at("status", file)?.is_some(),
            "{file} missing from the status branch's tip"
        );
    }
    // An older commit holds the first run: running with the old pid, no restart yet.
    let mut first_run = false;
    for id in &history {
        first_run |= repo
            .vm_view_at(id, "web")?
            .is_some_and(|v| v.phase == "running" && v.pid == Some(old) && v.restarts == 0);
    }
    ensure!(
        first_run,
        "no commit of the status branch shows web running with its first pid {old}"
    );

    ensure!(
        repo.head_id()? == head && repo.head_ref()? == head_ref,
        "HEAD moved: {} at {}",
        repo.head_ref()?,
        repo.head_id()?
    );
    let changes = repo.worktree_changes()?;
    ensure!(
        changes.is_empty(),
        "the working tree or index changed: {changes:?}"
    );
    ensure!(repo.index_bytes() == index, ".git/index was rewritten");
    Ok(())
}

#[test]
fn watch_follows_a_remote_url() -> Result<()> {
    // The test repository is the "remote": the daemon reads it only through its URL.
    let repo = TestRepo::with_vm("web", &VmSpec::new().no_disks())?;
    let daemon = repo.watch_url(&repo.file_url(), &["--branch", BRANCH, "--interval", "1s"])?;
    let web = daemon.wait_running("web")?;
    let clone = repo.state_dir().join("repo.git");
    let bare = git2::Repository::open_bare(&clone)
        .with_context(|| format!("no bare clone at {}", clone.display()))?;
    ensure!(
        bare.is_bare(),
        "{} is not a bare repository",
        clone.display()
    );

    repo.write_vm("db", &VmSpec::new().no_disks())?;
    let id = repo.commit("add db")?;
    let committed = Instant::now();
    daemon.poll("a live QEMU for db within 15 s of the commit", HEAL, || {
        repo.try_qemu_pid("db").filter(|&p| is_alive(p))
    })?;
    eprintln!(
        "commit to the remote -> db QEMU alive: {:?}",
        committed.elapsed()
    );
    daemon.wait_running("db")?;
    ensure!(
        bare.find_commit(git2::Oid::from_str(&id)?).is_ok(),
        "the bare clone does not hold the fetched commit {id}"
    );
    ensure!(
        repo.qemu_pid("web")? == web && is_alive(web),
        "web was restarted by the new commit"
    );
    Ok(())
}

/// A QEMU setting the planner cannot check and QEMU refuses at start: a chroot folder
/// the host does not have (machine types and CPU models are checked at plan time).
const CANNOT_START: &str = "chroot = \"/nonexistent/plasmavmc-chroot\"";
/// What QEMU 7.2 prints for it.
const QEMU_SAYS: &str = "chroot failed";

#[test]
fn qemu_that_cannot_start_is_reported_clearly() -> Result<()> {
    let repo = TestRepo::new()?;
    repo.write_vm("bad", &VmSpec::new().no_disks().qemu_line(CANNOT_START))?;
    repo.write_vm("web", &VmSpec::new().no_disks())?;
    repo.commit("bad and web")?;

    let apply = repo.run(&["apply", "--auto-approve"])?;
    apply.expect_code(1)?;
    let fail = apply.fail_line("bad")?;
    ensure!(
        fail.contains(QEMU_SAYS),
        "the FAIL line does not quote QEMU ({QEMU_SAYS:?}): {fail}\n{apply}"
    );
    let web = repo.wait_qemu_alive("web", ACT)?;
    ensure!(
        repo.vm_phase("web")?.as_deref() == Some("running"),
        "the healthy VM is not running: {:?}\n{apply}",
        repo.vm_phase("web")?
    );
    let bad = repo.vm_view("bad")?.context("no status/vms/bad.toml")?;
    ensure!(
        bad.message.contains("start failed") && bad.message.contains(QEMU_SAYS),
        "the status of bad does not say why it failed: {:?}\n{bad}",
        bad.message
    );
    ensure!(
        repo.qemus_in_folder("bad").is_empty(),
        "a QEMU runs for bad: {:?}",
        repo.qemus_in_folder("bad")
    );

    // The daemon on the same commit: how often does it spawn QEMU for bad? Four
    // reconciles in quick succession (SIGHUP), well within the 1 s default backoff.
    // (A 2 s interval: retries after a failed start wait for a timer tick, see
    // `failed_start_is_retried_when_its_backoff_ends`.)
    let daemon = repo.watch(&["--interval", "2s"])?;
    daemon.wait_log("the startup reconcile", ACT, |l| {
        l.is("reconcile", None) && l.str("trigger") == Some("startup")
    })?;
    for _ in 0..4 {
        daemon.hup(ACT)?;
    }
    let (early, reconciles) = start_attempts(&daemon.lines(), "bad")?;
    eprintln!(
        "bad: {} QEMU start(s) in the first {reconciles} reconciles under watch",
        early.len()
    );
    ensure!(
        early.len() < reconciles,
        "QEMU for bad was spawned in every reconcile ({} starts in {reconciles} reconciles)\n{}",
        early.len(),
        daemon.describe()
    );

    // Left alone, it retries with a doubling backoff (1 s, 2 s, 4 s) and gives up after
    // max_failures = 5 failed starts (the apply's included); then nothing spawns.
    // The first retry is immediate (the apply's failure was the first exit).
    let failed = daemon.poll("bad to reach phase failed", 2 * ACT, || {
        repo.vm_view("bad")
            .ok()
            .flatten()
            .filter(|v| v.phase == "failed")
    })?;
    daemon.resync(ACT)?;
    let (attempts, reconciles) = start_attempts(&daemon.lines(), "bad")?;
    let gaps: Vec<Duration> = attempts
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap_or_default())
        .collect();
    eprintln!(
        "bad: {} QEMU start(s) in {reconciles} reconciles under watch, then phase failed; gaps {gaps:?}",
        attempts.len()
    );
    let backoff = [1000, 2000, 4000].map(Duration::from_millis);
    ensure!(
        gaps.iter().zip(backoff).all(|(g, b)| *g >= b * 9 / 10),
        "QEMU for bad was retried faster than the backoff {backoff:?}: gaps {gaps:?}\n{}",
        daemon.describe()
    );
    let starts = attempts.len() + 1; // the apply's, then the daemon's
    ensure!(
        starts <= 5,
        "{starts} starts of bad in all (max_failures = 5)\n{failed}"
    );
    ensure!(
        repo.vm_view("bad")?.is_some_and(|v| v.phase == "failed"),
        "bad left phase failed: {:?}",
        repo.vm_view("bad")?
    );
    ensure!(
        repo.qemus_in_folder("bad").is_empty(),
        "a QEMU runs for bad: {:?}",
        repo.qemus_in_folder("bad")
    );
    ensure!(
        repo.qemu_pid("web")? == web && is_alive(web),
        "the healthy VM was restarted\n{}",
        daemon.describe()
    );
    repo.wait_serial("web", "tick 3", BOOT_TIMEOUT)?;
    Ok(())
}

/// No QEMU binary at all (`PLASMAVMC_QEMU` names nothing): the start fails naming the
/// program, and counts as a failed start, so the restart policy backs off instead of
/// trying again at every reconcile.
/// After a failed start, the retry is due when the backoff ends (here: at once, the
/// first failure), not at the next periodic resync (`--interval 1h`).
#[test]
fn failed_start_is_retried_when_its_backoff_ends() -> Result<()> {
    let repo = TestRepo::with_vm("bad", &VmSpec::new().no_disks().qemu_line(CANNOT_START))?;
    let daemon = repo.watch(&["--interval", "1h"])?;
    let (first, _) = daemon.wait_log_since("a failed start of bad", ACT, 0, |l| {
        l.is("failed", Some("bad"))
    })?;
    daemon.wait_log_since(
        "a second start of bad, well before the 1 h interval",
        Duration::from_secs(10),
        first + 1,
        |l| l.is("failed", Some("bad")),
    )?;
    Ok(())
}

/// The failed QEMU starts of `vm` in the daemon's reconciles that finished (every one
/// logged but the last, which may still run), with their log timestamps, and how many
/// reconciles that is.
fn start_attempts(lines: &[LogLine], vm: &str) -> Result<(Vec<SystemTime>, usize)> {
    let last = lines
        .iter()
        .rposition(|l| l.is("reconcile", None))
        .context("no reconcile logged")?;
    let finished = &lines[..last];
    let reconciles = finished.iter().filter(|l| l.is("reconcile", None)).count();
    let attempts = finished
        .iter()
        .filter(|l| l.is("failed", Some(vm)) && matches!(l.str("op"), Some("start" | "restart")))
        .map(LogLine::timestamp)
        .collect::<Result<_>>()?;
    Ok((attempts, reconciles))
}

/// A journal that cannot be read is reported — on stderr, in the engine's status and in
/// the exit code — and kept aside for the operator; the apply still plans from what
/// runs (it never takes a damaged journal for "the last run ended").
#[test]
fn a_damaged_journal_is_reported_and_kept() -> Result<()> {
    let repo = TestRepo::new()?;
    repo.write_vm("a", &VmSpec::new().no_disks())?;
    repo.commit("a")?;
    std::fs::create_dir_all(repo.state_dir())?;
    std::fs::write(repo.state_dir().join("journal.json"), "{\"revision\": ")?;
    let out = repo.run(&["apply", "--auto-approve"])?;
    out.expect_code(1)?;
    ensure!(
        out.stderr.contains("journal.json is damaged") && out.stderr.contains("kept as"),
        "the damaged journal is not reported:\n{}",
        out.stderr
    );
    let engine = repo.engine_status()?.context("engine status")?;
    let error = engine
        .get("last_error")
        .and_then(|e| e.as_str())
        .unwrap_or_default();
    ensure!(
        error.contains("journal.json is damaged"),
        "status last_error: {error:?}"
    );
    let kept = std::fs::read_dir(repo.state_dir())?.flatten().any(|e| {
        e.file_name()
            .to_string_lossy()
            .starts_with("journal.json.damaged-")
    });
    ensure!(kept, "the damaged journal was not kept");
    repo.wait_serial("a", "tick 1", BOOT_TIMEOUT)?;
    // The next apply has nothing to report and nothing to do.
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    Ok(())
}

/// The plan's note about `vm` (it starts with `<vm>: `).
fn note_about(plan: &serde_json::Value, vm: &str) -> String {
    plan["notes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str())
        .find(|n| n.starts_with(&format!("{vm}: ")))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn what_the_hosts_qemu_cannot_run_is_refused_at_plan_time() -> Result<()> {
    let repo = TestRepo::new()?;
    repo.write_vm("bad", &VmSpec::new().no_disks().machine("no-such-machine"))?;
    repo.write_vm("web", &VmSpec::new().no_disks())?;
    repo.commit("bad and web")?;
    let note = note_about(&repo.plan_json(&[])?, "bad");
    ensure!(
        note.contains("cannot be placed")
            && note.contains("needs QEMU machine type no-such-machine: local's QEMU 7.")
            && note.contains("does not know it"),
        "the note does not say the host's QEMU lacks the machine: {note:?}"
    );
    repo.run(&["apply", "--auto-approve"])?.expect_code(1)?;
    repo.wait_qemu_alive("web", ACT)?;
    ensure!(
        repo.try_qemu_pid("bad").is_none() && repo.qemus_in_folder("bad").is_empty(),
        "bad was created or started"
    );

    // A host whose QEMU cannot run at all: new VMs are refused with the reason.
    repo.remove("vms/bad.toml")?;
    repo.write_vm("more", &VmSpec::new().no_disks())?;
    repo.commit("more")?;
    let mut cmd = repo.command(&["plan", "--json"]);
    cmd.env("PLASMAVMC_QEMU", "/nonexistent/qemu-system-x86_64");
    let out = Running::spawn(cmd)?.finish(RUN_TIMEOUT)?;
    out.expect_code(0)?;
    let plan: serde_json::Value = serde_json::from_str(&out.stdout).context("plan --json")?;
    let note = note_about(&plan, "more");
    ensure!(
        note.contains("needs QEMU: local: /nonexistent/qemu-system-x86_64 not found"),
        "the note does not say the host has no QEMU: {note:?}\n{out}"
    );

    // A placed VM whose QEMU died while the host lost its QEMU: held with the reason,
    // not a start that fails (and backs off) at every run.
    let web = repo.qemu_pid("web")?;
    kill(Pid::from_raw(web), Signal::SIGKILL)?;
    wait_for("web's QEMU to go", ACT, || !is_alive(web))?;
    let mut cmd = repo.command(&["apply", "--auto-approve"]);
    cmd.env("PLASMAVMC_QEMU", "/nonexistent/qemu-system-x86_64");
    let out = Running::spawn(cmd)?.finish(RUN_TIMEOUT)?;
    out.expect_code(1)?;
    ensure!(
        out.all().contains("web: needs QEMU: local: /nonexistent/qemu-system-x86_64 not found; not started on local")
            && !out.all().contains("FAIL"),
        "web's restart is not held with the reason:\n{out}"
    );
    ensure!(repo.qemus_in_folder("web").is_empty(), "web was started");
    Ok(())
}

#[test]
fn an_initrd_replaced_in_place_is_noticed_and_booted() -> Result<()> {
    let repo = TestRepo::new()?;
    repo.set_stop_timeout("2s")?;
    let initrd = repo.root().join("initrd.img");
    fs::copy(&repo.guest().initrd, &initrd)?;
    let spec = VmSpec::new().no_disks().to_toml(repo.guest()).replace(
        &format!("{:?}", repo.guest().initrd.display().to_string()),
        &format!("{:?}", initrd.display().to_string()),
    );
    ensure!(spec.contains(&initrd.display().to_string()), "{spec}");
    repo.write("vms/web.toml", &spec)?;
    repo.commit("web with its own initrd")?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    let before = repo.qemu_pid("web")?;
    repo.run(&["plan", "--detailed-exitcode"])?.expect_code(0)?;

    // The same path, other bytes (zeros after an initramfs are padding the kernel skips):
    // the spec and its hash are unchanged, the file is not.
    let mut bytes = fs::read(&initrd)?;
    bytes.extend_from_slice(&[0u8; 512]);
    fs::write(&initrd, bytes)?;
    let plan = repo.run(&["plan"])?;
    plan.expect_code(0)?;
    ensure!(
        plan.stdout
            .contains("restart web on local: initrd (sha256 ")
            && plan.stdout.contains("needs a reboot"),
        "the plan does not say the initrd changed:\n{plan}"
    );
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    let after = repo.qemu_pid("web")?;
    ensure!(after != before && is_alive(after), "web was not restarted");
    let args = cmdline(after)?.join(" ");
    let sha = plasmavmc_e2e::artifacts::sha256_file(&initrd)?;
    ensure!(
        args.contains(&sha),
        "the new QEMU does not boot the new initrd ({sha}): {args}"
    );
    repo.wait_serial("web", "tick 3", BOOT_TIMEOUT)?;
    repo.run(&["plan", "--detailed-exitcode"])?.expect_code(0)?;
    Ok(())
}
