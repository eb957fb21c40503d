//! Fail points: places in apply, restart and migration where a test makes this process
//! die as `kill -9` would, or makes the step fail, to prove that the next run recovers.
//!
//! In: the `FAILPOINTS` environment variable, read once when the process starts
//! ([`setup`], from `main`), in the `fail` crate's syntax: `NAME=return(kill)`,
//! `NAME=return(error)`, `NAME=return(freeze)` or `NAME=return(pause)`, several joined by
//! `;` (`1*return(kill)` fires once, see the crate's docs). Out: at a point named there,
//! `kill` sends SIGKILL to this process — nothing is flushed or cleaned up — and `error`
//! makes the step fail with [`Injected`], which names the point. The other two are for
//! partitions: `freeze` stops this process (SIGSTOP) until it gets SIGCONT — an agent
//! frozen mid-command, as a partitioned host looks to the engine — and `pause` holds it
//! until the test removes a file (`PLASMAVMC_FAILPOINT_DIR/<point>.paused`), so that a
//! test can freeze an agent just before the engine's next call to it; both then let the
//! step go on. Points not named cost one atomic load.
//!
//! Only in builds with the `failpoints` feature, which the e2e tests turn on (see
//! engine/Cargo.toml). Without it [`failpoint!`] expands to nothing, and a `FAILPOINTS`
//! in the environment is ignored with a warning.
//!
//! Which process dies: the engine and the agent are one binary, and an agent the engine
//! starts (`local`, `exec`) inherits the engine's environment. `engine.*` points are in
//! the executor (`execute/`) and fire in the engine; `agent.*` points are in the host
//! code (`host/local`, `qemu/`), which only agents run: they kill the agent in the middle
//! of a command while the engine lives on and sees its host vanish. [`POINTS`] lists
//! every point and the state a crash there leaves; tests/crashpoints.rs crashes at each.

/// One fail point and what a crash there leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub name: &'static str,
    pub leaves: &'static str,
}

const fn point(name: &'static str, leaves: &'static str) -> Point {
    Point { name, leaves }
}

/// Every fail point, in the order a plan meets them.
#[rustfmt::skip]
pub const POINTS: &[Point] = &[
    // The executor, around each action (execute/mod.rs).
    point("engine.create.before", "nothing done; the journal lists the plan"),
    point("engine.create.after", "instance and disks exist, not started; journal not advanced"),
    point("engine.start.before", "instance created, QEMU not started"),
    point("engine.start.after", "guest runs; journal not advanced"),
    point("engine.stop.before", "guest runs, a stop planned"),
    point("engine.stop.after", "QEMU gone; journal not advanced"),
    point("engine.update.before", "instance holds the old spec"),
    point("engine.update.after", "instance holds the new spec; journal not advanced"),
    point("engine.delete.before", "instance still there, QEMU stopped"),
    point("engine.delete.after", "instance removed, disks retained; journal not advanced"),
    point("engine.restart.before", "guest runs the old spec"),
    point("engine.restart.stopped", "QEMU stopped, instance holds the old spec"),
    point("engine.restart.updated", "QEMU stopped, instance holds the new spec"),
    point("engine.restart.after", "new spec runs; journal not advanced"),
    point("engine.recover.before", "VM of a fenced host not yet recreated elsewhere"),
    point("engine.recover.after", "instance recreated on the new host, not started"),
    point("engine.migrate.before", "nothing moved yet"),
    point("engine.migrate.after", "move done; journal not advanced"),
    // Live moves (execute/migrate.rs).
    point("engine.migrate.live.prepared", "target QEMU waits (-incoming), the source runs"),
    point("engine.migrate.live.progress", "migration under way; nobody will resume the target"),
    point("engine.migrate.live.completed", "commit point passed: source postmigrate, target paused"),
    point("engine.migrate.live.resumed", "target runs the guest, source postmigrate"),
    point("engine.migrate.live.discarding", "target runs, source about to be discarded"),
    // Cold moves (execute/migrate.rs).
    point("engine.migrate.cold.stopped", "source stopped, no target yet"),
    point("engine.migrate.cold.created", "source stopped, target instance with empty disks"),
    point("engine.migrate.cold.copied", "a disk copied to the target (after each disk)"),
    point("engine.migrate.cold.started", "target runs, the stopped source not discarded"),
    // The agent's side (host/local, qemu/migrate.rs).
    point("agent.create.disks", "disks created, instance.toml not written: no instance yet"),
    point("agent.start.recorded", "power = running recorded, QEMU not spawned"),
    point("agent.start.spawned", "QEMU spawned, not yet answering QMP"),
    point("agent.stop.recorded", "power = stopped recorded, QEMU still runs"),
    point("agent.delete.retained", "disks moved to retained/, instance folder left"),
    point("agent.incoming.spawned", "target QEMU spawned, migration not armed"),
    point("agent.migrate-out.mirroring", "disk mirrors into the target's NBD export running"),
    point("agent.migrate-out.switchover", "guest paused before switchover, mirrors completed"),
    point("agent.migrate-out.completed", "migration completed, the engine not told"),
    point("agent.resume.continued", "target guest resumed, its record still says incoming"),
    point("agent.discard.stopped", "source QEMU gone, its instance folder left"),
    point("agent.disk.partial", "a chunk of a copied disk in a partial file"),
];

/// A step made to fail by an `error` action.
#[derive(Debug, thiserror::Error)]
#[error("injected fault at fail point {point}")]
pub struct Injected {
    pub point: &'static str,
}

/// Ends the process at `point` (`kill`, also the default), returns the error to fail the
/// step with (`error`), or holds the process there and then lets the step go on
/// (`freeze`: SIGSTOP until SIGCONT; `pause`: until a test removes a file, see [`pause`]).
#[cfg(feature = "failpoints")]
pub fn fire(point: &'static str, action: Option<&str>) -> Option<Injected> {
    match action {
        Some("error") => {
            eprintln!("fail point {point}: the step fails (injected)");
            Some(Injected { point })
        }
        None | Some("kill") => {
            eprintln!(
                "fail point {point}: killing this process (pid {}) as kill -9 would",
                std::process::id()
            );
            let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::SIGKILL);
            // SIGKILL cannot be caught; should it somehow return, still die at once.
            std::process::abort()
        }
        Some("freeze") => {
            // A partition as the engine sees it: this process stops answering (SIGSTOP,
            // as a frozen host or a cut cable would) until someone sends it SIGCONT.
            eprintln!(
                "fail point {point}: freezing this process (pid {}) until SIGCONT",
                std::process::id()
            );
            let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::SIGSTOP);
            eprintln!("fail point {point}: continued");
            None
        }
        Some("pause") => {
            pause(point);
            None
        }
        Some(other) => {
            panic!("fail point {point}: unknown action return({other}); use return(kill), return(error), return(freeze) or return(pause)")
        }
    }
}

/// Holds this process at `point` until a test lets it go: writes
/// `$PLASMAVMC_FAILPOINT_DIR/<point>.paused` (holding this pid) and waits, blocking this
/// thread, until that file is removed. The test does what it wants meanwhile (freeze an
/// agent with SIGSTOP, cut a channel), then removes the file to let the step go on.
#[cfg(feature = "failpoints")]
fn pause(point: &'static str) {
    let dir = std::env::var_os("PLASMAVMC_FAILPOINT_DIR")
        .map_or_else(std::env::temp_dir, std::path::PathBuf::from);
    let file = dir.join(format!("{point}.paused"));
    if let Err(e) = std::fs::write(&file, std::process::id().to_string()) {
        panic!("fail point {point}: cannot write {}: {e}", file.display());
    }
    eprintln!(
        "fail point {point}: paused (pid {}) until {} is removed",
        std::process::id(),
        file.display()
    );
    while file.exists() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    eprintln!("fail point {point}: goes on");
}

/// A fail point: `failpoint!("engine.start.after")` in a function returning a `Result`
/// whose error type converts from [`Injected`]; `failpoint!("name", ())` in one returning
/// `()`, where `error` only returns early.
#[cfg(feature = "failpoints")]
macro_rules! failpoint {
    ($name:literal) => {
        if let Some(injected) = ::fail::eval($name, |action| {
            $crate::failpoint::fire($name, action.as_deref())
        })
        .flatten()
        {
            return Err(injected.into());
        }
    };
    ($name:literal, ()) => {
        if ::fail::eval($name, |action| {
            $crate::failpoint::fire($name, action.as_deref())
        })
        .flatten()
        .is_some()
        {
            return;
        }
    };
}

/// A fail point (compiled out: the `failpoints` feature is off).
#[cfg(not(feature = "failpoints"))]
macro_rules! failpoint {
    ($name:literal) => {};
    ($name:literal, ()) => {};
}

pub(crate) use failpoint;

/// What keeps the points configured: hold it for the life of the process.
#[derive(Debug)]
pub struct Scenario {
    #[cfg(feature = "failpoints")]
    _scenario: fail::FailScenario<'static>,
}

/// Configures the points `FAILPOINTS` names (panics on a malformed value: it is a test's
/// mistake). Without the feature, warns when `FAILPOINTS` is set.
pub fn setup() -> Scenario {
    #[cfg(feature = "failpoints")]
    {
        Scenario {
            _scenario: fail::FailScenario::setup(),
        }
    }
    #[cfg(not(feature = "failpoints"))]
    {
        if std::env::var_os("FAILPOINTS").is_some() {
            eprintln!("warning: FAILPOINTS is set, but this plasmavmc was built without the failpoints feature; ignored");
        }
        Scenario {}
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::POINTS;

    /// `failpoint!("NAME")` of every source file under `dir`, with where.
    fn points_in(dir: &Path, out: &mut BTreeMap<String, Vec<String>>) {
        for entry in std::fs::read_dir(dir)
            .expect("readable source folder")
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                points_in(&path, out);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("readable source file");
            for piece in text.split("failpoint!(\"").skip(1) {
                let name = piece.split('"').next().unwrap_or_default();
                out.entry(name.to_owned())
                    .or_default()
                    .push(path.display().to_string());
            }
        }
    }

    #[test]
    fn every_point_in_the_code_is_listed_once_and_every_listed_one_exists() {
        let mut found = BTreeMap::new();
        points_in(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut found,
        );
        // This file's own docs and macro are not points.
        found.retain(|_, files| {
            files.retain(|f| !f.ends_with("failpoint.rs"));
            !files.is_empty()
        });
        let listed: Vec<&str> = POINTS.iter().map(|p| p.name).collect();
        let mut unique = listed.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), listed.len(), "a point is listed twice");
        for (name, files) in &found {
            assert!(
                listed.contains(&name.as_str()),
                "{name} ({files:?}) is not in POINTS"
            );
            assert_eq!(
                files.len(),
                1,
                "{name} is in the code more than once: {files:?}"
            );
        }
        for name in listed {
            assert!(
                found.contains_key(name),
                "{name} is in POINTS but not in the code"
            );
            let side = name.split('.').next().unwrap_or_default();
            assert!(
                side == "engine" || side == "agent",
                "{name} does not say its side"
            );
        }
    }
}
