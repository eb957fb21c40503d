//! `status`: a fresh look at the hosts when no other engine holds the state directory,
//! else what the status files say.

use clap::Args;

use super::context::Ctx;
use super::RepoArgs;
use crate::records::{LockError, StateLock};
use crate::status::{print_table, StatusDir};
use crate::step::{publish, Fleet as _, Outcome};

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn status(args: &StatusArgs) -> anyhow::Result<u8> {
    let ctx = Ctx::open(&args.repo)?;
    let state = ctx.state_dir()?;
    let dir = StatusDir::new(&state.status_dir());
    let snap = match StateLock::acquire(&state.lock_path(), "plasmavmc status") {
        Ok(_lock) => {
            let target = ctx.target()?.ok();
            let mut hosts = match &target {
                Some(t) => ctx.hosts(&t.desired).await,
                None => {
                    ctx.hosts(&plasmavmc_specs::Desired::with_implicit_local())
                        .await
                }
            };
            let observed = hosts.look().await;
            let mut engine = dir.read().map(|s| s.engine).unwrap_or_default();
            engine.stamp(ctx.source.spec_dir());
            // What the planner cannot do (no room, a pin to a drained host, ...), in
            // those VMs' messages, as `apply` and `watch` write them.
            let pending = target
                .as_ref()
                .map(|t| crate::step::planned(t, &observed, false).pending)
                .unwrap_or_default();
            let seen = Outcome {
                after: observed,
                pending,
                ..Outcome::default()
            };
            publish(
                &dir,
                engine,
                target.as_ref().map(|t| &t.desired),
                &seen,
                &[],
            )?
        }
        Err(LockError::Held { holder, .. }) => {
            eprintln!("note: {holder} holds the state directory; showing its status files");
            dir.read()?
        }
        Err(e) => return Err(e.into()),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&snap)?);
    } else {
        print!("{}", print_table(&snap));
    }
    Ok(0)
}
