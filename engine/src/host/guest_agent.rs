//! The host's agent pinging a VM's guest agent (`[health] guest_agent`), every period,
//! for as long as that QEMU is watched (the monitor's watcher owns the task).
//!
//! In: the instance folder and its `qga.sock`. Out: `guest-agent.toml` in the folder and
//! a [`HostEvent::GuestAgent`], both only when something changed (it answers or stops,
//! another OS, other addresses). It runs beside the VM, on its host: no listener, no
//! controller needed; an agent that starts again re-reads the record and goes on.

use std::sync::Weak;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::monitor::Monitor;
use crate::observe::GuestAgentInfo;
use crate::qemu::instance::{InstanceDir, GUEST_AGENT_FILE};
use crate::qemu::qga::{GuestAgent, QgaError, SOCKET};
use crate::records::write_atomic;
use crate::wire::HostEvent;

/// No single exchange waits longer than this, however long the period.
const MAX_TIMEOUT: Duration = Duration::from_secs(2);

/// The one connection to a VM's guest agent (its socket serves one client at a time),
/// shared by the pinger and the guest-agent probes of one QEMU; `None` until connected,
/// and again after an error.
pub(super) type SharedAgent = std::sync::Arc<tokio::sync::Mutex<Option<GuestAgent>>>;

/// One VM's pinger.
pub(super) struct Pinger {
    pub conn: SharedAgent,
    pub monitor: Weak<Monitor>,
    pub dir: InstanceDir,
    pub vm: String,
    pub pid: u32,
    pub period: Duration,
}

impl Pinger {
    /// Pings for ever (the watcher aborts it when its QEMU is gone).
    pub async fn run(self) {
        let timeout = self.period.min(MAX_TIMEOUT);
        let mut last = read(&self.dir).filter(|i| i.pid == self.pid);
        let mut ticks = tokio::time::interval(self.period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let answer = {
                let mut conn = self.conn.lock().await;
                let answer = ask(&self.dir, &mut conn, timeout).await;
                if answer.is_err() {
                    *conn = None;
                }
                answer
            };
            let now = crate::time::now();
            let next = match answer {
                Ok((os, addresses)) => GuestAgentInfo {
                    answering: true,
                    since: now,
                    pid: self.pid,
                    os,
                    addresses,
                    error: None,
                },
                Err(e) => GuestAgentInfo {
                    answering: false,
                    since: now,
                    pid: self.pid,
                    os: None,
                    addresses: Vec::new(),
                    error: Some(crate::errors::error_chain(&e)),
                },
            };
            if last.as_ref().is_some_and(|l| !l.differs(&next)) {
                continue;
            }
            let first = last.is_none();
            self.changed(&next, first);
            last = Some(next);
        }
    }

    /// Writes the record and tells the controller.
    fn changed(&self, info: &GuestAgentInfo, first: bool) {
        if info.answering {
            info!(vm = %self.vm, os = info.os.as_deref().unwrap_or("-"), addresses = ?info.addresses, "the guest agent answers");
        } else {
            debug!(vm = %self.vm, error = info.error.as_deref().unwrap_or("-"), "the guest agent does not answer");
        }
        let text = toml::to_string_pretty(info).expect("a guest agent record always serialises");
        if let Err(e) = write_atomic(&self.dir.file(GUEST_AGENT_FILE), text.as_bytes()) {
            warn!(vm = %self.vm, error = %e, "cannot record the guest agent's state");
        }
        if let Some(monitor) = self.monitor.upgrade() {
            monitor.announce(HostEvent::GuestAgent {
                vm: self.vm.clone(),
                info: info.clone(),
                first,
            });
        }
    }
}

/// One round: sync, ping, OS and addresses, on the open connection or a new one.
async fn ask(
    dir: &InstanceDir,
    conn: &mut Option<GuestAgent>,
    timeout: Duration,
) -> Result<(Option<String>, Vec<String>), QgaError> {
    let qga = match conn {
        Some(qga) => qga,
        None => conn.insert(GuestAgent::connect(&dir.file(SOCKET)).await?),
    };
    qga.sync(timeout).await?;
    qga.execute("guest-ping", None, timeout).await?;
    // A guest agent without these (an old one, a minimal one) still answers; one that
    // stops answering half-way did not answer this round (taking that for "no
    // addresses" would announce a change that never happened).
    let os = unsupported_as_none(qga.os(timeout).await)?.flatten();
    let addresses = unsupported_as_none(qga.addresses(timeout).await)?.unwrap_or_default();
    Ok((os, addresses))
}

/// An answer, `None` when the guest agent refused the command (it lacks it) or gave an
/// answer of another form, or the error of one that did not answer.
fn unsupported_as_none<T>(answer: Result<T, QgaError>) -> Result<Option<T>, QgaError> {
    match answer {
        Ok(value) => Ok(Some(value)),
        Err(QgaError::Refused { .. } | QgaError::Decode { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The record in `dir`, if there is one.
pub(crate) fn read(dir: &InstanceDir) -> Option<GuestAgentInfo> {
    let text = std::fs::read_to_string(dir.file(GUEST_AGENT_FILE)).ok()?;
    toml::from_str(&text).ok()
}
