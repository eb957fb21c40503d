//! The steps `apply` and `watch` compose around the pure planner. Above every stage: it
//! may use any of them.
//!
//! - [`look`]: what the hosts run, plus what the state directory remembers of those that
//!   do not answer (where each VM may be, which hosts are fenced).

use crate::errors::error_chain;
use crate::host::Host;
use crate::observe::{Observed, Unreachable};
use crate::state::whereabouts::{Answers, Whereabouts};

/// Gathers the inventory of each host; a host that does not answer is listed as
/// unreachable, with the reason.
pub async fn gather<'a, H: Host + 'a>(hosts: impl IntoIterator<Item = &'a H>) -> Observed {
    let mut out = Observed::default();
    // All at once: a slow or silent host costs its own wait, not the sum of all.
    let hosts: Vec<&H> = hosts.into_iter().collect();
    let answers = futures_util::future::join_all(hosts.iter().map(|h| h.inventory())).await;
    for (host, answer) in hosts.into_iter().zip(answers) {
        match answer {
            Ok(inv) => {
                out.hosts.insert(host.name().to_owned(), inv);
            }
            Err(e) => {
                out.unreachable
                    .insert(host.name().to_owned(), error_chain(&e));
            }
        }
    }
    out
}

/// Observes `hosts` and adds what the state directory `state` remembers: where each VM
/// may be (the durable record, brought up to date with what the hosts that answered
/// report) and which unreachable hosts are fenced. A fenced host that answers again has
/// rejoined: its fence record is cleared (its stale copies are cleaned up by the plan).
///
/// Callers hold the state lock (the record is rewritten here).
pub async fn look<'a, H: Host + 'a>(
    hosts: impl IntoIterator<Item = &'a H>,
    unreachable: &Unreachable,
    state: &crate::state::StateDir,
) -> Observed {
    let record = Whereabouts::new(state.root());
    let read = record.read();
    if let Err(e) = &read {
        tracing::error!(error = %error_chain(e), "the record of where VMs are is damaged; rebuilt from the status files and what the hosts answer");
    }
    // None yet (the first run of an engine that keeps it), or damaged: start from where
    // the status files last saw each VM, and write it whatever the hosts answer.
    let (mut places, rebuilt) = match read {
        Ok(Some(places)) => (places, false),
        Ok(None) | Err(_) => (
            crate::status::StatusDir::new(&state.status_dir()).last_known(),
            true,
        ),
    };
    let fences = crate::state::fence::FenceRecords::new(state.root());
    let records = fences.all();
    let gathered = gather(hosts).await;
    let answers: Answers<'_> = gathered
        .hosts
        .iter()
        .map(|(host, inv)| (host.as_str(), inv.holds()))
        .collect();
    if Whereabouts::settle(&mut places, &answers) || rebuilt {
        if let Err(e) = record.write(&places) {
            tracing::error!(error = %error_chain(&e), "cannot update the record of where VMs are");
        }
    }
    let observed = gathered.with_context(unreachable, places, records.clone());
    for host in observed.hosts.keys() {
        if let (Some(how), true) = (records.get(host), fences.clear(host)) {
            // Said, not silent: an operator's `fence confirm` is void once the host
            // answers, and its VMs are then not recovered elsewhere.
            tracing::info!(host = %host, fencing = %how, "the host answers: it has rejoined; its fence record is cleared");
        }
    }
    observed
}
