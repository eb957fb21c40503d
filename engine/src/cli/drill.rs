//! `plasmavmc drill`: arguments and printing; the drill itself is [`crate::drill`].

use std::path::PathBuf;

use clap::Args;

use crate::drill::{markdown, passed, run, DrillConfig};

/// `drill` arguments.
#[derive(Debug, Args)]
pub struct DrillArgs {
    /// Runs of every failure mode.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Kernel the drill's VMs boot (default: the test guest, target/guest/vmlinuz).
    #[arg(long, default_value = "target/guest/vmlinuz")]
    kernel: PathBuf,
    /// Their initramfs (default: target/guest/initrd.img).
    #[arg(long, default_value = "target/guest/initrd.img")]
    initrd: PathBuf,
    /// `[heartbeat] interval` of the drill's cluster (default: the engine's, 1s).
    #[arg(long, requires = "down_after")]
    heartbeat: Option<String>,
    /// `[heartbeat] down_after` (default: the engine's, 5s).
    #[arg(long, requires = "heartbeat")]
    down_after: Option<String>,
    /// Only the failure modes whose name contains this (repeatable).
    #[arg(long)]
    only: Vec<String>,
    /// Print the rows as JSON instead of the Markdown table.
    #[arg(long)]
    json: bool,
}

/// Runs the drill; exit 1 when a row could not be measured or an invariant broke.
pub fn drill(args: &DrillArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    let cfg = DrillConfig {
        runs: args.runs,
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        heartbeat: args.heartbeat.clone().zip(args.down_after.clone()),
        only: args.only.clone(),
    };
    let rows = run(&cfg, &mut |line| eprintln!("drill: {line}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", markdown(&rows));
    }
    if passed(&rows) {
        Ok(0)
    } else {
        eprintln!("drill: a row was not measured or an invariant broke (see the table)");
        Ok(1)
    }
}
