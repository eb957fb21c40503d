//! Benchmark: plan a synthetic repository of 10,000 VMs.
//!
//! Builds a real git repository with 10,000 VM files (in a temp folder), then times
//! each stage the `plan` command runs: reading the commit (git2), parsing and
//! validating every file, and planning — against no instances (all creates) and
//! against instances that all match (no changes). Run: `cargo bench -p plasmavmc --bench plan10k`.
//! Goal: the whole pipeline under 1 s on a 2-core machine.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use plasmavmc::observe::{Capacity, Inventory, Observed, ObservedVm, RunState};
use plasmavmc::plan::plan;
use plasmavmc::source::Source;
use plasmavmc_specs::Power;

const VMS: usize = 10_000;
const RUNS: usize = 5;
/// A host that fits all 10,000 VMs: the bench measures planning, not refusals.
const BIG: Capacity = Capacity {
    vcpus: 100_000,
    memory_mb: 100_000_000,
};

fn spec(i: usize) -> String {
    format!(
        "vcpus = {}\nmemory_mb = {}\npower = \"running\"\ngroup = \"g{}\"\n\n[[disks]]\nname = \"root\"\nsize_gb = 10\n\n[[nics]]\nforward = [\"tcp:{}:22\"]\n\n[qemu]\naccel = \"tcg\"\n",
        1 + i % 4,
        256 * (1 + i % 8),
        i % 50,
        10_000 + i
    )
}

fn make_repo(dir: &std::path::Path) -> Result<(), git2::Error> {
    let repo = git2::Repository::init(dir)?;
    let mut vms = repo.treebuilder(None)?;
    for i in 0..VMS {
        let blob = repo.blob(spec(i).as_bytes())?;
        vms.insert(format!("vm-{i:05}.toml"), blob, 0o100_644)?;
    }
    let vms = vms.write()?;
    let mut root = repo.treebuilder(None)?;
    root.insert("vms", vms, 0o040_000)?;
    let tree = repo.find_tree(root.write()?)?;
    let sig = git2::Signature::now("bench", "bench@plasmavmc.invalid")?;
    repo.commit(Some("HEAD"), &sig, &sig, "10k VMs", &tree, &[])?;
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(dir.path()).expect("synthetic repository");
    let source = Source::open(dir.path(), None).expect("open");
    let (mut read, mut load, mut plan_new, mut plan_same, mut total) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..RUNS {
        let t0 = Instant::now();
        let commit = source.read("HEAD").expect("read");
        let t1 = Instant::now();
        let desired = plasmavmc_specs::load(&commit.files).expect("valid");
        let t2 = Instant::now();
        let p = plan(
            &desired,
            &Observed {
                hosts: BTreeMap::from([(
                    "local".to_owned(),
                    Inventory {
                        capacity: BIG,
                        ..Inventory::default()
                    },
                )]),
                ..Observed::default()
            },
            0,
        );
        let t3 = Instant::now();
        assert_eq!(p.actions.len(), 2 * VMS);
        read.push(t1 - t0);
        load.push(t2 - t1);
        plan_new.push(t3 - t2);
        total.push(t3 - t0);
        let vms = desired
            .vms
            .values()
            .map(|e| {
                let o = ObservedVm {
                    name: e.name.clone(),
                    uuid: String::new(),
                    state: RunState::Running,
                    pid: Some(1),
                    power: Power::Running,
                    revision: commit.id.clone(),
                    spec_hash: e.hash.clone(),
                    spec: e.spec.clone(),
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
                    postcopy: false,
                    seed: None,
                    file_digests: std::collections::BTreeMap::new(),
                };
                (e.name.clone(), o)
            })
            .collect();
        let observed = Observed {
            hosts: BTreeMap::from([(
                "local".to_owned(),
                Inventory {
                    vms,
                    capacity: BIG,
                    ..Inventory::default()
                },
            )]),
            ..Observed::default()
        };
        let t4 = Instant::now();
        assert!(plan(&desired, &observed, 0).is_empty());
        plan_same.push(t4.elapsed());
    }
    println!("plan10k: {VMS} VMs, median of {RUNS} runs");
    println!(
        "  read commit (git2)      {:>8.1} ms",
        median(read).as_secs_f64() * 1e3
    );
    println!(
        "  parse + validate        {:>8.1} ms",
        median(load).as_secs_f64() * 1e3
    );
    println!(
        "  plan, all new           {:>8.1} ms",
        median(plan_new).as_secs_f64() * 1e3
    );
    println!(
        "  plan, all up to date    {:>8.1} ms",
        median(plan_same).as_secs_f64() * 1e3
    );
    println!(
        "  read + validate + plan  {:>8.1} ms  (goal: < 1000 ms)",
        median(total).as_secs_f64() * 1e3
    );
}
