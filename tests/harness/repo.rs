//! [`TestRepo`]: one test's world — a temp folder holding a git repository (`repo/`)
//! and a state dir (`state/`) — plus the binary run against them.
//!
//! Simulated hosts (`hosts/<name>.toml` with an `exec` of the binary's agent, see
//! [`TestRepo::write_host`]) keep their roots in `<tmp>/hosts/<name>`; the implicit
//! host `local` keeps its root in `state/local`.
//!
//! Dropping it kills every process it owns: each QEMU named by a
//! `<host root>/vms/*/qemu.pid` whose cwd or argv points into the temp folder, and
//! any other process (engine, agent, orphaned QEMU) whose cwd or argv does; then it
//! unmounts every filesystem the test mounted there. Set `PLASMAVMC_E2E_KEEP=1` to
//! keep the temp folder for a post-mortem.

use std::cell::{Cell, RefCell};
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use git2::{IndexAddOption, Repository, RepositoryInitOptions, Signature, Time};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::artifacts::{self, Guest};
use crate::daemon::Daemon;
use crate::proc;
use crate::run::{Output, Running};
use crate::spec::{HostSpec, VmSpec};
use crate::wait::{poll_for, wait_for};
use crate::RUN_TIMEOUT;

/// Subcommands that take `--repo`; those also in [`TAKES_STATE`] take `--state-dir`.
/// `fence` means its subcommand (`fence confirm`), which takes both.
const TAKES_REPO: &[&str] = &[
    "validate", "plan", "apply", "status", "watch", "fence", "drill", "console", "logs", "disks",
];
const TAKES_STATE: &[&str] = &[
    "plan", "apply", "status", "watch", "fence", "drill", "console", "logs", "disks",
];

/// Bound for agents to exit once their engine is gone (EOF on their stdin).
const AGENT_EXIT: Duration = Duration::from_secs(10);

/// The branch every test repository is on.
pub const BRANCH: &str = "main";

/// A git repository and a state dir in a temp folder, and the binary to run on them.
#[derive(Debug)]
pub struct TestRepo {
    tmp: TempDir,
    guest: Guest,
    bin: PathBuf,
    commits: Cell<i64>,
    /// Process groups of the daemons started with [`TestRepo::watch`].
    daemon_groups: RefCell<Vec<i32>>,
    daemons: Cell<u32>,
    /// Processes this test stopped (SIGSTOP) and has not resumed yet: resumed
    /// (SIGCONT) before anything is killed.
    stopped: RefCell<Vec<i32>>,
    /// Filesystems this test mounted (see `space`): unmounted last by the cleanup.
    mounts: RefCell<Vec<PathBuf>>,
}

impl TestRepo {
    /// A fresh repository whose working tree holds `plasmavmc.toml` with a 2 s stop
    /// timeout (short, for guests started with `plasmavmc.ignore_acpi=1`), nothing
    /// committed yet.
    pub fn new() -> Result<Self> {
        let bin = artifacts::binary()?;
        let guest = artifacts::guest()?;
        let tmp = tempfile::Builder::new()
            .prefix("plasmavmc-e2e-")
            .tempdir()
            .context("creating temp dir")?;
        // The branch is `main` whatever git's `init.defaultBranch` says: `watch` of a
        // URL follows `main` by default.
        Repository::init_opts(
            tmp.path().join("repo"),
            RepositoryInitOptions::new().initial_head(BRANCH),
        )
        .context("git init")?;
        let repo = Self {
            tmp,
            guest,
            bin,
            commits: Cell::new(0),
            daemon_groups: RefCell::new(Vec::new()),
            daemons: Cell::new(0),
            stopped: RefCell::new(Vec::new()),
            mounts: RefCell::new(Vec::new()),
        };
        repo.set_stop_timeout("2s")?;
        Ok(repo)
    }

    /// A fresh repository with `vms/<vm>.toml` committed (nothing applied).
    pub fn with_vm(vm: &str, spec: &VmSpec) -> Result<Self> {
        let repo = Self::new()?;
        repo.write_vm(vm, spec)?;
        repo.commit(&format!("add {vm}"))?;
        Ok(repo)
    }

    /// The temp folder holding everything.
    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// The git working tree.
    pub fn repo_dir(&self) -> PathBuf {
        self.root().join("repo")
    }

    /// The state dir passed as `--state-dir`.
    pub fn state_dir(&self) -> PathBuf {
        self.root().join("state")
    }

    pub fn guest(&self) -> &Guest {
        &self.guest
    }

    // ---- the repository -------------------------------------------------------

    /// Writes `text` to `path` (relative to the working tree), creating folders.
    pub fn write(&self, path: &str, text: &str) -> Result<()> {
        let full = self.repo_dir().join(path);
        if let Some(parent) = full.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&full, text).with_context(|| format!("writing {}", full.display()))
    }

    /// Removes `path` from the working tree.
    pub fn remove(&self, path: &str) -> Result<()> {
        let full = self.repo_dir().join(path);
        fs::remove_file(&full).with_context(|| format!("removing {}", full.display()))
    }

    /// Writes `vms/<name>.toml`.
    pub fn write_vm(&self, name: &str, spec: &VmSpec) -> Result<()> {
        self.write(&format!("vms/{name}.toml"), &spec.to_toml(&self.guest))
    }

    /// Writes `hosts/<name>.toml`; unless `spec` says otherwise its agent is the
    /// binary under test on [`Self::host_root`]`(name)`.
    pub fn write_host(&self, name: &str, spec: &HostSpec) -> Result<()> {
        let text = spec.to_toml(&self.bin, &self.host_root(name));
        self.write(&format!("hosts/{name}.toml"), &text)
    }

    /// Writes `plasmavmc.toml` with `[timeouts] stop = <stop>`.
    pub fn set_stop_timeout(&self, stop: &str) -> Result<()> {
        self.write("plasmavmc.toml", &format!("[timeouts]\nstop = {stop:?}\n"))
    }

    /// Writes `plasmavmc.toml` with `[timeouts] stop = "2s"` followed by `extra`
    /// (e.g. a `[restart]` table).
    pub fn set_cluster_settings(&self, extra: &str) -> Result<()> {
        self.write(
            "plasmavmc.toml",
            &format!("[timeouts]\nstop = \"2s\"\n\n{extra}"),
        )
    }

    /// Stages every change of the working tree (additions, edits, removals) and
    /// commits it with a fixed author; returns the commit id.
    pub fn commit(&self, message: &str) -> Result<String> {
        let git = Repository::open(self.repo_dir()).context("opening the test repository")?;
        let (tree, who) = self.stage(&git)?;
        let parent = match git.head() {
            Ok(head) => Some(head.peel_to_commit()?),
            Err(_) => None,
        };
        let parents: Vec<_> = parent.iter().collect();
        let id = git.commit(Some("HEAD"), &who, &who, message, &tree, &parents)?;
        Ok(id.to_string())
    }

    /// Like [`TestRepo::commit`] on top of an existing commit, but writes the commit
    /// object first and moves the branch last: returns the id and the wall clock just
    /// before the branch ref moved (what a daemon watching the refs reacts to).
    pub fn commit_timed(&self, message: &str) -> Result<(String, SystemTime)> {
        let git = Repository::open(self.repo_dir()).context("opening the test repository")?;
        let (tree, who) = self.stage(&git)?;
        let head = git.head().context("commit_timed needs a first commit")?;
        let branch = head.name().context("HEAD names no branch")?.to_owned();
        let parent = head.peel_to_commit()?;
        let id = git.commit(None, &who, &who, message, &tree, &[&parent])?;
        let before = SystemTime::now();
        git.reference(&branch, id, true, &format!("commit: {message}"))?;
        Ok((id.to_string(), before))
    }

    /// Stages every change of the working tree; returns the tree and the next
    /// commit's fixed author.
    fn stage<'g>(&self, git: &'g Repository) -> Result<(git2::Tree<'g>, Signature<'static>)> {
        let mut index = git.index()?;
        index.add_all(["*"], IndexAddOption::DEFAULT, None)?;
        index.update_all(["*"], None)?;
        index.write()?;
        let tree = git.find_tree(index.write_tree()?)?;
        let n = self.commits.get() + 1;
        self.commits.set(n);
        let who = Signature::new(
            "PlasmaVMC E2E",
            "e2e@plasmavmc.invalid",
            &Time::new(1_700_000_000 + n * 60, 0),
        )?;
        Ok((tree, who))
    }

    // ---- running the binary ---------------------------------------------------

    /// The binary with `args`, plus `--repo` / `--state-dir` right after the
    /// subcommand when it takes them.
    pub fn command(&self, args: &[&str]) -> Command {
        self.command_on(self.repo_dir().as_os_str(), args)
    }

    /// [`Self::command`] with `--repo <repo>` (a path or a URL).
    fn command_on(&self, repo: &OsStr, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        let mut args = args.iter();
        if let Some(sub) = args.next() {
            cmd.arg(sub);
            if *sub == "fence" || (*sub == "disks" && args.as_slice().first() == Some(&"delete")) {
                // The flags belong to `fence confirm` (`disks delete`), not to `fence`.
                cmd.args(args.next());
            }
            if TAKES_REPO.contains(sub) {
                cmd.arg("--repo").arg(repo);
            }
            if TAKES_STATE.contains(sub) {
                cmd.arg("--state-dir").arg(self.state_dir());
            }
        }
        cmd.args(args)
            .current_dir(self.root())
            .env_remove("PLASMAVMC_STATE_DIR");
        cmd
    }

    /// Runs the binary to the end (killed after [`RUN_TIMEOUT`]).
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        Running::spawn(self.command(args))?.finish(RUN_TIMEOUT)
    }

    /// `plan --json <extra>`, parsed (it must exit 0).
    pub fn plan_json(&self, extra: &[&str]) -> Result<serde_json::Value> {
        let mut args = vec!["plan", "--json"];
        args.extend_from_slice(extra);
        let out = self.run(&args)?;
        out.expect_code(0)?;
        serde_json::from_str(&out.stdout).with_context(|| format!("plan --json is not JSON\n{out}"))
    }

    /// Starts the binary without waiting for it.
    pub fn spawn(&self, args: &[&str]) -> Result<Running> {
        Running::spawn(self.command(args))
    }

    /// Starts `plasmavmc watch --repo R --state-dir S --log-format json <extra>` as a
    /// [`Daemon`] (stderr in `<root>/watch-N.log`). `RUST_LOG` is removed from its
    /// environment: the daemon's default level must show its INFO lines.
    pub fn watch(&self, extra: &[&str]) -> Result<Daemon<'_>> {
        self.watch_on(self.repo_dir().as_os_str(), extra)
    }

    /// [`Self::watch`] of the repository at `url` (e.g. [`Self::file_url`]) instead of
    /// the working tree: the daemon keeps its own clone in the state dir.
    pub fn watch_url(&self, url: &str, extra: &[&str]) -> Result<Daemon<'_>> {
        self.watch_on(OsStr::new(url), extra)
    }

    fn watch_on(&self, repo: &OsStr, extra: &[&str]) -> Result<Daemon<'_>> {
        let n = self.daemons.get() + 1;
        self.daemons.set(n);
        let mut args = vec!["watch", "--log-format", "json"];
        args.extend_from_slice(extra);
        let mut cmd = self.command_on(repo, &args);
        cmd.env_remove("RUST_LOG");
        Daemon::spawn(self, cmd, &format!("watch-{n}"))
    }

    /// The repository as a `file://` URL.
    pub fn file_url(&self) -> String {
        format!("file://{}", self.repo_dir().display())
    }

    /// Remembers a daemon's process group, killed first by [`TestRepo::cleanup`].
    pub(crate) fn register_group(&self, pgid: i32) {
        self.daemon_groups.borrow_mut().push(pgid);
    }

    /// Forgets a daemon's process group once the daemon killed and reaped it (its id
    /// may be reused).
    pub(crate) fn unregister_group(&self, pgid: i32) {
        self.daemon_groups.borrow_mut().retain(|&g| g != pgid);
    }

    // ---- what the engine left behind ------------------------------------------

    /// `<tmp>/shared`: the shared storage folder of hosts in a storage pool (e.g.
    /// [`crate::fault::shared_failover_repo`]'s).
    pub fn shared_dir(&self) -> PathBuf {
        self.root().join("shared")
    }

    /// The root a simulated host `name` gets by default: `<tmp>/hosts/<name>`.
    pub fn host_root(&self, name: &str) -> PathBuf {
        self.root().join("hosts").join(name)
    }

    /// Every host root of this test that exists, by host name: `local`
    /// (`<state>/local`) first, then each `<tmp>/hosts/<name>` in name order.
    pub fn host_roots(&self) -> Vec<(String, PathBuf)> {
        let local = self.state_dir().join("local");
        let mut roots: Vec<(String, PathBuf)> = Vec::new();
        if local.is_dir() {
            roots.push(("local".to_owned(), local));
        }
        let mut simulated: Vec<(String, PathBuf)> = fs::read_dir(self.root().join("hosts"))
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().to_str()?.to_owned();
                e.path().is_dir().then(|| (name, e.path()))
            })
            .collect();
        simulated.sort();
        roots.extend(simulated);
        roots
    }

    /// The hosts (of [`Self::host_roots`]) that hold an instance folder for `vm`.
    pub fn hosts_with_instance(&self, vm: &str) -> Vec<String> {
        self.host_roots()
            .into_iter()
            .filter(|(_, root)| root.join("vms").join(vm).is_dir())
            .map(|(name, _)| name)
            .collect()
    }

    /// `<root of host>/vms/<vm>`: `<state>/local/vms/<vm>` for `local`,
    /// `<tmp>/hosts/<host>/vms/<vm>` otherwise.
    pub fn instance_dir_on(&self, host: &str, vm: &str) -> PathBuf {
        let root = if host == "local" {
            self.state_dir().join("local")
        } else {
            self.host_root(host)
        };
        root.join("vms").join(vm)
    }

    /// The VM's instance folder on the first host of [`Self::host_roots`] that has
    /// one; `<state>/local/vms/<vm>` when none has.
    pub fn instance_dir(&self, vm: &str) -> PathBuf {
        self.host_roots()
            .into_iter()
            .map(|(_, root)| root.join("vms").join(vm))
            .find(|dir| dir.is_dir())
            .unwrap_or_else(|| self.state_dir().join("local").join("vms").join(vm))
    }

    /// The pid in the VM's `qemu.pid`, if the file exists and parses.
    pub fn try_qemu_pid(&self, vm: &str) -> Option<i32> {
        fs::read_to_string(self.instance_dir(vm).join("qemu.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The pid in the VM's `qemu.pid`.
    pub fn qemu_pid(&self, vm: &str) -> Result<i32> {
        let path = self.instance_dir(vm).join("qemu.pid");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{} holds {text:?}", path.display()))
    }

    /// Every live QEMU whose working directory is the VM's instance folder, whether or
    /// not an instance record accounts for it (two would share the disks).
    pub fn qemus_in_folder(&self, vm: &str) -> Vec<i32> {
        proc::qemus_in(&self.instance_dir(vm))
    }

    /// `<state>/journal.json`, the plan of an apply in progress (or interrupted).
    pub fn journal_path(&self) -> PathBuf {
        self.state_dir().join("journal.json")
    }

    /// The journal, parsed; `None` while there is none (or it is caught mid-rename).
    pub fn journal(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&fs::read_to_string(self.journal_path()).ok()?).ok()
    }

    /// The guest's serial console of the current run (empty if none yet).
    pub fn serial(&self, vm: &str) -> String {
        read_lossy(&self.instance_dir(vm).join("serial.log"))
    }

    /// Waits until the serial log has a line containing `needle`.
    pub fn wait_serial(&self, vm: &str, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_serial_seq(vm, &[needle], timeout)
    }

    /// Waits until the serial log has lines containing each of `needles`, in order.
    pub fn wait_serial_seq(&self, vm: &str, needles: &[&str], timeout: Duration) -> Result<()> {
        let found = |log: &str| {
            let mut lines = log.lines();
            needles.iter().all(|n| lines.any(|l| l.contains(n)))
        };
        wait_for(
            format!("{needles:?} on the serial console of {vm}"),
            timeout,
            || found(&self.serial(vm)),
        )
        .map_err(|e| anyhow!("{e}\n{}", self.describe_vm(vm)))
    }

    /// A status file (`status/<rel>.toml`) as a table, `None` if absent.
    pub fn status_file(&self, rel: &str) -> Result<Option<toml::Table>> {
        read_table(&self.state_dir().join("status").join(format!("{rel}.toml")))
    }

    /// `status/vms/<vm>.toml`.
    pub fn vm_status(&self, vm: &str) -> Result<Option<toml::Table>> {
        self.status_file(&format!("vms/{vm}"))
    }

    /// `status/engine.toml`.
    pub fn engine_status(&self) -> Result<Option<toml::Table>> {
        self.status_file("engine")
    }

    /// The `phase` of `status/vms/<vm>.toml`, `None` if the file or field is absent.
    pub fn vm_phase(&self, vm: &str) -> Result<Option<String>> {
        Ok(self
            .vm_status(vm)?
            .and_then(|t| t.get("phase")?.as_str().map(str::to_owned)))
    }

    /// `status --json`, parsed.
    pub fn status_json(&self) -> Result<serde_json::Value> {
        let out = self.run(&["status", "--json"])?;
        out.expect_code(0)?;
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("status --json is not JSON\n{out}"))
    }

    /// Waits until the VM's QEMU (from `qemu.pid`) is alive; returns its pid.
    pub fn wait_qemu_alive(&self, vm: &str, timeout: Duration) -> Result<i32> {
        poll_for(format!("a live QEMU for {vm}"), timeout, || {
            self.try_qemu_pid(vm).filter(|&p| proc::is_alive(p))
        })
        .map_err(|e| anyhow!("{e}\n{}", self.describe_vm(vm)))
    }

    /// The VM's files, for failure messages: status, the tail of serial.log and
    /// qemu.log.
    pub fn describe_vm(&self, vm: &str) -> String {
        let dir = self.instance_dir(vm);
        let tail = |name: &str| {
            let text = read_lossy(&dir.join(name));
            let lines: Vec<_> = text.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        let status = read_lossy(
            &self
                .state_dir()
                .join("status/vms")
                .join(format!("{vm}.toml")),
        );
        format!(
            "--- {vm}: status ---\n{status}\n--- serial.log (tail) ---\n{}\n--- qemu.log (tail) ---\n{}",
            tail("serial.log"),
            tail("qemu.log")
        )
    }

    /// Every QEMU pid named by a `qemu.pid` under any host root of this test
    /// ([`Self::host_roots`]), owned by this test.
    pub fn qemu_pids(&self) -> Vec<i32> {
        self.host_roots()
            .into_iter()
            .flat_map(|(_, root)| fs::read_dir(root.join("vms")).into_iter().flatten())
            .filter_map(|e| {
                fs::read_to_string(e.ok()?.path().join("qemu.pid"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            })
            .filter(|&pid| self.owns(pid))
            .collect()
    }

    /// Every live `plasmavmc agent` whose `--root` is inside this test's temp folder
    /// (the agents of its simulated hosts and of `local`).
    pub fn agent_pids(&self) -> Vec<i32> {
        let root = self.root();
        proc::processes_under(root)
            .into_iter()
            .filter(|&pid| {
                proc::cmdline(pid).is_ok_and(|args| {
                    args.iter().skip(1).any(|a| a == "agent")
                        && proc::arg_value(&args, "--root")
                            .is_some_and(|r| Path::new(r).starts_with(root))
                })
            })
            .collect()
    }

    /// Waits until no agent of this test runs ([`Self::agent_pids`]): they exit once
    /// their engine is gone (`after` names what ended, for the message). Fails listing
    /// the agents left.
    pub fn wait_agents_exit(&self, after: &str) -> Result<()> {
        wait_for(
            format!("every agent to exit after {after}"),
            AGENT_EXIT,
            || self.agent_pids().is_empty(),
        )
        .with_context(|| {
            let left: Vec<String> = self
                .agent_pids()
                .into_iter()
                .map(|p| format!("{p}: {}", proc::cmdline(p).unwrap_or_default().join(" ")))
                .collect();
            format!("agents left: {left:?}")
        })
    }

    /// True if `pid` runs in, or names, this test's temp folder (not a reused pid).
    pub fn owns(&self, pid: i32) -> bool {
        let root = self.root();
        let needle = root.to_string_lossy().into_owned();
        proc::is_alive(pid)
            && (proc::cwd(pid).is_some_and(|c| c.starts_with(root))
                || proc::cmdline(pid).is_ok_and(|a| a.iter().any(|s| s.contains(&needle))))
    }

    /// Remembers a process the test stopped (SIGSTOP), resumed first by the cleanup.
    pub(crate) fn remember_stopped(&self, pid: i32) {
        self.stopped.borrow_mut().push(pid);
    }

    /// Forgets a stopped process once the test resumed or killed it itself.
    pub(crate) fn forget_stopped(&self, pid: i32) {
        self.stopped.borrow_mut().retain(|&p| p != pid);
    }

    /// SIGCONTs every process the test stopped and has not resumed (if it is still
    /// ours), so that nothing is killed while stopped.
    pub(crate) fn resume_stopped(&self) {
        let pids: Vec<i32> = self.stopped.borrow_mut().drain(..).collect();
        for pid in pids {
            if self.owns(pid) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGCONT);
            }
        }
    }

    /// Remembers a filesystem the test mounted, unmounted by the cleanup.
    pub(crate) fn remember_mount(&self, dir: &Path) {
        self.mounts.borrow_mut().push(dir.to_path_buf());
    }

    /// Kills everything this test owns and waits for it to be gone, then unmounts what
    /// it mounted (newest first).
    pub fn cleanup(&self) -> Result<()> {
        // Stopped processes are resumed before any SIGKILL.
        self.resume_stopped();
        // Daemons first, so none restarts a QEMU killed below.
        for &pgid in self.daemon_groups.borrow().iter() {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            let _ = wait_for("a daemon to die", Duration::from_secs(10), || {
                !proc::is_alive(pgid)
            });
        }
        let mut pids = self.qemu_pids();
        pids.extend(proc::processes_under(self.root()));
        pids.sort_unstable();
        pids.dedup();
        let mut errors = Vec::new();
        for pid in pids {
            if let Err(e) = proc::kill_and_wait(pid, Duration::from_secs(10)) {
                errors.push(e.to_string());
            }
        }
        let mounts: Vec<PathBuf> = self.mounts.borrow_mut().drain(..).rev().collect();
        for dir in mounts {
            if let Err(e) = crate::space::unmount(&dir) {
                errors.push(format!("{e:#}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("cleanup: {}", errors.join("; "))
        }
    }
}

impl Drop for TestRepo {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("{e:#}");
        }
        if std::env::var_os("PLASMAVMC_E2E_KEEP").is_some() {
            self.tmp.disable_cleanup(true);
            eprintln!("kept {}", self.root().display());
        }
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// A TOML file as a table, `None` if it does not exist.
pub fn read_table(path: &Path) -> Result<Option<toml::Table>> {
    match fs::read_to_string(path) {
        Ok(text) => {
            Ok(Some(text.parse().with_context(|| {
                format!("parsing {}:\n{text}", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}
