//! A bare repository standing for the operator's git server: a `git clone --bare` of the
//! test repository in `<tmp>/remote.git`, reached by `watch --repo` over `file://` or
//! over ssh through the test's [`Sshd`], with server-side hooks the test writes. Read
//! with git2 (branches, their history and files), never through the engine.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use git2::Repository;

use crate::git::{file_at, history, vm_view_at};
use crate::repo::TestRepo;
use crate::sshd::Sshd;
use crate::status::VmView;

/// A bare clone of a [`TestRepo`], the "remote" of a `watch --repo URL`.
#[derive(Debug)]
pub struct BareRemote {
    dir: PathBuf,
}

impl BareRemote {
    /// `git clone --bare` of `repo` (every branch) into `<tmp>/remote.git`.
    pub fn clone_of(repo: &TestRepo) -> Result<Self> {
        let dir = repo.root().join("remote.git");
        let out = Command::new("git")
            .args(["clone", "--quiet", "--bare", "--"])
            .arg(repo.repo_dir())
            .arg(&dir)
            .output()
            .context("running git clone --bare")?;
        ensure!(
            out.status.success(),
            "git clone --bare failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Self { dir })
    }

    /// `file://<tmp>/remote.git`.
    pub fn file_url(&self) -> String {
        format!("file://{}", self.dir.display())
    }

    /// `ssh://<user>@127.0.0.1:<port><tmp>/remote.git` through `sshd`.
    pub fn ssh_url(&self, sshd: &Sshd<'_>) -> String {
        format!("{}{}", sshd.address(), self.dir.display())
    }

    fn git(&self) -> Result<Repository> {
        Repository::open_bare(&self.dir).context("opening the bare remote")
    }

    /// The commit `refs/heads/<branch>` points at, `None` if it does not exist.
    pub fn tip(&self, branch: &str) -> Result<Option<String>> {
        let git = self.git()?;
        let tip = git
            .find_reference(&format!("refs/heads/{branch}"))
            .ok()
            .and_then(|r| r.target());
        Ok(tip.map(|id| id.to_string()))
    }

    /// Every ref of the remote with its target, sorted.
    pub fn refs(&self) -> Result<Vec<(String, String)>> {
        let git = self.git()?;
        let mut out = Vec::new();
        for r in git.references()? {
            let r = r?;
            let target = r
                .target()
                .map(|id| id.to_string())
                .or_else(|| r.symbolic_target().map(str::to_owned))
                .unwrap_or_default();
            out.push((r.name().unwrap_or("?").to_owned(), target));
        }
        out.sort();
        Ok(out)
    }

    /// The commits of `branch`, newest first (first parents only).
    pub fn history(&self, branch: &str) -> Result<Vec<String>> {
        history(&self.git()?, branch)
    }

    /// The text of `path` at `rev` (a branch or a commit id).
    pub fn file_at(&self, rev: &str, path: &str) -> Result<Option<String>> {
        file_at(&self.git()?, rev, path)
    }

    /// `vms/<vm>.toml` at `rev` as a [`VmView`].
    pub fn vm_view_at(&self, rev: &str, vm: &str) -> Result<Option<VmView>> {
        vm_view_at(&self.git()?, rev, vm)
    }

    /// Commits `path` = `text` on `branch` (created from nothing if missing), as
    /// another writer pushing to the remote would; returns the commit.
    pub fn commit_as_another(&self, branch: &str, path: &str, text: &str) -> Result<String> {
        let git = self.git()?;
        let refname = format!("refs/heads/{branch}");
        let parent = git
            .find_reference(&refname)
            .ok()
            .map(|r| r.peel_to_commit())
            .transpose()?;
        let mut tree = git.treebuilder(None)?;
        tree.insert(path, git.blob(text.as_bytes())?, 0o100_644)?;
        let tree = git.find_tree(tree.write()?)?;
        let who = git2::Signature::now("someone else", "else@plasmavmc.invalid")?;
        let parents: Vec<_> = parent.iter().collect();
        let id = git.commit(
            Some(&refname),
            &who,
            &who,
            "another writer",
            &tree,
            &parents,
        )?;
        Ok(id.to_string())
    }

    /// True when commit `ancestor` is in the history of commit `of` (or is it).
    pub fn has_in_history(&self, of: &str, ancestor: &str) -> Result<bool> {
        let git = self.git()?;
        let (of, ancestor) = (git2::Oid::from_str(of)?, git2::Oid::from_str(ancestor)?);
        Ok(of == ancestor || git.graph_descendant_of(of, ancestor)?)
    }

    /// Writes the server-side hook `name` (e.g. `pre-receive`), executable.
    pub fn set_hook(&self, name: &str, script: &str) -> Result<()> {
        let path = self.dir.join("hooks").join(name);
        fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        Ok(())
    }

    /// Removes the hook `name`.
    pub fn remove_hook(&self, name: &str) -> Result<()> {
        let path = self.dir.join("hooks").join(name);
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
    }

    /// The remote's folder.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}
