//! Every disk file this host keeps, for `plasmavmc disks`: the instances' local disks,
//! the retained ones (`retained/<vm>-<time>/`, with their note), and the VM folders of
//! the shared storage it mounts (`<shared>/<vm>/<disk>.qcow2`). And the one way a disk
//! is ever deleted: explicitly, by path, only when it is retained or on shared storage,
//! and no QEMU holds it.

use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use tracing::warn;

use super::LocalHost;
use crate::host::HostError;
use crate::observe::{DiskFile, DiskKind, Retained};
use crate::qemu::{img, instance};

/// The disk files of the host rooted at `root`; `shared` is its shared storage folder,
/// if any. Reads folders only: safe beside a running engine (`agent --disks`).
pub fn list(root: &Path, shared: Option<&Path>) -> Vec<DiskFile> {
    let mut out = Vec::new();
    for (vm, dir) in subfolders(&instance::vms_dir(root)) {
        for path in files(&dir.join(instance::DISKS_DIR)) {
            out.push(file(path, DiskKind::Instance, &vm, None));
        }
    }
    for (_, dir) in subfolders(&instance::retained_dir(root)) {
        let note: Option<Retained> = fs::read_to_string(dir.join("retained.toml"))
            .ok()
            .and_then(|t| toml::from_str(&t).ok());
        let vm = note.as_ref().map_or("", |n| n.vm.as_str()).to_owned();
        let mut found = files(&dir);
        for (_, sub) in subfolders(&dir) {
            found.extend(files(&sub));
        }
        for path in found.into_iter().filter(|p| !p.ends_with("retained.toml")) {
            out.push(file(path, DiskKind::Retained, &vm, note.as_ref()));
        }
    }
    if let Some(shared) = shared {
        for (vm, dir) in subfolders(shared) {
            for path in files(&dir) {
                out.push(file(path, DiskKind::Shared, &vm, None));
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

impl LocalHost {
    /// Deletes the disk file `path`: refused unless it is a retained disk of this host or
    /// a file of its shared storage `shared`, and while a QEMU holds it.
    pub(super) async fn delete_disk_file(
        &self,
        path: &Path,
        shared: Option<&Path>,
    ) -> Result<u64, HostError> {
        let refuse = |reason: String| HostError::Refused {
            vm: path.display().to_string(),
            reason,
        };
        let known = list(&self.root, shared)
            .into_iter()
            .find(|d| d.path == path)
            .ok_or_else(|| refuse("no such disk on this host".to_owned()))?;
        if known.kind == DiskKind::Instance {
            return Err(refuse(format!(
                "it is a disk of instance {}: remove the VM's spec first (its disks are then \
                 retained), then delete the retained file",
                known.vm
            )));
        }
        match img::lock_holder(path).await {
            Ok(None) => {}
            Ok(Some(qemu)) => return Err(refuse(format!("a QEMU holds it: {qemu}"))),
            Err(e) => return Err(refuse(format!("cannot check that no QEMU holds it: {e}"))),
        }
        fs::remove_file(path).map_err(|source| HostError::Io {
            vm: known.vm.clone(),
            what: format!("cannot delete {}", path.display()),
            source,
        })?;
        warn!(path = %path.display(), bytes = known.bytes, vm = %known.vm, "deleted a disk on the operator's explicit request");
        // A retained folder left with its note only goes too.
        if known.kind == DiskKind::Retained {
            if let Some(dir) = path
                .ancestors()
                .find(|a| a.parent() == Some(&instance::retained_dir(&self.root)))
            {
                let rest: Vec<PathBuf> = walk(dir)
                    .into_iter()
                    .filter(|p| !p.ends_with("retained.toml"))
                    .collect();
                if rest.is_empty() {
                    let _ = fs::remove_dir_all(dir);
                }
            }
        }
        Ok(known.bytes)
    }
}

fn file(path: PathBuf, kind: DiskKind, vm: &str, note: Option<&Retained>) -> DiskFile {
    let meta = fs::metadata(&path).ok();
    DiskFile {
        bytes: meta.as_ref().map_or(0, |m| m.blocks() * 512),
        size: meta.as_ref().map_or(0, fs::Metadata::len),
        path,
        kind,
        vm: vm.to_owned(),
        since: note.map(|n| n.since.clone()),
        reason: note.map(|n| n.reason.clone()),
    }
}

/// `(name, path)` of the folders in `dir`.
fn subfolders(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.file_name().to_str()?.to_owned(), e.path())))
        .collect()
}

/// The regular files in `dir` (not below).
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect()
}

/// Every regular file below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = files(dir);
    for (_, sub) in subfolders(dir) {
        out.extend(walk(&sub));
    }
    out
}
