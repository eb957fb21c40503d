//! The VMs with actions in flight, shared by the daemon's runner (which starts and ends
//! them) and its looks (which must not trust what they saw of those VMs).
//!
//! A look asks every host at once and takes a while: what it saw of a VM whose action
//! ran meanwhile may be from before or after that action, or half-way (a move's target
//! asked before the move, its source after). So a look takes a [`InFlight::mark`] before
//! asking, and afterwards [`InFlight::since`] names every VM in flight or ended since
//! the mark, with the hosts its actions touched: the record of where VMs are keeps all
//! of them, and the planner leaves them alone (counting them on each of those hosts)
//! until a later look sees them settled.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use crate::plan::Action;

/// See the module.
#[derive(Debug, Default)]
pub struct InFlight {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// VM -> its actions not ended yet, and the hosts they touch.
    busy: BTreeMap<String, (u32, BTreeSet<String>)>,
    /// VM -> when its last action ended (a count of endings), and the hosts it touched.
    ended: BTreeMap<String, (u64, BTreeSet<String>)>,
    endings: u64,
}

impl InFlight {
    /// A point in time for [`InFlight::since`].
    pub fn mark(&self) -> u64 {
        self.lock().endings
    }

    /// `action` is queued: its VM is in flight until all of its actions end.
    pub fn begin(&self, action: &Action) {
        let mut inner = self.lock();
        let (count, hosts) = inner.busy.entry(action.vm().to_owned()).or_default();
        *count += 1;
        hosts.extend(super::queue::touches(action).into_iter().map(str::to_owned));
    }

    /// `action` ended (done, failed or skipped).
    pub fn end(&self, action: &Action) {
        let mut inner = self.lock();
        let vm = action.vm();
        let Some((count, hosts)) = inner.busy.get_mut(vm) else {
            return;
        };
        *count = count.saturating_sub(1);
        if *count > 0 {
            return;
        }
        let hosts = std::mem::take(hosts);
        inner.busy.remove(vm);
        inner.endings += 1;
        let at = inner.endings;
        inner.ended.insert(vm.to_owned(), (at, hosts));
    }

    /// The VMs in flight now or whose actions ended after `mark`, with every host their
    /// actions touched.
    pub fn since(&self, mark: u64) -> BTreeMap<String, Vec<String>> {
        let inner = self.lock();
        let mut out: BTreeMap<String, Vec<String>> = inner
            .busy
            .iter()
            .map(|(vm, (_, hosts))| (vm.clone(), hosts.iter().cloned().collect()))
            .collect();
        for (vm, (at, hosts)) in &inner.ended {
            if *at > mark {
                let entry = out.entry(vm.clone()).or_default();
                for h in hosts {
                    if !entry.contains(h) {
                        entry.push(h.clone());
                    }
                }
            }
        }
        out
    }

    /// Whether no action is in flight.
    #[cfg(test)]
    fn is_idle(&self) -> bool {
        self.lock().busy.is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(vm: &str, host: &str) -> Action {
        Action::Start {
            vm: vm.to_owned(),
            host: host.to_owned(),
            reason: String::new(),
        }
    }

    #[test]
    fn a_look_distrusts_vms_in_flight_and_those_that_ended_after_it_began() {
        let f = InFlight::default();
        f.begin(&start("old", "h1"));
        f.end(&start("old", "h1"));
        let mark = f.mark();
        f.begin(&start("a", "h1"));
        f.begin(&start("a", "h2"));
        f.begin(&start("b", "h3"));
        f.end(&start("b", "h3"));
        assert!(!f.is_idle());
        let seen = f.since(mark);
        assert_eq!(seen.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(seen["a"], ["h1", "h2"]);
        f.end(&start("a", "h1"));
        assert!(!f.is_idle(), "a has a second action");
        f.end(&start("a", "h2"));
        assert!(f.is_idle());
        assert!(f.since(f.mark()).is_empty());
    }
}
