//! One engine at a time per state directory.
//!
//! An exclusive `flock` on `<state>/lock`, held for the life of the command; the file
//! says who holds it so a second engine can name the holder in its refusal. The kernel
//! drops the lock when the holder dies, even by `kill -9`: no stale locks.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Errors taking the state lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("state directory {} is in use by {holder}; wait for it to finish (or stop it) and retry", dir.display())]
    Held { dir: PathBuf, holder: String },
    #[error("cannot open lock file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The held lock; released on drop.
#[derive(Debug)]
pub struct StateLock {
    _lock: Flock<File>,
}

impl StateLock {
    /// Takes the lock without waiting, recording `what` (e.g. "plasmavmc apply") as the holder.
    pub fn acquire(path: &Path, what: &str) -> Result<Self, LockError> {
        let open_err = |source| LockError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(open_err)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, _errno)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() {
                    "another process".to_owned()
                } else {
                    holder.to_owned()
                };
                return Err(LockError::Held {
                    dir: path.parent().unwrap_or(path).to_path_buf(),
                    holder,
                });
            }
        };
        let since = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        let text = format!("{what} (pid {}, since {since})\n", std::process::id());
        let file: &mut File = &mut lock;
        file.set_len(0).map_err(open_err)?;
        file.rewind().map_err(open_err)?;
        file.write_all(text.as_bytes()).map_err(open_err)?;
        Ok(Self { _lock: lock })
    }
}

/// Who holds the lock at `path`, found without taking it (a probe that took the lock,
/// however briefly, could make a daemon starting at that moment fail): the pid
/// `/proc/locks` gives for the file's inode, and what the file says of its holder.
pub fn lock_holder(path: &Path) -> Option<(i32, String)> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).ok()?.ino();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    // `1: FLOCK  ADVISORY  WRITE 2193 fe:00:6292246 0 EOF` (waiters have `->` after `1:`).
    let pid = locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let inode = f.get(5)?.rsplit(':').next()?.parse::<u64>().ok()?;
        (f.get(1) == Some(&"FLOCK") && inode == ino)
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })?;
    let text = std::fs::read_to_string(path).unwrap_or_default();
    Some((pid, text.trim().to_owned()))
}

/// The pid of the `plasmavmc watch` holding the lock at `path`, if one does.
pub fn running_watch(path: &Path) -> Option<i32> {
    let (pid, text) = lock_holder(path)?;
    (watch_pid(&text) == Some(pid)).then_some(pid)
}

/// The pid of a `plasmavmc watch` named as a lock's holder (`plasmavmc watch (pid N,
/// since ...)`), to signal it. Only meaningful while that holder still holds the lock.
pub fn watch_pid(holder: &str) -> Option<i32> {
    let rest = holder.strip_prefix("plasmavmc watch (pid ")?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lock");
        let first = StateLock::acquire(&path, "plasmavmc apply").expect("first");
        let err = StateLock::acquire(&path, "plasmavmc plan").expect_err("second must fail");
        let msg = err.to_string();
        assert!(msg.contains("in use by plasmavmc apply (pid "), "{msg}");
        drop(first);
        StateLock::acquire(&path, "plasmavmc plan").expect("free again");
    }

    #[test]
    fn the_holder_is_found_without_taking_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lock");
        let me = i32::try_from(std::process::id()).expect("pid");
        let lock = StateLock::acquire(&path, "plasmavmc watch").expect("lock");
        let (pid, text) = lock_holder(&path).expect("a holder");
        assert_eq!(pid, me);
        assert!(text.starts_with("plasmavmc watch (pid "), "{text}");
        assert_eq!(running_watch(&path), Some(me));
        drop(lock);
        assert_eq!(lock_holder(&path), None, "nobody holds it now");
        assert_eq!(running_watch(&path), None);
        let other = StateLock::acquire(&path, "plasmavmc apply").expect("lock");
        assert_eq!(running_watch(&path), None, "an apply is not a daemon");
        drop(other);
    }

    #[test]
    fn only_a_watch_daemon_holder_gives_a_pid_to_signal() {
        assert_eq!(
            watch_pid("plasmavmc watch (pid 4242, since 2026-11-27T01:00:00Z)"),
            Some(4242)
        );
        assert_eq!(watch_pid("plasmavmc apply (pid 4242, since x)"), None);
        assert_eq!(watch_pid("garbage"), None);
    }
}
