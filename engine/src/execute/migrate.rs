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

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::ExecError;
use crate::host::{Host, HostError};
use crate::plan::MoveMode;
use crate::qemu::migrate::Tuning;
use crate::source::Target;

/// One move, as the plan gave it.
pub(super) struct Move<'a> {
    pub vm: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub mode: MoveMode,
}

pub(super) async fn run_move<H: Host>(
    m: &Move<'_>,
    target: &Target,
    hosts: &BTreeMap<String, H>,
    stop_timeout: Duration,
) -> Result<String, ExecError> {
    let host = |name: &str| {
        hosts.get(name).ok_or_else(|| ExecError::NoHost {
            host: name.to_owned(),
        })
    };
    let (src, dst) = (host(m.from)?, host(m.to)?);
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
    // Disks that are not the very same file on both hosts are copied.
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
    match m.mode {
        MoveMode::Live => {
            let listen = target
                .desired
                .hosts
                .get(m.to)
                .map_or_else(|| "127.0.0.1".to_owned(), |h| h.spec.migration_host());
            let tuning = tuning(target, &there.spec, &copy);
            let incoming = dst.prepare_incoming(&there, m.from, &listen, &copy).await?;
            let stats = match src.migrate_out(m.vm, &incoming, &tuning).await {
                Ok(stats) => stats,
                Err(e) => {
                    if let Err(cleanup) = dst.discard(m.vm).await {
                        warn!(vm = m.vm, host = m.to, error = %super::error_chain(&cleanup), "cannot remove the half-made target; the next plan removes it");
                    }
                    return Err(e.into());
                }
            };
            // Past the commit point: the guest lives on the target now.
            let pid = dst.start(m.vm).await?;
            // QEMU settles its figures a moment after `completed`; the guest runs already.
            let stats = match src.migration_stats(m.vm).await {
                Ok(last) => crate::qemu::migrate::Stats {
                    disk_bytes: stats.disk_bytes,
                    ..last
                },
                Err(_) => stats,
            };
            discard_source(src, m).await;
            Ok(format!(
                "live to {}, pid {pid}: {} ms, downtime {} ms, {} MiB memory{}, {} passes",
                m.to,
                stats.total_ms,
                stats.downtime_ms,
                stats.ram_bytes >> 20,
                if copy.is_empty() {
                    String::new()
                } else {
                    format!(" and {} MiB disk", stats.disk_bytes >> 20)
                },
                stats.passes
            ))
        }
        MoveMode::Cold => {
            src.stop(m.vm, stop_timeout).await?;
            dst.create(&there).await?;
            let mut bytes = 0;
            for disk in &copy {
                bytes += copy_disk(src, dst, m.vm, disk).await?;
            }
            let started = if there.spec.power == plasmavmc_specs::Power::Running {
                let pid = dst.start(m.vm).await?;
                format!(", running, pid {pid}")
            } else {
                String::new()
            };
            discard_source(src, m).await;
            Ok(format!(
                "cold to {}: {} disk{} copied ({} MiB){started}",
                m.to,
                copy.len(),
                if copy.len() == 1 { "" } else { "s" },
                bytes >> 20
            ))
        }
    }
}

/// Removes the source's copy once the target holds the VM. A failure is only logged: the
/// next plan sees the stale copy and removes it.
async fn discard_source<H: Host>(src: &H, m: &Move<'_>) {
    match src.discard(m.vm).await {
        Ok(()) => info!(vm = m.vm, host = m.from, "source copy removed"),
        Err(e) => {
            warn!(vm = m.vm, host = m.from, error = %super::error_chain(&e), "cannot remove the source copy; the next plan removes it");
        }
    }
}

/// Streams local disk `disk` of stopped `vm` from `src` to `dst`; returns its size.
async fn copy_disk<H: Host>(src: &H, dst: &H, vm: &str, disk: &str) -> Result<u64, HostError> {
    let mut hasher = Sha256::new();
    let mut offset = 0;
    loop {
        let chunk = src.read_disk(vm, disk, offset).await?;
        if chunk.data.is_empty() {
            hasher.update(vec![0u8; usize::try_from(chunk.len).unwrap_or(0)]);
        } else {
            hasher.update(&chunk.data);
        }
        let end = offset + chunk.len;
        let last = end >= chunk.size || chunk.len == 0;
        let sum = last.then(|| crate::agent::hex(&hasher.clone().finalize()));
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
    }
}
