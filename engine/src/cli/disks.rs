//! `disks`: every disk the engine knows of — instances' local disks, retained disks,
//! shared disks — on every host and pool of the commit, and whether a VM of the specs
//! uses it. Listing reads folders through each host's agent in a lock-free mode, so it
//! works beside a running `watch`. `disks delete PATH --confirm PATH` is the one way a
//! disk is ever deleted: only a retained or orphaned one, never beside a running engine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use plasmavmc_specs::Desired;

use super::context::Ctx;
use super::RepoArgs;
use crate::host::Host as _;
use crate::observe::{DiskFile, DiskKind};
use crate::records::{LockError, StateDir, StateLock};
use crate::source::Target;

/// Bound on one host's listing.
const LIST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct DisksArgs {
    #[command(subcommand)]
    action: Option<DisksAction>,
    #[command(flatten)]
    repo: RepoArgs,
    /// Only the disks no VM of the specs uses: retained ones and orphans.
    #[arg(long)]
    orphans: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum DisksAction {
    /// Deletes one retained or orphaned disk file for good (refused for a disk a VM of
    /// the specs uses, one a QEMU holds, and while another engine runs).
    Delete {
        /// The disk file, as `plasmavmc disks` lists it.
        #[arg(value_name = "PATH")]
        file: PathBuf,
        /// The same path again: nothing is deleted by a slip of the keyboard.
        #[arg(long)]
        confirm: PathBuf,
        #[command(flatten)]
        repo: RepoArgs,
    },
}

/// One disk as listed: the file, where it is, whether a VM uses it.
#[derive(Debug, Clone, serde::Serialize)]
struct Listed {
    #[serde(flatten)]
    file: DiskFile,
    /// `host hv1` or `pool p1` (shared storage).
    location: String,
    /// The hosts that reported it (every host of a pool sees its shared files).
    hosts: Vec<String>,
    in_use: bool,
    state: String,
}

pub async fn disks(args: &DisksArgs) -> anyhow::Result<u8> {
    match &args.action {
        None => list(args).await,
        Some(DisksAction::Delete {
            file,
            confirm,
            repo,
        }) => delete(repo, file, confirm).await,
    }
}

async fn list(args: &DisksArgs) -> anyhow::Result<u8> {
    let (ctx, target) = open(&args.repo)?;
    let listed = gather(&ctx, &target.desired).await;
    let shown: Vec<&Listed> = listed
        .iter()
        .filter(|d| !args.orphans || !d.in_use)
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(0);
    }
    if shown.is_empty() {
        println!(
            "No disks{}.",
            if args.orphans { " left unused" } else { "" }
        );
        return Ok(0);
    }
    println!(
        "{:<10} {:<12} {:<14} {:>9}  PATH",
        "STATE", "VM", "WHERE", "SIZE"
    );
    for d in shown {
        println!(
            "{:<10} {:<12} {:<14} {:>9}  {}",
            d.state.split(':').next().unwrap_or_default(),
            d.file.vm,
            d.location,
            human(d.file.bytes),
            d.file.path.display()
        );
        if let Some((_, why)) = d.state.split_once(": ") {
            println!("{:<10} {why}", "");
        }
    }
    Ok(0)
}

async fn delete(repo: &RepoArgs, path: &Path, confirm: &Path) -> anyhow::Result<u8> {
    anyhow::ensure!(
        path == confirm,
        "--confirm must repeat the path exactly ({} ≠ {}); nothing was deleted",
        confirm.display(),
        path.display()
    );
    let (ctx, target) = open(repo)?;
    let state = StateDir::at(&ctx.state);
    let _lock = match StateLock::acquire(&state.lock_path(), "plasmavmc disks delete") {
        Ok(lock) => lock,
        Err(LockError::Held { holder, .. }) => anyhow::bail!(
            "{holder} holds the state directory: a disk is never deleted beside a running \
             engine; stop it first. Nothing was deleted"
        ),
        Err(e) => return Err(e.into()),
    };
    let listed = gather(&ctx, &target.desired).await;
    let found = listed
        .iter()
        .find(|d| d.file.path == path)
        .with_context(|| {
            format!(
                "{} is not a disk any host of commit {} reports (see `plasmavmc disks`); \
                 nothing was deleted",
                path.display(),
                target.commit.short()
            )
        })?;
    anyhow::ensure!(
        !found.in_use,
        "{} is a disk of VM {}, which is in the specs: {}; nothing was deleted",
        path.display(),
        found.file.vm,
        found.state
    );
    let hosts = ctx.hosts(&target.desired).await;
    let (name, host) = found
        .hosts
        .iter()
        .find_map(|h| hosts.up.get(h).map(|host| (h, host)))
        .with_context(|| {
            format!(
                "no host that has {} answers ({}); nothing was deleted",
                path.display(),
                found.hosts.join(", ")
            )
        })?;
    let shared = shared_of(&target.desired, name);
    let bytes = host
        .delete_disk(path, shared.as_deref())
        .await
        .map_err(|e| anyhow::anyhow!(crate::errors::error_chain(&e)))
        .with_context(|| format!("deleting {} on {name}", path.display()))?;
    println!(
        "deleted {} ({}) on {name} ({})",
        path.display(),
        human(bytes),
        found.location
    );
    Ok(0)
}

fn open(repo: &RepoArgs) -> anyhow::Result<(Ctx, Target)> {
    let ctx = Ctx::open(repo)?;
    let target = match ctx.target()? {
        Ok(t) => t,
        Err((commit, _)) => {
            anyhow::bail!("commit {commit} is invalid; run `plasmavmc validate`")
        }
    };
    Ok((ctx, target))
}

fn shared_of(desired: &Desired, host: &str) -> Option<PathBuf> {
    desired
        .hosts
        .get(host)
        .and_then(|h| h.spec.shared_storage.as_ref())
        .map(PathBuf::from)
}

/// Every host's disks, each file once (a pool's shared files are seen by all its
/// hosts), classified against the specs. Unreachable hosts are reported on stderr.
async fn gather(ctx: &Ctx, desired: &Desired) -> Vec<Listed> {
    let state = StateDir::at(&ctx.state);
    let asks = desired.hosts.values().map(|entry| {
        let state = &state;
        async move {
            let shared = shared_of(desired, &entry.name);
            let mut mode = vec!["--disks".to_owned()];
            if let Some(dir) = &shared {
                mode.extend(["--shared".to_owned(), dir.display().to_string()]);
            }
            let found = match crate::host::serial_argv(entry, state, &mode) {
                Ok(argv) => ask(&argv).await,
                Err(e) => Err(crate::errors::error_chain(&e)),
            };
            (entry.name.clone(), found)
        }
    });
    let mut by_path: BTreeMap<PathBuf, Listed> = BTreeMap::new();
    for (host, found) in futures_util::future::join_all(asks).await {
        let files = match found {
            Ok(files) => files,
            Err(why) => {
                eprintln!("warning: host {host} did not list its disks: {why}");
                continue;
            }
        };
        for file in files {
            if let Some(seen) = by_path.get_mut(&file.path) {
                seen.hosts.push(host.clone());
                continue;
            }
            let listed = classify(desired, &host, file);
            by_path.insert(listed.file.path.clone(), listed);
        }
    }
    by_path.into_values().collect()
}

fn classify(desired: &Desired, host: &str, file: DiskFile) -> Listed {
    let in_specs = desired.vms.contains_key(&file.vm);
    let (in_use, state, location) = match file.kind {
        DiskKind::Instance if in_specs => (true, "in use".to_owned(), format!("host {host}")),
        DiskKind::Instance => (
            false,
            format!(
                "orphan: an instance of {}, which is not in the specs",
                file.vm
            ),
            format!("host {host}"),
        ),
        DiskKind::Retained => (
            false,
            format!(
                "retained: since {}: {}",
                file.since.as_deref().unwrap_or("?"),
                file.reason.as_deref().unwrap_or("no note")
            ),
            format!("host {host}"),
        ),
        DiskKind::Shared => {
            let pool = desired
                .hosts
                .get(host)
                .and_then(|h| h.spec.storage_pool.clone())
                .unwrap_or_else(|| host.to_owned());
            let state = if in_specs {
                "in use".to_owned()
            } else {
                format!(
                    "orphan: VM {} is not in the specs; its shared disks stay in place",
                    file.vm
                )
            };
            (in_specs, state, format!("pool {pool}"))
        }
    };
    Listed {
        file,
        location,
        hosts: vec![host.to_owned()],
        in_use,
        state,
    }
}

/// Runs an agent in `--disks` mode and reads its answer.
async fn ask(argv: &[String]) -> Result<Vec<DiskFile>, String> {
    let (exe, rest) = argv.split_first().ok_or("empty agent command")?;
    let run = tokio::process::Command::new(exe)
        .args(rest)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(LIST_TIMEOUT, run)
        .await
        .map_err(|_| format!("no answer within {LIST_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot run {exe}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{}: {}", out.status, err.trim()));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("unreadable answer: {e}"))
}

/// `1.2 GiB`, `640 KiB`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
