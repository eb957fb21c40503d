//! The daemon's hosts: one connection per host of the specs, judged by its heartbeats;
//! (re)connection, the hosts that are away, and fencing them.
//!
//! In: the specs' hosts and `[heartbeat]`. Out: the hosts to act on (a [`Fleet`]), what
//! is known of the others (down with why, suspect), and fence records. How a host is
//! reached is a [`Connector`]: agents over ssh/exec in the daemon, a fake in its tests.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use plasmavmc_specs::{Desired, HostEntry};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{error, info, warn};

use super::health::{self, Health, Limits};
use super::triggers::Trigger;
use crate::errors::error_chain;
use crate::execute::InFlight;
use crate::host::{agent_argv, AgentHost, ConnectOptions, Host};
use crate::observe::{Observed, Unreachable};
use crate::records::fence::FenceRecords;
use crate::records::StateDir;
use crate::wire::HostEvent;

/// A connection the daemon keeps to a host: the host's calls, and what its heartbeats
/// say.
/// Cloned cheaply: the runner takes the hosts with each batch of actions.
pub trait Link: Host + Clone + 'static {
    /// How long since the host last sent anything (pongs included).
    fn silence(&self) -> Duration;
    /// Whether the channel closed.
    fn is_closed(&self) -> bool;
    /// Hangs up for real: a silent (partitioned) agent sees EOF when it wakes, releases
    /// its root and exits, so the host can rejoin.
    fn close(&self);
}

impl Link for AgentHost {
    fn silence(&self) -> Duration {
        AgentHost::silence(self)
    }
    fn is_closed(&self) -> bool {
        AgentHost::is_closed(self)
    }
    fn close(&self) {
        AgentHost::close(self);
    }
}

/// How the daemon reaches a host.
pub trait Connector {
    type Link: Link;
    /// How `entry` is reached (an agent command): a host is reconnected when it changes.
    fn address(&self, entry: &HostEntry) -> Result<Vec<String>, String>;
    /// Connects to the host `name` at `address`; the error says why not.
    fn connect(
        &self,
        name: &str,
        address: &[String],
        opts: ConnectOptions,
    ) -> impl Future<Output = Result<Self::Link, String>>;
}

/// Agents, started by ssh or a host's `exec` command (or in-process for `local`).
pub struct Agents {
    pub state: StateDir,
}

impl Connector for Agents {
    type Link = AgentHost;

    fn address(&self, entry: &HostEntry) -> Result<Vec<String>, String> {
        agent_argv(entry, &self.state).map_err(|e| error_chain(&e))
    }

    async fn connect(
        &self,
        name: &str,
        address: &[String],
        opts: ConnectOptions,
    ) -> Result<AgentHost, String> {
        let host = AgentHost::connect(name, address, opts)
            .await
            .map_err(|e| error_chain(&e))?;
        info!(host = %name, hostname = %host.facts().hostname, "connected to the agent");
        Ok(host)
    }
}

/// The connected hosts and what is known of the others.
pub struct Hosts<C: Connector> {
    connector: C,
    state: StateDir,
    /// Where host events go (QEMU exits wake the daemon).
    tx: UnboundedSender<Trigger>,
    /// Connected hosts.
    up: BTreeMap<String, C::Link>,
    /// The address each connected host was reached at.
    address: BTreeMap<String, Vec<String>>,
    /// Hosts of the specs that could not be reached, and why.
    down: BTreeMap<String, String>,
    /// Connected hosts that were suspect (missed heartbeats) at the last look.
    suspect: Vec<String>,
    /// Since when each unreachable host has been away, and when it was last fenced at.
    away_since: BTreeMap<String, Instant>,
    fence_tried: BTreeMap<String, Instant>,
    /// Heartbeat interval and the silence after which a host is down.
    pub limits: Limits,
    /// The VMs whose actions the daemon's runner carries out now.
    pub in_flight: std::sync::Arc<InFlight>,
}

impl<C: Connector> Hosts<C> {
    pub fn new(connector: C, state: StateDir, tx: UnboundedSender<Trigger>) -> Self {
        Self {
            connector,
            state,
            tx,
            up: BTreeMap::new(),
            address: BTreeMap::new(),
            down: BTreeMap::new(),
            suspect: Vec::new(),
            away_since: BTreeMap::new(),
            fence_tried: BTreeMap::new(),
            limits: Limits {
                interval: Duration::from_secs(1),
                down_after: Duration::from_secs(5),
            },
            in_flight: std::sync::Arc::default(),
        }
    }

    /// Whether host health calls for a reconcile: a connected host closed or went silent
    /// past `down_after`, one entered or left `suspect`, or an unreachable one is due for
    /// fencing.
    pub fn health_changed(&self) -> bool {
        let limits = self.limits;
        let lost = self.up.values().any(|h| limits.of(h) == Health::Down);
        let suspect_changed = health::suspects(&self.up, limits) != self.suspect;
        let fence_due = self
            .away_since
            .iter()
            .any(|(host, since)| since.elapsed() >= limits.down_after && self.fence_due(host));
        lost || suspect_changed || fence_due
    }

    /// Whether `host`'s fence command was not tried within `down_after`.
    fn fence_due(&self, host: &str) -> bool {
        self.fence_tried
            .get(host)
            .is_none_or(|t| t.elapsed() >= self.limits.down_after)
    }

    /// Runs the `fence` command of every host away for `down_after` that is not fenced
    /// yet; exit 0 records it as fenced. Retried every `down_after`, never in a loop.
    pub async fn fence_away(&mut self, desired: &Desired) {
        let records = FenceRecords::new(self.state.root());
        let fenced = records.all();
        for (host, since) in self.away_since.clone() {
            let Some(argv) = desired.hosts.get(&host).and_then(|h| h.spec.fence.clone()) else {
                // Nothing to run: the operator decides (`fence confirm`). Throttle the
                // health check's "fence due" for this host all the same.
                self.fence_tried.insert(host.clone(), Instant::now());
                continue;
            };
            let due = since.elapsed() >= self.limits.down_after && self.fence_due(&host);
            if fenced.contains_key(&host) {
                // Nothing to run any more; throttle the health check's "fence due" all
                // the same, or a fenced host would cost a reconcile (and a reconnection
                // attempt) at every heartbeat until it returns.
                self.fence_tried.insert(host.clone(), Instant::now());
                continue;
            }
            if !due {
                continue;
            }
            self.fence_tried.insert(host.clone(), Instant::now());
            warn!(host = %host, command = ?argv, "host down; fencing it");
            match run_fence(&argv).await {
                Ok(()) => {
                    if let Err(e) = records.record(&host, "fence command") {
                        error!(host = %host, error = %error_chain(&e), "cannot record the fencing");
                    } else {
                        info!(host = %host, "fenced");
                    }
                }
                Err(why) => warn!(host = %host, %why, "fence command failed; its VMs stay unknown"),
            }
        }
    }

    /// Keeps one connection per host of `desired`: new hosts and broken channels are
    /// (re)connected, hosts gone from the specs are dropped (their agents exit).
    pub async fn ensure(&mut self, desired: &Desired) {
        let limits = self.limits;
        // When each dropped host was last heard from: its `down_after` (and so its
        // fencing) counts from there, not from when this engine gave up on it.
        let mut last_heard = BTreeMap::new();
        self.up.retain(|name, host| {
            let keep = desired.hosts.contains_key(name) && limits.of(host) != Health::Down;
            if !keep {
                host.close();
                let heard = Instant::now()
                    .checked_sub(host.silence())
                    .unwrap_or_else(Instant::now);
                last_heard.insert(name.clone(), heard);
            }
            keep
        });
        let up = &self.up;
        self.address.retain(|name, _| up.contains_key(name));
        self.down.clear();
        for entry in desired.hosts.values() {
            let address = match self.connector.address(entry) {
                Ok(address) => address,
                Err(why) => {
                    warn!(host = %entry.name, error = %why, "cannot reach host");
                    self.down.insert(entry.name.clone(), why);
                    continue;
                }
            };
            if self.address.get(&entry.name) == Some(&address) {
                continue;
            }
            let opts = ConnectOptions {
                heartbeat: limits.interval,
                down_after: limits.down_after,
                ..ConnectOptions::default()
            };
            match self.connector.connect(&entry.name, &address, opts).await {
                Ok(host) => {
                    forward_events(&host, self.tx.clone());
                    self.up.insert(entry.name.clone(), host);
                    self.address.insert(entry.name.clone(), address);
                }
                Err(why) => {
                    self.up.remove(&entry.name);
                    self.address.remove(&entry.name);
                    warn!(host = %entry.name, error = %why, "host unreachable");
                    self.down.insert(entry.name.clone(), why);
                }
            }
        }
        let now = Instant::now();
        for name in desired.hosts.keys() {
            if self.up.contains_key(name) {
                self.away_since.remove(name);
                self.fence_tried.remove(name);
            } else {
                self.away_since
                    .entry(name.clone())
                    .or_insert_with(|| last_heard.get(name).copied().unwrap_or(now));
            }
        }
        self.away_since
            .retain(|name, _| desired.hosts.contains_key(name));
    }

    /// The connected hosts, whatever their health (the drill's faults go to them).
    pub fn connected(&self) -> &BTreeMap<String, C::Link> {
        &self.up
    }
}

impl<C: Connector> crate::step::Fleet for Hosts<C> {
    type Host = C::Link;

    fn hosts(&self) -> &BTreeMap<String, C::Link> {
        &self.up
    }

    /// What the ready hosts run, plus what is known of the others (unreachable and
    /// suspect hosts, where each VM may be). Suspect hosts are not asked: a call to a
    /// silent agent would only wait.
    async fn look(&mut self) -> Observed {
        let health::Triage {
            ready,
            suspect,
            down,
        } = health::triage(&self.up, self.limits);
        for (host, s) in &suspect {
            if !self.suspect.contains(host) {
                warn!(host = %host, why = %s.why, "host suspect: missed heartbeats; its VMs are unknown until it answers");
            }
        }
        for host in &self.suspect {
            if !suspect.contains_key(host) && self.up.contains_key(host) {
                info!(host = %host, "host answers again; ready");
            }
        }
        self.suspect = suspect.keys().cloned().collect();
        // A host that went down after `ensure` looked (during the actions) is not
        // asked, and says why: its VMs are unknown, never "gone".
        let mut down = down;
        down.extend(self.down.clone());
        let unreachable = Unreachable { down, suspect };
        crate::step::look(ready, &unreachable, &self.state, Some(&self.in_flight)).await
    }
}

/// Runs a fence command (argv, no shell); `Ok` when it exits 0 within a minute.
async fn run_fence(argv: &[String]) -> Result<(), String> {
    let (program, rest) = argv.split_first().ok_or("empty fence command")?;
    let child = tokio::process::Command::new(program)
        .args(rest)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(60), child).await {
        Err(_) => Err("timed out after 60s".to_owned()),
        Ok(Err(e)) => Err(format!("cannot run {program}: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Forwards a host's events into the trigger channel, until the host is dropped.
fn forward_events<H: Host>(host: &H, tx: UnboundedSender<Trigger>) {
    let mut events = host.subscribe();
    tokio::spawn(async move {
        loop {
            let trigger = match events.recv().await {
                // Exits the engine asked for are its own doing, progress is only shown:
                // nothing to react to.
                Ok(
                    HostEvent::Exited { expected: true, .. }
                    | HostEvent::Migrating { .. }
                    | HostEvent::Downloading { .. },
                ) => continue,
                Ok(e) => Trigger::Host(e),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Trigger::Timer,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            };
            if tx.send(trigger).is_err() {
                break;
            }
        }
    });
}
