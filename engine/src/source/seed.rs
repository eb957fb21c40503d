//! The cloud-init seeds of a commit's VMs (`[cloud_init]`).
//!
//! In: the validated specs, the commit, the files already resolved per VM. Out: each
//! seed built ([`SeedFile`] with its bytes) in the VM's files, its instance-id in the
//! VM's entry and folded into the VM's hash (a changed seed restarts the VM), or a
//! `path:line:col` diagnostic: in the spec for a file that cannot be read, in the file
//! itself for content cloud-init would reject. Repository files are read from the
//! commit (only committed content counts); absolute paths from the controller's
//! filesystem, for secrets kept out of git.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;

use plasmavmc_specs::cloud_init::{self, Part};
use plasmavmc_specs::{Desired, Diagnostic, Seg, SourceFile};
use sha2::{Digest as _, Sha256};

use super::Source;
use crate::observe::ObservedVm;
use crate::qemu::instance::ResolvedFiles;
use crate::qemu::seed::{self, SeedFile};

/// The largest seed file read (cloud-init's own sources cap user data far lower).
const MAX_FILE: u64 = 16 * 1024 * 1024;

/// Builds the seed of every VM of `desired` that has `[cloud_init]`; the problems found.
pub(super) fn build_all(
    source: &Source,
    commit: &str,
    sources: &[SourceFile],
    desired: &mut Desired,
    files: &mut BTreeMap<String, ResolvedFiles>,
) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    for (name, entry) in &mut desired.vms {
        let Some(spec) = &entry.spec.cloud_init else {
            continue;
        };
        let text = super::files::text_of(sources, &entry.file);
        let mut parts: Vec<(Part, Vec<u8>)> = Vec::new();
        for part in Part::ALL {
            let Some(path) = spec.path(part) else {
                continue;
            };
            let at = [Seg::Key("cloud_init"), Seg::Key(part.key())];
            let (shown, bytes) = match read(source, commit, path) {
                Ok(found) => found,
                Err(msg) => {
                    diags.push(Diagnostic::at_key(&entry.file, text, &at, msg));
                    continue;
                }
            };
            if let Err(p) = cloud_init::check(part, &bytes) {
                diags.push(Diagnostic {
                    path: shown,
                    line: p.line,
                    col: p.col,
                    message: format!("{} of VM {name}: {}", part.seed_name(), p.message),
                });
                continue;
            }
            parts.push((part, bytes));
        }
        let wanted = Part::ALL
            .iter()
            .filter(|p| spec.path(**p).is_some())
            .count();
        if parts.len() != wanted {
            continue;
        }
        let seed = match build(name, &parts) {
            Ok(seed) => seed,
            Err(e) => {
                diags.push(Diagnostic::at_key(
                    &entry.file,
                    text,
                    &[Seg::Key("cloud_init")],
                    format!("cannot build the cloud-init seed: {e}"),
                ));
                continue;
            }
        };
        entry.hash = plasmavmc_specs::short_hash(
            format!("{}\0{}", entry.hash, seed.instance_id).as_bytes(),
            8,
        );
        entry.seed = Some(seed.instance_id.clone());
        files.entry(name.clone()).or_default().seed = Some(seed);
    }
    diags
}

/// The seed volume of VM `vm` from its files.
fn build(vm: &str, parts: &[(Part, Vec<u8>)]) -> std::io::Result<SeedFile> {
    let borrowed: Vec<(Part, &[u8])> = parts.iter().map(|(p, b)| (*p, b.as_slice())).collect();
    let instance_id = cloud_init::instance_id(vm, &borrowed);
    let get = |part| {
        parts
            .iter()
            .find(|(p, _)| *p == part)
            .map(|(_, b)| b.as_slice())
    };
    let extra = get(Part::MetaData).map(String::from_utf8_lossy);
    let meta = cloud_init::meta_data(vm, &instance_id, extra.as_deref());
    let mut volume: Vec<(&str, &[u8])> = vec![
        (Part::MetaData.seed_name(), meta.as_bytes()),
        (
            Part::UserData.seed_name(),
            get(Part::UserData).unwrap_or(b"#cloud-config\n"),
        ),
    ];
    if let Some(net) = get(Part::NetworkConfig) {
        volume.push((Part::NetworkConfig.seed_name(), net));
    }
    let bytes = seed::build(&volume)?;
    let sha256 = crate::digest::hex(&Sha256::digest(&bytes));
    Ok(SeedFile {
        instance_id,
        sha256,
        bytes: Some(Arc::new(bytes)),
        path: None,
    })
}

/// The file `path` names, as shown in messages, and its bytes; or why it cannot be read.
fn read(source: &Source, commit: &str, path: &str) -> Result<(String, Vec<u8>), String> {
    if Path::new(path).is_absolute() {
        let file = std::fs::File::open(path)
            .map_err(|e| format!("cannot read {path:?} on this machine: {e}"))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot read {path:?}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("{path:?} is not a regular file"));
        }
        if meta.len() > MAX_FILE {
            return Err(format!(
                "{path:?} is {} bytes; a seed file may hold at most {MAX_FILE}",
                meta.len()
            ));
        }
        let mut bytes = Vec::new();
        file.take(MAX_FILE)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read {path:?}: {e}"))?;
        return Ok((path.to_owned(), bytes));
    }
    let shown = source.display_path(path);
    let short = commit.get(..12).unwrap_or(commit);
    match source.blob(commit, path) {
        Ok(Some(bytes)) if bytes.len() as u64 > MAX_FILE => Err(format!(
            "{shown} is {} bytes; a seed file may hold at most {MAX_FILE}",
            bytes.len()
        )),
        Ok(Some(bytes)) => Ok((shown, bytes)),
        Ok(None) => Err(format!(
            "{shown} is not a file of commit {short}: repository files are read from git \
             (commit it), files outside the repository by an absolute path"
        )),
        Err(e) => Err(format!("cannot read {shown} from commit {short}: {e}")),
    }
}

/// For people reading a plan: how the seed files of VM `vm` changed since `have` was
/// started, as unified diffs of the repository files (read from both commits). Files
/// outside the repository (secrets) are named, never shown. Empty when the seed did not
/// change.
pub fn diffs(source: &Source, target: &super::Target, vm: &str, have: &ObservedVm) -> String {
    let Some(want) = target.desired.vms.get(vm) else {
        return String::new();
    };
    if have.seed == want.seed {
        return String::new();
    }
    let mut out = String::new();
    let none = cloud_init::CloudInit::default();
    let old_spec = have.spec.cloud_init.as_ref().unwrap_or(&none);
    let new_spec = want.spec.cloud_init.as_ref().unwrap_or(&none);
    let old_short = have.revision.get(..12).unwrap_or(&have.revision);
    for part in Part::ALL {
        let (old, new) = (old_spec.path(part), new_spec.path(part));
        if old.is_none() && new.is_none() {
            continue;
        }
        if [old, new]
            .iter()
            .flatten()
            .any(|p| Path::new(p).is_absolute())
        {
            let shown = new.or(old).unwrap_or_default();
            let _ = writeln!(
                out,
                "{} {shown}: outside the repository, not shown",
                part.key()
            );
            continue;
        }
        let text = |rev: &str, path: Option<&str>| {
            path.and_then(|p| source.blob(rev, p).ok().flatten())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let a = text(&have.revision, old);
        let b = text(&target.commit.id, new);
        if a == b {
            continue;
        }
        let shown = |p: Option<&str>| p.map_or("/dev/null".to_owned(), |p| source.display_path(p));
        let diff = similar::TextDiff::from_lines(&a, &b)
            .unified_diff()
            .context_radius(3)
            .header(
                &format!("running (commit {old_short}) {}", shown(old)),
                &shown(new),
            )
            .to_string();
        out.push_str(&diff);
    }
    out
}
