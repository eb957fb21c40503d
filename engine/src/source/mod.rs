//! Where desired state comes from: one commit of a git repository.
//!
//! In: a repository path, the folder of it that holds the specs, a revision. Out: the
//! committed files below that folder ([`Commit`]) — only committed content counts —
//! plus the list of uncommitted changes to specs, which are reported and never used.
//! Reads git only; [`files`] then checks the kernels and images specs name on disk.

pub mod files;
pub mod remote;
pub mod seed;
mod target;

pub use target::{Target, TargetError};

use std::path::{Component, Path, PathBuf};

use git2::{ObjectType, Repository, Status, StatusOptions, TreeWalkMode, TreeWalkResult};
use plasmavmc_specs::SourceFile;

/// Errors reading the repository.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{}: not a git repository (or any parent)", path.display())]
    NotARepo {
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error("{}: the repository has no commits yet; commit your specs first", path.display())]
    NoCommits { path: PathBuf },
    #[error("revision {rev:?} not found in {}", repo.display())]
    NoRevision {
        rev: String,
        repo: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error("spec folder {path:?} is not a folder of commit {commit}")]
    NoSpecFolder { path: String, commit: String },
    #[error("spec folder {} is outside the repository {}", path.display(), repo.display())]
    Outside { path: PathBuf, repo: PathBuf },
    #[error("reading commit {commit}")]
    Git {
        commit: String,
        #[source]
        source: git2::Error,
    },
}

/// The files of one commit below the spec folder.
#[derive(Debug, Clone)]
pub struct Commit {
    /// Full commit id.
    pub id: String,
    pub summary: String,
    pub files: Vec<SourceFile>,
    /// Spec paths that cannot be read as specs and why (links, submodules, a `vms` that is
    /// not a folder): never followed, refused by validation.
    pub refused: Vec<(String, &'static str)>,
}

impl Commit {
    /// The first 12 digits of the id.
    pub fn short(&self) -> &str {
        self.id.get(..12).unwrap_or(&self.id)
    }
}

/// A repository and the folder of it that holds the specs.
pub struct Source {
    repo: Repository,
    /// Path of the spec folder relative to the repository root, `/`-separated, "" for the root.
    spec_dir: String,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("repo", &self.repo.path())
            .field("spec_dir", &self.spec_dir)
            .finish()
    }
}

impl Source {
    /// Opens the repository containing `repo` (searching parent folders). The spec folder
    /// is `repo` itself joined with `path`, relative to the repository's top.
    pub fn open(repo: &Path, path: Option<&Path>) -> Result<Self, SourceError> {
        let git = Repository::discover(repo).map_err(|source| SourceError::NotARepo {
            path: repo.to_path_buf(),
            source,
        })?;
        let top = git
            .workdir()
            .map_or_else(|| git.path().to_path_buf(), Path::to_path_buf);
        let top = top.canonicalize().unwrap_or(top);
        let start = repo.canonicalize().unwrap_or_else(|_| repo.to_path_buf());
        let mut rel = start
            .strip_prefix(&top)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        if let Some(p) = path {
            rel.push(p);
        }
        let spec_dir = normalise(&rel).ok_or_else(|| SourceError::Outside {
            path: rel.clone(),
            repo: top.clone(),
        })?;
        Ok(Self {
            repo: git,
            spec_dir,
        })
    }

    /// The spec folder in the working tree (where relative kernel/image paths point), or
    /// `None` for a bare repository.
    pub fn spec_root(&self) -> Option<PathBuf> {
        self.repo.workdir().map(|w| w.join(&self.spec_dir))
    }

    /// The spec folder relative to the repository top ("" for the top itself).
    pub fn spec_dir(&self) -> &str {
        &self.spec_dir
    }

    fn repo_path(&self) -> PathBuf {
        self.repo
            .workdir()
            .unwrap_or_else(|| self.repo.path())
            .to_path_buf()
    }

    /// The `.git` folder (or the bare repository itself).
    pub fn git_dir(&self) -> &Path {
        self.repo.path()
    }

    /// The `.git` folder, canonical: how `watch` names the repository it follows in
    /// its status (and how the drill recognises it).
    pub fn canonical_git_dir(&self) -> String {
        let git = self.git_dir();
        git.canonicalize()
            .unwrap_or_else(|_| git.to_path_buf())
            .display()
            .to_string()
    }

    /// The branch HEAD points to (`main`), if HEAD is a branch.
    pub fn current_branch(&self) -> Option<String> {
        let head = self.repo.find_reference("HEAD").ok()?;
        let target = head.symbolic_target()?;
        target.strip_prefix("refs/heads/").map(str::to_owned)
    }

    /// The underlying repository (for writing the status branch).
    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    /// Resolves `rev` to a commit id without reading files.
    pub fn resolve(&self, rev: &str) -> Result<String, SourceError> {
        Ok(self.commit(rev)?.id().to_string())
    }

    fn commit(&self, rev: &str) -> Result<git2::Commit<'_>, SourceError> {
        let unborn =
            matches!(self.repo.head(), Err(e) if e.code() == git2::ErrorCode::UnbornBranch);
        if unborn || (self.repo.head().is_err() && self.repo.is_empty().unwrap_or(false)) {
            return Err(SourceError::NoCommits {
                path: self.repo_path(),
            });
        }
        self.repo
            .revparse_single(rev)
            .and_then(|o| o.peel_to_commit())
            .map_err(|source| SourceError::NoRevision {
                rev: rev.to_owned(),
                repo: self.repo_path(),
                source,
            })
    }

    /// Reads every blob below the spec folder at `rev` that is a spec file (`plasmavmc.toml`,
    /// `hosts/**`, `vms/**`). Symlinks are listed apart and never followed.
    pub fn read(&self, rev: &str) -> Result<Commit, SourceError> {
        let commit = self.commit(rev)?;
        let id = commit.id().to_string();
        let git_err = |source| SourceError::Git {
            commit: id.clone(),
            source,
        };
        let tree = commit.tree().map_err(git_err)?;
        let tree = if self.spec_dir.is_empty() {
            tree
        } else {
            let entry = tree.get_path(Path::new(&self.spec_dir)).map_err(|_| {
                SourceError::NoSpecFolder {
                    path: self.spec_dir.clone(),
                    commit: id.clone(),
                }
            })?;
            let obj = entry.to_object(&self.repo).map_err(git_err)?;
            obj.into_tree().map_err(|_| SourceError::NoSpecFolder {
                path: self.spec_dir.clone(),
                commit: id.clone(),
            })?
        };
        let mut files = Vec::new();
        let mut refused = Vec::new();
        let mut failure = None;
        tree.walk(TreeWalkMode::PreOrder, |dir, entry| {
            let rel = format!("{dir}{}", entry.name().unwrap_or("\u{fffd}"));
            if (rel == "vms" || rel == "hosts") && entry.kind() != Some(ObjectType::Tree) {
                // A link or a file where the folder should be: never followed, and never
                // read as "no VMs" (which would delete them all).
                refused.push((self.display_path(&rel), "must be a folder of spec files (links are never followed)"));
                return TreeWalkResult::Ok;
            }
            if is_spec_path(&rel) && entry.kind() == Some(ObjectType::Commit) {
                refused.push((self.display_path(&rel), "is a submodule; specs must be committed in this repository"));
                return TreeWalkResult::Ok;
            }
            if !is_spec_path(&rel) {
                // Prune folders that can hold no spec.
                let keep_going =
                    entry.kind() == Some(ObjectType::Tree) && (rel == "vms" || rel == "hosts");
                return if entry.kind() == Some(ObjectType::Tree) && !keep_going {
                    TreeWalkResult::Skip
                } else {
                    TreeWalkResult::Ok
                };
            }
            if entry.kind() != Some(ObjectType::Blob) {
                return TreeWalkResult::Ok;
            }
            let path = self.display_path(&rel);
            if entry.filemode() == 0o120_000 {
                refused.push((path, "is a symbolic link; spec files must be regular files (links are never followed)"));
                return TreeWalkResult::Ok;
            }
            match entry.to_object(&self.repo).and_then(|o| o.peel_to_blob()) {
                Ok(blob) => files.push(SourceFile {
                    path,
                    rel,
                    bytes: blob.content().to_vec(),
                }),
                Err(e) => {
                    failure = Some(e);
                    return TreeWalkResult::Abort;
                }
            }
            TreeWalkResult::Ok
        })
        .map_err(git_err)?;
        if let Some(e) = failure {
            return Err(git_err(e));
        }
        let summary = commit.summary().unwrap_or("").to_owned();
        Ok(Commit {
            id,
            summary,
            files,
            refused,
        })
    }

    /// The committed content of the file `rel` (relative to the spec folder) at commit `id`:
    /// `Ok(None)` when the commit has no regular file there (a link is never followed).
    pub fn blob(&self, id: &str, rel: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let commit = self.commit(id)?;
        let git_err = |source| SourceError::Git {
            commit: id.to_owned(),
            source,
        };
        let tree = commit.tree().map_err(git_err)?;
        let Ok(entry) = tree.get_path(&Path::new(&self.spec_dir).join(rel)) else {
            return Ok(None);
        };
        if entry.kind() != Some(ObjectType::Blob) || entry.filemode() == 0o120_000 {
            return Ok(None);
        }
        let blob = entry
            .to_object(&self.repo)
            .and_then(|o| o.peel_to_blob())
            .map_err(git_err)?;
        Ok(Some(blob.content().to_vec()))
    }

    /// Paths (relative to the repository top) of spec files changed but not committed.
    pub fn uncommitted(&self) -> Vec<String> {
        if self.repo.is_bare() {
            return Vec::new();
        }
        let mut opts = StatusOptions::new();
        opts.include_untracked(true)
            .recurse_untracked_dirs(true)
            .include_ignored(false);
        for p in ["vms", "hosts", "plasmavmc.toml"] {
            opts.pathspec(self.display_path(p));
        }
        let Ok(statuses) = self.repo.statuses(Some(&mut opts)) else {
            return Vec::new();
        };
        statuses
            .iter()
            .filter(|s| s.status() != Status::CURRENT && !s.status().contains(Status::IGNORED))
            .filter_map(|s| s.path().map(str::to_owned))
            .collect()
    }

    /// `rel` (relative to the spec folder) as git shows it, for messages.
    pub fn display_path(&self, rel: &str) -> String {
        if self.spec_dir.is_empty() {
            rel.to_owned()
        } else {
            format!("{}/{rel}", self.spec_dir)
        }
    }
}

fn is_spec_path(rel: &str) -> bool {
    rel == "plasmavmc.toml" || rel.starts_with("vms/") || rel.starts_with("hosts/")
}

/// `a/./b/../c` → `a/c`; `None` when it climbs above its start.
fn normalise(path: &Path) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}
