//! Content digests: SHA-256 of files, bytes as hex. Ground floor: imports nothing of the
//! crate.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use sha2::{Digest, Sha256};

/// SHA-256 of a file, in hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

/// [`sha256_file`], remembered per file while its length, modification time and inode
/// stay the same (a long-lived engine hashes each kernel and image once).
pub fn sha256_file_cached(path: &Path) -> io::Result<String> {
    type Seen = (u64, Option<SystemTime>, u64, String);
    static SEEN: Mutex<BTreeMap<PathBuf, Seen>> = Mutex::new(BTreeMap::new());
    let meta = fs::metadata(path)?;
    let key = (meta.len(), meta.modified().ok(), meta.ino());
    if let Some((len, modified, ino, sha)) = SEEN.lock().expect("digest cache").get(path) {
        if (*len, *modified, *ino) == key {
            return Ok(sha.clone());
        }
    }
    let sha = sha256_file(path)?;
    SEEN.lock()
        .expect("digest cache")
        .insert(path.to_path_buf(), (key.0, key.1, key.2, sha.clone()));
    Ok(sha)
}

/// Bytes in lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            use std::fmt::Write as _;
            let _ = write!(s, "{b:02x}");
            s
        })
}
