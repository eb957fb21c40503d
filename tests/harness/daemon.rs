//! A long-running `plasmavmc watch` under test: its own process group, stdout and
//! stderr in files of the test's temp folder, JSON log lines read back as they come.
//!
//! A [`Daemon`] borrows its [`TestRepo`], so it is always dropped before the repo:
//! dropping it SIGKILLs its process group (the QEMUs it started live in their own
//! sessions and are left to the repo's cleanup). The repo also remembers every daemon
//! group and kills those first in its own cleanup, so no daemon can restart a QEMU
//! the cleanup just killed.
//!
//! Waiting for a log line fails at once, showing the log, if the daemon has exited. The
//! lines are read as the drill reads its daemon's ([`plasmavmc::drill::log`]).

use std::fmt::Display;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
pub use plasmavmc::drill::log::LogLine;

use crate::proc;
use crate::repo::TestRepo;
use crate::serial::serial_has_line;
use crate::wait::{poll_for, POLL};
use crate::{ACT_TIMEOUT, BOOT_TIMEOUT};

/// A running `plasmavmc watch`.
#[derive(Debug)]
pub struct Daemon<'r> {
    repo: &'r TestRepo,
    command: String,
    child: Child,
    stderr: PathBuf,
    stdout: PathBuf,
    started: Instant,
    /// Set once the daemon was reaped: its pid (and group id) may then be reused, so
    /// the group is no longer signalled.
    reaped: bool,
}

impl<'r> Daemon<'r> {
    /// Starts `cmd` in its own process group, stdin null, stdout/stderr to
    /// `<root>/<name>.{out,log}`.
    pub(crate) fn spawn(repo: &'r TestRepo, mut cmd: Command, name: &str) -> Result<Self> {
        let stdout = repo.root().join(format!("{name}.out"));
        let stderr = repo.root().join(format!("{name}.log"));
        let command = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout)?)
            .stderr(File::create(&stderr)?)
            .process_group(0);
        let child = cmd.spawn().with_context(|| format!("spawning {command}"))?;
        let daemon = Self {
            repo,
            command,
            child,
            stderr,
            stdout,
            started: Instant::now(),
            reaped: false,
        };
        repo.register_group(daemon.pid());
        Ok(daemon)
    }

    /// The daemon's pid (also its process group id).
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pids fit in i32")
    }

    /// How long ago it was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// True while the daemon process exists and is not a zombie.
    pub fn is_running(&self) -> bool {
        proc::is_alive(self.pid())
    }

    /// Everything it wrote on stderr so far.
    pub fn stderr(&self) -> String {
        fs::read(&self.stderr)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Every complete JSON line it logged so far, in order (other lines skipped).
    pub fn lines(&self) -> Vec<LogLine> {
        plasmavmc::drill::log::lines(&self.stderr())
    }

    /// Polls `check` like [`poll_for`], but fails at once, showing the log, if the
    /// daemon exits meanwhile; on timeout the error shows the log too.
    pub fn poll<T>(
        &self,
        what: impl Display,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> Result<T> {
        let found = poll_for(&what, timeout, || {
            if let Some(value) = check() {
                return Some(Some(value));
            }
            (!self.is_running()).then_some(None)
        })
        .map_err(|e| anyhow!("{e}\n{}", self.describe()))?;
        found.ok_or_else(|| {
            anyhow!(
                "the daemon exited while waiting for {what}\n{}",
                self.describe()
            )
        })
    }

    /// [`Self::poll`] for a condition.
    pub fn wait(
        &self,
        what: impl Display,
        timeout: Duration,
        mut cond: impl FnMut() -> bool,
    ) -> Result<()> {
        self.poll(what, timeout, || cond().then_some(()))
    }

    /// Waits for a line, from index `since` of [`Self::lines`] on, that satisfies
    /// `pred`; returns its index and the line. Fails at once if the daemon exited.
    pub fn wait_log_since(
        &self,
        what: impl Display,
        timeout: Duration,
        since: usize,
        mut pred: impl FnMut(&LogLine) -> bool,
    ) -> Result<(usize, LogLine)> {
        self.poll(what, timeout, || {
            self.lines()
                .into_iter()
                .enumerate()
                .skip(since)
                .find(|(_, l)| pred(l))
        })
    }

    /// The lines logged from index `since` of [`Self::lines`] on.
    pub fn lines_since(&self, since: usize) -> Vec<LogLine> {
        self.lines().into_iter().skip(since).collect()
    }

    /// The first line from index `since` on that satisfies `pred`, if logged yet.
    pub fn find_since(&self, since: usize, pred: impl FnMut(&LogLine) -> bool) -> Option<LogLine> {
        let mut pred = pred;
        self.lines_since(since).into_iter().find(|l| pred(l))
    }

    /// Waits for any line (since the start) that satisfies `pred`.
    pub fn wait_log(
        &self,
        what: impl Display,
        timeout: Duration,
        pred: impl FnMut(&LogLine) -> bool,
    ) -> Result<LogLine> {
        self.wait_log_since(what, timeout, 0, pred).map(|(_, l)| l)
    }

    /// Waits until the daemon runs `vm`: a live QEMU in `qemu.pid`, the guest at
    /// `tick 3`, and the status saying `running` with that pid. Returns the pid.
    pub fn wait_running(&self, vm: &str) -> Result<i32> {
        let repo = self.repo;
        let pid = self.poll(format!("a live QEMU for {vm}"), ACT_TIMEOUT, || {
            repo.try_qemu_pid(vm).filter(|&p| proc::is_alive(p))
        })?;
        self.wait(format!("tick 3 on {vm}'s console"), BOOT_TIMEOUT, || {
            serial_has_line(&repo.serial(vm), "tick 3")
        })?;
        self.poll(
            format!("status of {vm}: running with pid {pid}"),
            ACT_TIMEOUT,
            || {
                repo.vm_view(vm)
                    .ok()
                    .flatten()
                    .filter(|v| v.phase == "running" && v.pid == Some(pid))
            },
        )
        .with_context(|| repo.describe_vm(vm))?;
        Ok(pid)
    }

    /// [`Self::wait_running`] for the instance of `vm` on `host` (other hosts may keep
    /// stale folders of it): a live QEMU under `host`'s root named by its `qemu.pid`
    /// there, `tick 3` on that console, and the status saying `running` on `host` with
    /// that pid. Returns the pid.
    pub fn wait_running_on(&self, vm: &str, host: &str) -> Result<i32> {
        let repo = self.repo;
        let pid = self.poll(
            format!("a live QEMU for {vm} on {host}"),
            ACT_TIMEOUT,
            || repo.qemu_on(host, vm).ok(),
        )?;
        self.wait(
            format!("tick 3 on {vm}'s console on {host}"),
            BOOT_TIMEOUT,
            || serial_has_line(&repo.serial_on(host, vm), "tick 3"),
        )?;
        self.poll(
            format!("status of {vm}: running on {host} with pid {pid}"),
            ACT_TIMEOUT,
            || {
                repo.vm_view(vm)
                    .ok()
                    .flatten()
                    .filter(|v| v.phase == "running" && v.pid == Some(pid) && v.host == host)
            },
        )
        .with_context(|| repo.describe_vm(vm))?;
        Ok(pid)
    }

    /// Sends `signal` to the daemon process (not its group).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(Pid::from_raw(self.pid()), signal)
            .with_context(|| format!("sending {signal} to the daemon {}", self.pid()))
    }

    /// Makes sure at least one whole reconcile ran after this call: SIGHUP, wait for
    /// its "reconcile" line (trigger "signal"), SIGHUP again and wait for the next one.
    /// Reconciles run one after another, so the second starting means the first (which
    /// began after the call) has finished, status files included.
    pub fn resync(&self, timeout: Duration) -> Result<()> {
        self.hup(timeout)?;
        self.hup(timeout)
    }

    /// Sends SIGHUP and waits until the reconcile it triggers has started (its
    /// "reconcile" line, trigger "signal"); it may still be running on return.
    pub fn hup(&self, timeout: Duration) -> Result<()> {
        self.hup_then(timeout, || {})
    }

    /// [`Self::hup`], calling `each` at every poll while it waits (e.g. to sample
    /// processes during the reconcile).
    pub fn hup_then(&self, timeout: Duration, mut each: impl FnMut()) -> Result<()> {
        let since = self.lines().len();
        self.signal(Signal::SIGHUP)?;
        self.poll(
            "a reconcile after SIGHUP (trigger \"signal\")",
            timeout,
            || {
                each();
                self.lines()
                    .into_iter()
                    .skip(since)
                    .find(|l| l.is("reconcile", None) && l.str("trigger") == Some("signal"))
            },
        )?;
        Ok(())
    }

    /// SIGKILLs the daemon process only (like a crash: its group is left alone) and
    /// reaps it.
    pub fn kill9(&mut self) -> Result<()> {
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGKILL);
        self.child.wait().context("reaping the killed daemon")?;
        self.reaped = true;
        self.repo.unregister_group(self.pid());
        Ok(())
    }

    /// Reaps the daemon if it has ended (as a service manager learns of it: every
    /// thread gone, its files and locks released).
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        let status = self.child.try_wait()?;
        if status.is_some() && !self.reaped {
            self.reaped = true;
            self.repo.unregister_group(self.pid());
        }
        Ok(status)
    }

    /// Waits for the daemon to exit by itself; after `timeout` fails (the group is
    /// killed on drop).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the daemon did not exit within {timeout:?}\n{}",
                    self.describe()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The command, its stdout and the tail of its stderr, for failure messages.
    pub fn describe(&self) -> String {
        let err = self.stderr();
        let lines: Vec<&str> = err.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        let out = fs::read_to_string(&self.stdout).unwrap_or_default();
        format!(
            "--- daemon: {} (pid {}, running: {}, for {:?}) ---\n--- stdout ---\n{}\n--- stderr (tail) ---\n{tail}",
            self.command,
            self.pid(),
            self.is_running(),
            self.elapsed(),
            out.trim_end(),
        )
    }

    /// The repository it watches.
    pub fn repo(&self) -> &'r TestRepo {
        self.repo
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        // Its group may hold agents the test stopped: resumed before the SIGKILL.
        self.repo.resume_stopped();
        if !self.reaped {
            let _ = killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
            let _ = self.child.wait();
            self.repo.unregister_group(self.pid());
        }
    }
}
