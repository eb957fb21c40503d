//! The daemon's side of `plasmavmc drill` against a real cluster: carrying out the fault
//! requests it finds on the drill's desk in the state directory (see [`super::desk`]).
//! `plasmavmc watch` calls [`serve`] after each reconcile; the drill itself never does.

use std::collections::BTreeMap;
use std::time::SystemTime;

use tracing::{info, warn};

use super::desk::{DrillAnswer, DrillDesk, FRESH};
use crate::errors::error_chain;
use crate::host::Host;
use crate::status::VmEvent;

/// Carries out every waiting request on `hosts`, for VMs of `vms` only; returns the
/// events to show in those VMs' status.
pub async fn serve<H: Host>(
    desk: &DrillDesk,
    hosts: &BTreeMap<String, H>,
    vms: &[&String],
) -> Vec<(String, VmEvent)> {
    let mut events = Vec::new();
    for request in desk.requests() {
        let at = crate::time::stamp_ms();
        let result = if DrillDesk::expired(&request, SystemTime::now()) {
            Err(format!(
                "expired: asked at {}, more than {:?} ago; not carried out",
                request.at, FRESH
            ))
        } else if !vms.contains(&&request.vm) {
            Err(format!("{} is not a VM of the applied commit", request.vm))
        } else if let Some(host) = hosts.get(&request.host) {
            host.inject(&request.vm, request.fault)
                .await
                .map_err(|e| error_chain(&e))
        } else {
            Err(format!("host {} is not connected", request.host))
        };
        match &result {
            Ok(pid) => {
                info!(vm = %request.vm, host = %request.host, pid, fault = request.fault.as_str(), "drill: fault injected");
                events.push((
                    request.vm.clone(),
                    VmEvent {
                        at: at.clone(),
                        kind: "drill".to_owned(),
                        message: format!("plasmavmc drill: {} (pid {pid})", request.fault.as_str()),
                    },
                ));
            }
            Err(why) => {
                warn!(vm = %request.vm, host = %request.host, %why, "drill request refused");
            }
        }
        let answer = DrillAnswer {
            id: request.id.clone(),
            pid: result.as_ref().ok().copied(),
            at,
            error: result.err(),
        };
        if let Err(e) = desk.answer(&answer) {
            warn!(error = %error_chain(&e), "cannot answer the drill request");
        }
    }
    events
}
