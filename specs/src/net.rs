//! Networks, MACs and CPU models: the checks of one value, and the checks across files.
//!
//! In: the parsed specs of one commit (and their texts, to locate problems). Out:
//! [`Diagnostic`]s — a NIC on an undeclared network, a host listing one, two NICs with
//! one MAC anywhere in the repository, a bridge Linux would refuse, a VLAN out of range.
//! Checks of a single value (`mac_problem`, `cpu_model_problem`) are also used by
//! [`crate::vm::VmSpec::problems`]. No I/O: whether a bridge exists on a host is the
//! agent's to report and the planner's to weigh.

use std::collections::BTreeMap;

use crate::cluster::ClusterSpec;
use crate::diag::{Diagnostic, Seg};
use crate::load::{Desired, SourceFile};
use crate::name::name_problem;
use crate::vm::{Network, VmSpec};

/// Longest Linux interface name (`IFNAMSIZ` - 1).
pub const MAX_IFNAME: usize = 15;

/// The CPU model that means "the host's own CPU" (`-cpu host`).
pub const HOST_CPU: &str = "host";

/// Why `mac` is not a usable NIC address, or `None`: six hex octets `aa:bb:cc:dd:ee:ff`,
/// unicast (the first octet's low bit clear), not all zeros.
pub fn mac_problem(mac: &str) -> Option<String> {
    let octets: Vec<&str> = mac.split(':').collect();
    let hex = |o: &&str| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit());
    if octets.len() != 6 || !octets.iter().all(hex) {
        return Some(format!(
            "mac {mac:?} must be six hex octets like \"52:54:00:12:ab:cd\""
        ));
    }
    let bytes: Vec<u8> = octets
        .iter()
        .filter_map(|o| u8::from_str_radix(o, 16).ok())
        .collect();
    if bytes.iter().all(|b| *b == 0) {
        return Some(format!("mac {mac:?} is all zeros"));
    }
    if bytes[0] & 1 == 1 {
        return Some(format!(
            "mac {mac:?} is a multicast address (the first octet is odd); a NIC needs a unicast one"
        ));
    }
    None
}

/// Why `model` is not a plausible QEMU CPU model name (`x86-64-v2`, `Skylake-Server`,
/// `host`), or `None`. Whether a host can run it is the planner's question.
pub fn cpu_model_problem(model: &str) -> Option<String> {
    let ok = !model.is_empty()
        && model.len() <= 64
        && !model.starts_with('-')
        && model
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    (!ok).then(|| {
        format!(
            "cpu {model:?} is not a QEMU CPU model name (letters, digits, '.', '_', '-'; or \"host\")"
        )
    })
}

/// Why `bridge` is not a valid Linux interface name, or `None`.
pub fn bridge_problem(bridge: &str) -> Option<String> {
    if bridge.is_empty() || bridge.len() > MAX_IFNAME {
        return Some(format!(
            "bridge {bridge:?} must be 1 to {MAX_IFNAME} characters (a Linux interface name)"
        ));
    }
    if bridge == "." || bridge == ".." {
        return Some(format!("bridge {bridge:?} is not an interface name"));
    }
    if let Some(c) = bridge
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
    {
        return Some(format!(
            "bridge {bridge:?} contains {c:?}, which Linux interface names cannot hold"
        ));
    }
    None
}

/// Problems of the `[networks.NAME]` tables of `plasmavmc.toml` (`file`, `text`).
pub(crate) fn cluster_problems(
    file: &SourceFile,
    text: &str,
    spec: &ClusterSpec,
    diags: &mut Vec<Diagnostic>,
) {
    for (name, def) in &spec.networks {
        let at = |key: &'static str| [Seg::Key("networks"), Seg::Key(name), Seg::Key(key)];
        let mut bad = |key: &[Seg<'_>], msg: String| {
            diags.push(Diagnostic::at_key(&file.path, text, key, msg));
        };
        if name == Network::USER {
            bad(
                &[Seg::Key("networks"), Seg::Key(name)],
                "\"user\" is QEMU's user-mode network, which every VM may use; it cannot be declared".to_owned(),
            );
        } else if let Some(p) = name_problem(name) {
            bad(
                &[Seg::Key("networks"), Seg::Key(name)],
                format!("network {p}"),
            );
        }
        if let Some(p) = bridge_problem(&def.bridge) {
            bad(&at("bridge"), p);
        }
        if let Some(vlan) = def.vlan.filter(|v| !(1..=4094).contains(v)) {
            bad(
                &at("vlan"),
                format!("vlan = {vlan} must be between 1 and 4094"),
            );
        }
    }
}

/// Checks across files: every NIC's network and every host's `networks` are declared,
/// and no two NICs of the repository share a MAC (given or derived). A clash is
/// reported at the later NIC (by file path, then position), naming the earlier.
pub(crate) fn check_networks(
    desired: &Desired,
    vms: &[(&SourceFile, String, VmSpec)],
    texts: &BTreeMap<&str, String>,
    diags: &mut Vec<Diagnostic>,
) {
    let declared = &desired.cluster.networks;
    let known = || {
        if declared.is_empty() {
            "no networks are declared (add [networks.NAME] with a bridge to plasmavmc.toml)"
                .to_owned()
        } else {
            let names: Vec<&str> = declared.keys().map(String::as_str).collect();
            format!("declared networks: {}", names.join(", "))
        }
    };
    for host in desired.hosts.values() {
        let Some(path) = &host.file else { continue };
        let text = texts.get(path.as_str()).map_or("", String::as_str);
        for (i, net) in host.spec.networks.iter().enumerate() {
            if !declared.contains_key(net) {
                let msg = format!("unknown network {net:?}; {}", known());
                let key = [Seg::Key("networks"), Seg::Index(i)];
                diags.push(Diagnostic::at_key(path, text, &key, msg));
            }
        }
    }
    let mut macs: BTreeMap<String, (&str, usize)> = BTreeMap::new();
    // "Later" is by path, so the same commit is reported the same whatever the files' order.
    let mut by_path: Vec<&(&SourceFile, String, VmSpec)> = vms.iter().collect();
    by_path.sort_by(|a, b| a.0.path.cmp(&b.0.path));
    for (file, name, spec) in by_path {
        let text = texts.get(file.path.as_str()).map_or("", String::as_str);
        for (i, nic) in spec.nics.iter().enumerate() {
            if !nic.network.is_user() && !declared.contains_key(nic.network.as_str()) {
                let msg = format!(
                    "unknown network {:?}; \"user\" or a declared one: {}",
                    nic.network.as_str(),
                    known()
                );
                let key = [Seg::Key("nics"), Seg::Index(i), Seg::Key("network")];
                diags.push(Diagnostic::at_key(&file.path, text, &key, msg));
            }
            if nic.mac.as_deref().is_some_and(|m| mac_problem(m).is_some()) {
                continue; // reported on its own
            }
            let mac = nic.mac_of(name, i).to_ascii_lowercase();
            if let Some((other, j)) = macs.get(&mac) {
                let whose = if nic.mac.is_some() { "" } else { " (derived)" };
                let msg = format!(
                    "mac {mac}{whose} is already used by nics[{j}] of VM {other:?}; MACs must be unique in the repository"
                );
                let mut key = vec![Seg::Key("nics"), Seg::Index(i)];
                if nic.mac.is_some() {
                    key.push(Seg::Key("mac"));
                }
                diags.push(Diagnostic::at_key(&file.path, text, &key, msg));
            } else {
                macs.insert(mac, (name, i));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_six_unicast_octets_and_not_zero() {
        for ok in [
            "52:54:00:12:ab:cd",
            "02:00:00:00:00:01",
            "AA:BB:CC:DD:EE:FF",
        ] {
            assert_eq!(mac_problem(ok), None, "{ok}");
        }
        for (bad, says) in [
            ("52:54:00:12:ab", "six hex octets"),
            ("52:54:00:12:ab:cd:ef", "six hex octets"),
            ("52-54-00-12-ab-cd", "six hex octets"),
            ("52:54:00:12:ab:c", "six hex octets"),
            ("52:54:00:12:ab:zz", "six hex octets"),
            ("+2:54:00:12:ab:cd", "six hex octets"),
            ("", "six hex octets"),
            ("00:00:00:00:00:00", "all zeros"),
            ("01:00:5e:00:00:01", "multicast"),
            ("ff:ff:ff:ff:ff:ff", "multicast"),
        ] {
            let p = mac_problem(bad).unwrap_or_default();
            assert!(p.contains(says), "{bad:?}: {p:?}");
        }
    }

    #[test]
    fn derived_macs_pass_their_own_check() {
        for i in 0..4 {
            let mac = crate::vm::derived_mac("web", i);
            assert_eq!(mac_problem(&mac), None, "{mac}");
        }
    }

    #[test]
    fn bridges_are_linux_interface_names() {
        for ok in ["br0", "br-lan", "vmbr0.10", &"b".repeat(15)] {
            assert_eq!(bridge_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            &"b".repeat(16),
            "br/0",
            "br 0",
            "br:0",
            "br\t0",
            "..",
            ".",
        ] {
            assert!(bridge_problem(bad).is_some(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cpu_models_are_plausible_qemu_names() {
        for ok in [
            "host",
            "x86-64-v2",
            "Skylake-Server",
            "EPYC-v4",
            "qemu64",
            "max",
        ] {
            assert_eq!(cpu_model_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "Skylake Server",
            "host,+vmx",
            "-cpu",
            "a/b",
            &"x".repeat(65),
        ] {
            assert!(cpu_model_problem(bad).is_some(), "{bad:?} accepted");
        }
    }
}
