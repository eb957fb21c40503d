//! `plasmavmc status` for humans: one table of VMs, one line per host.

use std::fmt::Write;

use super::Snapshot;

/// Renders the snapshot as text.
pub fn print_table(snap: &Snapshot) -> String {
    let mut out = String::new();
    let e = &snap.engine;
    let short = |r: &Option<String>| {
        r.as_deref()
            .map_or("-".to_owned(), |r| r.get(..12).unwrap_or(r).to_owned())
    };
    let _ = writeln!(
        out,
        "applied {}  attempted {}  updated {}",
        short(&e.last_applied_revision),
        short(&e.last_attempted_revision),
        e.updated_at
    );
    if let Some(err) = &e.last_error {
        let _ = writeln!(out, "last error:\n{err}");
    }
    let rows: Vec<[String; 8]> = snap
        .vms
        .iter()
        .map(|v| {
            [
                v.name.clone(),
                v.phase.as_str().to_owned(),
                ready(v).to_owned(),
                v.host.clone().unwrap_or_else(|| "-".to_owned()),
                v.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                v.since.clone().unwrap_or_else(|| "-".to_owned()),
                v.restarts.to_string(),
                v.message.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let header = [
        "VM", "PHASE", "READY", "HOST", "PID", "SINCE", "RESTARTS", "MESSAGE",
    ]
    .map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    out.push('\n');
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    if rows.is_empty() {
        let _ = writeln!(out, "(no VMs)");
    }
    for v in snap
        .vms
        .iter()
        .filter(|v| v.nics.iter().any(|n| n.tap.is_some()))
    {
        let nics: Vec<String> = v
            .nics
            .iter()
            .map(|n| match &n.tap {
                Some(tap) => format!("{} {} tap {tap}", n.network, n.mac),
                None => format!("{} {}", n.network, n.mac),
            })
            .collect();
        let _ = writeln!(out, "  {} NICs: {}", v.name, nics.join("; "));
    }
    for h in &snap.hosts {
        host_lines(&mut out, h);
    }
    out
}

/// The READY cell: what the VM's readiness probe says while its QEMU runs (`yes`,
/// `no`), `-` without a probe or a running QEMU.
fn ready(v: &super::VmStatus) -> &'static str {
    match v.health.ready {
        Some(true) if v.phase.runs_qemu() => "yes",
        Some(false) if v.phase.runs_qemu() => "no",
        _ => "-",
    }
}

/// The lines of one host: its summary, then what it has and what it lacks.
fn host_lines(out: &mut String, h: &super::HostStatus) {
    let _ = writeln!(
        out,
        "\nhost {}: {}, {} VMs, {}/{} vCPUs and {}/{} MiB allocated",
        h.name,
        h.phase,
        h.vms.len(),
        h.allocated.vcpus,
        h.capacity.vcpus,
        h.allocated.memory_mb,
        h.capacity.memory_mb
    );
    if let Some(message) = &h.message {
        let _ = writeln!(out, "  {message}");
    }
    if let Some(cpu) = &h.cpu {
        let _ = writeln!(
            out,
            "  CPU {} ({} QEMU models usable)",
            cpu.model,
            cpu.models.len()
        );
    }
    if !h.bridges.is_empty() {
        let _ = writeln!(out, "  bridges: {}", h.bridges.join(", "));
    }
    for missing in &h.missing_networks {
        let _ = writeln!(out, "  missing network {missing}");
    }
    for o in &h.orphans {
        let _ = writeln!(
            out,
            "  orphan QEMU pid {} in vms/{} (no instance record; --prune stops it)",
            o.pid, o.folder
        );
    }
    for r in &h.retained {
        let _ = writeln!(
            out,
            "  retained disks of {} in {} ({})",
            r.vm,
            r.path.display(),
            r.reason
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Snapshot, VmPhase, VmStatus};
    use super::print_table;

    #[test]
    fn only_running_and_unhealthy_vms_run_a_qemu() {
        use VmPhase::*;
        for phase in [
            Pending, Starting, Stopping, Stopped, Migrating, Crashed, Failed, Unknown,
        ] {
            assert!(!phase.runs_qemu(), "{}", phase.as_str());
        }
        assert!(Running.runs_qemu() && Unhealthy.runs_qemu());
    }

    /// The line of `vm` in the table, split into its cells.
    fn cells(snap: &Snapshot, vm: &str) -> Vec<String> {
        print_table(snap)
            .lines()
            .find(|l| l.starts_with(vm))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_table_shows_readiness_while_the_qemu_runs() {
        let vm = |name: &str, phase: VmPhase, ready: Option<bool>| {
            let mut v = VmStatus::blank(name, phase);
            v.health.ready = ready;
            v
        };
        let snap = Snapshot {
            vms: vec![
                vm("up", VmPhase::Running, Some(true)),
                vm("down", VmPhase::Running, Some(false)),
                vm("sick", VmPhase::Unhealthy, Some(true)),
                vm("noprobe", VmPhase::Running, None),
                vm("off", VmPhase::Stopped, Some(false)),
            ],
            ..Snapshot::default()
        };
        let table = print_table(&snap);
        assert!(table.contains("VM       PHASE      READY  HOST"), "{table}");
        for (name, phase, ready) in [
            ("up", "running", "yes"),
            ("down", "running", "no"),
            ("sick", "unhealthy", "yes"),
            ("noprobe", "running", "-"),
            ("off", "stopped", "-"),
        ] {
            assert_eq!(cells(&snap, name)[..3], [name, phase, ready], "{table}");
        }
    }
}
