//! [`PhaseTrail`]: the phases one host and one VM go through, as their status files
//! show them, sampled fast enough to catch states that last a fraction of a second
//! (a host is `suspect` for under a second with the tests' heartbeat settings).

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::repo::TestRepo;
use crate::wait::poll_every;

/// How often [`PhaseTrail::wait_until`] samples.
pub const FAST_POLL: Duration = Duration::from_millis(10);

/// One phase seen, from when (since the trail began), with the status message then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub at: Duration,
    pub phase: String,
    pub message: String,
}

/// The distinct successive phases of `status/hosts/<host>.toml` and
/// `status/vms/<vm>.toml`. The two files are written one after the other (VMs first),
/// so a sample may see one a snapshot ahead of the other: compare each trail on its
/// own, and across them only with that in mind.
#[derive(Debug)]
pub struct PhaseTrail<'r> {
    repo: &'r TestRepo,
    host: String,
    vm: String,
    start: Instant,
    hosts: Vec<Seen>,
    vms: Vec<Seen>,
}

impl<'r> PhaseTrail<'r> {
    /// Starts the trail and takes a first sample.
    pub fn new(repo: &'r TestRepo, host: &str, vm: &str) -> Self {
        let mut trail = Self {
            repo,
            host: host.to_owned(),
            vm: vm.to_owned(),
            start: Instant::now(),
            hosts: Vec::new(),
            vms: Vec::new(),
        };
        trail.sample();
        trail
    }

    /// Reads both files once (a file caught absent or mid-rename is skipped).
    pub fn sample(&mut self) {
        let at = self.start.elapsed();
        if let Ok(Some(h)) = self.repo.host_view(&self.host) {
            push(&mut self.hosts, at, h.phase, h.message);
        }
        if let Ok(Some(v)) = self.repo.vm_view(&self.vm) {
            push(&mut self.vms, at, v.phase, v.message);
        }
    }

    /// Samples every 10 ms ([`FAST_POLL`]) until `cond` holds for the trail, or fails
    /// after `timeout` showing it.
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Self) -> bool,
    ) -> Result<()> {
        poll_every(FAST_POLL, what, timeout, || {
            self.sample();
            cond(self).then_some(())
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{self}"))
    }

    /// The host's phases so far, oldest first.
    pub fn host_phases(&self) -> Vec<&str> {
        self.hosts.iter().map(|s| s.phase.as_str()).collect()
    }

    /// The VM's phases so far, oldest first.
    pub fn vm_phases(&self) -> Vec<&str> {
        self.vms.iter().map(|s| s.phase.as_str()).collect()
    }

    /// The host's current phase (empty before any sample saw it).
    pub fn host_now(&self) -> &str {
        self.hosts.last().map_or("", |s| s.phase.as_str())
    }

    /// The VM's current phase (empty before any sample saw it).
    pub fn vm_now(&self) -> &str {
        self.vms.last().map_or("", |s| s.phase.as_str())
    }

    /// When the host was first seen in `phase`, with its message then.
    pub fn host_first(&self, phase: &str) -> Option<&Seen> {
        self.hosts.iter().find(|s| s.phase == phase)
    }

    /// When the VM was first seen in `phase`, with its message then.
    pub fn vm_first(&self, phase: &str) -> Option<&Seen> {
        self.vms.iter().find(|s| s.phase == phase)
    }
}

fn push(trail: &mut Vec<Seen>, at: Duration, phase: String, message: String) {
    if trail.last().is_none_or(|s| s.phase != phase) {
        trail.push(Seen { at, phase, message });
    }
}

impl fmt::Display for PhaseTrail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = |trail: &[Seen]| {
            trail
                .iter()
                .map(|s| format!("{} at {:.0?}", s.phase, s.at))
                .collect::<Vec<_>>()
                .join(" → ")
        };
        write!(
            f,
            "host {}: {}; VM {}: {}",
            self.host,
            line(&self.hosts),
            self.vm,
            line(&self.vms)
        )
    }
}
