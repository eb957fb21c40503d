//! A VM's NICs as a host wires them: the tap a bridged NIC gets, its bridge and VLAN.
//!
//! In: a [`VmInstance`] (its spec's NICs and the networks the engine resolved for them).
//! Out: names and plain data; nothing here touches the system (the local host creates
//! and removes the taps, [`super::args`] hands them to QEMU).
//!
//! Tap names are derived from the VM's name and the NIC's index only, so they are the
//! same on every host and across restarts, recoveries and moves: `pv` + 8 hex digits of
//! SHA-256 of the VM's name + `n` + the index (`pv1a2b3c4dn0`, at most 15 characters as
//! Linux wants for interface names). Two hosts on one machine (tests) keep them apart
//! with network namespaces.

use plasmavmc_specs::Nic;
use sha2::Digest as _;

use super::instance::VmInstance;

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// The prefix of every tap of `vm`: `pv` + 8 hex digits of SHA-256 of its name + `n`.
pub fn tap_prefix(vm: &str) -> String {
    let digest = sha2::Sha256::digest(vm.as_bytes());
    format!("pv{}n", crate::digest::hex(&digest[..4]))
}

/// The tap of NIC `index` of `vm` (see the module doc).
pub fn tap_name(vm: &str, index: usize) -> String {
    format!("{}{index}", tap_prefix(vm))
}

/// Whether `ifname` is a tap of `vm` (its prefix and an index), whatever its index.
pub fn is_tap_of(vm: &str, ifname: &str) -> bool {
    ifname
        .strip_prefix(&tap_prefix(vm))
        .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
}

/// A NIC on a bridged network, as the host wires it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgedNic {
    pub index: usize,
    pub network: String,
    pub tap: String,
    pub bridge: String,
    pub vlan: Option<u16>,
}

/// A bridged NIC whose network the instance does not carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NIC {index} is on network {network}, which this instance does not describe (no bridge known; an engine older than this agent?)")]
pub struct UnknownNetwork {
    pub index: usize,
    pub network: String,
}

impl VmInstance {
    /// The NICs on bridged networks (every NIC but `user` ones), with their taps.
    pub fn bridged_nics(&self) -> Result<Vec<BridgedNic>, UnknownNetwork> {
        self.spec
            .nics
            .iter()
            .enumerate()
            .filter(|(_, nic)| !nic.network.is_user())
            .map(|(index, nic)| self.bridged(index, nic))
            .collect()
    }

    fn bridged(&self, index: usize, nic: &Nic) -> Result<BridgedNic, UnknownNetwork> {
        let network = nic.network.as_str();
        let def = self.networks.get(network).ok_or_else(|| UnknownNetwork {
            index,
            network: network.to_owned(),
        })?;
        Ok(BridgedNic {
            index,
            network: network.to_owned(),
            tap: tap_name(&self.name, index),
            bridge: def.bridge.clone(),
            vlan: def.vlan,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_stable_short_and_per_vm() {
        let a = tap_name("web", 0);
        assert_eq!(a, tap_name("web", 0));
        assert_ne!(a, tap_name("web", 1));
        assert_ne!(a, tap_name("db", 0));
        assert!(a.starts_with("pv") && a.ends_with("n0"), "{a}");
        let longest = tap_name(&"a".repeat(63), 99);
        assert!(longest.len() <= IFNAME_MAX, "{longest}");
        assert!(is_tap_of("web", &tap_name("web", 12)));
        assert!(!is_tap_of("web", &tap_name("db", 0)));
        assert!(!is_tap_of("web", &tap_prefix("web")));
        assert!(!is_tap_of("web", &format!("{}x", tap_prefix("web"))));
    }

    #[test]
    fn an_instance_without_networks_reads_and_its_bridged_nics_say_what_is_missing() {
        // A record written before bridged networks: no `networks` table.
        let old = "name = \"web\"\nrevision = \"r\"\nspec_hash = \"h\"\n[spec]\n[[spec.nics]]\nnetwork = \"user\"\n";
        let mut vm: VmInstance = toml::from_str(old).expect("an old record reads");
        assert!(vm.networks.is_empty());
        assert_eq!(vm.bridged_nics(), Ok(vec![]));
        assert!(!toml::to_string(&vm).expect("toml").contains("networks"));
        vm.spec.nics.push(Nic {
            network: plasmavmc_specs::Network("lan".into()),
            mac: None,
            forward: vec![],
        });
        assert_eq!(
            vm.bridged_nics(),
            Err(UnknownNetwork {
                index: 1,
                network: "lan".into()
            })
        );
        vm.networks.insert(
            "lan".into(),
            plasmavmc_specs::NetworkDef {
                bridge: "br-lan".into(),
                vlan: Some(7),
            },
        );
        assert_eq!(
            vm.bridged_nics(),
            Ok(vec![BridgedNic {
                index: 1,
                network: "lan".into(),
                tap: tap_name("web", 1),
                bridge: "br-lan".into(),
                vlan: Some(7),
            }])
        );
    }
}
