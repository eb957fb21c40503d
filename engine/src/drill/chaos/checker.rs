//! The invariant checker of the soak: a thread that looks at the sandbox every 10 ms,
//! from outside the engine (`/proc`, the consoles, the fence command's marker), while
//! the nemesis breaks things.
//!
//! In: the sandbox's folder, the hosts the nemesis made unreachable ([`Episode`]s, from
//! its own knowledge). Out: every [`Violation`], with when, during which step of the
//! schedule, and what was seen. It never reads the engine's status or log: a checker
//! that believed the engine would only check the engine against itself.
//!
//! 1. **Never two QEMUs of one VM.** Two are allowed only while a live migration runs:
//!    one of them is its target (`-incoming`); and even then only one guest may run —
//!    while two exist, their consoles must grow in turns (source, then target), never
//!    back to a copy that had already printed. Three are never allowed.
//! 2. **Never started elsewhere while its host is unreachable and not fenced.** From
//!    the moment the nemesis freezes or powers off a host until it is fenced (its
//!    fence command ran, or the operator's `fence confirm` was given) or back, a new
//!    QEMU (not a migration target) of a VM that had one there is a violation.
//! 3. **No disk data lost.** Each boot of a VM with a disk prints the boot counter it
//!    keeps on that disk: a boot must find more than any earlier boot printed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::drill::console::boot_count;
use crate::drill::sandbox::{fence_ran, qemus, serial_path, Qemu, HOSTS};

/// How often the checker looks.
pub const PERIOD: Duration = Duration::from_millis(10);

/// The consoles (for invariant 3) are read every this many samples.
const DISK_EVERY: u64 = 10;

/// A host the nemesis made unreachable, and what ran there at that moment.
#[derive(Debug, Clone)]
pub struct Episode {
    pub host: &'static str,
    /// The step that made it unreachable.
    pub step: usize,
    /// VMs with a QEMU on the host then.
    pub vms: BTreeSet<String>,
    /// Every QEMU of those VMs then, anywhere (a migration's other end is not new).
    pub known: BTreeSet<i32>,
    /// The operator's `fence confirm` was given (set before the command runs).
    pub confirmed: bool,
}

/// An invariant that broke.
#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    /// Seconds since the soak began.
    pub at_s: f64,
    /// The step of the schedule under way (1-based; 0 = before the first).
    pub step: usize,
    /// That step, described (filled in by the soak, which knows the schedule).
    pub during: String,
    pub invariant: &'static str,
    pub vm: String,
    pub seen: String,
}

/// What the nemesis and the checker share.
#[derive(Debug)]
pub struct Shared {
    pub started: Instant,
    pub step: AtomicUsize,
    pub stop: AtomicBool,
    pub samples: AtomicU64,
    pub episodes: Mutex<BTreeMap<&'static str, Episode>>,
    pub violations: Mutex<Vec<Violation>>,
}

impl Shared {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            step: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            samples: AtomicU64::new(0),
            episodes: Mutex::default(),
            violations: Mutex::default(),
        }
    }

    pub fn violated(&self) -> bool {
        !self.violations.lock().expect("violations").is_empty()
    }

    fn report(&self, invariant: &'static str, vm: &str, seen: String) {
        let mut all = self.violations.lock().expect("violations");
        if all.iter().any(|v| v.invariant == invariant && v.vm == vm) {
            return;
        }
        all.push(Violation {
            at_s: self.started.elapsed().as_secs_f64(),
            step: self.step.load(Ordering::Relaxed),
            during: String::new(),
            invariant,
            vm: vm.to_owned(),
            seen,
        });
    }
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

/// The checker's memory between samples.
#[derive(Debug)]
pub struct Checker<'s> {
    root: PathBuf,
    shared: &'s Shared,
    disk_vms: Vec<&'static str>,
    /// Whether each QEMU seen is a migration target.
    incoming: HashMap<i32, bool>,
    /// While a VM has two QEMUs: each one's console size at the last sample, and the
    /// QEMUs whose consoles grew, in turns.
    console: HashMap<i32, u64>,
    turns: BTreeMap<String, Vec<i32>>,
    /// Per (vm, host): the console (inode) last read and the boot count it showed.
    boots_read: HashMap<(&'static str, &'static str), (u64, Option<u64>)>,
    /// Per VM: the highest boot count any boot printed, and where.
    boots_max: HashMap<&'static str, (u64, &'static str)>,
}

impl<'s> Checker<'s> {
    pub fn new(root: PathBuf, shared: &'s Shared, disk_vms: Vec<&'static str>) -> Self {
        Self {
            root,
            shared,
            disk_vms,
            incoming: HashMap::new(),
            console: HashMap::new(),
            turns: BTreeMap::new(),
            boots_read: HashMap::new(),
            boots_max: HashMap::new(),
        }
    }

    /// Samples every [`PERIOD`] until the nemesis says stop; returns the highest boot
    /// count each disk VM's guest printed.
    pub fn run(mut self) -> BTreeMap<&'static str, u64> {
        let mut next = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            self.sample();
            next += PERIOD;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now;
            }
        }
        self.boots_max
            .iter()
            .map(|(vm, (n, _))| (*vm, *n))
            .collect()
    }

    /// One look at everything.
    pub fn sample(&mut self) {
        self.observe(&qemus(&self.root));
    }

    /// Judges one look at the sandbox's QEMUs.
    fn observe(&mut self, all: &[Qemu]) {
        self.incoming
            .retain(|pid, _| all.iter().any(|q| q.pid == *pid));
        for q in all {
            self.incoming.entry(q.pid).or_insert_with(|| q.incoming());
        }
        let mut by_vm: BTreeMap<&str, Vec<&Qemu>> = BTreeMap::new();
        for q in all {
            by_vm.entry(q.vm.as_str()).or_default().push(q);
        }
        self.turns
            .retain(|vm, _| by_vm.get(vm.as_str()).is_some_and(|q| q.len() >= 2));
        for (vm, copies) in &by_vm {
            if copies.len() >= 2 {
                self.copies(vm, copies);
            }
        }
        // Console sizes only while a VM has two copies: a stale size would look like growth.
        let doubled: BTreeSet<i32> = by_vm
            .values()
            .filter(|c| c.len() >= 2)
            .flat_map(|c| c.iter().map(|q| q.pid))
            .collect();
        self.console.retain(|pid, _| doubled.contains(pid));
        self.unreachable(all);
        let n = self.shared.samples.fetch_add(1, Ordering::Relaxed);
        if n % DISK_EVERY == 0 {
            self.disks();
        }
    }

    fn is_incoming(&self, pid: i32) -> bool {
        self.incoming.get(&pid).copied().unwrap_or(false)
    }

    /// Invariant 1 for a VM with two or more QEMUs.
    fn copies(&mut self, vm: &str, copies: &[&Qemu]) {
        let list = copies
            .iter()
            .map(|q| {
                let tag = if self.is_incoming(q.pid) {
                    " (-incoming)"
                } else {
                    ""
                };
                format!("{} pid {}{tag}", q.host, q.pid)
            })
            .collect::<Vec<_>>()
            .join(", ");
        let booted = copies.iter().filter(|q| !self.is_incoming(q.pid)).count();
        if copies.len() > 2 || booted >= 2 {
            self.shared.report(
                "never two QEMUs of one VM",
                vm,
                format!(
                    "{} QEMUs of {vm}, not a migration's source and target: {list}",
                    copies.len()
                ),
            );
        }
        let mut grew = Vec::new();
        for q in copies {
            let size = fs::metadata(serial_path(&self.root, q.host, vm)).map_or(0, |m| m.len());
            if self
                .console
                .insert(q.pid, size)
                .is_some_and(|before| size > before)
            {
                grew.push(q.pid);
            }
        }
        let turns = self.turns.entry(vm.to_owned()).or_default();
        let mut ran_twice = (grew.len() >= 2).then(|| format!("consoles of {grew:?} grew at once"));
        for pid in grew {
            if turns.last() == Some(&pid) {
                continue;
            }
            if turns.contains(&pid) {
                ran_twice = Some(format!(
                    "QEMU {pid}'s guest printed again after another copy's had (turns {turns:?})"
                ));
            }
            turns.push(pid);
        }
        if let Some(why) = ran_twice {
            self.shared.report(
                "never two guests of one VM running",
                vm,
                format!("{why}; QEMUs: {list}"),
            );
        }
    }

    /// Invariant 2: nothing of an unreachable, unfenced host's VMs started elsewhere.
    fn unreachable(&self, all: &[Qemu]) {
        let episodes = self.shared.episodes.lock().expect("episodes").clone();
        for ep in episodes.values() {
            // Read after the look at /proc: a fencing that preceded a start is seen.
            if ep.confirmed || fence_ran(&self.root, ep.host) {
                continue;
            }
            for q in all {
                if q.host != ep.host
                    && ep.vms.contains(&q.vm)
                    && !ep.known.contains(&q.pid)
                    && !self.is_incoming(q.pid)
                {
                    self.shared.report(
                        "never started elsewhere while its host is unreachable and not fenced",
                        &q.vm,
                        format!(
                            "{} started on {} (pid {}) while {} is unreachable (since step {}) and not fenced",
                            q.vm, q.host, q.pid, ep.host, ep.step
                        ),
                    );
                }
            }
        }
    }

    /// Invariant 3: every boot finds a higher count on its disk than any before.
    fn disks(&mut self) {
        for vm in self.disk_vms.clone() {
            for host in HOSTS {
                let path = serial_path(&self.root, host, vm);
                let Ok(meta) = fs::metadata(&path) else {
                    continue;
                };
                let last = self.boots_read.get(&(vm, host)).copied();
                if last.is_some_and(|(ino, n)| ino == meta.ino() && n.is_some()) {
                    continue;
                }
                let n = boot_count(&console_head(&path));
                self.boots_read.insert((vm, host), (meta.ino(), n));
                let Some(n) = n else { continue };
                match self.boots_max.get(vm).copied() {
                    Some((max, on)) if n <= max => self.shared.report(
                        "no disk data lost",
                        vm,
                        format!("{vm} booted on {host} finding boots={n} on its disk; a boot on {on} had found boots={max}"),
                    ),
                    _ => {
                        self.boots_max.insert(vm, (n, host));
                    }
                }
            }
        }
    }
}

/// The complete lines of the first 16 KiB of a console (the boot messages come first;
/// a line still being written is left out, so `boots=12` is never read as `boots=1`).
fn console_head(path: &std::path::Path) -> String {
    let mut buf = Vec::new();
    if let Ok(file) = fs::File::open(path) {
        let _ = file.take(16 * 1024).read_to_end(&mut buf);
    }
    let end = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A QEMU that is no process (so not `-incoming`, unless the test says it is).
    fn qemu(host: &'static str, vm: &str, pid: i32) -> Qemu {
        Qemu {
            host,
            vm: vm.to_owned(),
            pid,
        }
    }

    fn broken(shared: &Shared) -> Vec<&'static str> {
        shared
            .violations
            .lock()
            .expect("violations")
            .iter()
            .map(|v| v.invariant)
            .collect()
    }

    // Pids far above any pid_max: no such process exists.
    const A: i32 = i32::MAX - 1;
    const B: i32 = i32::MAX - 2;

    #[test]
    fn two_booted_copies_break_it_a_migration_target_does_not() {
        let tmp = tempfile::tempdir().expect("tmp");
        let shared = Shared::new();
        let mut c = Checker::new(tmp.path().to_path_buf(), &shared, vec![]);
        c.incoming.insert(B, true);
        c.observe(&[qemu("hv1", "s1", A), qemu("hv2", "s1", B)]);
        assert!(
            broken(&shared).is_empty(),
            "a source and its -incoming target"
        );
        c.incoming.insert(B, false);
        c.observe(&[qemu("hv1", "s1", A), qemu("hv2", "s1", B)]);
        assert_eq!(broken(&shared), ["never two QEMUs of one VM"]);
    }

    #[test]
    fn a_start_elsewhere_breaks_it_until_the_host_is_fenced() {
        let tmp = tempfile::tempdir().expect("tmp");
        let shared = Shared::new();
        shared.episodes.lock().expect("episodes").insert(
            "hv3",
            Episode {
                host: "hv3",
                step: 4,
                vms: BTreeSet::from(["s1".to_owned()]),
                known: BTreeSet::from([A]),
                confirmed: true,
            },
        );
        let mut c = Checker::new(tmp.path().to_path_buf(), &shared, vec![]);
        c.observe(&[qemu("hv1", "s1", B)]);
        assert!(broken(&shared).is_empty(), "fenced by the operator");
        shared
            .episodes
            .lock()
            .expect("episodes")
            .get_mut("hv3")
            .expect("hv3")
            .confirmed = false;
        c.observe(&[qemu("hv3", "s1", A), qemu("hv1", "n1", B)]);
        assert!(broken(&shared).is_empty(), "another VM, or the old copy");
        c.observe(&[qemu("hv1", "s1", B)]);
        let v = shared.violations.lock().expect("violations").clone();
        assert_eq!(v.len(), 1);
        assert!(
            v[0].seen.contains("hv3 is unreachable (since step 4)"),
            "{v:?}"
        );
    }

    #[test]
    fn a_boot_that_finds_a_lower_count_breaks_it() {
        let tmp = tempfile::tempdir().expect("tmp");
        let shared = Shared::new();
        let mut c = Checker::new(tmp.path().to_path_buf(), &shared, vec!["l1"]);
        let console = |host: &str, text: &str| {
            let path = serial_path(tmp.path(), host, "l1");
            fs::create_dir_all(path.parent().expect("folder")).expect("mkdir");
            // A new file, as a new QEMU's console is (the engine keeps the last one).
            let _ = fs::rename(&path, path.with_extension("log.1"));
            fs::write(&path, text).expect("console");
        };
        console("hv1", "disk: fresh\r\ndisk: boots=1\r\ntick 1\r\n");
        c.disks();
        console(
            "hv1",
            "disk: found boots=1\r\ndisk: boots=2\r\ndisk: boots=3",
        );
        c.disks();
        assert!(
            broken(&shared).is_empty(),
            "a line still being written is not read"
        );
        console("hv2", "disk: fresh\r\ndisk: boots=1\r\n");
        c.disks();
        assert_eq!(broken(&shared), ["no disk data lost"]);
    }
}
