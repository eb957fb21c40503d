//! Ending an instance's QEMU: the stop the engine orders (ACPI power button, then QMP
//! `quit`, then SIGKILL), and the drill's faults, which end or jolt it unasked.

use std::time::Duration;

use plasmavmc_specs::Power;
use tracing::{info, warn};

use super::{LocalHost, EXIT_GRACE, QMP_PROBE};
use crate::failpoint::failpoint;
use crate::host::HostError;
use crate::qemu::process;
use crate::wire::{Fault, StopOutcome};

impl LocalHost {
    pub(super) async fn stop_here(
        &self,
        vm: &str,
        timeout: Duration,
    ) -> Result<StopOutcome, HostError> {
        let (outcome, uuid) = self.end_qemu(vm, timeout).await?;
        // QEMU is gone: its taps go too (also those a killed agent left behind).
        self.release_taps(vm, Some(&uuid)).await;
        Ok(outcome)
    }

    /// Ends `vm`'s QEMU, recording first that it is stopped; returns how, and the
    /// instance's uuid.
    async fn end_qemu(
        &self,
        vm: &str,
        timeout: Duration,
    ) -> Result<(StopOutcome, String), HostError> {
        let (dir, mut inst) = self.read(vm)?;
        let uuid = inst.uuid.clone();
        if inst.power != Power::Stopped {
            inst.power = Power::Stopped;
            Self::write(&dir, &inst)?;
        }
        failpoint!("agent.stop.recorded");
        let Some(pid) = Self::live_pid(&dir, &inst) else {
            return Ok((StopOutcome::AlreadyStopped, uuid));
        };
        let qmp = self.monitor.qmp(&dir, vm, &inst.uuid, pid, QMP_PROBE).await;
        let status = match &qmp {
            Ok(qmp) => Some(qmp.query_status().await),
            Err(_) => None,
        };
        if let Some(Err(e @ crate::qemu::qmp::QmpError::Timeout { .. })) = &status {
            // A QEMU that does not answer is frozen: no command will be heard (each would
            // wait out its own timeout), only SIGKILL ends it.
            warn!(vm, pid, error = %e, "QEMU does not answer QMP; killing it");
        } else if let Ok(qmp) = &qmp {
            // A paused guest (a migration's source or target) cannot see the power button.
            let paused = status.is_some_and(|s| s.is_ok_and(|s| !s.running));
            if paused && qmp.quit().await.is_ok() && process::wait_gone(pid, EXIT_GRACE).await {
                info!(vm, pid, "QEMU held no running guest; quit");
                return Ok((StopOutcome::Paused, uuid));
            }
            let pressed = qmp.system_powerdown().await;
            if pressed.is_ok() && process::wait_gone(pid, timeout).await {
                info!(vm, pid, "stopped gracefully");
                return Ok((StopOutcome::Graceful, uuid));
            }
            if !matches!(pressed, Err(crate::qemu::qmp::QmpError::Timeout { .. })) {
                warn!(
                    vm,
                    pid,
                    ?timeout,
                    "guest ignored the ACPI power button; quitting QEMU"
                );
                if qmp.quit().await.is_ok() && process::wait_gone(pid, EXIT_GRACE).await {
                    return Ok((StopOutcome::Quit, uuid));
                }
            }
        }
        warn!(vm, pid, "QEMU did not quit; killing it");
        process::kill_hard(pid);
        if process::wait_gone(pid, EXIT_GRACE).await {
            Ok((StopOutcome::Killed, uuid))
        } else {
            Err(HostError::StopFailed {
                vm: vm.to_owned(),
                pid,
            })
        }
    }

    pub(super) async fn inject_here(&self, vm: &str, fault: Fault) -> Result<u32, HostError> {
        let (dir, inst) = self.read(vm)?;
        let pid = Self::live_pid(&dir, &inst).ok_or_else(|| HostError::Refused {
            vm: vm.to_owned(),
            reason: "no QEMU of it runs on this host".to_owned(),
        })?;
        match fault {
            Fault::KillQemu => process::kill_hard(pid),
            Fault::Nmi => {
                let qmp_err = |source| HostError::Qmp {
                    vm: vm.to_owned(),
                    source: Box::new(source),
                };
                let qmp = self
                    .monitor
                    .qmp(&dir, vm, &inst.uuid, pid, QMP_PROBE)
                    .await
                    .map_err(qmp_err)?;
                qmp.execute("inject-nmi", None).await.map_err(qmp_err)?;
            }
        }
        warn!(vm, pid, fault = fault.as_str(), "drill: fault injected");
        Ok(pid)
    }
}
