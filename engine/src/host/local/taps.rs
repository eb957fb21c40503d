//! The taps of a VM's bridged NICs: made and put on their bridges before its QEMU
//! starts, removed once no QEMU of it is left.
//!
//! In: an instance ([`crate::qemu::net`] names its taps and bridges). Out: network
//! devices on this machine, through iproute2's `ip` and `bridge` commands (argv, never a
//! shell). QEMU only opens a tap (`script=no`), so its seccomp sandbox can deny spawning.
//!
//! ```text
//!   (none) ──make──> on the bridge, up ──QEMU opens it──> in use (carrier on)
//!      ^                   │                                   │ QEMU exits
//!      └────release────────┴───────────────────────────────────┘
//! ```
//! - `make` (a start, a migration target) reuses a tap left behind (an agent killed
//!   between QEMU's exit and the release) when nothing holds it and its owner is right,
//!   else makes it afresh; a tap some process holds, or an interface of the tap's name
//!   that is no tap, is an error, never taken over.
//! - `release` (a stop, an exit the monitor sees, a discard, a delete, an inventory that
//!   finds a stopped VM's taps) removes every tap of the VM, only when no QEMU of it
//!   runs in its instance folder and the tap is not held.
//! - Both run under the VM's network lock ([`Monitor::net_lock`]), and a start holds it
//!   from `make` until its QEMU answers QMP (QEMU opens its taps before that), so a
//!   release never removes a tap between its making and its QEMU opening it.
//!
//! [`Monitor::net_lock`]: crate::host::monitor::Monitor::net_lock

use std::fs;
use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use crate::qemu::instance::{InstanceDir, VmInstance};
use crate::qemu::net::{is_tap_of, BridgedNic, UnknownNetwork};
use crate::qemu::process;

/// Where Linux lists network interfaces.
const SYS_NET: &str = "/sys/class/net";

/// Why a tap cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(transparent)]
    UnknownNetwork(#[from] UnknownNetwork),
    #[error("bridge {bridge} does not exist on this host (network {network})")]
    NoBridge { network: String, bridge: String },
    #[error("bridge {bridge} does not filter VLANs (vlan_filtering is off), so network {network} cannot put NIC {index} on VLAN {vlan}")]
    NoVlanFiltering {
        network: String,
        bridge: String,
        index: usize,
        vlan: u16,
    },
    #[error("tap {tap} is held by another process (another QEMU of this VM on this machine?); not taken over")]
    InUse { tap: String },
    #[error("interface {tap} exists and is not a tap; not touched")]
    NotTap { tap: String },
    #[error("no user {user} on this host (for [qemu] runas)")]
    NoUser { user: String },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}` (is iproute2 installed?)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

fn sys(ifname: &str) -> PathBuf {
    Path::new(SYS_NET).join(ifname)
}

/// Whether `name` is a Linux bridge on this machine.
pub fn is_bridge(name: &str) -> bool {
    sys(name).join("bridge").is_dir()
}

/// The Linux bridges of this machine, sorted.
pub fn bridges() -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(SYS_NET)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| is_bridge(name))
        .collect();
    out.sort();
    out
}

fn is_tap(name: &str) -> bool {
    sys(name).join("tun_flags").exists()
}

/// A tap some process holds open: the kernel turns its carrier on while one is attached
/// (`carrier` cannot be read while the tap is down: then it counts as not held).
fn is_held(tap: &str) -> bool {
    fs::read_to_string(sys(tap).join("carrier")).is_ok_and(|c| c.trim() == "1")
}

/// The uid that owns `tap` (`-1`: anyone with `CAP_NET_ADMIN`).
fn owner(tap: &str) -> Option<i64> {
    fs::read_to_string(sys(tap).join("owner"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn read_sys(path: PathBuf) -> Option<String> {
    Some(fs::read_to_string(path).ok()?.trim().to_owned())
}

/// The taps of `vm` that exist on this machine.
pub fn taps_of(vm: &str) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(SYS_NET)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| is_tap_of(vm, name) && is_tap(name))
        .collect();
    out.sort();
    out
}

async fn run(program: &str, args: &[&str]) -> Result<(), TapError> {
    let command = format!("{program} {}", args.join(" "));
    debug!(%command, "network");
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| TapError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TapError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Makes every tap of `vm`'s bridged NICs and puts it on its bridge, up; `runas` (the
/// user QEMU drops to) owns it, so QEMU can open it after dropping privileges. Call with
/// the VM's network lock held and no QEMU of the VM running.
pub async fn make(vm: &VmInstance) -> Result<Vec<BridgedNic>, TapError> {
    let nics = vm.bridged_nics()?;
    // Every bridge first: a start that cannot wire every NIC wires none.
    for nic in &nics {
        check_bridge(nic)?;
    }
    let uid = match &vm.spec.qemu.runas {
        Some(user) => Some(uid_of(user)?),
        None => None,
    };
    for nic in &nics {
        make_one(nic, vm.spec.qemu.runas.as_deref(), uid).await?;
    }
    Ok(nics)
}

fn check_bridge(nic: &BridgedNic) -> Result<(), TapError> {
    if !is_bridge(&nic.bridge) {
        return Err(TapError::NoBridge {
            network: nic.network.clone(),
            bridge: nic.bridge.clone(),
        });
    }
    if let Some(vlan) = nic.vlan {
        let filtering = read_sys(sys(&nic.bridge).join("bridge/vlan_filtering"));
        if filtering.as_deref() != Some("1") {
            return Err(TapError::NoVlanFiltering {
                network: nic.network.clone(),
                bridge: nic.bridge.clone(),
                index: nic.index,
                vlan,
            });
        }
    }
    Ok(())
}

fn uid_of(user: &str) -> Result<u32, TapError> {
    match nix::unistd::User::from_name(user) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        _ => Err(TapError::NoUser {
            user: user.to_owned(),
        }),
    }
}

async fn make_one(nic: &BridgedNic, user: Option<&str>, uid: Option<u32>) -> Result<(), TapError> {
    let tap = nic.tap.as_str();
    if sys(tap).exists() {
        if is_held(tap) {
            return Err(TapError::InUse {
                tap: tap.to_owned(),
            });
        }
        if !is_tap(tap) {
            return Err(TapError::NotTap {
                tap: tap.to_owned(),
            });
        }
        let wanted = uid.map_or(-1, i64::from);
        if owner(tap) == Some(wanted) {
            debug!(tap, "reusing the tap left behind");
        } else {
            info!(
                tap,
                "replacing the tap left behind: its owner is not the one wanted"
            );
            run("ip", &["link", "del", "dev", tap]).await?;
        }
    }
    if !sys(tap).exists() {
        let mut args = vec!["tuntap", "add", "dev", tap, "mode", "tap"];
        if let Some(user) = user {
            args.extend(["user", user]);
        }
        run("ip", &args).await?;
    }
    run(
        "ip",
        &["link", "set", "dev", tap, "master", &nic.bridge, "up"],
    )
    .await?;
    if let Some(vlan) = nic.vlan {
        let vid = vlan.to_string();
        run(
            "bridge",
            &["vlan", "add", "dev", tap, "vid", &vid, "pvid", "untagged"],
        )
        .await?;
        // The bridge gave the new port its default VLAN too (untagged): the VM would see
        // that VLAN's traffic as well. Only the tagged network's VLAN stays.
        let default = read_sys(sys(&nic.bridge).join("bridge/default_pvid"));
        if let Some(default) = default.filter(|d| d != "0" && *d != vid) {
            let _ = run("bridge", &["vlan", "del", "dev", tap, "vid", &default]).await;
        }
    }
    info!(tap, bridge = %nic.bridge, vlan = ?nic.vlan, nic = nic.index, "tap on its bridge");
    Ok(())
}

/// Removes every tap of `vm` when no QEMU of it runs in `dir` (any instance: a
/// migration's target has a new uuid) nor as `uuid`, leaving taps some process holds.
/// Call with the VM's network lock held. Errors are logged: a tap left behind is reused
/// by the next start or removed by the next release.
pub async fn release(vm: &str, dir: &InstanceDir, uuid: Option<&str>) {
    let taps = taps_of(vm);
    if taps.is_empty() {
        return;
    }
    let in_folder = dir
        .dir
        .canonicalize()
        .map(|d| process::qemus_in(&d))
        .unwrap_or_default();
    let by_uuid = uuid.map(process::find_by_uuid).unwrap_or_default();
    if let Some(pid) = in_folder.first().map(|p| p.0).or(by_uuid.first().copied()) {
        debug!(vm, pid, "a QEMU of this VM runs: its taps stay");
        return;
    }
    for tap in taps {
        if is_held(&tap) {
            warn!(
                vm,
                tap, "tap held by some process though no QEMU of this VM runs here; left alone"
            );
            continue;
        }
        match run("ip", &["link", "del", "dev", &tap]).await {
            Ok(()) => info!(vm, tap, "tap removed"),
            Err(e) if !sys(&tap).exists() => debug!(vm, tap, error = %e, "tap already gone"),
            Err(e) => warn!(vm, tap, error = %e, "cannot remove the tap"),
        }
    }
}

/// Against real devices, in a network namespace of the caller's making (never the
/// machine's own): `ip netns add t && PLASMAVMC_NETNS_TEST=1 ip netns exec t cargo test
/// -p plasmavmc --lib taps -- --ignored`. Needs root and iproute2.
#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this process runs in a named network namespace (`ip netns exec`).
    fn in_scratch_namespace() -> bool {
        std::env::var_os("PLASMAVMC_NETNS_TEST").is_some()
            && std::process::Command::new("ip")
                .args(["netns", "identify"])
                .output()
                .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
    }

    fn vm(bridge: &str) -> VmInstance {
        let spec: plasmavmc_specs::VmSpec =
            toml::from_str("[[nics]]\nnetwork = \"lan\"\n").expect("spec");
        VmInstance {
            name: "tapvm".into(),
            revision: "r".into(),
            spec_hash: "h".into(),
            spec,
            files: crate::qemu::instance::ResolvedFiles::default(),
            shared_storage: None,
            networks: std::collections::BTreeMap::from([(
                "lan".to_owned(),
                plasmavmc_specs::NetworkDef {
                    bridge: bridge.into(),
                    vlan: None,
                },
            )]),
        }
    }

    #[tokio::test]
    #[ignore = "needs root and a scratch network namespace (see the module doc)"]
    async fn taps_are_made_on_the_bridge_reused_and_released() {
        if !in_scratch_namespace() {
            eprintln!("skipped: not in a scratch network namespace");
            return;
        }
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .status()
                .expect("ip runs")
        };
        // Leftovers of an earlier run that failed half-way.
        ip(&["link", "del", "br-taptest"]);
        ip(&["link", "add", "br-taptest", "type", "bridge"]);
        ip(&["link", "set", "br-taptest", "up"]);
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = InstanceDir::new(tmp.path(), "tapvm");
        let tap = crate::qemu::net::tap_name("tapvm", 0);

        let missing = make(&vm("br-none")).await.expect_err("no bridge");
        assert_eq!(
            missing.to_string(),
            "bridge br-none does not exist on this host (network lan)"
        );
        make(&vm("br-taptest")).await.expect("made");
        let master = fs::read_link(sys(&tap).join("master")).expect("on a bridge");
        assert!(master.ends_with("br-taptest"), "{}", master.display());
        assert_eq!(taps_of("tapvm"), std::slice::from_ref(&tap));
        // A tap left behind is reused.
        make(&vm("br-taptest")).await.expect("reused");
        release("tapvm", &dir, None).await;
        assert!(taps_of("tapvm").is_empty());
        assert!(!sys(&tap).exists());
        // An interface of the tap's name that is no tap is never taken over.
        assert!(ip(&[
            "link",
            "add",
            &tap,
            "type",
            "veth",
            "peer",
            "name",
            "pvtaptestpeer"
        ])
        .success());
        let not_tap = make(&vm("br-taptest")).await.expect_err("not a tap");
        assert!(matches!(not_tap, TapError::NotTap { .. }), "{not_tap}");
        ip(&["link", "del", &tap]);
        ip(&["link", "del", "br-taptest"]);
    }
}
