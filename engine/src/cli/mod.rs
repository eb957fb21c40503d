//! Command-line edge: parses arguments, calls the library, prints, picks the exit code.
//! Nothing here decides what happens to a VM.

mod context;
mod plan;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Exit codes as Terraform's: 0 ok / no changes, 1 error, 2 changes present.
pub const EXIT_CHANGES: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "plasmavmc",
    version,
    about = "Declarative, git-driven QEMU virtual machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
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
            Command::Schema { out } => schema(&out),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
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
