//! Disk space faults: a small tmpfs mounted inside the test's temp folder (as a host's
//! root), and ballast that fills it up.
//!
//! Mounting needs root (`CAP_SYS_ADMIN`), which the tests run as here and in CI; without
//! it [`TestRepo::mount_tmpfs`] fails saying so (the test fails, it does not skip).
//! Every mount is remembered by the repository and unmounted by its cleanup, after
//! every process that could hold it open is dead, even when the test failed.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::repo::TestRepo;

/// The ballast file [`TestRepo::fill`] writes, in the folder it fills.
pub const BALLAST: &str = "ballast";

impl TestRepo {
    /// Mounts a tmpfs of `size` (as `mount -o size=`, e.g. `"8m"`) at `dir`, creating
    /// it; `dir` must be inside the test's temp folder. Unmounted by the cleanup.
    pub fn mount_tmpfs(&self, dir: &Path, size: &str) -> Result<()> {
        ensure!(
            dir.starts_with(self.root()),
            "{} is outside the test's temp folder",
            dir.display()
        );
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!(
                "cannot mount a {size} tmpfs at {} (the test needs root, CAP_SYS_ADMIN): {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.remember_mount(dir);
        Ok(())
    }

    /// Fills the filesystem holding `dir` with a [`BALLAST`] file in `dir` until only
    /// about `leave` bytes are free; returns the ballast's path (remove it to free the
    /// space again).
    pub fn fill(&self, dir: &Path, leave: u64) -> Result<PathBuf> {
        let free = free_bytes(dir)?;
        ensure!(
            free > leave,
            "{} has only {free} bytes free, less than the {leave} to leave",
            dir.display()
        );
        let path = dir.join(BALLAST);
        let mut file =
            File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        // Real bytes: a sparse file (set_len) would take no room on a tmpfs.
        let chunk = vec![0xa5_u8; 64 << 10];
        let mut left = free - leave;
        while left > 0 {
            let n = usize::try_from(left.min(chunk.len() as u64)).expect("a chunk fits");
            file.write_all(&chunk[..n])
                .with_context(|| format!("writing {}", path.display()))?;
            left -= n as u64;
        }
        file.sync_all()?;
        Ok(path)
    }
}

/// Bytes an unprivileged writer may still use on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> Result<u64> {
    let st =
        nix::sys::statvfs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(st.blocks_available() * st.fragment_size())
}

/// Unmounts `dir` (lazily if something still holds it: the cleanup must not fail on
/// a busy mount and leave it behind).
pub(crate) fn unmount(dir: &Path) -> Result<()> {
    let plain = Command::new("umount")
        .arg(dir)
        .output()
        .context("running umount")?;
    if plain.status.success() {
        return Ok(());
    }
    let lazy = Command::new("umount")
        .arg("-l")
        .arg(dir)
        .output()
        .context("running umount -l")?;
    ensure!(
        lazy.status.success(),
        "cannot unmount {}: {} / {}",
        dir.display(),
        String::from_utf8_lossy(&plain.stderr).trim(),
        String::from_utf8_lossy(&lazy.stderr).trim()
    );
    Ok(())
}
