//! What the fleet-scale benchmarks share (`tests/benches/{idle,longaction,reboot40,
//! apply100,poweroff20}.rs`): a repository of many small VMs pinned round-robin to
//! simulated hosts, waiting for all of them at once, the daemon's "started" lines per
//! VM, raw QEMU started from the command lines the engine used, and CPU and memory of a
//! process read from `/proc/<pid>/stat` and `/proc/<pid>/status`.
//!
//! The VMs are the tiny test guest with [`FAILOVER_VM_MB`] (96 MiB): with 64 MiB the
//! guest prints nothing at all under TCG (its kernel and initramfs do not fit), 80 MiB
//! boots, 96 MiB is the harness's usual least.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};

use crate::daemon::{Daemon, LogLine};
use crate::fault::FAILOVER_VM_MB;
use crate::proc::{self, is_alive};
use crate::qmp::RawQmp;
use crate::repo::TestRepo;
use crate::serial::ticks;
use crate::spec::{HostSpec, VmSpec};
use crate::wait::poll_every;

/// Settings that restart a crashed VM at once, however often (as the heal bench).
pub const EAGER_RESTART: &str =
    "[restart]\nbackoff = \"1ms\"\nbackoff_max = \"1ms\"\nmax_failures = 1000\nwindow = \"10m\"\n";

/// `vm-NN` names and the host each is pinned to: `count` VMs over hosts
/// `hv1..=hv<hosts>`, round-robin.
pub fn round_robin(count: usize, hosts: usize) -> Vec<(String, String)> {
    (0..count)
        .map(|i| (format!("vm-{i:02}"), format!("hv{}", 1 + i % hosts)))
        .collect()
}

/// The spec of a fleet VM: the tiny guest, [`FAILOVER_VM_MB`], no disk, `restart =
/// "always"`, pinned to `host`.
pub fn small_vm(host: &str) -> VmSpec {
    VmSpec::new()
        .no_disks()
        .memory(FAILOVER_VM_MB)
        .restart("always")
        .pin(host)
}

/// vCPUs a fleet host declares: this machine's two cores allow 8 one-vCPU VMs per host
/// at the default overcommit, fewer than the benchmarks put there (idle TCG guests
/// need little).
pub const FLEET_HOST_VCPUS: u32 = 64;

/// A simulated host for fleet benchmarks: the agent of the binary under test, declaring
/// [`FLEET_HOST_VCPUS`].
pub fn fleet_host() -> HostSpec {
    HostSpec::agent().vcpus(FLEET_HOST_VCPUS)
}

/// A repository, committed, with simulated hosts `hv1..=hv<hosts>` ([`fleet_host`]),
/// `plasmavmc.toml` holding `settings`, and a [`small_vm`] for every `(vm, host)` of
/// `vms`.
pub fn fleet_repo(hosts: usize, vms: &[(String, String)], settings: &str) -> Result<TestRepo> {
    let repo = TestRepo::new()?;
    repo.set_cluster_settings(settings)?;
    for i in 1..=hosts {
        repo.write_host(&format!("hv{i}"), &fleet_host())?;
    }
    for (vm, host) in vms {
        repo.write_vm(vm, &small_vm(host))?;
    }
    repo.commit(&format!("{} VMs on {hosts} hosts", vms.len()))?;
    Ok(repo)
}

/// [`small_vm`] without a pin: the engine places it.
pub fn unpinned_vm() -> VmSpec {
    VmSpec::new()
        .no_disks()
        .memory(FAILOVER_VM_MB)
        .restart("always")
}

/// `[concurrency] per_host = N` from the environment variable `name` (empty when it is
/// unset: the default bound), to append to a repository's settings.
pub fn per_host_setting(name: &str) -> Result<String> {
    match std::env::var(name) {
        Ok(v) => {
            let n: u32 = v
                .parse()
                .with_context(|| format!("{name}={v:?} is not a count"))?;
            Ok(format!("[concurrency]\nper_host = {n}\n"))
        }
        Err(_) => Ok(String::new()),
    }
}

/// The command line and working directory of each QEMU of `pids`: what raw QEMU is
/// started from in [`raw_starts`].
pub fn qemu_lines(pids: impl IntoIterator<Item = i32>) -> Result<Vec<(Vec<String>, PathBuf)>> {
    pids.into_iter()
        .map(|pid| {
            Ok((
                crate::cmdline(pid)?,
                proc::cwd(pid).with_context(|| format!("cwd of QEMU {pid}"))?,
            ))
        })
        .collect()
}

/// Starts every `(argv, cwd)` at once (the engine's QEMUs must be gone), each in its
/// own session as the engine does; returns, sorted, the ms from the first spawn to each
/// one answering QMP with its vCPUs running (each waited for up to `qmp_up`). The
/// children are killed before returning.
pub fn raw_starts(lines: &[(Vec<String>, PathBuf)], qmp_up: Duration) -> Result<Vec<f64>> {
    let t0 = Instant::now();
    let mut children: Vec<Child> = Vec::new();
    let result = (|| -> Result<Vec<f64>> {
        for (argv, cwd) in lines {
            let _ = fs::remove_file(cwd.join("qmp.sock"));
            let child = Command::new(&argv[0])
                .args(&argv[1..])
                .current_dir(cwd)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .with_context(|| format!("starting {}", argv.join(" ")))?;
            children.push(child);
        }
        let mut up = Vec::new();
        for (_, cwd) in lines {
            let mut qmp = RawQmp::connect(&cwd.join("qmp.sock"), qmp_up)?;
            let deadline = Instant::now() + qmp_up;
            loop {
                let status = qmp.execute("query-status", None)?;
                if status["running"].as_bool() == Some(true) {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "raw QEMU in {} not running: {status}",
                    cwd.display()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            up.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        up.sort_by(f64::total_cmp);
        Ok(up)
    })();
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

/// Waits until every `(vm, host)` of `vms` runs there: its status `running` on that
/// host with the pid of a live QEMU (it answered QMP). Returns the pids by VM.
pub fn wait_all_running(
    daemon: &Daemon<'_>,
    vms: &[(String, String)],
    timeout: Duration,
) -> Result<BTreeMap<String, i32>> {
    let repo = daemon.repo();
    let mut pids = BTreeMap::new();
    daemon.poll(format!("all {} VMs running", vms.len()), timeout, || {
        for (vm, host) in vms {
            if pids.contains_key(vm) {
                continue;
            }
            let view = repo.vm_view(vm).ok().flatten()?;
            // A live pid: a status left from QEMUs killed earlier still says running.
            let pid = view
                .pid
                .filter(|&p| view.phase == "running" && &view.host == host && is_alive(p))?;
            pids.insert(vm.clone(), pid);
        }
        Some(())
    })?;
    Ok(pids)
}

/// How many of `vms` show a `tick` on their console on their host.
pub fn ticking(repo: &TestRepo, vms: &[(String, String)]) -> usize {
    vms.iter()
        .filter(|(vm, host)| !ticks(&repo.serial_on(host, vm)).is_empty())
        .count()
}

/// Waits until every guest of `vms` ticks (a boot storm of TCG guests on shared cores
/// takes minutes), saying on stderr how many do every 10 s. Returns how many tick when
/// they all do or `timeout` has passed: the caller goes on either way and says so.
pub fn wait_ticking(repo: &TestRepo, vms: &[(String, String)], timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    let mut said = Instant::now();
    loop {
        let n = ticking(repo, vms);
        if n == vms.len() || Instant::now() >= deadline {
            return n;
        }
        if said.elapsed() >= Duration::from_secs(10) {
            said = Instant::now();
            eprintln!(
                "{n} of {} guests tick; load average {}",
                vms.len(),
                load_average()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The daemon's "started" lines from index `since` on, the first per VM.
pub fn started_since(daemon: &Daemon<'_>, since: usize) -> BTreeMap<String, LogLine> {
    let mut first = BTreeMap::new();
    for line in daemon.lines_since(since) {
        if line.is("started", None) {
            if let Some(vm) = line.str("vm") {
                first.entry(vm.to_owned()).or_insert_with(|| line.clone());
            }
        }
    }
    first
}

/// Waits until the daemon logged a "started" line (from index `since` on) for every VM
/// of `vms`; returns them by VM.
pub fn wait_started(
    daemon: &Daemon<'_>,
    since: usize,
    vms: &[(String, String)],
    timeout: Duration,
) -> Result<BTreeMap<String, LogLine>> {
    daemon.poll(
        format!("a \"started\" line for each of {} VMs", vms.len()),
        timeout,
        || {
            let seen = started_since(daemon, since);
            vms.iter()
                .all(|(vm, _)| seen.contains_key(vm))
                .then_some(seen)
        },
    )
}

/// With the environment variable `var` naming a folder: `log`, each line with its ms
/// after `t0`, to a new `<folder>/<name>-<n>.log` (where the time goes, read from the
/// daemon's own stamps). Nothing without it.
pub fn timeline(var: &str, name: &str, log: &[LogLine], t0: SystemTime) -> Result<()> {
    let Some(dir) = std::env::var_os(var) else {
        return Ok(());
    };
    let dir = PathBuf::from(dir);
    fs::create_dir_all(&dir)?;
    let path = (0..10_000)
        .map(|n| dir.join(format!("{name}-{n}.log")))
        .find(|p| !p.exists())
        .context("no free file name")?;
    let mut text = String::new();
    for line in log {
        let ms = line.ms_after(t0).unwrap_or(f64::NAN);
        let _ = writeln!(text, "{ms:>9.0} {}", line.raw);
    }
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`; 100 if that
/// cannot be asked).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU time `pid` has used (user + system, all its threads) in clock ticks.
pub fn cpu_ticks(pid: i32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields count from the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("/proc/{pid}/stat: {stat}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14, stime 15 (1-based over the whole line).
    let num = |i: usize| -> Result<u64> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("/proc/{pid}/stat field {i}: {stat}"))
    };
    Ok(num(14)? + num(15)?)
}

/// `VmRSS` and `VmHWM` (peak) of `pid`, in KiB.
pub fn rss_kib(pid: i32) -> Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The 1-, 5- and 15-minute load averages (`/proc/loadavg`).
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "?".to_owned(),
        |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

/// Polls `check` every 20 ms (the fleet benches look faster than the tests' 50 ms).
pub fn poll_fast<T>(
    what: impl std::fmt::Display,
    timeout: Duration,
    check: impl FnMut() -> Option<T>,
) -> Result<T> {
    poll_every(Duration::from_millis(20), what, timeout, check)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_spreads_vms_over_hosts() {
        let vms = round_robin(5, 3);
        let hosts: Vec<&str> = vms.iter().map(|(_, h)| h.as_str()).collect();
        assert_eq!(hosts, ["hv1", "hv2", "hv3", "hv1", "hv2"]);
        assert_eq!(vms[4].0, "vm-04");
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = i32::try_from(std::process::id()).expect("pid fits");
        let mut spin = 0u64;
        for i in 0..2_000_000u64 {
            spin = spin.wrapping_add(i * i);
        }
        assert!(spin > 0);
        assert!(cpu_ticks(me).is_ok());
        let (rss, peak) = rss_kib(me).expect("status");
        assert!(rss > 0 && peak >= rss, "{rss} {peak}");
        assert!(clock_ticks() > 0.0);
    }
}
