//! `plasmavmc agent --root DIR --console VM | --logs VM [--follow] [--lines N]`: the
//! agent's serial modes, started by `plasmavmc console` and `plasmavmc logs` through the
//! host's usual transport (local, ssh, `exec`).
//!
//! In: the instance folder `<root>/vms/<vm>/`. Out: raw bytes on stdout (and, for the
//! console, stdin's bytes to the guest). No protocol and no host lock: these modes run
//! beside the engine's agent (under `watch`) and never touch what it owns. They only
//! read `serial.log`, connect to QEMU's `console.sock`, and hold `console.lock`, which
//! makes a second console at once refused by name (QEMU itself would queue it silently).
//!
//! `logs --follow` survives restarts: a start rotates `serial.log` to `serial.log.1`, so
//! a new file under the old name means a new run; its bytes follow the old one's.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::qemu::instance::{vms_dir, CONSOLE_LOCK, CONSOLE_SOCKET, SERIAL_LOG};

/// How often `logs --follow` looks for new bytes or a new run.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Why a serial mode could not run (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("no VM {vm:?} on this host (no folder {})", dir.display())]
    NoVm { vm: String, dir: PathBuf },
    #[error("another console is attached to {vm}; this one is refused (read along with `plasmavmc logs {vm} -f`)")]
    Busy { vm: String },
    #[error("{vm} has no console socket: it is not running, or it was started before consoles existed (restart it to get a console)")]
    NoSocket { vm: String },
    #[error("{vm} is not running (nothing answers on its console socket)")]
    NotRunning { vm: String },
    #[error("{vm}: {what}")]
    Io {
        vm: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn instance(root: &Path, vm: &str) -> Result<PathBuf, SerialError> {
    let dir = vms_dir(root).join(vm);
    if plasmavmc_specs::name_problem(vm).is_some() || !dir.is_dir() {
        return Err(SerialError::NoVm {
            vm: vm.to_owned(),
            dir,
        });
    }
    Ok(dir)
}

/// Attaches stdin/stdout to `vm`'s serial port until either side ends: the controller
/// (stdin at EOF) or QEMU (the VM stopped).
pub async fn console<R, W>(root: &Path, vm: &str, stdin: R, stdout: W) -> Result<(), SerialError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let dir = instance(root, vm)?;
    let io_err = |what| {
        let vm = vm.to_owned();
        move |source| SerialError::Io { vm, what, source }
    };
    let lock_file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(CONSOLE_LOCK))
        .map_err(io_err("cannot open console.lock"))?;
    let _held = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
        .map_err(|_| SerialError::Busy { vm: vm.to_owned() })?;
    let stream = match crate::qemu::qmp::connect_unix(&dir.join(CONSOLE_SOCKET)).await {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SerialError::NoSocket { vm: vm.to_owned() })
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(SerialError::NotRunning { vm: vm.to_owned() })
        }
        Err(e) => return Err(io_err("cannot connect to console.sock")(e)),
    };
    let (from_vm, to_vm) = stream.into_split();
    let mut down = tokio::spawn(relay(from_vm, stdout));
    let mut up = tokio::spawn(relay(stdin, to_vm));
    tokio::select! {
        _ = &mut down => {}
        _ = &mut up => {}
    }
    down.abort();
    up.abort();
    Ok(())
}

/// Copies until EOF or an error on either side, flushing after every read.
async fn relay<R, W>(mut from: R, mut to: W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = [0u8; 4096];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
    }
}

async fn out<W: AsyncWrite + Unpin>(stdout: &mut W, bytes: &[u8]) -> io::Result<()> {
    stdout.write_all(bytes).await?;
    stdout.flush().await
}

/// The tail of `text` holding its last `n` lines (a last line without its newline counts).
pub fn last_lines(text: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &text[text.len()..];
    }
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &text[i + 1..];
            }
        }
    }
    text
}

/// Writes `vm`'s serial log (its last `lines` lines when given) to `stdout`; with
/// `follow`, then every new byte, across restarts, until the controller closes stdin.
pub async fn logs<R, W>(
    root: &Path,
    vm: &str,
    follow: bool,
    lines: Option<usize>,
    stdin: R,
    mut stdout: W,
) -> Result<(), SerialError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let dir = instance(root, vm)?;
    let path = dir.join(SERIAL_LOG);
    let io_err = |what| {
        let vm = vm.to_owned();
        move |source| SerialError::Io { vm, what, source }
    };
    let mut file = File::open(&path).ok();
    let mut head = Vec::new();
    if let Some(f) = file.as_mut() {
        f.read_to_end(&mut head)
            .map_err(io_err("cannot read serial.log"))?;
    } else if !follow {
        return Ok(());
    }
    let shown = match lines {
        Some(n) => last_lines(&head, n).to_vec(),
        None => head,
    };
    out(&mut stdout, &shown)
        .await
        .map_err(io_err("cannot write"))?;
    if !follow {
        return Ok(());
    }
    // The controller closing stdin (it ended) ends the follow.
    let mut gone = tokio::spawn(async move {
        let mut stdin = stdin;
        let mut sink = [0u8; 256];
        while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    loop {
        tokio::select! {
            _ = &mut gone => return Ok(()),
            () = tokio::time::sleep(FOLLOW_POLL) => {}
        }
        let mut fresh = Vec::new();
        if let Some(f) = file.as_mut() {
            f.read_to_end(&mut fresh)
                .map_err(io_err("cannot read serial.log"))?;
        }
        // A new run: the file under the name is no longer the one open.
        let now = std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        let open = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| (m.dev(), m.ino()));
        if now.is_some() && now != open {
            if let Ok(mut f) = File::open(&path) {
                f.read_to_end(&mut fresh)
                    .map_err(io_err("cannot read serial.log"))?;
                file = Some(f);
            }
        } else if let (Some(f), Some(len)) = (file.as_mut(), std::fs::metadata(&path).ok()) {
            // Truncated in place: start over from its beginning.
            if len.len() < f.stream_position().unwrap_or(0) {
                let _ = f.seek(SeekFrom::Start(0));
            }
        }
        if !fresh.is_empty() {
            out(&mut stdout, &fresh)
                .await
                .map_err(io_err("cannot write"))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_counts_from_the_end() {
        let text = b"a\nb\nc\n";
        assert_eq!(last_lines(text, 0), b"");
        assert_eq!(last_lines(text, 1), b"c\n");
        assert_eq!(last_lines(text, 2), b"b\nc\n");
        assert_eq!(last_lines(text, 3), text);
        assert_eq!(last_lines(text, 9), text);
        assert_eq!(last_lines(b"a\nb", 1), b"b");
        assert_eq!(last_lines(b"", 4), b"");
    }

    #[tokio::test]
    async fn logs_of_a_missing_vm_say_so() {
        let tmp = tempfile::tempdir().expect("tmp");
        let err = logs(
            tmp.path(),
            "web",
            false,
            None,
            tokio::io::empty(),
            tokio::io::sink(),
        )
        .await
        .expect_err("no such VM");
        assert!(matches!(err, SerialError::NoVm { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_second_console_is_refused_and_an_old_vm_has_no_socket() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = vms_dir(tmp.path()).join("web");
        std::fs::create_dir_all(&dir).expect("dir");
        let held = Flock::lock(
            File::create(dir.join(CONSOLE_LOCK)).expect("lock file"),
            FlockArg::LockExclusiveNonblock,
        )
        .expect("first console");
        let err = console(tmp.path(), "web", tokio::io::empty(), tokio::io::sink())
            .await
            .expect_err("busy");
        assert!(matches!(err, SerialError::Busy { .. }), "{err}");
        drop(held);
        let err = console(tmp.path(), "web", tokio::io::empty(), tokio::io::sink())
            .await
            .expect_err("no socket");
        assert!(matches!(err, SerialError::NoSocket { .. }), "{err}");
    }
}
