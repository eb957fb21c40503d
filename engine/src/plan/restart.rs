//! The restart policy as a pure decision: after an exit the engine did not ask for,
//! restart now, wait (backoff), stay stopped (policy), or give up (`failed`).
//!
//! ```text
//!             exit (not asked for)
//!                    │
//!   disk locked by  ─┼─> GiveUp at once (a copy may run elsewhere: never retried)
//!   another QEMU     │
//!   restart = never ─┼─> Stay (unless the watchdog fired and [health] watchdog =
//!                    │   "restart": that instruction is the more specific one)
//!   on-failure and   │
//!   not crash/panic ─┼─> Stay
//!   N exits in window┼─> GiveUp (phase failed, until the spec changes)
//!   backoff pending ─┼─> Wait(until)
//!                    └─> Restart
//! ```
//! The first restart is immediate; the k-th exit within the window waits
//! `backoff * 2^(k-2)`, at most `backoff_max`.

use plasmavmc_specs::{RestartPolicy, RestartSettings, WatchdogAction};

use crate::observe::ObservedVm;
use crate::qemu::exit::ExitReason;

/// What to do about an exited VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Restart { reason: ExitReason, attempt: u32 },
    Wait { reason: ExitReason, until_ms: u64 },
    Stay { why: String },
    GiveUp { why: String },
}

/// What happened to `vm`, which should run and does not: for plans and status.
pub fn describe_exit(vm: &ObservedVm) -> String {
    let last = vm.last_exit.as_ref();
    match last.map_or(ExitReason::Unknown, |e| e.reason) {
        ExitReason::GuestPoweroff => "the guest powered itself off".to_owned(),
        ExitReason::Watchdog => "the guest stopped feeding its watchdog".to_owned(),
        ExitReason::Unhealthy => {
            let why = last
                .and_then(|e| e.status.as_deref())
                .unwrap_or("no output");
            format!("its liveness probe failed ({why})")
        }
        ExitReason::Unknown => "QEMU exited while no engine was watching".to_owned(),
        ExitReason::StartFailed => {
            let why = last
                .and_then(|e| e.status.as_deref())
                .unwrap_or("no message");
            format!("QEMU failed to start ({why})")
        }
        ExitReason::ImageLocked => {
            let why = last
                .and_then(|e| e.status.as_deref())
                .unwrap_or("no message");
            format!("not started: a disk is in use by another QEMU (image lock: {why})")
        }
        other => {
            let status = last
                .and_then(|e| e.status.as_deref())
                .map(|s| format!(", {s}"))
                .unwrap_or_default();
            format!("QEMU exited ({other}{status})")
        }
    }
}

/// Decides for `vm`, which exited without being asked (it should run, no QEMU).
pub fn verdict(
    policy: RestartPolicy,
    settings: &RestartSettings,
    vm: &ObservedVm,
    now_ms: u64,
) -> Verdict {
    let reason = vm
        .last_exit
        .as_ref()
        .map_or(ExitReason::Unknown, |e| e.reason);
    let what = describe_exit(vm);
    if reason == ExitReason::ImageLocked {
        // Another QEMU holds the disk: maybe this VM on a host that was fenced but is not
        // off. Starting again cannot succeed until that QEMU is gone, and must not.
        return Verdict::GiveUp {
            why: format!(
                "{what}; the VM may still run elsewhere, so it is not started again until a commit changes its spec"
            ),
        };
    }
    let watchdog_restarts =
        reason == ExitReason::Watchdog && vm.spec.health.watchdog == Some(WatchdogAction::Restart);
    match policy {
        RestartPolicy::Never if !watchdog_restarts => {
            return Verdict::Stay {
                why: format!("{what}; restart = \"never\" keeps it stopped"),
            }
        }
        RestartPolicy::OnFailure if !reason.is_failure() => {
            return Verdict::Stay {
                why: format!(
                    "{what}; restart = \"on-failure\" restarts only after a crash or panic"
                ),
            };
        }
        _ => {}
    }
    let window = settings.window.0.as_millis() as u64;
    let recent: Vec<u64> = vm
        .exits
        .iter()
        .copied()
        .filter(|t| now_ms.saturating_sub(*t) <= window)
        .collect();
    let count = u32::try_from(recent.len()).unwrap_or(u32::MAX).max(1);
    if count >= settings.max_failures {
        return Verdict::GiveUp {
            why: format!(
                "{count} unexpected exits within {} (last: {reason}); not restarting until a commit changes its spec",
                humantime::format_duration(settings.window.0)
            ),
        };
    }
    let delay = if count <= 1 {
        0
    } else {
        let base = settings.backoff.0.as_millis() as u64;
        let factor = 1u64 << (count - 2).min(32);
        base.saturating_mul(factor)
            .min(settings.backoff_max.0.as_millis() as u64)
    };
    let last = recent.last().copied().unwrap_or(now_ms);
    let due = last.saturating_add(delay);
    if now_ms >= due {
        Verdict::Restart {
            reason,
            attempt: count,
        }
    } else {
        Verdict::Wait {
            reason,
            until_ms: due,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use plasmavmc_specs::{HumanDuration, Power, RestartPolicy as P, VmSpec};

    use super::*;
    use crate::observe::RunState;
    use crate::qemu::exit::ExitRecord;

    fn settings() -> RestartSettings {
        RestartSettings {
            backoff: HumanDuration(Duration::from_secs(1)),
            backoff_max: HumanDuration(Duration::from_secs(4)),
            max_failures: 5,
            window: HumanDuration(Duration::from_secs(600)),
        }
    }

    fn exited(reason: Option<ExitReason>, exits: &[u64]) -> ObservedVm {
        ObservedVm {
            name: "a".into(),
            uuid: "u".into(),
            state: RunState::Exited,
            pid: None,
            power: Power::Running,
            revision: "r".into(),
            spec_hash: "h".into(),
            spec: VmSpec {
                name: Some("a".into()),
                ..toml::from_str("").expect("empty spec")
            },
            started_at: None,
            detail: None,
            paused: None,
            last_exit: reason.map(|reason| ExitRecord {
                reason,
                at_ms: *exits.last().unwrap_or(&0),
                pid: 1,
                status: None,
            }),
            exits: exits.to_vec(),
            restarts: 0,
            watchdog_resets: 0,
            guest_agent: None,
            liveness: None,
            readiness: None,
            incoming: false,
            postcopy: false,
            seed: None,
            file_digests: std::collections::BTreeMap::new(),
        }
    }

    const NOW: u64 = 1_000_000;

    #[test]
    fn the_transition_table() {
        let s = settings();
        let crash = Some(ExitReason::Crash);
        let off = Some(ExitReason::GuestPoweroff);
        let v = |p, r, e: &[u64]| verdict(p, &s, &exited(r, e), NOW);
        // First exit: immediate restart, for any reason, with always.
        assert!(matches!(
            v(P::Always, crash, &[NOW]),
            Verdict::Restart { attempt: 1, .. }
        ));
        assert!(matches!(v(P::Always, off, &[NOW]), Verdict::Restart { .. }));
        // on-failure: crashes and panics restart, power-offs stay stopped.
        assert!(matches!(
            v(P::OnFailure, crash, &[NOW]),
            Verdict::Restart { .. }
        ));
        assert!(matches!(
            v(P::OnFailure, Some(ExitReason::Panic), &[NOW]),
            Verdict::Restart { .. }
        ));
        assert!(
            matches!(v(P::OnFailure, off, &[NOW]), Verdict::Stay { ref why } if why.contains("powered itself off"))
        );
        assert!(matches!(
            v(P::OnFailure, Some(ExitReason::Stopped), &[NOW]),
            Verdict::Stay { .. }
        ));
        // A failed liveness probe is a failure: on-failure replaces it; never does not.
        let unhealthy = Some(ExitReason::Unhealthy);
        assert!(matches!(
            v(P::OnFailure, unhealthy, &[NOW]),
            Verdict::Restart { .. }
        ));
        assert!(matches!(
            v(P::Never, unhealthy, &[NOW]),
            Verdict::Stay { .. }
        ));
        // never: nothing restarts.
        assert!(
            matches!(v(P::Never, crash, &[NOW]), Verdict::Stay { ref why } if why.contains("never"))
        );
        // A disk locked by another QEMU: given up at once, whatever the policy.
        for policy in [P::Always, P::OnFailure, P::Never] {
            assert!(
                matches!(v(policy, Some(ExitReason::ImageLocked), &[NOW]), Verdict::GiveUp { ref why } if why.contains("image lock") && why.contains("may still run elsewhere")),
                "{policy:?}"
            );
        }
        // An exit nobody saw (host reboot) counts as a failure.
        assert!(matches!(
            v(P::OnFailure, None, &[]),
            Verdict::Restart {
                reason: ExitReason::Unknown,
                ..
            }
        ));
    }

    #[test]
    fn a_fired_watchdog_follows_its_action_and_the_policy() {
        let s = settings();
        let fired = |policy, action, exits: &[u64], now| {
            let mut vm = exited(Some(ExitReason::Watchdog), exits);
            vm.spec.health.watchdog = Some(action);
            verdict(policy, &s, &vm, now)
        };
        // poweroff: a failure, so always and on-failure restart it; never keeps it off.
        for policy in [P::Always, P::OnFailure] {
            assert!(matches!(
                fired(policy, WatchdogAction::Poweroff, &[NOW], NOW),
                Verdict::Restart {
                    reason: ExitReason::Watchdog,
                    attempt: 1
                }
            ));
        }
        assert!(
            matches!(fired(P::Never, WatchdogAction::Poweroff, &[NOW], NOW), Verdict::Stay { ref why } if why.contains("watchdog") && why.contains("never"))
        );
        // restart: replaced even under never, with the same backoff and give-up limit.
        for policy in [P::Always, P::OnFailure, P::Never] {
            assert!(matches!(
                fired(policy, WatchdogAction::Restart, &[NOW], NOW),
                Verdict::Restart { .. }
            ));
            assert!(matches!(
                fired(policy, WatchdogAction::Restart, &[NOW - 10, NOW], NOW),
                Verdict::Wait { until_ms, .. } if until_ms == NOW + 1000
            ));
            assert!(matches!(
                fired(policy, WatchdogAction::Restart, &[NOW; 5], NOW),
                Verdict::GiveUp { .. }
            ));
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_then_gives_up() {
        let s = settings();
        let v = |e: &[u64], now| verdict(P::Always, &s, &exited(Some(ExitReason::Crash), e), now);
        // Second exit: wait 1 s after it.
        assert_eq!(
            v(&[NOW - 5000, NOW], NOW),
            Verdict::Wait {
                reason: ExitReason::Crash,
                until_ms: NOW + 1000
            }
        );
        assert!(matches!(
            v(&[NOW - 5000, NOW], NOW + 1000),
            Verdict::Restart { attempt: 2, .. }
        ));
        // Third: 2 s; fourth: 4 s (the maximum).
        assert_eq!(
            v(&[NOW - 3, NOW - 2, NOW], NOW),
            Verdict::Wait {
                reason: ExitReason::Crash,
                until_ms: NOW + 2000
            }
        );
        assert_eq!(
            v(&[NOW - 4, NOW - 3, NOW - 2, NOW], NOW),
            Verdict::Wait {
                reason: ExitReason::Crash,
                until_ms: NOW + 4000
            }
        );
        // Fifth within the window: give up.
        assert!(
            matches!(v(&[NOW - 5, NOW - 4, NOW - 3, NOW - 2, NOW], NOW), Verdict::GiveUp { ref why } if why.contains("5 unexpected exits"))
        );
        // Old exits fall out of the window.
        assert!(matches!(
            v(&[NOW - 5, NOW - 4, NOW - 3, NOW - 2, NOW], NOW + 700_000),
            Verdict::Restart { attempt: 1, .. }
        ));
    }
}
