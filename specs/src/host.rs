//! The host spec: one `hosts/<name>.toml` file.
//!
//! With no `hosts/` folder the repository has one implicit host, `local`: this
//! machine, rooted at `<state>/local`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::diag::Seg;
use crate::vm::{Accel, Problem};

/// Name of the implicit host used when the repository has no `hosts/` folder.
pub const LOCAL_HOST: &str = "local";

/// A hypervisor host the engine places VMs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// The host's name. Defaults to the file name without `.toml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// How to reach the host: `local` (this machine) or `ssh://user@host[:port]`.
    /// Exactly one of `address` and `exec` must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// A command (argv, never a shell line) whose stdin/stdout speak the agent protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    /// With an `ssh://` address: the `known_hosts` file holding this host's key, passed
    /// as `ssh -o UserKnownHostsFile=PATH` (strict host key checking stays on), so each
    /// host's key can be pinned without touching `~/.ssh`. Read from disk, not from git:
    /// an absolute path, or relative to the spec folder in the working tree (inside it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts: Option<String>,
    /// With an `ssh://` address: the private key to log in with, passed as
    /// `ssh -i PATH -o IdentitiesOnly=yes` (an engine under systemd has no ssh-agent).
    /// Read from disk like `known_hosts`; ssh refuses a key others can read (chmod 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_file: Option<String>,
    /// Folder on the host where instances and local disks live (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// Schedulable vCPUs. Default: what the host reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Schedulable memory in MiB. Default: what the host reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// `active`, or `maintenance` to drain it: every VM moves off and nothing new lands.
    #[serde(default)]
    pub state: HostState,
    /// A path every host of `storage_pool` sees (e.g. an NFS mount).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_storage: Option<String>,
    /// Name of the shared storage pool this host belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_pool: Option<String>,
    /// The networks of `plasmavmc.toml` this host has (their bridges exist here; the
    /// agent checks). VMs with a NIC on a network are placed only on hosts that have it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// Fencing command (argv); exit 0 means the host is powered off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<Vec<String>>,
    /// Default accelerator for VMs on this host.
    #[serde(default)]
    pub accel: Accel,
    /// Where other hosts reach this one for live migration (QEMU's migration stream and
    /// the NBD export of local disks): an IP address or host name. Default: the host of
    /// an `ssh://` address, `127.0.0.1` for `local` and `exec` hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_address: Option<String>,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Administrative state of a host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HostState {
    /// Receives and runs VMs.
    #[default]
    Active,
    /// Drained: its VMs move elsewhere, nothing new is placed on it.
    Maintenance,
}

impl HostSpec {
    /// The implicit `local` host of a repository without `hosts/`.
    pub fn implicit_local() -> Self {
        Self {
            name: Some(LOCAL_HOST.to_owned()),
            address: Some("local".to_owned()),
            exec: None,
            known_hosts: None,
            identity_file: None,
            root: None,
            vcpus: None,
            memory_mb: None,
            state: HostState::Active,
            shared_storage: None,
            storage_pool: None,
            networks: Vec::new(),
            fence: None,
            accel: Accel::Auto,
            migration_address: None,
            labels: BTreeMap::new(),
        }
    }

    /// Everything wrong with this spec on its own.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out: Vec<Problem> = Vec::new();
        if let Some(p) = self.name.as_deref().and_then(crate::name::name_problem) {
            out.push((vec![Seg::Key("name")], p));
        }
        match (&self.address, &self.exec) {
            (Some(_), Some(_)) => out.push((
                vec![Seg::Key("exec")],
                "set either `address` or `exec`, not both".to_owned(),
            )),
            (None, None) => out.push((
                vec![],
                "a host needs `address` (\"local\" or \"ssh://user@host\") or `exec`".to_owned(),
            )),
            (Some(addr), None) => {
                if let Some(p) = address_problem(addr) {
                    out.push((vec![Seg::Key("address")], p));
                }
            }
            (None, Some(argv)) => {
                if argv.is_empty() || argv[0].is_empty() {
                    out.push((
                        vec![Seg::Key("exec")],
                        "exec needs at least a program".to_owned(),
                    ));
                }
            }
        }
        out.extend(self.ssh_file_problems());
        for (key, path) in [
            ("root", &self.root),
            ("shared_storage", &self.shared_storage),
        ] {
            if let Some(path) = path {
                if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
                    out.push((
                        vec![Seg::Key(key)],
                        format!("{key} {path:?} must be an absolute path without '..'"),
                    ));
                }
            }
        }
        if self.shared_storage.is_some() != self.storage_pool.is_some() {
            let key = if self.shared_storage.is_some() {
                "shared_storage"
            } else {
                "storage_pool"
            };
            out.push((
                vec![Seg::Key(key)],
                "shared_storage and storage_pool go together".to_owned(),
            ));
        }
        if self
            .fence
            .as_ref()
            .is_some_and(|f| f.is_empty() || f[0].is_empty())
        {
            out.push((
                vec![Seg::Key("fence")],
                "fence needs at least a program".to_owned(),
            ));
        }
        if let Some(addr) = &self.migration_address {
            let ok = !addr.is_empty()
                && !addr.starts_with('-')
                && addr
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
            if !ok {
                out.push((
                    vec![Seg::Key("migration_address")],
                    format!("migration_address {addr:?} must be an IP address or a host name"),
                ));
            }
        }
        if self.vcpus == Some(0) {
            out.push((
                vec![Seg::Key("vcpus")],
                "vcpus must be at least 1".to_owned(),
            ));
        }
        if self.memory_mb.is_some_and(|m| m < 16) {
            out.push((
                vec![Seg::Key("memory_mb")],
                "memory_mb must be at least 16".to_owned(),
            ));
        }
        out
    }
}

impl HostSpec {
    /// The address other hosts reach this one at for live migration.
    pub fn migration_host(&self) -> String {
        if let Some(addr) = &self.migration_address {
            return addr.clone();
        }
        let ssh = self
            .address
            .as_deref()
            .and_then(|a| a.strip_prefix("ssh://"));
        let Some(rest) = ssh else {
            return "127.0.0.1".to_owned();
        };
        let hostport = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        if let Some(inner) = hostport.strip_prefix('[') {
            return inner.split(']').next().unwrap_or(inner).to_owned();
        }
        hostport.split(':').next().unwrap_or(hostport).to_owned()
    }

    /// The files only an `ssh://` host uses (`known_hosts`, `identity_file`), by key.
    fn ssh_files(&self) -> [(&'static str, Option<&str>); 2] {
        [
            ("known_hosts", self.known_hosts.as_deref()),
            ("identity_file", self.identity_file.as_deref()),
        ]
    }

    /// `known_hosts` and `identity_file` on a host that is not reached by ssh (they would
    /// be ignored: a contradiction), or unusable as paths.
    fn ssh_file_problems(&self) -> Vec<Problem> {
        // With both or neither of `address` and `exec`, that is the error reported.
        let reached_by = match (&self.address, &self.exec) {
            (Some(addr), None) if !addr.starts_with("ssh://") => {
                Some(format!("address = {addr:?}"))
            }
            (None, Some(_)) => Some("`exec` (put ssh options in its argv)".to_owned()),
            _ => None,
        };
        let mut out = Vec::new();
        for (key, value) in self.ssh_files() {
            let Some(value) = value else { continue };
            let problem = match &reached_by {
                Some(how) => Some(format!(
                    "{key} is only used with an ssh:// address, but this host is reached by {how}"
                )),
                None => crate::vm::path_problem(value),
            };
            if let Some(p) = problem {
                out.push((vec![Seg::Key(key)], p));
            }
        }
        out
    }
}

fn address_problem(addr: &str) -> Option<String> {
    if addr == "local" {
        return None;
    }
    let bad = || {
        Some(format!(
            "address {addr:?} must be \"local\" or \"ssh://user@host[:port]\""
        ))
    };
    let Some(rest) = addr.strip_prefix("ssh://") else {
        return bad();
    };
    let (user, hostport) = match rest.rsplit_once('@') {
        Some((user, hostport)) => (Some(user), hostport),
        None => (None, rest),
    };
    // IPv6 in brackets, else a host name; an optional numeric port.
    let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
        let Some((ip, after)) = inner.split_once(']') else {
            return bad();
        };
        (ip, after.strip_prefix(':'))
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    let word = |w: &str, extra: &str| {
        !w.is_empty()
            && !w.starts_with('-')
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
    };
    // Nothing may start with '-': ssh would read it as an option.
    let ok = user.is_none_or(|u| word(u, "._-"))
        && word(host, ".-_:")
        && port
            .is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        None
    } else {
        Some(format!(
            "address {addr:?} is not a valid ssh://user@host[:port]"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(address: &str) -> HostSpec {
        HostSpec {
            address: Some(address.to_owned()),
            ..HostSpec::implicit_local()
        }
    }

    #[test]
    fn migration_host_comes_from_the_address_unless_set() {
        assert_eq!(at("local").migration_host(), "127.0.0.1");
        assert_eq!(
            at("ssh://root@hv1.example:2222").migration_host(),
            "hv1.example"
        );
        assert_eq!(at("ssh://hv2").migration_host(), "hv2");
        assert_eq!(at("ssh://u@[fd00::7]:22").migration_host(), "fd00::7");
        let set = HostSpec {
            migration_address: Some("10.0.0.7".into()),
            ..at("ssh://hv1")
        };
        assert_eq!(set.migration_host(), "10.0.0.7");
        assert!(set.problems().is_empty());
        let bad = HostSpec {
            migration_address: Some("a b".into()),
            ..at("local")
        };
        assert_eq!(bad.problems().len(), 1);
    }
}
