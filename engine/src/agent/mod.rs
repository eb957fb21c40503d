//! `plasmavmc agent --stdio --root DIR`: the host side of the engine.
//!
//! In: frames on stdin from one controller (the engine), over whatever carries them —
//! a child process's pipes for `local`, `ssh`, or any `exec` command. Out: frames on
//! stdout. The agent owns its root (a lock: one controller at a time, a second one is
//! refused by name) and serves the [`Host`](crate::host::Host) calls with a
//! [`LocalHost`] on it. When the controller goes away (EOF, or no frame for the
//! heartbeat timeout) the agent exits and every QEMU keeps running; the next
//! controller's agent adopts them.
//!
//! ```text
//! Hello ─> Welcome | Refused ─> { Request ─> Response | Ping ─> Pong | ─> Event }* ─> EOF
//! ```

mod files;
pub mod serial;

use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tracing::{info, warn};

use crate::wire::{codec, FromAgent, HostFacts, Reply, Request, ToAgent, VERSION};
pub use files::FileStore;

use crate::host::{Host, LocalHost};
use crate::records::{StateDir, StateLock};

/// Errors that end the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the controller did not say hello within {0:?}")]
    NoHello(Duration),
    #[error("the controller speaks protocol version {theirs}; this agent speaks {VERSION}")]
    Version { theirs: u32 },
    #[error("the first message was not a hello")]
    NotHello,
    #[error("root {}", root.display())]
    Root {
        root: PathBuf,
        #[source]
        source: crate::records::StateError,
    },
    #[error(transparent)]
    Locked(#[from] crate::records::LockError),
    #[error("frame")]
    Frame(#[source] std::io::Error),
    #[error("message")]
    Decode(#[source] serde_json::Error),
}

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub root: PathBuf,
    /// Exit when the controller sends nothing (not even a ping) for this long.
    pub silence: Duration,
    /// Bound on spawn → QMP answering, for starts.
    pub qmp_ready: Duration,
}

/// Serves one controller on `input`/`output` until it goes away.
pub async fn serve<R, W>(opts: AgentOptions, input: R, output: W) -> Result<(), AgentError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut frames = FramedRead::new(input, codec());
    let (tx, mut rx) = mpsc::unbounded_channel::<FromAgent>();
    let mut sink = FramedWrite::new(output, codec());
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let bytes = serde_json::to_vec(&msg).expect("agent messages serialise");
            if sink
                .send(tokio_util::bytes::Bytes::from(bytes))
                .await
                .is_err()
            {
                break;
            }
            if let Some(raw) = msg.raw() {
                if sink
                    .send(tokio_util::bytes::Bytes::copy_from_slice(raw))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    });
    // QEMU runs with its cwd in an instance folder: every path handed to it must be absolute.
    let opts = AgentOptions {
        root: std::path::absolute(&opts.root).unwrap_or(opts.root.clone()),
        ..opts
    };
    let (host, _lock) = match handshake(&opts, &mut frames, &tx).await {
        Ok(accepted) => accepted,
        Err(e) => {
            // Let the refusal reach the controller before going.
            drop(tx);
            let _ = writer.await;
            return Err(e);
        }
    };
    forward_events(&host, tx.clone());
    let store = FileStore::new(&opts.root);
    loop {
        let Ok(next) = tokio::time::timeout(opts.silence, frames.next()).await else {
            warn!(silence = ?opts.silence, "the controller went silent; exiting (every VM keeps running)");
            break;
        };
        match decode(next)? {
            None => {
                info!("the controller went away; exiting (every VM keeps running)");
                break;
            }
            Some(ToAgent::Ping { seq }) => {
                let _ = tx.send(FromAgent::Pong { seq });
            }
            Some(ToAgent::Request { id, mut request }) => {
                if let Some(data) = request.raw_mut() {
                    match frames.next().await {
                        Some(Ok(bytes)) => *data = bytes.to_vec(),
                        Some(Err(e)) => return Err(AgentError::Frame(e)),
                        None => break,
                    }
                }
                let (host, store, tx) = (host.clone(), store.clone(), tx.clone());
                tokio::spawn(async move {
                    let result = handle(&host, &store, request).await;
                    let _ = tx.send(FromAgent::Response { id, result });
                });
            }
            Some(ToAgent::Hello { .. }) => warn!("a second hello; ignored"),
        }
    }
    Ok(())
}

/// Reads the hello, takes the root's lock, and welcomes the controller — or sends it a
/// refusal saying why (other version, another controller holds the root).
async fn handshake<R: AsyncRead + Unpin>(
    opts: &AgentOptions,
    frames: &mut FramedRead<R, LengthDelimitedCodec>,
    tx: &mpsc::UnboundedSender<FromAgent>,
) -> Result<(LocalHost, StateLock), AgentError> {
    let wait = Duration::from_secs(30);
    let hello = tokio::time::timeout(wait, frames.next())
        .await
        .map_err(|_| AgentError::NoHello(wait))?;
    let engine = match decode(hello)? {
        Some(ToAgent::Hello { version, engine }) if version == VERSION => engine,
        Some(ToAgent::Hello { version, .. }) => {
            let _ = tx.send(FromAgent::Refused {
                reason: format!("protocol version {version} is not {VERSION}"),
            });
            return Err(AgentError::Version { theirs: version });
        }
        _ => return Err(AgentError::NotHello),
    };
    let state = StateDir::open(&opts.root).map_err(|source| AgentError::Root {
        root: opts.root.clone(),
        source,
    })?;
    let lock = StateLock::acquire(
        &state.root().join("agent.lock"),
        &format!("plasmavmc agent for {engine}"),
    )
    .inspect_err(|e| {
        let _ = tx.send(FromAgent::Refused {
            reason: e.to_string(),
        });
    })?;
    let name = hostname();
    let host = LocalHost::new(
        &name,
        &opts.root,
        plasmavmc_specs::Accel::Auto,
        opts.qmp_ready,
    );
    let facts = HostFacts {
        hostname: name,
        root: opts.root.clone(),
        capacity: crate::host::local_capacity(),
        qemu: crate::qemu::process::qemu_binary(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let _ = tx.send(FromAgent::Welcome {
        version: VERSION,
        host: facts,
    });
    info!(engine = %engine, root = %opts.root.display(), "serving a controller");
    Ok((host, lock))
}

fn decode(
    frame: Option<Result<tokio_util::bytes::BytesMut, std::io::Error>>,
) -> Result<Option<ToAgent>, AgentError> {
    match frame {
        None => Ok(None),
        Some(Err(e)) => Err(AgentError::Frame(e)),
        Some(Ok(bytes)) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(AgentError::Decode),
    }
}

async fn handle(host: &LocalHost, store: &FileStore, request: Request) -> Result<Reply, String> {
    let done = |()| Reply::Done;
    match request {
        Request::Inventory => reply(host.inventory().await, |inventory| Reply::Inventory {
            inventory: Box::new(inventory),
        }),
        Request::Create { vm } => reply(host.create(&vm).await, done),
        Request::Recover { vm } => reply(host.recover(&vm).await, done),
        Request::Update { vm } => reply(host.update(&vm).await, done),
        Request::Start { vm } => reply(host.start(&vm).await, |pid| Reply::Pid { pid }),
        Request::Stop { vm, timeout_ms } => reply(
            host.stop(&vm, Duration::from_millis(timeout_ms)).await,
            |outcome| Reply::Stopped { outcome },
        ),
        Request::Delete { vm } => reply(host.delete(&vm).await, |retained| Reply::Deleted {
            retained,
        }),
        Request::Prune { folder, pid } => reply(host.prune(&folder, pid).await, done),
        Request::DeleteDisk { path, shared } => {
            reply(host.delete_disk(&path, shared.as_deref()).await, |bytes| {
                Reply::Bytes { bytes }
            })
        }
        Request::PrepareIncoming {
            vm,
            from,
            listen,
            mirror,
        } => reply(
            host.prepare_incoming(&vm, &from, &listen, &mirror).await,
            |incoming| Reply::Incoming { incoming },
        ),
        Request::MigrateOut { vm, to, tuning } => {
            reply(host.migrate_out(&vm, &to, &tuning).await, |stats| {
                Reply::Migrated { stats }
            })
        }
        Request::MigrationStats { vm } => reply(host.migration_stats(&vm).await, |stats| {
            Reply::Migrated { stats }
        }),
        Request::Discard { vm } => reply(host.discard(&vm).await, done),
        Request::Inject { vm, fault } => {
            reply(host.inject(&vm, fault).await, |pid| Reply::Pid { pid })
        }
        Request::ReadDisk { vm, disk, offset } => {
            reply(host.read_disk(&vm, &disk, offset).await, |chunk| {
                Reply::DiskChunk { chunk }
            })
        }
        Request::WriteDisk {
            vm,
            disk,
            offset,
            chunk,
            finish,
        } => reply(
            host.write_disk(&vm, &disk, offset, &chunk, finish.as_deref())
                .await,
            done,
        ),
        Request::HasFile { sha256 } => reply(store.get(&sha256), |path| Reply::File { path }),
        Request::PutFile {
            sha256,
            offset,
            data,
            last,
        } => {
            let store = store.clone();
            let put = tokio::task::spawn_blocking(move || store.put(&sha256, offset, &data, last))
                .await
                .map_err(|e| e.to_string())?;
            reply(put, |path| Reply::File { path })
        }
    }
}

/// A host call's result as the protocol answers it: the reply, or the error's whole chain.
fn reply<T, E: std::error::Error>(
    result: Result<T, E>,
    ok: impl FnOnce(T) -> Reply,
) -> Result<Reply, String> {
    result.map(ok).map_err(|e| crate::errors::error_chain(&e))
}

fn forward_events(host: &LocalHost, tx: mpsc::UnboundedSender<FromAgent>) {
    let mut events = host.subscribe();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) => {
                    if tx.send(FromAgent::Event { event }).is_err() {
                        break;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!(lost = n, "host events lagged");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned())
}
