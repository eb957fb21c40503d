//! The files a spec names but git does not carry: kernels, initrds, base images given by
//! path (not those given by URL, which hosts download themselves), and the
//! `known_hosts` and `identity_file` of ssh hosts.
//!
//! In: the validated specs, their source texts (to locate errors) and the spec folder
//! in the working tree. Out: absolute paths per VM, host ssh files rewritten in place
//! as absolute paths, or a `path:line:col` diagnostic for each file that is missing,
//! not a regular file, or outside the spec folder (and each ssh file that ssh would
//! misread or refuse).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use plasmavmc_specs::{Desired, Diagnostic, Seg, SourceFile};

use crate::qemu::instance::ResolvedFiles;

/// Resolves every file named by every VM and every host of `desired`. The VMs' files are
/// returned per VM; each host's `known_hosts` and `identity_file` is replaced by the
/// absolute path it resolves to, ready for the ssh argv.
pub fn resolve(
    desired: &mut Desired,
    sources: &[SourceFile],
    spec_root: Option<&Path>,
) -> Result<BTreeMap<String, ResolvedFiles>, Vec<Diagnostic>> {
    let root = spec_root.and_then(|r| r.canonicalize().ok());
    let mut diags = resolve_host_files(desired, sources, root.as_deref());
    let out = resolve_vm_files(desired, sources, root.as_deref(), &mut diags);
    if diags.is_empty() {
        Ok(out)
    } else {
        Err(diags)
    }
}

/// The committed text of the file at `path` ("" if unknown), to locate diagnostics in.
pub(super) fn text_of<'s>(sources: &'s [SourceFile], path: &str) -> &'s str {
    sources
        .iter()
        .find(|f| f.path == path)
        .and_then(|f| std::str::from_utf8(&f.bytes).ok())
        .unwrap_or("")
}

/// Each host's ssh files, replaced by their absolute paths; the problems found.
fn resolve_host_files(
    desired: &mut Desired,
    sources: &[SourceFile],
    root: Option<&Path>,
) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    for host in desired.hosts.values_mut() {
        let Some(file) = &host.file else { continue };
        let text = text_of(sources, file);
        let spec = &mut host.spec;
        for (key, slot) in [
            ("known_hosts", &mut spec.known_hosts),
            ("identity_file", &mut spec.identity_file),
        ] {
            let Some(value) = slot.as_deref() else {
                continue;
            };
            let found = find(value, root)
                .and_then(|real| ssh_file_problem(key, value, &real).map_or(Ok(real), Err));
            match found {
                Ok(real) => *slot = Some(real.to_string_lossy().into_owned()),
                Err(msg) => diags.push(Diagnostic::at_key(file, text, &[Seg::Key(key)], msg)),
            }
        }
    }
    diags
}

/// Why ssh would misread or refuse the file `value` resolved to (`real`): it splits
/// option values at blanks and quotes, ends them at `#`, expands `%x` tokens and
/// `${VAR}` in both paths, and refuses a private key that others can read.
fn ssh_file_problem(key: &str, value: &str, real: &Path) -> Option<String> {
    let text = real.to_string_lossy();
    if let Some(c) = text
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || "\"'\\%$#".contains(*c))
    {
        return Some(format!(
            "{key} {value:?} resolves to {text:?}, which holds {c:?}: ssh would read that \
             character as syntax; use a path without blanks, quotes, '\\', '%', '$' or '#'"
        ));
    }
    if key == "identity_file" {
        let meta = std::fs::metadata(real).ok()?;
        if meta.uid() == nix::unistd::getuid().as_raw() && meta.mode() & 0o077 != 0 {
            return Some(format!(
                "identity_file {value:?} can be read by others (mode {:o}) and ssh refuses such \
                 a key: chmod 600 {text}",
                meta.mode() & 0o777
            ));
        }
    }
    None
}

/// The kernel, initrd and base images of each VM; problems are added to `diags`.
fn resolve_vm_files(
    desired: &Desired,
    sources: &[SourceFile],
    root: Option<&Path>,
    diags: &mut Vec<Diagnostic>,
) -> BTreeMap<String, ResolvedFiles> {
    let mut out = BTreeMap::new();
    for (name, vm) in &desired.vms {
        let text = text_of(sources, &vm.file);
        let mut digests = BTreeMap::new();
        let mut check = |what: String, value: &str, key: &[Seg<'_>]| {
            let found = find(value, root).and_then(|path| {
                let sha = crate::digest::sha256_file_cached(&path)
                    .map_err(|e| format!("cannot read {value:?}: {}", plain(&e)))?;
                digests.insert(what, sha);
                Ok(path)
            });
            match found {
                Ok(path) => Some(path),
                Err(msg) => {
                    diags.push(Diagnostic::at_key(&vm.file, text, key, msg));
                    None
                }
            }
        };
        let mut files = ResolvedFiles::default();
        if let Some(boot) = &vm.spec.boot {
            let key = [Seg::Key("boot"), Seg::Key("kernel")];
            files.kernel = check("kernel".to_owned(), &boot.kernel, &key);
            if let Some(initrd) = &boot.initrd {
                let key = [Seg::Key("boot"), Seg::Key("initrd")];
                files.initrd = check("initrd".to_owned(), initrd, &key);
            }
        }
        for (i, disk) in vm.spec.disks.iter().enumerate() {
            // A URL image has no file here: each host downloads it (agent/fetch.rs).
            if let Some(plasmavmc_specs::Image::Path(image)) = &disk.image {
                let key = [Seg::Key("disks"), Seg::Index(i), Seg::Key("image")];
                if let Some(path) = check(format!("image {}", disk.name), image, &key) {
                    files.images.insert(disk.name.clone(), path);
                }
            }
        }
        files.digests = digests;
        out.insert(name.clone(), files);
    }
    out
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

    fn host_file(name: &str, text: &str) -> SourceFile {
        SourceFile {
            path: format!("repo/hosts/{name}.toml"),
            rel: format!("hosts/{name}.toml"),
            bytes: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn ssh_files_of_hosts_become_absolute_or_are_located_errors() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("specs");
        std::fs::create_dir_all(root.join("keys")).expect("mkdir");
        std::fs::write(root.join("keys/known_hosts"), b"hv1 ssh-ed25519 AAAA\n").expect("write");
        let key = dir.path().join("id");
        std::fs::write(&key, b"key").expect("write");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let key = key.to_string_lossy().into_owned();
        let good = host_file(
            "hv1",
            &format!("address = \"ssh://hv1\"\nknown_hosts = \"keys/known_hosts\"\nidentity_file = {key:?}\n"),
        );
        let sources = [good];
        let mut desired = plasmavmc_specs::load(&sources).expect("valid");
        resolve(&mut desired, &sources, Some(&root)).expect("resolves");
        let spec = &desired.hosts["hv1"].spec;
        let canonical = root.canonicalize().expect("canon").join("keys/known_hosts");
        assert_eq!(
            spec.known_hosts.as_deref(),
            Some(&*canonical.to_string_lossy())
        );
        assert_eq!(spec.identity_file.as_deref(), Some(key.as_str()));

        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::write(root.join("keys/with space"), b"k").expect("write");
        let sources = [
            host_file(
                "a",
                "address = \"ssh://a\"\nknown_hosts = \"keys/missing\"\n",
            ),
            host_file(
                "b",
                &format!("address = \"ssh://b\"\n\nidentity_file = {key:?}\n"),
            ),
            host_file(
                "c",
                "address = \"ssh://c\"\nknown_hosts = \"keys/with space\"\n",
            ),
            host_file("d", "address = \"ssh://d\"\nknown_hosts = \"keys\"\n"),
        ];
        let mut desired = plasmavmc_specs::load(&sources).expect("valid specs");
        let errs: Vec<String> = resolve(&mut desired, &sources, Some(&root))
            .expect_err("refused")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(errs.len(), 4, "{errs:#?}");
        assert!(
            errs[0].starts_with("repo/hosts/a.toml:2:1: file \"keys/missing\" not found"),
            "{errs:#?}"
        );
        assert!(
            errs[1].starts_with("repo/hosts/b.toml:3:1: identity_file"),
            "{errs:#?}"
        );
        assert!(
            errs[1].contains("mode 644") && errs[1].contains("chmod 600"),
            "{errs:#?}"
        );
        assert!(
            errs[2].starts_with("repo/hosts/c.toml:2:1: known_hosts \"keys/with space\""),
            "{errs:#?}"
        );
        assert!(errs[2].contains("' '"), "{errs:#?}");
        assert!(
            errs[3].starts_with("repo/hosts/d.toml:2:1: \"keys\" is not a regular file"),
            "{errs:#?}"
        );
    }
}
