//! QEMU processes: spawn in their own session, find them again, tell whether they live.
//!
//! QEMU is started as a child with `setsid` (so a terminal's Ctrl-C or hang-up and the
//! engine's own death never reach it), stdout/stderr into `qemu.log`, `-pidfile` and no
//! `-daemonize` (its errors would be lost). Liveness reads `/proc/PID/stat`: a zombie
//! counts as dead (`kill(pid, 0)` says alive for seconds here), and the cmdline must
//! hold the instance's uuid, so a recycled pid is never mistaken for our QEMU.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The QEMU binary: `$PLASMAVMC_QEMU` or `qemu-system-x86_64` from `PATH`.
pub fn qemu_binary() -> String {
    std::env::var("PLASMAVMC_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_owned())
}

/// Spawns `program args` in `dir` in a new session, output appended to `log`. A thread
/// reaps the child when it exits, so it never lingers as a zombie of the engine.
pub fn spawn_detached(program: &str, args: &[String], dir: &Path, log: &Path) -> io::Result<u32> {
    let out = File::options()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    new_session(&mut cmd);
    let mut child = cmd.spawn()?;
    let pid = child.id();
    std::thread::Builder::new()
        .name(format!("reap-{pid}"))
        .spawn(move || {
            // Releases the process table entry and keeps the exit status for the watcher
            // that classifies the exit (only children have one to give).
            if let Ok(status) = child.wait() {
                exit_statuses()
                    .lock()
                    .expect("exit status table")
                    .insert(pid, status);
            }
        })?;
    Ok(pid)
}

#[allow(unsafe_code)]
fn new_session(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: `umask` and `setsid` are async-signal-safe and touch no memory of the
    // parent; they are all that runs between fork and exec (umask 077: QEMU's logs and
    // sockets are created 0600). std offers process groups but not sessions. (The
    // engine's only other unsafe code is the pidfd below: libc has no safe wrapper.)
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
            nix::unistd::setsid().map(|_| ()).map_err(io::Error::from)
        });
    }
}

fn exit_statuses() -> &'static Mutex<HashMap<u32, std::process::ExitStatus>> {
    static TABLE: OnceLock<Mutex<HashMap<u32, std::process::ExitStatus>>> = OnceLock::new();
    TABLE.get_or_init(Mutex::default)
}

/// The exit status of a child this process spawned, once it was reaped (taken once).
pub fn take_exit_status(pid: u32) -> Option<std::process::ExitStatus> {
    exit_statuses()
        .lock()
        .expect("exit status table")
        .remove(&pid)
}

/// A pidfd for `pid`: becomes readable when the process exits, even when it is not our
/// child, and never refers to a recycled pid.
#[allow(unsafe_code)]
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    let raw =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open takes two integers and returns a new file descriptor or -1; it
    // touches no memory of ours. libc has no wrapper; nix neither.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits until the process behind `pidfd` exits.
#[allow(unsafe_code)]
pub async fn wait_pidfd(pidfd: OwnedFd) -> io::Result<()> {
    // SAFETY: the `OwnedFd` is a valid open descriptor, moved into the `AsyncFd`, which
    // owns it (nothing else can close or replace it) until it is dropped.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    }?;
    let _ready = fd.readable().await?;
    Ok(())
}

/// Pids of live processes whose command line holds `uuid` (QEMU instances of one VM),
/// found by scanning `/proc`: used when a pid file is missing or stale, so a QEMU whose
/// pid file was never written is still found and never started twice.
pub fn find_by_uuid(uuid: &str) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| is_instance(*pid, uuid))
        .collect()
}

/// Live QEMU processes whose working directory is inside `dir`, with that directory.
/// Every QEMU the engine starts runs in its instance folder, so this finds them all,
/// whatever their pid files say.
pub fn qemus_in(dir: &Path) -> Vec<(u32, std::path::PathBuf)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cwd = fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
            let exe = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let argv0 = exe.split(|b| *b == 0).next().unwrap_or_default();
            let is_qemu = String::from_utf8_lossy(argv0).contains("qemu");
            (cwd.starts_with(dir) && is_qemu && is_alive(pid)).then_some((pid, cwd))
        })
        .collect()
}

/// Sends SIGTERM; a process already gone is not an error.
pub fn terminate(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else { return };
    let _ = kill(Pid::from_raw(raw), Signal::SIGTERM);
}

/// The one-letter state of `pid` from `/proc/PID/stat` (`R`, `S`, `Z`, ...), or `None`
/// when there is no such process.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// True when `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    proc_state(pid).is_some_and(|s| s != 'Z' && s != 'X')
}

/// True when `pid` is alive and its command line holds `uuid` (our QEMU for that VM).
pub fn is_instance(pid: u32, uuid: &str) -> bool {
    if !is_alive(pid) {
        return false;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    cmdline.split(|b| *b == 0).any(|arg| arg == uuid.as_bytes())
}

/// Waits until `pid` is gone (or a zombie), polling; false when `timeout` passed first.
pub async fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends SIGKILL; a process already gone is not an error.
pub fn kill_hard(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else { return };
    let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawned_process_is_alive_in_its_own_session_then_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("out.log");
        let args = vec!["-c".to_owned(), "echo hi; exec sleep 30".to_owned()];
        let pid = spawn_detached("sh", &args, dir.path(), &log).expect("spawn");
        assert!(is_alive(pid));
        let raw = i32::try_from(pid).expect("pids fit in i32");
        let sid = nix::unistd::getsid(Some(Pid::from_raw(raw))).expect("sid");
        assert_eq!(sid.as_raw(), raw, "child leads its own session");
        assert!(!is_instance(pid, "no-such-uuid"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fs::read_to_string(&log).expect("log").contains("hi") {
            assert!(
                Instant::now() < deadline,
                "child output never reached the log"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        kill_hard(pid);
        assert!(wait_gone(pid, Duration::from_secs(5)).await);
    }
}
