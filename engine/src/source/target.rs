//! One commit, read and validated: the desired state the planner works toward.

use std::collections::BTreeMap;

use plasmavmc_specs::{Desired, Diagnostic};

use super::{files, seed, Commit, Source, SourceError};
use crate::qemu::instance::{ResolvedFiles, VmInstance};

/// Why a commit cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("commit {commit} is invalid ({} error{}); nothing was changed", diagnostics.len(), if diagnostics.len() == 1 { "" } else { "s" })]
    Invalid {
        commit: String,
        diagnostics: Vec<Diagnostic>,
    },
}

/// A validated commit: specs plus the on-disk files they name.
#[derive(Debug, Clone)]
pub struct Target {
    pub commit: Commit,
    /// The specs; each host's `known_hosts` and `identity_file` is an absolute path here,
    /// checked on disk (see [`files::resolve`]).
    pub desired: Desired,
    pub files: BTreeMap<String, ResolvedFiles>,
}

impl Target {
    /// Reads `rev`, validates every file, checks every kernel/initrd/image exists.
    pub fn load(source: &Source, rev: &str) -> Result<Self, TargetError> {
        let commit = source.read(rev)?;
        let invalid = |diagnostics| TargetError::Invalid {
            commit: commit.short().to_owned(),
            diagnostics,
        };
        let mut diags: Vec<Diagnostic> = commit
            .refused
            .iter()
            .map(|(path, why)| Diagnostic::file(path, *why))
            .collect();
        let mut desired = match plasmavmc_specs::load(&commit.files) {
            Ok(d) => d,
            Err(mut more) => {
                diags.append(&mut more);
                return Err(invalid(diags));
            }
        };
        let mut files =
            match files::resolve(&mut desired, &commit.files, source.spec_root().as_deref()) {
                Ok(f) => f,
                Err(mut more) => {
                    diags.append(&mut more);
                    BTreeMap::new()
                }
            };
        diags.append(&mut seed::build_all(
            source,
            &commit.id,
            &commit.files,
            &mut desired,
            &mut files,
        ));
        if !diags.is_empty() {
            diags.sort();
            return Err(invalid(diags));
        }
        Ok(Self {
            commit,
            desired,
            files,
        })
    }

    /// What `host` needs to run `vm` as this commit says.
    pub fn instance(&self, vm: &str, host: &str) -> Option<VmInstance> {
        let entry = self.desired.vms.get(vm)?;
        Some(VmInstance {
            name: entry.name.clone(),
            revision: self.commit.id.clone(),
            spec_hash: entry.hash.clone(),
            spec: entry.spec.clone(),
            files: self.files.get(vm).cloned().unwrap_or_default(),
            shared_storage: self
                .desired
                .hosts
                .get(host)
                .and_then(|h| h.spec.shared_storage.as_ref())
                .map(std::path::PathBuf::from),
            networks: entry
                .spec
                .nics
                .iter()
                .filter_map(|nic| {
                    let name = nic.network.as_str();
                    let def = self.desired.cluster.networks.get(name)?;
                    Some((name.to_owned(), def.clone()))
                })
                .collect(),
        })
    }
}
