//! `plasmavmc console` and `plasmavmc logs` against real QEMU, on a simulated `exec` host
//! (its argv gets the agent's serial mode appended), while `watch` holds the host.
//!
//! What this file proves (one boot, in order):
//! - `logs -n 5` prints the serial log's last 5 lines;
//! - `console` with a stdin that is not a terminal relays the guest's ticks while the
//!   daemon runs, and serial.log keeps growing while it is attached;
//! - a second `console` at once is refused, by name;
//! - Ctrl-] (0x1d) on stdin leaves the console, exit 0;
//! - `logs -f` follows the log across a restart (QEMU killed with SIGKILL, restarted by
//!   the daemon): the second boot shows up in the same stream.

use std::io::{Read, Write};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use plasmavmc_e2e::{last_tick, wait_for, HostSpec, TestRepo, VmSpec, BOOT_TIMEOUT};

/// A child whose stdout is gathered in the background; killed on drop.
struct Attached {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
}

impl Attached {
    fn spawn(repo: &TestRepo, args: &[&str]) -> Result<Self> {
        let mut cmd = repo.command(args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("spawning plasmavmc")?;
        let mut stdout = child.stdout.take().context("stdout")?;
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&out);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().expect("buffer").extend_from_slice(&buf[..n]);
            }
        });
        Ok(Self { child, out })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().expect("buffer")).into_owned()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn console_and_logs_under_watch() -> Result<()> {
    let repo = TestRepo::new()?;
    repo.write_host("hv1", &HostSpec::default())?;
    repo.write_vm("web", &VmSpec::new())?;
    repo.commit("web on hv1")?;
    let daemon = repo.watch(&[])?;
    let pid = daemon.wait_running("web")?;

    // logs -n 5: exactly the log's last five lines.
    let out = repo.run(&["logs", "web", "-n", "5"])?;
    out.expect_code(0)?;
    let shown: Vec<&str> = out.stdout.lines().collect();
    ensure!(shown.len() == 5, "logs -n 5 printed:\n{out}");
    let serial = repo.serial("web");
    ensure!(
        serial.contains(&out.stdout),
        "logs -n 5 is not the log's tail:\n{out}"
    );

    // A follower started now sees the restart later on.
    let follower = Attached::spawn(&repo, &["logs", "web", "-f"])?;

    // The console relays the ticks, with the daemon holding the host.
    let mut console = Attached::spawn(&repo, &["console", "web"])?;
    let start = last_tick(&repo.serial("web")).context("no tick yet")?;
    wait_for("ticks through the console", BOOT_TIMEOUT, || {
        last_tick(&console.text()).is_some_and(|t| t > start)
    })?;
    // serial.log keeps being written while the console is attached.
    wait_for(
        "serial.log to grow while attached",
        Duration::from_secs(20),
        || last_tick(&repo.serial("web")).is_some_and(|t| t >= start + 3),
    )?;
    ensure!(
        last_tick(&console.text()).is_some_and(|t| t >= start + 2),
        "the console fell behind the log:\n{}",
        console.text()
    );

    // A second console is refused, by name.
    let second = repo.run(&["console", "web"])?;
    ensure!(
        second.code != Some(0) && second.stderr.contains("another console is attached"),
        "a second console was not refused:\n{second}"
    );
    ensure!(
        console.child.try_wait()?.is_none(),
        "the first console ended"
    );

    // Ctrl-] leaves.
    console
        .child
        .stdin
        .as_mut()
        .context("console stdin")?
        .write_all(&[0x1d])?;
    let mut status = None;
    wait_for(
        "the console to leave on Ctrl-]",
        Duration::from_secs(10),
        || {
            status = console.child.try_wait().ok().flatten();
            status.is_some()
        },
    )?;
    ensure!(
        status.is_some_and(|s| s.success()),
        "console exit: {status:?}"
    );

    // A restart (QEMU killed): logs -f carries on with the new run.
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    wait_for("a second boot in logs -f", BOOT_TIMEOUT, || {
        follower.text().matches("plasmavmc-guest: booted").count() >= 2
    })
    .with_context(|| format!("logs -f printed:\n{}", follower.text()))?;
    let new_pid = daemon.wait_running("web")?;
    ensure!(new_pid != pid, "QEMU was not restarted");
    Ok(())
}
