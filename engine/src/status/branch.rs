//! Status history in git: the status folder committed to a branch of the repository.
//!
//! In: a repository, a branch name, the status folder (`<state>/status`) and a commit
//! message. Out: a commit on `refs/heads/<branch>` whose tree is the folder's `*.toml`
//! files at the top (`engine.toml`, `vms/*.toml`, `hosts/*.toml`), whose parent is the
//! branch's previous tip, or nothing when the tree did not change. `git log <branch>`
//! is then the status history.
//!
//! Writes objects and that one ref (with a reflog entry) only: never the working tree,
//! the index or `HEAD`. Refuses a branch that `HEAD` of the repository or of any of its
//! worktrees points to, since moving it would desynchronise that working tree.
//! Skips hidden files (the `.name.tmp.pid` of atomic writes), symbolic links and
//! anything that is not `*.toml`.

use std::fs;
use std::path::{Path, PathBuf};

use git2::{ErrorCode, FileMode, Oid, Reference, Repository, Signature};

/// Author and committer when the repository configures no `user.name`/`user.email`.
const DEFAULT_NAME: &str = "plasmavmc";
const DEFAULT_EMAIL: &str = "plasmavmc@localhost";

/// Errors committing status to a branch.
#[derive(Debug, thiserror::Error)]
pub enum BranchError {
    #[error("{branch:?} is not a valid branch name")]
    InvalidName { branch: String },
    #[error("status branch {branch} is checked out in {}; use another branch", worktree.display())]
    CheckedOut { branch: String, worktree: PathBuf },
    #[error("cannot read status {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot store {} in git", path.display())]
    Store {
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error("cannot {op} for status branch {branch}")]
    Git {
        op: &'static str,
        branch: String,
        #[source]
        source: git2::Error,
    },
}

/// Commits the `*.toml` files under `status_dir` to `branch` (created on first use).
/// Returns the new commit, or `None` when the tree equals the tip's (or the folder is
/// empty and the branch does not exist yet).
pub fn commit_status(
    repo: &Repository,
    branch: &str,
    status_dir: &Path,
    message: &str,
) -> Result<Option<Oid>, BranchError> {
    let refname = format!("refs/heads/{branch}");
    if !Reference::is_valid_name(&refname) {
        return Err(BranchError::InvalidName {
            branch: branch.to_owned(),
        });
    }
    let git = |op| {
        move |source| BranchError::Git {
            op,
            branch: branch.to_owned(),
            source,
        }
    };
    if let Some(worktree) = checked_out(repo, &refname).map_err(git("read HEAD"))? {
        return Err(BranchError::CheckedOut {
            branch: branch.to_owned(),
            worktree,
        });
    }

    let tree = match write_tree(repo, status_dir)? {
        Some(tree) => tree,
        None => empty_tree(repo).map_err(git("write the tree"))?,
    };
    let parent = match repo.find_reference(&refname) {
        Ok(r) => Some(r.peel_to_commit().map_err(git("read the tip"))?),
        Err(e) if e.code() == ErrorCode::NotFound => None,
        Err(e) => return Err(git("read the tip")(e)),
    };
    let unchanged = match &parent {
        Some(p) => p.tree_id() == tree,
        None => tree == empty_tree(repo).map_err(git("write the tree"))?,
    };
    if unchanged {
        return Ok(None);
    }

    let config = repo.config().map_err(git("read the configuration"))?;
    let sig = signature(&config).map_err(git("make the signature"))?;
    let tree = repo.find_tree(tree).map_err(git("read the tree"))?;
    let parents: Vec<_> = parent.iter().collect();
    // Updates the ref only if its tip is still `parent` (libgit2 checks it).
    let id = repo
        .commit(Some(&refname), &sig, &sig, message, &tree, &parents)
        .map_err(git("commit"))?;
    tracing::debug!(branch, commit = %id, "status committed");
    Ok(Some(id))
}

/// Puts `other` (another writer's tip of `branch`, e.g. the remote's) into the branch's
/// history: a commit with the branch tip's tree (the status is this engine's) and two
/// parents, the tip first and `other`, so that pushing the branch is a fast-forward and
/// neither history is lost. Returns the new commit, or `None` when there is nothing to
/// do: `other` is already in the branch's history, or the branch does not exist.
/// Updates the ref only if its tip did not move meanwhile.
pub fn adopt_tip(
    repo: &Repository,
    branch: &str,
    other: Oid,
    message: &str,
) -> Result<Option<Oid>, BranchError> {
    let refname = format!("refs/heads/{branch}");
    let git = |op| {
        move |source| BranchError::Git {
            op,
            branch: branch.to_owned(),
            source,
        }
    };
    let tip = match repo.find_reference(&refname) {
        Ok(r) => r.peel_to_commit().map_err(git("read the tip"))?,
        Err(e) if e.code() == ErrorCode::NotFound => return Ok(None),
        Err(e) => return Err(git("read the tip")(e)),
    };
    if tip.id() == other
        || repo
            .graph_descendant_of(tip.id(), other)
            .map_err(git("compare histories"))?
    {
        return Ok(None);
    }
    let other = repo.find_commit(other).map_err(git("read the other tip"))?;
    let config = repo.config().map_err(git("read the configuration"))?;
    let sig = signature(&config).map_err(git("make the signature"))?;
    let tree = tip.tree().map_err(git("read the tree"))?;
    let id = repo
        .commit(Some(&refname), &sig, &sig, message, &tree, &[&tip, &other])
        .map_err(git("commit"))?;
    tracing::debug!(branch, commit = %id, "status branch joined another tip");
    Ok(Some(id))
}

/// The worktree whose `HEAD` points to `refname`: this repository's, a linked one's, or
/// (from a linked worktree) the main one's.
fn checked_out(repo: &Repository, refname: &str) -> Result<Option<PathBuf>, git2::Error> {
    let here = |r: &Repository| -> Result<bool, git2::Error> {
        let head = r.find_reference("HEAD")?;
        Ok(head.symbolic_target_bytes() == Some(refname.as_bytes()))
    };
    let place = |r: &Repository| r.workdir().unwrap_or_else(|| r.path()).to_path_buf();
    if here(repo)? {
        return Ok(Some(place(repo)));
    }
    if repo.is_worktree() {
        if let Ok(main) = Repository::open(repo.commondir()) {
            if here(&main)? {
                return Ok(Some(place(&main)));
            }
        }
    }
    for name in repo.worktrees()?.iter().flatten() {
        // A worktree whose folder is gone cannot be desynchronised.
        let Ok(linked) = repo
            .find_worktree(name)
            .and_then(|w| Repository::open_from_worktree(&w))
        else {
            continue;
        };
        if here(&linked)? {
            return Ok(Some(place(&linked)));
        }
    }
    Ok(None)
}

/// Writes the tree of `dir`'s status files; `None` when it holds none.
fn write_tree(repo: &Repository, dir: &Path) -> Result<Option<Oid>, BranchError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BranchError::Read { path, source }
    };
    let git_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BranchError::Store { path, source }
    };
    let mut builder = repo.treebuilder(None).map_err(git_err(dir))?;
    for entry in fs::read_dir(dir).map_err(read_err(dir))? {
        let entry = entry.map_err(read_err(dir))?;
        let name = entry.file_name();
        if name.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(read_err(&path))?;
        if kind.is_dir() {
            if let Some(sub) = write_tree(repo, &path)? {
                builder
                    .insert(&name, sub, FileMode::Tree.into())
                    .map_err(git_err(&path))?;
            }
        } else if kind.is_file() && path.extension().is_some_and(|e| e == "toml") {
            let bytes = match fs::read(&path) {
                Ok(bytes) => bytes,
                // Removed since the listing: it is not part of the status any more.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(read_err(&path)(e)),
            };
            let blob = repo.blob(&bytes).map_err(git_err(&path))?;
            builder
                .insert(&name, blob, FileMode::Blob.into())
                .map_err(git_err(&path))?;
        }
    }
    if builder.is_empty() {
        return Ok(None);
    }
    builder.write().map(Some).map_err(git_err(dir))
}

fn empty_tree(repo: &Repository) -> Result<Oid, git2::Error> {
    repo.treebuilder(None)?.write()
}

/// `user.name`/`user.email` of the repository's configuration, else plasmavmc's own.
fn signature(config: &git2::Config) -> Result<Signature<'static>, git2::Error> {
    let get = |key, default: &str| {
        config
            .get_string(key)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| default.to_owned())
    };
    Signature::now(
        &get("user.name", DEFAULT_NAME),
        &get("user.email", DEFAULT_EMAIL),
    )
}

#[cfg(test)]
mod tests;
