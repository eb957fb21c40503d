//! The nemesis's schedule: which fault strikes when, drawn from a seed and nothing else.
//!
//! In: a seed and how long the soak runs. Out: a list of steps, each with the pause
//! before it. The generator keeps a model of the world it breaks (which host is down,
//! which is in maintenance, which VM is pinned) so the schedule stays recoverable: at
//! most one host away at a time, every frozen or powered-off host brought back (or
//! fenced) before the burst ends, a heal (every VM running again) between bursts.
//! It never reads the clock or the system: the same seed gives the same schedule, so a
//! failing run replays; only the engine's own timing varies between replays.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::drill::sandbox::HOSTS;

/// The VMs of the soak: `(name, disk storage, ha)`.
pub const VMS: [(&str, Option<&str>, bool); 7] = [
    ("n1", None, true),
    ("n2", None, false),
    ("l1", Some("local"), false),
    ("l2", Some("local"), true),
    ("s1", Some("shared"), true),
    ("s2", Some("shared"), true),
    ("s3", Some("shared"), false),
];

/// The host without a fence command: the operator fences it (`fence confirm`).
pub const UNFENCED: &str = "hv3";

/// One thing the nemesis does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Step {
    /// kill -9 of the VM's QEMU.
    KillQemu { vm: &'static str },
    /// kill -9 of the host's agent.
    KillAgent { host: &'static str },
    /// SIGSTOP of the host's agent (a partition: its QEMUs run on).
    Freeze { host: &'static str },
    /// SIGCONT of the frozen agent.
    Thaw { host: &'static str },
    /// The host loses power: its agent frozen first (so no exit is reported), then
    /// every process of it killed and no agent may start there.
    PowerOff { host: &'static str },
    /// `plasmavmc fence confirm HOST`, as the operator after a power-off.
    FenceConfirm { host: &'static str },
    /// Power back on: the host may rejoin.
    PowerOn { host: &'static str },
    /// kill -9 of the daemon, then a new one.
    RestartDaemon,
    /// Commit `host = HOST` for the VM.
    Pin {
        vm: &'static str,
        host: &'static str,
    },
    /// Commit the VM without `host`.
    Unpin { vm: &'static str },
    /// Commit a new `memory_mb` (a restart).
    Memory { vm: &'static str, mb: u64 },
    /// Commit the host `state = "maintenance"` (on) or active again.
    Maintenance { host: &'static str, on: bool },
    /// Wait until every VM runs again, once each.
    Heal,
}

impl Step {
    /// The kind, for counting faults.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::KillQemu { .. } => "kill-qemu",
            Step::KillAgent { .. } => "kill-agent",
            Step::Freeze { .. } => "freeze",
            Step::Thaw { .. } => "thaw",
            Step::PowerOff { .. } => "power-off",
            Step::FenceConfirm { .. } => "fence-confirm",
            Step::PowerOn { .. } => "power-on",
            Step::RestartDaemon => "restart-daemon",
            Step::Pin { .. } => "commit-pin",
            Step::Unpin { .. } => "commit-unpin",
            Step::Memory { .. } => "commit-memory",
            Step::Maintenance { .. } => "commit-maintenance",
            Step::Heal => "heal",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::KillQemu { vm } => write!(f, "kill -9 {vm}'s QEMU"),
            Step::KillAgent { host } => write!(f, "kill -9 {host}'s agent"),
            Step::Freeze { host } => write!(f, "freeze {host}'s agent (SIGSTOP)"),
            Step::Thaw { host } => write!(f, "thaw {host}'s agent (SIGCONT)"),
            Step::PowerOff { host } => write!(f, "power {host} off"),
            Step::FenceConfirm { host } => write!(f, "plasmavmc fence confirm {host}"),
            Step::PowerOn { host } => write!(f, "power {host} on"),
            Step::RestartDaemon => write!(f, "kill -9 the daemon, start a new one"),
            Step::Pin { vm, host } => write!(f, "commit {vm} host = {host:?}"),
            Step::Unpin { vm } => write!(f, "commit {vm} unpinned"),
            Step::Memory { vm, mb } => write!(f, "commit {vm} memory_mb = {mb}"),
            Step::Maintenance { host, on: true } => write!(f, "commit {host} in maintenance"),
            Step::Maintenance { host, on: false } => write!(f, "commit {host} active"),
            Step::Heal => write!(f, "heal: wait for every VM to run again"),
        }
    }
}

/// A step and the pause before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub after: Duration,
    pub step: Step,
}

/// splitmix64: small, fast, and the same on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.range(0, items.len() as u64 - 1) as usize]
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

/// A host that is away, in the generator's model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Away {
    Frozen,
    Off { confirmed: bool },
}

/// What the generator knows of the world it breaks.
#[derive(Debug, Default)]
struct Model {
    away: Option<(&'static str, Away)>,
    maintenance: Option<&'static str>,
    pins: BTreeMap<&'static str, &'static str>,
}

impl Model {
    /// Hosts a VM may be pinned to: not away, not in maintenance.
    fn usable(&self) -> Vec<&'static str> {
        HOSTS
            .iter()
            .copied()
            .filter(|h| self.away.is_none_or(|(a, _)| a != *h) && self.maintenance != Some(*h))
            .collect()
    }

    /// The candidate steps now, with weights.
    fn candidates(&self, rng: &mut Rng) -> Vec<(u64, Step)> {
        let vm = rng.pick(&VMS).0;
        let usable = self.usable();
        let mut out = vec![
            (5, Step::KillQemu { vm }),
            (1, Step::RestartDaemon),
            (
                2,
                Step::Memory {
                    vm,
                    mb: rng.pick(&[96, 112, 128]),
                },
            ),
        ];
        if !usable.is_empty() {
            out.push((
                2,
                Step::KillAgent {
                    host: rng.pick(&usable),
                },
            ));
            out.push((
                2,
                Step::Pin {
                    vm,
                    host: rng.pick(&usable),
                },
            ));
        }
        if let Some((&pinned, _)) = self.pins.iter().next() {
            out.push((1, Step::Unpin { vm: pinned }));
        }
        match (self.away, self.maintenance) {
            (None, None) => {
                let host = rng.pick(&HOSTS);
                out.push((3, Step::Freeze { host }));
                out.push((2, Step::PowerOff { host }));
                out.push((1, Step::Maintenance { host, on: true }));
            }
            (None, Some(host)) => out.push((2, Step::Maintenance { host, on: false })),
            (Some((host, Away::Frozen)), _) => {
                out.push((2, Step::Thaw { host }));
                out.push((1, Step::PowerOff { host }));
            }
            (Some((host, Away::Off { confirmed })), _) => {
                if !confirmed && host == UNFENCED {
                    out.push((3, Step::FenceConfirm { host }));
                }
                out.push((1, Step::PowerOn { host }));
            }
        }
        out
    }

    fn apply(&mut self, step: &Step) {
        match *step {
            Step::Freeze { host } => self.away = Some((host, Away::Frozen)),
            Step::PowerOff { host } => self.away = Some((host, Away::Off { confirmed: false })),
            Step::FenceConfirm { host } => self.away = Some((host, Away::Off { confirmed: true })),
            Step::Thaw { .. } | Step::PowerOn { .. } => self.away = None,
            Step::Pin { vm, host } => {
                self.pins.insert(vm, host);
            }
            Step::Unpin { vm } => {
                self.pins.remove(vm);
            }
            Step::Maintenance { host, on } => {
                self.maintenance = on.then_some(host);
                // The nemesis unpins the VMs pinned there in the same commit.
                self.pins.retain(|_, h| *h != host);
            }
            _ => {}
        }
    }

    /// The steps that bring the world back: the away host returned, maintenance over.
    fn resolve(&self, rng: &mut Rng) -> Vec<Step> {
        let mut out = Vec::new();
        match self.away {
            Some((host, Away::Frozen)) if rng.range(0, 2) > 0 => out.push(Step::Thaw { host }),
            Some((host, Away::Frozen)) => {
                out.push(Step::PowerOff { host });
                if host == UNFENCED {
                    out.push(Step::FenceConfirm { host });
                }
                out.push(Step::PowerOn { host });
            }
            Some((host, Away::Off { confirmed })) => {
                if !confirmed && host == UNFENCED && rng.range(0, 1) == 0 {
                    out.push(Step::FenceConfirm { host });
                }
                out.push(Step::PowerOn { host });
            }
            None => {}
        }
        if let Some(host) = self.maintenance {
            out.push(Step::Maintenance { host, on: false });
        }
        out
    }
}

/// The schedule for a soak of `duration` (a little longer: the run stops at its
/// deadline, bringing the world back first).
pub fn generate(seed: u64, duration: Duration) -> Vec<Planned> {
    let mut rng = Rng::new(seed);
    let mut model = Model::default();
    let mut out = Vec::new();
    let mut planned = Duration::ZERO;
    // Pauses only; heals and the engine's recoveries make the real run longer.
    while planned < duration {
        for _ in 0..rng.range(3, 7) {
            let candidates = model.candidates(&mut rng);
            let total: u64 = candidates.iter().map(|(w, _)| w).sum();
            let mut roll = rng.range(0, total - 1);
            let step = candidates
                .into_iter()
                .find_map(|(w, s)| {
                    if roll < w {
                        Some(s)
                    } else {
                        roll -= w;
                        None
                    }
                })
                .expect("a weighted pick");
            model.apply(&step);
            let after = rng.millis(200, 2500);
            planned += after;
            out.push(Planned { after, step });
        }
        for step in model.resolve(&mut rng) {
            model.apply(&step);
            let after = rng.millis(300, 2000);
            planned += after;
            out.push(Planned { after, step });
        }
        let after = rng.millis(200, 1000);
        planned += after;
        out.push(Planned {
            after,
            step: Step::Heal,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let a = generate(7, Duration::from_secs(600));
        assert_eq!(a, generate(7, Duration::from_secs(600)));
        assert_ne!(a, generate(8, Duration::from_secs(600)));
        let planned: Duration = a.iter().map(|p| p.after).sum();
        assert!(planned >= Duration::from_secs(600));
    }

    #[test]
    fn at_most_one_host_is_away_and_every_burst_ends_with_all_back() {
        for seed in 0..200 {
            let mut model = Model::default();
            for p in generate(seed, Duration::from_secs(300)) {
                match p.step {
                    Step::Freeze { .. }
                    | Step::PowerOff { .. }
                    | Step::Maintenance { on: true, .. } => {
                        if let Step::PowerOff { host } = p.step {
                            // Only the frozen host escalates to a power-off.
                            assert!(model
                                .away
                                .is_none_or(|(h, a)| h == host && a == Away::Frozen));
                        } else {
                            assert!(model.away.is_none() && model.maintenance.is_none());
                        }
                    }
                    Step::Pin { host, .. } => assert!(model.usable().contains(&host)),
                    Step::Heal => assert!(
                        model.away.is_none() && model.maintenance.is_none(),
                        "seed {seed}: heal with a host away"
                    ),
                    _ => {}
                }
                model.apply(&p.step);
            }
        }
    }

    #[test]
    fn every_kind_of_fault_is_drawn() {
        let kinds: std::collections::BTreeSet<&str> = generate(1, Duration::from_secs(1800))
            .iter()
            .map(|p| p.step.kind())
            .collect();
        assert_eq!(kinds.len(), 13, "{kinds:?}");
    }
}
