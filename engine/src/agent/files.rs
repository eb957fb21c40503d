//! The agent's file store: kernels, initrds and base images the engine sends, and images
//! the agent downloads (`fetch`), kept under `<root>/files/<sha256>`, written once and
//! checked before use.

use std::fs;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::digest::sha256_file;

/// Errors storing a file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{sha256:?} is not a SHA-256 in hex")]
    BadName { sha256: String },
    #[error("file {sha256} arrived with SHA-256 {actual}; discarded")]
    Mismatch { sha256: String, actual: String },
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `<root>/files`.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    pub fn new(root: &Path) -> Self {
        Self {
            dir: root.join("files"),
        }
    }

    fn checked(&self, sha256: &str) -> Result<PathBuf, FileError> {
        if sha256.len() != 64
            || !sha256
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(FileError::BadName {
                sha256: sha256.to_owned(),
            });
        }
        Ok(self.dir.join(sha256))
    }

    /// Where the file is, if it is complete.
    pub fn get(&self, sha256: &str) -> Result<Option<PathBuf>, FileError> {
        let path = self.checked(sha256)?;
        Ok(path.is_file().then_some(path))
    }

    /// Where a download of `sha256` collects its bytes until they are verified (the
    /// store's folder is created if need be). Not the name [`Self::put`] uses: a file
    /// sent by the engine and one downloaded never share a part file.
    pub fn part(&self, sha256: &str) -> Result<PathBuf, FileError> {
        self.checked(sha256)?;
        crate::records::create_private_dir(&self.dir).map_err(|e| FileError::Io {
            path: self.dir.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        Ok(self.dir.join(format!(".{sha256}.download.part")))
    }

    /// Gives the verified file `part` its final name (read-only: a base image is never
    /// written, only overlaid).
    pub fn publish(&self, sha256: &str, part: &Path) -> Result<PathBuf, FileError> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.checked(sha256)?;
        let io_err = |source| FileError::Io {
            path: part.to_path_buf(),
            source,
        };
        fs::set_permissions(part, fs::Permissions::from_mode(0o444)).map_err(io_err)?;
        fs::rename(part, &path).map_err(io_err)?;
        Ok(path)
    }

    /// Writes a chunk at `offset`; with `last`, verifies the whole file and publishes it.
    pub fn put(
        &self,
        sha256: &str,
        offset: u64,
        data: &[u8],
        last: bool,
    ) -> Result<Option<PathBuf>, FileError> {
        let path = self.checked(sha256)?;
        let part = self.dir.join(format!(".{sha256}.part"));
        let io_err = |source| FileError::Io {
            path: part.clone(),
            source,
        };
        crate::records::create_private_dir(&self.dir).map_err(|e| FileError::Io {
            path: self.dir.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        let mut file = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(offset == 0)
            .open(&part)
            .map_err(io_err)?;
        file.seek(SeekFrom::Start(offset)).map_err(io_err)?;
        file.write_all(data).map_err(io_err)?;
        if !last {
            return Ok(None);
        }
        file.sync_all().map_err(io_err)?;
        drop(file);
        let actual = sha256_file(&part).map_err(io_err)?;
        if actual != sha256 {
            let _ = fs::remove_file(&part);
            return Err(FileError::Mismatch {
                sha256: sha256.to_owned(),
                actual,
            });
        }
        fs::rename(&part, &path).map_err(io_err)?;
        Ok(Some(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_become_a_checked_file() -> Result<(), FileError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::new(dir.path());
        let src = dir.path().join("src");
        fs::write(&src, b"hello world").expect("write");
        let sha = sha256_file(&src).expect("hash");
        assert_eq!(store.get(&sha)?, None);
        assert_eq!(store.put(&sha, 0, b"hello ", false)?, None);
        let path = store.put(&sha, 6, b"world", true)?.expect("complete");
        assert_eq!(fs::read(&path).expect("read"), b"hello world");
        assert_eq!(store.get(&sha)?, Some(path));
        assert!(matches!(
            store.put(&sha, 0, b"evil", true),
            Err(FileError::Mismatch { .. })
        ));
        assert!(matches!(
            store.get("../../etc/passwd"),
            Err(FileError::BadName { .. })
        ));
        Ok(())
    }
}
