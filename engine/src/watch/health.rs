//! Host health as the daemon sees it, from each agent connection: how long since its
//! last frame (pongs included) and whether its channel closed.
//!
//! In: the connected hosts ([`Link`]s) and `[heartbeat]` (`interval`, `down_after`). Out:
//! each host's [`Health`], and the split the daemon observes with: the hosts to ask
//! for their inventory, and the suspect and down ones (never asked, with why).
//!
//! ```text
//!            a frame arrives (no reconnect)
//!        ┌──────────────────────────────────┐
//!        ▼                                  │
//!      ready ── silent ≥ 2 × interval ──> suspect ── silent ≥ down_after ──┐
//!        │                                                 or closed      ▼
//!        └──────────────── closed, or silent ≥ down_after ─────────────> down
//! ```
//! A suspect host is observed like an unreachable one (its VMs are unknown, nothing is
//! asked of it, nothing of it is started elsewhere) but it is not away: it stays
//! connected, is never fenced, and is ready again as soon as it answers. When
//! `2 × interval ≥ down_after` there is no suspect window: silence goes straight to down.

use std::collections::BTreeMap;
use std::time::Duration;

use super::fleet::Link;
use crate::observe::Suspect;
use crate::time::now_ms;

/// What one agent connection says about its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// It answered within two heartbeats.
    Ready,
    /// It missed heartbeats, for this long, but not for `down_after` yet.
    Suspect { silent: Duration },
    /// Its channel closed, or it sent nothing for `down_after`: drop it (it is away).
    Down,
}

/// Heartbeat settings the health of a connection is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub interval: Duration,
    pub down_after: Duration,
}

impl Limits {
    /// The health of a connection that `closed` (or not) and has been `silent` this long.
    pub fn judge(self, closed: bool, silent: Duration) -> Health {
        if closed || silent >= self.down_after {
            Health::Down
        } else if silent >= self.interval.saturating_mul(2) {
            Health::Suspect { silent }
        } else {
            Health::Ready
        }
    }

    /// The health of `host` now.
    pub fn of(self, host: &impl Link) -> Health {
        self.judge(host.is_closed(), host.silence())
    }
}

/// How the connected hosts stand right now.
#[derive(Debug)]
pub struct Triage<'a, L> {
    /// The ones to ask for their inventory.
    pub ready: Vec<&'a L>,
    /// The ones that missed heartbeats, with why (not asked).
    pub suspect: BTreeMap<String, Suspect>,
    /// The ones that went down since the daemon last dropped its down hosts, with why
    /// (not asked; their VMs are unknown like those of any host that does not answer).
    pub down: BTreeMap<String, String>,
}

/// Splits the connected hosts into ready, suspect and down ones.
pub fn triage<L: Link>(hosts: &BTreeMap<String, L>, limits: Limits) -> Triage<'_, L> {
    let mut out = Triage {
        ready: Vec::new(),
        suspect: BTreeMap::new(),
        down: BTreeMap::new(),
    };
    for (name, host) in hosts {
        match limits.of(host) {
            Health::Ready => out.ready.push(host),
            Health::Suspect { silent } => {
                out.suspect
                    .insert(name.clone(), describe(name, silent, limits));
            }
            Health::Down => {
                let why = if host.is_closed() {
                    format!("host {name} is unreachable: its agent channel closed")
                } else {
                    format!(
                        "host {name} is unreachable: its agent sent nothing for {:.1}s",
                        host.silence().as_secs_f64()
                    )
                };
                out.down.insert(name.clone(), why);
            }
        }
    }
    out
}

/// The names of the suspect hosts among `hosts`.
pub fn suspects<L: Link>(hosts: &BTreeMap<String, L>, limits: Limits) -> Vec<String> {
    hosts
        .iter()
        .filter(|(_, h)| matches!(limits.of(*h), Health::Suspect { .. }))
        .map(|(name, _)| name.clone())
        .collect()
}

fn describe(name: &str, silent: Duration, limits: Limits) -> Suspect {
    let silent_ms = u64::try_from(silent.as_millis()).unwrap_or(u64::MAX);
    Suspect {
        why: format!(
            "host {name} missed heartbeats: nothing heard for {:.1}s (down after {})",
            silent.as_secs_f64(),
            humantime::format_duration(limits.down_after)
        ),
        last_heard_ms: now_ms().saturating_sub(silent_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_phase_table() {
        // The defaults: a beat every second, down after 5 s.
        let l = Limits {
            interval: ms(1000),
            down_after: ms(5000),
        };
        let cases = [
            (false, 0, Health::Ready),
            (false, 1000, Health::Ready),
            (false, 1999, Health::Ready),
            (false, 2000, Health::Suspect { silent: ms(2000) }),
            (false, 4999, Health::Suspect { silent: ms(4999) }),
            (false, 5000, Health::Down),
            (false, 60_000, Health::Down),
            // A closed channel is down whatever the silence.
            (true, 0, Health::Down),
            (true, 3000, Health::Down),
        ];
        for (closed, silent, want) in cases {
            assert_eq!(
                l.judge(closed, ms(silent)),
                want,
                "closed {closed}, silent {silent} ms"
            );
        }
    }

    #[test]
    fn no_suspect_window_when_two_beats_reach_down_after() {
        for down_after in [400, 300] {
            let l = Limits {
                interval: ms(200),
                down_after: ms(down_after),
            };
            for silent in (0..1000).step_by(10) {
                assert!(
                    !matches!(l.judge(false, ms(silent)), Health::Suspect { .. }),
                    "down_after {down_after} ms, silent {silent} ms"
                );
            }
            assert_eq!(l.judge(false, ms(down_after)), Health::Down);
            assert_eq!(l.judge(false, ms(down_after - 1)), Health::Ready);
        }
    }

    #[test]
    fn the_test_settings_have_a_window_of_three_beats() {
        let l = Limits {
            interval: ms(200),
            down_after: ms(1000),
        };
        assert_eq!(l.judge(false, ms(399)), Health::Ready);
        assert!(matches!(l.judge(false, ms(400)), Health::Suspect { .. }));
        assert!(matches!(l.judge(false, ms(999)), Health::Suspect { .. }));
        assert_eq!(l.judge(false, ms(1000)), Health::Down);
    }

    #[test]
    fn a_suspect_says_how_long_it_has_been_silent() {
        let l = Limits {
            interval: ms(200),
            down_after: ms(1000),
        };
        let before = now_ms();
        let s = describe("hv1", ms(640), l);
        assert_eq!(
            s.why,
            "host hv1 missed heartbeats: nothing heard for 0.6s (down after 1s)"
        );
        assert!(s.last_heard_ms <= before && s.last_heard_ms + 2000 >= before);
    }
}
