//! The cloud-init NoCloud seed volume: a small vfat filesystem labelled `cidata` holding
//! `meta-data`, `user-data` and `network-config`, as cloud-init's NoCloud datasource
//! reads it. Built in memory (the `fatfs` crate, no tool on the host), the same bytes
//! for the same files (every timestamp is the FAT epoch, 1980-01-01), and attached to QEMU
//! read-only as a raw virtio disk after the VM's own disks.

use std::io::{self, Cursor, Write as _};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The seed's file in the instance folder.
pub const SEED_FILE: &str = "cidata.img";
/// The volume label NoCloud looks for.
const LABEL: &[u8; 11] = b"cidata     ";
/// Room for the FAT structures beside the files.
const SLACK: usize = 64 * 1024;
/// Volumes are a multiple of this (and at least this): small, since the engine keeps
/// every VM's seed in memory.
const STEP: usize = 128 * 1024;

/// A VM's seed as the engine carries it: its identity, and on the controller its bytes;
/// on a host, where its copy is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedFile {
    /// cloud-init's instance-id (a digest of what the seed holds).
    pub instance_id: String,
    /// SHA-256 of the volume image.
    pub sha256: String,
    /// The image, on the controller only (never written into records).
    #[serde(skip)]
    pub bytes: Option<Arc<Vec<u8>>>,
    /// The host's copy in its file store, once sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<std::path::PathBuf>,
}

/// Every file's time: the FAT epoch, 1980-01-01 00:00, so the same files give the same
/// bytes.
#[derive(Debug)]
struct Epoch;

static EPOCH: Epoch = Epoch;

impl fatfs::TimeProvider for Epoch {
    fn get_current_date(&self) -> fatfs::Date {
        fatfs::Date {
            year: 1980,
            month: 1,
            day: 1,
        }
    }

    fn get_current_date_time(&self) -> fatfs::DateTime {
        fatfs::DateTime {
            date: self.get_current_date(),
            time: fatfs::Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

/// Builds the volume holding `files` (name, content), names in the 8.3-free long form
/// NoCloud expects (`user-data`, …).
pub fn build(files: &[(&str, &[u8])]) -> io::Result<Vec<u8>> {
    let content: usize = files
        .iter()
        .map(|(_, b)| b.len().div_ceil(4096) * 4096)
        .sum();
    let size = (content + SLACK).div_ceil(STEP) * STEP;
    let mut disk = Cursor::new(vec![0u8; size]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_label(*LABEL)
            .volume_id(0x7076_6d63), // "pvmc": fixed, so equal files give equal bytes
    )?;
    disk.set_position(0);
    {
        let options = fatfs::FsOptions::new().time_provider(&EPOCH);
        let fs = fatfs::FileSystem::new(&mut disk, options)?;
        for (name, bytes) in files {
            let mut file = fs.root_dir().create_file(name)?;
            file.write_all(bytes)?;
            file.flush()?;
        }
        fs.unmount()?;
    }
    Ok(disk.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn the_volume_holds_the_files_under_the_cidata_label() {
        let big = vec![b'x'; 3 * 1024 * 1024];
        let files: [(&str, &[u8]); 3] = [
            ("meta-data", b"instance-id: pv-1\n"),
            ("user-data", b"#cloud-config\n"),
            ("network-config", &big),
        ];
        let image = build(&files).expect("build");
        assert_eq!(image, build(&files).expect("again"), "not reproducible");
        let fs = fatfs::FileSystem::new(Cursor::new(image), fatfs::FsOptions::new())
            .expect("a FAT volume");
        assert_eq!(fs.volume_label(), "cidata");
        for (name, want) in files {
            let mut got = Vec::new();
            fs.root_dir()
                .open_file(name)
                .expect(name)
                .read_to_end(&mut got)
                .expect("read");
            assert!(got == want, "{name} differs");
        }
    }
}
