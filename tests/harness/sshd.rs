//! A real OpenSSH server for one test: `/usr/sbin/sshd -D -e -f CFG` on 127.0.0.1 and a
//! free port, run as the current user, with everything it needs in `<tmp>/sshd/`: a
//! generated host key and client key, `authorized_keys`, the config, the pid file, its
//! log, and `bin/plasmavmc` (a link to the binary under test, first on the PATH that
//! sshd gives its sessions), so `ssh://` hosts reach the agent under test without any
//! file outside the test's temp folder.
//!
//! Like a [`crate::Daemon`], an [`Sshd`] borrows its [`TestRepo`] and runs in its own
//! process group, killed on drop and again by the repo's cleanup. The per-connection
//! processes sshd forks start in new sessions, but keep its working directory (inside
//! the temp folder), and the agents they run name their root there: the repo's cleanup
//! kills them.
//!
//! A missing `sshd` or ssh client fails the test, naming the package to install: the
//! ssh transport must never go untested silently.

use std::fs::{self, File};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{Pid, Uid, User};

use crate::artifacts;
use crate::repo::TestRepo;
use crate::spec::HostSpec;
use crate::wait::poll_for;

/// The OpenSSH server (package openssh-server).
pub const SSHD: &str = "/usr/sbin/sshd";

/// Bound for sshd to listen, and for one preflight login.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running sshd on 127.0.0.1.
#[derive(Debug)]
pub struct Sshd<'r> {
    repo: &'r TestRepo,
    child: Child,
    dir: PathBuf,
    port: u16,
    user: String,
    /// Logins sshd had accepted once started (the harness's own check).
    own_logins: usize,
}

impl<'r> Sshd<'r> {
    /// Generates the keys and the config in `<tmp>/sshd/`, starts sshd on a free port,
    /// waits until it listens, and logs in once with the client key (the remote
    /// `plasmavmc` must be the binary under test). Fails, showing sshd's log, when any
    /// of it does not work.
    pub fn start(repo: &'r TestRepo) -> Result<Self> {
        ensure!(
            Path::new(SSHD).is_file(),
            "{SSHD} is missing: install openssh-server (.ci/install-deps does it)"
        );
        let dir = repo.root().join("sshd");
        fs::create_dir_all(dir.join("bin")).context("creating the sshd folder")?;
        keygen(&dir.join("host_key"))?;
        keygen(&dir.join("client_key"))?;
        fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))
            .context("writing authorized_keys")?;
        std::os::unix::fs::symlink(artifacts::binary()?, dir.join("bin").join("plasmavmc"))
            .context("linking the binary under test")?;
        if Uid::current().is_root() {
            // sshd started as root wants its privilege separation folder.
            fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
        }
        let user = User::from_uid(Uid::current())?
            .context("the current user has no passwd entry")?
            .name;
        // The kernel names a free port; sshd binds it a moment later, and another
        // process may take it in between: a few attempts.
        let mut failures = Vec::new();
        for _ in 0..3 {
            let port = free_port()?;
            let mut sshd = Self::spawn(repo, &dir, port, &user)?;
            match sshd.wait_listening() {
                Ok(()) => {
                    sshd.check_login()?;
                    sshd.own_logins = sshd.accepted();
                    return Ok(sshd);
                }
                Err(e) if sshd.log().contains("Address already in use") => {
                    failures.push(format!("port {port}: {e:#}"));
                }
                Err(e) => return Err(e),
            }
        }
        bail!("sshd could not listen: {}", failures.join("; "))
    }

    fn spawn(repo: &'r TestRepo, dir: &Path, port: u16, user: &str) -> Result<Self> {
        let config = dir.join("sshd_config");
        let d = dir.display();
        fs::write(
            &config,
            format!(
                "# sshd of one PlasmaVMC test: 127.0.0.1:{port}, keys and files in {d}\n\
                 ListenAddress 127.0.0.1\n\
                 Port {port}\n\
                 HostKey {d}/host_key\n\
                 PidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\n\
                 AllowUsers {user}\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\n\
                 UsePAM no\n\
                 StrictModes no\n\
                 SetEnv PATH={d}/bin:/usr/bin:/bin\n"
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let log = File::create(dir.join("sshd.log"))?;
        let mut cmd = Command::new(SSHD);
        cmd.arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        let sshd = Self {
            repo,
            child,
            dir: dir.to_path_buf(),
            port,
            user: user.to_owned(),
            own_logins: 0,
        };
        repo.register_group(sshd.pid());
        Ok(sshd)
    }

    /// Waits until the port accepts connections; fails at once if sshd exited.
    fn wait_listening(&self) -> Result<()> {
        poll_for(
            format!("sshd to listen on port {}", self.port),
            START_TIMEOUT,
            || {
                if !crate::proc::is_alive(self.pid()) {
                    return Some(Err(anyhow::anyhow!("sshd exited")));
                }
                TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))
                    .ok()
                    .map(|_| Ok(()))
            },
        )
        .and_then(|r| r)
        .with_context(|| format!("sshd log:\n{}", self.log()))
    }

    /// Logs in with the client key and the right host key, as the engine will, and
    /// checks that `plasmavmc` there is the binary under test (a login shell's profile
    /// may put another first on the PATH).
    fn check_login(&self) -> Result<()> {
        let known_hosts = self.dir.join("known_hosts");
        fs::write(&known_hosts, self.known_hosts()?)?;
        let mut cmd = Command::new("ssh");
        cmd.args([
            "-T",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-i")
        .arg(self.client_key())
        .args(["-o", "IdentitiesOnly=yes", "-p", &self.port.to_string()])
        .arg("--")
        .arg(format!("{}@127.0.0.1", self.user))
        .arg("command -v plasmavmc");
        let out = crate::run::Running::spawn(cmd)
            .context("running ssh: install openssh-client (.ci/install-deps does it)")?
            .finish(START_TIMEOUT)?;
        let link = self.dir.join("bin").join("plasmavmc");
        ensure!(
            out.code == Some(0) && out.stdout.trim() == link.to_string_lossy(),
            "logging in to the test's sshd should find {} as `plasmavmc`\n{out}\nsshd log:\n{}",
            link.display(),
            self.log()
        );
        Ok(())
    }

    /// sshd's process id (and process group).
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pids fit in i32")
    }

    /// The port sshd listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `ssh://<current user>@127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        format!("ssh://{}@127.0.0.1:{}", self.user, self.port)
    }

    /// The client's private key (mode 0600), authorised for the current user.
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client_key")
    }

    /// A `known_hosts` text that names this server (`[127.0.0.1]:<port>`) with its
    /// real host key.
    pub fn known_hosts(&self) -> Result<String> {
        self.known_hosts_line(&self.dir.join("host_key.pub"))
    }

    /// A `known_hosts` text that names this server with another, freshly generated key:
    /// what a client holds when the server's key changed (or an impostor answers).
    pub fn known_hosts_with_another_key(&self) -> Result<String> {
        let other = self.dir.join("other_host_key");
        if !other.exists() {
            keygen(&other)?;
        }
        self.known_hosts_line(&self.dir.join("other_host_key.pub"))
    }

    fn known_hosts_line(&self, public_key: &Path) -> Result<String> {
        let text = fs::read_to_string(public_key)
            .with_context(|| format!("reading {}", public_key.display()))?;
        let mut fields = text.split_whitespace();
        let (Some(kind), Some(key)) = (fields.next(), fields.next()) else {
            bail!("{} is not a public key: {text:?}", public_key.display());
        };
        Ok(format!("[127.0.0.1]:{} {kind} {key}\n", self.port))
    }

    /// A host spec reaching this server: its [`Self::address`], `known_hosts` as given
    /// (a path for the spec: absolute, or relative to the spec folder) and the client
    /// key as `identity_file`.
    pub fn host_spec(&self, known_hosts: &str) -> HostSpec {
        HostSpec::ssh(
            &self.address(),
            known_hosts,
            &self.client_key().to_string_lossy(),
        )
    }

    /// How many logins sshd accepted since [`Self::start`] returned (not counting the
    /// harness's own check).
    pub fn logins(&self) -> usize {
        self.accepted().saturating_sub(self.own_logins)
    }

    fn accepted(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.starts_with("Accepted publickey"))
            .count()
    }

    /// What sshd logged so far (`-e`: its stderr).
    pub fn log(&self) -> String {
        fs::read(self.dir.join("sshd.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Sshd<'_> {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
        let _ = self.child.wait();
        self.repo.unregister_group(self.pid());
    }
}

/// `ssh-keygen -t ed25519 -N '' -f path` (quiet; `path` must not exist).
pub fn keygen(path: &Path) -> Result<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "plasmavmc-e2e", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("running ssh-keygen: install openssh-client (.ci/install-deps does it)")?;
    ensure!(
        out.status.success(),
        "ssh-keygen -f {} failed ({}): {}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A TCP port of 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
