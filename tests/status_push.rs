//! The status branch of a remote repository reaches the remote, end to end: a bare
//! repository standing for the git server, `watch --repo URL --status-branch status`,
//! real git (the system `git`, as the engine runs it), real QEMU.
//!
//! What this file proves, one test each:
//! - over `file://`: the remote's `status` branch gets commits holding
//!   `vms/web.toml` once web runs and again once its killed QEMU was restarted (both in
//!   the remote's `git log status`); a commit another writer had pushed to that branch
//!   stays in its history (joined, not overwritten); the remote's `main` and every
//!   other ref are untouched;
//! - over ssh, through the test's own sshd and `GIT_SSH_COMMAND` (the operator's ssh
//!   setting, which the engine keeps as fetch does): the same branch arrives, and sshd
//!   logged the logins;
//! - a push the server refuses (a `pre-receive` hook) is said in `status/engine.toml`
//!   with the server's words, the daemon keeps healing (a killed QEMU is restarted),
//!   and once the hook is gone the retry pushes and the problem leaves the status;
//! - a push that hangs (a `pre-receive` hook that never returns) does not delay
//!   healing: a killed QEMU is restarted within the same bound, the time printed
//!   beside the file:// test's.
//!
//! Each test has its own repository, remote and state dir in a temp folder; the repo's
//! cleanup kills every process naming it (daemon, git, hooks, QEMU), even on failure.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use plasmavmc_e2e::proc::kill_and_wait;
use plasmavmc_e2e::{
    is_alive, poll_every, BareRemote, Daemon, Sshd, TestRepo, VmSpec, ACT_TIMEOUT as ACT, BRANCH,
};

/// Bound for crash detection plus restart: 10× the goal.
const HEAL: Duration = Duration::from_secs(15);

/// `watch` flags of every test here: the remote's `main`, a 1 s resync, `status`.
const FLAGS: [&str; 6] = [
    "--branch",
    BRANCH,
    "--interval",
    "1s",
    "--status-branch",
    "status",
];

/// Kills web's QEMU and waits for a new live one; returns it and how long it took.
fn kill_and_heal(repo: &TestRepo, daemon: &Daemon<'_>, old: i32) -> Result<(i32, Duration)> {
    kill_and_wait(old, Duration::from_secs(5))?;
    let killed = Instant::now();
    // Every 5 ms: the time is printed, and compared between the tests.
    let new = poll_every(
        Duration::from_millis(5),
        "a new live QEMU for web",
        HEAL,
        || {
            repo.try_qemu_pid("web")
                .filter(|&p| p != old && is_alive(p))
        },
    )
    .with_context(|| daemon.describe())?;
    Ok((new, killed.elapsed()))
}

/// Waits until the remote's `status` tip has web running with `pid` (and at least
/// `restarts` restarts); returns the tip.
fn wait_pushed(
    daemon: &Daemon<'_>,
    remote: &BareRemote,
    pid: i32,
    restarts: i64,
) -> Result<String> {
    daemon.poll(
        format!("the remote's status branch: web running, pid {pid}, restarts >= {restarts}"),
        ACT,
        || {
            let view = remote.vm_view_at("status", "web").ok().flatten()?;
            (view.phase == "running" && view.pid == Some(pid) && view.restarts >= restarts)
                .then(|| remote.tip("status").ok().flatten())
                .flatten()
        },
    )
}

#[test]
fn status_branch_reaches_a_bare_remote_over_file() -> Result<()> {
    let repo = TestRepo::with_vm("web", &VmSpec::new().no_disks())?;
    let remote = BareRemote::clone_of(&repo)?;
    // Someone else pushed to the status branch before: kept, never overwritten.
    let foreign = remote.commit_as_another("status", "README", "written by a person\n")?;
    let mut before = remote.refs()?;
    before.retain(|(name, _)| name != "refs/heads/status");
    let main = remote.tip(BRANCH)?.context("the remote has no main")?;

    let daemon = repo.watch_url(&remote.file_url(), &FLAGS)?;
    let old = daemon.wait_running("web")?;
    let first = wait_pushed(&daemon, &remote, old, 0)?;
    let (new, healed) = kill_and_heal(&repo, &daemon, old)?;
    eprintln!("kill -9 of web's QEMU -> a new QEMU alive (push free): {healed:?}");
    let tip = wait_pushed(&daemon, &remote, new, 1)?;

    let history = remote.history("status")?;
    ensure!(
        history.contains(&first) && history[0] == tip && first != tip,
        "the remote's git log status should hold web's first run ({first}) and its \
         restart ({tip}): {history:?}"
    );
    ensure!(
        remote.has_in_history(&tip, &foreign)?,
        "the other writer's commit {foreign} is not in the remote's status history"
    );
    ensure!(
        remote.tip(BRANCH)?.as_deref() == Some(main.as_str()),
        "the remote's {BRANCH} moved"
    );
    let mut after = remote.refs()?;
    after.retain(|(name, _)| name != "refs/heads/status");
    ensure!(
        after == before,
        "refs other than status changed on the remote:\nbefore {before:?}\nafter  {after:?}"
    );
    ensure!(
        remote.file_at("status", "engine.toml")?.is_some(),
        "engine.toml missing from the remote's status branch"
    );
    let error = repo.last_error();
    ensure!(
        !error.contains("not pushed"),
        "engine.toml reports a push problem: {error}"
    );
    Ok(())
}

#[test]
fn status_branch_reaches_a_remote_over_ssh() -> Result<()> {
    let repo = TestRepo::with_vm("web", &VmSpec::new().no_disks())?;
    let remote = BareRemote::clone_of(&repo)?;
    let main = remote.tip(BRANCH)?.context("the remote has no main")?;
    let sshd = Sshd::start(&repo)?;
    let known_hosts = repo.root().join("git_known_hosts");
    std::fs::write(&known_hosts, sshd.known_hosts()?)?;
    // The operator's own ssh setting, as for fetch: kept as is by the engine.
    let ssh = format!(
        "ssh -i {} -o IdentitiesOnly=yes -o UserKnownHostsFile={} \
         -o StrictHostKeyChecking=yes -o BatchMode=yes",
        sshd.client_key().display(),
        known_hosts.display()
    );

    let daemon = repo.watch_url_env(
        &remote.ssh_url(&sshd),
        &FLAGS,
        &[("GIT_SSH_COMMAND", ssh.as_str())],
    )?;
    let pid = daemon.wait_running("web")?;
    wait_pushed(&daemon, &remote, pid, 0).with_context(|| format!("sshd log:\n{}", sshd.log()))?;
    ensure!(
        sshd.logins() >= 2,
        "sshd logged {} login(s), expected the clone and the push at least:\n{}",
        sshd.logins(),
        sshd.log()
    );
    ensure!(
        remote.tip(BRANCH)?.as_deref() == Some(main.as_str()),
        "the remote's {BRANCH} moved"
    );
    Ok(())
}

#[test]
fn a_refused_push_is_reported_retried_and_never_stops_healing() -> Result<()> {
    let repo = TestRepo::with_vm("web", &VmSpec::new().no_disks())?;
    let remote = BareRemote::clone_of(&repo)?;
    remote.set_hook(
        "pre-receive",
        "#!/bin/sh\necho 'status pushes are closed today' >&2\nexit 1\n",
    )?;

    let daemon = repo.watch_url(&remote.file_url(), &FLAGS)?;
    let old = daemon.wait_running("web")?;
    let said = daemon.poll("engine.toml to report the refused push", ACT, || {
        let error = repo.last_error();
        (error.contains("status branch status not pushed")
            && error.contains("status pushes are closed today"))
        .then_some(error)
    })?;
    eprintln!("engine.toml last_error:\n{said}");
    ensure!(
        remote.tip("status")?.is_none(),
        "the hook refused, yet the remote has a status branch"
    );

    let (new, healed) = kill_and_heal(&repo, &daemon, old)?;
    eprintln!("kill -9 of web's QEMU -> a new QEMU alive (push refused): {healed:?}");
    repo.wait_vm("web", "running again, restarts >= 1", ACT, |v| {
        v.phase == "running" && v.pid == Some(new) && v.restarts >= 1
    })?;

    // The server opens: the retry (at the next interval) pushes, the problem goes.
    remote.remove_hook("pre-receive")?;
    wait_pushed(&daemon, &remote, new, 1)?;
    daemon.poll("the push problem to leave engine.toml", ACT, || {
        (!repo.last_error().contains("not pushed")).then_some(())
    })?;
    Ok(())
}

#[test]
fn a_hanging_push_does_not_delay_healing() -> Result<()> {
    let repo = TestRepo::with_vm("web", &VmSpec::new().no_disks())?;
    let remote = BareRemote::clone_of(&repo)?;
    let fifo = repo.root().join("hold");
    let mark = repo.root().join("push-started");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    // Says it started, then waits for a writer that never comes (the cleanup kills it).
    remote.set_hook(
        "pre-receive",
        &format!(
            "#!/bin/sh\ntouch '{}'\ncat '{}' >/dev/null\nexit 1\n",
            mark.display(),
            fifo.display()
        ),
    )?;

    let daemon = repo.watch_url(&remote.file_url(), &FLAGS)?;
    let old = daemon.wait_running("web")?;
    daemon.poll("a push to hang in the server's hook", ACT, || {
        mark.exists().then_some(())
    })?;
    let (new, healed) = kill_and_heal(&repo, &daemon, old)?;
    eprintln!("kill -9 of web's QEMU -> a new QEMU alive (push hanging): {healed:?}");
    repo.wait_vm("web", "running again, restarts >= 1", ACT, |v| {
        v.phase == "running" && v.pid == Some(new) && v.restarts >= 1
    })?;
    ensure!(
        remote.tip("status")?.is_none(),
        "the hook holds the push, yet the remote has a status branch"
    );
    Ok(())
}
