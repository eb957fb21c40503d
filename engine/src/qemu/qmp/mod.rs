//! Async client for the QEMU Machine Protocol (QMP) over a unix socket.
//!
//! In: the path of a QMP socket (or an already-connected stream) and commands to execute.
//! Out: command results, every asynchronous event in order, and how the connection ended (with
//! the `SHUTDOWN` event's data if QEMU sent one). Written against QEMU 7.2's replies.
//!
//! It must not touch anything but its own socket: no QEMU process handling, no instance files.
//! One reader task routes replies by numeric id and forwards events; one writer task writes each
//! command whole. Both end when the last [`Qmp`] handle is dropped.

mod conn;
mod wire;

#[cfg(test)]
pub(crate) mod tests;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;
use tokio::io::BufReader;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;

pub use conn::connect_unix;
use conn::{EventSink, Outgoing, Pending, ReaderState, Shared};
use wire::Answer;

/// Default bound for one command, overridable with [`Qmp::with_timeout`].
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the QMP client.
#[derive(Debug, Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {}", .path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QMP handshake failed: {reason} (received {received:?})")]
    Handshake {
        reason: &'static str,
        /// An excerpt of the offending line (empty when nothing was received).
        received: String,
    },
    #[error("QMP handshake did not complete within {after:?}")]
    HandshakeTimeout { after: Duration },
    #[error("QMP command {command:?} got no reply within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("QMP command {command:?} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP connection closed before command {command:?} got a reply")]
    Closed { command: String },
    #[error("cannot send QMP command {command:?}")]
    Send {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot decode the reply to QMP command {command:?}")]
    Decode {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("malformed QMP message {line:?}")]
    Protocol {
        /// An excerpt of the offending line.
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("QMP line longer than {limit} bytes")]
    LineTooLong { limit: usize },
    #[error("I/O error on the QMP connection")]
    Io(#[source] io::Error),
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// The event name, e.g. `SHUTDOWN`.
    pub event: String,
    /// The event's `data`, [`Value::Null`] when QEMU sent none.
    pub data: Value,
    /// When QEMU emitted it; `None` when QEMU had no clock reading.
    pub timestamp: Option<SystemTime>,
}

/// The QEMU version from the greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpVersion {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Closed {
    /// The data (`guest`, `reason`) of the first `SHUTDOWN` event, if one came before the end.
    pub shutdown: Option<Value>,
}

/// The reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmRunState {
    pub running: bool,
    /// QEMU's run state, e.g. `prelaunch`, `running`, `paused`, `shutdown`.
    pub status: String,
}

/// A negotiated QMP connection. Cheap to clone; all methods take `&self`.
#[derive(Clone)]
pub struct Qmp {
    shared: Arc<Shared>,
    _tasks: Arc<TaskGuard>,
    command_timeout: Duration,
}

/// Aborts the I/O tasks when the last handle goes away.
struct TaskGuard {
    reader: AbortHandle,
    writer: AbortHandle,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// Removes a waiter from the pending map when its caller stops waiting, for whatever reason.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.pending().waiters.remove(&self.id);
    }
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp")
            .field("version", &self.shared.version)
            .field("command_timeout", &self.command_timeout)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connects to a QMP unix socket, reads the greeting, negotiates `qmp_capabilities`.
    /// The whole handshake, connecting included, is bounded by `timeout`.
    ///
    /// Paths too long for a unix socket address are reached through the parent directory.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let attempt = async {
            let stream = conn::connect_socket(path).await?;
            Self::establish(stream).await
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| QmpError::HandshakeTimeout { after: timeout })?
    }

    /// Like [`Qmp::connect`], on an already-connected stream.
    pub async fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Qmp, QmpError> {
        tokio::time::timeout(timeout, Self::establish(stream))
            .await
            .map_err(|_| QmpError::HandshakeTimeout { after: timeout })?
    }

    async fn establish(stream: UnixStream) -> Result<Qmp, QmpError> {
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let mut sink = EventSink::new(events_tx);
        let version = conn::handshake(&mut reader, &mut write, &mut sink).await?;

        let (closed_tx, closed_rx) = watch::channel(None);
        let (outgoing, queue) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            version,
            next_id: AtomicU64::new(1),
            pending: Mutex::new(Pending::default()),
            outgoing,
            events: Mutex::new(Some(events_rx)),
            closed: closed_rx,
        });
        let state = ReaderState::new(Arc::clone(&shared), sink, closed_tx);
        let reader = tokio::spawn(conn::run_reader(reader, state)).abort_handle();
        let writer = tokio::spawn(conn::run_writer(write, queue, Arc::clone(&shared)));
        Ok(Qmp {
            shared,
            _tasks: Arc::new(TaskGuard {
                reader,
                writer: writer.abort_handle(),
            }),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        })
    }

    /// Sets the bound used by [`Qmp::execute`] and the helpers (default 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// The QEMU version announced in the greeting.
    pub fn version(&self) -> &QmpVersion {
        &self.shared.version
    }

    /// Executes `command` and returns its `return` value, bounded by the default timeout.
    pub async fn execute(&self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.execute_timeout(command, args, self.command_timeout)
            .await
    }

    /// Executes `command` and returns its `return` value, bounded by `timeout`.
    ///
    /// After a timeout the connection stays usable; a late reply is discarded.
    pub async fn execute_timeout(
        &self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let closed = || QmpError::Closed {
            command: command.to_owned(),
        };
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.shared.pending();
            if pending.closed {
                return Err(closed());
            }
            pending.waiters.insert(id, tx);
        }
        let _waiting = PendingGuard {
            shared: &self.shared,
            id,
        };
        let bytes = wire::encode_command(command, args, id);
        if self.shared.outgoing.send(Outgoing { id, bytes }).is_err() {
            return Err(closed());
        }
        let answer = match tokio::time::timeout(timeout, rx).await {
            Err(_) => {
                return Err(QmpError::Timeout {
                    command: command.to_owned(),
                    after: timeout,
                })
            }
            Ok(Err(_)) => return Err(closed()),
            Ok(Ok(answer)) => answer,
        };
        match answer {
            Answer::Return(value) => Ok(value),
            Answer::Error { class, desc } => Err(QmpError::Command {
                command: command.to_owned(),
                class,
                desc,
            }),
            Answer::SendFailed(source) if conn::is_disconnect(&source) => Err(closed()),
            Answer::SendFailed(source) => Err(QmpError::Send {
                command: command.to_owned(),
                source,
            }),
        }
    }

    /// Executes `command` and decodes its `return` value into `T`.
    pub async fn query<T: DeserializeOwned>(
        &self,
        command: &str,
        args: Option<Value>,
    ) -> Result<T, QmpError> {
        let value = self.execute(command, args).await?;
        serde_json::from_value(value).map_err(|source| QmpError::Decode {
            command: command.to_owned(),
            source,
        })
    }

    /// Every event QEMU sends, from the greeting on, in order. Unbounded: events accumulate
    /// until taken. Can be taken once; yields `None` after the connection closed.
    pub fn take_events(&self) -> Option<mpsc::UnboundedReceiver<QmpEvent>> {
        conn::lock(&self.shared.events).take()
    }

    /// Resolves once the connection is closed (EOF or error), with the first `SHUTDOWN`'s data.
    pub async fn closed(&self) -> Closed {
        let mut closed = self.shared.closed.clone();
        let result = closed.wait_for(Option::is_some).await;
        result
            .ok()
            .and_then(|state| (*state).clone())
            .unwrap_or_default()
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.borrow().is_some()
    }

    /// `query-status`.
    pub async fn query_status(&self) -> Result<VmRunState, QmpError> {
        self.query("query-status", None).await
    }

    /// `quit`: QEMU exits. Its reply and EOF before the reply both count as success; a
    /// connection already closed before the call is `Closed`. Use [`Qmp::closed`] to wait for
    /// the end.
    pub async fn quit(&self) -> Result<(), QmpError> {
        const QUIT: &str = "quit";
        if self.is_closed() {
            return Err(QmpError::Closed {
                command: QUIT.to_owned(),
            });
        }
        match self.execute(QUIT, None).await {
            Ok(_) | Err(QmpError::Closed { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// `system_powerdown`: asks the guest to power off (ACPI); it may ignore the request.
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(drop)
    }
}
