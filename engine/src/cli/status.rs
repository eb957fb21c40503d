//! `status`: a fresh look at the hosts when no other engine holds the state directory,
//! else what the status files say.

use clap::Args;

use super::context::Ctx;
use super::RepoArgs;
use crate::state::{LockError, StateLock};
use crate::status::{print_table, StatusDir};

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
            let hosts = match &target {
                Some(t) => ctx.hosts(&t.desired).await,
                None => {
                    ctx.hosts(&plasmavmc_specs::Desired::with_implicit_local())
                        .await
                }
            };
            let observed = ctx.observe(&hosts).await;
            let mut engine = dir.read().map(|s| s.engine).unwrap_or_default();
            engine.updated_at = crate::time::now();
            env!("CARGO_PKG_VERSION").clone_into(&mut engine.version);
            ctx.source.spec_dir().clone_into(&mut engine.spec_dir);
            let mut snap = dir.build(
                engine,
                target.as_ref().map(|t| &t.desired),
                &observed,
                None,
                &[],
            );
            // What the planner cannot do (no room, a pin to a drained host, ...), in
            // those VMs' messages, as `apply` and `watch` write them.
            if let Some(t) = &target {
                let plan = crate::plan::plan(&t.desired, &observed, crate::time::now_ms());
                snap.explain_pending(&plan.pending);
            }
            dir.write(&snap)?;
            snap
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
