//! The nemesis: carries out the schedule's steps on the sandbox, and tells the checker
//! which host it made unreachable and when that host was fenced or came back.
//!
//! In: one [`Step`] at a time. Out: what it did (or why it could not: a VM not running
//! when its QEMU is to be killed is skipped, not an error), and the [`Episode`]s the
//! checker judges invariant 2 by. Faults go through the sandbox's own helpers
//! (partition, power-off, `fence confirm`, the daemon's restart).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::checker::{Episode, Shared};
use super::schedule::{Step, VMS};
use crate::drill::console::last_tick;
use crate::drill::poll_until;
use crate::drill::sandbox::Sandbox;

/// How long a heal may take before the soak says the cluster did not recover.
const HEAL: Duration = Duration::from_secs(120);

/// What the nemesis did to the specs (so each commit rewrites a VM's whole file).
#[derive(Debug, Default)]
struct Specs {
    pins: BTreeMap<&'static str, &'static str>,
    memory: BTreeMap<&'static str, u64>,
    maintenance: Option<&'static str>,
}

/// How a step went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Nothing to do (a VM to kill was not running), why.
    Skipped(String),
    /// A heal timed out: what was still not running.
    NotHealed(String),
}

/// The nemesis and its memory.
pub struct Nemesis<'a> {
    pub sb: &'a mut Sandbox,
    shared: &'a Shared,
    specs: Specs,
    memory_mb: u64,
    /// Frozen agents, by host.
    frozen: BTreeMap<&'static str, i32>,
}

impl<'a> Nemesis<'a> {
    pub fn new(sb: &'a mut Sandbox, shared: &'a Shared, memory_mb: u64) -> Self {
        Self {
            sb,
            shared,
            specs: Specs::default(),
            memory_mb,
            frozen: BTreeMap::new(),
        }
    }

    /// Commits every VM of the soak.
    pub fn create_vms(&mut self) -> Result<()> {
        for (vm, ..) in VMS {
            self.write_vm(vm)?;
        }
        self.sb.commit("chaos: the soak's VMs")
    }

    fn write_vm(&self, vm: &'static str) -> Result<()> {
        let (_, disk, ha) = VMS
            .iter()
            .find(|(name, ..)| *name == vm)
            .copied()
            .context("a VM of the soak")?;
        let mut extra = format!("ha = {ha}\n");
        if let Some(host) = self.specs.pins.get(vm) {
            let _ = writeln!(extra, "host = {host:?}");
        }
        let mb = self.specs.memory.get(vm).copied().unwrap_or(self.memory_mb);
        self.sb.write(
            &format!("vms/{vm}.toml"),
            &self.sb.vm_toml_mb(mb, &extra, "", disk),
        )
    }

    /// Carries out `step` (`index` in the schedule, 1-based).
    pub fn apply(&mut self, index: usize, step: &Step) -> Result<Outcome> {
        match *step {
            Step::KillQemu { vm } => {
                let mut copies = self.sb.qemus();
                copies.retain(|q| q.vm == vm);
                let Some(q) = copies.iter().find(|q| !q.incoming()).or(copies.first()) else {
                    return Ok(Outcome::Skipped(format!("{vm} has no QEMU now")));
                };
                let _ = kill(Pid::from_raw(q.pid), Signal::SIGKILL);
            }
            Step::KillAgent { host } => {
                let agent = self.sb.agent_of(host).context("no agent serves the host")?;
                kill(Pid::from_raw(agent), Signal::SIGKILL)?;
            }
            Step::Freeze { host } => {
                self.unreachable(index, host);
                let agent = self.sb.partition(host)?;
                self.frozen.insert(host, agent);
            }
            Step::Thaw { host } => {
                if let Some(agent) = self.frozen.remove(host) {
                    let _ = kill(Pid::from_raw(agent), Signal::SIGCONT);
                }
                self.back(host);
            }
            Step::PowerOff { host } => {
                if !self.frozen.contains_key(host) {
                    self.unreachable(index, host);
                    // Silence it first: an agent killed after its QEMUs would report
                    // their exits, and the engine may act on a known exit.
                    if let Ok(agent) = self.sb.partition(host) {
                        self.frozen.insert(host, agent);
                    }
                }
                self.sb.power_off(host)?;
                self.frozen.remove(host);
            }
            Step::FenceConfirm { host } => {
                if let Some(ep) = self.shared.episodes.lock().expect("episodes").get_mut(host) {
                    ep.confirmed = true;
                }
                self.sb.fence_confirm(host)?;
            }
            Step::PowerOn { host } => {
                self.sb.power_on(host);
                self.back(host);
            }
            Step::RestartDaemon => {
                self.sb.kill_watch();
                self.sb.start_watch().context("starting the daemon again")?;
            }
            Step::Pin { vm, host } => {
                self.specs.pins.insert(vm, host);
                self.write_vm(vm)?;
                self.sb.commit(&format!("chaos: {vm} to {host}"))?;
            }
            Step::Unpin { vm } => {
                self.specs.pins.remove(vm);
                self.write_vm(vm)?;
                self.sb.commit(&format!("chaos: {vm} unpinned"))?;
            }
            Step::Memory { vm, mb } => {
                self.specs.memory.insert(vm, mb);
                self.write_vm(vm)?;
                self.sb.commit(&format!("chaos: {vm} memory {mb}"))?;
            }
            Step::Maintenance { host, on } => {
                let pinned: Vec<_> = self
                    .specs
                    .pins
                    .iter()
                    .filter(|(_, h)| **h == host)
                    .map(|(vm, _)| *vm)
                    .collect();
                for vm in pinned {
                    self.specs.pins.remove(vm);
                    self.write_vm(vm)?;
                }
                self.specs.maintenance = on.then_some(host);
                self.sb.set_maintenance(host, on)?;
            }
            Step::Heal => return Ok(self.heal()),
        }
        Ok(Outcome::Done)
    }

    /// `host` is unreachable from now on: what of the VMs ran there, for the checker.
    fn unreachable(&self, index: usize, host: &'static str) {
        self.sb.unfence(host);
        let all = self.sb.qemus();
        let vms: std::collections::BTreeSet<String> = all
            .iter()
            .filter(|q| q.host == host)
            .map(|q| q.vm.clone())
            .collect();
        let known = all
            .iter()
            .filter(|q| vms.contains(&q.vm))
            .map(|q| q.pid)
            .collect();
        self.shared.episodes.lock().expect("episodes").insert(
            host,
            Episode {
                host,
                step: index,
                vms,
                known,
                confirmed: false,
            },
        );
    }

    /// `host` answers again.
    fn back(&self, host: &str) {
        self.shared.episodes.lock().expect("episodes").remove(host);
    }

    /// Waits until every VM runs, once; [`Outcome::NotHealed`] when it did not within
    /// [`HEAL`] (the cluster did not recover: reported, the soak goes on).
    pub fn heal(&self) -> Outcome {
        // Running by its status, one QEMU, and its guest ticking on that host's console.
        let healed = poll_until(HEAL, || {
            self.shared.violated()
                || VMS.iter().all(|(vm, ..)| {
                    self.sb.running_on(vm).is_some_and(|host| {
                        self.sb.qemus_of(vm).len() == 1
                            && last_tick(&self.sb.serial(&host, vm)).is_some()
                    })
                })
        });
        if healed {
            return Outcome::Done;
        }
        let stuck: Vec<String> = VMS
            .iter()
            .filter_map(|(vm, ..)| {
                let status = self.sb.vm_status(vm);
                let copies = self.sb.qemus_of(vm);
                if status
                    .as_ref()
                    .is_some_and(|s| s.phase == crate::status::VmPhase::Running)
                    && copies.len() == 1
                {
                    return None;
                }
                Some(format!(
                    "{vm}: {} {copies:?} ({})",
                    status.as_ref().map_or_else(
                        || "no status".to_owned(),
                        |s| format!("{:?} on {:?}", s.phase, s.host)
                    ),
                    status.and_then(|s| s.message).unwrap_or_default()
                ))
            })
            .collect();
        Outcome::NotHealed(format!("not healed within {HEAL:?}: {}", stuck.join("; ")))
    }

    /// Brings the world back at the end: thaws, powers on, ends maintenance.
    pub fn restore(&mut self) -> Result<()> {
        for (host, agent) in std::mem::take(&mut self.frozen) {
            let _ = kill(Pid::from_raw(agent), Signal::SIGCONT);
            self.back(host);
        }
        let away: Vec<&'static str> = self
            .shared
            .episodes
            .lock()
            .expect("episodes")
            .keys()
            .copied()
            .collect();
        for host in away {
            self.sb.power_on(host);
            self.back(host);
        }
        if let Some(host) = self.specs.maintenance.take() {
            self.sb.set_maintenance(host, false)?;
        }
        Ok(())
    }

    /// Pauses `d` (the schedule's timing), returning early when an invariant broke.
    pub fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        poll_until(d, || self.shared.violated() || Instant::now() >= until);
    }
}
