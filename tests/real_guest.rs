//! A real Debian 12 guest (`tests/guest/debian.sh`: systemd, cloud-init, OpenSSH) booted
//! from a spec with `[cloud_init]`, under TCG with 2 vCPUs, on the implicit local host.
//!
//! What this file proves (one boot, in order):
//! - real cloud-init reads the engine's `NoCloud` seed: the user data from the commit
//!   creates a user with the test's SSH key, the engine's meta-data names the guest after
//!   the VM (`hostname` prints `web-1`), and cloud-init ends `done` (no module failed);
//! - SSH through the spec's port forward works (after the guest's `SSH-` banner: slirp
//!   accepts a forwarded connection before sshd listens);
//! - `plasmavmc console` on a pty: Enter brings getty's `login:` prompt, Ctrl-] leaves
//!   with exit 0, and the VM runs on (SSH still answers);
//! - `plasmavmc logs` shows the boot: the kernel's `Linux version` line and cloud-init's
//!   lines down to `finished`.

use std::fs;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use plasmavmc_e2e::debian::{ssh_banner, DEBIAN_CMDLINE};
use plasmavmc_e2e::pty::PtyChild;
use plasmavmc_e2e::{
    debian, free_port, is_alive, keygen, poll_for, wait_for, DebianImage, GuestSsh, TestRepo,
};

/// From `apply` to the guest's sshd answering: ~30 s on an idle 2-core machine, ~50 s
/// on a busy one (BENCHMARKS.md); generous, as tests bound 10× the figure.
const SSH_TIMEOUT: Duration = Duration::from_secs(300);

/// The VM's name, hence the guest's hostname (the engine's meta-data `local-hostname`).
const VM: &str = "web-1";

/// The user the user data creates (the image has no other way in).
const USER: &str = "tester";

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

/// `vms/web-1.toml` booting the image (an overlay of it), its port `port` forwarded to
/// the guest's 22, and the user data giving [`USER`] the key `public`.
fn write_vm(repo: &TestRepo, image: &DebianImage, port: u16, public: &str) -> Result<()> {
    repo.write(
        &format!("vms/{VM}.user-data.yaml"),
        &format!(
            "#cloud-config\n\
             users:\n  \
               - name: {USER}\n    \
                 shell: /bin/bash\n    \
                 ssh_authorized_keys:\n      \
                   - {}\n",
            public.trim()
        ),
    )?;
    repo.write(
        &format!("vms/{VM}.toml"),
        &format!(
            "vcpus = 2\n\
             memory_mb = 1024\n\
             restart = \"never\"\n\
             \n\
             [boot]\n\
             kernel = {kernel:?}\n\
             initrd = {initrd:?}\n\
             cmdline = {DEBIAN_CMDLINE:?}\n\
             \n\
             [[disks]]\n\
             name = \"root\"\n\
             image = {disk:?}\n\
             \n\
             [[nics]]\n\
             network = \"user\"\n\
             forward = [\"tcp:{port}:22\"]\n\
             \n\
             [cloud_init]\n\
             user_data = \"{VM}.user-data.yaml\"\n\
             \n\
             [qemu]\n\
             accel = \"tcg\"\n",
            kernel = image.kernel.display().to_string(),
            initrd = image.initrd.display().to_string(),
            disk = image.image.display().to_string(),
        ),
    )
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
    let status = ssh.run("cloud-init status --wait")?;
    ensure!(
        status.contains("status: done"),
        "cloud-init did not end well:\n{status}\n{}",
        ssh.run("cloud-init status --long").unwrap_or_default()
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
