//! Disk images through `qemu-img`: create empty, create an overlay of a base image,
//! read the virtual size, grow. Never shrinks, never deletes.

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

/// Creates a qcow2 overlay backed by `base` (its format detected).
pub async fn create_overlay(path: &Path, base: &Path) -> Result<(), ImgError> {
    let format = info(base).await?.format;
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
    let format = info(base).await?.format;
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
