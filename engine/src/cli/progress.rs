//! How `apply` shows actions that run at once: on a terminal, one line per long action
//! in flight (a move, a download), redrawn in place, with each action printed above
//! them as it ends; otherwise plain lines, one per report, each naming its VM.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::execute::{Outcome, Step};

/// See the module.
pub enum Progress {
    Plain,
    Terminal {
        lines: MultiProgress,
        /// The line of each VM whose long action reports progress.
        bars: Mutex<BTreeMap<String, ProgressBar>>,
    },
}

impl Progress {
    /// Redrawn lines when stderr is a terminal (and `TERM` is not `dumb`), plain lines
    /// otherwise.
    pub fn new() -> Self {
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        if std::io::stderr().is_terminal() && !dumb {
            Self::Terminal {
                lines: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
                bars: Mutex::default(),
            }
        } else {
            Self::Plain
        }
    }

    /// What `vm`'s long action is doing now.
    pub fn live(&self, vm: &str, what: &str) {
        match self {
            Self::Plain => eprintln!("  ..   {vm}: {what}"),
            Self::Terminal { lines, bars } => {
                let mut bars = bars
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let bar = bars.entry(vm.to_owned()).or_insert_with(|| {
                    let bar = lines.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template("  {spinner} {prefix}: {wide_msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.set_prefix(vm.to_owned());
                    bar.enable_steady_tick(Duration::from_millis(200));
                    bar
                });
                bar.set_message(what.to_owned());
            }
        }
    }

    /// An action ended: its line (stdout), above the lines still in flight.
    pub fn ended(&self, step: &Step) {
        let line = describe(step);
        match self {
            Self::Plain => println!("{line}"),
            Self::Terminal { lines, bars } => {
                let mut bars = bars
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(bar) = bars.remove(step.action.vm()) {
                    bar.finish_and_clear();
                    lines.remove(&bar);
                }
                lines.suspend(|| println!("{line}"));
            }
        }
    }
}

/// `  ok   start web (0.12s): running, pid 1234`, `  FAIL …`, `  skip …`.
fn describe(step: &Step) -> String {
    let a = &step.action;
    match &step.outcome {
        Outcome::Done { detail, took } => format!(
            "  ok   {} {} ({:.2}s): {detail}",
            a.op(),
            a.vm(),
            took.as_secs_f64()
        ),
        Outcome::Failed { error } => format!("  FAIL {} {}: {error}", a.op(), a.vm()),
        Outcome::Skipped { why } => format!("  skip {} {}: {why}", a.op(), a.vm()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Action;

    #[test]
    fn each_line_names_its_action_and_vm() {
        let step = |outcome| Step {
            action: Action::Start {
                vm: "web".to_owned(),
                host: "hv1".to_owned(),
                reason: String::new(),
            },
            outcome,
            at: String::new(),
        };
        let done = step(Outcome::Done {
            detail: "running, pid 7".to_owned(),
            took: Duration::from_millis(120),
        });
        assert_eq!(describe(&done), "  ok   start web (0.12s): running, pid 7");
        let failed = step(Outcome::Failed {
            error: "no room".to_owned(),
        });
        assert_eq!(describe(&failed), "  FAIL start web: no room");
    }
}
