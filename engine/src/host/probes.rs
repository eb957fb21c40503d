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
use crate::qemu::qga::{Exited, GuestAgent, QgaError, SOCKET};
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
    /// The guest pid of an `exec` command that outlived its check's timeout: no new one
    /// starts until it has ended.
    pub outlived: std::sync::Mutex<Option<i64>>,
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
            ProbeKind::GuestAgent | ProbeKind::Exec => {
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
                    Ok(()) if self.probe.kind == ProbeKind::Exec => self.exec(qga).await,
                    Ok(()) => qga
                        .execute("guest-ping", None, t)
                        .await
                        .map(|_| Ok("the guest agent answers".to_owned())),
                    Err(e) => Err(e),
                };
                answer.unwrap_or_else(|e| {
                    *conn = None;
                    Err(crate::errors::error_chain(&e))
                })
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

    /// Runs the `exec` command in the guest and waits for its end (the caller bounds
    /// the wait): `Ok(Ok(output))` when it exited 0, `Ok(Err(why))` when it did not, or
    /// when an earlier one still runs; `Err` when the guest agent failed.
    async fn exec(&self, qga: &mut GuestAgent) -> Result<Result<String, String>, QgaError> {
        let t = self.probe.timeout.0;
        let earlier = *lock(&self.outlived);
        if let Some(pid) = earlier {
            if qga.exec_status(pid, t).await?.is_none() {
                return Ok(Err(format!(
                    "the command of an earlier check still runs (pid {pid} in the guest)"
                )));
            }
            *lock(&self.outlived) = None;
        }
        let pid = qga.exec(&self.probe.command, t).await?;
        // Until it is seen ending, a check that times out leaves it behind.
        *lock(&self.outlived) = Some(pid);
        let mut pause = Duration::from_millis(10);
        loop {
            if let Some(done) = qga.exec_status(pid, t).await? {
                *lock(&self.outlived) = None;
                return Ok(exec_result(&done));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
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

/// What an ended `exec` command means for its probe: exit 0 is a success; its output
/// (the last line of stdout, else of stderr) goes with either answer.
fn exec_result(done: &Exited) -> Result<String, String> {
    let said = [&done.out, &done.err]
        .into_iter()
        .find_map(|text| text.lines().rev().find(|l| !l.trim().is_empty()))
        .map(|l| format!(": {}", l.chars().take(200).collect::<String>()))
        .unwrap_or_default();
    match (done.code, done.signal) {
        (Some(0), _) => Ok(format!("exit 0{said}")),
        (Some(code), _) => Err(format!("exit {code}{said}")),
        (None, Some(signal)) => Err(format!("killed by signal {signal}{said}")),
        (None, None) => Err(format!("ended without an exit status{said}")),
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The probe record `file` in `dir`, if there is one.
pub(crate) fn read(dir: &InstanceDir, file: &str) -> Option<ProbeState> {
    let text = std::fs::read_to_string(dir.file(file)).ok()?;
    toml::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;

    use plasmavmc_specs::HumanDuration;
    use serde_json::{json, Value};
    use tokio::io::AsyncBufReadExt;

    use super::*;

    /// A guest agent whose commands run until `done` is set; counts `guest-exec` calls.
    fn fake_guest(
        listener: tokio::net::UnixListener,
        done: Arc<AtomicBool>,
        execs: Arc<AtomicU32>,
    ) -> tokio::task::JoinHandle<std::io::Result<()>> {
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await?;
            let (read, mut write) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(read).lines();
            while let Some(line) = lines.next_line().await? {
                let v: Value = serde_json::from_str(&line).unwrap_or_default();
                let answer = match v["execute"].as_str() {
                    Some("guest-sync") => json!({"return": v["arguments"]["id"]}),
                    Some("guest-exec") => {
                        json!({"return": {"pid": 100 + execs.fetch_add(1, Ordering::SeqCst)}})
                    }
                    Some("guest-exec-status") if done.load(Ordering::SeqCst) => {
                        json!({"return": {"exited": true, "exitcode": 0, "out-data": "YWN0aXZlCg=="}})
                    }
                    _ => json!({"return": {"exited": false}}),
                };
                write.write_all(format!("{answer}\n").as_bytes()).await?;
            }
            Ok(())
        })
    }

    #[tokio::test]
    async fn an_exec_command_that_outlives_its_check_is_not_started_again(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let dir = InstanceDir::new(root.path(), "web");
        std::fs::create_dir_all(dir.file(""))?;
        let listener = tokio::net::UnixListener::bind(dir.file(SOCKET))?;
        let (done, execs) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU32::new(0)),
        );
        let guest = fake_guest(listener, done.clone(), execs.clone());
        let timeout = Duration::from_millis(300);
        let prober = Prober {
            monitor: Weak::new(),
            dir,
            vm: "web".to_owned(),
            pid: 1,
            liveness: false,
            probe: Probe {
                kind: ProbeKind::Exec,
                port: None,
                path: None,
                command: vec!["systemctl".to_owned(), "is-active".to_owned()],
                period: HumanDuration(timeout),
                timeout: HumanDuration(timeout),
                failure_threshold: 1,
                initial_delay: HumanDuration(Duration::ZERO),
            },
            forwards: Vec::new(),
            end: None,
            qga: super::super::guest_agent::SharedAgent::default(),
            outlived: std::sync::Mutex::default(),
        };
        // The first check's command hangs: the check ends at its timeout.
        assert!(tokio::time::timeout(timeout, prober.check()).await.is_err());
        // The next one fails at once, without starting another.
        let again = tokio::time::timeout(timeout, prober.check()).await?;
        assert!(again.is_err_and(|e| e.contains("earlier check still runs (pid 100")));
        assert_eq!(execs.load(Ordering::SeqCst), 1);
        // Once it ended, a new command runs; its output goes with the result.
        done.store(true, Ordering::SeqCst);
        let ok = tokio::time::timeout(timeout, prober.check()).await?;
        assert_eq!(ok.as_deref(), Ok("exit 0: active"));
        assert_eq!(execs.load(Ordering::SeqCst), 2);
        drop(prober);
        guest.abort();
        Ok(())
    }

    #[test]
    fn an_exec_result_says_the_exit_and_the_last_line() {
        let done = |code, signal, out: &str, err: &str| Exited {
            code,
            signal,
            out: out.to_owned(),
            err: err.to_owned(),
        };
        assert_eq!(
            exec_result(&done(Some(3), None, "", "inactive\n\n")),
            Err("exit 3: inactive".to_owned())
        );
        assert_eq!(
            exec_result(&done(None, Some(9), "", "")),
            Err("killed by signal 9".to_owned())
        );
        assert_eq!(
            exec_result(&done(Some(0), None, "a\nb\n", "")),
            Ok("exit 0: b".to_owned())
        );
    }
}
