//! The engine's own records, private to it: its state directory (where the status
//! files, saved-plan checks, the lock and the embedded local host's root live), the
//! lock, fence records and where each VM may be. What the engine publishes for people
//! and tools is `status/`; nothing here is meant to be read by anyone else.
//!
//! In: a path chosen by the CLI. Out: the folder, created 0700 and git-ignored, and
//! the paths inside it. Touches only that folder.

pub mod fence;
mod lock;
pub mod whereabouts;

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub use lock::{lock_holder, running_watch, LockError, StateLock};

/// Errors preparing the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is damaged: {message}")]
    Parse { path: PathBuf, message: String },
}

/// The state directory and the well-known paths inside it.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (creating when missing) the state directory at `root`: mode 0700, with a
    /// `.gitignore` that keeps it out of the repository it usually sits in.
    pub fn open(root: &Path) -> Result<Self, StateError> {
        create_private_dir(root)?;
        let ignore = root.join(".gitignore");
        if !ignore.exists() {
            write_atomic(&ignore, b"# PlasmaVMC state: never commit it.\n*\n")?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// A state directory that may not exist (for read-only commands).
    pub fn at(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Root of the embedded `local` host (and of `address = "local"` hosts without `root`).
    pub fn host_root(&self, host: &str) -> PathBuf {
        self.root.join(host)
    }

    pub fn status_dir(&self) -> PathBuf {
        self.root.join("status")
    }

    pub fn lock_path(&self) -> PathBuf {
        self.root.join("lock")
    }
}

/// Creates `path` and its parents; the last component gets mode 0700.
pub fn create_private_dir(path: &Path) -> Result<(), StateError> {
    let err = |source| StateError::Create {
        path: path.to_path_buf(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(err)
}

/// The text of `path`; `Ok(None)` when there is no such file.
pub fn read_if_there(path: &Path) -> Result<Option<String>, StateError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync,
/// rename, fsync of the folder. Readers see the old or the new content, never half.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    use io::Write;
    let err = |source| StateError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)?;
    if let Ok(d) = fs::File::open(dir) {
        // Durability of the rename; a failure here loses nothing already visible.
        let _ = d.sync_all();
    }
    Ok(())
}
