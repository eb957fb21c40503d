//! The `ssh://` transport, end to end: a real OpenSSH server (`/usr/sbin/sshd`, started
//! by the harness's [`Sshd`] on 127.0.0.1 with keys of the test's own), the system `ssh`
//! client as the engine runs it, the binary under test as the agent on the far side,
//! and real QEMU (TCG) booting the tiny test guest. Nothing in `~/.ssh` is read or
//! written: the host spec names its `known_hosts` and `identity_file`.
//!
//! What this file proves, one test each:
//! - a VM committed on a host `address = "ssh://<user>@127.0.0.1:<port>"` whose key is
//!   pinned by `known_hosts` (relative to the spec folder) and whose login key is
//!   `identity_file` (absolute) is started by `apply --auto-approve` through sshd (which
//!   logged the login); its QEMU runs in its instance folder under that host's root;
//!   `status` (a new ssh connection) says it runs on that host with that pid; the
//!   guest ticks on its serial console; the agents exit with their engine;
//! - the same host with a `known_hosts` that holds another key for it: `apply` exits
//!   non-zero, its error naming the host and ssh's "Host key verification failed" and
//!   saying the VM could not be placed; sshd never accepted a login, and no instance
//!   and no QEMU exist.
//!
//! Each test starts its own sshd on its own port; dropping it kills sshd, and the
//! repository's cleanup kills every connection, agent and QEMU under the temp folder,
//! even when the test fails.

use std::fs;

use anyhow::{ensure, Context, Result};
use plasmavmc_e2e::proc::qemus_under;
use plasmavmc_e2e::{Sshd, TestRepo, VmSpec, BOOT_TIMEOUT};

#[test]
fn a_vm_on_an_ssh_host_runs_under_its_root() -> Result<()> {
    let repo = TestRepo::new()?;
    let sshd = Sshd::start(&repo)?;
    // known_hosts relative to the spec folder (read from the working tree);
    // identity_file absolute (a private key has no business in the repository).
    repo.write("keys/known_hosts", &sshd.known_hosts()?)?;
    repo.write_host("hv1", &sshd.host_spec("keys/known_hosts"))?;
    repo.write_vm("web", &VmSpec::new())?;
    repo.commit("web on a host reached by ssh")?;

    let apply = repo.run(&["apply", "--auto-approve"])?;
    apply.expect_code(0)?;
    ensure!(
        sshd.logins() > 0,
        "sshd logged no login: the engine did not come through it\n{apply}\nsshd log:\n{}",
        sshd.log()
    );
    let pid = repo
        .qemu_on("hv1", "web")
        .with_context(|| format!("{apply}\nsshd log:\n{}", sshd.log()))?;
    let root = repo.host_root("hv1");
    ensure!(
        qemus_under(repo.root()) == [pid],
        "the test runs QEMUs {:?}, expected only web's {pid} under {}",
        qemus_under(repo.root()),
        root.display()
    );

    let status = repo.status_json()?;
    let web = status["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == "web")
        .with_context(|| format!("no web in status --json: {status:#}"))?;
    ensure!(
        web["phase"] == "running" && web["host"] == "hv1" && web["pid"] == pid,
        "status --json should say web runs on hv1 with pid {pid}: {web:#}"
    );
    let view = repo.vm_view("web")?.context("no status/vms/web.toml")?;
    ensure!(
        view.phase == "running" && view.host == "hv1" && view.pid == Some(pid),
        "status of web: expected running on hv1 with pid {pid}:\n{view}"
    );

    repo.wait_serial("web", "tick 3", BOOT_TIMEOUT)?;
    ensure!(
        repo.qemu_on("hv1", "web")? == pid,
        "web's QEMU changed while it booted"
    );
    // The remote agents saw their engine go (EOF through ssh) and exited.
    repo.wait_agents_exit("apply and status")?;
    Ok(())
}

#[test]
fn a_host_key_that_does_not_match_is_refused() -> Result<()> {
    let repo = TestRepo::new()?;
    let sshd = Sshd::start(&repo)?;
    let known_hosts = repo.root().join("known_hosts-wrong");
    fs::write(&known_hosts, sshd.known_hosts_with_another_key()?)?;
    repo.write_host("hv1", &sshd.host_spec(&known_hosts.to_string_lossy()))?;
    repo.write_vm("web", &VmSpec::new())?;
    repo.commit("web on a host whose key does not match")?;

    let apply = repo.run(&["apply", "--auto-approve"])?;
    ensure!(
        apply.code.is_some_and(|c| c != 0),
        "apply should fail when the host key does not match\n{apply}"
    );
    // The reason is in the error itself, not only in ssh's own lines relayed before it.
    ensure!(
        apply.stderr.lines().any(|l| {
            l.starts_with("warning: host hv1 is unreachable")
                && l.contains("Host key verification failed")
        }),
        "apply should say hv1 is unreachable because its host key failed verification\n{apply}"
    );
    ensure!(
        apply.stderr.contains("web: cannot be placed") && apply.stderr.contains("hv1 unreachable"),
        "apply should say why web was not started\n{apply}"
    );
    ensure!(
        sshd.logins() == 0,
        "sshd accepted a login despite the wrong host key:\n{}",
        sshd.log()
    );
    ensure!(
        repo.hosts_with_instance("web").is_empty()
            && repo.qemus_of("web").is_empty()
            && qemus_under(repo.root()).is_empty(),
        "nothing may be created or started: instances on {:?}, QEMUs {:?}",
        repo.hosts_with_instance("web"),
        qemus_under(repo.root())
    );
    Ok(())
}
