//! Moving the designated VM by commit, as an operator would: its spec file with `host`
//! set (or put back as it was), committed to the branch the daemon follows.
//!
//! The commits go straight to the branch (compare-and-swap on its tip: a branch that
//! moved meanwhile is never overwritten); the working tree and index are not touched, so
//! once the drill has committed the original file back, a checkout of that branch is
//! clean again.

use std::time::SystemTime;

use anyhow::{bail, Context as _, Result};

use super::{poll_until, Cluster, STEP};
use crate::status::VmEvent;

/// `text` (a VM spec file) with its top-level `host` set to `host`, or removed (`None`).
/// Only that line changes; the result is checked to differ from `text` in nothing else.
pub fn with_pin(text: &str, host: Option<&str>) -> Result<String> {
    let lines: Vec<&str> = text.lines().collect();
    let top = lines
        .iter()
        .position(|l| l.trim_start().starts_with('['))
        .unwrap_or(lines.len());
    let is_host = |l: &&str| {
        l.trim_start()
            .strip_prefix("host")
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    };
    let pin = host.map(|h| format!("host = {}", toml::Value::String(h.to_owned())));
    let mut out: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    match (lines[..top].iter().position(is_host), pin) {
        (Some(i), Some(p)) => out[i] = p,
        (Some(i), None) => {
            out.remove(i);
        }
        (None, Some(p)) => {
            // After the last top-level key, or first when there is none.
            let at = lines[..top]
                .iter()
                .rposition(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
                .map_or(0, |i| i + 1);
            out.insert(at, p);
        }
        (None, None) => {}
    }
    let mut edited = out.join("\n");
    if text.ends_with('\n') || text.is_empty() {
        edited.push('\n');
    }
    // The edit must be exactly "host changed": compare the parsed documents.
    let mut want: toml::Table = text.parse().context("the VM's spec file is not TOML")?;
    match host {
        Some(h) => want.insert("host".to_owned(), toml::Value::String(h.to_owned())),
        None => want.remove("host"),
    };
    let got: toml::Table = edited.parse().context("pinning broke the spec file")?;
    if got != want {
        bail!("cannot set `host` in this spec file by editing one line (is `host` written in an unusual way?)");
    }
    Ok(edited)
}

/// Commits `text` as `path` (relative to the repository top) on `branch`, whose tip must
/// still be `expected_tip`; returns the new commit's id.
pub fn commit_file(
    repo: &git2::Repository,
    branch: &str,
    expected_tip: git2::Oid,
    path: &str,
    text: &str,
    message: &str,
) -> Result<git2::Oid> {
    let refname = format!("refs/heads/{branch}");
    let tip = repo
        .find_reference(&refname)
        .and_then(|r| r.peel_to_commit())
        .with_context(|| format!("reading branch {branch}"))?;
    if tip.id() != expected_tip {
        bail!(
            "branch {branch} moved (now {}) while the drill ran; not committing over it",
            tip.id()
        );
    }
    let base = tip.tree()?;
    let mode = base
        .get_path(std::path::Path::new(path))
        .map_or(git2::FileMode::Blob, |e| {
            if e.filemode() == i32::from(git2::FileMode::BlobExecutable) {
                git2::FileMode::BlobExecutable
            } else {
                git2::FileMode::Blob
            }
        });
    let blob = repo.blob(text.as_bytes())?;
    let tree = git2::build::TreeUpdateBuilder::new()
        .upsert(path, blob, mode)
        .create_updated(repo, &base)?;
    let tree = repo.find_tree(tree)?;
    let sig = repo
        .signature()
        .or_else(|_| git2::Signature::now("plasmavmc drill", "drill@plasmavmc.invalid"))?;
    let id = repo.commit(None, &sig, &sig, message, &tree, &[&tip])?;
    repo.reference_matching(&refname, id, true, tip.id(), message)
        .with_context(|| {
            format!("branch {branch} moved while the drill committed; not overwritten")
        })?;
    Ok(id)
}

impl Cluster {
    fn tip(&self, branch: &str) -> Result<git2::Commit<'_>> {
        Ok(self
            .source
            .repository()
            .find_reference(&format!("refs/heads/{branch}"))?
            .peel_to_commit()?)
    }

    /// The VM's spec file at the tip of `branch`.
    pub(super) fn spec_text(&self, branch: &str) -> Result<String> {
        let tip = self.tip(branch)?;
        let entry = tip
            .tree()?
            .get_path(std::path::Path::new(&self.spec_path))
            .with_context(|| format!("{} at the tip of {branch}", self.spec_path))?;
        let blob = self.source.repository().find_blob(entry.id())?;
        String::from_utf8(blob.content().to_vec()).context("the VM's spec file is not UTF-8")
    }

    /// Commits `text` as the VM's spec file (when it differs); returns the commit.
    fn commit_spec(&self, branch: &str, text: &str, message: &str) -> Result<Option<git2::Oid>> {
        if self.spec_text(branch)? == text {
            return Ok(None);
        }
        let tip = self.tip(branch)?.id();
        let repo = self.source.repository();
        commit_file(repo, branch, tip, &self.spec_path, text, message).map(Some)
    }

    /// Commits the VM pinned to `to`; returns its `migrate` event once it runs there.
    pub(super) fn move_to(
        &self,
        branch: &str,
        original: &str,
        to: &str,
    ) -> Result<(SystemTime, VmEvent)> {
        let since = SystemTime::now();
        let text = with_pin(original, Some(to))?;
        let message = format!(
            "plasmavmc drill: move {} to {to} (live round trip)",
            self.vm
        );
        self.commit_spec(branch, &text, &message)?;
        let event = self.event_after(&format!("the move to {to}"), since, STEP, |e| {
            e.kind.starts_with("migrate")
        })?;
        if event.1.kind != "migrate" {
            bail!("the move to {to} failed: {}", event.1.message);
        }
        if !poll_until(STEP, || {
            self.status().and_then(|s| s.host).as_deref() == Some(to)
        }) {
            bail!("the status never said {} runs on {to}", self.vm);
        }
        Ok(event)
    }

    /// Commits the spec file back as it was and waits until the daemon reconciled with it.
    pub(super) fn restore(&self, branch: &str, original: &str) -> Result<()> {
        let message = format!("plasmavmc drill: {} spec as it was", self.vm);
        let Some(id) = self.commit_spec(branch, original, &message)? else {
            return Ok(());
        };
        let id = id.to_string();
        let applied = poll_until(STEP, || {
            self.engine()
                .is_ok_and(|e| e.last_attempted_revision.as_deref() == Some(id.as_str()))
        });
        if !applied {
            bail!("the daemon did not take up the restoring commit {id} within {STEP:?}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_is_added_replaced_and_removed_touching_nothing_else() -> Result<()> {
        let spec = "# web\nmemory_mb = 96\n\n[boot]\nkernel = \"k\"\nhost = \"not-top\"\n";
        let pinned = with_pin(spec, Some("hv2"))?;
        assert_eq!(
            pinned,
            "# web\nmemory_mb = 96\nhost = \"hv2\"\n\n[boot]\nkernel = \"k\"\nhost = \"not-top\"\n"
        );
        let moved = with_pin(&pinned, Some("hv1"))?;
        assert!(moved.contains("host = \"hv1\"\n\n[boot]"), "{moved}");
        assert_eq!(with_pin(&pinned, None)?, spec);
        assert_eq!(with_pin("", Some("a"))?, "host = \"a\"\n");
        Ok(())
    }

    #[test]
    fn an_edit_that_would_change_more_than_the_pin_is_refused() {
        let odd = "\"host\" = \"hv1\"\nmemory_mb = 96\n";
        assert!(with_pin(odd, Some("hv2")).is_err());
    }

    #[test]
    fn commits_go_to_the_branch_only_from_the_expected_tip() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let repo = git2::Repository::init(dir.path())?;
        let sig = git2::Signature::now("t", "t@t.invalid")?;
        let blob = repo.blob(b"a = 1\n")?;
        let mut tb = repo.treebuilder(None)?;
        tb.insert("x.toml", blob, 0o100_644)?;
        let tree = repo.find_tree(tb.write()?)?;
        let first = repo.commit(Some("refs/heads/main"), &sig, &sig, "one", &tree, &[])?;
        let second = commit_file(&repo, "main", first, "vms/x.toml", "b = 2\n", "two")?;
        let tip = repo.find_reference("refs/heads/main")?.peel_to_commit()?;
        assert_eq!(tip.id(), second);
        let entry = tip.tree()?.get_path(std::path::Path::new("vms/x.toml"))?;
        assert_eq!(repo.find_blob(entry.id())?.content(), b"b = 2\n");
        assert!(tip.tree()?.get_name("x.toml").is_some(), "the rest is kept");
        let stale = commit_file(&repo, "main", first, "vms/x.toml", "c = 3\n", "three");
        assert!(stale.is_err(), "a moved branch is never overwritten");
        Ok(())
    }
}
