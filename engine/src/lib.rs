//! PlasmaVMC engine: reads a commit, observes the hosts, plans, executes, writes status.
//!
//! ```text
//! source (git2: commit -> files) ─┐
//! specs  (TOML -> Desired)        ├─> plan (pure) ─> execute (Host calls) ─> status files
//! observe (hosts -> Observed)     ─┘
//! ```
//! `cli` parses arguments and calls these stages; nothing else lives in the binary.
//!
//! ## Layers
//!
//! Top to bottom. A module imports only modules of the lines below its own — never one
//! above, never one beside it — so the imports form no circle. `engine/tests/layers.rs`
//! reads this table and checks every `crate::` path of the sources (tests aside)
//! against it.
//!
//! ```text
//! cli                              arguments -> the calls below; nothing else
//! watch                            the daemon: triggers, timers, heartbeats, fencing
//! drill                            `plasmavmc drill`: the failure table, measured; its desk
//! step                             what apply and watch compose: a look with memory
//! status                           the status files the engine publishes
//! execute                          Plan -> Host calls, several at once, journaled, whereabouts first
//! agent                            `plasmavmc agent`: serves Host calls on a byte stream
//! host                             the Host trait, its agent client, QEMU on this machine
//! wire                             the agent protocol's messages, below client and server
//! source                           git: a commit -> validated specs and their files
//! plan                             pure: Desired × Observed × now -> Plan
//! observe                          data: what the hosts run, what is known of the others
//! qemu                             QEMU processes, QMP, images, instance folders
//! records                          private files: lock, fences, whereabouts
//! time failpoint errors digest     ground floor: clock, fail points, error text, hashes
//! ```

pub mod agent;
pub mod cli;
pub mod digest;
pub mod drill;
pub mod errors;
pub mod execute;
pub mod failpoint;
pub mod host;
pub mod observe;
pub mod plan;
pub mod qemu;
pub mod records;
pub mod source;
pub mod status;
pub mod step;
#[cfg(test)]
mod test_utils;
pub mod time;
pub mod watch;
pub mod wire;
