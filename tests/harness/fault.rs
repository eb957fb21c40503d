//! Host faults, simulated on this machine: a host powered off, a host cut off by a
//! network partition, fence commands, and a watch on how many copies of a VM run.
//!
//! A simulated host is its agent (`plasmavmc agent --stdio --root R`, spawned by the
//! engine) plus the QEMUs whose working directory is under `R`.
//! - Power-off ([`TestRepo::power_off`]): the host's power-off marker is created
//!   first (a [`HostSpec::switchable`] host's agent then refuses to start, as a host
//!   without power would not answer), then its agent and every QEMU under its root are
//!   killed. [`TestRepo::power_on`] removes the marker.
//! - Partition ([`TestRepo::partition`]): the agent is stopped (SIGSTOP), so the
//!   engine hears nothing while the QEMUs keep running and the agent keeps its root's
//!   lock, as a host cut off from the network would. [`TestRepo::resume`] sends
//!   SIGCONT; the cleanup resumes every stopped process before killing anything.
//! - Fence commands ([`TestRepo::fence_script`]): a script in the temp folder that
//!   logs each run and either kills every QEMU under the host's root ([`Fence::Kills`]:
//!   the host is powered off) or kills nothing ([`Fence::Lies`]: exit 0 all the same).
//! - [`CopyWatch`] samples the live QEMUs of one VM on every host: the invariant "never
//!   two at once", and how long two coexisted when a test breaks it on purpose; and,
//!   where two QEMUs of a VM exist by design (a live migration's source and target),
//!   whether both guests ever ran: their serial consoles grew in turns.
//! - [`failover_repo`] and its variants build the two-host repositories of these
//!   tests; [`shared_failover_repo`] puts both hosts in one storage pool sharing
//!   [`TestRepo::shared_dir`], so disks on shared storage are seen by both.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::daemon::Daemon;
use crate::proc;
use crate::repo::TestRepo;
use crate::run::Output;
use crate::spec::{shell_quote, HostSpec, VmSpec};
use crate::wait::{poll_for, wait_for};

/// Memory of the VMs of [`failover_repo`]: the least the test guest boots with.
pub const FAILOVER_VM_MB: u64 = 96;

/// A repository for host-loss scenarios, committed: hosts `hv1` (1024 MB, so unpinned
/// VMs land there first) and `hv2` (512 MB), both [`HostSpec::switchable`]; hv1 fenced
/// by `hv1_fence` (`None`: no fence command), hv2 by a fence that kills its QEMUs.
/// `vms` are `(name, ha)`, each [`FAILOVER_VM_MB`] MB without disks. `settings` is
/// appended to `plasmavmc.toml` (e.g. a `[heartbeat]` table; empty: the defaults).
pub fn failover_repo(
    hv1_fence: Option<Fence>,
    vms: &[(&str, bool)],
    settings: &str,
) -> Result<TestRepo> {
    let specs: Vec<(&str, VmSpec)> = vms
        .iter()
        .map(|&(vm, ha)| (vm, VmSpec::new().no_disks().memory(FAILOVER_VM_MB).ha(ha)))
        .collect();
    failover_repo_with(hv1_fence, &specs, settings)
}

/// [`failover_repo`] with VMs of any spec.
pub fn failover_repo_with(
    hv1_fence: Option<Fence>,
    vms: &[(&str, VmSpec)],
    settings: &str,
) -> Result<TestRepo> {
    build_failover_repo(hv1_fence, vms, settings, false)
}

/// [`failover_repo_with`] where both hosts are in storage pool [`SHARED_POOL`] with
/// the shared folder [`TestRepo::shared_dir`].
pub fn shared_failover_repo(
    hv1_fence: Option<Fence>,
    vms: &[(&str, VmSpec)],
    settings: &str,
) -> Result<TestRepo> {
    build_failover_repo(hv1_fence, vms, settings, true)
}

/// The storage pool of [`shared_failover_repo`]'s hosts.
pub const SHARED_POOL: &str = "pool1";

fn build_failover_repo(
    hv1_fence: Option<Fence>,
    vms: &[(&str, VmSpec)],
    settings: &str,
    shared: bool,
) -> Result<TestRepo> {
    let repo = TestRepo::new()?;
    repo.set_cluster_settings(settings)?;
    let pool = |host: HostSpec| {
        if shared {
            host.shared(&repo.shared_dir(), SHARED_POOL)
        } else {
            host
        }
    };
    let mut hv1 = pool(HostSpec::agent().switchable().memory(1024));
    if let Some(how) = hv1_fence {
        hv1 = hv1.fence(&repo.fence_script("hv1", how)?);
    }
    repo.write_host("hv1", &hv1)?;
    let hv2 = pool(HostSpec::agent().switchable().memory(512))
        .fence(&repo.fence_script("hv2", Fence::Kills)?);
    repo.write_host("hv2", &hv2)?;
    for (vm, spec) in vms {
        repo.write_vm(vm, spec)?;
    }
    repo.commit("VMs on two hosts that can fail")?;
    Ok(repo)
}

/// Bound for killed processes to be gone and for an agent to show up.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// What a fence command written by [`TestRepo::fence_script`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// Kills every QEMU under the host's root (waits until they are gone), exits 0.
    Kills,
    /// Kills nothing and exits 0: a fence that lies.
    Lies,
}

impl TestRepo {
    // ---- fencing ----------------------------------------------------------------

    /// Writes `<tmp>/fence-<host>.sh` and returns its argv (`["/bin/sh", path]`) for
    /// [`HostSpec::fence`]. Each run appends a line to [`Self::fence_log`], then does
    /// what `how` says to the QEMUs under [`Self::host_root`]`(host)`.
    pub fn fence_script(&self, host: &str, how: Fence) -> Result<Vec<String>> {
        let path = self.root().join(format!("fence-{host}.sh"));
        let log = shell_quote(&self.fence_log(host).display().to_string());
        // QEMUs' working directories as /proc shows them: canonical paths.
        let root = self.root().canonicalize()?.join("hosts").join(host);
        let body = match how {
            Fence::Lies => "exit 0\n".to_owned(),
            Fence::Kills => format!(
                r#"root={root}
tries=0
while :; do
  left=
  for d in /proc/[0-9]*; do
    cwd=$(readlink "$d/cwd" 2>/dev/null) || continue
    case "$cwd" in "$root"/*) ;; *) continue ;; esac
    case "$(tr '\0' ' ' < "$d/cmdline" 2>/dev/null)" in
      *qemu-system*) left=1; kill -9 "${{d#/proc/}}" 2>/dev/null ;;
    esac
  done
  [ -z "$left" ] && exit 0
  tries=$((tries + 1))
  if [ "$tries" -ge 250 ]; then echo "QEMUs of {host} survive kill -9" >&2; exit 1; fi
  sleep 0.02
done
"#,
                root = shell_quote(&root.display().to_string()),
            ),
        };
        let script = format!(
            "#!/bin/sh\n# Fence of the simulated host {host} ({how:?}), written by the test.\n\
             echo \"$(date +%s.%N) fence {host}\" >> {log}\n{body}"
        );
        fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
        Ok(vec!["/bin/sh".to_owned(), path.display().to_string()])
    }

    /// `<tmp>/fence-<host>.log`: one line per run of the host's fence script.
    pub fn fence_log(&self, host: &str) -> PathBuf {
        self.root().join(format!("fence-{host}.log"))
    }

    /// How many times the fence script of `host` ran.
    pub fn fence_runs(&self, host: &str) -> usize {
        fs::read_to_string(self.fence_log(host)).map_or(0, |t| t.lines().count())
    }

    /// `<state>/fence/<host>.toml` (the engine's record that `host` is powered off),
    /// `None` while there is none.
    pub fn fence_record(&self, host: &str) -> Result<Option<toml::Table>> {
        crate::repo::read_table(&self.state_dir().join("fence").join(format!("{host}.toml")))
    }

    /// The `by` of `host`'s fence record (`fence command`, `operator`), `None` if there
    /// is no record.
    pub fn fenced_by(&self, host: &str) -> Result<Option<String>> {
        Ok(self.fence_record(host)?.map(|r| {
            r.get("by")
                .and_then(|b| b.as_str())
                .unwrap_or("?")
                .to_owned()
        }))
    }

    /// `plasmavmc fence confirm <host> --repo R --state-dir S` (the operator's word
    /// that `host` is powered off), run to the end.
    pub fn fence_confirm(&self, host: &str) -> Result<Output> {
        self.run(&["fence", "confirm", host])
    }

    // ---- agents, power, partitions ----------------------------------------------

    /// The live agents serving `host` (`--root` is its root).
    pub fn host_agents(&self, host: &str) -> Vec<i32> {
        let root = self.host_root(host);
        self.agent_pids()
            .into_iter()
            .filter(|&pid| {
                proc::cmdline(pid).is_ok_and(|a| {
                    proc::arg_value(&a, "--root").is_some_and(|r| Path::new(r) == root)
                })
            })
            .collect()
    }

    /// Waits until exactly one agent serves `host` and returns its pid.
    pub fn wait_host_agent(&self, host: &str, timeout: Duration) -> Result<i32> {
        poll_for(format!("one agent serving {host}"), timeout, || match self
            .host_agents(host)
            .as_slice()
        {
            [one] => Some(*one),
            _ => None,
        })
    }

    /// Cuts `host` off: stops (SIGSTOP) its one agent, which keeps the root's lock and
    /// answers nothing; its QEMUs keep running. Returns the agent's pid (for
    /// [`Self::resume`]).
    pub fn partition(&self, host: &str) -> Result<i32> {
        let agent = self.wait_host_agent(host, KILL_TIMEOUT)?;
        self.freeze(agent)
            .with_context(|| format!("stopping {host}'s agent"))?;
        Ok(agent)
    }

    /// Freezes `pid` (SIGSTOP) and waits until it is stopped: it keeps its sockets and
    /// files but answers nothing (a hung QEMU, a cut-off agent). The cleanup resumes it
    /// before killing anything; [`Self::resume`] does it earlier.
    pub fn freeze(&self, pid: i32) -> Result<()> {
        kill(Pid::from_raw(pid), Signal::SIGSTOP).with_context(|| format!("SIGSTOP to {pid}"))?;
        self.remember_stopped(pid);
        wait_for(format!("{pid} to stop"), KILL_TIMEOUT, || {
            proc::state(pid) == Some('T')
        })
    }

    /// Resumes (SIGCONT) a process stopped by [`Self::partition`] or [`Self::freeze`].
    pub fn resume(&self, pid: i32) -> Result<()> {
        self.forget_stopped(pid);
        kill(Pid::from_raw(pid), Signal::SIGCONT).with_context(|| format!("SIGCONT to {pid}"))
    }

    /// Every live QEMU under `host`'s root.
    pub fn host_qemus(&self, host: &str) -> Vec<i32> {
        proc::qemus_under(&self.host_root(host))
    }

    /// Kills (SIGKILL) every QEMU under `host`'s root and waits until they are gone;
    /// returns their pids.
    pub fn kill_host_qemus(&self, host: &str) -> Result<Vec<i32>> {
        let pids = self.host_qemus(host);
        for &pid in &pids {
            proc::kill_and_wait(pid, KILL_TIMEOUT)?;
        }
        ensure!(
            self.host_qemus(host).is_empty(),
            "QEMUs under {host}'s root survived: {:?}",
            self.host_qemus(host)
        );
        Ok(pids)
    }

    /// Powers `host` off: creates its power-off marker (its agent cannot be started
    /// again; the host must be [`HostSpec::switchable`]), then kills its agents
    /// (resumed first if stopped) and every QEMU under its root, until none is left: a
    /// start script that passed the marker check just before the marker existed names
    /// the root in its argv, so it is found (before or after it execs the agent) and
    /// killed too. Returns the wall clock just before the first kill.
    pub fn power_off(&self, host: &str) -> Result<SystemTime> {
        let root = self.host_root(host);
        let marker = HostSpec::power_marker(&root);
        fs::write(&marker, "off\n").with_context(|| format!("writing {}", marker.display()))?;
        let at = SystemTime::now();
        poll_for(
            format!("every process of {host} to be gone"),
            KILL_TIMEOUT,
            || {
                let qemus = self.host_qemus(host);
                // Agents and their start scripts first: with an agent alive, the engine
                // would hear the QEMUs die.
                let others: Vec<i32> = proc::processes_under(&root)
                    .into_iter()
                    .filter(|pid| !qemus.contains(pid))
                    .collect();
                if others.is_empty() && qemus.is_empty() {
                    return Some(());
                }
                for pid in others.into_iter().chain(qemus) {
                    self.forget_stopped(pid);
                    let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                None
            },
        )?;
        Ok(at)
    }

    /// Powers a [`Self::power_off`]ed host back on: its agent may start again.
    pub fn power_on(&self, host: &str) -> Result<()> {
        let marker = HostSpec::power_marker(&self.host_root(host));
        fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))
    }

    // ---- one VM on one host -----------------------------------------------------

    /// The live QEMU of `vm` on `host`: the pid in its `qemu.pid` there, which must be
    /// a `qemu-system` process whose working directory is under the host's root.
    pub fn qemu_on(&self, host: &str, vm: &str) -> Result<i32> {
        let pid_file = self.instance_dir_on(host, vm).join("qemu.pid");
        let pid: i32 = fs::read_to_string(&pid_file)
            .with_context(|| format!("reading {}", pid_file.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{} does not hold a pid", pid_file.display()))?;
        ensure!(
            proc::is_alive(pid),
            "{vm}: QEMU {pid} on {host} is not alive"
        );
        let args = proc::cmdline(pid)?;
        ensure!(
            args.first().is_some_and(|a| a.contains("qemu-system")),
            "{vm}: pid {pid} is not QEMU: {}",
            args.join(" ")
        );
        let root = self.host_root(host).canonicalize()?;
        let cwd = proc::cwd(pid).context("QEMU's cwd is unreadable")?;
        ensure!(
            cwd.starts_with(&root),
            "{vm}: QEMU {pid} runs in {}, not under {host}'s root {}",
            cwd.display(),
            root.display()
        );
        Ok(pid)
    }

    /// The serial console of `vm`'s instance on `host` (empty if none).
    pub fn serial_on(&self, host: &str, vm: &str) -> String {
        fs::read(self.instance_dir_on(host, vm).join("serial.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until `vm`'s console on `host` shows a tick past `after`; returns the last
    /// one.
    pub fn ticking_on(&self, host: &str, vm: &str, after: u64) -> Result<u64> {
        let last = || crate::last_tick(&self.serial_on(host, vm));
        wait_for(
            format!("{vm} ticking past {after} on {host}"),
            crate::BOOT_TIMEOUT,
            || last().is_some_and(|t| t > after),
        )
        .with_context(|| self.serial_on(host, vm))?;
        Ok(last().unwrap_or(0))
    }

    /// Fails unless exactly one QEMU runs `vm`, on `host`, the only host with an instance
    /// of it, and its status says so (`running` there, with that pid); returns the pid.
    pub fn only_on(&self, host: &str, vm: &str) -> Result<i32> {
        let pid = self.qemu_on(host, vm)?;
        ensure!(
            self.qemus_of(vm) == [pid],
            "{vm}: QEMUs {:?}, expected only {pid} on {host}",
            self.qemus_of(vm)
        );
        ensure!(
            self.hosts_with_instance(vm) == [host],
            "{vm} has instances on {:?}, expected only on {host}",
            self.hosts_with_instance(vm)
        );
        let view = self.vm_view(vm)?.context("no status")?;
        ensure!(
            view.phase == "running" && view.host == host && view.pid == Some(pid),
            "{vm}'s status does not say it runs on {host} as pid {pid}:\n{view}"
        );
        Ok(pid)
    }
}

impl Daemon<'_> {
    /// Waits until `host` has rejoined: its fence record gone and its status `ready`.
    /// (Host status files are written after the VM files: a VM seen back on a host does
    /// not mean the host's file says so yet.)
    pub fn wait_rejoined(&self, host: &str, timeout: Duration) -> Result<()> {
        let repo = self.repo();
        self.wait(
            format!("{host} back: its fence record gone, its phase ready"),
            timeout,
            || {
                repo.fence_record(host).is_ok_and(|r| r.is_none())
                    && repo.host_phase(host) == "ready"
            },
        )
        .with_context(|| format!("{host}'s status: {:?}", repo.host_view(host)))
    }
}

/// Samples the live QEMUs of one VM (on any host of the test, whatever the pid files
/// say): how many ran at once, and for how long more than one did.
///
/// It also follows each QEMU's serial console (the file its `serial.log` fd points to,
/// wherever it was renamed): a guest that runs prints a tick every 0.2 s, a paused one
/// nothing. The QEMUs whose console grew, in the order they took turns, show whether
/// two guests of the VM ever ran: a live migration hands over once (source, then
/// target); a guest that prints again after another copy printed, or two that print in
/// one sample, ran at the same time.
#[derive(Debug)]
pub struct CopyWatch<'r> {
    repo: &'r TestRepo,
    vm: String,
    samples: usize,
    /// Console size of each QEMU at its last sample.
    console: std::collections::BTreeMap<i32, u64>,
    /// The QEMUs whose console grew, one entry per turn (consecutive samples of one
    /// QEMU are one turn).
    turns: Vec<i32>,
    /// The first sign that two guests ran at once.
    ran_twice: Option<String>,
    /// The most seen at once, and which.
    most: Vec<i32>,
    /// First and last sample that saw two or more.
    first_double: Option<Instant>,
    last_double: Option<Instant>,
    /// The sample before `first_double` and the one after `last_double`: the overlap
    /// lies between them.
    before_double: Option<Instant>,
    after_double: Option<Instant>,
    last: Option<Instant>,
}

impl<'r> CopyWatch<'r> {
    pub fn new(repo: &'r TestRepo, vm: &str) -> Self {
        Self {
            repo,
            vm: vm.to_owned(),
            samples: 0,
            console: std::collections::BTreeMap::new(),
            turns: Vec::new(),
            ran_twice: None,
            most: Vec::new(),
            first_double: None,
            last_double: None,
            before_double: None,
            after_double: None,
            last: None,
        }
    }

    /// Takes one sample; returns the live QEMUs of the VM now.
    pub fn sample(&mut self) -> Vec<i32> {
        let mut pids = self.repo.qemus_of(&self.vm);
        pids.sort_unstable();
        let now = Instant::now();
        self.samples += 1;
        if pids.len() > self.most.len() {
            self.most.clone_from(&pids);
        }
        if pids.len() >= 2 {
            if self.first_double.is_none() {
                self.first_double = Some(now);
                self.before_double = self.last;
            }
            self.last_double = Some(now);
            self.after_double = None;
        } else if self.last_double.is_some() && self.after_double.is_none() {
            self.after_double = Some(now);
        }
        self.last = Some(now);
        self.follow_consoles(&pids);
        pids
    }

    /// Notes which of `pids` printed on their console since their last sample.
    fn follow_consoles(&mut self, pids: &[i32]) {
        let mut grew = Vec::new();
        for &pid in pids {
            let Some(size) = console_size(pid) else {
                continue;
            };
            if self
                .console
                .insert(pid, size)
                .is_some_and(|before| size > before)
            {
                grew.push(pid);
            }
        }
        if self.ran_twice.is_none() && grew.len() >= 2 {
            self.ran_twice = Some(format!("QEMUs {grew:?} printed on their consoles at once"));
        }
        for pid in grew {
            if self.turns.last() == Some(&pid) {
                continue;
            }
            if self.ran_twice.is_none() && self.turns.contains(&pid) {
                self.ran_twice = Some(format!(
                    "QEMU {pid}'s guest printed again after another copy's had (turns {:?}, then {pid})",
                    self.turns
                ));
            }
            self.turns.push(pid);
        }
    }

    /// Fails if two guests of the VM ever ran at once (see [`CopyWatch`]): for live
    /// migrations, where two QEMUs exist by design but only one may run the guest.
    pub fn ensure_never_two_running(&self) -> Result<()> {
        match &self.ran_twice {
            Some(why) => bail!("two guests of {} ran: {why} ({})", self.vm, self.summary()),
            None => Ok(()),
        }
    }

    /// The QEMUs whose guests printed, in turn order (see [`CopyWatch`]).
    pub fn turns(&self) -> &[i32] {
        &self.turns
    }

    /// Forgets what was seen so far (the checks start again from the next sample).
    pub fn reset(&mut self) {
        *self = Self::new(self.repo, &self.vm);
    }

    /// Samples every 50 ms until `cond` holds (checked after each sample, which it
    /// gets), or fails after `timeout`.
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&[i32]) -> bool,
    ) -> Result<Vec<i32>> {
        poll_for(what, timeout, || {
            let pids = self.sample();
            cond(&pids).then_some(pids)
        })
        .with_context(|| self.summary())
    }

    /// How many samples were taken.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// The most QEMUs seen at once (their pids).
    pub fn most(&self) -> &[i32] {
        &self.most
    }

    /// Fails if any sample saw two or more QEMUs of the VM.
    pub fn ensure_never_two(&self) -> Result<()> {
        if self.most.len() >= 2 {
            bail!(
                "{} QEMUs of {} ran at once: {:?} ({})",
                self.most.len(),
                self.vm,
                self.most,
                self.summary()
            );
        }
        Ok(())
    }

    /// How long two or more copies coexisted, as bounds: `(seen, at_most)`, where
    /// `seen` spans the first to the last sample that saw them and `at_most` the
    /// samples around those. `None` if no sample saw two. `at_most` is `None` while
    /// they still coexist at the last sample.
    pub fn overlap(&self) -> Option<(Duration, Option<Duration>)> {
        let first = self.first_double?;
        let last = self.last_double?;
        let seen = last - first;
        let at_most = self
            .after_double
            .map(|after| after - self.before_double.unwrap_or(first));
        Some((seen, at_most))
    }

    /// One line for messages and reports.
    pub fn summary(&self) -> String {
        let overlap = match self.overlap() {
            None => "never two at once".to_owned(),
            Some((seen, Some(max))) => {
                format!("two or more at once for {seen:.2?} (at most {max:.2?})")
            }
            Some((seen, None)) => format!("two or more at once for {seen:.2?}, still"),
        };
        format!(
            "copies of {}: {} samples, at most {} at once {:?}; {overlap}",
            self.vm,
            self.samples,
            self.most.len(),
            self.most
        )
    }
}

/// The size of the file `pid` writes its guest's serial console to (an open file named
/// `serial.log`, possibly renamed since to `serial.log.1`), if any.
fn console_size(pid: i32) -> Option<u64> {
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    fds.flatten().find_map(|fd| {
        let target = fs::read_link(fd.path()).ok()?;
        let name = target.file_name()?.to_str()?;
        if !name.starts_with("serial.log") {
            return None;
        }
        fs::metadata(fd.path()).ok().map(|m| m.len())
    })
}
