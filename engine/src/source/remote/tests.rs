//! Remote following against `file://` repositories made in temporary folders.

use super::*;
use std::time::Instant;

type TestResult = Result<(), Box<dyn std::error::Error>>;
const LIMIT: Duration = Duration::from_secs(30);

/// A non-bare repository whose `main` gets one commit per call of [`commit`].
fn upstream(dir: &Path) -> Result<(git2::Repository, String), git2::Error> {
    let repo = git2::Repository::init(dir)?;
    repo.set_head("refs/heads/main")?;
    Ok((repo, format!("file://{}", dir.display())))
}

fn commit(repo: &git2::Repository, branch: &str, text: &str) -> Result<String, git2::Error> {
    let refname = format!("refs/heads/{branch}");
    let parent = repo
        .find_reference(&refname)
        .and_then(|r| r.peel_to_commit())
        .ok();
    let mut tree = repo.treebuilder(
        parent
            .as_ref()
            .map(git2::Commit::tree)
            .transpose()?
            .as_ref(),
    )?;
    tree.insert("README", repo.blob(text.as_bytes())?, 0o100_644)?;
    let tree = repo.find_tree(tree.write()?)?;
    let sig = git2::Signature::now("test", "test@localhost")?;
    let parents: Vec<_> = parent.iter().collect();
    Ok(repo
        .commit(Some(&refname), &sig, &sig, text, &tree, &parents)?
        .to_string())
}

#[test]
fn remote_or_local() -> TestResult {
    for url in [
        "ssh://git@example.com/vms.git",
        "https://example.com/vms.git",
        "file:///srv/vms",
        "git@example.com:org/vms.git",
        "hv-config:vms",
    ] {
        assert!(is_remote(url), "{url}");
    }
    let tmp = tempfile::tempdir()?;
    let odd = tmp.path().join("a:b");
    std::fs::create_dir(&odd)?;
    for path in [".", "/srv/vms", "./a:b", "vms"] {
        assert!(!is_remote(path), "{path}");
    }
    assert!(
        !is_remote_with("a:b", |p| tmp.path().join(p) == odd),
        "existing"
    );
    Ok(())
}

#[test]
fn secrets_are_redacted() {
    assert_eq!(redact("https://u:pw@h/r"), "https://u:***@h/r");
    assert_eq!(redact("https://tok3n@h/r"), "https://***@h/r");
    assert_eq!(redact("ssh://git@h/r"), "ssh://git@h/r");
    assert_eq!(redact("git@h:r"), "git@h:r");
    assert_eq!(redact("file:///a@b/r"), "file:///a@b/r");
}

#[tokio::test]
async fn clones_then_fetch_follows_the_branch() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (up, url) = upstream(&tmp.path().join("up"))?;
    let first = commit(&up, "main", "one")?;
    commit(&up, "other", "elsewhere")?;
    let dir = tmp.path().join("state/repo.git");

    let remote = Remote::open(&url, &dir, "main", LIMIT).await?;
    assert_eq!(remote.dir(), dir);
    let clone = git2::Repository::open_bare(&dir)?;
    assert!(
        clone.find_reference("refs/heads/other").is_err(),
        "single branch"
    );
    assert!(!tmp.path().join("state/repo.git.partial").exists());
    assert_eq!(remote.fetch(LIMIT).await?, first);

    let second = commit(&up, "main", "two")?;
    assert_eq!(remote.fetch(LIMIT).await?, second);
    // Reopening the existing clone works and sees the same tip.
    let again = Remote::open(&url, &dir, "main", LIMIT).await?;
    assert_eq!(again.fetch(LIMIT).await?, second);
    // Another branch of the same clone.
    let other = Remote::open(&url, &dir, "other", LIMIT).await?;
    let more = commit(&up, "other", "more")?;
    assert_eq!(other.fetch(LIMIT).await?, more);
    Ok(())
}

#[tokio::test]
async fn refuses_a_folder_of_another_origin() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (up, url) = upstream(&tmp.path().join("up"))?;
    commit(&up, "main", "one")?;
    let dir = tmp.path().join("repo.git");
    Remote::open(&url, &dir, "main", LIMIT).await?;
    let err = Remote::open("file:///elsewhere", &dir, "main", LIMIT)
        .await
        .err()
        .ok_or("accepted")?;
    assert!(matches!(&err, RemoteError::WrongOrigin { found: Some(f), .. } if *f == url));
    assert!(err.to_string().contains("file:///elsewhere"), "{err}");

    let junk = tmp.path().join("junk");
    std::fs::create_dir(&junk)?;
    std::fs::write(junk.join("x"), "x")?;
    let err = Remote::open(&url, &junk, "main", LIMIT).await.err();
    assert!(
        matches!(err, Some(RemoteError::NotAClone { .. })),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn unreachable_or_missing_branch_fails_clearly() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("repo.git");
    let start = Instant::now();
    let err = Remote::open("file:///nonexistent/vms", &dir, "main", LIMIT)
        .await
        .err()
        .ok_or("cloned nothing")?;
    assert!(start.elapsed() < Duration::from_secs(10));
    let RemoteError::Failed { op, url, stderr } = &err else {
        return Err(format!("unexpected {err:?}").into());
    };
    assert_eq!((*op, url.as_str()), ("clone", "file:///nonexistent/vms"));
    assert!(stderr.contains("/nonexistent/vms"), "{stderr}");
    assert!(!dir.exists() && !tmp.path().join("repo.git.partial").exists());

    for (url, says) in [
        ("ssh://127.0.0.1:1/vms.git", "port 1"),
        ("https://127.0.0.1:1/vms.git", "127.0.0.1"),
    ] {
        let err = Remote::open(url, &dir, "main", LIMIT).await.err();
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains(says), "{url}: {text}");
    }
    assert!(start.elapsed() < Duration::from_secs(10));

    let (up, url) = upstream(&tmp.path().join("up"))?;
    commit(&up, "main", "one")?;
    let err = Remote::open(&url, &dir, "nope", LIMIT).await.err();
    assert!(err.is_some_and(|e| e.to_string().contains("nope")));
    let err = Remote::open(&url, &dir, "bad..name", LIMIT).await.err();
    assert!(matches!(err, Some(RemoteError::InvalidBranch { .. })));
    Ok(())
}

#[tokio::test]
async fn fetch_timeout_kills_the_process_group() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (up, url) = upstream(&tmp.path().join("up"))?;
    commit(&up, "main", "one")?;
    let dir = tmp.path().join("repo.git");
    let remote = Remote::open(&url, &dir, "main", LIMIT).await?;
    // For file:// git runs upload-pack through sh: make it hang, recording its pid.
    let pidfile = tmp.path().join("pid");
    git2::Repository::open_bare(&dir)?.config()?.set_str(
        "remote.origin.uploadpack",
        &format!("echo $$ > '{}'; exec sleep 30 #", pidfile.display()),
    )?;
    let start = Instant::now();
    let err = remote.fetch(Duration::from_millis(500)).await.err();
    assert!(matches!(err, Some(RemoteError::Timeout { .. })), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    let pid = std::fs::read_to_string(&pidfile)?;
    // Gone, or a zombie waiting for its new parent; SIGKILL takes effect asynchronously.
    let stat_path = format!("/proc/{}/stat", pid.trim());
    let mut last = String::new();
    for _ in 0..100 {
        match std::fs::read_to_string(&stat_path) {
            Ok(s) if !s.contains(") Z ") && !s.contains(") X ") => last = s,
            _ => return Ok(()),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("sleep survived: {last}").into())
}

#[test]
fn a_user_ssh_command_is_kept() -> TestResult {
    if ["GIT_SSH_COMMAND", "GIT_SSH"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
    {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let mut config = git2::Config::open(&tmp.path().join("config"))?;
    assert!(!has_ssh_command(&config));
    config.set_str("core.sshCommand", "ssh -i /etc/plasmavmc/deploy_key")?;
    assert!(has_ssh_command(&config));
    Ok(())
}

#[tokio::test]
async fn pushes_one_other_branch_never_forced() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (up, url) = upstream(&tmp.path().join("up"))?;
    let main = commit(&up, "main", "one")?;
    let remote = Remote::open(&url, &tmp.path().join("repo.git"), "main", LIMIT).await?;
    let clone = git2::Repository::open_bare(remote.dir())?;

    // The clone's own branch reaches origin; origin's main is not touched.
    let ours = commit(&clone, "status", "status one")?;
    commit(&clone, "main", "a local main commit that must never leave")?;
    remote.push("status", LIMIT).await?;
    let tip = |b: &str| -> Result<String, git2::Error> {
        let r = up.find_reference(&format!("refs/heads/{b}"))?;
        Ok(r.peel_to_commit()?.id().to_string())
    };
    assert_eq!(tip("status")?, ours);
    assert_eq!(tip("main")?, main);
    // The branch followed is never pushed (nor fetched aside).
    let err = remote
        .push("main", LIMIT)
        .await
        .err()
        .ok_or("pushed main")?;
    assert!(matches!(err, RemoteError::NotOurs { .. }), "{err}");
    assert!(remote.fetch_other("main", LIMIT).await.is_err());
    assert_eq!(tip("main")?, main);

    // Another writer moved origin's branch: refused (not forced); fetched aside.
    let theirs = commit(&up, "status", "someone else")?;
    commit(&clone, "status", "status two")?;
    let err = remote.push("status", LIMIT).await.err().ok_or("forced")?;
    assert!(
        matches!(&err, RemoteError::Failed { op: "push", .. }),
        "{err}"
    );
    assert_eq!(tip("status")?, theirs);
    let fetched = remote.fetch_other("status", LIMIT).await?;
    assert_eq!(fetched, Remote::fetched_ref("status"));
    let got = clone.find_reference(&fetched)?.peel_to_commit()?.id();
    assert_eq!(got.to_string(), theirs);
    Ok(())
}
