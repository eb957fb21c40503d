//! Benchmark: plan a synthetic repository of 100,000 VMs on 1,000 hosts.
//!
//! Builds a real git repository (in a temp folder) with 1,000 host files and
//! 100,000 VM files in one commit, then times each stage the `plan` command runs:
//! reading the commit (git2), parsing and validating every file, and planning —
//! against 1,000 empty hosts (every VM placed: all creates) and against the same
//! hosts already running every VM where that first plan put it (no changes).
//! Run: `cargo bench -p plasmavmc --bench plan100k` (`PLAN100K_RUNS=N` changes the
//! number of runs, default 3; `PLAN100K_VMS` and `PLAN100K_HOSTS` the scale, for
//! seeing how a stage grows). Each stage's time is also printed on stderr as it ends, as
//! wall time and as the CPU time of the thread (the machine is shared: wall time counts
//! what others ran). Goal (issue 17): read + validate + plan ≤ 2 s on a
//! 2-core machine. It prints figures; it asserts nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use plasmavmc::observe::{Capacity, Inventory, Observed, ObservedVm, RunState};
use plasmavmc::plan::{plan, Action};
use plasmavmc::source::Source;
use plasmavmc_specs::Power;

const VMS: usize = 100_000;
const HOSTS: usize = 1_000;

/// How many VMs on how many hosts.
#[derive(Debug, Clone, Copy)]
struct Scale {
    vms: usize,
    hosts: usize,
}
const RUNS: usize = 3;
/// Each host fits 150 of the VMs below (they average 2.5 vCPUs, 1,152 MB): the
/// 100,000 fit on the 1,000 hosts with room to spare, so the bench measures placement,
/// not refusals.
const HOST: Capacity = Capacity {
    vcpus: 400,
    memory_mb: 180_000,
};

fn vm_spec(i: usize) -> String {
    format!(
        "vcpus = {}\nmemory_mb = {}\npower = \"running\"\ngroup = \"g{}\"\n\n[[disks]]\nname = \"root\"\nsize_gb = 10\n\n[[nics]]\nforward = [\"tcp:{}:22\"]\n\n[qemu]\naccel = \"tcg\"\n",
        1 + i % 4,
        256 * (1 + i % 8),
        i % 50,
        // Host ports must differ on one host only; 20,000 distinct ones are plenty.
        10_000 + i % 20_000
    )
}

fn host_spec(i: usize) -> String {
    format!(
        "exec = [\"/usr/local/bin/plasmavmc\", \"agent\", \"--stdio\", \"--root\", \"/srv/h{i:04}\"]\nvcpus = {}\nmemory_mb = {}\n",
        HOST.vcpus, HOST.memory_mb
    )
}

fn make_repo(dir: &std::path::Path, scale: Scale) -> Result<(), git2::Error> {
    let repo = git2::Repository::init(dir)?;
    let mut vms = repo.treebuilder(None)?;
    for i in 0..scale.vms {
        let blob = repo.blob(vm_spec(i).as_bytes())?;
        vms.insert(format!("vm-{i:06}.toml"), blob, 0o100_644)?;
    }
    let vms = vms.write()?;
    let mut hosts = repo.treebuilder(None)?;
    for i in 0..scale.hosts {
        let blob = repo.blob(host_spec(i).as_bytes())?;
        hosts.insert(format!("h{i:04}.toml"), blob, 0o100_644)?;
    }
    let hosts = hosts.write()?;
    let mut root = repo.treebuilder(None)?;
    root.insert("vms", vms, 0o040_000)?;
    root.insert("hosts", hosts, 0o040_000)?;
    let tree = repo.find_tree(root.write()?)?;
    let sig = git2::Signature::now("bench", "bench@plasmavmc.invalid")?;
    repo.commit(Some("HEAD"), &sig, &sig, "100k VMs", &tree, &[])?;
    Ok(())
}

/// CPU time this thread has run (`/proc/thread-self/schedstat`, Linux; zero elsewhere):
/// on a shared machine the wall time of a stage counts the time others ran, this does not.
fn cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// Wall and CPU time since (`wall`, `cpu`) started.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    wall: Instant,
    cpu: Duration,
}

impl Stamp {
    fn now() -> Self {
        Self {
            wall: Instant::now(),
            cpu: cpu(),
        }
    }

    /// (wall, CPU) from `self` to `later`.
    fn to(self, later: Self) -> (Duration, Duration) {
        (later.wall - self.wall, later.cpu.saturating_sub(self.cpu))
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// 1,000 hosts, each running the VMs `placed` puts there (none: empty hosts).
fn observed(
    scale: Scale,
    desired: &plasmavmc_specs::Desired,
    revision: &str,
    placed: &BTreeMap<String, String>,
) -> Observed {
    let mut hosts: BTreeMap<String, Inventory> = (0..scale.hosts)
        .map(|i| {
            (
                format!("h{i:04}"),
                Inventory {
                    capacity: HOST,
                    ..Inventory::default()
                },
            )
        })
        .collect();
    for (vm, host) in placed {
        let Some(entry) = desired.vms.get(vm) else {
            continue;
        };
        let o = ObservedVm {
            name: entry.name.clone(),
            uuid: String::new(),
            state: RunState::Running,
            pid: Some(1),
            power: Power::Running,
            revision: revision.to_owned(),
            spec_hash: entry.hash.clone(),
            spec: entry.spec.clone(),
            started_at: None,
            detail: None,
            paused: None,
            last_exit: None,
            exits: vec![],
            restarts: 0,
            watchdog_resets: 0,
            guest_agent: None,
            liveness: None,
            readiness: None,
            incoming: false,
            seed: None,
            file_digests: BTreeMap::new(),
            postcopy: false,
        };
        if let Some(inv) = hosts.get_mut(host) {
            inv.vms.insert(vm.clone(), o);
        }
    }
    Observed {
        hosts,
        ..Observed::default()
    }
}

fn main() {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let scale = Scale {
        vms: env("PLAN100K_VMS", VMS),
        hosts: env("PLAN100K_HOSTS", HOSTS).max(1),
    };
    let (vms, hosts) = (scale.vms, scale.hosts);
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    make_repo(dir.path(), scale).expect("synthetic repository");
    println!(
        "plan100k: built the repository ({vms} VM files, {hosts} host files) in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let runs = env("PLAN100K_RUNS", RUNS).max(1);
    let source = Source::open(dir.path(), None).expect("open");
    // Per stage, (wall, CPU) of each run.
    let mut stages: [Vec<(Duration, Duration)>; 5] = Default::default();
    let (mut actions_new, mut actions_same, mut placed_hosts) = (0, 0, 0);
    for _ in 0..runs {
        let t0 = Stamp::now();
        let commit = source.read("HEAD").expect("read");
        let t1 = Stamp::now();
        let desired = plasmavmc_specs::load(&commit.files).expect("valid");
        let t2 = Stamp::now();
        let empty = observed(scale, &desired, &commit.id, &BTreeMap::new());
        let t2b = Stamp::now();
        let p = plan(&desired, &empty, 0);
        let t3 = Stamp::now();
        actions_new = p.actions.len();
        let placed: BTreeMap<String, String> = p
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Create { vm, host, .. } => Some((vm.clone(), host.clone())),
                _ => None,
            })
            .collect();
        placed_hosts = placed
            .values()
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let running = observed(scale, &desired, &commit.id, &placed);
        let t4 = Stamp::now();
        actions_same = plan(&desired, &running, 0).actions.len();
        let t5 = Stamp::now();
        let (read, load, new, same) = (t0.to(t1), t1.to(t2), t2b.to(t3), t4.to(t5));
        let total = (read.0 + load.0 + new.0, read.1 + load.1 + new.1);
        for (i, (name, (wall, cpu))) in [
            ("read", read),
            ("parse + validate", load),
            ("plan, all new", new),
            ("plan, all up to date", same),
            ("read + validate + plan", total),
        ]
        .into_iter()
        .enumerate()
        {
            eprintln!("  {name} {:.1} ms (CPU {:.1} ms)", ms(wall), ms(cpu));
            stages[i].push((wall, cpu));
        }
    }
    let [read, load, new, same, total] = stages.map(|runs| {
        let (wall, cpu): (Vec<_>, Vec<_>) = runs.into_iter().unzip();
        format!(
            "{:>8.1} ms (CPU {:>8.1} ms)",
            ms(median(wall)),
            ms(median(cpu))
        )
    });
    println!(
        "plan100k: {vms} VMs on {hosts} hosts, median of {runs} runs (wall, and this thread's CPU)"
    );
    println!("  read commit (git2)      {read}");
    println!("  parse + validate        {load}");
    println!("  plan, all new           {new}  ({actions_new} actions, VMs placed on {placed_hosts} hosts)");
    println!("  plan, all up to date    {same}  ({actions_same} actions)");
    println!("  read + validate + plan  {total}  (goal: ≤ 2000 ms)");
}
