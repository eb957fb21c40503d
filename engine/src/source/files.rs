//! The files a spec names but git does not carry: kernels, initrds, base images.
//!
//! In: the validated specs, their source texts (to locate errors) and the spec folder
//! in the working tree. Out: absolute paths per VM, or a `path:line:col` diagnostic for
//! each file that is missing, not a regular file, or outside the spec folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plasmavmc_specs::{Desired, Diagnostic, Seg, SourceFile};

use crate::qemu::instance::ResolvedFiles;

/// Resolves every file named by every VM of `desired`.
pub fn resolve(
    desired: &Desired,
    sources: &[SourceFile],
    spec_root: Option<&Path>,
) -> Result<BTreeMap<String, ResolvedFiles>, Vec<Diagnostic>> {
    let root = spec_root.and_then(|r| r.canonicalize().ok());
    let mut out = BTreeMap::new();
    let mut diags = Vec::new();
    for (name, vm) in &desired.vms {
        let text = sources
            .iter()
            .find(|f| f.path == vm.file)
            .and_then(|f| std::str::from_utf8(&f.bytes).ok())
            .unwrap_or("");
        let mut check = |value: &str, key: &[Seg<'_>]| match find(value, root.as_deref()) {
            Ok(path) => Some(path),
            Err(msg) => {
                diags.push(Diagnostic::at_key(&vm.file, text, key, msg));
                None
            }
        };
        let mut files = ResolvedFiles::default();
        if let Some(boot) = &vm.spec.boot {
            files.kernel = check(&boot.kernel, &[Seg::Key("boot"), Seg::Key("kernel")]);
            if let Some(initrd) = &boot.initrd {
                files.initrd = check(initrd, &[Seg::Key("boot"), Seg::Key("initrd")]);
            }
        }
        for (i, disk) in vm.spec.disks.iter().enumerate() {
            if let Some(image) = &disk.image {
                if let Some(path) = check(
                    image,
                    &[Seg::Key("disks"), Seg::Index(i), Seg::Key("image")],
                ) {
                    files.images.insert(disk.name.clone(), path);
                }
            }
        }
        out.insert(name.clone(), files);
    }
    if diags.is_empty() {
        Ok(out)
    } else {
        Err(diags)
    }
}

/// An absolute path, or one relative to `root` that stays inside it (after resolving
/// symlinks), naming a readable regular file.
fn find(value: &str, root: Option<&Path>) -> Result<PathBuf, String> {
    let given = Path::new(value);
    let candidate = if given.is_absolute() {
        given.to_path_buf()
    } else {
        let Some(root) = root else {
            return Err(format!("{value:?} is relative but the repository has no working tree; use an absolute path"));
        };
        root.join(given)
    };
    let real = candidate.canonicalize().map_err(|e| format!("file {value:?} not found ({}): build or copy it there; files are read from disk, not from git", plain(&e)))?;
    if !given.is_absolute() {
        if let Some(root) = root {
            if !real.starts_with(root) {
                return Err(format!(
                    "{value:?} leads outside the spec folder {}; use an absolute path",
                    root.display()
                ));
            }
        }
    }
    let meta =
        std::fs::metadata(&real).map_err(|e| format!("cannot read {value:?}: {}", plain(&e)))?;
    if !meta.is_file() {
        return Err(format!("{value:?} is not a regular file"));
    }
    std::fs::File::open(&real).map_err(|e| format!("cannot read {value:?}: {}", plain(&e)))?;
    Ok(real)
}

fn plain(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_owned(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_stay_inside_the_spec_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("specs");
        std::fs::create_dir_all(root.join("guest")).expect("mkdir");
        std::fs::write(root.join("guest/k"), b"k").expect("write");
        std::fs::write(dir.path().join("outside"), b"o").expect("write");
        std::os::unix::fs::symlink(dir.path().join("outside"), root.join("guest/link"))
            .expect("symlink");
        let root = root.canonicalize().expect("canon");
        assert!(find("guest/k", Some(&root)).is_ok());
        assert!(find("../outside", Some(&root))
            .expect_err("escape")
            .contains("outside the spec folder"));
        assert!(find("guest/link", Some(&root))
            .expect_err("symlink escape")
            .contains("outside the spec folder"));
        assert!(find("guest/missing", Some(&root))
            .expect_err("missing")
            .contains("not found"));
        assert!(find("guest", Some(&root))
            .expect_err("dir")
            .contains("not a regular file"));
        assert!(
            find(&dir.path().join("outside").to_string_lossy(), Some(&root)).is_ok(),
            "absolute paths are allowed"
        );
    }
}
