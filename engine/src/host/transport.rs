//! How the engine reaches each host's agent: the argv of the transport.
//!
//! `address = "local"`: this very binary as a child process. `ssh://user@host[:port]`:
//! the system `ssh` in batch mode (the operator's keys and `known_hosts`, or the host
//! spec's `known_hosts` and `identity_file`; strict host key checking, no agent
//! forwarding) running `plasmavmc agent` there. `exec = [..]`: the operator's own argv,
//! run as given (never through a shell).

use std::collections::BTreeMap;

use plasmavmc_specs::{Desired, HostEntry};
use tracing::warn;

use super::{AgentHost, ConnectOptions, HostError};
use crate::records::StateDir;

/// Where a remote host keeps its instances unless its spec says `root`.
pub const DEFAULT_REMOTE_ROOT: &str = "/var/lib/plasmavmc";

/// The argv that starts `host`'s agent.
pub fn agent_argv(host: &HostEntry, state: &StateDir) -> Result<Vec<String>, HostError> {
    let spec = &host.spec;
    if let Some(exec) = &spec.exec {
        return Ok(exec.clone());
    }
    let address = spec.address.as_deref().unwrap_or("local");
    if address == "local" {
        let exe = std::env::current_exe().map_err(|e| HostError::Unreachable {
            host: host.name.clone(),
            reason: format!("cannot find this program: {e}"),
        })?;
        let root = spec
            .root
            .clone()
            .unwrap_or_else(|| state.host_root(&host.name).to_string_lossy().into_owned());
        return Ok(vec![
            exe.to_string_lossy().into_owned(),
            "agent".into(),
            "--stdio".into(),
            "--root".into(),
            root,
        ]);
    }
    let target = address
        .strip_prefix("ssh://")
        .ok_or_else(|| HostError::Unreachable {
            host: host.name.clone(),
            reason: format!("unsupported address {address:?}"),
        })?;
    let (dest, port) = match target.rsplit_once(':') {
        Some((dest, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            (dest, Some(port.to_owned()))
        }
        _ => (target, None),
    };
    // `user@[::1]` → `user@::1`: ssh takes IPv6 addresses bare.
    let dest = dest.replace(['[', ']'], "");
    let mut argv: Vec<String> = [
        "ssh",
        "-T",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "ForwardAgent=no",
        "-o",
        "ServerAliveInterval=5",
    ]
    .map(String::from)
    .to_vec();
    if let Some(port) = port {
        argv.extend(["-p".to_owned(), port]);
    }
    // Absolute paths, checked on disk when the commit was loaded (`source::files`).
    if let Some(known_hosts) = &spec.known_hosts {
        argv.extend(["-o".to_owned(), format!("UserKnownHostsFile={known_hosts}")]);
    }
    if let Some(identity) = &spec.identity_file {
        argv.extend([
            "-i".to_owned(),
            identity.clone(),
            "-o".to_owned(),
            "IdentitiesOnly=yes".to_owned(),
        ]);
    }
    let root = spec
        .root
        .clone()
        .unwrap_or_else(|| DEFAULT_REMOTE_ROOT.to_owned());
    // `--` ends ssh's options: a destination can never be read as one.
    argv.extend([
        "--".into(),
        dest,
        "plasmavmc".into(),
        "agent".into(),
        "--stdio".into(),
        "--root".into(),
        root,
    ]);
    Ok(argv)
}

/// The argv of `host`'s agent in a serial mode (`mode`: e.g. `["--console", "web"]`):
/// [`agent_argv`] with the mode's arguments appended. An `exec` argv gets them at its
/// end too, so it must end with the agent's own arguments (or pass on `"$@"`).
pub fn serial_argv(
    host: &HostEntry,
    state: &StateDir,
    mode: &[String],
) -> Result<Vec<String>, HostError> {
    let mut argv = agent_argv(host, state)?;
    argv.extend(mode.iter().cloned());
    Ok(argv)
}

/// Connects to every host of `desired` at once; the ones that cannot be reached are
/// returned apart with the reason.
pub async fn connect_hosts(
    desired: &Desired,
    state: &StateDir,
    opts: ConnectOptions,
) -> (BTreeMap<String, AgentHost>, BTreeMap<String, String>) {
    let attempts = desired.hosts.values().map(|h| async move {
        let result = match agent_argv(h, state) {
            Ok(argv) => AgentHost::connect(&h.name, &argv, opts).await,
            Err(e) => Err(e),
        };
        (h.name.clone(), result)
    });
    let mut up = BTreeMap::new();
    let mut down = BTreeMap::new();
    for (name, result) in futures_util::future::join_all(attempts).await {
        match result {
            Ok(host) => {
                up.insert(name, host);
            }
            Err(e) => {
                let why = crate::errors::error_chain(&e);
                warn!(host = %name, error = %why, "host unreachable");
                down.insert(name, why);
            }
        }
    }
    (up, down)
}

#[cfg(test)]
mod tests {
    use super::*;
    use plasmavmc_specs::HostSpec;

    fn host(address: &str) -> HostEntry {
        let spec = HostSpec {
            address: Some(address.to_owned()),
            root: Some("/srv/pvmc".into()),
            ..HostSpec::implicit_local()
        };
        HostEntry {
            name: "hv1".into(),
            file: None,
            spec,
        }
    }

    #[test]
    fn ssh_addresses_become_batch_mode_argv() -> Result<(), HostError> {
        let state = StateDir::at(std::path::Path::new("/state"));
        let argv = agent_argv(&host("ssh://root@hv1.example:2222"), &state)?;
        assert_eq!(argv[0], "ssh");
        assert!(argv.windows(2).any(|w| w == ["-o", "BatchMode=yes"]));
        assert!(argv
            .windows(2)
            .any(|w| w == ["-o", "StrictHostKeyChecking=yes"]));
        assert!(argv.windows(2).any(|w| w == ["-p", "2222"]));
        assert!(argv.ends_with(
            &[
                "--",
                "root@hv1.example",
                "plasmavmc",
                "agent",
                "--stdio",
                "--root",
                "/srv/pvmc"
            ]
            .map(String::from)
        ));
        let argv = agent_argv(&host("ssh://hv2"), &state)?;
        assert!(!argv.contains(&"-p".to_owned()));
        assert!(argv.contains(&"hv2".to_owned()));
        assert!(
            !argv
                .iter()
                .any(|a| a == "-i" || a.starts_with("UserKnownHostsFile")),
            "{argv:?}"
        );
        Ok(())
    }

    #[test]
    fn ssh_files_become_options_before_the_destination() -> Result<(), HostError> {
        let state = StateDir::at(std::path::Path::new("/state"));
        let mut hv1 = host("ssh://root@hv1.example");
        hv1.spec.known_hosts = Some("/etc/plasmavmc/known_hosts".into());
        hv1.spec.identity_file = Some("/etc/plasmavmc/id_ed25519".into());
        let argv = agent_argv(&hv1, &state)?;
        let dest = argv
            .iter()
            .position(|a| a == "--")
            .expect("-- ends the options");
        let at = |pair: [&str; 2]| argv[..dest].windows(2).position(|w| w == pair);
        assert!(at(["-o", "UserKnownHostsFile=/etc/plasmavmc/known_hosts"]).is_some());
        assert!(at(["-i", "/etc/plasmavmc/id_ed25519"]).is_some());
        assert!(at(["-o", "IdentitiesOnly=yes"]).is_some());
        // Strict checking stays on whatever file holds the key.
        assert!(at(["-o", "StrictHostKeyChecking=yes"]).is_some());
        assert_eq!(argv[dest + 1], "root@hv1.example");

        hv1.spec.identity_file = None;
        let argv = agent_argv(&hv1, &state)?;
        assert!(!argv.iter().any(|a| a == "-i" || a == "IdentitiesOnly=yes"));
        Ok(())
    }

    #[test]
    fn local_and_exec_hosts() -> Result<(), HostError> {
        let state = StateDir::at(std::path::Path::new("/state"));
        let mut local = host("local");
        local.spec.root = None;
        let argv = agent_argv(&local, &state)?;
        assert_eq!(
            argv[1..],
            ["agent", "--stdio", "--root", "/state/hv1"].map(String::from)
        );
        let mut exec = host("local");
        exec.spec.address = None;
        exec.spec.exec = Some(vec!["/bin/x".into(), "y z".into()]);
        assert_eq!(agent_argv(&exec, &state)?, ["/bin/x", "y z"]);
        Ok(())
    }
}
