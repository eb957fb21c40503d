//! A client for qemu-guest-agent over the VM's `qga.sock` (a virtio-serial port named
//! `org.qemu.guest_agent.0` in the guest).
//!
//! In: the socket's path and commands. Out: their answers, each bounded by a timeout.
//! QEMU 7.2 / qemu-guest-agent facts: the socket serves one client at a time; what was
//! written while no guest agent listened is read by the next one that starts, so every
//! conversation opens with `guest-sync` and a random id, and lines before the answer
//! carrying that id are stale (discarded). Nothing here knows QMP or instance records.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The socket in the instance folder (QEMU runs there: relative).
pub const SOCKET: &str = "qga.sock";
/// Lines longer than this are not a guest agent's answer.
const MAX_LINE: usize = 1 << 20;

/// The arguments that give a guest its guest-agent channel (none without it).
pub fn args(enabled: bool) -> &'static [&'static str] {
    if !enabled {
        return &[];
    }
    &[
        "-device",
        "virtio-serial-pci,id=qga-serial",
        "-chardev",
        "socket,id=qga0,path=qga.sock,server=on,wait=off",
        "-device",
        "virtserialport,bus=qga-serial.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]
}

/// Errors talking to the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    #[error("cannot connect to the guest agent's socket {}", .path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the guest agent did not answer {command} within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("the guest agent's channel closed")]
    Closed,
    #[error("I/O error on the guest agent's channel")]
    Io(#[source] io::Error),
    #[error("the guest agent refused {command}: {desc}")]
    Refused { command: String, desc: String },
    #[error("cannot read the guest agent's answer to {command}")]
    Decode {
        command: String,
        #[source]
        source: serde_json::Error,
    },
}

/// One connection to a guest agent.
#[derive(Debug)]
pub struct GuestAgent {
    stream: BufReader<UnixStream>,
}

impl GuestAgent {
    /// Connects to the socket (no guest needs to listen yet).
    pub async fn connect(path: &Path) -> Result<Self, QgaError> {
        let stream = super::qmp::connect_unix(path)
            .await
            .map_err(|source| QgaError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            stream: BufReader::new(stream),
        })
    }

    /// `guest-sync` with a fresh random id: the lines before its answer are dropped.
    pub async fn sync(&mut self, timeout: Duration) -> Result<(), QgaError> {
        let id = u64::from(rand_id());
        let command = json!({"execute": "guest-sync", "arguments": {"id": id}});
        tokio::time::timeout(timeout, async {
            self.send(&command).await?;
            loop {
                let line = self.line().await?;
                let Ok(value) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if value.get("return").and_then(Value::as_u64) == Some(id) {
                    return Ok(());
                }
            }
        })
        .await
        .map_err(|_| QgaError::Timeout {
            command: "guest-sync".to_owned(),
            after: timeout,
        })?
    }

    /// Runs `command` (after a [`Self::sync`]) and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QgaError> {
        let mut message = json!({ "execute": command });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let answer = tokio::time::timeout(timeout, async {
            self.send(&message).await?;
            loop {
                let line = self.line().await?;
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    return Ok::<_, QgaError>(value);
                }
            }
        })
        .await
        .map_err(|_| QgaError::Timeout {
            command: command.to_owned(),
            after: timeout,
        })??;
        if let Some(error) = answer.get("error") {
            return Err(QgaError::Refused {
                command: command.to_owned(),
                desc: error
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no description")
                    .to_owned(),
            });
        }
        Ok(answer.get("return").cloned().unwrap_or(Value::Null))
    }

    /// `guest-get-osinfo`: the guest's OS in its own words (`pretty-name`, else `name`).
    pub async fn os(&mut self, timeout: Duration) -> Result<Option<String>, QgaError> {
        let info = self.execute("guest-get-osinfo", None, timeout).await?;
        Ok(["pretty-name", "name", "id"]
            .iter()
            .find_map(|k| info.get(*k).and_then(Value::as_str))
            .map(str::to_owned))
    }

    /// `guest-network-get-interfaces`: the guest's addresses, `ADDR/PREFIX`, loopback left
    /// out.
    pub async fn addresses(&mut self, timeout: Duration) -> Result<Vec<String>, QgaError> {
        const COMMAND: &str = "guest-network-get-interfaces";
        let value = self.execute(COMMAND, None, timeout).await?;
        let interfaces: Vec<Interface> =
            serde_json::from_value(value).map_err(|source| QgaError::Decode {
                command: COMMAND.to_owned(),
                source,
            })?;
        Ok(interfaces
            .into_iter()
            .filter(|i| i.name != "lo")
            .flat_map(|i| i.ip_addresses)
            .map(|a| format!("{}/{}", a.ip_address, a.prefix))
            .collect())
    }

    /// `guest-exec` of `argv` (a program, looked up in the guest agent's `PATH`, and its
    /// arguments) with its output captured; returns the command's pid in the guest.
    pub async fn exec(&mut self, argv: &[String], timeout: Duration) -> Result<i64, QgaError> {
        const COMMAND: &str = "guest-exec";
        let (program, rest) = argv.split_first().ok_or_else(|| QgaError::Refused {
            command: COMMAND.to_owned(),
            desc: "no command to run".to_owned(),
        })?;
        let arguments = json!({"path": program, "arg": rest, "capture-output": true});
        let value = self.execute(COMMAND, Some(arguments), timeout).await?;
        value
            .get("pid")
            .and_then(Value::as_i64)
            .ok_or_else(|| QgaError::Refused {
                command: COMMAND.to_owned(),
                desc: format!("no pid in its answer: {value}"),
            })
    }

    /// `guest-exec-status` of the command `pid`: `None` while it runs.
    pub async fn exec_status(
        &mut self,
        pid: i64,
        timeout: Duration,
    ) -> Result<Option<Exited>, QgaError> {
        const COMMAND: &str = "guest-exec-status";
        let value = self
            .execute(COMMAND, Some(json!({ "pid": pid })), timeout)
            .await?;
        let status: ExecStatus =
            serde_json::from_value(value).map_err(|source| QgaError::Decode {
                command: COMMAND.to_owned(),
                source,
            })?;
        let text = |data: Option<String>| {
            use base64::Engine;
            let bytes = data
                .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
                .unwrap_or_default();
            String::from_utf8_lossy(&bytes).into_owned()
        };
        Ok(status.exited.then(|| Exited {
            code: status.exitcode,
            signal: status.signal,
            out: text(status.out_data),
            err: text(status.err_data),
        }))
    }

    async fn send(&mut self, message: &Value) -> Result<(), QgaError> {
        let mut bytes = serde_json::to_vec(message).expect("a JSON value always serialises");
        bytes.push(b'\n');
        self.stream
            .get_mut()
            .write_all(&bytes)
            .await
            .map_err(QgaError::Io)
    }

    async fn line(&mut self) -> Result<String, QgaError> {
        let mut line = String::new();
        let n = (&mut self.stream)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await
            .map_err(QgaError::Io)?;
        if n == 0 {
            return Err(QgaError::Closed);
        }
        Ok(line)
    }
}

/// A command run by `guest-exec` that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exited {
    /// Its exit code (none when a signal ended it).
    pub code: Option<i64>,
    pub signal: Option<i64>,
    /// What it wrote on its standard output and error (the guest agent may cut them).
    pub out: String,
    pub err: String,
}

/// The answer of `guest-exec-status`.
#[derive(Debug, Deserialize)]
struct ExecStatus {
    exited: bool,
    #[serde(default)]
    exitcode: Option<i64>,
    #[serde(default)]
    signal: Option<i64>,
    #[serde(default, rename = "out-data")]
    out_data: Option<String>,
    #[serde(default, rename = "err-data")]
    err_data: Option<String>,
}

/// One interface of `guest-network-get-interfaces`.
#[derive(Debug, Deserialize)]
struct Interface {
    name: String,
    #[serde(default, rename = "ip-addresses")]
    ip_addresses: Vec<Address>,
}

#[derive(Debug, Deserialize)]
struct Address {
    #[serde(rename = "ip-address")]
    ip_address: String,
    prefix: u32,
}

/// An id for `guest-sync`: different on every call (time and a counter), which is all
/// the protocol needs (telling this answer from stale ones).
fn rand_id() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (nanos ^ COUNTER.fetch_add(0x9e37_79b9, Ordering::Relaxed)) & 0x7fff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_lines_before_the_sync_answer_are_dropped(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(SOCKET);
        let listener = tokio::net::UnixListener::bind(&path)?;
        let guest = tokio::spawn(async move {
            let (stream, _) = listener.accept().await?;
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            // A stale answer first, then the sync's; then each command's.
            write.write_all(b"{\"return\": 7}\n{\"ret").await?;
            while let Some(line) = lines.next_line().await? {
                let v: Value = serde_json::from_str(&line)?;
                let answer = match v["execute"].as_str() {
                    Some("guest-sync") => json!({"return": v["arguments"]["id"]}),
                    Some("guest-ping") => json!({"return": {}}),
                    Some("guest-get-osinfo") => {
                        json!({"return": {"name": "Busybox", "pretty-name": "Busybox 1.35"}})
                    }
                    Some("guest-network-get-interfaces") => json!({"return": [
                        {"name": "lo", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]},
                        {"name": "eth0", "hardware-address": "52:54:00:00:00:01", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24}]}
                    ]}),
                    Some("guest-exec") => {
                        assert_eq!(v["arguments"]["path"], "sh");
                        assert_eq!(v["arguments"]["arg"], json!(["-c", "exit 3"]));
                        json!({"return": {"pid": 41}})
                    }
                    Some("guest-exec-status") if v["arguments"]["pid"] == 41 => {
                        json!({"return": {"exited": true, "exitcode": 3, "out-data": "b2sK"}})
                    }
                    Some("guest-exec-status") => json!({"return": {"exited": false}}),
                    _ => json!({"error": {"class": "CommandNotFound", "desc": "no such command"}}),
                };
                write.write_all(format!("\n{answer}\n").as_bytes()).await?;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        });
        let t = Duration::from_secs(5);
        let mut qga = GuestAgent::connect(&path).await?;
        qga.sync(t).await?;
        assert_eq!(qga.execute("guest-ping", None, t).await?, json!({}));
        assert_eq!(qga.os(t).await?.as_deref(), Some("Busybox 1.35"));
        assert_eq!(qga.addresses(t).await?, ["10.0.2.15/24"]);
        let argv = ["sh", "-c", "exit 3"].map(str::to_owned);
        let pid = qga.exec(&argv, t).await?;
        assert_eq!(qga.exec_status(7, t).await?, None);
        let done = qga.exec_status(pid, t).await?.ok_or("pid 41 ended")?;
        assert_eq!((done.code, done.out.as_str()), (Some(3), "ok\n"));
        assert!(matches!(
            qga.execute("guest-file-open", None, t).await,
            Err(QgaError::Refused { .. })
        ));
        drop(qga);
        guest.await?.map_err(|e| e.to_string())?;
        Ok(())
    }
}
