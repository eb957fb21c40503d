//! Running several actions at once: [`drive`], the loop `apply` and the daemon share,
//! and the daemon's [`Runner`], a task that takes more actions while others run, so a
//! slow move never holds up the restart of a crashed VM elsewhere.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tracing::error;

use super::journal::{Journal, JournalFile};
use super::queue::{Next, Queue};
use super::{act, failed, index, note, Doing, ExecError, InFlight, Outcome, Step};
use crate::host::Host;
use crate::plan::Action;
use crate::records::whereabouts::Whereabouts;
use crate::source::Target;

/// Starts what `queue` lets start (`start` makes an action's work) and tells `ended` of
/// each action as it ends, until the queue is empty. With `more`, batches that come
/// meanwhile join the queue (`taken` hears of each of their actions).
pub(super) async fn drive<T, F, Fut>(
    queue: &mut Queue<T>,
    mut more: Option<&mut UnboundedReceiver<Vec<(Action, T)>>>,
    mut start: F,
    mut taken: impl FnMut(u64, &Action),
    mut ended: impl FnMut(u64, Step),
) where
    T: Clone,
    F: FnMut(u64, &Action, T) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let mut running = FuturesUnordered::new();
    loop {
        while let Some(next) = queue.next() {
            match next {
                Next::Run(id, action, extra) => {
                    let work = start(id, &action, extra);
                    running.push(async move { (id, action, work.await) });
                }
                Next::Skip(id, action) => {
                    let why = "an earlier step of this VM failed".to_owned();
                    ended(id, step(action, Outcome::Skipped { why }));
                }
            }
        }
        if running.is_empty() {
            // Nothing runs, so every slot is free and nothing waits on a running action:
            // the queue is empty.
            return;
        }
        let more_open = more.is_some();
        tokio::select! {
            Some((id, action, outcome)) = running.next() => {
                queue.ended(id, matches!(outcome, Outcome::Done { .. }));
                ended(id, step(action, outcome));
            }
            batch = recv(&mut more), if more_open => match batch {
                Some(batch) => {
                    for (action, extra) in batch {
                        let id = queue.push(action.clone(), extra);
                        taken(id, &action);
                    }
                }
                None => more = None,
            },
        }
    }
}

async fn recv<B>(more: &mut Option<&mut UnboundedReceiver<B>>) -> Option<B> {
    match more {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn step(action: Action, outcome: Outcome) -> Step {
    Step {
        action,
        outcome,
        at: crate::time::stamp_ms(),
    }
}

/// A long action's progress, told from the runner's task.
pub type LiveFn = Arc<dyn Fn(&str, Doing, &str) + Send + Sync>;

/// What one batch of actions runs with: the commit they were planned from, and the
/// hosts as the daemon held them then.
struct With<H> {
    target: Arc<Target>,
    hosts: Arc<BTreeMap<String, H>>,
}

impl<H> Clone for With<H> {
    fn clone(&self) -> Self {
        Self {
            target: self.target.clone(),
            hosts: self.hosts.clone(),
        }
    }
}

/// The daemon's executor: a task that carries out the actions it is given, several at
/// once, taking more while others run. Journaled as `apply` is (one journal for all it
/// has in flight), whereabouts noted before each action, [`InFlight`] kept.
pub struct Runner<H> {
    tx: UnboundedSender<Vec<(Action, With<H>)>>,
    in_flight: Arc<InFlight>,
}

impl<H> std::fmt::Debug for Runner<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl<H: Host + Clone + 'static> Runner<H> {
    /// Starts the task. `ended` hears of each action as it ends, after its VM is out of
    /// [`InFlight`] when it was the VM's last.
    pub fn spawn(
        state_root: &std::path::Path,
        in_flight: Arc<InFlight>,
        live: LiveFn,
        ended: impl Fn(Step) + Send + Sync + 'static,
    ) -> Self {
        let (tx, rx) = unbounded_channel();
        let task = Task {
            journal: JournalFile::new(state_root),
            record: Whereabouts::new(state_root),
            in_flight: in_flight.clone(),
            live,
        };
        tokio::spawn(task.run(rx, ended));
        Self { tx, in_flight }
    }

    /// Hands `actions` (planned from `target`, for `hosts`) to the task; their VMs are in
    /// flight from now on.
    pub fn submit(
        &self,
        actions: Vec<Action>,
        target: Arc<Target>,
        hosts: Arc<BTreeMap<String, H>>,
    ) {
        if actions.is_empty() {
            return;
        }
        for action in &actions {
            self.in_flight.begin(action);
        }
        let with = With { target, hosts };
        let batch = actions.into_iter().map(|a| (a, with.clone())).collect();
        if self.tx.send(batch).is_err() {
            error!("the runner task is gone; actions not carried out");
        }
    }
}

struct Task {
    journal: JournalFile,
    record: Whereabouts,
    in_flight: Arc<InFlight>,
    live: LiveFn,
}

impl Task {
    async fn run<H: Host + Clone + 'static>(
        self,
        mut rx: UnboundedReceiver<Vec<(Action, With<H>)>>,
        ended: impl Fn(Step) + Send + Sync,
    ) {
        let limits = |with: &With<H>| with.target.desired.cluster.concurrency.clone();
        let mut queue = Queue::new(plasmavmc_specs::ConcurrencySettings::default());
        while let Some(first) = rx.recv().await {
            let Some((_, with)) = first.first() else {
                continue;
            };
            queue.set_limits(limits(with));
            let entry = Mutex::new(Journal::new(&with.target.commit.id, Vec::new()));
            let save = |update: &dyn Fn(&mut Journal)| {
                let mut entry = entry.lock().unwrap_or_else(PoisonError::into_inner);
                update(&mut entry);
                if let Err(e) = self.journal.write(&entry) {
                    error!(error = %e, "cannot update the journal");
                }
            };
            let taken = |_: u64, action: &Action| {
                save(&|j| j.actions.push(action.clone()));
            };
            for (action, extra) in first {
                let id = queue.push(action.clone(), extra);
                taken(id, &action);
            }
            let start = |id: u64, action: &Action, with: With<H>| {
                let ready = note(&self.record, action).map(|()| save(&|j| j.started(index(id))));
                let action = action.clone();
                let live = self.live.clone();
                let save = &save;
                async move {
                    if let Err(why) = ready {
                        return failed(&action, &ExecError::Record(why));
                    }
                    let steps = |vm: &str, doing: Doing, what: &str| {
                        save(&|j| j.stepped(vm, what));
                        live(vm, doing, what);
                    };
                    let stop = with.target.desired.cluster.timeouts.stop.0;
                    act(&action, &with.target, &with.hosts, stop, &steps).await
                }
            };
            drive(&mut queue, Some(&mut rx), start, taken, |id, step| {
                save(&|j| j.ended(index(id)));
                self.in_flight.end(&step.action);
                ended(step);
            })
            .await;
            self.journal.clear();
        }
    }
}
