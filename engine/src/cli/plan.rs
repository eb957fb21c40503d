//! `validate`, `plan` and `apply`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use super::context::Hosts;
use super::context::{print_invalid, Ctx};
use super::progress::Progress;
use super::{RepoArgs, EXIT_CHANGES};
use crate::execute::journal::JournalFile;
use crate::execute::Doing;
use crate::observe::Observed;
use crate::plan::{Plan, SavedPlan};
use crate::records::StateLock;
use crate::source::{Source, Target};
use crate::status::StatusDir;
use crate::step::{carry_out, planned, publish, Fleet as _};

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Save the plan to FILE for `apply FILE`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
    /// Exit 2 when there are changes, 0 when none, 1 on error.
    #[arg(long)]
    detailed_exitcode: bool,
    /// Also stop orphan QEMUs (ours, with no instance record).
    #[arg(long)]
    prune: bool,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Apply without asking.
    #[arg(long)]
    auto_approve: bool,
    /// Also stop orphan QEMUs (ours, with no instance record).
    #[arg(long)]
    prune: bool,
    /// A plan saved by `plan --out`; refused when the hosts changed since.
    plan_file: Option<PathBuf>,
}

pub fn validate(args: &RepoArgs) -> anyhow::Result<u8> {
    let ctx = Ctx::open(args)?;
    match ctx.target()? {
        Ok(t) => {
            println!(
                "commit {}: {} VMs, {} hosts: valid",
                t.commit.short(),
                t.desired.vms.len(),
                t.desired.hosts.len()
            );
            Ok(0)
        }
        Err((commit, diags)) => {
            print_invalid(&commit, &diags);
            Ok(1)
        }
    }
}

/// Takes the lock and looks at every host.
async fn observe(
    ctx: &Ctx,
    target: &Target,
    what: &str,
) -> anyhow::Result<(StateLock, Hosts, Observed)> {
    let state = ctx.state_dir()?;
    let lock = StateLock::acquire(&state.lock_path(), what)?;
    let mut hosts = ctx.hosts(&target.desired).await;
    let observed = hosts.look().await;
    Ok((lock, hosts, observed))
}

pub async fn plan(args: &PlanArgs) -> anyhow::Result<u8> {
    let ctx = Ctx::open(&args.repo)?;
    let target = match ctx.target()? {
        Ok(t) => t,
        Err((commit, diags)) => {
            print_invalid(&commit, &diags);
            return Ok(1);
        }
    };
    ctx.warn_uncommitted();
    let (_lock, _hosts, observed) = observe(&ctx, &target, "plasmavmc plan").await?;
    let plan = planned(&target, &observed, args.prune);
    if args.json {
        let json = serde_json::json!({
            "revision": target.commit.id,
            "spec_dir": ctx.source.spec_dir(),
            "actions": plan.actions,
            "notes": plan.notes,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print_plan(&ctx.source, &target, &observed, &plan);
    }
    if let Some(out) = &args.out {
        let saved = SavedPlan::new(
            &target.commit.id,
            ctx.source.spec_dir(),
            &observed,
            plan.clone(),
        );
        let text = serde_json::to_string_pretty(&saved)?;
        std::fs::write(out, text + "\n").with_context(|| format!("writing {}", out.display()))?;
        eprintln!(
            "saved the plan to {}; apply it with: plasmavmc apply {}",
            out.display(),
            out.display()
        );
    }
    Ok(if args.detailed_exitcode && !plan.is_empty() {
        EXIT_CHANGES
    } else {
        0
    })
}

fn print_plan(source: &Source, target: &Target, observed: &Observed, plan: &Plan) {
    let summary = if target.commit.summary.is_empty() {
        String::new()
    } else {
        format!(" ({})", target.commit.summary)
    };
    println!("commit {}{summary}", target.commit.short());
    if plan.is_empty() {
        println!("No changes: the hosts match this commit.");
    } else {
        let n = plan.actions.len();
        println!("Plan: {n} action{}", if n == 1 { "" } else { "s" });
        for action in &plan.actions {
            println!("  {}", action.describe());
            let seed = match (action, action.diff()) {
                (_, None) => String::new(),
                (a, Some(_)) => observed
                    .hosts
                    .get(a.host())
                    .and_then(|h| h.vms.get(a.vm()))
                    .map(|have| crate::source::seed::diffs(source, target, a.vm(), have))
                    .unwrap_or_default(),
            };
            for line in action.diff().unwrap_or("").lines().chain(seed.lines()) {
                println!("      {line}");
            }
        }
    }
    if !plan.notes.is_empty() {
        println!("Notes:");
        for note in &plan.notes {
            println!("  {note}");
        }
    }
}

pub async fn apply(args: &ApplyArgs) -> anyhow::Result<u8> {
    let ctx = Ctx::open(&args.repo)?;
    let saved = args.plan_file.as_deref().map(read_saved).transpose()?;
    let ctx = match &saved {
        Some(s) => Ctx {
            rev: s.revision.clone(),
            ..ctx
        },
        None => ctx,
    };
    let state = ctx.state_dir()?;
    let status = StatusDir::new(&state.status_dir());
    let mut engine = status.read().map(|s| s.engine).unwrap_or_default();
    let target = match ctx.target()? {
        Ok(t) => t,
        Err((commit, diags)) => {
            print_invalid(&commit, &diags);
            let _lock = StateLock::acquire(&state.lock_path(), "plasmavmc apply")?;
            engine.last_attempted_revision = ctx.source.resolve(&ctx.rev).ok();
            engine.last_error = Some(
                diags
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
            engine.updated_at = crate::time::now();
            status.write_engine(&engine)?;
            return Ok(1);
        }
    };
    ctx.warn_uncommitted();
    let (_lock, mut hosts, observed) = observe(&ctx, &target, "plasmavmc apply").await?;
    let plan = if let Some(saved) = &saved {
        saved.check(ctx.source.spec_dir(), &observed)?;
        let prune = saved
            .plan
            .actions
            .iter()
            .any(|a| matches!(a, crate::plan::Action::Prune { .. }));
        let again = planned(&target, &observed, prune);
        anyhow::ensure!(again.actions == saved.plan.actions, "the plan file does not match what this engine plans for the same commit and hosts; run plan again");
        print_plan(&ctx.source, &target, &observed, &saved.plan);
        saved.plan.clone()
    } else {
        let plan = planned(&target, &observed, args.prune);
        print_plan(&ctx.source, &target, &observed, &plan);
        if !plan.is_empty() && !args.auto_approve && !confirm(plan.actions.len())? {
            return Ok(1);
        }
        plan
    };
    let damaged = announce_interrupted(&JournalFile::new(&ctx.state));
    let shown = Progress::new();
    let live = show_live(&status, &shown);
    let outcome = carry_out(&mut hosts, &target, observed, &plan, &state, &live, |s| {
        shown.ended(s);
    })
    .await?;
    engine.stamp(ctx.source.spec_dir());
    engine.revision_seen = Some(target.commit.id.clone());
    let mut problems =
        engine.attempted(&target.commit.id, outcome.report.as_ref(), &outcome.pending);
    if let Some(why) = damaged {
        // Reported, never ignored: in the status and in the exit code.
        problems = engine.add_problem(&why);
    }
    publish(&status, engine, Some(&target.desired), &outcome, &[])?;
    if !problems.is_empty() {
        eprintln!(
            "error: commit {} is not fully applied:\n{problems}",
            target.commit.short()
        );
        return Ok(1);
    }
    if !plan.is_empty() {
        println!("Applied commit {}.", target.commit.short());
    }
    Ok(0)
}

/// Says on stderr what an interrupted run left; returns why, when its journal could not
/// be read (it is set aside, and the apply reports it in status and exit code).
fn announce_interrupted(journal: &JournalFile) -> Option<String> {
    match journal.before_run() {
        Ok(Some(what)) => {
            eprintln!("note: {what}");
            None
        }
        Ok(None) => None,
        Err(why) => {
            eprintln!("error: {why}");
            Some(why)
        }
    }
}

/// A plan file written by `plan --out`.
fn read_saved(path: &std::path::Path) -> anyhow::Result<SavedPlan> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading plan file {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a plan file", path.display()))
}

/// What a long action is doing: on stderr, and in the VM's status.
fn show_live<'a>(
    status: &'a StatusDir,
    shown: &'a Progress,
) -> impl Fn(&str, Doing, &str) + Sync + 'a {
    move |vm, doing, what| {
        shown.live(vm, what);
        if let Err(e) = status.set_live(vm, doing, what) {
            tracing::warn!(vm, error = %e, "cannot show progress in the status");
        }
    }
}

/// Asks on the terminal; refuses without one.
fn confirm(n: usize) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        eprintln!("error: refusing to apply without --auto-approve: stdin is not a terminal (or save a plan with `plan --out FILE` and `apply FILE`)");
        return Ok(false);
    }
    print!("Apply these {n} actions? Only 'yes' is accepted: ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() == "yes" {
        Ok(true)
    } else {
        eprintln!("Apply cancelled; nothing was changed.");
        Ok(false)
    }
}
