//! PlasmaVMC engine: reads a commit, observes the hosts, plans, executes, writes status.
//!
//! ```text
//! source (git2: commit -> files) ─┐
//! specs  (TOML -> Desired)        ├─> plan (pure) ─> execute (Host calls) ─> status files
//! observe (hosts -> Observed)     ─┘
//! ```
//! `cli` parses arguments and calls these stages; nothing else lives in the binary.

pub mod agent;
pub mod cli;
pub mod drill;
pub mod execute;
pub mod failpoint;
pub mod host;
pub mod observe;
pub mod plan;
pub mod qemu;
pub mod source;
pub mod state;
pub mod status;
#[cfg(test)]
mod test_utils;
pub mod time;
pub mod watch;
