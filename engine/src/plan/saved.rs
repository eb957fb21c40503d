//! A plan saved with `plan --out FILE`, applied later with `apply FILE`.
//!
//! It records the commit it was made from and a fingerprint of the observed state.
//! When the hosts changed since (a VM crashed, someone else applied), the plan is
//! stale and refused, naming what changed; when they did not, the same inputs give
//! the same plan again, so applying it is applying what the operator read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Plan;
use crate::observe::Observed;

/// Version of the saved-plan format.
pub const FORMAT: u32 = 1;

/// A plan file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPlan {
    pub format: u32,
    /// Full commit id the specs were read from.
    pub revision: String,
    /// Spec folder, relative to the repository top.
    pub spec_dir: String,
    pub created_at: String,
    /// Hash of `observed`.
    pub fingerprint: String,
    /// One line per VM instance: what the plan was computed against.
    pub observed: BTreeMap<String, String>,
    pub plan: Plan,
}

/// Why a saved plan cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StalePlan {
    #[error("plan file format {found} is not supported (this engine reads format {FORMAT})")]
    Format { found: u32 },
    #[error("the plan was made for spec folder {planned:?}, not {current:?}")]
    Folder { planned: String, current: String },
    #[error("the hosts changed since the plan was made; run plan again:\n{}", changes.join("\n"))]
    Observed { changes: Vec<String> },
}

impl SavedPlan {
    pub fn new(revision: &str, spec_dir: &str, observed: &Observed, plan: Plan) -> Self {
        Self {
            format: FORMAT,
            revision: revision.to_owned(),
            spec_dir: spec_dir.to_owned(),
            created_at: crate::time::now(),
            fingerprint: observed.fingerprint(),
            observed: observed.summary(),
            plan,
        }
    }

    /// Checks that the plan still applies to `observed` in `spec_dir`.
    pub fn check(&self, spec_dir: &str, observed: &Observed) -> Result<(), StalePlan> {
        if self.format != FORMAT {
            return Err(StalePlan::Format { found: self.format });
        }
        if self.spec_dir != spec_dir {
            return Err(StalePlan::Folder {
                planned: self.spec_dir.clone(),
                current: spec_dir.to_owned(),
            });
        }
        if observed.fingerprint() == self.fingerprint {
            return Ok(());
        }
        let now = observed.summary();
        let mut changes = Vec::new();
        for (vm, was) in &self.observed {
            match now.get(vm) {
                None => changes.push(format!("  {vm}: was {was}, now gone")),
                Some(is) if is != was => changes.push(format!("  {vm}: was {was}, now {is}")),
                Some(_) => {}
            }
        }
        for (vm, is) in now
            .iter()
            .filter(|(vm, _)| !self.observed.contains_key(*vm))
        {
            changes.push(format!("  {vm}: new since the plan, now {is}"));
        }
        Err(StalePlan::Observed { changes })
    }
}
