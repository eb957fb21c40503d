//! Following a remote repository: a bare clone in the state directory, fetched on demand.
//!
//! In: a repository URL (`ssh://`, `https://`, `file://` or scp-like `[user@]host:path`),
//! the clone's folder (`<state>/repo.git`), a branch, a time limit per git run.
//! Out: [`Remote`]; [`Remote::fetch`] returns the full commit id of the branch tip, which
//! is then read from [`Remote::dir`] like any local repository (`refs/heads/<branch>`,
//! not `HEAD`). [`Remote::push`] sends one other branch back (the status branch), never
//! forced, with the same git and the same credentials as the fetch.
//!
//! Runs the system `git` with argv (never a shell of ours) so the user's ssh-agent,
//! `known_hosts` and credential helpers apply. It never prompts: `GIT_TERMINAL_PROMPT=0`,
//! stdin is `/dev/null`, the child runs in its own process group (a read from the
//! terminal stops it instead of prompting, and the time limit then kills it), and ssh
//! runs with `BatchMode=yes` unless the user configured an ssh command of their own
//! (`GIT_SSH_COMMAND`, `core.sshCommand`, `GIT_SSH`), which is then used as is.
//! A time limit kills the whole process group (git, ssh, remote helpers).
//!
//! Touches only the clone folder and, while cloning, a `<dir>.partial` sibling that is
//! renamed into place once complete. Never touches a working tree.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// Lines of git's stderr an error keeps (the last ones).
const STDERR_LINES: usize = 20;
/// How long to wait for the rest of stderr once git exited (a helper such as an ssh
/// `ControlPersist` master may keep the pipe open).
const STDERR_DRAIN: Duration = Duration::from_millis(200);
/// ssh command used when the user has none: fail instead of asking.
const BATCH_SSH: &str = "core.sshCommand=ssh -o BatchMode=yes";

/// Errors following a remote repository. URLs are shown with passwords and tokens
/// replaced by `***`.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("branch name {branch:?} is not valid")]
    InvalidBranch { branch: String },
    #[error("cannot run git (is it installed?)")]
    Spawn(#[source] std::io::Error),
    #[error("git {op} {url} failed: {stderr}")]
    Failed {
        op: &'static str,
        url: String,
        /// The last lines of git's stderr, trimmed (or the exit status when empty).
        stderr: String,
    },
    #[error("git {op} {url} did not finish within {}; killed", humantime::format_duration(*after))]
    Timeout {
        op: &'static str,
        url: String,
        after: Duration,
    },
    #[error("{} is a clone of {}, not of {url}; remove it or use another state directory",
        dir.display(), found.as_deref().unwrap_or("no origin"))]
    WrongOrigin {
        dir: PathBuf,
        url: String,
        found: Option<String>,
    },
    #[error("{} exists but is not a bare git clone; remove it", dir.display())]
    NotAClone {
        dir: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error("cannot prepare {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("branch {branch:?} is not one the engine writes (it follows {followed})")]
    NotOurs { branch: String, followed: String },
    #[error("branch {branch} is missing from {} after fetching {url}", dir.display())]
    NoTip {
        url: String,
        branch: String,
        dir: PathBuf,
        #[source]
        source: git2::Error,
    },
}

/// True for a URL (`scheme://…`) or an scp-like `[user@]host:path` (a colon before any
/// slash, as git reads it) that is not an existing local path.
pub fn is_remote(repo: &str) -> bool {
    is_remote_with(repo, Path::exists)
}

fn is_remote_with(repo: &str, exists: impl Fn(&Path) -> bool) -> bool {
    if repo.contains("://") {
        return true;
    }
    let Some((host, _)) = repo.split_once(':') else {
        return false;
    };
    !host.is_empty() && !host.contains('/') && !exists(Path::new(repo))
}

/// A bare, single-branch clone of a remote repository.
#[derive(Debug, Clone)]
pub struct Remote {
    url: String,
    dir: PathBuf,
    branch: String,
    /// `url` with its password or token replaced, for messages.
    shown: String,
    /// Pass `-c core.sshCommand=ssh -o BatchMode=yes` (the user has no ssh command).
    batch_ssh: bool,
}

impl Remote {
    /// Clones (bare, single branch, no tags) into `dir` if it is missing or empty; if
    /// `dir` holds a clone, checks its origin URL is `url`. The clone is bounded by
    /// `timeout` and built in `<dir>.partial`, so `dir` never holds half a clone.
    pub async fn open(
        url: &str,
        dir: &Path,
        branch: &str,
        timeout: Duration,
    ) -> Result<Self, RemoteError> {
        if !git2::Reference::is_valid_name(&format!("refs/heads/{branch}")) {
            return Err(RemoteError::InvalidBranch {
                branch: branch.to_owned(),
            });
        }
        let shown = redact(url);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RemoteError::Io { path, source }
        };
        let exists = match std::fs::read_dir(dir) {
            Ok(mut entries) => entries.next().is_some(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io(dir)(e)),
        };
        if exists {
            let repo =
                git2::Repository::open_bare(dir).map_err(|source| RemoteError::NotAClone {
                    dir: dir.to_path_buf(),
                    source,
                })?;
            let found = repo
                .find_remote("origin")
                .ok()
                .and_then(|r| r.url().map(str::to_owned));
            if found.as_deref() != Some(url) {
                return Err(RemoteError::WrongOrigin {
                    dir: dir.to_path_buf(),
                    url: shown,
                    found: found.as_deref().map(redact),
                });
            }
            let batch_ssh = repo.config().is_ok_and(|c| !has_ssh_command(&c));
            return Ok(Self {
                url: url.to_owned(),
                dir: dir.to_path_buf(),
                branch: branch.to_owned(),
                shown,
                batch_ssh,
            });
        }

        let batch_ssh = git2::Config::open_default().is_ok_and(|c| !has_ssh_command(&c));
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent.filter(|p| !p.exists()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io(parent))?;
        }
        let mut partial = dir.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        remove_all(&partial).map_err(io(&partial))?;

        let mut cmd = git(batch_ssh);
        // libgit2 reads only the `files` ref format; keep it whatever the user's default.
        cmd.args(["-c", "init.defaultRefFormat=files", "clone", "--quiet"])
            .args(["--bare", "--single-branch", "--no-tags", "--branch", branch])
            .arg("--")
            .arg(url)
            .arg(&partial);
        if let Err(e) = run(cmd, "clone", &shown, secret(url), timeout).await {
            let _ = remove_all(&partial);
            return Err(e);
        }
        std::fs::rename(&partial, dir).map_err(io(dir))?;
        tracing::info!(url = %shown, dir = %dir.display(), branch, "cloned");
        Ok(Self {
            url: url.to_owned(),
            dir: dir.to_path_buf(),
            branch: branch.to_owned(),
            shown,
            batch_ssh,
        })
    }

    /// Fetches the branch (`+refs/heads/B:refs/heads/B`, forced: a force-push upstream
    /// is followed), bounded by `timeout`, and returns the full commit id of its tip.
    /// On any error the clone keeps the tip of the last successful fetch.
    pub async fn fetch(&self, timeout: Duration) -> Result<String, RemoteError> {
        let refname = format!("refs/heads/{}", self.branch);
        let mut cmd = git(self.batch_ssh);
        cmd.arg("--git-dir")
            .arg(&self.dir)
            .args(["fetch", "--quiet", "--no-tags", "origin"])
            .arg(format!("+{refname}:{refname}"));
        run(cmd, "fetch", &self.shown, secret(&self.url), timeout).await?;
        let no_tip = |source| RemoteError::NoTip {
            url: self.shown.clone(),
            branch: self.branch.clone(),
            dir: self.dir.clone(),
            source,
        };
        let repo = git2::Repository::open_bare(&self.dir).map_err(no_tip)?;
        let commit = repo
            .find_reference(&refname)
            .and_then(|r| r.peel_to_commit())
            .map_err(no_tip)?;
        Ok(commit.id().to_string())
    }

    /// Pushes the clone's `refs/heads/<branch>` to the same branch of origin: that one
    /// ref, never forced (the remote refuses anything but a fast-forward), bounded by
    /// `timeout`. Refuses the branch followed, which only the remote's owners write.
    pub async fn push(&self, branch: &str, timeout: Duration) -> Result<(), RemoteError> {
        self.check_other(branch)?;
        let refname = format!("refs/heads/{branch}");
        let mut cmd = git(self.batch_ssh);
        cmd.arg("--git-dir")
            .arg(&self.dir)
            .args(["push", "--quiet", "--no-follow-tags", "origin"])
            .arg(format!("{refname}:{refname}"));
        run(cmd, "push", &self.shown, secret(&self.url), timeout).await
    }

    /// Fetches origin's `refs/heads/<branch>` into the clone's
    /// [`Self::fetched_ref`] (not into the branch itself), bounded by `timeout`, and
    /// returns that ref's name. Refuses the branch followed, as [`Self::push`] does.
    pub async fn fetch_other(
        &self,
        branch: &str,
        timeout: Duration,
    ) -> Result<String, RemoteError> {
        self.check_other(branch)?;
        let fetched = Self::fetched_ref(branch);
        let mut cmd = git(self.batch_ssh);
        cmd.arg("--git-dir")
            .arg(&self.dir)
            .args(["fetch", "--quiet", "--no-tags", "origin"])
            .arg(format!("+refs/heads/{branch}:{fetched}"));
        run(cmd, "fetch", &self.shown, secret(&self.url), timeout).await?;
        Ok(fetched)
    }

    /// Where [`Self::fetch_other`] keeps origin's tip of `branch`.
    pub fn fetched_ref(branch: &str) -> String {
        format!("refs/plasmavmc/origin/{branch}")
    }

    fn check_other(&self, branch: &str) -> Result<(), RemoteError> {
        if branch == self.branch || !git2::Reference::is_valid_name(&format!("refs/heads/{branch}"))
        {
            return Err(RemoteError::NotOurs {
                branch: branch.to_owned(),
                followed: self.branch.clone(),
            });
        }
        Ok(())
    }

    /// The bare clone.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The URL followed, with its password or token replaced by `***`.
    pub fn shown_url(&self) -> &str {
        &self.shown
    }
}

/// True when the user chose how git runs ssh (then we do not override it).
fn has_ssh_command(config: &git2::Config) -> bool {
    let set = |var| std::env::var_os(var).is_some_and(|v| !v.is_empty());
    set("GIT_SSH_COMMAND") || set("GIT_SSH") || config.get_entry("core.sshCommand").is_ok()
}

/// `git` that never prompts and never reads the environment's repository variables.
fn git(batch_ssh: bool) -> Command {
    let mut cmd = Command::new("git");
    cmd.env("GIT_TERMINAL_PROMPT", "0");
    for var in [
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_COMMON_DIR",
        "GIT_INDEX_FILE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_NAMESPACE",
    ] {
        cmd.env_remove(var);
    }
    if batch_ssh {
        cmd.args(["-c", BATCH_SSH]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

/// Kills the child's process group when dropped while armed (cancelled or timed out).
struct GroupKill(Option<nix::unistd::Pid>);

impl GroupKill {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` to completion within `timeout`; on timeout kills its process group.
async fn run(
    mut cmd: Command,
    op: &'static str,
    shown: &str,
    secret: Option<&str>,
    timeout: Duration,
) -> Result<(), RemoteError> {
    let mut child = cmd.spawn().map_err(RemoteError::Spawn)?;
    let mut group = GroupKill(
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(nix::unistd::Pid::from_raw),
    );
    let mut stderr = Vec::new();
    let done = tokio::time::timeout(timeout, wait(&mut child, &mut stderr)).await;
    let status = match done {
        Ok(Ok(status)) => {
            group.0 = None; // exited: its group id may be reused
            status
        }
        Ok(Err(source)) => return Err(RemoteError::Spawn(source)),
        Err(_) => {
            group.kill();
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            tracing::warn!(url = %shown, op, ?timeout, "git timed out; killed");
            return Err(RemoteError::Timeout {
                op,
                url: shown.to_owned(),
                after: timeout,
            });
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut text = tail(&String::from_utf8_lossy(&stderr), STDERR_LINES);
    if let Some(secret) = secret {
        text = text.replace(secret, "***");
    }
    if text.is_empty() {
        text = status.to_string();
    }
    Err(RemoteError::Failed {
        op,
        url: shown.to_owned(),
        stderr: text,
    })
}

/// Waits for `child`, collecting its stderr meanwhile (bounded to the last 64 KiB).
async fn wait(child: &mut Child, stderr: &mut Vec<u8>) -> std::io::Result<ExitStatus> {
    const KEEP: usize = 64 * 1024;
    let mut pipe = child.stderr.take().expect("stderr is piped");
    let mut buf = [0u8; 4096];
    let mut open = true;
    let push = |stderr: &mut Vec<u8>, bytes: &[u8]| {
        stderr.extend_from_slice(bytes);
        let excess = stderr.len().saturating_sub(KEEP);
        stderr.drain(..excess);
    };
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            n = pipe.read(&mut buf), if open => match n {
                Ok(0) | Err(_) => open = false,
                Ok(n) => push(stderr, &buf[..n]),
            },
        }
    };
    let deadline = tokio::time::Instant::now() + STDERR_DRAIN;
    while open {
        match tokio::time::timeout_at(deadline, pipe.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => push(stderr, &buf[..n]),
            _ => open = false,
        }
    }
    Ok(status)
}

/// The last `lines` non-empty lines of `text`, trimmed.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..]
        .join("\n")
        .trim()
        .to_owned()
}

/// The secret part of a URL's user info: the password, or for http(s) a lone token.
fn secret(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let (userinfo, _) = authority.rsplit_once('@')?;
    match userinfo.split_once(':') {
        Some((_, password)) => Some(password).filter(|p| !p.is_empty()),
        None => Some(userinfo).filter(|u| scheme.starts_with("http") && !u.is_empty()),
    }
}

/// `url` with [`secret`] replaced by `***`.
fn redact(url: &str) -> String {
    match secret(url) {
        Some(s) => url.replacen(&format!("{s}@"), "***@", 1),
        None => url.to_owned(),
    }
}

fn remove_all(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
