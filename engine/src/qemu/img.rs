//! Disk images through `qemu-img`: create empty, create an overlay of a base image (its
//! format, qcow2 or raw, told from its content),
//! read the virtual size, grow, and ask whether another QEMU holds one (its image
//! lock). Never shrinks, never deletes.

use std::path::{Path, PathBuf};

use tokio::process::Command;

/// Errors running `qemu-img`.
#[derive(Debug, thiserror::Error)]
pub enum ImgError {
    #[error("cannot run qemu-img (is qemu-utils installed?)")]
    Spawn(#[source] std::io::Error),
    #[error("qemu-img {op} {path} failed: {stderr}")]
    Failed {
        op: &'static str,
        path: PathBuf,
        stderr: String,
    },
    #[error("qemu-img info {path} gave unexpected output")]
    Info {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

async fn run(
    op: &'static str,
    path: &Path,
    args: &[&std::ffi::OsStr],
) -> Result<Vec<u8>, ImgError> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .await
        .map_err(ImgError::Spawn)?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        Err(ImgError::Failed {
            op,
            path: path.to_path_buf(),
            stderr,
        })
    }
}

/// Creates an empty qcow2 of `size_gb` GiB.
pub async fn create(path: &Path, size_gb: u64) -> Result<(), ImgError> {
    let size = format!("{size_gb}G");
    run(
        "create",
        path,
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            path.as_os_str(),
            size.as_ref(),
        ],
    )
    .await?;
    Ok(())
}

/// The formats a base image may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

/// qcow2's magic, the file's first four bytes: `QFI\xfb`.
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// The format of base image `path`, from its first bytes (never its name): qcow2 when
/// it starts with qcow2's magic, raw otherwise.
pub fn detect_format(path: &Path) -> std::io::Result<Format> {
    use std::io::Read as _;
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path)?;
    let mut filled = 0;
    while filled < magic.len() {
        match file.read(&mut magic[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(if filled == magic.len() && magic == QCOW2_MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

fn base_format(base: &Path) -> Result<Format, ImgError> {
    detect_format(base).map_err(|e| ImgError::Failed {
        op: "read",
        path: base.to_path_buf(),
        stderr: e.to_string(),
    })
}

/// Creates a qcow2 overlay backed by `base` (its format told by [`detect_format`]); only
/// the overlay is ever written.
pub async fn create_overlay(path: &Path, base: &Path) -> Result<(), ImgError> {
    let format = base_format(base)?.as_str();
    let args: [&std::ffi::OsStr; 9] = [
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        format.as_ref(),
        "-b".as_ref(),
        base.as_os_str(),
        path.as_os_str(),
    ];
    run("create", path, &args).await?;
    Ok(())
}

/// What `qemu-img info` says of an image.
#[derive(Debug, serde::Deserialize)]
pub struct ImageInfo {
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// The image's backing file, if it names one.
    #[serde(default, rename = "backing-filename")]
    pub backing_filename: Option<String>,
    /// qcow2 details; `data.data-file` names an external data file.
    #[serde(default, rename = "format-specific")]
    pub format_specific: Option<serde_json::Value>,
}

impl ImageInfo {
    /// The other files this image makes QEMU open: its backing file, its data file.
    pub fn other_files(&self) -> Vec<String> {
        let data_file = self
            .format_specific
            .as_ref()
            .and_then(|f| f.pointer("/data/data-file"))
            .and_then(serde_json::Value::as_str);
        self.backing_filename
            .iter()
            .map(String::as_str)
            .chain(data_file)
            .map(str::to_owned)
            .collect()
    }
}

/// Reads format and virtual size. `-U` (no lock) lets it read an image a running QEMU holds.
pub async fn info(path: &Path) -> Result<ImageInfo, ImgError> {
    let out = run(
        "info",
        path,
        &[
            "info".as_ref(),
            "-U".as_ref(),
            "--output=json".as_ref(),
            path.as_os_str(),
        ],
    )
    .await?;
    serde_json::from_slice(&out).map_err(|source| ImgError::Info {
        path: path.to_path_buf(),
        source,
    })
}

/// QEMU's own words when another process holds an image's lock, whether QEMU or
/// `qemu-img` says them: `Failed to get "write" lock`, `Failed to get shared "write" lock`.
pub fn is_lock_refusal(text: &str) -> bool {
    text.lines()
        .any(|l| l.contains("Failed to get ") && l.contains(" lock"))
}

/// Whether another process (another QEMU, on this host or any host sharing the storage)
/// holds the image lock of `path`: `Some` with QEMU's words if so. Asks `qemu-img info`
/// without `-U`, which takes the shared locks a reader needs and fails while a writer
/// holds the image; it holds them only while it runs.
pub async fn lock_holder(path: &Path) -> Result<Option<String>, ImgError> {
    match run(
        "info",
        path,
        &["info".as_ref(), "--output=json".as_ref(), path.as_os_str()],
    )
    .await
    {
        Ok(_) => Ok(None),
        Err(ImgError::Failed { stderr, .. }) if is_lock_refusal(&stderr) => {
            let words = stderr
                .lines()
                .find(|l| is_lock_refusal(l))
                .unwrap_or(&stderr);
            // `qemu-img: Could not open 'x': Failed to get ...`: QEMU's words from the
            // lock on (the path is said by the caller).
            let words = words
                .find("Failed to get ")
                .map_or(words, |at| &words[at..]);
            Ok(Some(words.trim().to_owned()))
        }
        Err(e) => Err(e),
    }
}

/// Grows the image to `size_gb` GiB (only called with a larger size).
pub async fn grow(path: &Path, size_gb: u64) -> Result<(), ImgError> {
    let size = format!("{size_gb}G");
    run(
        "resize",
        path,
        &[
            "resize".as_ref(),
            "-q".as_ref(),
            path.as_os_str(),
            size.as_ref(),
        ],
    )
    .await?;
    Ok(())
}

/// Points qcow2 `path` at `base` without touching its data (`rebase -u`): a disk copied
/// from another host names that host's copy of the base image.
pub async fn rebase_unsafe(path: &Path, base: &Path) -> Result<(), ImgError> {
    let format = base_format(base)?.as_str();
    let args: [&std::ffi::OsStr; 8] = [
        "rebase".as_ref(),
        "-q".as_ref(),
        "-u".as_ref(),
        "-F".as_ref(),
        format.as_ref(),
        "-b".as_ref(),
        base.as_os_str(),
        path.as_os_str(),
    ];
    run("rebase", path, &args).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{detect_format, is_lock_refusal, Format};

    #[test]
    fn the_format_comes_from_the_magic_not_the_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let qcow2 = dir.path().join("disk.raw");
        std::fs::write(&qcow2, b"QFI\xfb\0\0\0\x03rest").expect("write");
        let raw = dir.path().join("disk.qcow2");
        std::fs::write(&raw, b"\0\0\0\0").expect("write");
        let short = dir.path().join("short");
        std::fs::write(&short, b"QF").expect("write");
        assert_eq!(detect_format(&qcow2).expect("read"), Format::Qcow2);
        assert_eq!(detect_format(&raw).expect("read"), Format::Raw);
        assert_eq!(detect_format(&short).expect("read"), Format::Raw);
    }

    #[test]
    fn lock_refusals_in_qemu_and_qemu_img_words() {
        assert!(is_lock_refusal(
            "qemu-system-x86_64: -blockdev driver=qcow2,file=f,node-name=d: Failed to get \"write\" lock\nIs another process using the image [d.qcow2]?"
        ));
        assert!(is_lock_refusal(
            "qemu-img: Could not open 'd.qcow2': Failed to get shared \"write\" lock"
        ));
        assert!(!is_lock_refusal(
            "qemu-system-x86_64: -machine no-such-machine: unsupported machine type"
        ));
    }
}
