//! Watching QEMU processes: one QMP connection per running instance, plus a pidfd.
//!
//! A QMP socket serves one client at a time, so every QMP conversation of the local
//! host goes through the connection kept here, and the task that holds it is also the
//! one that notices the exit: pidfd readiness or QMP EOF, both within milliseconds of
//! a `kill -9`. The exit is classified (SHUTDOWN reason, exit status), recorded in
//! `instance.toml` when the engine did not ask for it, and announced as a [`HostEvent`].

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use plasmavmc_specs::Power;
use tokio::sync::{broadcast, Mutex};
use tracing::{debug, info, warn};

use crate::qemu::exit::{classify, describe_status, ExitReason, ExitRecord};
use crate::qemu::instance::{InstanceDir, EXIT_HISTORY, QMP_SOCKET};
use crate::qemu::process;
use crate::qemu::qmp::{Qmp, QmpError, QmpEvent};
use crate::qemu::watchdog::{self, Fired};
use crate::wire::HostEvent;

/// How long a watcher waits for a QEMU whose QMP connection closed to end.
const EXIT_WAIT: Duration = Duration::from_secs(5);

struct Attached {
    pid: u32,
    qmp: Qmp,
}

/// The QMP connections and exit watchers of one host.
pub struct Monitor {
    attached: Mutex<HashMap<String, Attached>>,
    events: broadcast::Sender<HostEvent>,
    /// One lock per VM over its network devices (see `local::taps`).
    net_locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").finish_non_exhaustive()
    }
}

impl Monitor {
    pub fn new() -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Self {
            attached: Mutex::new(HashMap::new()),
            events,
            net_locks: std::sync::Mutex::default(),
        })
    }

    /// The lock over `vm`'s network devices: held while its taps are made until its
    /// QEMU has opened them, and while they are removed, so a removal never comes
    /// between the two.
    pub fn net_lock(&self, vm: &str) -> Arc<Mutex<()>> {
        let mut locks = self
            .net_locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.entry(vm.to_owned()).or_default().clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<HostEvent> {
        self.events.subscribe()
    }

    /// Tells subscribers about `event`.
    pub fn announce(&self, event: HostEvent) {
        let _ = self.events.send(event);
    }

    /// The QMP connection to `vm`'s QEMU (`pid`), opened and watched the first time.
    pub async fn qmp(
        self: &Arc<Self>,
        dir: &InstanceDir,
        vm: &str,
        uuid: &str,
        pid: u32,
        timeout: Duration,
    ) -> Result<Qmp, QmpError> {
        let mut attached = self.attached.lock().await;
        if let Some(a) = attached.get(vm) {
            if a.pid == pid && !a.qmp.is_closed() {
                return Ok(a.qmp.clone());
            }
        }
        let qmp = Qmp::connect(&dir.file(QMP_SOCKET), timeout).await?;
        attached.insert(
            vm.to_owned(),
            Attached {
                pid,
                qmp: qmp.clone(),
            },
        );
        let watcher = Watcher {
            monitor: Arc::downgrade(self),
            dir: dir.clone(),
            vm: vm.to_owned(),
            uuid: uuid.to_owned(),
            pid,
        };
        tokio::spawn(watcher.run(qmp.clone()));
        debug!(vm, pid, "attached QMP");
        Ok(qmp)
    }

    /// Waits until no watcher holds `vm` — one whose QEMU ended records the exit
    /// first — for at most [`EXIT_WAIT`] and a second. Returns whether a watcher held
    /// it and let go: the VM's record may have changed since it was read. A look that
    /// finds a VM's QEMU gone calls this before it trusts the VM's record.
    pub async fn settled_exit(&self, vm: &str) -> bool {
        let deadline = tokio::time::Instant::now() + EXIT_WAIT + Duration::from_secs(1);
        let mut held = false;
        loop {
            if !self.attached.lock().await.contains_key(vm) {
                return held;
            }
            held = true;
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn detach(&self, vm: &str, pid: u32) {
        let mut attached = self.attached.lock().await;
        if attached.get(vm).is_some_and(|a| a.pid == pid) {
            attached.remove(vm);
        }
    }
}

struct Watcher {
    monitor: Weak<Monitor>,
    dir: InstanceDir,
    vm: String,
    uuid: String,
    pid: u32,
}

impl Watcher {
    async fn run(self, qmp: Qmp) {
        let pidfd = process::pidfd_open(self.pid);
        let qga = super::guest_agent::SharedAgent::default();
        let _pinger = self.guest_agent_pinger(&qga);
        let (end_tx, mut end_rx) = tokio::sync::mpsc::unbounded_channel();
        let _probes = self.probers(&end_tx, &qga);
        let mut unhealthy: Option<(u64, String)> = None;
        let mut events = qmp.take_events();
        // A watchdog that fired while no agent was attached left the guest paused.
        let mut fired = match qmp.query_status().await {
            Ok(s) if s.status == watchdog::PAUSED_STATE => self.watchdog(&qmp, Fired::Paused).await,
            _ => None,
        };
        let closed = qmp.closed();
        let gone = async {
            match pidfd {
                Ok(fd) => {
                    let _ = process::wait_pidfd(fd).await;
                }
                // No pidfd (very old kernel): QMP EOF alone tells.
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::pin!(closed, gone);
        loop {
            tokio::select! {
                _ = &mut closed => break,
                () = &mut gone => break,
                Some(last) = end_rx.recv(), if unhealthy.is_none() && fired.is_none() => {
                    warn!(vm = %self.vm, pid = self.pid, %last, "liveness probe failed: ending this QEMU");
                    unhealthy = Some((crate::time::now_ms(), last));
                    if let Err(e) = qmp.quit().await {
                        warn!(vm = %self.vm, error = %e, "cannot end the unhealthy QEMU");
                    }
                }
                event = next_event(&mut events) => {
                    if let Some(what) = event.as_ref().and_then(Fired::of_event) {
                        fired = fired.or(self.watchdog(&qmp, what).await);
                    }
                }
            }
        }
        // The process may still be finishing: give QMP a moment to deliver SHUTDOWN, and
        // QEMU time to end (on a loaded host its teardown can take seconds).
        let closed = tokio::time::timeout(Duration::from_millis(500), qmp.closed())
            .await
            .ok();
        let gone = process::wait_gone(self.pid, EXIT_WAIT).await;
        let Some(monitor) = self.monitor.upgrade() else {
            return;
        };
        if !gone {
            monitor.detach(&self.vm, self.pid).await;
            warn!(vm = %self.vm, pid = self.pid, "QMP connection closed but QEMU still runs; will reconnect");
            return;
        }
        let (reason, status, at_ms) = match (fired, unhealthy) {
            (None, Some((at_ms, last))) => (ExitReason::Unhealthy, Some(last), at_ms),
            (Some(at_ms), _) => (
                ExitReason::Watchdog,
                Some("ended by the agent after the watchdog fired".to_owned()),
                at_ms,
            ),
            (None, None) => (
                classify(closed.as_ref().and_then(|c| c.shutdown.as_ref())),
                self.exit_status().await,
                crate::time::now_ms(),
            ),
        };
        let expected = self.record(reason, status.clone(), at_ms);
        // Its taps go with it (a restart makes them again).
        {
            let lock = monitor.net_lock(&self.vm);
            let _held = lock.lock().await;
            super::local::taps::release(&self.vm, &self.dir, Some(&self.uuid)).await;
        }
        // Only now: a look waits for this (see [`Monitor::settled_exit`]), so no plan
        // restarts the VM before its exit is recorded and counted.
        monitor.detach(&self.vm, self.pid).await;
        info!(vm = %self.vm, pid = self.pid, reason = reason.as_str(), status = status.as_deref().unwrap_or("-"), expected, "vm exited");
        let _ = monitor.events.send(HostEvent::Exited {
            vm: self.vm.clone(),
            pid: self.pid,
            reason,
            status,
            expected,
            at_ms,
        });
    }

    /// QEMU says the guest's watchdog fired (`what` it did): the reset is counted in
    /// `instance.toml`; a paused guest's QEMU is ended (its exit is then recorded as
    /// `watchdog`, and the firing time is returned). Either way subscribers hear of it.
    async fn watchdog(&self, qmp: &Qmp, what: Fired) -> Option<u64> {
        let at_ms = crate::time::now_ms();
        let monitor = self.monitor.upgrade()?;
        let action = self.dir.read().ok().and_then(|i| i.vm.spec.health.watchdog);
        warn!(vm = %self.vm, pid = self.pid, ?what, "the guest's watchdog fired");
        if let (Some(action), Fired::Reset | Fired::Paused) = (action, what) {
            monitor.announce(HostEvent::Watchdog {
                vm: self.vm.clone(),
                pid: self.pid,
                action,
                at_ms,
            });
        }
        match what {
            Fired::Reset => {
                self.count_reset();
                None
            }
            Fired::Paused => {
                if let Err(e) = qmp.quit().await {
                    warn!(vm = %self.vm, error = %e, "cannot end the QEMU whose watchdog fired");
                }
                Some(at_ms)
            }
            Fired::Other => None,
        }
    }

    /// The guest agent's pinger of this QEMU (`[health] guest_agent`), which ends with
    /// the watcher.
    fn guest_agent_pinger(&self, qga: &super::guest_agent::SharedAgent) -> Option<AbortOnDrop> {
        let inst = self.dir.read().ok().filter(|i| i.uuid == self.uuid)?;
        let health = &inst.vm.spec.health;
        if !health.guest_agent {
            return None;
        }
        let pinger = super::guest_agent::Pinger {
            conn: qga.clone(),
            monitor: self.monitor.clone(),
            dir: self.dir.clone(),
            vm: self.vm.clone(),
            pid: self.pid,
            period: health.guest_agent_period(),
        };
        Some(AbortOnDrop(tokio::spawn(pinger.run()).abort_handle()))
    }

    /// The probes of this QEMU (`[health.liveness]`, `[health.readiness]`), which end
    /// with the watcher. A failed liveness probe asks through `end`, unless the restart
    /// policy is `never` (then the VM stays up, unhealthy).
    fn probers(
        &self,
        end: &tokio::sync::mpsc::UnboundedSender<String>,
        qga: &super::guest_agent::SharedAgent,
    ) -> Vec<AbortOnDrop> {
        let Some(inst) = self.dir.read().ok().filter(|i| i.uuid == self.uuid) else {
            return Vec::new();
        };
        let spec = &inst.vm.spec;
        [
            (true, &spec.health.liveness),
            (false, &spec.health.readiness),
        ]
        .into_iter()
        .filter_map(|(liveness, probe)| {
            let prober = super::probes::Prober {
                monitor: self.monitor.clone(),
                dir: self.dir.clone(),
                vm: self.vm.clone(),
                pid: self.pid,
                liveness,
                probe: probe.clone()?,
                forwards: spec.forwards().collect(),
                qga: qga.clone(),
                outlived: std::sync::Mutex::default(),
                end: (spec.restart != plasmavmc_specs::RestartPolicy::Never).then(|| end.clone()),
            };
            Some(AbortOnDrop(tokio::spawn(prober.run()).abort_handle()))
        })
        .collect()
    }

    /// Counts a watchdog reset in `instance.toml` (this instance's only).
    fn count_reset(&self) {
        let Ok(mut inst) = self.dir.read() else {
            return;
        };
        if inst.uuid != self.uuid {
            return;
        }
        inst.watchdog_resets += 1;
        if let Err(e) = self.dir.write(&inst) {
            warn!(vm = %self.vm, error = %e, "cannot count the watchdog reset");
        }
    }

    /// The exit status, when this process was QEMU's parent (its reaper stores it).
    async fn exit_status(&self) -> Option<String> {
        for _ in 0..10 {
            if let Some(status) = process::take_exit_status(self.pid) {
                return Some(describe_status(status));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }

    /// Records an exit the engine did not ask for in `instance.toml`; returns whether the
    /// exit was expected: the instance's power was already `stopped`, or the instance is
    /// no longer this QEMU's (removed by the engine — a migration's source discarded, a VM
    /// deleted — or replaced by a newer one): nothing to record, nothing to react to.
    fn record(&self, reason: ExitReason, status: Option<String>, at_ms: u64) -> bool {
        let Ok(mut inst) = self.dir.read() else {
            return true;
        };
        if inst.uuid != self.uuid {
            return true;
        }
        if inst.power == Power::Stopped {
            return true;
        }
        inst.starting = false;
        inst.last_exit = Some(ExitRecord {
            reason,
            at_ms,
            pid: self.pid,
            status,
        });
        inst.exits.push(at_ms);
        let excess = inst.exits.len().saturating_sub(EXIT_HISTORY);
        inst.exits.drain(..excess);
        if let Err(e) = self.dir.write(&inst) {
            warn!(vm = %self.vm, error = %e, "cannot record the exit");
        }
        false
    }
}

/// The next QMP event; pending forever once there are none (taken elsewhere, or closed).
async fn next_event(
    events: &mut Option<tokio::sync::mpsc::UnboundedReceiver<QmpEvent>>,
) -> Option<QmpEvent> {
    if let Some(rx) = events {
        if let Some(event) = rx.recv().await {
            return Some(event);
        }
    }
    *events = None;
    std::future::pending().await
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
