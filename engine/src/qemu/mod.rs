//! Everything that knows QEMU: its command line, its processes, its disk images, its
//! instance folders and its QMP socket. Used by the local host implementation only.

pub mod args;
pub mod exit;
pub mod img;
pub mod instance;
pub mod migrate;
pub mod net;
pub mod process;
pub mod qga;
pub mod qmp;
pub mod seed;
pub mod watchdog;
