//! `plasmavmc drill`: arguments and printing; the drill itself is [`crate::drill`].
//!
//! Without `--repo`: every failure mode on a throw-away sandbox cluster. With `--repo R
//! --vm NAME --yes-disrupt NAME`: the rows that touch one VM only, against a real
//! cluster's designated test VM and its running daemon.

use std::path::PathBuf;

use clap::Args;

use crate::drill::{
    clock_seed, markdown, passed, run, run_chaos, run_cluster, summary, ChaosConfig, ClusterConfig,
    DrillConfig,
};

/// `drill` arguments.
#[derive(Debug, Args)]
pub struct DrillArgs {
    /// Runs of every failure mode.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// A real cluster's repository: drill its designated VM (--vm) through its running
    /// daemon instead of a sandbox.
    #[arg(long, requires = "vm")]
    repo: Option<PathBuf>,
    /// Folder of the repository that holds the specs (relative to --repo).
    #[arg(long, requires = "repo")]
    path: Option<PathBuf>,
    /// State directory of the cluster's daemon (default: <repo>/<path>/.plasmavmc).
    #[arg(long, requires = "repo", env = "PLASMAVMC_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// The designated test VM: the only one the drill touches (crashes, panics, moves).
    #[arg(long, requires = "repo")]
    vm: Option<String>,
    /// Confirms the disruption: must repeat the --vm name.
    #[arg(long, value_name = "NAME")]
    yes_disrupt: Option<String>,
    /// Host the live round trip goes to (default: another ready host).
    #[arg(long, requires = "repo")]
    to: Option<String>,
    /// The daemon is restarted by a service manager other than systemd, so the engine
    /// crash row may kill it.
    #[arg(long, requires = "repo")]
    supervised: bool,
    /// How long the VM's QEMU must have run before a fault strikes it (its guest booted,
    /// e.g. after the previous row restarted it).
    #[arg(long, requires = "repo", default_value = "30s", value_parser = humantime::parse_duration)]
    settle: std::time::Duration,
    /// Sandbox: kernel the drill's VMs boot (default: the test guest, target/guest/vmlinuz).
    #[arg(long, default_value = "target/guest/vmlinuz")]
    kernel: PathBuf,
    /// Sandbox: their initramfs (default: target/guest/initrd.img).
    #[arg(long, default_value = "target/guest/initrd.img")]
    initrd: PathBuf,
    /// Sandbox: boot this disk image (qcow2 or raw) through the firmware instead of a
    /// kernel and initrd; the rows that need the test guest's knobs are skipped.
    #[arg(long, conflicts_with = "repo")]
    image: Option<PathBuf>,
    /// Sandbox: memory of every VM, in MiB (raise it for your image).
    #[arg(long, default_value_t = 96)]
    memory: u64,
    /// Sandbox: `[heartbeat] interval` of the drill's cluster (default: the engine's, 1s).
    #[arg(long, requires = "down_after")]
    heartbeat: Option<String>,
    /// Sandbox: `[heartbeat] down_after` (default: the engine's, 5s).
    #[arg(long, requires = "heartbeat")]
    down_after: Option<String>,
    /// Only the failure modes whose name contains this (repeatable).
    #[arg(long)]
    only: Vec<String>,
    /// Print the rows as JSON instead of the Markdown table.
    #[arg(long)]
    json: bool,
    /// Sandbox: a chaos soak of this long instead of the table: random faults from a
    /// seeded schedule, the invariants checked every 10 ms.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with_all = ["repo", "image", "only"])]
    chaos: Option<std::time::Duration>,
    /// The chaos schedule's seed (default: one from the clock); the same seed replays
    /// the same faults with the same pauses.
    #[arg(long, requires = "chaos")]
    seed: Option<u64>,
}

/// Runs the drill; exit 1 when a row could not be measured or an invariant broke.
pub fn drill(args: &DrillArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    let progress = &mut |line: &str| eprintln!("drill: {line}");
    if let Some(duration) = args.chaos {
        return chaos(args, duration, progress);
    }
    let rows = if let (Some(repo), Some(vm)) = (&args.repo, &args.vm) {
        confirm(vm, args.yes_disrupt.as_deref(), args.runs)?;
        let cfg = ClusterConfig {
            repo: repo.clone(),
            path: args.path.clone(),
            state_dir: args.state_dir.clone(),
            vm: vm.clone(),
            runs: args.runs,
            to: args.to.clone(),
            supervised: args.supervised,
            settle: args.settle,
            only: args.only.clone(),
        };
        run_cluster(&cfg, progress)?
    } else {
        let cfg = DrillConfig {
            runs: args.runs,
            kernel: args.kernel.clone(),
            initrd: args.initrd.clone(),
            image: args.image.clone(),
            memory_mb: args.memory,
            heartbeat: args.heartbeat.clone().zip(args.down_after.clone()),
            only: args.only.clone(),
        };
        run(&cfg, progress)?
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", markdown(&rows));
    }
    if passed(&rows) {
        Ok(0)
    } else {
        eprintln!(
            "drill: a row was not measured, an invariant broke, or nothing ran (see the table)"
        );
        Ok(1)
    }
}

/// The chaos soak; exit 1 on any violation.
fn chaos(
    args: &DrillArgs,
    duration: std::time::Duration,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<u8> {
    let cfg = ChaosConfig {
        duration,
        seed: args.seed.unwrap_or_else(clock_seed),
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        memory_mb: args.memory,
    };
    // First, whatever happens next: the seed is what replays a failure.
    progress(&format!(
        "chaos seed {} (replay: {})",
        cfg.seed,
        crate::drill::replay(&cfg)
    ));
    let report = run_chaos(&cfg, progress)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", summary(&report));
    }
    Ok(u8::from(!report.clean()))
}

/// A real cluster's VM is disrupted only when `--yes-disrupt` repeats its name.
fn confirm(vm: &str, yes: Option<&str>, runs: usize) -> anyhow::Result<()> {
    match yes {
        Some(name) if name == vm => Ok(()),
        Some(name) => anyhow::bail!(
            "--yes-disrupt {name} does not name the VM to drill ({vm}); nothing was done"
        ),
        None => anyhow::bail!(
            "the drill would kill {vm}'s QEMU, panic its guest, kill the watch daemon and move {vm} to another host and back (by commits), up to {runs} times each; no other VM is touched. Confirm with --yes-disrupt {vm}; nothing was done"
        ),
    }
}
