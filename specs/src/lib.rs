//! PlasmaVMC spec model: the TOML files operators commit, their validation and their
//! JSON Schema.
//!
//! In: file paths and bytes of one commit. Out: a validated [`Desired`] state or every
//! [`Diagnostic`] as `path:line:col: message`. This crate does no I/O beyond parsing
//! the text it is given: no filesystem, no git, no clock.

pub mod cloud_init;
pub mod cluster;
pub mod diag;
#[doc(hidden)]
pub mod fuzz;
pub mod health;
pub mod host;
pub mod image;
pub mod load;
pub mod name;
pub mod net;
pub mod schema;
pub mod vm;

pub use cloud_init::CloudInit;
pub use cluster::{
    ClusterSpec, ConcurrencySettings, HeartbeatSettings, HumanDuration, MigrationSettings,
    NetworkDef, PlacementSettings, RestartSettings, Timeouts,
};
pub use diag::{Diagnostic, Seg};
pub use health::{Health, Probe, ProbeKind, WatchdogAction};
pub use host::{HostSpec, HostState, LOCAL_HOST};
pub use image::{Image, UrlImage};
pub use load::{load, short_hash, spec_hash, vm_hash, Desired, HostEntry, SourceFile, VmEntry};
pub use name::name_problem;
pub use vm::{
    derived_mac, Accel, Boot, Disk, Forward, MigrationPolicy, Network, Nic, Power, QemuSettings,
    RestartPolicy, Storage, VmSpec,
};
