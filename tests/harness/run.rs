//! Running the binary: stdin null, output captured, a deadline, and the whole
//! process group killed if the deadline passes or the handle is dropped early.

use std::fmt;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::wait::POLL;

/// What a finished run of the binary produced.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for messages.
    pub command: String,
    /// The exit code; `None` if killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Fails, showing everything the binary printed, unless it exited with `code`.
    pub fn expect_code(&self, code: i32) -> Result<&Self> {
        if self.code != Some(code) {
            bail!("expected exit code {code}, got {:?}\n{self}", self.code);
        }
        Ok(self)
    }

    /// The `FAIL <op> <vm>: <error>` line `apply` printed for `vm` (trimmed).
    pub fn fail_line(&self, vm: &str) -> Result<&str> {
        self.stdout
            .lines()
            .map(str::trim)
            .find(|l| {
                l.strip_prefix("FAIL ")
                    .and_then(|rest| rest.split_once(' '))
                    .is_some_and(|(_, rest)| rest.starts_with(&format!("{vm}:")))
            })
            .with_context(|| format!("no FAIL line for {vm}\n{self}"))
    }

    /// stdout followed by stderr.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "$ {}  (exit {:?})", self.command, self.code)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout.trim_end())?;
        write!(f, "--- stderr ---\n{}", self.stderr.trim_end())
    }
}

/// The `(line, col)` of the first `path:LINE:COL: message` in `text` (a validation
/// error as the binary prints it, or as `status/engine.toml` keeps it).
pub fn diagnostic(text: &str, path: &str) -> Option<(usize, usize)> {
    text.lines().find_map(|line| {
        let rest = &line[line.find(&format!("{path}:"))? + path.len() + 1..];
        let mut parts = rest.splitn(3, ':');
        let (l, c, msg) = (
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
            parts.next()?,
        );
        (msg.starts_with(' ') && !msg.trim().is_empty()).then_some((l, c))
    })
}

/// A run of the binary still in progress.
#[derive(Debug)]
pub struct Running {
    command: String,
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    started: Instant,
}

impl Running {
    /// Starts `cmd` in its own process group with stdin null and captured output.
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        let command = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().with_context(|| format!("spawning {command}"))?;
        let reader = |mut pipe: Box<dyn Read + Send>| {
            thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let stdout = child.stdout.take().map(|p| reader(Box::new(p)));
        let stderr = child.stderr.take().map(|p| reader(Box::new(p)));
        Ok(Self {
            command,
            child,
            stdout,
            stderr,
            started: Instant::now(),
        })
    }

    /// The child's pid.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pids fit in i32")
    }

    /// How long ago it started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The exit status if it has finished.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits for the end; after `timeout` kills its process group and fails.
    pub fn finish(mut self, timeout: Duration) -> Result<Output> {
        let deadline = self.started + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                self.kill_group();
                let _ = self.child.wait();
                let out = self.collect(None);
                bail!("timed out after {timeout:?}; killed\n{out}");
            }
            thread::sleep(POLL);
        };
        Ok(self.collect(status.code()))
    }

    fn collect(&mut self, code: Option<i32>) -> Output {
        let join =
            |h: Option<JoinHandle<String>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
        Output {
            command: self.command.clone(),
            code,
            stdout: join(self.stdout.take()),
            stderr: join(self.stderr.take()),
        }
    }

    fn kill_group(&self) {
        let _ = killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill_group();
            let _ = self.child.wait();
        }
    }
}
