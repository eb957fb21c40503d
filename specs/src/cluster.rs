//! Cluster settings: the optional `plasmavmc.toml` at the top of the spec folder.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Settings that apply to the whole repository. Every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Timeouts for VM operations.
    #[serde(default)]
    pub timeouts: Timeouts,
}

/// Timeouts for VM operations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// How long a graceful stop (ACPI power-down) may take before QEMU is told to quit.
    #[serde(default = "default_stop")]
    pub stop: HumanDuration,
    /// How long QEMU may take from spawn until its QMP socket answers.
    #[serde(default = "default_qmp_ready")]
    pub qmp_ready: HumanDuration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            stop: default_stop(),
            qmp_ready: default_qmp_ready(),
        }
    }
}

fn default_stop() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn default_qmp_ready() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// A duration written for humans: `"30s"`, `"500ms"`, `"2m 30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[schemars(
    with = "String",
    description = "A duration such as \"30s\", \"500ms\" or \"2m\"."
)]
pub struct HumanDuration(pub Duration);

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {text:?} ({e}); write e.g. \"30s\" or \"500ms\""
                ))
            })
    }
}
