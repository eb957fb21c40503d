//! A real Debian 12 guest (`tests/guest/debian.sh`: systemd, cloud-init, OpenSSH) booted
//! from a spec with `[cloud_init]`, under TCG with 2 vCPUs, on the implicit local host:
//! the VM of `examples/cloud-init`, its files as they are, but for the SSH key (the
//! test's), the image's folder and the forwarded port.
//!
//! What this file proves (one boot, in order):
//! - real cloud-init reads the engine's `NoCloud` seed: the user data from the commit
//!   creates user `ops` with the test's SSH key, sudo and a motd; the network config
//!   finds the NIC by the spec's MAC and gives it a static address; the engine's
//!   meta-data names the guest after the VM (`hostname` prints `web-1`); cloud-init ends
//!   `done` (no module failed);
//! - SSH through the spec's port forward works (after the guest's `SSH-` banner: slirp
//!   accepts a forwarded connection before sshd listens);
//! - `plasmavmc console` on a pty: Enter brings getty's `login:` prompt, Ctrl-] leaves
//!   with exit 0, and the VM runs on (SSH still answers);
//! - `plasmavmc logs` shows the boot: the kernel's `Linux version` line and cloud-init's
//!   lines down to `finished`.
//!
//! And, in a second boot of the same VM under `watch`, `[health]` against the image's
//! real qemu-guest-agent: the status shows Debian and the guest's address; the
//! example's `exec` readiness probe (`systemctl is-active ssh`) makes the VM ready; an
//! `exec` liveness probe that starts failing (a file it tests appears, made over SSH)
//! gets the QEMU replaced, with the probe's exit status in the events.

use std::fs;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use plasmavmc_e2e::artifacts::workspace_root;
use plasmavmc_e2e::debian::ssh_banner;
use plasmavmc_e2e::pty::PtyChild;
use plasmavmc_e2e::{
    debian, free_port, is_alive, keygen, poll_for, wait_for, DebianImage, GuestSsh, TestRepo,
};

/// From `apply` to the guest's sshd answering: ~30 s on an idle 2-core machine, 60–75 s
/// on a busy one (BENCHMARKS.md); generous, as other tests may share the cores.
const SSH_TIMEOUT: Duration = Duration::from_secs(300);

/// The VM's name, hence the guest's hostname (the engine's meta-data `local-hostname`).
const VM: &str = "web-1";

/// The user the example's user data creates (the image has no other way in).
const USER: &str = "ops";

#[test]
fn debian_with_cloud_init_ssh_console_and_logs() -> Result<()> {
    let image = debian()?;
    let repo = TestRepo::new()?;
    let key = repo.root().join("id_ed25519");
    keygen(&key)?;
    let port = free_port()?;
    write_vm(
        &repo,
        &image,
        port,
        &fs::read_to_string(key.with_extension("pub"))?,
        "",
    )?;
    repo.commit("web-1: Debian 12 with cloud-init")?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    let qemu = repo.qemu_pid(VM)?;

    let ssh = GuestSsh::new(port, USER, &key);
    ssh_in(&repo, &ssh)?;
    console(&repo)?;
    ensure!(is_alive(qemu), "QEMU {qemu} ended with the console");
    ensure!(
        ssh.run("hostname")?.trim() == VM,
        "the guest stopped answering after the console"
    );
    logs(&repo)
}

/// A liveness probe beside the example's readiness probe: fails once `/run/wedged`
/// exists (`test` exits 1); generous timings, as a TCG guest on a busy machine is slow.
const WEDGED: &str = "\n[health.liveness]\nkind = \"exec\"\ncommand = [\"test\", \"!\", \"-e\", \"/run/wedged\"]\nperiod = \"5s\"\ntimeout = \"5s\"\nfailure_threshold = 3\n";

#[test]
fn exec_probes_through_the_real_guest_agent() -> Result<()> {
    let image = debian()?;
    let repo = TestRepo::new()?;
    let key = repo.root().join("id_ed25519");
    keygen(&key)?;
    let port = free_port()?;
    let public = fs::read_to_string(key.with_extension("pub"))?;
    write_vm(&repo, &image, port, &public, WEDGED)?;
    repo.commit("web-1 with an exec liveness probe")?;
    let _daemon = repo.watch(&[])?;
    // (Not `wait_running`: it waits for the tiny guest's ticks, which Debian never prints.)
    let first = repo
        .wait_vm(VM, "running", SSH_TIMEOUT, |v| {
            v.phase == "running" && v.pid.is_some()
        })?
        .pid
        .context("a running VM has a pid")?;
    let ssh = GuestSsh::new(port, USER, &key);
    wait_for("the guest's SSH banner", SSH_TIMEOUT, || {
        ssh_banner(ssh.port)
    })
    .with_context(|| format!("serial console:\n{}", serial_tail(&repo)))?;
    let view = repo.wait_vm(VM, "ready and alive by its exec probes", SSH_TIMEOUT, |v| {
        v.ready() == Some(true)
            && v.health_flag("liveness", "ok") == Some(true)
            && v.health_flag("guest_agent", "answering") == Some(true)
    })?;
    let (ready, os) = (
        view.health_text("readiness", "last"),
        view.health_text("guest_agent", "os"),
    );
    ensure!(
        ready.contains("exit 0: active") && os.contains("Debian"),
        "the real guest agent's answers are not in the status:\n{view}"
    );
    ensure!(
        view.pid == Some(first),
        "replaced before the test began:\n{view}"
    );
    poll_for(
        "ssh sudo touch /run/wedged",
        Duration::from_secs(120),
        || ssh.run("sudo -n touch /run/wedged").ok(),
    )?;
    let wedged = Instant::now();
    repo.wait_vm(
        VM,
        "replaced by its failed liveness probe",
        SSH_TIMEOUT,
        |v| {
            v.phase == "running"
                && v.pid.is_some_and(|p| p != first)
                && v.has_event("unhealthy", "liveness probe failed: exit 1")
                && v.has_event("exited", "unhealthy")
        },
    )?;
    eprintln!(
        "exec liveness (period 5s, timeout 5s, threshold 3): /run/wedged -> running in a new QEMU {:?}",
        wedged.elapsed()
    );
    ensure!(!is_alive(first), "the unhealthy QEMU {first} still runs");
    Ok(())
}

/// The example this test boots, as an operator would (`examples/cloud-init`).
const EXAMPLE: &str = "examples/cloud-init";

/// The SSH key line of the example's user data, replaced by the test's key.
const PLACEHOLDER_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIREPLACEMEWITHYOURPUBLICKEYxxxxxxxxxxxxxx ops@example.com";

/// The example's VM, user data and network config, with the test's key in the user data,
/// the image from `target/debian/`, a free port forwarded to the guest's 22, and `extra`
/// at the end of the VM's file.
fn write_vm(
    repo: &TestRepo,
    image: &DebianImage,
    port: u16,
    public: &str,
    extra: &str,
) -> Result<()> {
    let example = workspace_root().join(EXAMPLE);
    let read = |rel: &str| {
        fs::read_to_string(example.join(rel)).with_context(|| format!("reading {EXAMPLE}/{rel}"))
    };
    let user_data = read("cloud-init/web-1.yaml")?;
    ensure!(
        user_data.contains(PLACEHOLDER_KEY),
        "{EXAMPLE}/cloud-init/web-1.yaml lost its key placeholder"
    );
    repo.write(
        "cloud-init/web-1.yaml",
        &user_data.replace(PLACEHOLDER_KEY, public.trim()),
    )?;
    repo.write(
        "cloud-init/network-config.yaml",
        &read("cloud-init/network-config.yaml")?,
    )?;
    let dir = image.image.parent().context("target/debian")?;
    let spec = read(&format!("vms/{VM}.toml"))?;
    ensure!(
        spec.matches("\"guest/").count() == 3 && spec.contains("\"tcp:2222:22\""),
        "{EXAMPLE}/vms/{VM}.toml no longer names guest/ files and forwards 2222"
    );
    let spec = spec
        .replace("\"guest/", &format!("\"{}/", dir.display()))
        .replace("\"tcp:2222:22\"", &format!("\"tcp:{port}:22\""));
    repo.write(&format!("vms/{VM}.toml"), &format!("{spec}{extra}"))
}

/// The last lines of the guest's serial console, for failures.
fn serial_tail(repo: &TestRepo) -> String {
    let serial = repo.serial(VM);
    let lines: Vec<&str> = serial.lines().rev().take(25).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// (a) SSH through the forward with the key of the user data: the hostname is the VM's
/// name, and cloud-init ended without an error.
fn ssh_in(repo: &TestRepo, ssh: &GuestSsh) -> Result<()> {
    let started = Instant::now();
    wait_for("the guest's SSH banner", SSH_TIMEOUT, || {
        ssh_banner(ssh.port)
    })
    .with_context(|| format!("serial console:\n{}", serial_tail(repo)))?;
    let hostname = poll_for("ssh hostname", Duration::from_secs(120), || {
        ssh.run("hostname").ok()
    })
    .with_context(|| format!("last try: {:?}", ssh.run("hostname").err()))?;
    eprintln!("ssh hostname answered {:?} after apply", started.elapsed());
    ensure!(
        hostname.trim() == VM,
        "hostname printed {hostname:?}, not the VM's name"
    );
    // cloud-init's later stages restart sshd (`ssh_pwauth` of the user data): a new
    // connection may be reset meanwhile, so the wait is retried until it answers.
    let status = poll_for("cloud-init's end", Duration::from_secs(180), || {
        ssh.run("cloud-init status --wait; true").ok()
    })?;
    ensure!(
        status.contains("status: done"),
        "cloud-init did not end well:\n{status}\n{}",
        ssh.run("cloud-init status --long").unwrap_or_default()
    );
    // The rest of the user data, and the network config: the NIC found by the spec's
    // MAC, renamed `lan`, a static address (no DHCP lease: not `dynamic`).
    ensure!(
        ssh.run("sudo -n cat /etc/motd")?
            .contains("managed by PlasmaVMC"),
        "the user data's sudo rule or motd did not take"
    );
    let addr = ssh.run("ip -4 -o addr show dev lan")?;
    ensure!(
        addr.contains("10.0.2.15/24") && !addr.contains("dynamic"),
        "the network config did not take: {addr}"
    );
    Ok(())
}

/// (b) The console on a terminal: Enter brings getty's prompt, Ctrl-] leaves, exit 0.
fn console(repo: &TestRepo) -> Result<()> {
    let mut console = PtyChild::spawn(repo.command(&["console", VM]))?;
    let mut pressed: Option<Instant> = None;
    wait_for(
        "a login: prompt on the console",
        Duration::from_secs(60),
        || {
            if console.text().contains("login:") {
                return true;
            }
            // Enter again every few seconds: the first one may come before the console is
            // connected to QEMU.
            if pressed.is_none_or(|t| t.elapsed() > Duration::from_secs(3)) {
                pressed = Some(Instant::now());
                let _ = console.type_keys(b"\r");
            }
            false
        },
    )
    .with_context(|| format!("the console printed:\n{}", console.text()))?;
    console.type_keys(&[0x1d])?;
    let exit = poll_for(
        "the console to leave on Ctrl-]",
        Duration::from_secs(10),
        || console.try_wait().ok().flatten(),
    )?;
    ensure!(exit.success(), "console exit: {exit}\n{}", console.text());
    Ok(())
}

/// (c) The boot in `plasmavmc logs`, from the kernel to cloud-init's end.
fn logs(repo: &TestRepo) -> Result<()> {
    let logs = poll_for(
        "cloud-init's end in plasmavmc logs",
        Duration::from_secs(60),
        || {
            let out = repo.run(&["logs", VM]).ok()?;
            (out.code == Some(0) && out.stdout.contains("finished at")).then_some(out.stdout)
        },
    )
    .with_context(|| format!("serial console:\n{}", serial_tail(repo)))?;
    for line in [
        "Linux version",
        "Cloud-init v.",
        "running 'init'",
        "DataSourceNoCloud",
    ] {
        ensure!(
            logs.contains(line),
            "plasmavmc logs lacks {line:?}:\n{}",
            serial_tail(repo)
        );
    }
    Ok(())
}
