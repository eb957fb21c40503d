//! The daemon's reconcile against fake hosts: a commit, a crash, a host going silent, a
//! fence. Each test drives [`Daemon::step`] by hand (no timers, no QEMU) and reads what
//! the hosts were asked and what the status files say.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plasmavmc_specs::{HostEntry, Power};
use tokio::sync::broadcast;

use super::daemon::Daemon;
use super::fleet::{Connector, Link};
use super::{Trigger, WatchConfig};
use crate::host::{ConnectOptions, Host, HostError};
use crate::observe::{Capacity, Inventory, ObservedVm, RunState};
use crate::qemu::exit::{ExitReason, ExitRecord};
use crate::qemu::instance::VmInstance;
use crate::qemu::migrate::{Stats, Tuning};
use crate::status::{StatusDir, VmPhase, VmStatus};
use crate::time::now_ms;
use crate::wire::{DiskChunk, Fault, HostEvent, Incoming, StopOutcome};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// One fake host: what it runs, what it was asked, whether it answers.
#[derive(Clone)]
struct Fake(Arc<FakeState>);

struct FakeState {
    name: String,
    vms: Mutex<BTreeMap<String, ObservedVm>>,
    calls: Mutex<Vec<String>>,
    /// Silent: reports a minute of silence, and refuses new connections (its frozen
    /// agent still holds the host's lock).
    silent: AtomicBool,
    events: broadcast::Sender<HostEvent>,
    next_pid: AtomicU32,
    /// A VM whose stop hangs until [`Fake::release`]: a long action.
    slow_stop: Mutex<Option<String>>,
    released: tokio::sync::watch::Sender<bool>,
}

impl Fake {
    fn new(name: &str) -> Self {
        Self(Arc::new(FakeState {
            name: name.to_owned(),
            vms: Mutex::default(),
            calls: Mutex::default(),
            silent: AtomicBool::new(false),
            events: broadcast::channel(16).0,
            next_pid: AtomicU32::new(100),
            slow_stop: Mutex::default(),
            released: tokio::sync::watch::channel(false).0,
        }))
    }

    /// Stopping `vm` hangs from now on until [`Fake::release`].
    fn hold_stop(&self, vm: &str) {
        *self.0.slow_stop.lock().expect("slow") = Some(vm.to_owned());
    }

    /// Lets a held stop go on.
    fn release(&self) {
        self.0.released.send_replace(true);
    }

    fn calls(&self) -> Vec<String> {
        self.0.calls.lock().expect("calls").clone()
    }

    fn vm(&self, vm: &str) -> Option<ObservedVm> {
        self.0.vms.lock().expect("vms").get(vm).cloned()
    }

    fn record(&self, call: String) {
        self.0.calls.lock().expect("calls").push(call);
    }

    /// Changes `vm`'s instance; fails as a host does when there is none.
    fn with_vm<T>(
        &self,
        vm: &str,
        change: impl FnOnce(&mut ObservedVm) -> T,
    ) -> Result<T, HostError> {
        let mut vms = self.0.vms.lock().expect("vms");
        let have = vms
            .get_mut(vm)
            .ok_or_else(|| HostError::NoInstance { vm: vm.to_owned() })?;
        Ok(change(have))
    }

    fn put(&self, vm: &VmInstance) {
        let observed = ObservedVm {
            name: vm.name.clone(),
            uuid: format!("uuid-{}", vm.name),
            state: RunState::Stopped,
            pid: None,
            power: Power::Stopped,
            revision: vm.revision.clone(),
            spec_hash: vm.spec_hash.clone(),
            spec: vm.spec.clone(),
            started_at: None,
            detail: None,
            paused: None,
            last_exit: None,
            exits: Vec::new(),
            restarts: 0,
            watchdog_resets: 0,
            guest_agent: None,
            liveness: None,
            readiness: None,
            incoming: false,
            seed: None,
            file_digests: std::collections::BTreeMap::new(),
        };
        self.0
            .vms
            .lock()
            .expect("vms")
            .insert(vm.name.clone(), observed);
    }

    /// `vm`'s QEMU dies as `kill -9` would kill it; returns the event its agent sends.
    fn crash(&self, vm: &str) -> HostEvent {
        let at_ms = now_ms();
        let pid = self
            .with_vm(vm, |have| {
                let pid = have.pid.take().unwrap_or(0);
                have.state = RunState::Exited;
                have.last_exit = Some(ExitRecord {
                    reason: ExitReason::Crash,
                    at_ms,
                    pid,
                    status: Some("signal 9 (SIGKILL)".to_owned()),
                });
                have.exits.push(at_ms);
                pid
            })
            .expect("the VM to crash runs here");
        HostEvent::Exited {
            vm: vm.to_owned(),
            pid,
            reason: ExitReason::Crash,
            status: Some("signal 9 (SIGKILL)".to_owned()),
            expected: false,
            at_ms,
        }
    }

    fn go_silent(&self) {
        self.0.silent.store(true, Ordering::SeqCst);
    }

    fn is_silent(&self) -> bool {
        self.0.silent.load(Ordering::SeqCst)
    }
}

impl Host for Fake {
    fn name(&self) -> &str {
        &self.0.name
    }
    fn subscribe(&self) -> broadcast::Receiver<HostEvent> {
        self.0.events.subscribe()
    }
    async fn inventory(&self) -> Result<Inventory, HostError> {
        Ok(Inventory {
            bridges: Vec::new(),
            cpu: None,
            qemu: None,
            vms: self.0.vms.lock().expect("vms").clone(),
            orphans: Vec::new(),
            retained: Vec::new(),
            capacity: Capacity {
                vcpus: 4,
                memory_mb: 4096,
            },
        })
    }
    async fn create(&self, vm: &VmInstance) -> Result<(), HostError> {
        self.record(format!("create {}", vm.name));
        self.put(vm);
        Ok(())
    }
    async fn recover(&self, vm: &VmInstance) -> Result<(), HostError> {
        self.record(format!("recover {}", vm.name));
        self.put(vm);
        Ok(())
    }
    async fn update(&self, vm: &VmInstance) -> Result<(), HostError> {
        self.record(format!("update {}", vm.name));
        self.with_vm(&vm.name, |have| {
            have.spec = vm.spec.clone();
            have.spec_hash.clone_from(&vm.spec_hash);
            have.revision.clone_from(&vm.revision);
        })
    }
    async fn start(&self, vm: &str) -> Result<u32, HostError> {
        self.record(format!("start {vm}"));
        let pid = self.0.next_pid.fetch_add(1, Ordering::SeqCst);
        self.with_vm(vm, |have| {
            have.state = RunState::Running;
            have.power = Power::Running;
            have.pid = Some(pid);
            pid
        })
    }
    async fn stop(&self, vm: &str, _timeout: Duration) -> Result<StopOutcome, HostError> {
        self.record(format!("stop {vm}"));
        let held = self.0.slow_stop.lock().expect("slow").as_deref() == Some(vm);
        if held {
            let mut released = self.0.released.subscribe();
            let _ = released.wait_for(|r| *r).await;
        }
        self.with_vm(vm, |have| {
            have.state = RunState::Stopped;
            have.power = Power::Stopped;
            have.pid = None;
            StopOutcome::Quit
        })
    }
    async fn delete_disk(
        &self,
        path: &std::path::Path,
        _shared: Option<&std::path::Path>,
    ) -> Result<u64, HostError> {
        Err(HostError::Refused {
            vm: path.display().to_string(),
            reason: "a fake host keeps no disks".to_owned(),
        })
    }
    async fn prune(&self, folder: &str, pid: u32) -> Result<(), HostError> {
        self.record(format!("prune {folder} {pid}"));
        Ok(())
    }
    async fn delete(&self, vm: &str) -> Result<Option<PathBuf>, HostError> {
        self.record(format!("delete {vm}"));
        self.0.vms.lock().expect("vms").remove(vm);
        Ok(None)
    }
    async fn prepare_incoming(
        &self,
        vm: &VmInstance,
        _from: &str,
        _listen: &str,
        _mirror: &[String],
    ) -> Result<Incoming, HostError> {
        Err(self.unsupported(&vm.name))
    }
    async fn migrate_out(&self, vm: &str, _to: &Incoming, _t: &Tuning) -> Result<Stats, HostError> {
        Err(self.unsupported(vm))
    }
    async fn migration_stats(&self, vm: &str) -> Result<Stats, HostError> {
        Err(self.unsupported(vm))
    }
    async fn discard(&self, vm: &str) -> Result<(), HostError> {
        Err(self.unsupported(vm))
    }
    async fn inject(&self, vm: &str, _fault: Fault) -> Result<u32, HostError> {
        Err(self.unsupported(vm))
    }
    async fn read_disk(&self, vm: &str, _disk: &str, _offset: u64) -> Result<DiskChunk, HostError> {
        Err(self.unsupported(vm))
    }
    async fn write_disk(
        &self,
        vm: &str,
        _disk: &str,
        _offset: u64,
        _chunk: &DiskChunk,
        _finish: Option<&str>,
    ) -> Result<(), HostError> {
        Err(self.unsupported(vm))
    }
}

impl Fake {
    fn unsupported(&self, vm: &str) -> HostError {
        HostError::Refused {
            vm: vm.to_owned(),
            reason: format!("the fake host {} does not move VMs", self.0.name),
        }
    }
}

impl Link for Fake {
    fn silence(&self) -> Duration {
        if self.is_silent() {
            Duration::from_secs(60)
        } else {
            Duration::ZERO
        }
    }
    fn is_closed(&self) -> bool {
        false
    }
    fn close(&self) {
        self.record("close".to_owned());
    }
}

/// Connects to the fakes by name; a silent one refuses.
struct Fakes(BTreeMap<String, Fake>);

impl Connector for Fakes {
    type Link = Fake;

    fn address(&self, entry: &HostEntry) -> Result<Vec<String>, String> {
        Ok(vec![entry.name.clone()])
    }

    async fn connect(&self, name: &str, _: &[String], _: ConnectOptions) -> Result<Fake, String> {
        match self.0.get(name) {
            Some(fake) if fake.is_silent() => {
                Err(format!("host {name}: another agent holds the host's lock"))
            }
            Some(fake) => Ok(fake.clone()),
            None => Err(format!("no fake host {name}")),
        }
    }
}

/// A spec repository in a temporary folder, committed with git.
struct Repo {
    dir: tempfile::TempDir,
    git: git2::Repository,
}

impl Repo {
    fn new() -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let git = git2::Repository::init(dir.path())?;
        git.set_head("refs/heads/main")?;
        Ok(Self { dir, git })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, file: &str, text: &str) -> std::io::Result<()> {
        let path = self.path().join(file);
        std::fs::create_dir_all(path.parent().expect("a file in a folder"))?;
        std::fs::write(path, text)
    }

    /// A host the fakes stand for (`fence = ["true"]`: fencing it always works).
    fn host(&self, name: &str, fence: bool) -> std::io::Result<()> {
        let fence = if fence { "fence = [\"true\"]\n" } else { "" };
        self.write(
            &format!("hosts/{name}.toml"),
            &format!("exec = [\"fake\"]\nvcpus = 4\nmemory_mb = 4096\n{fence}"),
        )
    }

    fn vm(&self, name: &str, extra: &str) -> std::io::Result<()> {
        self.write(
            &format!("vms/{name}.toml"),
            &format!("vcpus = 1\nmemory_mb = 64\nrestart = \"always\"\n{extra}"),
        )
    }

    fn commit(&self, message: &str) -> Result<(), git2::Error> {
        let mut index = self.git.index()?;
        index.add_all(["vms", "hosts"], git2::IndexAddOption::DEFAULT, None)?;
        index.update_all(["vms", "hosts"], None)?;
        index.write()?;
        let tree = self.git.find_tree(index.write_tree()?)?;
        let sig = git2::Signature::now("test", "test@localhost")?;
        let parent = self.git.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<_> = parent.iter().collect();
        self.git
            .commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)?;
        Ok(())
    }

    fn status(&self, vm: &str) -> Option<VmStatus> {
        StatusDir::new(&self.path().join(".plasmavmc/status"))
            .vm(vm)
            .expect("a readable status file")
    }
}

/// A daemon on `repo`'s `main`, its hosts the `fakes`.
async fn daemon(repo: &Repo, fakes: &[&Fake]) -> Result<Daemon<Fakes>, Box<dyn std::error::Error>> {
    let cfg = WatchConfig {
        repo: repo.path().display().to_string(),
        path: None,
        branch: Some("main".to_owned()),
        interval: Duration::from_secs(3600),
        state_dir: None,
        status_branch: None,
        prune: false,
    };
    let fakes: BTreeMap<String, Fake> = fakes
        .iter()
        .map(|f| (f.0.name.clone(), (*f).clone()))
        .collect();
    // Nothing reads the triggers: each test steps the daemon itself.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let (daemon, _watcher) = Daemon::open(cfg, tx, |_| Fakes(fakes)).await?;
    Ok(daemon)
}

fn phase(repo: &Repo, vm: &str) -> Option<(VmPhase, Option<String>)> {
    repo.status(vm).map(|s| (s.phase, s.host))
}

/// A repository with `web` on host `hv1`, and the fake for `hv1`.
fn web_on_one_host() -> Result<(Repo, Fake), Box<dyn std::error::Error>> {
    let repo = Repo::new()?;
    let hv1 = Fake::new("hv1");
    repo.host("hv1", false)?;
    repo.vm("web", "")?;
    repo.commit("web")?;
    Ok((repo, hv1))
}

/// `web` (ha) on one of two hosts (`fence = ["true"]` on both when `fence`), placed by a
/// first reconcile.
async fn ha_on_two_hosts(
    fence: bool,
) -> Result<(Repo, Fake, Fake, Daemon<Fakes>), Box<dyn std::error::Error>> {
    let repo = Repo::new()?;
    let (hv1, hv2) = (Fake::new("hv1"), Fake::new("hv2"));
    repo.host("hv1", fence)?;
    repo.host("hv2", fence)?;
    repo.vm("web", "ha = true\n")?;
    repo.commit("web")?;
    let mut d = daemon(&repo, &[&hv1, &hv2]).await?;
    d.step(vec![Trigger::Startup]).await;
    d.settle().await;
    Ok((repo, hv1, hv2, d))
}

/// The host `vm` was created on, and the other one.
fn placed<'f>(vm: &str, a: &'f Fake, b: &'f Fake) -> (&'f Fake, &'f Fake) {
    if a.vm(vm).is_some() {
        (a, b)
    } else {
        (b, a)
    }
}

#[tokio::test]
async fn a_commit_is_carried_out_and_its_status_written() -> TestResult {
    let (repo, hv1) = web_on_one_host()?;
    let mut d = daemon(&repo, &[&hv1]).await?;
    d.step(vec![Trigger::Startup]).await;
    d.settle().await;
    assert_eq!(hv1.calls(), ["create web", "start web"]);
    assert_eq!(
        phase(&repo, "web"),
        Some((VmPhase::Running, Some("hv1".into())))
    );

    repo.vm("web", "power = \"stopped\"\n")?;
    repo.vm("db", "")?;
    repo.commit("stop web, add db")?;
    d.step(vec![Trigger::Commit]).await;
    d.settle().await;
    let mut new = hv1.calls().split_off(2);
    new.sort();
    assert_eq!(new, ["create db", "start db", "stop web", "update web"]);
    assert_eq!(
        phase(&repo, "web"),
        Some((VmPhase::Stopped, Some("hv1".into())))
    );
    assert_eq!(
        phase(&repo, "db"),
        Some((VmPhase::Running, Some("hv1".into())))
    );

    // Nothing changed: a timer's reconcile asks nothing of the host.
    let before = hv1.calls().len();
    d.step(vec![Trigger::Timer]).await;
    d.settle().await;
    assert_eq!(hv1.calls().len(), before, "{:?}", hv1.calls());
    Ok(())
}

#[tokio::test]
async fn a_crash_is_healed_while_another_vms_action_still_runs() -> TestResult {
    let repo = Repo::new()?;
    let hv1 = Fake::new("hv1");
    repo.host("hv1", false)?;
    repo.vm("web", "")?;
    repo.vm("db", "")?;
    repo.commit("web and db")?;
    let mut d = daemon(&repo, &[&hv1]).await?;
    d.step(vec![Trigger::Startup]).await;
    d.settle().await;
    // web's stop hangs: a long action in flight.
    hv1.hold_stop("web");
    repo.vm("web", "power = \"stopped\"\n")?;
    repo.commit("stop web")?;
    d.step(vec![Trigger::Commit]).await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while !hv1.calls().contains(&"stop web".to_owned()) {
            tokio::task::yield_now().await;
        }
    })
    .await?;
    let exit = hv1.crash("db");
    d.step(vec![Trigger::Host(exit)]).await;
    let restarted = tokio::time::timeout(Duration::from_secs(5), async {
        while hv1.calls().iter().filter(|c| *c == "start db").count() < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        restarted.is_ok(),
        "db waits for web's stop: {:?}",
        hv1.calls()
    );
    assert_eq!(
        hv1.vm("web").map(|v| v.state),
        Some(RunState::Running),
        "web's stop still runs"
    );
    // A commit that changes web while its stop runs is planned once the stop ended.
    repo.vm("web", "power = \"stopped\"\npriority = 5\n")?;
    repo.commit("web: priority 5")?;
    d.step(vec![Trigger::Commit]).await;
    assert_eq!(
        hv1.calls()
            .iter()
            .filter(|c| c.starts_with("stop web"))
            .count(),
        1,
        "web is left alone while its action runs: {:?}",
        hv1.calls()
    );
    hv1.release();
    d.settle().await;
    assert_eq!(hv1.vm("web").map(|v| v.state), Some(RunState::Stopped));
    assert_eq!(
        hv1.vm("web").map(|v| v.spec.priority),
        Some(5),
        "{:?}",
        hv1.calls()
    );
    assert_eq!(repo.status("db").map(|s| s.phase), Some(VmPhase::Running));
    Ok(())
}

#[tokio::test]
async fn a_crashed_qemu_is_restarted_and_its_exit_shown() -> TestResult {
    let (repo, hv1) = web_on_one_host()?;
    let mut d = daemon(&repo, &[&hv1]).await?;
    d.step(vec![Trigger::Startup]).await;
    d.settle().await;
    let first = hv1.vm("web").and_then(|v| v.pid);

    let exit = hv1.crash("web");
    d.step(vec![Trigger::Host(exit)]).await;
    d.settle().await;
    assert_eq!(hv1.calls(), ["create web", "start web", "start web"]);
    let web = repo.status("web").expect("web has a status");
    assert_eq!(web.phase, VmPhase::Running);
    assert_ne!(web.pid, first, "a new QEMU");
    assert!(
        web.events
            .iter()
            .any(|e| e.kind == "exited" && e.message.contains("crash")),
        "{:?}",
        web.events
    );
    Ok(())
}

#[tokio::test]
async fn a_silent_host_leaves_its_vms_unknown_and_started_nowhere_else() -> TestResult {
    let (repo, hv1, hv2, mut d) = ha_on_two_hosts(false).await?;
    let (home, other) = placed("web", &hv1, &hv2);
    let quiet = other.calls();

    home.go_silent();
    assert!(d.fleet.health_changed(), "a silent host is a health change");
    d.step(vec![Trigger::Health]).await;
    d.settle().await;
    d.step(vec![Trigger::Timer]).await;
    d.settle().await;
    assert_eq!(other.calls(), quiet, "nothing of web is started elsewhere");
    let web = repo.status("web").expect("web has a status");
    assert_eq!(web.phase, VmPhase::Unknown);
    assert_eq!(web.host.as_deref(), Some(home.name()));
    assert!(
        home.calls().contains(&"close".to_owned()),
        "the silent agent is hung up on"
    );
    Ok(())
}

#[tokio::test]
async fn a_fenced_host_s_vms_are_recovered_elsewhere() -> TestResult {
    let (repo, hv1, hv2, mut d) = ha_on_two_hosts(true).await?;
    let (home, other) = placed("web", &hv1, &hv2);

    // Silent for a minute, past `down_after` (5 s): fenced at once, and web recovered.
    home.go_silent();
    d.step(vec![Trigger::Health]).await;
    d.settle().await;
    let fenced = crate::records::fence::FenceRecords::new(&repo.path().join(".plasmavmc")).all();
    assert!(fenced.contains_key(home.name()), "{fenced:?}");
    assert_eq!(other.calls(), ["recover web", "start web"]);
    let web = repo.status("web").expect("web has a status");
    assert_eq!(web.phase, VmPhase::Running);
    assert_eq!(web.host.as_deref(), Some(other.name()));
    Ok(())
}

#[tokio::test]
async fn a_damaged_journal_is_said_in_the_status_once() -> TestResult {
    let (repo, hv1) = web_on_one_host()?;
    let state = repo.path().join(".plasmavmc");
    std::fs::create_dir_all(&state)?;
    std::fs::write(state.join("journal.json"), "{\"revision\": ")?;
    let mut d = daemon(&repo, &[&hv1]).await?;
    d.step(vec![Trigger::Startup]).await;
    d.settle().await;
    let engine = || {
        StatusDir::new(&state.join("status"))
            .engine()
            .expect("a readable engine status")
            .expect("an engine status")
    };
    let error = engine().last_error.unwrap_or_default();
    assert!(error.contains("journal.json is damaged"), "{error}");
    assert_eq!(hv1.calls(), ["create web", "start web"], "healing goes on");
    // Said once: the next reconcile that leaves nothing undone clears it.
    d.step(vec![Trigger::Timer]).await;
    d.settle().await;
    assert_eq!(engine().last_error, None);
    Ok(())
}
