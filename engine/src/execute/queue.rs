//! Which actions may run now, when several run at once.
//!
//! - Each VM's actions run in order; when one fails, the VM's later ones are skipped.
//! - An action that adds load to a host (a create, a recovery, a move's target) waits
//!   for the earlier actions that free room there (stops, deletes, moves away): the
//!   planner counted on that room. Nothing else waits for anything.
//! - Bounds ([`ConcurrencySettings`]): actions touching one host, moves touching one
//!   host (both ends count), moves in all.
//!
//! The queue is pure bookkeeping: the executor asks it what may start, and tells it
//! what ended.

use std::collections::{BTreeMap, BTreeSet};

use plasmavmc_specs::ConcurrencySettings;

use crate::plan::Action;

/// An action waiting, running or just ended, with what the caller keeps beside it.
struct Entry<T> {
    id: u64,
    action: Action,
    extra: T,
    /// The earlier actions it waits for.
    after: Vec<u64>,
    /// The VM's action before it, if still in the queue: skipped when that one failed.
    vm_before: Option<u64>,
    running: bool,
}

/// What [`Queue::next`] says of an action.
pub enum Next<T> {
    /// Start it: its slots are taken.
    Run(u64, Action, T),
    /// An earlier step of its VM failed: report it skipped.
    Skip(u64, Action),
}

/// The actions not ended yet, and the slots the running ones hold.
pub struct Queue<T> {
    limits: ConcurrencySettings,
    entries: Vec<Entry<T>>,
    next_id: u64,
    /// Actions that failed or were skipped, while later actions of theirs may wait.
    failed: BTreeSet<u64>,
    per_host: BTreeMap<String, u32>,
    moves_per_host: BTreeMap<String, u32>,
    moves: u32,
}

impl<T> Queue<T> {
    pub fn new(limits: ConcurrencySettings) -> Self {
        Self {
            limits,
            entries: Vec::new(),
            next_id: 0,
            failed: BTreeSet::new(),
            per_host: BTreeMap::new(),
            moves_per_host: BTreeMap::new(),
            moves: 0,
        }
    }

    /// Bounds for what starts from now on.
    pub fn set_limits(&mut self, limits: ConcurrencySettings) {
        self.limits = limits;
    }

    /// Adds `action` after every action already queued; returns its id. Ids count from
    /// 0 again once the queue was empty (the journal's index of the action).
    pub fn push(&mut self, action: Action, extra: T) -> u64 {
        if self.entries.is_empty() {
            self.next_id = 0;
            self.failed.clear();
        }
        let id = self.next_id;
        self.next_id += 1;
        let vm_before = self
            .entries
            .iter()
            .rev()
            .find(|e| e.action.vm() == action.vm())
            .map(|e| e.id);
        let loads = loads(&action);
        let after = self
            .entries
            .iter()
            .filter(|e| Some(e.id) == vm_before || (loads.is_some() && frees(&e.action) == loads))
            .map(|e| e.id)
            .collect();
        self.entries.push(Entry {
            id,
            action,
            extra,
            after,
            vm_before,
            running: false,
        });
        id
    }

    /// The first waiting action, in the order they were queued, that may start now (its
    /// slots are taken) or must be skipped; `None` when none may.
    pub fn next(&mut self) -> Option<Next<T>>
    where
        T: Clone,
    {
        let queued: BTreeSet<u64> = self.entries.iter().map(|e| e.id).collect();
        let pick = self.entries.iter().position(|e| {
            !e.running
                && (e.vm_before.is_some_and(|b| self.failed.contains(&b))
                    || (e.after.iter().all(|a| !queued.contains(a)) && self.fits(&e.action)))
        })?;
        let entry = &self.entries[pick];
        if entry.vm_before.is_some_and(|b| self.failed.contains(&b)) {
            let entry = self.entries.remove(pick);
            self.failed.insert(entry.id);
            return Some(Next::Skip(entry.id, entry.action));
        }
        let (id, action, extra) = (entry.id, entry.action.clone(), entry.extra.clone());
        self.take(&action);
        self.entries[pick].running = true;
        Some(Next::Run(id, action, extra))
    }

    /// Action `id` ended (`ok` or not): its slots are free, and what waited for it may
    /// start.
    pub fn ended(&mut self, id: u64, ok: bool) {
        if let Some(pick) = self.entries.iter().position(|e| e.id == id) {
            let entry = self.entries.remove(pick);
            if entry.running {
                self.give_back(&entry.action);
            }
            if !ok {
                self.failed.insert(id);
            }
        }
    }

    /// The VMs with an action waiting or running.
    #[cfg(test)]
    fn vms(&self) -> BTreeSet<&str> {
        self.entries.iter().map(|e| e.action.vm()).collect()
    }

    fn fits(&self, action: &Action) -> bool {
        let l = &self.limits;
        let hosts = touches(action);
        let host_free = hosts
            .iter()
            .all(|h| self.per_host.get(*h).copied().unwrap_or(0) < l.per_host);
        let move_free = !is_move(action)
            || (self.moves < l.migrations
                && hosts.iter().all(|h| {
                    self.moves_per_host.get(*h).copied().unwrap_or(0) < l.migrations_per_host
                }));
        host_free && move_free
    }

    fn take(&mut self, action: &Action) {
        for host in touches(action) {
            *self.per_host.entry(host.to_owned()).or_default() += 1;
            if is_move(action) {
                *self.moves_per_host.entry(host.to_owned()).or_default() += 1;
            }
        }
        if is_move(action) {
            self.moves += 1;
        }
    }

    fn give_back(&mut self, action: &Action) {
        for host in touches(action) {
            if let Some(n) = self.per_host.get_mut(host) {
                *n = n.saturating_sub(1);
            }
            if let (true, Some(n)) = (is_move(action), self.moves_per_host.get_mut(host)) {
                *n = n.saturating_sub(1);
            }
        }
        if is_move(action) {
            self.moves = self.moves.saturating_sub(1);
        }
    }
}

/// The hosts an action works on.
pub(super) fn touches(action: &Action) -> Vec<&str> {
    match action {
        Action::Migrate { host, to, .. } => vec![host, to],
        other => vec![other.host()],
    }
}

fn is_move(action: &Action) -> bool {
    matches!(action, Action::Migrate { .. })
}

/// The host where `action` frees room the planner may have given to another VM.
fn frees(action: &Action) -> Option<&str> {
    match action {
        Action::Stop { host, .. }
        | Action::Delete { host, .. }
        | Action::Prune { host, .. }
        | Action::Migrate { host, .. } => Some(host),
        _ => None,
    }
}

/// The host where `action` adds load (a VM that was not there): a start or restart of
/// a VM placed there already adds none, the planner had counted it.
fn loads(action: &Action) -> Option<&str> {
    match action {
        Action::Create { host, .. } | Action::Recover { host, .. } => Some(host),
        Action::Migrate { to, .. } => Some(to),
        _ => None,
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
