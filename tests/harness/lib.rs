//! Test harness for the end-to-end tests: the real `plasmavmc` binary, real git
//! repositories (git2) and real QEMU running the tiny test guest.
//!
//! - [`artifacts`] finds (and builds once, if needed) the binary and the guest.
//! - [`TestRepo`] is a temp folder holding a git repository and a state dir; it runs
//!   the binary against them and reads what the engine left behind (instance folders,
//!   serial logs, status files). Dropping it kills every process it owns, even when
//!   the test panicked.
//! - [`VmSpec`] writes VM specs that boot the test guest under TCG; [`HostSpec`] host
//!   specs, by default a simulated host: the binary's own agent on a root of its own.
//! - [`Daemon`] is a running `plasmavmc watch` (own process group, killed on drop,
//!   JSON log lines read back); [`VmView`]/[`HostView`]/[`EngineView`]/[`Orphan`]
//!   read the status files, [`serial`] the guest's console, and `git` (methods of
//!   [`TestRepo`]) the repository's branches, index and working tree.
//! - [`proc`] inspects processes through `/proc`; [`wait`] polls with deadlines
//!   (tests never sleep to synchronise).
//! - [`fault`] simulates host failures (power-off, network partition), writes fence
//!   commands, and [`CopyWatch`] samples how many copies of a VM run at once (and
//!   whether two of its guests ever ran, where two QEMUs exist by design);
//!   [`PhaseTrail`] samples the phases a host and a VM go through, fast.
//! - [`partition`] holds the engine at a fail point (`pause`) or lets an agent freeze
//!   itself at one (`freeze`), so a test cuts a host off at a chosen step, and
//!   [`partition::Strays`] records a VM showing up on hosts it must not be on.
//! - [`space`] mounts a small tmpfs (a host root whose disk fills up) and fills it
//!   with ballast; the cleanup unmounts it.
//! - [`Sshd`] is a real OpenSSH server on 127.0.0.1 for one test, with its own keys,
//!   reaching the binary under test: what `ssh://` hosts connect to.
//! - [`netns`] gives simulated hosts a real L2 network ([`Lan`]: a namespace per host
//!   with a bridge, a switch, a client) and measures it (pings, a TCP echo stream).
//! - [`http`] is a small HTTP file server on 127.0.0.1 that honours `Range` and can
//!   cut responses short: where images by URL come from.
//! - [`debian`] is the real Debian 12 guest (`tests/guest/debian.sh`: systemd,
//!   cloud-init, sshd) and SSH into it through a port forward; [`pty`] runs a command on
//!   a pseudo-terminal (`plasmavmc console` as a person at a terminal uses it).
//! - [`bench`] holds what the benchmark binaries share (release binary, percentiles,
//!   the machine's description); [`fleet`] what the fleet-scale ones add (many small
//!   VMs over simulated hosts, CPU and memory of a process from `/proc`).
//!
//! What `plasmavmc drill`'s own sandbox reads the same way comes from the engine's
//! library, one copy for both: the test guest's console words
//! (`plasmavmc::drill::console`), the daemon's JSON log lines (`plasmavmc::drill::log`)
//! and the deadline loop (`plasmavmc::drill::poll`).

pub mod artifacts;
pub mod bench;
mod daemon;
pub mod debian;
pub mod fault;
pub mod fleet;
mod git;
pub mod http;
pub mod netns;
pub mod partition;
pub mod proc;
pub mod pty;
pub mod qmp;
mod remote;
mod repo;
mod run;
pub mod serial;
pub mod space;
mod spec;
mod sshd;
mod status;
pub mod trail;
pub mod wait;

pub use artifacts::Guest;
pub use daemon::{Daemon, LogLine};
pub use debian::{debian, DebianImage, GuestSsh};
pub use fault::{CopyWatch, Fence};
pub use netns::Lan;
pub use proc::{cmdline, is_alive};
pub use remote::BareRemote;
pub use repo::{TestRepo, BRANCH};
pub use run::{diagnostic, Output, Running};
pub use serial::{last_tick, serial_has_line, ticks};
pub use spec::{HostSpec, SshLogin, VmSpec, MEMORY_LINE};
pub use sshd::{free_port, keygen, Sshd, SSHD};
pub use status::{EngineView, Event, HostView, Orphan, Resources, VmView};
pub use trail::{PhaseTrail, Seen};
pub use wait::{poll_every, poll_for, wait_for};

use std::time::Duration;

/// Generous bound for a guest to boot and print its first ticks under TCG, with
/// other tests sharing the two cores.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// Bound for the engine to spawn QEMU or act on a status change (not a boot).
pub const ACT_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound for one run of the binary before the harness kills it.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);
