//! Live migration over QMP, both ends, as measured on QEMU 7.2 (DESIGN.md §3).
//!
//! Target (QEMU started with `-S -incoming defer`): capability `events`, an NBD export
//! of every disk to mirror, `migrate-incoming`. Source: bandwidth and downtime limits,
//! `auto-converge`; disks to mirror get an NBD node and a `blockdev-mirror sync=full`
//! that must be ready before `migrate` starts, with `pause-before-switchover` so the
//! mirror is completed (cancelled without pivot: the target holds every write) while
//! the guest is paused. `completed` is the commit point: only then is the target
//! resumed, and the source is never resumed after it.
//!
//! Postcopy (`[migration] postcopy_after`) is an explicit escalation: every target
//! enables `postcopy-ram` when its host can, and a source whose migration has not
//! completed `postcopy_after` into it switches with `migrate-start-postcopy` (once its
//! record says so: see [`Escalation`]). From then on the target runs the guest (QEMU
//! keeps a `-S` target `paused` until `cont`) and pulls the pages it lacks, the source
//! is `finish-migrate` until `completed` (then `postmigrate`), and the source is never
//! resumed: measured on 7.2, a killed target leaves it `postcopy-paused`, and a
//! `migrate_cancel` then leaves it `cancelling` for good.
//!
//! Progress is polled (`query-migrate`, `query-block-jobs`): QMP events are not buffered
//! while no client listens, and the host's one QMP connection belongs to the monitor.
//! Figures (total time, downtime) are QEMU's own at `completed`.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use super::qmp::{Qmp, QmpError};
use crate::failpoint::failpoint;

/// How often progress is polled: every poll of a finished migration is time the guest
/// waits, paused, for its target to be resumed.
const POLL: Duration = Duration::from_millis(10);

/// How an outgoing migration is tuned and bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tuning {
    pub max_bandwidth_mib: u64,
    pub downtime_limit_ms: u64,
    pub auto_converge: bool,
    /// Cancel when no byte moved for this long.
    pub progress_timeout_ms: u64,
    /// Cancel when the whole migration takes longer.
    pub timeout_ms: u64,
    /// Switch to postcopy when not completed this long after the start (off: `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_after_ms: Option<u64>,
}

/// Where the target's NBD server listens and which disks it exports (by disk name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdTarget {
    pub host: String,
    pub port: u16,
    pub disks: Vec<String>,
}

/// Figures of a finished migration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub total_ms: u64,
    pub downtime_ms: u64,
    /// Memory bytes sent.
    pub ram_bytes: u64,
    /// Disk bytes mirrored.
    pub disk_bytes: u64,
    /// Passes over guest memory (dirty syncs).
    pub passes: u64,
    /// When the migration switched to postcopy (ms after its start), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_after_ms: Option<u64>,
    /// Memory bytes sent after the switch to postcopy.
    #[serde(default)]
    pub postcopy_bytes: u64,
}

/// How an outgoing migration escalates to postcopy.
pub struct Escalation<'a> {
    /// Not completed this long after the start: switch.
    pub after: Duration,
    /// Called once, right before `migrate-start-postcopy`: records on the source that
    /// it must never be resumed again. The switch happens only when it returns true.
    pub record: &'a (dyn Fn() -> bool + Sync),
}

impl std::fmt::Debug for Escalation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Escalation")
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

/// Whether a source whose outgoing migration is in QEMU state `status` may ever run its
/// guest again: not once it switched to postcopy (`postcopy-active`, `-paused`,
/// `-recover`): the target ran the guest since, and holds pages the source lacks.
pub fn source_may_resume(status: &str) -> bool {
    !status.starts_with("postcopy")
}

/// Where an outgoing migration is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// `mirroring` (local disks), or QEMU's status (`active`, `pre-switchover`, ...).
    pub phase: String,
    /// Bytes sent so far (disk bytes while mirroring).
    pub transferred: u64,
    /// Bytes still to send, as QEMU estimates it.
    pub remaining: u64,
    /// Passes over guest memory so far.
    pub passes: u64,
    pub elapsed_ms: u64,
}

impl Progress {
    /// `active: 512 MiB sent, 128 MiB to go, pass 2, 3.1 s`.
    pub fn describe(&self) -> String {
        format!(
            "{}: {} MiB sent, {} MiB to go, pass {}, {:.1} s",
            self.phase,
            self.transferred >> 20,
            self.remaining >> 20,
            self.passes,
            self.elapsed_ms as f64 / 1000.0
        )
    }
}

/// Errors of a migration step.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("migration failed: {0}")]
    Failed(String),
    #[error("no progress for {0:?}; cancelled")]
    Stalled(Duration),
    #[error("not completed within {0:?}; cancelled")]
    TimedOut(Duration),
    #[error("the incoming migration has not completed (QEMU is {0})")]
    NotCompleted(String),
    /// Failed after the switch to postcopy: the guest's memory is split between the
    /// hosts, and the source is left paused for good.
    #[error("failed {after_ms} ms after switching to postcopy, the source left paused (never resumed): {source}")]
    Postcopy {
        after_ms: u64,
        #[source]
        source: Box<MigrateError>,
    },
    /// A fail point's `error` action (test builds only).
    #[cfg(feature = "failpoints")]
    #[error(transparent)]
    Injected(#[from] crate::failpoint::Injected),
}

fn node(disk: &str) -> String {
    format!("disk-{disk}")
}

fn mirror_node(disk: &str) -> String {
    format!("mig-{disk}")
}

/// Target side: exports `nbd`'s disks (when mirroring) and waits for the stream on `uri`.
/// Returns whether it accepts postcopy (`postcopy-ram` set: the host must have
/// userfaultfd); it only matters when the source switches.
pub async fn start_incoming(
    qmp: &Qmp,
    uri: &str,
    nbd: Option<&NbdTarget>,
) -> Result<bool, MigrateError> {
    let postcopy = match set_capabilities(qmp, &[("events", true), ("postcopy-ram", true)]).await {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e, "this target cannot take postcopy; precopy only");
            set_capabilities(qmp, &[("events", true)]).await?;
            false
        }
    };
    if let Some(nbd) = nbd {
        qmp.execute(
            "nbd-server-start",
            Some(json!({"addr": {"type": "inet", "data": {"host": nbd.host, "port": nbd.port.to_string()}}})),
        )
        .await?;
        for disk in &nbd.disks {
            qmp.execute(
                "block-export-add",
                Some(
                    json!({"type": "nbd", "id": mirror_node(disk), "node-name": node(disk),
                    "writable": true, "name": disk}),
                ),
            )
            .await?;
        }
    }
    qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))
        .await?;
    Ok(postcopy)
}

/// Target side, after the source reported `completed` or switched to postcopy: ends the
/// NBD exports and resumes the guest. Refuses while the incoming migration is not
/// complete (nor in postcopy), after waiting a moment for it to get there: the source
/// says it switched a little before the target hears it.
pub async fn finish_incoming(qmp: &Qmp, nbd_disks: &[String]) -> Result<(), MigrateError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut status = qmp.query_status().await?;
    while status.status == "inmigrate" && Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
        status = qmp.query_status().await?;
    }
    if status.running {
        return Ok(());
    }
    if status.status != "paused" {
        return Err(MigrateError::NotCompleted(status.status));
    }
    for disk in nbd_disks {
        if let Err(e) = qmp
            .execute("block-export-del", Some(json!({ "id": mirror_node(disk) })))
            .await
        {
            debug!(disk, error = %e, "block-export-del");
        }
    }
    if !nbd_disks.is_empty() {
        if let Err(e) = qmp.execute("nbd-server-stop", None).await {
            debug!(error = %e, "nbd-server-stop");
        }
    }
    qmp.execute("cont", None).await?;
    Ok(())
}

/// Source side: migrates to `uri`, mirroring `nbd`'s disks first, switching to postcopy
/// as `escalation` says. On an error before the switch the migration is cancelled and
/// the source keeps (or resumes) running; after it, nothing is cancelled nor resumed.
pub async fn outgoing(
    qmp: &Qmp,
    uri: &str,
    nbd: Option<&NbdTarget>,
    tuning: &Tuning,
    escalation: Option<&Escalation<'_>>,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Stats, MigrateError> {
    let started = Instant::now();
    let mut switched = None;
    let run = Run {
        uri,
        nbd,
        tuning,
        escalation,
        started,
        progress,
    };
    match run_outgoing(qmp, &run, &mut switched).await {
        Ok(stats) => Ok(stats),
        Err(e) if switched.is_some() => {
            let after_ms = switched.unwrap_or_default();
            warn!(error = %e, after_ms, "migration failed after the switch to postcopy; the source stays paused and is never resumed");
            Err(MigrateError::Postcopy {
                after_ms,
                source: Box::new(e),
            })
        }
        Err(e) => {
            warn!(error = %e, "migration failed; cancelling, the source keeps running");
            cancel(qmp, nbd.map_or(&[][..], |n| &n.disks)).await;
            Err(e)
        }
    }
}

/// One outgoing migration's parameters.
struct Run<'a> {
    uri: &'a str,
    nbd: Option<&'a NbdTarget>,
    tuning: &'a Tuning,
    escalation: Option<&'a Escalation<'a>>,
    started: Instant,
    progress: &'a (dyn Fn(Progress) + Sync),
}

/// Sets `switched` (ms after the start) once the migration switched to postcopy.
async fn run_outgoing(
    qmp: &Qmp,
    run: &Run<'_>,
    switched: &mut Option<u64>,
) -> Result<Stats, MigrateError> {
    let Run {
        uri,
        nbd,
        tuning,
        escalation,
        started,
        progress,
    } = *run;
    let mirror = nbd.map_or(&[][..], |n| &n.disks);
    end_earlier(qmp, mirror).await;
    set_capabilities(
        qmp,
        &[
            ("events", true),
            ("auto-converge", tuning.auto_converge),
            ("pause-before-switchover", !mirror.is_empty()),
            ("postcopy-ram", escalation.is_some()),
        ],
    )
    .await?;
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({
            "max-bandwidth": tuning.max_bandwidth_mib << 20,
            "downtime-limit": tuning.downtime_limit_ms,
        })),
    )
    .await?;
    let mut clock = Clock::new(tuning, started);
    if let Some(nbd) = nbd {
        start_mirrors(qmp, nbd, &mut clock, progress).await?;
    }
    qmp.execute("migrate", Some(json!({ "uri": uri }))).await?;
    let mut last_log = Instant::now();
    let mut disk_bytes = 0;
    let mut escalation = escalation;
    let info = loop {
        let info: MigrateInfo = qmp.query("query-migrate", None).await?;
        match info.status.as_str() {
            // The commit point. Returned at once: the target stays paused until resumed.
            "completed" => break info,
            "failed" | "cancelled" => {
                return Err(MigrateError::Failed(
                    info.error_desc.unwrap_or_else(|| info.status.clone()),
                ))
            }
            // The link to the target broke after the switch: QEMU waits for a recovery
            // that nothing here attempts.
            "postcopy-paused" => {
                return Err(MigrateError::Failed(
                    "postcopy paused: the stream to the target broke".to_owned(),
                ))
            }
            "active" if escalation.is_some_and(|e| started.elapsed() >= e.after) => {
                let esc = escalation.take().expect("checked");
                switch_to_postcopy(qmp, &info, esc, started, switched, progress).await?;
                last_log = Instant::now();
            }
            "pre-switchover" => {
                // Guest paused: finish the mirrors (no pivot), then let the switchover go.
                disk_bytes = finish_mirrors(qmp, mirror).await?;
                failpoint!("agent.migrate-out.switchover");
                qmp.execute(
                    "migrate-continue",
                    Some(json!({ "state": "pre-switchover" })),
                )
                .await?;
            }
            _ => {}
        }
        let ram = info.ram.unwrap_or_default();
        // After the switch nothing is gained by giving up: the target runs the guest and
        // only QEMU's own `postcopy-paused` or `failed` ends the wait.
        if switched.is_none() {
            clock.check(ram.transferred)?;
        }
        if last_log.elapsed() >= Duration::from_secs(1) {
            last_log = Instant::now();
            info!(status = %info.status, transferred = ram.transferred, remaining = ram.remaining,
                passes = ram.dirty_sync_count, "migrating");
            progress(Progress {
                phase: info.status.clone(),
                transferred: ram.transferred,
                remaining: ram.remaining,
                passes: ram.dirty_sync_count,
                elapsed_ms: clock.started.elapsed().as_millis() as u64,
            });
        }
        tokio::time::sleep(POLL).await;
    };
    // The NBD nodes go with the source QEMU, which is discarded once the target runs.
    let ram = info.ram.unwrap_or_default();
    Ok(Stats {
        total_ms: info
            .total_time
            .unwrap_or_else(|| started.elapsed().as_millis() as u64),
        downtime_ms: info.downtime.unwrap_or(0),
        ram_bytes: ram.transferred,
        disk_bytes,
        passes: ram.dirty_sync_count,
        postcopy_after_ms: *switched,
        postcopy_bytes: ram.postcopy_bytes,
    })
}

/// Switches the migration (QEMU `active`, `info`) to postcopy once `esc` recorded it;
/// sets `switched` unless QEMU refused and stays in precopy. Stays in precopy, with a
/// warning, when the record cannot be written.
async fn switch_to_postcopy(
    qmp: &Qmp,
    info: &MigrateInfo,
    esc: &Escalation<'_>,
    started: Instant,
    switched: &mut Option<u64>,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<(), MigrateError> {
    if !(esc.record)() {
        warn!("cannot record the switch to postcopy on the source; staying in precopy");
        return Ok(());
    }
    let at = started.elapsed().as_millis() as u64;
    // Whatever QEMU answers, it may have switched: nothing resumes this source from here.
    *switched = Some(at);
    if let Err(e) = qmp.execute("migrate-start-postcopy", None).await {
        // Refused: still precopy (QEMU says so), cancelled as any other.
        let now: Result<MigrateInfo, _> = qmp.query("query-migrate", None).await;
        if now.is_ok_and(|i| source_may_resume(&i.status)) {
            *switched = None;
        }
        return Err(e.into());
    }
    let ram = info.ram.clone().unwrap_or_default();
    info!(
        after_ms = at,
        transferred = ram.transferred,
        remaining = ram.remaining,
        "not converged: switched to postcopy; the target runs the guest now"
    );
    progress(Progress {
        phase: "postcopy-active".to_owned(),
        transferred: ram.transferred,
        remaining: ram.remaining,
        passes: ram.dirty_sync_count,
        elapsed_ms: at,
    });
    Ok(())
}

/// The figures of the migration that completed on this source, once QEMU has them (a
/// moment after `completed`: measured), waiting at most a second.
pub async fn final_stats(qmp: &Qmp) -> Result<Stats, MigrateError> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let info: MigrateInfo = qmp.query("query-migrate", None).await?;
        if info.status != "completed" {
            return Err(MigrateError::NotCompleted(info.status));
        }
        let settled = info.total_time.is_some_and(|t| t > 0) && info.downtime.is_some();
        if settled || Instant::now() >= deadline {
            let ram = info.ram.unwrap_or_default();
            return Ok(Stats {
                total_ms: info.total_time.unwrap_or(0),
                downtime_ms: info.downtime.unwrap_or(0),
                ram_bytes: ram.transferred,
                disk_bytes: 0,
                passes: ram.dirty_sync_count,
                postcopy_after_ms: None,
                postcopy_bytes: ram.postcopy_bytes,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Starts a full mirror of every disk of `nbd` into the target's export and waits until
/// all are in sync.
async fn start_mirrors(
    qmp: &Qmp,
    nbd: &NbdTarget,
    clock: &mut Clock,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<(), MigrateError> {
    let mirror = &nbd.disks[..];
    for disk in &nbd.disks {
        qmp.execute(
            "blockdev-add",
            Some(json!({"driver": "nbd", "node-name": mirror_node(disk),
                "server": {"type": "inet", "host": nbd.host, "port": nbd.port.to_string()},
                "export": disk})),
        )
        .await?;
        qmp.execute(
            "blockdev-mirror",
            Some(json!({"job-id": mirror_node(disk), "device": node(disk),
                "target": mirror_node(disk), "sync": "full"})),
        )
        .await?;
    }
    failpoint!("agent.migrate-out.mirroring");
    // Every mirror in sync before the memory moves.
    let mut last_log = Instant::now();
    loop {
        let jobs = mirror_jobs(qmp, mirror).await?;
        if jobs.len() < mirror.len() {
            return Err(MigrateError::Failed("a disk mirror ended early".to_owned()));
        }
        if jobs.iter().all(|j| j.ready) {
            break;
        }
        let done: u64 = jobs.iter().map(|j| j.offset).sum();
        clock.check(done)?;
        if last_log.elapsed() >= Duration::from_secs(1) {
            last_log = Instant::now();
            progress(Progress {
                phase: "mirroring disks".to_owned(),
                transferred: done,
                remaining: jobs.iter().map(|j| j.len.saturating_sub(j.offset)).sum(),
                passes: 0,
                elapsed_ms: clock.started.elapsed().as_millis() as u64,
            });
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// Cancels an outgoing migration and its mirrors; resumes the guest if the migration
/// paused it and did not complete. Best effort: every step is tried. A migration that
/// switched to postcopy is left alone: nothing is cancelled, the guest is not resumed.
pub async fn cancel(qmp: &Qmp, mirror: &[String]) {
    match qmp.query::<MigrateInfo>("query-migrate", None).await {
        Ok(info) if !source_may_resume(&info.status) => {
            warn!(status = %info.status, "the migration switched to postcopy: not cancelled, the source is never resumed");
            return;
        }
        _ => {}
    }
    if let Err(e) = qmp.execute("migrate_cancel", None).await {
        debug!(error = %e, "migrate_cancel");
    }
    drop_mirrors(qmp, mirror).await;
    wait_not_under_way(qmp).await;
    match qmp.query_status().await {
        Ok(s) if !s.running && s.status != "postmigrate" => {
            if let Err(e) = qmp.execute("cont", None).await {
                warn!(error = %e, status = %s.status, "cannot resume the source after a cancelled migration");
            }
        }
        _ => {}
    }
}

/// Whether a migration in QEMU state `status` still holds its source (a new one would
/// be refused).
fn under_way(status: &str) -> bool {
    matches!(
        status,
        "setup" | "active" | "pre-switchover" | "device" | "cancelling" | "wait-unplug"
    )
}

/// Waits, at most 10 s, until no migration is under way from this QEMU.
async fn wait_not_under_way(qmp: &Qmp) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let busy = qmp
            .query::<MigrateInfo>("query-migrate", None)
            .await
            .is_ok_and(|i| under_way(&i.status));
        if !busy {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Ends what an earlier migration from this QEMU left when its engine or agent died:
/// one still under way (its target was removed since) is cancelled, its disk mirrors
/// and their NBD nodes are removed. Otherwise QEMU refuses the new migration ("There's
/// a migration process in progress", "Duplicate nodes").
async fn end_earlier(qmp: &Qmp, mirror: &[String]) {
    let earlier = qmp.query::<MigrateInfo>("query-migrate", None).await;
    if let Some(info) = earlier.ok().filter(|i| under_way(&i.status)) {
        warn!(status = %info.status, "an earlier migration is still under way; cancelling it first");
        if let Err(e) = qmp.execute("migrate_cancel", None).await {
            debug!(error = %e, "migrate_cancel");
        }
        wait_not_under_way(qmp).await;
    }
    drop_mirrors(qmp, mirror).await;
}

/// Ends the mirror jobs of `mirror`'s disks and removes their NBD nodes, if any are
/// there: best effort, waiting at most 10 s for the jobs to go.
async fn drop_mirrors(qmp: &Qmp, mirror: &[String]) {
    for disk in mirror {
        let _ = qmp
            .execute(
                "block-job-cancel",
                Some(json!({ "device": mirror_node(disk), "force": true })),
            )
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && mirror_jobs(qmp, mirror).await.is_ok_and(|j| !j.is_empty()) {
        tokio::time::sleep(POLL).await;
    }
    for disk in mirror {
        let _ = qmp
            .execute(
                "blockdev-del",
                Some(json!({ "node-name": mirror_node(disk) })),
            )
            .await;
    }
}

async fn set_capabilities(qmp: &Qmp, caps: &[(&str, bool)]) -> Result<(), QmpError> {
    let list: Vec<Value> = caps
        .iter()
        .map(|(c, on)| json!({"capability": c, "state": on}))
        .collect();
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": list })),
    )
    .await
    .map(drop)
}

/// Completes the ready mirrors without pivoting; returns the bytes they copied.
async fn finish_mirrors(qmp: &Qmp, mirror: &[String]) -> Result<u64, MigrateError> {
    let jobs = mirror_jobs(qmp, mirror).await?;
    let bytes = jobs.iter().map(|j| j.offset).sum();
    for disk in mirror {
        qmp.execute(
            "block-job-cancel",
            Some(json!({ "device": mirror_node(disk) })),
        )
        .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !mirror_jobs(qmp, mirror).await?.is_empty() {
        if Instant::now() >= deadline {
            return Err(MigrateError::Failed(
                "disk mirrors did not finish within 60s".to_owned(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(bytes)
}

async fn mirror_jobs(qmp: &Qmp, mirror: &[String]) -> Result<Vec<BlockJob>, QmpError> {
    if mirror.is_empty() {
        return Ok(Vec::new());
    }
    let jobs: Vec<BlockJob> = qmp.query("query-block-jobs", None).await?;
    Ok(jobs
        .into_iter()
        .filter(|j| mirror.iter().any(|d| mirror_node(d) == j.device))
        .collect())
}

/// Progress and completion deadlines.
struct Clock {
    started: Instant,
    timeout: Duration,
    stall: Duration,
    last_bytes: u64,
    last_move: Instant,
}

impl Clock {
    fn new(t: &Tuning, started: Instant) -> Self {
        Self {
            started,
            timeout: Duration::from_millis(t.timeout_ms),
            stall: Duration::from_millis(t.progress_timeout_ms),
            last_bytes: 0,
            last_move: Instant::now(),
        }
    }

    fn check(&mut self, bytes: u64) -> Result<(), MigrateError> {
        if bytes != self.last_bytes {
            self.last_bytes = bytes;
            self.last_move = Instant::now();
        }
        if self.started.elapsed() >= self.timeout {
            return Err(MigrateError::TimedOut(self.timeout));
        }
        if self.last_move.elapsed() >= self.stall {
            return Err(MigrateError::Stalled(self.stall));
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct MigrateInfo {
    #[serde(default)]
    status: String,
    #[serde(default)]
    ram: Option<RamInfo>,
    #[serde(default)]
    total_time: Option<u64>,
    #[serde(default)]
    downtime: Option<u64>,
    #[serde(default)]
    error_desc: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RamInfo {
    #[serde(default)]
    transferred: u64,
    #[serde(default)]
    remaining: u64,
    #[serde(default)]
    dirty_sync_count: u64,
    #[serde(default)]
    postcopy_bytes: u64,
}

#[derive(Debug, Deserialize)]
struct BlockJob {
    device: String,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    len: u64,
    #[serde(default)]
    ready: bool,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::qemu::qmp::tests::fake::{connected, FakeQemu, TestResult};

    fn clock(timeout_s: u64, stall_s: u64, quiet_for_s: u64, running_for_s: u64) -> Clock {
        let now = Instant::now();
        Clock {
            started: now
                .checked_sub(Duration::from_secs(running_for_s))
                .expect("uptime"),
            timeout: Duration::from_secs(timeout_s),
            stall: Duration::from_secs(stall_s),
            last_bytes: 7,
            last_move: now
                .checked_sub(Duration::from_secs(quiet_for_s))
                .expect("uptime"),
        }
    }

    #[test]
    fn a_migration_is_cancelled_when_it_stalls_or_runs_too_long() {
        // Bytes moved: progress resets the stall clock.
        assert!(clock(100, 10, 20, 30).check(8).is_ok());
        // No byte for longer than the progress timeout.
        assert!(matches!(
            clock(100, 10, 20, 30).check(7),
            Err(MigrateError::Stalled(_))
        ));
        // Moving, but past the completion bound.
        assert!(matches!(
            clock(100, 10, 0, 120).check(9),
            Err(MigrateError::TimedOut(_))
        ));
    }

    #[test]
    fn progress_reads_for_people() {
        let p = Progress {
            phase: "active".into(),
            transferred: 512 << 20,
            remaining: 128 << 20,
            passes: 2,
            elapsed_ms: 3100,
        };
        assert_eq!(
            p.describe(),
            "active: 512 MiB sent, 128 MiB to go, pass 2, 3.1 s"
        );
    }

    #[tokio::test]
    async fn a_migration_left_under_way_is_cancelled_and_its_mirrors_dropped_first() -> TestResult {
        let (qmp, mut fake) = connected().await?;
        let script = async {
            // A dead agent's migration still runs towards a target removed since.
            let (id, _) = fake.expect("query-migrate").await?;
            fake.reply(&id, json!({"status": "active"})).await?;
            let (id, _) = fake.expect("migrate_cancel").await?;
            fake.reply(&id, json!({})).await?;
            let (id, _) = fake.expect("query-migrate").await?;
            fake.reply(&id, json!({"status": "cancelled"})).await?;
            // Its mirror job and NBD node would make the next `blockdev-add` fail.
            let (id, args) = fake.expect("block-job-cancel").await?;
            assert_eq!(args, Some(json!({"device": "mig-data", "force": true})));
            fake.reply(&id, json!({})).await?;
            let (id, _) = fake.expect("query-block-jobs").await?;
            fake.reply(&id, json!([])).await?;
            let (id, args) = fake.expect("blockdev-del").await?;
            assert_eq!(args, Some(json!({"node-name": "mig-data"})));
            fake.reply(&id, json!({})).await
        };
        let disks = ["data".to_owned()];
        let ((), script) = tokio::join!(end_earlier(&qmp, &disks), script);
        script
    }

    /// Answers every command of an outgoing migration until it switched to postcopy and
    /// the stream broke; returns the commands sent after that (there must be none).
    async fn postcopy_that_breaks(fake: &mut FakeQemu) -> TestResult<Vec<String>> {
        let (id, _) = fake.expect("query-migrate").await?;
        fake.reply(&id, json!({"status": "none"})).await?;
        let (id, caps) = fake.expect("migrate-set-capabilities").await?;
        let on = |c: &str| {
            caps.as_ref()
                .and_then(|a| a["capabilities"].as_array().cloned())
                .into_iter()
                .flatten()
                .any(|x| x["capability"] == c && x["state"] == true)
        };
        assert!(on("postcopy-ram"), "{caps:?}");
        fake.reply(&id, json!({})).await?;
        let (id, _) = fake.expect("migrate-set-parameters").await?;
        fake.reply(&id, json!({})).await?;
        let (id, _) = fake.expect("migrate").await?;
        fake.reply(&id, json!({})).await?;
        let (id, _) = fake.expect("query-migrate").await?;
        fake.reply(&id, json!({"status": "active", "ram": {"transferred": 1}}))
            .await?;
        let (id, _) = fake.expect("migrate-start-postcopy").await?;
        fake.reply(&id, json!({})).await?;
        let (id, _) = fake.expect("query-migrate").await?;
        fake.reply(&id, json!({"status": "postcopy-paused"}))
            .await?;
        fake.rest().await
    }

    #[tokio::test]
    async fn after_the_switch_to_postcopy_the_source_is_never_cancelled_nor_resumed() -> TestResult
    {
        let (qmp, mut fake) = connected().await?;
        let recorded = std::sync::atomic::AtomicBool::new(false);
        let record = || {
            recorded.store(true, std::sync::atomic::Ordering::SeqCst);
            true
        };
        let escalation = Escalation {
            after: Duration::ZERO,
            record: &record,
        };
        let tuning = Tuning {
            max_bandwidth_mib: 1,
            downtime_limit_ms: 300,
            auto_converge: false,
            progress_timeout_ms: 60_000,
            timeout_ms: 60_000,
            postcopy_after_ms: Some(0),
        };
        let phases = std::sync::Mutex::new(Vec::new());
        let progress = |p: Progress| phases.lock().expect("lock").push(p.phase);
        let migrate = async {
            let r = outgoing(&qmp, "tcp:x:1", None, &tuning, Some(&escalation), &progress).await;
            drop(qmp);
            r
        };
        let (result, after) = tokio::join!(migrate, postcopy_that_breaks(&mut fake));
        let err = result.expect_err("the stream broke");
        assert!(matches!(err, MigrateError::Postcopy { .. }), "{err}");
        assert!(recorded.load(std::sync::atomic::Ordering::SeqCst));
        // No migrate_cancel, no cont: nothing at all after the failure.
        assert_eq!(after?, Vec::<String>::new());
        assert_eq!(*phases.lock().expect("lock"), ["postcopy-active"]);
        Ok(())
    }

    #[tokio::test]
    async fn a_cancel_leaves_a_postcopy_source_paused() -> TestResult {
        let (qmp, mut fake) = connected().await?;
        let script = async {
            let (id, _) = fake.expect("query-migrate").await?;
            fake.reply(&id, json!({"status": "postcopy-active"}))
                .await?;
            fake.rest().await
        };
        let cancelled = async {
            cancel(&qmp, &[]).await;
            drop(qmp);
        };
        let ((), after) = tokio::join!(cancelled, script);
        assert_eq!(after?, Vec::<String>::new());
        assert!(!source_may_resume("postcopy-paused"));
        assert!(source_may_resume("active") && source_may_resume("cancelled"));
        Ok(())
    }

    #[tokio::test]
    async fn nothing_left_nothing_cancelled() -> TestResult {
        let (qmp, mut fake) = connected().await?;
        let script = async {
            let (id, _) = fake.expect("query-migrate").await?;
            fake.reply(&id, json!({"status": "completed"})).await
        };
        let ((), script) = tokio::join!(end_earlier(&qmp, &[]), script);
        script
    }
}
