//! Liveness and readiness probes (`[health.liveness]`, `[health.readiness]`), run by the
//! host's agent beside the VM for as long as its QEMU is watched (the monitor's watcher
//! owns the tasks).
//!
//! In: the probe, the instance folder, the VM's port forwards. Out: `liveness.toml` /
//! `readiness.toml` in the folder and a [`HostEvent::Probe`], both only when the state
//! flips; for a failed liveness probe, the watcher is asked to end the QEMU (exit reason
//! `unhealthy`) unless `restart = "never"`. Every check is bounded by the probe's
//! `timeout`, so a probe that hangs counts as a failure and never piles up.
//!
//! ```text
//!  liveness:  unarmed ──first success──> ok ──failure_threshold failures in a row──>
//!             not ok (unhealthy) ──> end QEMU
//! ```
//! A liveness probe arms at its first success on a QEMU: a guest still booting is not
//! unhealthy (`initial_delay` only postpones the first check), and one that never comes
//! up is a start problem for the operator, not a hang the probe recovers.
//! ```text
//!  readiness: not ok ──one success──> ok ──failure_threshold failures in a row──> not ok
//! ```

use std::sync::Weak;
use std::time::Duration;

use plasmavmc_specs::{Forward, Probe, ProbeKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};

use super::monitor::Monitor;
use crate::observe::ProbeState;
use crate::qemu::instance::{InstanceDir, LIVENESS_FILE, READINESS_FILE};
use crate::qemu::qga::{GuestAgent, SOCKET};
use crate::records::write_atomic;
use crate::wire::HostEvent;

/// How long a TCP connection must stay open to count: slirp accepts a forwarded
/// connection before the guest does, and closes it when the guest refuses.
const SETTLE: Duration = Duration::from_millis(300);

/// One probe of one QEMU.
pub(super) struct Prober {
    pub monitor: Weak<Monitor>,
    pub dir: InstanceDir,
    pub vm: String,
    pub pid: u32,
    pub liveness: bool,
    pub probe: Probe,
    pub forwards: Vec<Forward>,
    /// Where a failed liveness probe asks for its QEMU to be ended (with the last output);
    /// `None`: leave it running (`restart = "never"`).
    pub end: Option<UnboundedSender<String>>,
    /// The guest agent's connection, shared with the pinger.
    pub qga: super::guest_agent::SharedAgent,
}

impl Prober {
    fn file(&self) -> &'static str {
        if self.liveness {
            LIVENESS_FILE
        } else {
            READINESS_FILE
        }
    }

    /// Checks for ever (the watcher aborts it when its QEMU is gone).
    pub async fn run(self) {
        let mut last = read(&self.dir, self.file()).filter(|s| s.pid == self.pid);
        tokio::time::sleep(self.probe.initial_delay.0).await;
        let mut ticks = tokio::time::interval(self.probe.period.0);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u32;
        // Liveness is presumed once it succeeded, readiness waits for a success.
        let mut ok = last.as_ref().is_some_and(|s| s.ok);
        let mut armed = !self.liveness || last.is_some();
        loop {
            ticks.tick().await;
            let result = tokio::time::timeout(self.probe.timeout.0, self.check())
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "no answer within {}",
                        humantime::format_duration(self.probe.timeout.0)
                    ))
                });
            let (now_ok, output) = match result {
                Ok(output) => {
                    failures = 0;
                    armed = true;
                    (true, output)
                }
                Err(_) if !armed => continue,
                Err(output) => {
                    failures = failures.saturating_add(1);
                    (ok && failures < self.probe.failure_threshold, output)
                }
            };
            if last.is_some() && now_ok == ok {
                continue;
            }
            ok = now_ok;
            let state = ProbeState {
                ok,
                since: crate::time::stamp_ms(),
                pid: self.pid,
                last: output,
            };
            self.flipped(&state, last.is_none());
            last = Some(state);
        }
    }

    /// One check: its output when it succeeds, why when it fails.
    async fn check(&self) -> Result<String, String> {
        match self.probe.kind {
            ProbeKind::GuestAgent => {
                let t = self.probe.timeout.0;
                let mut conn = self.qga.lock().await;
                let qga = match &mut *conn {
                    Some(qga) => qga,
                    None => conn.insert(
                        GuestAgent::connect(&self.dir.file(SOCKET))
                            .await
                            .map_err(|e| crate::errors::error_chain(&e))?,
                    ),
                };
                let answer = match qga.sync(t).await {
                    Ok(()) => qga.execute("guest-ping", None, t).await.map(drop),
                    Err(e) => Err(e),
                };
                if let Err(e) = answer {
                    *conn = None;
                    return Err(crate::errors::error_chain(&e));
                }
                Ok("the guest agent answers".to_owned())
            }
            ProbeKind::Tcp => {
                let mut stream = self.connect().await?;
                let mut byte = [0u8; 1];
                match tokio::time::timeout(SETTLE, stream.read(&mut byte)).await {
                    Ok(Ok(0) | Err(_)) => Err(
                        "the connection was closed (nothing listens on the guest's port?)"
                            .to_owned(),
                    ),
                    Ok(Ok(_)) | Err(_) => Ok("the port is open".to_owned()),
                }
            }
            ProbeKind::Http => {
                let mut stream = self.connect().await?;
                let path = self.probe.path.as_deref().unwrap_or("/");
                let request = format!(
                    "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: plasmavmc-probe\r\n\r\n",
                    self.vm
                );
                stream
                    .write_all(request.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut head = vec![0u8; 256];
                let n = stream.read(&mut head).await.map_err(|e| e.to_string())?;
                let line = String::from_utf8_lossy(&head[..n]);
                let line = line.lines().next().unwrap_or_default().to_owned();
                let code = line.split_whitespace().nth(1).unwrap_or_default();
                if code.starts_with('2') && code.len() == 3 {
                    Ok(line)
                } else if line.is_empty() {
                    Err("no HTTP answer".to_owned())
                } else {
                    Err(line)
                }
            }
        }
    }

    /// A TCP connection to the guest's port, through its forward.
    async fn connect(&self) -> Result<TcpStream, String> {
        let port = self.probe.port.unwrap_or_default();
        let Some(fwd) = self
            .forwards
            .iter()
            .find(|f| !f.udp && f.guest_port == port)
        else {
            return Err(format!("guest port {port} is not forwarded"));
        };
        TcpStream::connect(("127.0.0.1", fwd.host_port))
            .await
            .map_err(|e| {
                format!(
                    "connecting to 127.0.0.1:{} (guest port {port}): {e}",
                    fwd.host_port
                )
            })
    }

    /// Writes the record, tells the controller, and for a failed liveness probe asks for
    /// the QEMU to be ended.
    fn flipped(&self, state: &ProbeState, first: bool) {
        let what = if self.liveness {
            "liveness"
        } else {
            "readiness"
        };
        info!(vm = %self.vm, probe = what, ok = state.ok, last = %state.last, "probe state");
        let text = toml::to_string_pretty(state).expect("a probe state always serialises");
        if let Err(e) = write_atomic(&self.dir.file(self.file()), text.as_bytes()) {
            warn!(vm = %self.vm, error = %e, "cannot record the probe's state");
        }
        if let Some(monitor) = self.monitor.upgrade() {
            monitor.announce(HostEvent::Probe {
                vm: self.vm.clone(),
                liveness: self.liveness,
                state: state.clone(),
                first,
            });
        }
        if self.liveness && !state.ok {
            if let Some(end) = &self.end {
                let _ = end.send(state.last.clone());
            }
        }
    }
}

/// The probe record `file` in `dir`, if there is one.
pub(crate) fn read(dir: &InstanceDir, file: &str) -> Option<ProbeState> {
    let text = std::fs::read_to_string(dir.file(file)).ok()?;
    toml::from_str(&text).ok()
}
