//! The throw-away cluster a drill runs on: a git repository of specs, three simulated
//! hosts (this binary's agent on a root of its own, started through `sh -c` so a host
//! can be "powered off"), one shared-storage folder, and the real `plasmavmc watch` as
//! a child process whose JSON log is read back ([`super::log`]).
//!
//! ```text
//! <tmp>/repo/          plasmavmc.toml, hosts/hv{1,2,3}.toml, vms/*.toml (committed)
//! <tmp>/state/         the engine's state directory
//! <tmp>/hosts/hvN/     host roots; <tmp>/hosts/hvN.off = powered off
//! <tmp>/shared/        shared storage of pool "drill"
//! <tmp>/fence.sh       fence command of hv1 and hv2 (kills the host's QEMUs, then writes
//!                      <tmp>/hosts/hvN.fenced); hv3 has none
//! <tmp>/watch-N.log    the daemon's log (JSON lines)
//! ```
//!
//! A host's processes are the ones whose working directory is in its root: its agent
//! (the `sh -c` that starts it enters the root first, then looks for the power-off
//! marker, then becomes the agent) and its QEMUs (each runs in its instance folder).
//! Powering a host off writes the marker, then kills its processes until none is
//! left: a starter that entered the root before the marker existed is killed with the
//! rest, one that had not will see the marker. Killing only the agent seen first would
//! let an agent the daemon was starting at that moment live on a "powered off" host.
//!
//! The folder is removed at the end unless `PLASMAVMC_DRILL_KEEP` is set (to anything):
//! then it stays, with every daemon log, status file and host root, for a post-mortem.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::log::LogLine;

/// Every host of the sandbox; hv3 has no fence command.
pub const HOSTS: [&str; 3] = ["hv1", "hv2", "hv3"];

/// The sandbox; dropping it kills everything it started and removes its folder.
pub struct Sandbox {
    dir: tempfile::TempDir,
    exe: PathBuf,
    repo: git2::Repository,
    pub guest: Guest,
    /// Memory of every VM.
    memory_mb: u64,
    /// The running daemon and its log file.
    watch: Option<(Child, PathBuf)>,
    watches: usize,
    /// The highest boot count each VM's guest was seen to find on its disk: its console
    /// shows the count only where it booted, and a live move discards that console.
    boots_seen: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

/// What the drill's VMs boot.
#[derive(Debug, Clone)]
pub enum Guest {
    /// A kernel and initramfs given to QEMU (the tiny test guest by default): its kernel
    /// command line carries the drill's knobs (panic, power off), its console counts
    /// `tick N`.
    Kernel { kernel: PathBuf, initrd: PathBuf },
    /// A disk image the firmware boots (a copy-on-write overlay per VM): nothing is known
    /// of its console but that it grows.
    Image { image: PathBuf },
}

impl Guest {
    /// True when its console counts `tick N` (so progress and reboots can be told).
    pub fn ticks(&self) -> bool {
        matches!(self, Guest::Kernel { .. })
    }

    /// The test guest's generic-kernel flavour (its initrd loads the i6300esb watchdog
    /// driver), in `generic/` beside the kernel, when it was built.
    pub fn generic(&self) -> Option<Guest> {
        let Guest::Kernel { kernel, .. } = self else {
            return None;
        };
        let dir = kernel.parent()?.join("generic");
        let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd.img"));
        (kernel.is_file() && initrd.is_file()).then_some(Guest::Kernel { kernel, initrd })
    }
}

impl Sandbox {
    /// Creates the sandbox and commits its hosts; `settings` is the extra TOML of
    /// plasmavmc.toml (heartbeat).
    pub fn new(guest: Guest, memory_mb: u64, settings: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("plasmavmc-drill-")
            .tempdir()
            .context("creating the sandbox folder")?;
        let exe = std::env::current_exe().context("finding this program")?;
        let root = dir.path();
        let repo = git2::Repository::init(root.join("repo")).context("git init")?;
        fs::create_dir_all(root.join("shared"))?;
        let fence = root.join("fence.sh");
        fs::write(&fence, FENCE_SCRIPT)?;
        let sandbox = Self {
            exe,
            repo,
            guest,
            memory_mb,
            watch: None,
            watches: 0,
            boots_seen: std::sync::Mutex::default(),
            dir,
        };
        // A short restart window: every run of a row is a first failure (the restart
        // policy's backoff, by design, would slow down the later runs of a row).
        sandbox.write(
            "plasmavmc.toml",
            &format!("[timeouts]\nstop = \"5s\"\n\n[restart]\nwindow = \"2s\"\n\n{settings}"),
        )?;
        for host in HOSTS {
            sandbox.write(
                &format!("hosts/{host}.toml"),
                &sandbox.host_toml(host, host != "hv3"),
            )?;
        }
        sandbox.commit("drill hosts")?;
        Ok(sandbox)
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn repo_dir(&self) -> PathBuf {
        self.root().join("repo")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root().join("state")
    }

    pub fn host_root(&self, host: &str) -> PathBuf {
        self.root().join("hosts").join(host)
    }

    /// Commits `host` in maintenance (`on`) or active again.
    pub fn set_maintenance(&self, host: &str, on: bool) -> Result<()> {
        let mut text = self.host_toml(host, host != "hv3");
        if on {
            text.push_str("state = \"maintenance\"\n");
        }
        self.write(&format!("hosts/{host}.toml"), &text)?;
        let word = if on { "in maintenance" } else { "active" };
        self.commit(&format!("drill: {host} {word}"))
    }

    fn host_toml(&self, host: &str, fenced: bool) -> String {
        let root = self.host_root(host);
        let script = starter(&self.exe, &root);
        let mut text = format!(
            "exec = [\"sh\", \"-c\", {}]\nmemory_mb = 2048\nvcpus = 8\nshared_storage = {:?}\nstorage_pool = \"drill\"\n",
            toml::Value::String(script),
            self.root().join("shared").display().to_string()
        );
        if fenced {
            let _ = writeln!(
                text,
                "fence = [\"sh\", {:?}, {:?}]",
                self.root().join("fence.sh").display().to_string(),
                root.display().to_string()
            );
        }
        text
    }

    /// Writes `rel` in the repository's working tree.
    pub fn write(&self, rel: &str, text: &str) -> Result<()> {
        let path = self.repo_dir().join(rel);
        fs::create_dir_all(path.parent().expect("a file in a folder"))?;
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    pub fn remove(&self, rel: &str) -> Result<()> {
        fs::remove_file(self.repo_dir().join(rel)).with_context(|| format!("removing {rel}"))
    }

    /// Commits the working tree (additions, edits, removals) on the current branch.
    pub fn commit(&self, message: &str) -> Result<()> {
        let mut index = self.repo.index()?;
        index.add_all(["*"], git2::IndexAddOption::DEFAULT, None)?;
        index.update_all(["*"], None)?;
        index.write()?;
        let tree = self.repo.find_tree(index.write_tree()?)?;
        let sig = git2::Signature::now("plasmavmc drill", "drill@plasmavmc.invalid")?;
        let parent = self.repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        self.repo
            .commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)?;
        Ok(())
    }

    /// A VM spec booting the drill's guest with `extra` fields, `cmdline` knobs (the
    /// test guest only) and a data disk on `disk` storage. An image is the VM's first
    /// disk, on the same storage as its data disk (shared: recoverable elsewhere).
    pub fn vm_toml(&self, extra: &str, cmdline: &str, disk: Option<&str>) -> String {
        self.vm_toml_mb(self.memory_mb, extra, cmdline, disk)
    }

    /// [`Sandbox::vm_toml`] with `memory_mb` of its own.
    pub fn vm_toml_mb(
        &self,
        memory_mb: u64,
        extra: &str,
        cmdline: &str,
        disk: Option<&str>,
    ) -> String {
        spec_text(&self.guest, memory_mb, extra, cmdline, disk)
    }

    /// [`Sandbox::vm_toml`] booting `guest` instead of the sandbox's, without a disk.
    pub fn vm_toml_booting(&self, guest: &Guest, extra: &str, cmdline: &str) -> String {
        spec_text(guest, self.memory_mb, extra, cmdline, None)
    }

    // ---- the daemon ---------------------------------------------------------------

    /// Starts `plasmavmc watch` on the sandbox; returns when it logged its first
    /// reconcile.
    pub fn start_watch(&mut self) -> Result<SystemTime> {
        self.watches += 1;
        let log = self.root().join(format!("watch-{}.log", self.watches));
        let file = fs::File::create(&log)?;
        let started = SystemTime::now();
        let child = Command::new(&self.exe)
            .args([
                "watch",
                "--log-format",
                "json",
                "--interval",
                "5s",
                "--repo",
            ])
            .arg(self.repo_dir())
            .arg("--state-dir")
            .arg(self.state_dir())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("starting plasmavmc watch")?;
        self.watch = Some((child, log));
        self.wait_log(
            "the daemon's first reconcile",
            Duration::from_secs(60),
            0,
            |l| l.is("reconcile", None),
        )?;
        Ok(started)
    }

    /// True while the daemon this sandbox started runs.
    pub fn watch_running(&mut self) -> bool {
        self.watch
            .as_mut()
            .is_some_and(|(child, _)| matches!(child.try_wait(), Ok(None)))
    }

    /// kill -9 of the daemon (its agents see EOF and exit; every QEMU keeps running).
    pub fn kill_watch(&mut self) {
        if let Some((mut child, _)) = self.watch.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Every line the current daemon logged.
    pub fn log(&self) -> Vec<LogLine> {
        let Some((_, path)) = &self.watch else {
            return Vec::new();
        };
        let text = fs::read(path).unwrap_or_default();
        super::log::lines(&String::from_utf8_lossy(&text))
    }

    /// Waits for a log line (from index `since`) matching `pred`.
    pub fn wait_log(
        &self,
        what: &str,
        timeout: Duration,
        since: usize,
        mut pred: impl FnMut(&LogLine) -> bool,
    ) -> Result<LogLine> {
        let mut found = None;
        wait(what, timeout, || {
            found = self.log().into_iter().skip(since).find(|l| pred(l));
            found.is_some()
        })?;
        Ok(found.expect("found"))
    }

    // ---- what runs ------------------------------------------------------------------

    /// QEMUs of `vm` anywhere in the sandbox, by host.
    pub fn qemus_of(&self, vm: &str) -> Vec<(String, i32)> {
        qemus_of(self.root(), vm)
    }

    /// Every QEMU of the sandbox (one look at `/proc`).
    pub fn qemus(&self) -> Vec<Qemu> {
        qemus(self.root())
    }

    /// Every QEMU under `host`'s root.
    pub fn host_qemus(&self, host: &str) -> Vec<i32> {
        qemus_in(&self.host_root(host))
    }

    /// Remembers that `vm`'s guest found boot count `n` on its disk; returns the highest
    /// count seen so far.
    pub fn saw_boots(&self, vm: &str, n: Option<u64>) -> Option<u64> {
        let mut seen = self.boots_seen.lock().expect("boots_seen");
        if let Some(n) = n {
            let best = seen.entry(vm.to_owned()).or_default();
            *best = (*best).max(n);
        }
        seen.get(vm).copied()
    }

    pub fn serial(&self, host: &str, vm: &str) -> String {
        fs::read(serial_path(self.root(), host, vm))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The VM's status file.
    pub fn vm_status(&self, vm: &str) -> Option<crate::status::VmStatus> {
        let state = crate::records::StateDir::at(&self.state_dir());
        crate::status::StatusDir::new(&state.status_dir())
            .vm(vm)
            .ok()
            .flatten()
    }

    /// Where the status says `vm`'s QEMU runs (`running`, or `unhealthy`).
    pub fn running_on(&self, vm: &str) -> Option<String> {
        let s = self.vm_status(vm)?;
        s.phase.runs_qemu().then_some(s.host).flatten()
    }

    // ---- faults ---------------------------------------------------------------------

    /// The agent process serving `host` (its command line names the host's root).
    pub fn agent_of(&self, host: &str) -> Option<i32> {
        let root = self.host_root(host).display().to_string();
        all_pids().into_iter().find(|&pid| {
            let args = cmdline(pid);
            args.iter().any(|a| a == "agent") && args.contains(&root)
        })
    }

    /// Power-off: the host cannot start an agent any more; every process of it (agents,
    /// agents being started, QEMUs) dies.
    pub fn power_off(&self, host: &str) -> Result<()> {
        power_off(&self.host_root(host))
    }

    /// Forgets that `host`'s fence command ran (a new episode of the host away begins).
    pub fn unfence(&self, host: &str) {
        let _ = fs::remove_file(fenced_marker(&self.host_root(host)));
    }

    /// Power back on: agents may start again.
    pub fn power_on(&self, host: &str) {
        let _ = fs::remove_file(marker(&self.host_root(host)));
    }

    /// Partition: the host's agent is frozen (SIGSTOP); its QEMUs run on.
    pub fn partition(&self, host: &str) -> Result<i32> {
        let agent = self.agent_of(host).context("no agent serves the host")?;
        kill(Pid::from_raw(agent), Signal::SIGSTOP)?;
        Ok(agent)
    }

    /// `plasmavmc fence confirm HOST`, as the operator runs it.
    pub fn fence_confirm(&self, host: &str) -> Result<()> {
        let out = Command::new(&self.exe)
            .args(["fence", "confirm", host, "--repo"])
            .arg(self.repo_dir())
            .arg("--state-dir")
            .arg(self.state_dir())
            .output()?;
        if !out.status.success() {
            bail!(
                "fence confirm {host} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill_watch();
        if std::env::var_os("PLASMAVMC_DRILL_KEEP").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("PLASMAVMC_DRILL_KEEP: kept {}", self.root().display());
        }
        for host in HOSTS {
            kill_all(&host_processes(&self.host_root(host)));
        }
    }
}

/// The spec text of a VM booting `guest` (see [`Sandbox::vm_toml`]).
fn spec_text(
    guest: &Guest,
    memory_mb: u64,
    extra: &str,
    cmdline: &str,
    disk: Option<&str>,
) -> String {
    let mut text = format!(
        "memory_mb = {memory_mb}\nrestart = \"always\"\n{extra}\n[qemu]\naccel = \"tcg\"\n"
    );
    let storage = disk
        .map(|s| format!("storage = {s:?}\n"))
        .unwrap_or_default();
    match guest {
        Guest::Kernel { kernel, initrd } => {
            let _ = write!(
                text,
                "\n[boot]\nkernel = {:?}\ninitrd = {:?}\ncmdline = \"console=ttyS0 quiet panic=-1 {cmdline}\"\n",
                kernel.display().to_string(),
                initrd.display().to_string(),
            );
        }
        Guest::Image { image } => {
            let _ = write!(
                text,
                "\n[[disks]]\nname = \"root\"\nimage = {:?}\n{storage}",
                image.display().to_string()
            );
        }
    }
    if disk.is_some() {
        let _ = write!(text, "\n[[disks]]\nname = \"data\"\nsize_gb = 1\n{storage}");
    }
    text
}

/// The power-off marker of the host on `root`: while it exists, no agent starts there.
fn marker(root: &Path) -> PathBuf {
    PathBuf::from(format!("{}.off", root.display()))
}

/// Written by the fence command of the host on `root` once it killed the host's QEMUs.
fn fenced_marker(root: &Path) -> PathBuf {
    PathBuf::from(format!("{}.fenced", root.display()))
}

/// True once the fence command of `host` of the sandbox at `root` ran (since its
/// marker was last removed).
pub fn fence_ran(root: &Path, host: &str) -> bool {
    fenced_marker(&root.join("hosts").join(host)).exists()
}

/// The console of `vm` on `host` of the sandbox at `root`.
pub fn serial_path(root: &Path, host: &str, vm: &str) -> PathBuf {
    root.join("hosts")
        .join(host)
        .join("vms")
        .join(vm)
        .join("serial.log")
}

/// The `sh -c` script that starts the agent of the host on `root`: it enters the root
/// first (from then on it is one of the host's processes, see [`host_processes`]),
/// refuses while the power-off marker exists, then becomes the agent.
fn starter(exe: &Path, root: &Path) -> String {
    format!(
        "mkdir -p '{r}' && cd '{r}' || exit 1; test -e '{m}' && {{ echo 'host powered off' >&2; exit 1; }}; exec '{e}' agent --stdio --root '{r}'",
        r = root.display(),
        m = marker(root).display(),
        e = exe.display(),
    )
}

/// Powers the host on `root` off: writes its marker, then kills its processes until
/// none is left. Every process that entered the root before the marker existed is
/// seen (its working directory is there); any other one checks the marker after it
/// enters the root, finds it and exits: none can be left serving the host.
fn power_off(root: &Path) -> Result<()> {
    fs::write(marker(root), b"")?;
    wait(
        "the host's processes to die",
        Duration::from_secs(10),
        || {
            let left = host_processes(root);
            kill_all(&left);
            left.is_empty()
        },
    )
}

/// SIGCONT (a partitioned agent is stopped) then SIGKILL to each of `pids`.
fn kill_all(pids: &[i32]) {
    for &pid in pids {
        let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Live processes (not zombies) whose working directory is `root` or under it.
fn host_processes(root: &Path) -> Vec<i32> {
    let Ok(root) = root.canonicalize() else {
        return Vec::new();
    };
    all_pids()
        .into_iter()
        .filter(|&pid| {
            fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(&root))
                && u32::try_from(pid)
                    .is_ok_and(|p| crate::qemu::process::proc_state(p).is_some_and(|s| s != 'Z'))
        })
        .collect()
}

/// Kills every QEMU whose working directory is under the root given as `$1` (an
/// instance folder of that host), notes it ran (`$1.fenced`), then exits 0: the host is
/// "powered off".
const FENCE_SCRIPT: &str = r#"root=$1
for d in /proc/[0-9]*; do
  cwd=$(readlink "$d/cwd" 2>/dev/null) || continue
  case "$cwd" in "$root"/*) ;; *) continue ;; esac
  case "$(tr '\0' ' ' < "$d/cmdline" 2>/dev/null)" in
    *qemu-system*) kill -9 "${d#/proc/}" 2>/dev/null ;;
  esac
done
: > "$root.fenced"
exit 0
"#;

/// Polls `cond` every 20 ms until it holds, or fails after `timeout` naming `what`.
pub fn wait(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    super::poll::poll_every(super::POLL, what, timeout, || cond().then_some(()))
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Live QEMUs whose working directory is under `dir` (the engine's own scan).
fn qemus_in(dir: &Path) -> Vec<i32> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    crate::qemu::process::qemus_in(&dir)
        .into_iter()
        .filter_map(|(pid, _)| i32::try_from(pid).ok())
        .collect()
}

/// A QEMU of the sandbox: the host and VM whose instance folder it runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qemu {
    pub host: &'static str,
    pub vm: String,
    pub pid: i32,
}

impl Qemu {
    /// True when it was started as a live migration's target (`-incoming`): it waits for
    /// a guest's state instead of booting one (and keeps the flag once it has it).
    pub fn incoming(&self) -> bool {
        cmdline(self.pid).iter().any(|a| a == "-incoming")
    }
}

/// Every QEMU of the sandbox at `root`, by the instance folder it runs in
/// (`hosts/<host>/vms/<vm>/`), from one look at `/proc`.
pub fn qemus(root: &Path) -> Vec<Qemu> {
    let Ok(hosts) = root.join("hosts").canonicalize() else {
        return Vec::new();
    };
    crate::qemu::process::qemus_in(&hosts)
        .into_iter()
        .filter_map(|(pid, cwd)| {
            let mut parts = cwd.strip_prefix(&hosts).ok()?.iter();
            let host = parts.next()?.to_str()?;
            let host = HOSTS.into_iter().find(|h| *h == host)?;
            (parts.next()? == "vms").then_some(())?;
            let vm = parts.next()?.to_str()?.to_owned();
            Some(Qemu {
                host,
                vm,
                pid: i32::try_from(pid).ok()?,
            })
        })
        .collect()
}

/// QEMUs of `vm` in the sandbox at `root` (their cwd is its instance folder on a host).
pub fn qemus_of(root: &Path, vm: &str) -> Vec<(String, i32)> {
    qemus(root)
        .into_iter()
        .filter(|q| q.vm == vm)
        .map(|q| (q.host.to_owned(), q.pid))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// Children killed (resumed first) and reaped however the test ends.
    struct Reap(Vec<Child>);

    impl Drop for Reap {
        fn drop(&mut self) {
            for child in &mut self.0 {
                // Not reaped yet, so its pid is still its own.
                if let (Ok(None), Ok(pid)) = (child.try_wait(), i32::try_from(child.id())) {
                    kill_all(&[pid]);
                }
                let _ = child.wait();
            }
        }
    }

    fn start(script: &str) -> Result<Child> {
        Ok(Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?)
    }

    /// The flake this catches: the drill saw `app` unknown and powered hv3 off just as
    /// the daemon, having given up on hv3's stopped agent, started a new one. That one
    /// had passed the marker check and took the root's lock once the stopped agent was
    /// killed; power-off killed only the agent it saw first, so hv3 answered again,
    /// restarted `app` there, and the operator's `fence confirm` was void.
    #[test]
    fn power_off_kills_every_agent_and_no_agent_starts_after_it() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().join("hosts").join("hv3");
        // The agent: it reads its stdin (kept open) until it is killed.
        let exe = tmp.path().join("agent.sh");
        fs::write(&exe, "#!/bin/sh\nread -r request\n")?;
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o755))?;
        let script = starter(&exe, &root);
        // The partitioned agent (stopped), and the one the daemon was starting.
        let agents = Reap(vec![start(&script)?, start(&script)?]);
        wait("both agents to run", Duration::from_secs(10), || {
            host_processes(&root).len() == 2
        })?;
        let stopped = i32::try_from(agents.0[0].id())?;
        kill(Pid::from_raw(stopped), Signal::SIGSTOP)?;
        // A start that runs its script once the power-off is over.
        let go = tmp.path().join("go");
        let mut late = Reap(vec![start(&format!(
            "while ! test -e '{}'; do sleep 0.01; done; {script}",
            go.display()
        ))?]);

        power_off(&root)?;
        assert!(host_processes(&root).is_empty());
        fs::write(&go, b"")?;
        let status = late.0[0].wait()?;
        assert_eq!(
            status.code(),
            Some(1),
            "a start after the power-off must fail"
        );
        assert!(host_processes(&root).is_empty());
        Ok(())
    }
}
