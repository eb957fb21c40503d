//! Benchmark: engine-driven live migration against raw QEMU, same guest, same machine.
//!
//! Run: `cargo bench -p plasmavmc-e2e --bench migrate` (`MIGRATE_RUNS=N` runs per
//! guest, default 3; `PLASMAVMC_BIN` picks the binary, default a release build).
//!
//! Each run boots the tiny test guest (no disk) on simulated host hv1, waits until it
//! is ready, then:
//! - engine: commits `host = "hv2"` and runs `plasmavmc apply`; the figure is the
//!   migrate step's wall time as apply reports it (target QEMU spawned and waiting,
//!   memory streamed, target resumed, source quit), plus QEMU's own total time and
//!   downtime;
//! - raw: the same guest, now on hv2, is migrated by hand over QMP to a QEMU started
//!   with the very command line the engine used (plus `-S -incoming defer`), with the
//!   same bandwidth, downtime limit and auto-converge: spawn the target, wait for its
//!   QMP, `migrate-incoming`, `migrate`, poll `query-migrate` every 10 ms, `cont` the
//!   target, quit the source. Same span as the engine's step.
//!
//! Guests: idle (256 MiB), 1 GiB with 900 MiB filled with non-zero data, and 512 MiB
//! rewriting 128 MiB over and over (auto-converge). It prints figures; it asserts
//! nothing.
//!
//! Then postcopy: the dirtying guest moved by the engine with the default settings
//! (precopy, auto-converge) and with `postcopy_after = "2s"`, alternately, in the same
//! run: step time, QEMU's total time and downtime, and when it switched.
//! `MIGRATE_ONLY=postcopy` runs only that part.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use plasmavmc_e2e::bench::{
    env_count, machine, migrate_step, percentile, release_binary, MoveFigures as Figures,
};
use plasmavmc_e2e::qmp::RawQmp;
use plasmavmc_e2e::{cmdline, is_alive, wait_for, HostSpec, TestRepo, VmSpec};
use serde_json::json;

const RUNS: usize = 3;

/// Bound for the guest to boot and load its memory.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// Bound for one migration.
const MOVE_TIMEOUT: Duration = Duration::from_secs(300);

struct Guest {
    name: &'static str,
    memory_mb: u64,
    cmdline: &'static str,
    /// The serial line that says it is ready.
    ready: &'static str,
}

const GUESTS: [Guest; 3] = [
    Guest {
        name: "idle, 256 MiB",
        memory_mb: 256,
        cmdline: "",
        ready: "tick 5",
    },
    Guest {
        name: "1 GiB, 900 MiB filled",
        memory_mb: 1024,
        cmdline: "plasmavmc.fill=900",
        ready: "filled 900 MiB",
    },
    Guest {
        name: "512 MiB, rewriting 128 MiB",
        memory_mb: 512,
        cmdline: "plasmavmc.dirty=128",
        ready: "dirtying 128 MiB",
    },
];

fn main() -> Result<()> {
    let runs = env_count("MIGRATE_RUNS", RUNS)?;
    let bin = release_binary()?;
    println!("engine-driven live migration vs raw QEMU (binary {bin})");
    for (k, v) in machine() {
        println!("  {k}: {v}");
    }
    println!();
    if std::env::var("MIGRATE_ONLY").as_deref() == Ok("postcopy") {
        return postcopy(runs);
    }
    println!("| guest | runs | engine: step | engine: QEMU total / downtime | raw: span | raw: QEMU total / downtime | engine / raw | passes |");
    println!("|---|---|---|---|---|---|---|---|");
    for guest in &GUESTS {
        let mut engine = Vec::new();
        let mut raw = Vec::new();
        for i in 0..runs {
            let (e, r) = run(guest).with_context(|| format!("{}, run {i}", guest.name))?;
            eprintln!("{}: run {i}: engine {e:?}, raw {r:?}", guest.name);
            engine.push(e);
            raw.push(r);
        }
        let med = |v: &[Figures], f: fn(&Figures) -> f64| {
            percentile(&v.iter().map(f).collect::<Vec<_>>(), 50)
        };
        let (ew, rw) = (med(&engine, |f| f.wall), med(&raw, |f| f.wall));
        println!(
            "| {} | {runs} | {ew:.0} ms | {:.0} / {:.0} ms | {rw:.0} ms | {:.0} / {:.0} ms | {:.2}× | {:.0} / {:.0} |",
            guest.name,
            med(&engine, |f| f.total),
            med(&engine, |f| f.downtime),
            med(&raw, |f| f.total),
            med(&raw, |f| f.downtime),
            ew / rw,
            med(&engine, |f| f.passes),
            med(&raw, |f| f.passes),
        );
    }
    println!("\n(medians; engine step = what `plasmavmc apply` prints for the migrate action)");
    println!();
    postcopy(runs)
}

/// The dirtying guest moved with and without the escalation to postcopy.
fn postcopy(runs: usize) -> Result<()> {
    let guest = &GUESTS[2];
    let mut figures: [Vec<Figures>; 2] = [Vec::new(), Vec::new()];
    for i in 0..runs {
        let (repo, spec) = web_on_hv1(guest)?;
        for (k, (to, settings)) in [
            ("hv2", ""),
            ("hv1", "[migration]\npostcopy_after = \"2s\"\n"),
        ]
        .into_iter()
        .enumerate()
        {
            repo.set_cluster_settings(settings)?;
            repo.write_vm("web", &spec.clone().pin(to))?;
            repo.commit(&format!("web to {to}"))?;
            let out = repo.run(&["apply", "--auto-approve"])?;
            out.expect_code(0)?;
            let f = migrate_step(&out.stdout, "web")?;
            let line = out.stdout.lines().find(|l| l.contains("ok   migrate web"));
            eprintln!("run {i}: {}", line.unwrap_or_default().trim());
            figures[k].push(f);
        }
    }
    println!(
        "| {}, moved by the engine | runs | step | QEMU total | downtime | passes |",
        guest.name
    );
    println!("|---|---|---|---|---|---|");
    for (k, how) in ["precopy (auto-converge)", "postcopy_after = \"2s\""]
        .iter()
        .enumerate()
    {
        let med =
            |f: fn(&Figures) -> f64| percentile(&figures[k].iter().map(f).collect::<Vec<_>>(), 50);
        println!(
            "| {how} | {runs} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} |",
            med(|f| f.wall),
            med(|f| f.total),
            med(|f| f.downtime),
            med(|f| f.passes)
        );
    }
    println!(
        "\n(medians; each run moves a fresh guest hv1 -> hv2 in precopy, then back with postcopy)"
    );
    Ok(())
}

/// Hosts hv1 and hv2 (agents), and `web` running `guest` pinned to hv1, applied, its
/// guest ready; returns the repository and web's spec (without the pin).
fn web_on_hv1(guest: &Guest) -> Result<(TestRepo, VmSpec)> {
    let repo = TestRepo::new()?;
    for host in ["hv1", "hv2"] {
        repo.write_host(host, &HostSpec::agent().memory(8192))?;
    }
    let spec = VmSpec::new()
        .no_disks()
        .memory(guest.memory_mb)
        .cmdline(guest.cmdline);
    repo.write_vm("web", &spec.clone().pin("hv1"))?;
    repo.commit("web on hv1")?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    wait_for(
        format!("the guest to say {:?}", guest.ready),
        READY_TIMEOUT,
        || repo.serial_on("hv1", "web").contains(guest.ready),
    )?;
    Ok((repo, spec))
}

fn run(guest: &Guest) -> Result<(Figures, Figures)> {
    let (repo, spec) = web_on_hv1(guest)?;

    // The first migration of a freshly booted guest is slower (measured); both measured
    // migrations below are later ones.
    let mut engine = Figures::default();
    for to in ["hv2", "hv1"] {
        repo.write_vm("web", &spec.clone().pin(to))?;
        repo.commit(&format!("web to {to}"))?;
        let out = repo.run(&["apply", "--auto-approve"])?;
        out.expect_code(0)?;
        engine = migrate_step(&out.stdout, "web")?;
        eprintln!("  engine to {to}: {engine:?}");
    }

    let pid = repo.qemu_on("hv1", "web")?;
    let source_dir = repo.instance_dir_on("hv1", "web");
    let raw = raw_migration(pid, &source_dir, &repo.root().join("raw"))?;
    Ok((engine, raw))
}

/// Migrates the QEMU `pid` (instance folder `source_dir`, QMP free) by hand to a new
/// QEMU in `scratch` started with the same command line.
fn raw_migration(pid: i32, source_dir: &Path, scratch: &Path) -> Result<Figures> {
    std::fs::create_dir_all(scratch)?;
    let mut args = cmdline(pid)?;
    let program = args.remove(0);
    args.extend(["-S", "-incoming", "defer"].map(String::from));
    let mut source = RawQmp::connect(&source_dir.join("qmp.sock"), Duration::from_secs(5))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let uri = format!("tcp:127.0.0.1:{port}");

    let started = Instant::now();
    let mut target_proc = Command::new(&program)
        .args(&args)
        .current_dir(scratch)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the raw target QEMU")?;
    let result = (|| -> Result<Figures> {
        let mut target = RawQmp::connect(&scratch.join("qmp.sock"), Duration::from_secs(10))?;
        let caps = |auto: bool| {
            json!({"capabilities": [
                {"capability": "events", "state": true},
                {"capability": "auto-converge", "state": auto},
            ]})
        };
        target.execute("migrate-set-capabilities", Some(caps(false)))?;
        target.execute("migrate-incoming", Some(json!({ "uri": uri })))?;
        source.execute("migrate-set-capabilities", Some(caps(true)))?;
        source.execute(
            "migrate-set-parameters",
            Some(json!({"max-bandwidth": 1024u64 << 20, "downtime-limit": 300})),
        )?;
        source.execute("migrate", Some(json!({ "uri": uri })))?;
        let deadline = Instant::now() + MOVE_TIMEOUT;
        let info = loop {
            let info = source.execute("query-migrate", None)?;
            match info["status"].as_str() {
                Some("completed") => break info,
                Some("failed" | "cancelled") => bail!("raw migration failed: {info}"),
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("raw migration did not complete within {MOVE_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        target.execute("cont", None)?;
        // QEMU settles its figures a moment after `completed`: ask again, as the engine
        // does (inside its step, so inside this span too).
        let mut info = info;
        let settle = Instant::now() + Duration::from_secs(1);
        while info["total-time"].as_u64().unwrap_or(0) == 0 && Instant::now() < settle {
            std::thread::sleep(Duration::from_millis(10));
            info = source.execute("query-migrate", None)?;
        }
        let _ = source.execute("quit", None);
        wait_for("the raw source to exit", Duration::from_secs(10), || {
            !is_alive(pid)
        })?;
        let wall = started.elapsed().as_secs_f64() * 1000.0;
        let num = |k: &str| info[k].as_f64().unwrap_or(f64::NAN);
        Ok(Figures {
            wall,
            total: num("total-time"),
            downtime: num("downtime"),
            passes: info["ram"]["dirty-sync-count"].as_f64().unwrap_or(f64::NAN),
        })
    })();
    let _ = target_proc.kill();
    let _ = target_proc.wait();
    result
}
