//! Command-line edge: parses arguments, calls the library, prints, picks the exit code.
//! Nothing here decides what happens to a VM.

mod context;
mod disks;
mod drill;
mod plan;
mod progress;
mod serial;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::records::fence::FenceRecords;
use crate::source::Target;

/// Exit codes as Terraform's: 0 ok / no changes, 1 error, 2 changes present.
pub const EXIT_CHANGES: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "plasmavmc",
    version,
    about = "Declarative, git-driven QEMU virtual machines"
)]
struct Cli {
    /// Log format on stderr: `text` for people, `json` (one object per line) for journald/Loki.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PLASMAVMC_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check every spec file of a commit; print each error as path:line:col.
    Validate(RepoArgs),
    /// Show what apply would change.
    Plan(plan::PlanArgs),
    /// Make the hosts match a commit (or a saved plan).
    Apply(plan::ApplyArgs),
    /// Show what runs, from a fresh look at the hosts (or the status files while another
    /// engine holds the state directory).
    Status(status::StatusArgs),
    /// Keep the hosts equal to the newest valid commit of a branch, and heal them: restart
    /// crashed VMs by policy, adopt running ones after a restart of the engine.
    Watch(WatchArgs),
    /// Operator fencing: `fence confirm HOST` records that HOST is powered off, so its
    /// `ha` VMs may be recovered elsewhere.
    Fence {
        #[command(subcommand)]
        action: FenceAction,
    },
    /// An interactive serial console on a VM, wherever it runs (leave with Ctrl-]).
    /// One console per VM at a time: a second one is refused.
    Console(serial::ConsoleArgs),
    /// A VM's serial log, from wherever it runs; -f follows it across restarts.
    Logs(serial::LogsArgs),
    /// Every disk the engine knows of, on every host and shared pool: in use, retained
    /// (since when, why) or orphaned; `disks delete` is the one way to delete one.
    Disks(disks::DisksArgs),
    /// The host side: serve one engine on stdin/stdout (started by the engine itself,
    /// over ssh, or by a host's `exec` command).
    Agent(AgentArgs),
    /// The failure table, measured: every failure mode (engine, QEMU, guest, host,
    /// network, migration) run against the real engine on a throw-away cluster of
    /// simulated hosts on this machine; or, with --repo/--vm/--yes-disrupt, the rows that
    /// touch one VM only, against a real cluster's designated test VM.
    Drill(Box<drill::DrillArgs>),
    /// Write the JSON Schemas of the spec files.
    Schema {
        /// Folder to write vm/host/cluster.schema.json into.
        #[arg(long, default_value = "schemas")]
        out: PathBuf,
    },
}

/// Where the desired state and the engine's state live.
#[derive(Debug, Clone, Args)]
pub struct RepoArgs {
    /// The git repository (or a folder inside it).
    #[arg(long, default_value = ".")]
    repo: PathBuf,
    /// Folder of the repository that holds the specs (relative to --repo).
    #[arg(long)]
    path: Option<PathBuf>,
    /// Commit to read (only committed content counts).
    #[arg(long, default_value = "HEAD")]
    rev: String,
    /// State directory (default: <repo>/<path>/.plasmavmc, git-ignored).
    #[arg(long, env = "PLASMAVMC_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum FenceAction {
    /// HOST is powered off (checked by you): its VMs can no longer run there.
    Confirm {
        host: String,
        #[command(flatten)]
        repo: RepoArgs,
    },
}

/// `agent` arguments.
#[derive(Debug, Args)]
struct AgentArgs {
    /// Speak the agent protocol on stdin/stdout (the only transport).
    #[arg(long)]
    stdio: bool,
    /// Folder this host keeps instances and disks in; one engine at a time.
    #[arg(long)]
    root: PathBuf,
    /// Instead of the protocol: relay VM's serial console on stdin/stdout (no host
    /// lock; beside a running engine). Started by `plasmavmc console`.
    #[arg(long, value_name = "VM", conflicts_with = "logs")]
    console: Option<String>,
    /// Instead of the protocol: write VM's serial log on stdout (no host lock).
    /// Started by `plasmavmc logs`.
    #[arg(long, value_name = "VM")]
    logs: Option<String>,
    /// With --logs: keep following, across restarts, until stdin closes.
    #[arg(long, requires = "logs")]
    follow: bool,
    /// With --logs: only the last N lines.
    #[arg(long, requires = "logs")]
    lines: Option<usize>,
    /// Instead of the protocol: print every disk file of this host as JSON (no host
    /// lock). Started by `plasmavmc disks`.
    #[arg(long, conflicts_with_all = ["console", "logs"])]
    disks: bool,
    /// With --disks: the host's shared storage folder.
    #[arg(long, requires = "disks")]
    shared: Option<PathBuf>,
    /// Exit (leaving every VM running) when the engine sends nothing for this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    silence: std::time::Duration,
}

/// `watch` arguments.
#[derive(Debug, Args)]
struct WatchArgs {
    /// The git repository (a local path, or a URL: ssh://, https://, file://, user@host:path).
    #[arg(long, default_value = ".")]
    repo: String,
    /// Folder of the repository that holds the specs.
    #[arg(long)]
    path: Option<PathBuf>,
    /// Branch to follow (default: the checked-out branch; `main` for a URL).
    #[arg(long)]
    branch: Option<String>,
    /// Periodic resync (and fetch, for a URL), e.g. 15s, 1m.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    interval: std::time::Duration,
    /// State directory (default: <repo>/<path>/.plasmavmc; required for a URL).
    #[arg(long, env = "PLASMAVMC_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// After each change, commit the status files to this branch (working tree untouched).
    #[arg(long)]
    status_branch: Option<String>,
    /// Stop orphan QEMUs (ours, with no instance record) instead of only reporting them.
    #[arg(long)]
    prune: bool,
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Watch(_)) {
        "info"
    } else {
        "warn"
    };
    init_logging(cli.log_format, default_level);
    // Agents this process starts log in the same format (they read it from the env).
    std::env::set_var(
        "PLASMAVMC_LOG_FORMAT",
        match cli.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        },
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Validate(args) => plan::validate(&args),
            Command::Plan(args) => plan::plan(&args).await,
            Command::Apply(args) => plan::apply(&args).await,
            Command::Status(args) => status::status(&args).await,
            Command::Watch(args) => watch(args).await,
            Command::Agent(args) => agent(args).await,
            // Blocking by design (a terminal, a child process): off the async workers.
            Command::Console(args) => tokio::task::spawn_blocking(move || serial::console(&args))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("the console panicked: {e}"))),
            Command::Logs(args) => tokio::task::spawn_blocking(move || serial::logs(&args))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("logs panicked: {e}"))),
            Command::Disks(args) => disks::disks(&args).await,
            Command::Fence {
                action: FenceAction::Confirm { host, repo },
            } => fence_confirm(&host, &repo),
            Command::Schema { out } => schema(&out),
            // Blocking by design (processes, polling): off the async workers.
            Command::Drill(args) => tokio::task::spawn_blocking(move || drill::drill(&args))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("the drill panicked: {e}"))),
        }
    });
    // A blocked stdin read (the agent after its controller went silent) must not keep
    // the process alive: give background work a moment, then go.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
}

fn fence_confirm(host: &str, repo: &RepoArgs) -> anyhow::Result<u8> {
    let ctx = context::Ctx::open(repo)?;
    if let Ok(target) = Target::load(&ctx.source, &ctx.rev) {
        // A host removed from the specs may still hold VMs (the engine's record says
        // which): they stay unknown until it is fenced, so it can be confirmed too.
        let recorded = crate::records::whereabouts::Whereabouts::new(&ctx.state)
            .read()
            .ok()
            .flatten()
            .is_some_and(|places| places.values().flatten().any(|h| h == host));
        anyhow::ensure!(
            target.desired.hosts.contains_key(host) || recorded,
            "host {host:?} is not in commit {} and no VM is recorded on it",
            target.commit.short()
        );
    }
    anyhow::ensure!(
        plasmavmc_specs::name_problem(host).is_none(),
        "{host:?} is not a host name"
    );
    let record = FenceRecords::new(&ctx.state).record(host, "operator")?;
    println!("recorded: host {host} is fenced (by operator at {}); its ha VMs may now be recovered elsewhere", record.at);
    // A daemon holding the state directory acts on it now rather than at its next
    // health check (up to `down_after` later).
    if let Some(pid) = crate::records::running_watch(&ctx.state_dir()?.lock_path()) {
        if nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )
        .is_ok()
        {
            println!("told the running daemon (pid {pid}) to act on it now");
        }
    }
    Ok(0)
}

async fn agent(args: AgentArgs) -> anyhow::Result<u8> {
    use crate::agent::serial;
    if let Some(vm) = &args.console {
        serial::console(&args.root, vm, tokio::io::stdin(), tokio::io::stdout()).await?;
        return Ok(0);
    }
    if let Some(vm) = &args.logs {
        let (stdin, stdout) = (tokio::io::stdin(), tokio::io::stdout());
        serial::logs(&args.root, vm, args.follow, args.lines, stdin, stdout).await?;
        return Ok(0);
    }
    if args.disks {
        let found = crate::host::list_disks(&args.root, args.shared.as_deref());
        println!("{}", serde_json::to_string(&found)?);
        return Ok(0);
    }
    anyhow::ensure!(
        args.stdio,
        "only --stdio is supported: the engine talks to the agent over its stdin/stdout"
    );
    let opts = crate::agent::AgentOptions {
        root: args.root,
        silence: args.silence,
        qmp_ready: std::time::Duration::from_secs(30),
    };
    crate::agent::serve(opts, tokio::io::stdin(), tokio::io::stdout()).await?;
    Ok(0)
}

async fn watch(args: WatchArgs) -> anyhow::Result<u8> {
    let cfg = crate::watch::WatchConfig {
        repo: args.repo,
        path: args.path,
        branch: args.branch,
        interval: args.interval,
        state_dir: args.state_dir,
        status_branch: args.status_branch,
        prune: args.prune,
    };
    crate::watch::run(cfg).await?;
    Ok(0)
}

fn schema(out: &std::path::Path) -> anyhow::Result<u8> {
    std::fs::create_dir_all(out)?;
    for (name, text) in plasmavmc_specs::schema::all() {
        let path = out.join(name);
        std::fs::write(&path, text)?;
        println!("wrote {}", path.display());
    }
    Ok(0)
}
