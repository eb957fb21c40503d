//! The real Debian 12 guest (`tests/guest/debian.sh`) and reaching it over SSH.
//!
//! - [`debian`]: the image, its kernel and initrd in `<workspace>/target/debian/`, built
//!   (or found up to date: the script compares its own digest) once per test process,
//!   under a file lock shared by every test process.
//! - [`ssh_banner`] tells a guest's sshd from slirp, which accepts a forwarded
//!   connection before anything listens in the guest; [`GuestSsh`] runs a command in the
//!   guest with OpenSSH's client and a key of the test.

use std::fs::{self, OpenOptions};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};

use crate::artifacts::workspace_root;

/// The Debian image and the kernel and initrd it boots with (absolute paths).
#[derive(Debug, Clone)]
pub struct DebianImage {
    pub image: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The Debian image, built by `tests/guest/debian.sh` unless it is up to date.
pub fn debian() -> Result<DebianImage> {
    static IMAGE: OnceLock<Result<DebianImage, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build() -> Result<DebianImage> {
    let root = workspace_root();
    let dir = root.join("target").join("debian");
    let image = DebianImage {
        image: dir.join("debian.qcow2"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
    };
    // Several test processes may get here at once: one builds, the others wait (and
    // then find it up to date).
    fs::create_dir_all(root.join("target")).context("creating target/")?;
    let lock_path = root.join("target").join(".plasmavmc-e2e-debian.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let _lock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| anyhow!("locking {}: {errno}", lock_path.display()))?;
    let script = root.join("tests").join("guest").join("debian.sh");
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(&root)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    let present = [&image.image, &image.kernel, &image.initrd]
        .iter()
        .all(|p| p.is_file());
    if !out.status.success() || !present {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
        bail!(
            "{} failed ({}); the end of what it said:\n{}",
            script.display(),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(image)
}

/// Whether an SSH server answers on 127.0.0.1:`port`: its first bytes are `SSH-`.
pub fn ssh_banner(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).is_ok() && &head == b"SSH-"
}

/// A login into a guest through a port forward of 127.0.0.1, with a key of the test.
#[derive(Debug, Clone)]
pub struct GuestSsh {
    pub port: u16,
    pub user: String,
    pub key: PathBuf,
}

impl GuestSsh {
    pub fn new(port: u16, user: &str, key: &Path) -> Self {
        Self {
            port,
            user: user.to_owned(),
            key: key.to_path_buf(),
        }
    }

    /// Runs `command` in the guest; its stdout, or why it failed.
    pub fn run(&self, command: &str) -> Result<String> {
        let out = Command::new("ssh")
            .arg("-i")
            .arg(&self.key)
            .args(["-p", &self.port.to_string()])
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=10",
                "-o",
                "ServerAliveInterval=5",
                "-o",
                "LogLevel=ERROR",
            ])
            .arg(format!("{}@127.0.0.1", self.user))
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .context("running ssh: install openssh-client (.ci/install-deps does it)")?;
        if !out.status.success() {
            bail!(
                "ssh {}@127.0.0.1:{} {command:?}: {}: {}",
                self.user,
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
