//! The agent protocol: what the engine (`host::AgentHost`, the client) and `plasmavmc
//! agent` (`agent`, the server) say to each other. Below both: it imports neither.
//!
//! Frames are length-delimited (tokio-util's `LengthDelimitedCodec`), each holding one
//! JSON message. The engine speaks first with [`ToAgent::Hello`]; the agent answers
//! [`FromAgent::Welcome`] (same protocol version, its host facts) or
//! [`FromAgent::Refused`] and closes. Then requests carry ids and get exactly one
//! response each, in any order; the agent also sends [`HostEvent`]s unasked, and
//! answers pings (heartbeats) at once.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

use crate::observe::{Capacity, Inventory};
use crate::qemu::exit::ExitReason;
use crate::qemu::instance::VmInstance;
use crate::qemu::migrate::{Stats, Tuning};

/// Version of this protocol; both sides must speak the same.
pub const VERSION: u32 = 4;

/// Largest frame either side accepts (a file chunk plus envelope).
pub const MAX_FRAME: usize = 4 << 20;

/// Size of one file chunk in [`Request::PutFile`].
pub const CHUNK: usize = 1 << 20;

/// Engine → agent.
// A request carries a whole VM spec; messages live only between a socket and a match.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
pub enum ToAgent {
    Hello { version: u32, engine: String },
    Request { id: u64, request: Request },
    Ping { seq: u64 },
}

/// Agent → engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
pub enum FromAgent {
    Welcome {
        version: u32,
        host: HostFacts,
    },
    Refused {
        reason: String,
    },
    Response {
        id: u64,
        result: Result<Reply, String>,
    },
    Event {
        event: HostEvent,
    },
    Pong {
        seq: u64,
    },
}

/// What an agent says about its host when it accepts a controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub hostname: String,
    pub root: PathBuf,
    pub capacity: Capacity,
    pub qemu: String,
    pub agent_version: String,
}

/// One operation on the host: the [`Host`](crate::host::Host) trait as data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Inventory,
    Create {
        vm: VmInstance,
    },
    Update {
        vm: VmInstance,
    },
    /// [`Host::recover`](crate::host::Host::recover).
    Recover {
        vm: VmInstance,
    },
    Start {
        vm: String,
    },
    Stop {
        vm: String,
        timeout_ms: u64,
    },
    Delete {
        vm: String,
    },
    Prune {
        folder: String,
        pid: u32,
    },
    /// Deletes a retained or shared disk file, on the operator's explicit request.
    /// Answered with [`Reply::Bytes`] (what it took).
    DeleteDisk {
        path: PathBuf,
        shared: Option<PathBuf>,
    },
    /// Is a file with this SHA-256 already stored? Answered with [`Reply::File`].
    HasFile {
        sha256: String,
    },
    /// Stores a chunk of a file; the last chunk (`last`) checks the SHA-256 and answers
    /// with the stored path. The bytes travel raw in the frame right after this one.
    PutFile {
        sha256: String,
        offset: u64,
        #[serde(skip)]
        data: Vec<u8>,
        last: bool,
    },
    /// The host's copy of an image by URL, downloaded (and checked against its `sha256`)
    /// unless stored already. Answered with [`Reply::File`]; [`HostEvent::Downloading`]
    /// tells how far it is meanwhile.
    FetchImage {
        vm: String,
        image: plasmavmc_specs::UrlImage,
    },
    /// Become the target of a live migration. Answered with [`Reply::Incoming`].
    PrepareIncoming {
        vm: VmInstance,
        from: String,
        listen: String,
        mirror: Vec<String>,
    },
    /// Migrate a running guest out. Answered with [`Reply::Migrated`].
    MigrateOut {
        vm: String,
        to: Incoming,
        tuning: Tuning,
    },
    /// Remove this host's copy of a VM that lives elsewhere.
    Discard {
        vm: String,
    },
    /// The final figures of a completed outgoing migration ([`Reply::Migrated`]).
    MigrationStats {
        vm: String,
    },
    /// `plasmavmc drill`: inflict a fault on a running VM. Answered with [`Reply::Pid`].
    Inject {
        vm: String,
        fault: Fault,
    },
    /// A chunk of a stopped instance's local disk. Answered with [`Reply::DiskChunk`],
    /// whose bytes travel raw in the frame right after it.
    ReadDisk {
        vm: String,
        disk: String,
        offset: u64,
    },
    /// Writes a chunk of a disk being received; the bytes travel raw in the frame right
    /// after this one. `finish` (the whole file's SHA-256) ends the transfer.
    WriteDisk {
        vm: String,
        disk: String,
        offset: u64,
        chunk: DiskChunk,
        finish: Option<String>,
    },
}

impl Request {
    /// The raw bytes that travel in a frame of their own after this request.
    pub fn raw_mut(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            Request::PutFile { data, .. }
            | Request::WriteDisk {
                chunk: DiskChunk { data, .. },
                ..
            } => Some(data),
            _ => None,
        }
    }
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    Done,
    Inventory {
        inventory: Box<Inventory>,
    },
    Pid {
        pid: u32,
    },
    Stopped {
        outcome: StopOutcome,
    },
    Deleted {
        retained: Option<PathBuf>,
    },
    /// Where the file is on the host, or `None` when it is not there (yet).
    File {
        path: Option<PathBuf>,
    },
    Incoming {
        incoming: Incoming,
    },
    Migrated {
        stats: Stats,
    },
    /// Its bytes travel raw in the next frame.
    DiskChunk {
        chunk: DiskChunk,
    },
    Bytes {
        bytes: u64,
    },
}

impl FromAgent {
    /// The raw bytes that travel in a frame of their own after this message.
    pub fn raw(&self) -> Option<&[u8]> {
        match self {
            FromAgent::Response {
                result: Ok(Reply::DiskChunk { chunk }),
                ..
            } => Some(&chunk.data),
            _ => None,
        }
    }

    /// Where the raw bytes that follow this message go.
    pub fn raw_mut(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            FromAgent::Response {
                result: Ok(Reply::DiskChunk { chunk }),
                ..
            } => Some(&mut chunk.data),
            _ => None,
        }
    }
}

/// The frames of one message: its JSON, then a file chunk's raw bytes when it has one.
pub fn to_frames(msg: &ToAgent) -> Vec<tokio_util::bytes::Bytes> {
    let json = serde_json::to_vec(msg).expect("engine messages serialise");
    let mut frames = vec![tokio_util::bytes::Bytes::from(json)];
    if let ToAgent::Request { request, .. } = msg {
        if let Some(data) = request.clone().raw_mut() {
            frames.push(tokio_util::bytes::Bytes::from(std::mem::take(data)));
        }
    }
    frames
}

/// Length-delimited frames, bounded.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// How a stop ended. On the wire in kebab-case (`already-stopped`, ...); an unknown word
/// is a protocol error, never read as one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopOutcome {
    /// It was not running.
    AlreadyStopped,
    /// The guest shut down after the ACPI power button.
    Graceful,
    /// The guest ignored the power button until the timeout; QEMU was told to quit.
    Quit,
    /// QEMU held no running guest (paused, e.g. by a migration) and was told to quit.
    Paused,
    /// QEMU did not quit either and was killed.
    Killed,
}

/// Where a live-migration target waits: QEMU's migration URI (`tcp:ADDR:PORT`) and,
/// when local disks are mirrored, its NBD server.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Incoming {
    pub uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<crate::qemu::migrate::NbdTarget>,
    /// The target accepts postcopy (`postcopy-ram` set).
    #[serde(default)]
    pub postcopy: bool,
}

/// A piece of a disk file in a cold migration: `len` bytes from some offset; `data` is
/// empty when they are all zero (holes stay holes on the target).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskChunk {
    /// Size of the whole file.
    pub size: u64,
    pub len: u64,
    #[serde(skip)]
    pub data: Vec<u8>,
}

/// A failure `plasmavmc drill` inflicts on a running VM, as if it came from outside
/// ([`Request::Inject`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// SIGKILL of its QEMU: a QEMU crash.
    KillQemu,
    /// An NMI to the guest (QMP `inject-nmi`, the server's NMI button): a guest set to
    /// panic on NMI (`unknown_nmi_panic`) panics.
    Nmi,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::KillQemu => "kill -9 of its QEMU",
            Fault::Nmi => "NMI to the guest",
        }
    }
}

/// Something a host tells the engine without being asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum HostEvent {
    /// A QEMU exited. `expected` when the engine had asked it to stop.
    Exited {
        vm: String,
        pid: u32,
        reason: ExitReason,
        status: Option<String>,
        expected: bool,
        at_ms: u64,
    },
    /// The guest's watchdog fired (`[health] watchdog`). With `reset` the same QEMU goes
    /// on; otherwise an `Exited` with reason `watchdog` follows.
    Watchdog {
        vm: String,
        pid: u32,
        action: plasmavmc_specs::WatchdogAction,
        at_ms: u64,
    },
    /// What the VM's guest agent says changed (`[health] guest_agent`): it answers or
    /// stopped answering, another OS or other addresses. `first`: the first word on this
    /// QEMU (no change from an earlier one).
    GuestAgent {
        vm: String,
        info: crate::observe::GuestAgentInfo,
        first: bool,
    },
    /// A probe flipped (`[health.liveness]`/`[health.readiness]`). `first`: its first
    /// word on this QEMU.
    Probe {
        vm: String,
        liveness: bool,
        state: crate::observe::ProbeState,
        first: bool,
    },
    /// How an outgoing live migration is going (about once a second).
    Migrating {
        vm: String,
        progress: crate::qemu::migrate::Progress,
    },
    /// How the download of an image for `vm` ([`Request::FetchImage`]) is going (about
    /// once a second): `file` is the URL's file name, `total` the size if known.
    Downloading {
        vm: String,
        file: String,
        done: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total: Option<u64>,
    },
}

impl HostEvent {
    /// What a [`HostEvent::Downloading`] says, for a human: `downloading debian.qcow2
    /// 412 MiB/1.2 GiB`.
    pub fn describe_download(file: &str, done: u64, total: Option<u64>) -> String {
        match total {
            Some(total) => format!("downloading {file} {}/{}", bytes(done), bytes(total)),
            None => format!("downloading {file} {}", bytes(done)),
        }
    }
}

/// A size in binary units, one decimal from GiB up: `412 MiB`, `1.2 GiB`.
fn bytes(n: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    match n {
        n if n >= GIB => format!("{:.1} GiB", n as f64 / GIB as f64),
        n if n >= MIB => format!("{} MiB", n / MIB),
        n if n >= KIB => format!("{} KiB", n / KIB),
        n => format!("{n} B"),
    }
}

/// The value a [`Reply`] carries for one kind of request: the host client's calls name
/// the type they expect, and any other reply is an unexpected one.
pub trait FromReply: Sized {
    /// The value, or the reply back when it is another kind.
    fn from_reply(reply: Reply) -> Result<Self, Reply>;
}

macro_rules! from_reply {
    ($t:ty, $pat:pat => $value:expr) => {
        impl FromReply for $t {
            fn from_reply(reply: Reply) -> Result<Self, Reply> {
                match reply {
                    $pat => Ok($value),
                    other => Err(other),
                }
            }
        }
    };
}

from_reply!((), Reply::Done => ());
from_reply!(u32, Reply::Pid { pid } => pid);
from_reply!(StopOutcome, Reply::Stopped { outcome } => outcome);
from_reply!(Option<PathBuf>, Reply::Deleted { retained } => retained);
from_reply!(Incoming, Reply::Incoming { incoming } => incoming);
from_reply!(Stats, Reply::Migrated { stats } => stats);
from_reply!(DiskChunk, Reply::DiskChunk { chunk } => chunk);
from_reply!(Inventory, Reply::Inventory { inventory } => *inventory);
from_reply!(u64, Reply::Bytes { bytes } => bytes);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_json() {
        let msgs = [
            ToAgent::Hello {
                version: VERSION,
                engine: "e".into(),
            },
            ToAgent::Request {
                id: 7,
                request: Request::PutFile {
                    sha256: "ab".into(),
                    offset: 0,
                    data: vec![],
                    last: true,
                },
            },
            ToAgent::Request {
                id: 8,
                request: Request::Stop {
                    vm: "web".into(),
                    timeout_ms: 500,
                },
            },
            ToAgent::Ping { seq: 3 },
        ];
        for m in msgs {
            let json = serde_json::to_string(&m).expect("ser");
            assert_eq!(
                serde_json::from_str::<ToAgent>(&json).expect("de"),
                m,
                "{json}"
            );
        }
        let reply = FromAgent::Response {
            id: 7,
            result: Ok(Reply::Pid { pid: 42 }),
        };
        let json = serde_json::to_string(&reply).expect("ser");
        assert!(
            json.contains("\"data\"") || json.contains("\"pid\":42"),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<FromAgent>(&json).expect("de"), reply);
        let put = ToAgent::Request {
            id: 1,
            request: Request::PutFile {
                sha256: String::new(),
                offset: 0,
                data: vec![0xab, 0x01],
                last: false,
            },
        };
        let frames = to_frames(&put);
        assert_eq!(frames.len(), 2);
        assert_eq!(&frames[1][..], &[0xab, 0x01]);
    }

    #[test]
    fn download_progress_reads_as_an_operator_expects() {
        assert_eq!(
            HostEvent::describe_download("debian.qcow2", 412 << 20, Some(1288 << 20)),
            "downloading debian.qcow2 412 MiB/1.3 GiB"
        );
        assert_eq!(
            HostEvent::describe_download("x.raw", 1000, None),
            "downloading x.raw 1000 B"
        );
    }

    #[test]
    fn a_stop_outcome_is_a_word_of_its_own_and_an_unknown_word_is_refused() {
        let reply = Reply::Stopped {
            outcome: StopOutcome::AlreadyStopped,
        };
        let json = serde_json::to_string(&reply).expect("ser");
        assert_eq!(json, r#"{"reply":"stopped","outcome":"already-stopped"}"#);
        assert!(
            serde_json::from_str::<Reply>(r#"{"reply":"stopped","outcome":"vanished"}"#).is_err(),
            "an unknown outcome must not be read as one of ours"
        );
    }
}
