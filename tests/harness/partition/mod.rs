//! Partitions at a chosen step: fail points that hold the engine (`pause`) or freeze an
//! agent (`freeze`) exactly where a test wants a host cut off, and a watch on where a VM
//! shows up meanwhile.
//!
//! - Engine points go in the daemon's `FAILPOINTS` ([`TestRepo::watch_failing`]):
//!   `<point>=1*return(pause)` makes the daemon write
//!   `<tmp>/failpoints/<point>.paused` and wait until the test removes it
//!   ([`TestRepo::wait_paused`], [`TestRepo::release`]) — meanwhile the test freezes the
//!   agent the next call goes to.
//! - Agent points must reach one agent process only: an agent the daemon starts again
//!   after a partition would inherit the daemon's `FAILPOINTS` and freeze a second time
//!   on the retried step. So the daemon gets none for agents; a [`partition_host`]'s
//!   agent is started through a script that reads its `FAILPOINTS` from
//!   `<tmp>/failpoints/<host>.agent` when that file exists ([`TestRepo::arm_agent`]).
//!   The test removes the file once the agent froze ([`TestRepo::wait_self_frozen`]).
//! - [`Strays`] samples where a VM has an instance folder or a QEMU, and records every
//!   one on a host outside the ones allowed: the invariant "a VM whose host is cut off
//!   is started nowhere else".
//! - [`Flow`] runs one partition scenario of one VM from a commit to an empty plan
//!   ([`flow`]'s doc says how).

mod flow;

pub use flow::{apply, cluster, first_boot_counted, Copies, End, Flow, Window, HEARTBEAT, WINDOW};

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::daemon::Daemon;
use crate::proc;
use crate::repo::TestRepo;
use crate::spec::{shell_quote, HostSpec};
use crate::wait::poll_every;

/// How often the partition helpers sample while they wait.
pub const SAMPLE: Duration = Duration::from_millis(20);

/// Writes `hosts/<name>.toml` for a simulated host that can be powered off (see
/// [`TestRepo::power_off`]), has no fence command (an operator must confirm its loss),
/// offers `memory_mb`, sees the shared folder in pool `pool1` when `shared`, and whose
/// agent takes its fail points from [`TestRepo::arm_agent`] only.
pub fn partition_host(repo: &TestRepo, name: &str, memory_mb: u64, shared: bool) -> Result<()> {
    fs::create_dir_all(repo.failpoint_dir())?;
    let bin = crate::artifacts::binary()?;
    let root = repo.host_root(name);
    let marker = HostSpec::power_marker(&root);
    let armed = repo.failpoint_dir().join(format!("{name}.agent"));
    let q = |p: &std::path::Path| shell_quote(&p.display().to_string());
    let script = format!(
        "test -e {m} && {{ echo \"host powered off: {name}\" >&2; exit 1; }}; \
         if test -e {a}; then FAILPOINTS=$(cat {a}); export FAILPOINTS; else unset FAILPOINTS; fi; \
         exec {b} agent --stdio --root {r}",
        m = q(&marker),
        a = q(&armed),
        b = q(&bin),
        r = q(&root),
    );
    let mut spec = HostSpec::exec(&["sh", "-c", &script]).memory(memory_mb);
    if shared {
        spec = spec.shared(&repo.shared_dir(), crate::fault::SHARED_POOL);
    }
    repo.write_host(name, &spec)
}

impl TestRepo {
    /// `<tmp>/failpoints`: the daemon's `PLASMAVMC_FAILPOINT_DIR` and the agents' arm files.
    pub fn failpoint_dir(&self) -> PathBuf {
        self.root().join("failpoints")
    }

    /// [`Self::watch`] with `FAILPOINTS=<point>=1*return(pause)` for an engine point, or
    /// without `FAILPOINTS` (`None`), and `PLASMAVMC_FAILPOINT_DIR` set either way.
    pub fn watch_failing(&self, point: Option<&str>) -> Result<Daemon<'_>> {
        fs::create_dir_all(self.failpoint_dir())?;
        let mut cmd = self.command(&["watch", "--log-format", "json"]);
        cmd.env_remove("RUST_LOG")
            .env("PLASMAVMC_FAILPOINT_DIR", self.failpoint_dir());
        match point {
            Some(p) => cmd.env("FAILPOINTS", format!("{p}=1*return(pause)")),
            None => cmd.env_remove("FAILPOINTS"),
        };
        let name = format!("watch-{}", point.unwrap_or("plain"));
        Daemon::spawn(self, cmd, &name)
    }

    /// Makes the next agent started for `host` freeze itself at agent point `point`
    /// (`1*return(freeze)`), until [`Self::disarm_agent`].
    pub fn arm_agent(&self, host: &str, point: &str) -> Result<()> {
        fs::create_dir_all(self.failpoint_dir())?;
        let file = self.failpoint_dir().join(format!("{host}.agent"));
        fs::write(&file, format!("{point}=1*return(freeze)"))
            .with_context(|| format!("writing {}", file.display()))
    }

    /// Agents started for `host` from now on have no fail point.
    pub fn disarm_agent(&self, host: &str) -> Result<()> {
        let file = self.failpoint_dir().join(format!("{host}.agent"));
        match fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", file.display()))
            }
            _ => Ok(()),
        }
    }

    /// The file a daemon paused at `point` waits on.
    fn pause_file(&self, point: &str) -> PathBuf {
        self.failpoint_dir().join(format!("{point}.paused"))
    }

    /// Waits until `daemon` is paused at engine point `point`, calling `each` at every
    /// poll (every [`SAMPLE`]).
    pub fn wait_paused(
        &self,
        daemon: &Daemon<'_>,
        point: &str,
        timeout: Duration,
        mut each: impl FnMut(),
    ) -> Result<()> {
        let file = self.pause_file(point);
        daemon.poll_every(
            SAMPLE,
            format!("the daemon to pause at {point}"),
            timeout,
            || {
                each();
                file.exists().then_some(())
            },
        )
    }

    /// Lets a daemon paused at `point` go on.
    pub fn release(&self, point: &str) -> Result<()> {
        let file = self.pause_file(point);
        fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))
    }

    /// Waits until an agent of `host` stopped itself (at an armed agent point), calling
    /// `each` at every poll; remembers it as stopped (the cleanup resumes it) and
    /// returns its pid.
    pub fn wait_self_frozen(
        &self,
        daemon: &Daemon<'_>,
        host: &str,
        timeout: Duration,
        mut each: impl FnMut(),
    ) -> Result<i32> {
        let pid = daemon.poll_every(
            SAMPLE,
            format!("an agent of {host} to freeze itself"),
            timeout,
            || {
                each();
                self.host_agents(host)
                    .into_iter()
                    .find(|&pid| proc::state(pid) == Some('T'))
            },
        )?;
        self.remember_stopped(pid);
        Ok(pid)
    }
}

/// Where one VM showed up (an instance folder, a live QEMU) on hosts it must not be on.
#[derive(Debug)]
pub struct Strays<'r> {
    repo: &'r TestRepo,
    vm: String,
    allowed: Vec<String>,
    /// Every QEMU of the VM sampled, with its host.
    seen: BTreeMap<i32, String>,
    found: Vec<String>,
    samples: usize,
}

impl<'r> Strays<'r> {
    /// Watches `vm`, which may be on `allowed` hosts only.
    pub fn new(repo: &'r TestRepo, vm: &str, allowed: &[&str]) -> Self {
        Self {
            repo,
            vm: vm.to_owned(),
            allowed: allowed.iter().map(|&h| h.to_owned()).collect(),
            seen: BTreeMap::new(),
            found: Vec::new(),
            samples: 0,
        }
    }

    /// Takes one sample.
    pub fn sample(&mut self) {
        self.samples += 1;
        let roots: Vec<(String, PathBuf)> = self
            .repo
            .host_roots()
            .into_iter()
            .map(|(h, r)| (h, r.canonicalize().unwrap_or(r)))
            .collect();
        for pid in self.repo.qemus_of(&self.vm) {
            if self.seen.contains_key(&pid) {
                continue;
            }
            let cwd = proc::cwd(pid).unwrap_or_default();
            let host = roots
                .iter()
                .find(|(_, r)| cwd.starts_with(r))
                .map_or_else(|| format!("? (cwd {})", cwd.display()), |(h, _)| h.clone());
            if !self.allowed.contains(&host) {
                self.found
                    .push(format!("QEMU {pid} of {} on {host}", self.vm));
            }
            self.seen.insert(pid, host);
        }
        for host in self.repo.hosts_with_instance(&self.vm) {
            let what = format!("an instance folder of {} on {host}", self.vm);
            if !self.allowed.contains(&host) && !self.found.contains(&what) {
                self.found.push(what);
            }
        }
    }

    /// The host a sampled QEMU ran on.
    pub fn host_of(&self, pid: i32) -> Option<&str> {
        self.seen.get(&pid).map(String::as_str)
    }

    /// Fails naming every stray seen.
    pub fn ensure_none(&self) -> Result<()> {
        if !self.found.is_empty() {
            bail!(
                "{} showed up outside {:?} ({} samples): {}",
                self.vm,
                self.allowed,
                self.samples,
                self.found.join("; ")
            );
        }
        Ok(())
    }
}

impl Daemon<'_> {
    /// [`Daemon::poll`] every `period`.
    pub fn poll_every<T>(
        &self,
        period: Duration,
        what: impl std::fmt::Display,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> Result<T> {
        let found = poll_every(period, &what, timeout, || {
            if let Some(value) = check() {
                return Some(Some(value));
            }
            (!self.is_running()).then_some(None)
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.describe()))?;
        found.ok_or_else(|| {
            anyhow::anyhow!(
                "the daemon exited while waiting for {what}\n{}",
                self.describe()
            )
        })
    }
}
