//! Where the binary and the test guest live, and building them once when needed.
//!
//! - Binary: `$PLASMAVMC_BIN` if set; otherwise `<target>/debug/plasmavmc`, where
//!   `<target>` is `$CARGO_TARGET_DIR` or `<workspace>/target`. Unless
//!   `$PLASMAVMC_BIN` is set, the harness runs `cargo build -p plasmavmc --bin
//!   plasmavmc --features failpoints` once per test process, so `cargo test -p
//!   plasmavmc-e2e` never runs a stale binary (a no-op when it is up to date), and the
//!   binary has the fail points tests/crashpoints.rs needs.
//! - Guest: `<workspace>/target/guest/{vmlinuz,initrd.img}`, built by
//!   `tests/guest/build.sh` when missing, once, under a file lock shared by every
//!   test process.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

/// The test guest's kernel and initrd, and the same guest as a bootable disk image
/// (absolute paths); the generic-kernel flavour's kernel and initrd (the watchdog tests'),
/// in `target/guest/generic/`.
#[derive(Debug, Clone)]
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub boot_image: PathBuf,
    pub generic_kernel: PathBuf,
    pub generic_initrd: PathBuf,
}

/// The workspace root: the parent of this crate's folder.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Cargo's target folder for this workspace.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// The `plasmavmc` binary, built first if needed (once per process).
pub fn binary() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate_binary().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// How the harness builds the binary: with the fail points the crash-point test uses
/// (`cargo build -p plasmavmc` alone would build it without them).
const FEATURED_BUILD: [&str; 7] = [
    "build",
    "-p",
    "plasmavmc",
    "--bin",
    "plasmavmc",
    "--features",
    "failpoints",
];

fn locate_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("PLASMAVMC_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("PLASMAVMC_BIN={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args(FEATURED_BUILD)
        .current_dir(workspace_root())
        .output()
        .with_context(|| format!("running {} build", cargo.to_string_lossy()))?;
    if !out.status.success() {
        bail!(
            "`cargo {}` failed ({}):\n{}",
            FEATURED_BUILD.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bin = target_dir().join("debug").join("plasmavmc");
    if !bin.is_file() {
        bail!("built plasmavmc but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// The test guest, built by `tests/guest/build.sh` if missing.
pub fn guest() -> Result<Guest> {
    static GUEST: OnceLock<Result<Guest, String>> = OnceLock::new();
    GUEST
        .get_or_init(|| build_guest().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_guest() -> Result<Guest> {
    let root = workspace_root();
    let dir = root.join("target").join("guest");
    let guest = Guest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        boot_image: dir.join("boot.img"),
        generic_kernel: dir.join("generic").join("vmlinuz"),
        generic_initrd: dir.join("generic").join("initrd.img"),
    };
    let present = |g: &Guest| {
        [
            &g.kernel,
            &g.initrd,
            &g.boot_image,
            &g.generic_kernel,
            &g.generic_initrd,
        ]
        .iter()
        .all(|f| f.is_file())
    };
    if present(&guest) {
        return Ok(guest);
    }
    // Several test processes may get here at once: one builds, the others wait.
    fs::create_dir_all(root.join("target")).context("creating target/")?;
    let lock_path = root.join("target").join(".plasmavmc-e2e-guest.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let _lock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| anyhow!("locking {}: {errno}", lock_path.display()))?;
    if present(&guest) {
        return Ok(guest);
    }
    let script = root.join("tests").join("guest").join("build.sh");
    let out = Command::new(&script)
        .current_dir(&root)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() || !present(&guest) {
        bail!(
            "{} failed ({}):\n{}\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(guest)
}

/// The SHA-256 of a file, in lowercase hex (how agents name the files they are sent:
/// `<root>/files/<sha256>`).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    let mut hex = String::with_capacity(64);
    for byte in hasher.finalize() {
        let _ = write!(hex, "{byte:02x}");
    }
    Ok(hex)
}
