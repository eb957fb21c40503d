//! A command run on a pseudo-terminal, as a person at a terminal runs it: its stdin,
//! stdout and stderr are the pty's slave end (so `isatty` holds and raw mode works), the
//! test types on the master end and reads what the command prints there.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;

use anyhow::{Context, Result};
use nix::pty::openpty;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// A child on a pty, in its own process group (killed on drop); everything it prints
/// is gathered in the background.
#[derive(Debug)]
pub struct PtyChild {
    child: Child,
    master: File,
    out: Arc<Mutex<Vec<u8>>>,
}

impl PtyChild {
    /// Starts `cmd` with the slave end of a new pty as stdin, stdout and stderr.
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        let pty = openpty(None, None).context("openpty")?;
        let slave = File::from(pty.slave);
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave))
            .process_group(0);
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        // The parent's copies of the slave end go with `cmd`: once the child is gone, a
        // read of the master end ends (EIO) and so does the reader.
        drop(cmd);
        let master = File::from(pty.master);
        let mut reader = master.try_clone()?;
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&out);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .expect("pty buffer")
                    .extend_from_slice(&buf[..n]);
            }
        });
        Ok(Self { child, master, out })
    }

    /// Types `bytes` (as keys: `\r` is Enter, `0x1d` Ctrl-]).
    pub fn type_keys(&mut self, bytes: &[u8]) -> Result<()> {
        self.master.write_all(bytes).context("writing to the pty")?;
        Ok(())
    }

    /// Everything printed so far (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().expect("pty buffer")).into_owned()
    }

    /// Its exit status, once it has ended.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }
}

impl Drop for PtyChild {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let pid = i32::try_from(self.child.id()).expect("pids fit in i32");
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}
