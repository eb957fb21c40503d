//! Carrying out a move between two hosts.
//!
//! ```text
//! live: target waits (-incoming) ─> source migrates (mirrors local disks) ─> completed
//!       ─> target resumed ─> source copy discarded
//! cold: source stopped ─> target instance created ─> local disks streamed through the
//!       agents (zero chunks stay holes, SHA-256 checked) ─> target started ─> source
//!       copy discarded
//! ```
//! Each step is a host call; if one fails or the engine dies between two, the next plan
//! finds both copies and keeps the one that holds the guest (see `plan/recover.rs`):
//! before `completed` that is the source, after it the target. A source is only removed
//! once the target runs (or holds the disks, for a VM that stays stopped).
//!
//! A live move may switch to postcopy (`[migration] postcopy_after`): the source says so
//! in its progress, the target is resumed at once (it runs the guest and pulls the pages
//! it lacks from the source), and from then on nothing resumes the source nor discards
//! the target, even when the move fails: the guest lives on the target or nowhere.

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::{Doing, ExecError};
use crate::failpoint::failpoint;
use crate::host::{Host, HostError};
use crate::plan::MoveMode;
use crate::qemu::instance::VmInstance;
use crate::qemu::migrate::Tuning;
use crate::source::Target;
use crate::wire::HostEvent;

/// One move, as the plan gave it.
pub(super) struct Move<'a> {
    pub vm: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub mode: MoveMode,
}

/// Both ends of one move and what it carries.
struct Ends<'a, H> {
    src: &'a H,
    dst: &'a H,
    /// The instance as the target runs it.
    there: VmInstance,
    /// Disks that are not the very same file on both hosts: mirrored or copied.
    copy: Vec<String>,
}

pub(super) async fn run_move<H: Host>(
    m: &Move<'_>,
    target: &Target,
    hosts: &BTreeMap<String, H>,
    stop_timeout: Duration,
    live: super::Live<'_>,
) -> Result<String, ExecError> {
    let host = |name: &str| {
        hosts.get(name).ok_or_else(|| ExecError::NoHost {
            host: name.to_owned(),
        })
    };
    let not_in_commit = || ExecError::NotInCommit {
        vm: m.vm.to_owned(),
        commit: target.commit.short().to_owned(),
    };
    let there = target.instance(m.vm, m.to).ok_or_else(not_in_commit)?;
    let here = target.instance(m.vm, m.from).ok_or_else(not_in_commit)?;
    let pool = |h: &str| {
        target
            .desired
            .hosts
            .get(h)
            .and_then(|e| e.spec.storage_pool.clone())
    };
    let same_pool = pool(m.from).is_some() && pool(m.from) == pool(m.to);
    let copy: Vec<String> = there
        .spec
        .disks
        .iter()
        .filter(|d| {
            let (a, b) = (here.disk_path(d), there.disk_path(d));
            let shared =
                |p: &Option<std::path::PathBuf>| p.as_ref().is_some_and(|p| p.is_absolute());
            !(same_pool && shared(&a) && shared(&b))
        })
        .map(|d| d.name.clone())
        .collect();
    let ends = Ends {
        src: host(m.from)?,
        dst: host(m.to)?,
        there,
        copy,
    };
    match m.mode {
        MoveMode::Live => {
            let listen = target
                .desired
                .hosts
                .get(m.to)
                .map_or_else(|| "127.0.0.1".to_owned(), |h| h.spec.migration_host());
            let tuning = tuning(target, &ends.there.spec, &ends.copy);
            live_move(m, &ends, &listen, &tuning, live).await
        }
        MoveMode::Cold => cold_move(m, &ends, stop_timeout, live).await,
    }
}

async fn live_move<H: Host>(
    m: &Move<'_>,
    ends: &Ends<'_, H>,
    listen: &str,
    tuning: &Tuning,
    live: super::Live<'_>,
) -> Result<String, ExecError> {
    let Ends {
        src,
        dst,
        there,
        copy,
    } = ends;
    let incoming = dst.prepare_incoming(there, m.from, listen, copy).await?;
    failpoint!("engine.migrate.live.prepared");
    live(
        m.vm,
        Doing::Migrating,
        &format!("target QEMU waiting on {} at {}", m.to, incoming.uri),
    );
    let mut events = src.subscribe();
    let migrate = src.migrate_out(m.vm, &incoming, tuning);
    tokio::pin!(migrate);
    let mut postcopy = false;
    let outcome = tokio::select! {
        r = &mut migrate => r,
        () = show_progress(&mut events, m, live, &mut postcopy) => {
            if postcopy {
                resume_postcopy_target(*dst, m, live).await;
                tokio::select! {
                    r = &mut migrate => r,
                    () = show_progress(&mut events, m, live, &mut postcopy) => migrate.await,
                }
            } else {
                migrate.await
            }
        }
    };
    let stats = match outcome {
        Ok(stats) => stats,
        // After the switch to postcopy the target holds the only guest there is (or
        // none, if the move broke): neither end is undone, the source never resumed.
        Err(e) if postcopy || postcopy_on(*src, m.vm).await => {
            warn!(vm = m.vm, from = m.from, to = m.to, error = %crate::errors::error_chain(&e), "the move failed after switching to postcopy: the guest is on the target or lost; the source stays paused and is never resumed");
            return Err(e.into());
        }
        // The source's answer was lost (its agent died) or came after the migration
        // completed all the same: the target holds the guest, and must not be discarded.
        Err(e) if completed_on(*dst, m.vm).await => {
            warn!(vm = m.vm, host = m.from, error = %crate::errors::error_chain(&e), "the source failed, but the migration completed: resuming the guest on the target");
            crate::qemu::migrate::Stats::default()
        }
        Err(e) => {
            if let Err(cleanup) = dst.discard(m.vm).await {
                warn!(vm = m.vm, host = m.to, error = %crate::errors::error_chain(&cleanup), "cannot remove the half-made target; the next plan removes it");
            }
            return Err(e.into());
        }
    };
    // Past the commit point: the guest lives on the target now.
    failpoint!("engine.migrate.live.completed");
    live(
        m.vm,
        Doing::Migrating,
        &format!("migration completed; resuming the guest on {}", m.to),
    );
    let pid = dst.start(m.vm).await?;
    failpoint!("engine.migrate.live.resumed");
    live(
        m.vm,
        Doing::Migrating,
        &format!(
            "running on {} (pid {pid}); removing {}'s copy",
            m.to, m.from
        ),
    );
    // QEMU settles its figures a moment after `completed`; the guest runs already.
    let stats = match src.migration_stats(m.vm).await {
        Ok(last) => crate::qemu::migrate::Stats {
            disk_bytes: stats.disk_bytes,
            postcopy_after_ms: stats.postcopy_after_ms,
            ..last
        },
        Err(_) => stats,
    };
    failpoint!("engine.migrate.live.discarding");
    discard_source(*src, m).await;
    Ok(format!(
        "live to {}, pid {pid}: {} ms, downtime {} ms, {} MiB memory{}, {} passes{}",
        m.to,
        stats.total_ms,
        stats.downtime_ms,
        stats.ram_bytes >> 20,
        if copy.is_empty() {
            String::new()
        } else {
            format!(" and {} MiB disk", stats.disk_bytes >> 20)
        },
        stats.passes,
        match stats.postcopy_after_ms {
            Some(at) => format!(
                ", postcopy after {:.1} s ({} MiB pulled by the target)",
                at as f64 / 1000.0,
                stats.postcopy_bytes >> 20
            ),
            None => String::new(),
        }
    ))
}

async fn cold_move<H: Host>(
    m: &Move<'_>,
    ends: &Ends<'_, H>,
    stop_timeout: Duration,
    live: super::Live<'_>,
) -> Result<String, ExecError> {
    let Ends {
        src,
        dst,
        there,
        copy,
    } = ends;
    live(
        m.vm,
        Doing::Migrating,
        &format!("moving cold to {}: stopping the guest on {}", m.to, m.from),
    );
    src.stop(m.vm, stop_timeout).await?;
    failpoint!("engine.migrate.cold.stopped");
    dst.create(there).await?;
    failpoint!("engine.migrate.cold.created");
    let mut bytes = 0;
    for disk in copy {
        bytes += copy_disk(*src, *dst, m, disk, live).await?;
        failpoint!("engine.migrate.cold.copied");
    }
    let started = if there.spec.power == plasmavmc_specs::Power::Running {
        let pid = dst.start(m.vm).await?;
        format!(", running, pid {pid}")
    } else {
        String::new()
    };
    failpoint!("engine.migrate.cold.started");
    discard_source(*src, m).await;
    Ok(format!(
        "cold to {}: {} disk{} copied ({} MiB){started}",
        m.to,
        copy.len(),
        if copy.len() == 1 { "" } else { "s" },
        bytes >> 20
    ))
}

/// Resumes the target of a move that switched to postcopy: it runs the guest from now
/// on and pulls the rest of its memory from the source until `completed`. A failure is
/// only logged: the target is resumed again once the migration completes.
async fn resume_postcopy_target<H: Host>(dst: &H, m: &Move<'_>, live: super::Live<'_>) {
    match dst.start(m.vm).await {
        Ok(pid) => live(
            m.vm,
            Doing::Migrating,
            &format!(
                "postcopy: the guest runs on {} (pid {pid}) and pulls the rest of its memory from {}; {} is never resumed",
                m.to, m.from, m.from
            ),
        ),
        Err(e) => {
            warn!(vm = m.vm, host = m.to, error = %crate::errors::error_chain(&e), "cannot resume the postcopy target yet; it is resumed once the migration completes");
        }
    }
}

/// Whether `host` holds `vm` as a live-migration source that switched to postcopy.
async fn postcopy_on<H: Host>(host: &H, vm: &str) -> bool {
    host.inventory()
        .await
        .is_ok_and(|inv| inv.vms.get(vm).is_some_and(|v| v.postcopy))
}

/// Whether `host` holds `vm` as a migration target whose migration completed.
async fn completed_on<H: Host>(host: &H, vm: &str) -> bool {
    host.inventory().await.is_ok_and(|inv| {
        inv.vms
            .get(vm)
            .is_some_and(crate::observe::ObservedVm::holds_completed_migration)
    })
}

/// Removes the source's copy once the target holds the VM. A failure is only logged: the
/// next plan sees the stale copy and removes it.
async fn discard_source<H: Host>(src: &H, m: &Move<'_>) {
    match src.discard(m.vm).await {
        Ok(()) => info!(vm = m.vm, host = m.from, "source copy removed"),
        Err(e) => {
            warn!(vm = m.vm, host = m.from, error = %crate::errors::error_chain(&e), "cannot remove the source copy; the next plan removes it");
        }
    }
}

/// Passes the source's migration progress to `live` until its events end; returns early
/// when the migration switches to postcopy (the first time: `postcopy` then says so).
async fn show_progress(
    events: &mut tokio::sync::broadcast::Receiver<HostEvent>,
    m: &Move<'_>,
    live: super::Live<'_>,
    postcopy: &mut bool,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(HostEvent::Migrating { vm, progress }) if vm == m.vm => {
                if !*postcopy && progress.phase.starts_with("postcopy") {
                    *postcopy = true;
                    live(
                        m.vm,
                        Doing::Migrating,
                        &format!(
                            "not converged after {:.1} s: switched to postcopy ({} MiB sent, {} MiB to go); resuming the guest on {}",
                            progress.elapsed_ms as f64 / 1000.0,
                            progress.transferred >> 20,
                            progress.remaining >> 20,
                            m.to
                        ),
                    );
                    return;
                }
                live(
                    m.vm,
                    Doing::Migrating,
                    &format!("migrating live to {}: {}", m.to, progress.describe()),
                );
                failpoint!("engine.migrate.live.progress", ());
            }
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
    }
}

/// Streams local disk `disk` of stopped `m.vm` from `src` to `dst`; returns its size.
async fn copy_disk<H: Host>(
    src: &H,
    dst: &H,
    m: &Move<'_>,
    disk: &str,
    live: super::Live<'_>,
) -> Result<u64, HostError> {
    let vm = m.vm;
    let mut hasher = Sha256::new();
    let mut offset = 0;
    let mut shown = std::time::Instant::now();
    loop {
        if shown.elapsed() >= Duration::from_secs(1) {
            shown = std::time::Instant::now();
            live(
                vm,
                Doing::Migrating,
                &format!(
                    "moving cold to {}: disk {disk}, {} MiB copied",
                    m.to,
                    offset >> 20
                ),
            );
        }
        let chunk = src.read_disk(vm, disk, offset).await?;
        if chunk.data.is_empty() {
            hasher.update(vec![0u8; usize::try_from(chunk.len).unwrap_or(0)]);
        } else {
            hasher.update(&chunk.data);
        }
        let end = offset + chunk.len;
        let last = end >= chunk.size || chunk.len == 0;
        let sum = last.then(|| crate::digest::hex(&hasher.clone().finalize()));
        dst.write_disk(vm, disk, offset, &chunk, sum.as_deref())
            .await?;
        if last {
            info!(vm, disk, bytes = chunk.size, "disk copied");
            return Ok(chunk.size);
        }
        offset = end;
    }
}

/// The cluster's migration settings for one VM: the completion bound scales with what
/// moves (memory and mirrored disks), at least one GiB's worth.
fn tuning(target: &Target, spec: &plasmavmc_specs::VmSpec, copy: &[String]) -> Tuning {
    let s = &target.desired.cluster.migration;
    let disk_gb: u64 = spec
        .disks
        .iter()
        .filter(|d| copy.contains(&d.name))
        .map(|d| d.size_gb.unwrap_or(1))
        .sum();
    let gib = (spec.memory_mb.div_ceil(1024) + disk_gb).max(1);
    let per_gib = s.timeout_per_gib.0.as_millis() as u64;
    Tuning {
        max_bandwidth_mib: s.max_bandwidth_mib,
        downtime_limit_ms: s.downtime_limit.0.as_millis() as u64,
        auto_converge: s.auto_converge,
        progress_timeout_ms: s.progress_timeout.0.as_millis() as u64,
        timeout_ms: per_gib.saturating_mul(gib),
        postcopy_after_ms: s.postcopy_after.map(|d| d.0.as_millis() as u64),
    }
}
