//! Download progress while an action runs: a host fetching an image by URL for the
//! action's VM says how far it is ([`HostEvent::Downloading`]); this passes it on to the
//! `live` callback (stderr of `apply`, the VM's status message) as
//! `hv1: downloading debian.qcow2 412 MiB/1.2 GiB`.

use std::future::Future;

use futures_util::future::{select, select_all, Either};
use tokio::sync::broadcast::error::RecvError;

use super::{Doing, Live};
use crate::host::Host;
use crate::wire::HostEvent;

/// Runs `work`, showing the downloads `hosts` make for `vm` meanwhile.
pub(super) async fn showing<H: Host, T>(
    hosts: &[&H],
    vm: &str,
    live: Live<'_>,
    work: impl Future<Output = T>,
) -> T {
    let mut events: Vec<_> = hosts.iter().map(|h| (h.name(), h.subscribe())).collect();
    let show = async {
        loop {
            if events.is_empty() {
                return std::future::pending().await;
            }
            let (got, at, _) =
                select_all(events.iter_mut().map(|(_, rx)| Box::pin(rx.recv()))).await;
            match got {
                Ok(HostEvent::Downloading {
                    vm: of,
                    file,
                    done,
                    total,
                }) if of == vm => {
                    let what = HostEvent::describe_download(&file, done, total);
                    live(vm, Doing::Downloading, &format!("{}: {what}", events[at].0));
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => {
                    events.swap_remove(at);
                }
            }
        }
    };
    let done = match select(Box::pin(work), Box::pin(show)).await {
        Either::Left((done, _)) => done,
        Either::Right((never, _)) => never,
    };
    done
}
