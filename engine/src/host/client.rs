//! [`Host`] over the agent protocol: how the engine reaches every host, this machine
//! included (one code path).
//!
//! In: an argv that starts `plasmavmc agent --stdio` somewhere (a child process, `ssh`,
//! any `exec` command). Out: the `Host` calls as requests over its stdin/stdout, events
//! from it, and heartbeats (a ping every interval; the time of the last frame tells how
//! healthy the channel is). Files a spec names (kernels, base images) are copied to the
//! host once, content-addressed and checksummed, and the instance is rewritten to use
//! the host's copies; images by URL are downloaded by the host itself (`FetchImage`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{debug, info, warn};

use super::{Host, HostError};
use crate::digest::sha256_file_cached;
use crate::observe::Inventory;
use crate::qemu::instance::VmInstance;
use crate::qemu::migrate::{Stats, Tuning};
use crate::qemu::seed::SeedFile;
use crate::wire::{codec, FromReply};
use crate::wire::{to_frames, FromAgent, HostFacts, Reply, Request, ToAgent, CHUNK, VERSION};
use crate::wire::{DiskChunk, HostEvent, Incoming, StopOutcome};

/// How a connection behaves.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    /// Bound on spawn → welcome.
    pub hello_timeout: Duration,
    /// A ping every this long.
    pub heartbeat: Duration,
    /// A call gives up when the agent sends nothing (not even a pong) for this long
    /// while it waits: a silent host is down, and no caller waits out a long timeout.
    pub down_after: Duration,
    /// Bound on requests that do not say otherwise.
    pub request_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(1),
            down_after: Duration::from_secs(5),
            request_timeout: Duration::from_secs(120),
        }
    }
}

/// Bound on one image download (a lost reply, in practice): a day.
const FETCH_BOUND: Duration = Duration::from_secs(24 * 3600);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Reply, String>>>>>;

/// A host reached through its agent.
#[derive(Debug, Clone)]
pub struct AgentHost {
    name: String,
    facts: HostFacts,
    out: mpsc::UnboundedSender<ToAgent>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    last_frame: Arc<Mutex<Instant>>,
    closed: watch::Receiver<bool>,
    hangup: Arc<watch::Sender<bool>>,
    events: broadcast::Sender<HostEvent>,
    files: Arc<tokio::sync::Mutex<HashMap<String, PathBuf>>>,
    /// One gate per file digest being sent: actions running at once that need the same
    /// file (two moves to one host, one kernel) send it once, never into one part file.
    sends: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    opts: ConnectOptions,
}

impl AgentHost {
    /// Starts `argv` and says hello; fails with the agent's refusal or its stderr.
    pub async fn connect(
        name: &str,
        argv: &[String],
        opts: ConnectOptions,
    ) -> Result<Self, HostError> {
        let unreachable = |reason: String| HostError::Unreachable {
            host: name.to_owned(),
            reason,
        };
        let (program, rest) = argv
            .split_first()
            .ok_or_else(|| unreachable("empty agent command".to_owned()))?;
        let mut child = tokio::process::Command::new(program)
            .args(rest)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| unreachable(format!("cannot run {program}: {e}")))?;
        let to_agent = child.stdin.take().expect("stdin was piped");
        let from_agent = child.stdout.take().expect("stdout was piped");
        let stderr = child.stderr.take().expect("stderr was piped");
        let stderr_tail = Arc::new(Mutex::new(String::new()));
        let stderr_closed = relay_stderr(name, stderr, stderr_tail.clone());
        tokio::spawn(async move {
            // Reap the agent; its exit is seen as the channel closing.
            let _ = child.wait().await;
        });
        let (out, mut out_rx) = mpsc::unbounded_channel::<ToAgent>();
        let (hangup, mut hung_up) = watch::channel(false);
        let mut sink = FramedWrite::new(to_agent, codec());
        tokio::spawn(async move {
            // Ends on `close()`: dropping the sink closes the agent's stdin, so it exits.
            'send: loop {
                let msg = tokio::select! {
                    msg = out_rx.recv() => msg,
                    _ = hung_up.changed() => None,
                };
                let Some(msg) = msg else { break };
                for frame in to_frames(&msg) {
                    if sink.send(frame).await.is_err() {
                        break 'send;
                    }
                }
            }
        });
        let mut frames = FramedRead::new(from_agent, codec());
        let _ = out.send(ToAgent::Hello {
            version: VERSION,
            engine: format!(
                "plasmavmc {} pid {}",
                env!("CARGO_PKG_VERSION"),
                std::process::id()
            ),
        });
        let facts = await_welcome(
            name,
            &mut frames,
            opts.hello_timeout,
            &stderr_tail,
            stderr_closed,
        )
        .await?;
        let pending: Pending = Arc::default();
        let last_frame = Arc::new(Mutex::new(Instant::now()));
        let (events, _) = broadcast::channel(1024);
        let (closed_tx, closed) = watch::channel(false);
        tokio::spawn(read_loop(
            name.to_owned(),
            frames,
            pending.clone(),
            last_frame.clone(),
            events.clone(),
            closed_tx,
        ));
        let host = Self {
            name: name.to_owned(),
            facts,
            out,
            pending,
            next_id: Arc::new(AtomicU64::new(1)),
            last_frame,
            closed,
            hangup: Arc::new(hangup),
            events,
            files: Arc::default(),
            sends: Arc::default(),
            opts,
        };
        host.spawn_heartbeat();
        Ok(host)
    }

    /// What the agent said about its host.
    pub fn facts(&self) -> &HostFacts {
        &self.facts
    }

    /// How long since the agent last sent anything (pongs included).
    pub fn silence(&self) -> Duration {
        self.last_frame.lock().expect("last frame").elapsed()
    }

    /// True once the channel closed (agent exited, transport broke).
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Hangs up: the agent's stdin is closed (it exits, leaving every QEMU running) and
    /// the heartbeats stop. Every clone of this host is affected.
    pub fn close(&self) {
        let _ = self.hangup.send(true);
    }

    fn spawn_heartbeat(&self) {
        let (out, mut closed, every) = (self.out.clone(), self.closed.clone(), self.opts.heartbeat);
        let mut hung_up = self.hangup.subscribe();
        tokio::spawn(async move {
            let mut seq = 0;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    _ = closed.changed() => break,
                    _ = hung_up.changed() => break,
                }
                seq += 1;
                if out.send(ToAgent::Ping { seq }).is_err() {
                    break;
                }
            }
        });
    }

    async fn call(
        &self,
        vm: &str,
        request: Request,
        timeout: Duration,
    ) -> Result<Reply, HostError> {
        self.call_within(vm, request, timeout, self.opts.down_after)
            .await
    }

    /// [`Self::call`], typed: the reply must carry a `T`, else it is unexpected.
    async fn ask<T: FromReply>(
        &self,
        vm: &str,
        request: Request,
        timeout: Duration,
    ) -> Result<T, HostError> {
        let reply = self.call(vm, request, timeout).await?;
        T::from_reply(reply).map_err(|other| self.unexpected(&other))
    }

    /// [`Self::call`], giving up once the agent has sent nothing for `silence`.
    async fn call_within(
        &self,
        vm: &str,
        request: Request,
        timeout: Duration,
        silence: Duration,
    ) -> Result<Reply, HostError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending").insert(id, tx);
        let lost = || HostError::Unreachable {
            host: self.name.clone(),
            reason: "the agent channel closed".to_owned(),
        };
        if self.is_closed() || self.out.send(ToAgent::Request { id, request }).is_err() {
            self.pending.lock().expect("pending").remove(&id);
            return Err(lost());
        }
        let answer = tokio::select! {
            answer = tokio::time::timeout(timeout, rx) => answer,
            () = self.gone_silent(silence) => {
                self.pending.lock().expect("pending").remove(&id);
                return Err(HostError::Unreachable {
                    host: self.name.clone(),
                    reason: format!("its agent sent nothing for {silence:?}"),
                });
            }
        };
        match answer {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(reason))) => Err(HostError::Remote {
                host: self.name.clone(),
                vm: vm.to_owned(),
                reason,
            }),
            Ok(Err(_)) => Err(lost()),
            Err(_) => {
                self.pending.lock().expect("pending").remove(&id);
                Err(HostError::Unreachable {
                    host: self.name.clone(),
                    reason: format!("no answer within {timeout:?}"),
                })
            }
        }
    }

    /// Resolves once the agent has sent nothing for `limit`.
    async fn gone_silent(&self, limit: Duration) {
        loop {
            let left = limit.saturating_sub(self.silence());
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left).await;
        }
    }

    fn unexpected(&self, reply: &Reply) -> HostError {
        HostError::Unreachable {
            host: self.name.clone(),
            reason: format!("unexpected reply {reply:?}"),
        }
    }

    /// The host's copy of a local file, sent once (content-addressed, checksummed). The
    /// file is known by its content: one replaced in place is sent again.
    async fn ensure_file(&self, vm: &str, local: &Path) -> Result<PathBuf, HostError> {
        let io = |what: &str, source| HostError::Io {
            vm: vm.to_owned(),
            what: format!("{what} {}", local.display()),
            source,
        };
        let path = local.to_path_buf();
        let sha256 = tokio::task::spawn_blocking(move || sha256_file_cached(&path))
            .await
            .map_err(|e| io("hashing", std::io::Error::other(e)))?
            .map_err(|e| io("hashing", e))?;
        if let Some(remote) = self.files.lock().await.get(&sha256) {
            return Ok(remote.clone());
        }
        let remote = match self
            .call(
                vm,
                Request::HasFile {
                    sha256: sha256.clone(),
                },
                self.opts.request_timeout,
            )
            .await?
        {
            Reply::File { path: Some(path) } => path,
            Reply::File { path: None } => self.upload(vm, local, &sha256).await?,
            other => return Err(self.unexpected(&other)),
        };
        self.files.lock().await.insert(sha256, remote.clone());
        Ok(remote)
    }

    async fn upload(&self, vm: &str, local: &Path, sha256: &str) -> Result<PathBuf, HostError> {
        let io = |source| HostError::Io {
            vm: vm.to_owned(),
            what: format!("reading {}", local.display()),
            source,
        };
        let file = tokio::fs::File::open(local).await.map_err(io)?;
        let len = file.metadata().await.map_err(io)?.len();
        self.send(vm, &local.display().to_string(), file, len, sha256)
            .await
    }

    /// The host's copy of the cloud-init seed built here (in memory), sent once.
    async fn ensure_seed(&self, vm: &str, seed: &SeedFile) -> Result<PathBuf, HostError> {
        let sha256 = seed.sha256.clone();
        match self
            .call(vm, Request::HasFile { sha256 }, self.opts.request_timeout)
            .await?
        {
            Reply::File { path: Some(path) } => Ok(path),
            Reply::File { path: None } => {
                let bytes = seed.bytes.as_deref().ok_or_else(|| HostError::Refused {
                    vm: vm.to_owned(),
                    reason: "the cloud-init seed was not built (its commit was not read)"
                        .to_owned(),
                })?;
                let what = format!("cloud-init seed {}", seed.instance_id);
                self.send(
                    vm,
                    &what,
                    bytes.as_slice(),
                    bytes.len() as u64,
                    &seed.sha256,
                )
                .await
            }
            other => Err(self.unexpected(&other)),
        }
    }

    /// Sends `len` bytes of `reader` (`what`, for messages) to the host's file store.
    async fn send(
        &self,
        vm: &str,
        what: &str,
        mut file: impl tokio::io::AsyncRead + Unpin,
        len: u64,
        sha256: &str,
    ) -> Result<PathBuf, HostError> {
        let io = |source| HostError::Io {
            vm: vm.to_owned(),
            what: format!("reading {what}"),
            source,
        };
        let gate = self
            .sends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(sha256.to_owned())
            .or_default()
            .clone();
        let _sending = gate.lock().await;
        // Another action may have sent it while this one waited at the gate.
        let has = Request::HasFile {
            sha256: sha256.to_owned(),
        };
        if let Reply::File { path: Some(path) } =
            self.call(vm, has, self.opts.request_timeout).await?
        {
            return Ok(path);
        }
        let mut offset = 0u64;
        loop {
            let mut data = vec![0u8; CHUNK];
            let mut filled = 0;
            while filled < CHUNK {
                let n = file.read(&mut data[filled..]).await.map_err(io)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            data.truncate(filled);
            let last = offset + filled as u64 >= len;
            let request = Request::PutFile {
                sha256: sha256.to_owned(),
                offset,
                data,
                last,
            };
            match self.call(vm, request, self.opts.request_timeout).await? {
                Reply::File { path: Some(path) } if last => {
                    debug!(host = %self.name, file = %what, bytes = len, "copied to the host");
                    return Ok(path);
                }
                Reply::File { path: None } if !last => offset += filled as u64,
                other => return Err(self.unexpected(&other)),
            }
        }
    }

    /// `vm` with its files replaced by the host's copies.
    async fn localise(&self, vm: &VmInstance) -> Result<VmInstance, HostError> {
        let mut out = vm.clone();
        if let Some(k) = &vm.files.kernel {
            out.files.kernel = Some(self.ensure_file(&vm.name, k).await?);
        }
        if let Some(i) = &vm.files.initrd {
            out.files.initrd = Some(self.ensure_file(&vm.name, i).await?);
        }
        for (disk, image) in &vm.files.images {
            out.files
                .images
                .insert(disk.clone(), self.ensure_file(&vm.name, image).await?);
        }
        if let Some(seed) = &mut out.files.seed {
            seed.path = Some(self.ensure_seed(&vm.name, seed).await?);
            seed.bytes = None;
        }
        for disk in &vm.spec.disks {
            if let Some(plasmavmc_specs::Image::Url(image)) = &disk.image {
                let stored = self.fetch_image(&vm.name, image).await?;
                out.files.images.insert(disk.name.clone(), stored);
            }
        }
        Ok(out)
    }

    /// The host's copy of an image by URL: the host downloads it unless it has it. No
    /// bound but the agent's silence: a download takes what it takes, and the agent
    /// gives up itself on a server that stalls.
    async fn fetch_image(
        &self,
        vm: &str,
        image: &plasmavmc_specs::UrlImage,
    ) -> Result<PathBuf, HostError> {
        let request = Request::FetchImage {
            vm: vm.to_owned(),
            image: image.clone(),
        };
        match self.call(vm, request, FETCH_BOUND).await? {
            Reply::File { path: Some(path) } => Ok(path),
            other => Err(self.unexpected(&other)),
        }
    }
}

/// The agent's first word: welcome (its host facts), or why not.
/// How long an agent that exited before its welcome may take to close its stderr: its
/// last lines say why it exited (ssh's "Host key verification failed.").
const STDERR_GRACE: Duration = Duration::from_secs(2);

/// Waits for the agent's welcome. When the agent exits first, its stderr is read to the
/// end (`stderr_closed`, bounded by [`STDERR_GRACE`]) before its tail is quoted: stdout's
/// EOF can overtake the lines it wrote to stderr just before.
async fn await_welcome(
    name: &str,
    frames: &mut FramedRead<tokio::process::ChildStdout, tokio_util::codec::LengthDelimitedCodec>,
    wait: Duration,
    stderr_tail: &Mutex<String>,
    stderr_closed: tokio::task::JoinHandle<()>,
) -> Result<HostFacts, HostError> {
    let unreachable = |reason: String| HostError::Unreachable {
        host: name.to_owned(),
        reason,
    };
    let first = match tokio::time::timeout(wait, frames.next()).await {
        Err(_) => {
            return Err(unreachable(format!(
                "no answer within {wait:?}{}",
                tail(stderr_tail)
            )))
        }
        Ok(None) => {
            let _ = tokio::time::timeout(STDERR_GRACE, stderr_closed).await;
            return Err(unreachable(format!(
                "the agent exited{}",
                tail(stderr_tail)
            )));
        }
        Ok(Some(frame)) => frame
            .ok()
            .and_then(|b| serde_json::from_slice::<FromAgent>(&b).ok()),
    };
    match first {
        Some(FromAgent::Welcome { version, host }) if version == VERSION => Ok(host),
        Some(FromAgent::Refused { reason }) => {
            Err(unreachable(format!("its agent refused: {reason}")))
        }
        _ => Err(unreachable(format!(
            "the agent did not speak protocol {VERSION}{}",
            tail(stderr_tail)
        ))),
    }
}

async fn read_loop(
    name: String,
    mut frames: FramedRead<tokio::process::ChildStdout, tokio_util::codec::LengthDelimitedCodec>,
    pending: Pending,
    last_frame: Arc<Mutex<Instant>>,
    events: broadcast::Sender<HostEvent>,
    closed: watch::Sender<bool>,
) {
    while let Some(Ok(bytes)) = frames.next().await {
        *last_frame.lock().expect("last frame") = Instant::now();
        let mut msg = serde_json::from_slice::<FromAgent>(&bytes);
        if let Ok(m) = &mut msg {
            if let Some(raw) = m.raw_mut() {
                match frames.next().await {
                    Some(Ok(bytes)) => *raw = bytes.to_vec(),
                    _ => break,
                }
            }
        }
        match msg {
            Ok(FromAgent::Response { id, result }) => {
                if let Some(tx) = pending.lock().expect("pending").remove(&id) {
                    let _ = tx.send(result);
                }
            }
            Ok(FromAgent::Event { event }) => {
                let _ = events.send(event);
            }
            Ok(FromAgent::Pong { .. }) => {}
            Ok(other) => debug!(host = %name, ?other, "unexpected message from the agent"),
            Err(e) => warn!(host = %name, error = %e, "undecodable message from the agent"),
        }
    }
    // Info, not a warning: every command ends this way; watch reports lost hosts itself.
    info!(host = %name, "agent channel closed");
    // Closed first, then the waiting calls failed: a call registered in between sees the
    // channel closed (it checks after registering) instead of waiting out its timeout.
    let _ = closed.send(true);
    pending.lock().expect("pending").clear();
}

/// Copies the agent's stderr (its logs) to ours, keeping the last lines for errors; the
/// returned task ends when the agent closes its stderr.
fn relay_stderr(
    name: &str,
    stderr: tokio::process::ChildStderr,
    tail: Arc<Mutex<String>>,
) -> tokio::task::JoinHandle<()> {
    let name = name.to_owned();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            // JSON lines pass through untouched (journald/Loki parse them); text gets a prefix.
            if line.starts_with('{') {
                eprintln!("{line}");
            } else {
                eprintln!("[agent {name}] {line}");
            }
            let mut t = tail.lock().expect("stderr tail");
            t.push_str(&line);
            t.push('\n');
            let excess = t.len().saturating_sub(4000);
            t.drain(..excess);
        }
    })
}

fn tail(stderr: &Mutex<String>) -> String {
    let text = stderr.lock().expect("stderr tail").trim().to_owned();
    if text.is_empty() {
        String::new()
    } else {
        format!(
            ": {}",
            text.lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join(" | ")
        )
    }
}

impl Host for AgentHost {
    fn name(&self) -> &str {
        &self.name
    }

    async fn inventory(&self) -> Result<Inventory, HostError> {
        // A look, not an action: it gives up as soon as the host is suspect (two
        // heartbeats of silence), so a host freezing mid-call holds a reconcile, and the
        // healing of every other host, that long rather than `down_after`.
        let suspect = self
            .opts
            .heartbeat
            .saturating_mul(2)
            .min(self.opts.down_after);
        let reply = self
            .call_within("", Request::Inventory, self.opts.request_timeout, suspect)
            .await?;
        Inventory::from_reply(reply).map_err(|other| self.unexpected(&other))
    }

    async fn create(&self, vm: &VmInstance) -> Result<(), HostError> {
        let vm = self.localise(vm).await?;
        self.ask(
            &vm.name,
            Request::Create { vm: vm.clone() },
            Duration::from_secs(600),
        )
        .await
    }

    async fn recover(&self, vm: &VmInstance) -> Result<(), HostError> {
        let vm = self.localise(vm).await?;
        self.ask(
            &vm.name,
            Request::Recover { vm: vm.clone() },
            Duration::from_secs(600),
        )
        .await
    }

    async fn update(&self, vm: &VmInstance) -> Result<(), HostError> {
        let vm = self.localise(vm).await?;
        self.ask(
            &vm.name,
            Request::Update { vm: vm.clone() },
            Duration::from_secs(600),
        )
        .await
    }

    async fn start(&self, vm: &str) -> Result<u32, HostError> {
        self.ask(
            vm,
            Request::Start { vm: vm.to_owned() },
            self.opts.request_timeout,
        )
        .await
    }

    async fn stop(&self, vm: &str, timeout: Duration) -> Result<StopOutcome, HostError> {
        let request = Request::Stop {
            vm: vm.to_owned(),
            timeout_ms: timeout.as_millis() as u64,
        };
        self.ask(vm, request, timeout + self.opts.request_timeout)
            .await
    }

    async fn prune(&self, folder: &str, pid: u32) -> Result<(), HostError> {
        self.ask(
            folder,
            Request::Prune {
                folder: folder.to_owned(),
                pid,
            },
            self.opts.request_timeout,
        )
        .await
    }

    async fn delete_disk(&self, path: &Path, shared: Option<&Path>) -> Result<u64, HostError> {
        let request = Request::DeleteDisk {
            path: path.to_path_buf(),
            shared: shared.map(Path::to_path_buf),
        };
        self.ask(&self.name, request, self.opts.request_timeout)
            .await
    }

    fn subscribe(&self) -> broadcast::Receiver<HostEvent> {
        self.events.subscribe()
    }

    async fn delete(&self, vm: &str) -> Result<Option<PathBuf>, HostError> {
        self.ask(
            vm,
            Request::Delete { vm: vm.to_owned() },
            self.opts.request_timeout,
        )
        .await
    }

    async fn prepare_incoming(
        &self,
        vm: &VmInstance,
        from: &str,
        listen: &str,
        mirror: &[String],
    ) -> Result<Incoming, HostError> {
        let vm = self.localise(vm).await?;
        let request = Request::PrepareIncoming {
            vm: vm.clone(),
            from: from.to_owned(),
            listen: listen.to_owned(),
            mirror: mirror.to_vec(),
        };
        self.ask(&vm.name, request, Duration::from_secs(600)).await
    }

    async fn migrate_out(
        &self,
        vm: &str,
        to: &Incoming,
        tuning: &Tuning,
    ) -> Result<Stats, HostError> {
        let request = Request::MigrateOut {
            vm: vm.to_owned(),
            to: to.clone(),
            tuning: *tuning,
        };
        // The agent enforces the migration's own bounds; this one only catches a lost reply.
        let bound = Duration::from_millis(tuning.timeout_ms) + self.opts.request_timeout * 2;
        self.ask(vm, request, bound).await
    }

    async fn migration_stats(&self, vm: &str) -> Result<Stats, HostError> {
        let request = Request::MigrationStats { vm: vm.to_owned() };
        self.ask(vm, request, self.opts.request_timeout).await
    }

    async fn discard(&self, vm: &str) -> Result<(), HostError> {
        let request = Request::Discard { vm: vm.to_owned() };
        self.ask(vm, request, self.opts.request_timeout * 3).await
    }

    async fn inject(&self, vm: &str, fault: super::Fault) -> Result<u32, HostError> {
        let request = Request::Inject {
            vm: vm.to_owned(),
            fault,
        };
        self.ask(vm, request, self.opts.request_timeout).await
    }

    async fn read_disk(&self, vm: &str, disk: &str, offset: u64) -> Result<DiskChunk, HostError> {
        let request = Request::ReadDisk {
            vm: vm.to_owned(),
            disk: disk.to_owned(),
            offset,
        };
        self.ask(vm, request, self.opts.request_timeout).await
    }

    async fn write_disk(
        &self,
        vm: &str,
        disk: &str,
        offset: u64,
        chunk: &DiskChunk,
        finish: Option<&str>,
    ) -> Result<(), HostError> {
        let request = Request::WriteDisk {
            vm: vm.to_owned(),
            disk: disk.to_owned(),
            offset,
            chunk: chunk.clone(),
            finish: finish.map(str::to_owned),
        };
        // The last chunk hashes the whole file on the host.
        let bound = if finish.is_some() {
            Duration::from_secs(600)
        } else {
            self.opts.request_timeout
        };
        self.ask(vm, request, bound).await
    }
}

#[cfg(test)]
mod tests;
