//! Status commits on a repository with a dirty working tree, made by the git CLI.

use super::*;
use std::process::Command;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn git(dir: &Path, args: &[&str]) -> Result<String, Box<dyn std::error::Error>> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=test", "-c", "user.email=test@localhost"])
        .args(args)
        .output()?;
    if !out.status.success() {
        return Err(format!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A repository on `main` with a modified, a staged and an untracked file, and the
/// engine's default (git-ignored) status folder inside its working tree.
fn dirty_repo(top: &Path) -> Result<(Repository, PathBuf), Box<dyn std::error::Error>> {
    git(top, &["init", "-q", "-b", "main"])?;
    fs::write(top.join("README"), "one\n")?;
    fs::write(top.join(".gitignore"), ".plasmavmc/\n")?;
    git(top, &["add", "."])?;
    git(top, &["commit", "-q", "-m", "first"])?;
    fs::write(top.join("README"), "one, edited\n")?;
    fs::write(top.join("staged"), "staged\n")?;
    git(top, &["add", "staged"])?;
    fs::write(top.join("untracked"), "untracked\n")?;
    let status = top.join(".plasmavmc/status");
    for sub in ["vms", "hosts"] {
        fs::create_dir_all(status.join(sub))?;
    }
    fs::write(status.join("engine.toml"), "revision_seen = \"a\"\n")?;
    fs::write(status.join("vms/web.toml"), "phase = \"running\"\n")?;
    fs::write(status.join("hosts/local.toml"), "phase = \"ready\"\n")?;
    // Not status: a temporary file of an atomic write, another extension, a symlink.
    fs::write(status.join("vms/.web.toml.tmp.42"), "half")?;
    fs::write(status.join("notes.txt"), "x")?;
    std::os::unix::fs::symlink("/etc/hostname", status.join("hosts/link.toml"))?;
    Ok((Repository::open(top)?, status))
}

fn files(repo: &Repository, id: Oid) -> Result<Vec<String>, git2::Error> {
    let mut out = Vec::new();
    repo.find_commit(id)?
        .tree()?
        .walk(git2::TreeWalkMode::PreOrder, |dir, e| {
            if e.kind() == Some(git2::ObjectType::Blob) {
                out.push(format!("{dir}{}", e.name().unwrap_or("?")));
            }
            git2::TreeWalkResult::Ok
        })?;
    Ok(out)
}

#[test]
fn commits_changes_only_and_leaves_the_worktree_alone() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let top = tmp.path();
    let (repo, status) = dirty_repo(top)?;
    let before = git(top, &["status", "--porcelain=v1", "-uall"])?;
    let index = fs::read(top.join(".git/index"))?;
    let head = git(top, &["rev-parse", "HEAD"])?;

    let first = commit_status(&repo, "status", &status, "status: one")?.ok_or("no commit")?;
    assert_eq!(
        files(&repo, first)?,
        ["engine.toml", "hosts/local.toml", "vms/web.toml"]
    );
    assert_eq!(repo.find_commit(first)?.parent_count(), 0);
    assert_eq!(
        commit_status(&repo, "status", &status, "status: same")?,
        None
    );

    fs::write(status.join("vms/web.toml"), "phase = \"crashed\"\n")?;
    let second = commit_status(&repo, "status", &status, "status: two")?.ok_or("no commit")?;
    let commit = repo.find_commit(second)?;
    assert_eq!(commit.parent_id(0)?, first);
    assert_eq!(commit.message(), Some("status: two"));
    assert_eq!(
        git(top, &["show", "status:vms/web.toml"])?,
        "phase = \"crashed\"\n"
    );

    fs::remove_file(status.join("vms/web.toml"))?;
    let third = commit_status(&repo, "status", &status, "status: gone")?.ok_or("no commit")?;
    assert_eq!(files(&repo, third)?, ["engine.toml", "hosts/local.toml"]);
    assert_eq!(git(top, &["rev-list", "--count", "status"])?.trim(), "3");

    assert_eq!(git(top, &["status", "--porcelain=v1", "-uall"])?, before);
    assert_eq!(fs::read(top.join(".git/index"))?, index, "index untouched");
    assert_eq!(git(top, &["rev-parse", "HEAD"])?, head);
    assert_eq!(
        git(top, &["symbolic-ref", "HEAD"])?.trim(),
        "refs/heads/main"
    );
    assert_eq!(fs::read_to_string(top.join("README"))?, "one, edited\n");
    Ok(())
}

#[test]
fn an_empty_folder_makes_no_first_commit() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let repo = Repository::init(tmp.path().join("repo"))?;
    let status = tmp.path().join("status");
    fs::create_dir_all(status.join("vms"))?;
    assert_eq!(
        commit_status(&repo, "status", &status, "status: none")?,
        None
    );
    assert!(repo.find_reference("refs/heads/status").is_err());
    let err = commit_status(&repo, "status", &tmp.path().join("missing"), "m").err();
    assert!(matches!(err, Some(BranchError::Read { .. })), "{err:?}");
    Ok(())
}

#[test]
fn refuses_a_checked_out_branch() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let top = tmp.path().join("repo");
    fs::create_dir(&top)?;
    let (repo, status) = dirty_repo(&top)?;
    let err = commit_status(&repo, "main", &status, "status: x").err();
    // `workdir()` ends in '/'.
    let main_worktree = top.join("");
    assert!(
        matches!(&err, Some(BranchError::CheckedOut { worktree, .. }) if *worktree == main_worktree),
        "{err:?}"
    );

    let linked = tmp.path().join("linked");
    let linked_arg = linked.to_str().ok_or("utf-8")?;
    git(
        &top,
        &["worktree", "add", "-q", "-b", "feature", linked_arg],
    )?;
    let err = commit_status(&repo, "feature", &status, "status: x").err();
    assert!(
        matches!(err, Some(BranchError::CheckedOut { .. })),
        "{err:?}"
    );
    // And from the linked worktree, the main one's branch.
    let from_linked = Repository::open(&linked)?;
    let err = commit_status(&from_linked, "main", &status, "status: x").err();
    assert!(
        matches!(err, Some(BranchError::CheckedOut { .. })),
        "{err:?}"
    );
    let main = repo.find_reference("refs/heads/main")?.peel_to_commit()?;
    assert_eq!(main.parent_count(), 0, "main did not move");
    Ok(())
}

#[test]
fn refuses_invalid_names() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let repo = Repository::init(tmp.path())?;
    for name in ["bad..name", "with space", "trailing/", "a:b", ""] {
        let err = commit_status(&repo, name, tmp.path(), "m").err();
        assert!(
            matches!(err, Some(BranchError::InvalidName { .. })),
            "{name}: {err:?}"
        );
    }
    Ok(())
}

#[test]
fn signature_from_config_or_default() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut config = git2::Config::open(&tmp.path().join("config"))?;
    let sig = signature(&config)?;
    assert_eq!(
        (sig.name(), sig.email()),
        (Some(DEFAULT_NAME), Some(DEFAULT_EMAIL))
    );
    config.set_str("user.name", "Ops")?;
    config.set_str("user.email", "ops@example.com")?;
    let sig = signature(&config)?;
    assert_eq!(
        (sig.name(), sig.email()),
        (Some("Ops"), Some("ops@example.com"))
    );
    Ok(())
}

#[test]
fn adopting_another_tip_keeps_both_histories_and_our_tree() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (repo, status) = dirty_repo(tmp.path())?;
    let ours = commit_status(&repo, "status", &status, "ours")?.ok_or("no commit")?;
    // Another writer's history of the branch, unrelated to ours.
    fs::write(status.join("engine.toml"), "revision_seen = \"theirs\"\n")?;
    let theirs = commit_status(&repo, "theirs", &status, "theirs")?.ok_or("no commit")?;

    let joined = adopt_tip(&repo, "status", theirs, "join")?.ok_or("not joined")?;
    let commit = repo.find_commit(joined)?;
    assert_eq!(commit.parent_ids().collect::<Vec<_>>(), [ours, theirs]);
    assert_eq!(commit.tree_id(), repo.find_commit(ours)?.tree_id());
    let tip = repo.find_reference("refs/heads/status")?.target();
    assert_eq!(tip, Some(joined));
    // Already in the history (either tip): nothing to do.
    assert_eq!(adopt_tip(&repo, "status", theirs, "again")?, None);
    assert_eq!(adopt_tip(&repo, "status", ours, "again")?, None);
    assert_eq!(adopt_tip(&repo, "missing", theirs, "none")?, None);
    Ok(())
}
