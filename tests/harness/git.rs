//! What the test repository's git data says, read with git2: `HEAD`, the index, the
//! working tree's changes, and the history and files of any branch (e.g. a status
//! branch the engine commits to).

use std::fs;

use anyhow::{Context, Result};
use git2::{Repository, StatusOptions};

use crate::repo::TestRepo;
use crate::status::VmView;

impl TestRepo {
    fn git(&self) -> Result<Repository> {
        Repository::open(self.repo_dir()).context("opening the test repository")
    }

    /// The commit `HEAD` points at.
    pub fn head_id(&self) -> Result<String> {
        let git = self.git()?;
        let head = git.head().context("reading HEAD")?;
        let id = head.peel_to_commit()?.id();
        Ok(id.to_string())
    }

    /// The branch `HEAD` names (`refs/heads/...`).
    pub fn head_ref(&self) -> Result<String> {
        let git = self.git()?;
        let head = git.head().context("reading HEAD")?;
        Ok(head.name().context("HEAD names no ref")?.to_owned())
    }

    /// Every path `git status` would show (untracked files included, ignored ones
    /// not), with its status flags: empty when the working tree and index are clean.
    pub fn worktree_changes(&self) -> Result<Vec<String>> {
        let git = self.git()?;
        let mut opts = StatusOptions::new();
        opts.include_untracked(true)
            .recurse_untracked_dirs(true)
            .include_ignored(false);
        let statuses = git.statuses(Some(&mut opts)).context("git status")?;
        Ok(statuses
            .iter()
            .map(|e| format!("{:?} {}", e.status(), e.path().unwrap_or("?")))
            .collect())
    }

    /// The bytes of `.git/index` (empty if there is none).
    pub fn index_bytes(&self) -> Vec<u8> {
        fs::read(self.repo_dir().join(".git").join("index")).unwrap_or_default()
    }

    /// The commits of `branch`, newest first (first parents only); empty if the branch
    /// does not exist.
    pub fn branch_history(&self, branch: &str) -> Result<Vec<String>> {
        history(&self.git()?, branch)
    }

    /// The text of `path` in the tree of commit `rev` (a branch name or a commit id);
    /// `None` if the revision or the file does not exist.
    pub fn file_at(&self, rev: &str, path: &str) -> Result<Option<String>> {
        file_at(&self.git()?, rev, path)
    }

    /// `vms/<vm>.toml` in the tree of commit `rev` (a status branch keeps the status
    /// folder's files at the top) as a [`VmView`]; `None` if absent.
    pub fn vm_view_at(&self, rev: &str, vm: &str) -> Result<Option<VmView>> {
        vm_view_at(&self.git()?, rev, vm)
    }
}

/// The commits of `branch` in `git`, newest first (first parents only); empty if the
/// branch does not exist.
pub(crate) fn history(git: &Repository, branch: &str) -> Result<Vec<String>> {
    let Ok(reference) = git.find_reference(&format!("refs/heads/{branch}")) else {
        return Ok(Vec::new());
    };
    let mut commit = Some(reference.peel_to_commit()?);
    let mut out = Vec::new();
    while let Some(c) = commit {
        out.push(c.id().to_string());
        commit = c.parents().next();
    }
    Ok(out)
}

/// The text of `path` in the tree of commit `rev` of `git`; `None` if the revision or
/// the file does not exist.
pub(crate) fn file_at(git: &Repository, rev: &str, path: &str) -> Result<Option<String>> {
    let Ok(object) = git.revparse_single(rev) else {
        return Ok(None);
    };
    let tree = object.peel_to_commit()?.tree()?;
    let Ok(entry) = tree.get_path(std::path::Path::new(path)) else {
        return Ok(None);
    };
    let blob = entry
        .to_object(git)?
        .peel_to_blob()
        .with_context(|| format!("{path} at {rev} is not a file"))?;
    Ok(Some(String::from_utf8_lossy(blob.content()).into_owned()))
}

/// `vms/<vm>.toml` at `rev` of `git` as a [`VmView`]; `None` if absent.
pub(crate) fn vm_view_at(git: &Repository, rev: &str, vm: &str) -> Result<Option<VmView>> {
    let path = format!("vms/{vm}.toml");
    let Some(text) = file_at(git, rev, &path)? else {
        return Ok(None);
    };
    let table = text
        .parse()
        .with_context(|| format!("parsing {path} at {rev}:\n{text}"))?;
    Ok(Some(VmView::from_table(table)))
}
