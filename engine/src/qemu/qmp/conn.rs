//! QMP connection plumbing: socket connect, capabilities handshake, and the reader/writer tasks.
//!
//! In: a socket path or a connected stream. Out: a negotiated connection whose reader task routes
//! replies to waiting callers and events to the event channel, and whose writer task serialises
//! outgoing commands. Touches only its own socket; never the QEMU process or instance files.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::Value;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use super::wire::{self, Answer, Message};
use super::{Closed, QmpError, QmpEvent, QmpVersion};

/// Paths longer than this are reached through `/proc/self/fd/<dir fd>/<name>` (the kernel's
/// limit is 107 bytes plus the terminating NUL; the margin is deliberate).
const SHORT_PATH_MAX: usize = 100;

/// The command used for capabilities negotiation, and the id it is sent with.
const CAPABILITIES: &str = "qmp_capabilities";
const CAPABILITIES_ID: u64 = 0;

/// State shared between the `Qmp` handles and the I/O tasks.
pub(super) struct Shared {
    pub(super) version: QmpVersion,
    pub(super) next_id: AtomicU64,
    pub(super) pending: Mutex<Pending>,
    pub(super) outgoing: mpsc::UnboundedSender<Outgoing>,
    pub(super) events: Mutex<Option<mpsc::UnboundedReceiver<QmpEvent>>>,
    pub(super) closed: watch::Receiver<Option<Closed>>,
}

/// Callers waiting for a reply, by command id.
#[derive(Default)]
pub(super) struct Pending {
    /// Set once the reader stopped: no new waiter may register after that.
    pub(super) closed: bool,
    pub(super) waiters: HashMap<u64, oneshot::Sender<Answer>>,
}

/// One encoded command on its way to the writer task.
pub(super) struct Outgoing {
    pub(super) id: u64,
    pub(super) bytes: Vec<u8>,
}

impl Shared {
    pub(super) fn pending(&self) -> MutexGuard<'_, Pending> {
        lock(&self.pending)
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Connects to a unix socket, going through the parent directory's fd when the path is too long
/// for `sockaddr_un`.
pub(super) async fn connect_socket(path: &Path) -> Result<UnixStream, QmpError> {
    connect_unix(path)
        .await
        .map_err(|source| QmpError::Connect {
            path: path.to_owned(),
            source,
        })
}

/// [`connect_socket`] with the plain I/O error (the serial console's socket uses it too).
pub async fn connect_unix(path: &Path) -> io::Result<UnixStream> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return UnixStream::connect(path).await;
    };
    if path.as_os_str().len() <= SHORT_PATH_MAX {
        return UnixStream::connect(path).await;
    }
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    // O_PATH needs no read permission on the directory; the fd only anchors the lookup.
    let dir_fd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir_fd.as_raw_fd())).join(name);
    let stream = UnixStream::connect(&short).await;
    drop(dir_fd);
    stream
}

/// Events seen so far, forwarded in order; remembers the first `SHUTDOWN`.
pub(super) struct EventSink {
    tx: mpsc::UnboundedSender<QmpEvent>,
    shutdown: Option<Value>,
}

impl EventSink {
    pub(super) fn new(tx: mpsc::UnboundedSender<QmpEvent>) -> Self {
        Self { tx, shutdown: None }
    }

    fn push(&mut self, event: QmpEvent) {
        if event.event == "SHUTDOWN" && self.shutdown.is_none() {
            self.shutdown = Some(event.data.clone());
        }
        debug!(event = %event.event, "QMP event");
        // Nobody listening (receiver dropped) is fine: events are best-effort for the taker.
        let _ = self.tx.send(event);
    }
}

/// Reads the greeting and negotiates capabilities. Events arriving meanwhile go to `sink`.
pub(super) async fn handshake(
    reader: &mut BufReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
    sink: &mut EventSink,
) -> Result<QmpVersion, QmpError> {
    let mut line = Vec::new();
    if !wire::read_line(reader, &mut line).await? {
        return Err(handshake_error(
            "connection closed before the greeting",
            &line,
        ));
    }
    let version = match wire::parse_message(&line) {
        Ok(Message::Greeting(greeting)) => wire::parse_version(&greeting)
            .ok_or_else(|| handshake_error("greeting lacks version.qemu", &line))?,
        Ok(_) => {
            return Err(handshake_error(
                "first message is not a QMP greeting",
                &line,
            ))
        }
        Err(_) => return Err(handshake_error("greeting is not JSON", &line)),
    };
    let request = wire::encode_command(CAPABILITIES, None, CAPABILITIES_ID);
    writer
        .write_all(&request)
        .await
        .map_err(|source| QmpError::Send {
            command: CAPABILITIES.to_owned(),
            source,
        })?;
    loop {
        if !wire::read_line(reader, &mut line).await? {
            return Err(handshake_error(
                "connection closed during capabilities negotiation",
                &line,
            ));
        }
        if wire::is_blank(&line) {
            continue;
        }
        match wire::parse_message(&line)? {
            Message::Event(event) => sink.push(event),
            Message::Reply { answer, .. } => {
                return match answer {
                    Answer::Return(_) => Ok(version),
                    Answer::Error { class, desc } => Err(QmpError::Command {
                        command: CAPABILITIES.to_owned(),
                        class,
                        desc,
                    }),
                    Answer::SendFailed(source) => Err(QmpError::Send {
                        command: CAPABILITIES.to_owned(),
                        source,
                    }),
                };
            }
            Message::Greeting(_) | Message::Unknown => {
                return Err(handshake_error(
                    "unexpected message during capabilities negotiation",
                    &line,
                ));
            }
        }
    }
}

fn handshake_error(reason: &'static str, line: &[u8]) -> QmpError {
    QmpError::Handshake {
        reason,
        received: wire::excerpt(line),
    }
}

/// The reader task's state. Dropping it — at EOF, on error, or when the task is aborted — closes
/// the connection for everyone: pending callers get `Closed`, `closed()` waiters wake up, and the
/// event channel ends after the last event.
pub(super) struct ReaderState {
    shared: Arc<Shared>,
    sink: Option<EventSink>,
    closed_tx: watch::Sender<Option<Closed>>,
}

impl ReaderState {
    pub(super) fn new(
        shared: Arc<Shared>,
        sink: EventSink,
        closed_tx: watch::Sender<Option<Closed>>,
    ) -> Self {
        Self {
            shared,
            sink: Some(sink),
            closed_tx,
        }
    }

    fn handle(&mut self, line: &[u8]) {
        if wire::is_blank(line) {
            return;
        }
        match wire::parse_message(line) {
            Ok(Message::Event(event)) => {
                if let Some(sink) = &mut self.sink {
                    sink.push(event);
                }
            }
            Ok(Message::Reply { id, answer }) => self.dispatch(id.as_ref(), answer),
            Ok(Message::Greeting(_) | Message::Unknown) => {
                warn!(line = %wire::excerpt(line), "ignoring unexpected QMP message");
            }
            Err(error) => warn!(%error, "ignoring malformed QMP message"),
        }
    }

    fn dispatch(&self, id: Option<&Value>, answer: Answer) {
        let Some(id) = id.and_then(Value::as_u64) else {
            warn!(?id, "ignoring QMP reply without a numeric id");
            return;
        };
        let waiter = self.shared.pending().waiters.remove(&id);
        if let Some(waiter) = waiter {
            // The caller may have given up in the meantime; that is fine.
            drop(waiter.send(answer));
        } else {
            debug!(id, "ignoring QMP reply nobody waits for (timed out?)");
        }
    }
}

impl Drop for ReaderState {
    fn drop(&mut self) {
        let shutdown = self.sink.take().and_then(|sink| sink.shutdown);
        let waiters = {
            let mut pending = self.shared.pending();
            pending.closed = true;
            std::mem::take(&mut pending.waiters)
        };
        // Dropping the senders wakes every waiter with `Closed`.
        drop(waiters);
        self.closed_tx.send_replace(Some(Closed { shutdown }));
    }
}

/// Reads lines until EOF or error, dispatching each; dropping `state` closes the connection.
pub(super) async fn run_reader(mut reader: BufReader<OwnedReadHalf>, mut state: ReaderState) {
    let mut line = Vec::new();
    loop {
        match wire::read_line(&mut reader, &mut line).await {
            Ok(true) => state.handle(&line),
            Ok(false) => {
                debug!("QMP connection closed by QEMU");
                break;
            }
            // QEMU 7.2 resets rather than closes the socket after `quit`: an ordinary end.
            Err(QmpError::Io(error)) if is_disconnect(&error) => {
                debug!(%error, "QMP connection reset by QEMU");
                break;
            }
            Err(error) => {
                warn!(%error, "closing QMP connection");
                break;
            }
        }
    }
}

/// Writes queued commands whole (so a caller giving up never leaves half a message on the wire),
/// until the connection is closed; then drops the write half so the socket is released.
pub(super) async fn run_writer(
    mut writer: OwnedWriteHalf,
    mut queue: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let mut closed = shared.closed.clone();
    loop {
        let next = tokio::select! {
            next = queue.recv() => next,
            _ = closed.wait_for(Option::is_some) => None,
        };
        let Some(Outgoing { id, bytes }) = next else {
            break;
        };
        if let Err(error) = writer.write_all(&bytes).await {
            let waiter = shared.pending().waiters.remove(&id);
            if let Some(waiter) = waiter {
                drop(waiter.send(Answer::SendFailed(error)));
            }
        }
    }
}

/// Whether a write error means the peer went away rather than something stranger.
pub(super) fn is_disconnect(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}
