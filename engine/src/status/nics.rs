//! What status says of networks: each NIC of a VM (network, MAC, tap), and per host the
//! bridges it has and the declared networks it lacks.
//!
//! In: specs and an inventory. Out: plain records for the status files; nothing here
//! asks a host.

use std::collections::BTreeMap;

use plasmavmc_specs::{NetworkDef, VmSpec};
use serde::{Deserialize, Serialize};

use crate::qemu::net::tap_name;

/// One NIC of a VM, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicStatus {
    /// `user` or a declared network.
    pub network: String,
    /// Its MAC: given in the spec or derived from the VM's name and the NIC's index.
    pub mac: String,
    /// The tap on the host (NICs on bridged networks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
}

/// The NICs of VM `vm` with spec `spec`.
pub fn nics_of(vm: &str, spec: &VmSpec) -> Vec<NicStatus> {
    spec.nics
        .iter()
        .enumerate()
        .map(|(i, nic)| NicStatus {
            network: nic.network.as_str().to_owned(),
            mac: nic.mac_of(vm, i),
            tap: (!nic.network.is_user()).then(|| tap_name(vm, i)),
        })
        .collect()
}

/// The networks a host's spec lists whose bridge the host lacks, as `lan (no bridge
/// br-lan)`; a network no `[networks]` declares is named as such.
pub fn missing_networks(
    listed: &[String],
    declared: &BTreeMap<String, NetworkDef>,
    bridges: &[String],
) -> Vec<String> {
    listed
        .iter()
        .filter_map(|name| match declared.get(name) {
            None => Some(format!("{name} (not declared in plasmavmc.toml)")),
            Some(def) if !bridges.contains(&def.bridge) => {
                Some(format!("{name} (no bridge {})", def.bridge))
            }
            Some(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nics_show_network_mac_and_the_tap_of_bridged_ones() {
        let spec: VmSpec = toml::from_str(
            "[[nics]]\nnetwork = \"user\"\n[[nics]]\nnetwork = \"lan\"\nmac = \"52:54:00:00:00:01\"\n",
        )
        .expect("spec");
        let nics = nics_of("web", &spec);
        assert_eq!(
            nics,
            [
                NicStatus {
                    network: "user".into(),
                    mac: plasmavmc_specs::derived_mac("web", 0),
                    tap: None,
                },
                NicStatus {
                    network: "lan".into(),
                    mac: "52:54:00:00:00:01".into(),
                    tap: Some(tap_name("web", 1)),
                },
            ]
        );
    }

    #[test]
    fn a_host_misses_the_networks_whose_bridge_it_lacks() {
        let declared = BTreeMap::from([
            (
                "lan".to_owned(),
                NetworkDef {
                    bridge: "br-lan".into(),
                    vlan: None,
                },
            ),
            (
                "dmz".to_owned(),
                NetworkDef {
                    bridge: "br-dmz".into(),
                    vlan: Some(5),
                },
            ),
        ]);
        let listed = ["lan", "dmz", "odd"].map(str::to_owned);
        assert_eq!(
            missing_networks(&listed, &declared, &["br-lan".to_owned()]),
            [
                "dmz (no bridge br-dmz)",
                "odd (not declared in plasmavmc.toml)"
            ]
        );
    }
}
