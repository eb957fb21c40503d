//! `[cloud_init]`: the NoCloud seed a VM boots with, and the checks of the files it names.
//!
//! In: the table of a VM spec, and the text of its user-data, network-config and
//! meta-data files (the engine reads them: from the commit, or from the controller's
//! filesystem for secrets). Out: problems located at `line:col` of those files, the
//! seed's instance-id, and the `meta-data` document the engine writes. No I/O.

use std::fmt::Write as _;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use yaml_rust2::{Yaml, YamlLoader};

use crate::diag::Seg;
use crate::load::short_hash;
use crate::vm::path_problem;

/// A cloud-init NoCloud seed, built by the engine and attached read-only: `meta-data`
/// (instance-id and hostname), `user-data` and, if given, `network-config`. Each file is
/// a path relative to the spec folder, read from the commit like the specs (versioned,
/// diffed in `plan`), or an absolute path read from the controller's filesystem when the
/// commit is planned (for secrets: never committed, never shown). Any change of what the
/// seed holds changes its instance-id, so cloud-init runs again as for a new instance
/// (new users, keys, host keys): the VM is restarted to boot with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudInit {
    /// User data: a `#cloud-config` YAML document, or a script starting with `#!`.
    /// Absent: an empty `#cloud-config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// Network configuration: YAML of version 1 or 2 (`version: 2`, or under `network:`).
    /// Absent: the image's default (usually DHCP on the first NIC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<String>,
    /// More meta-data: a YAML mapping added to the engine's. The engine sets
    /// `instance-id` (a digest of the seed; this file may not) and `local-hostname` (the
    /// VM's name, unless this file sets it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_data: Option<String>,
}

/// One file of the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    UserData,
    NetworkConfig,
    MetaData,
}

impl Part {
    pub const ALL: [Part; 3] = [Part::UserData, Part::NetworkConfig, Part::MetaData];

    /// The key naming the file in `[cloud_init]`.
    pub fn key(self) -> &'static str {
        match self {
            Part::UserData => "user_data",
            Part::NetworkConfig => "network_config",
            Part::MetaData => "meta_data",
        }
    }

    /// The file's name on the seed volume (what NoCloud reads).
    pub fn seed_name(self) -> &'static str {
        match self {
            Part::UserData => "user-data",
            Part::NetworkConfig => "network-config",
            Part::MetaData => "meta-data",
        }
    }
}

impl CloudInit {
    /// The path given for `part`.
    pub fn path(&self, part: Part) -> Option<&str> {
        match part {
            Part::UserData => self.user_data.as_deref(),
            Part::NetworkConfig => self.network_config.as_deref(),
            Part::MetaData => self.meta_data.as_deref(),
        }
    }

    /// Problems with the paths themselves, keyed under `[cloud_init]`.
    pub(crate) fn problems(&self, bad: &mut impl FnMut(Vec<Seg<'static>>, String)) {
        for part in Part::ALL {
            let Some(path) = self.path(part) else {
                continue;
            };
            let key = vec![Seg::Key("cloud_init"), Seg::Key(part.key())];
            if let Some(p) = path_problem(path) {
                bad(key, p);
            } else if !path.starts_with('/') && path.split('/').any(|c| c == "..") {
                bad(
                    key,
                    format!(
                        "{path:?} climbs out with `..`: a repository file is named relative to \
                         the spec folder, inside it; a file outside the repository by an \
                         absolute path"
                    ),
                );
            }
        }
    }
}

/// A problem in the text of a seed file, 1-based.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextProblem {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl TextProblem {
    fn at(line: usize, col: usize, message: impl Into<String>) -> Self {
        Self {
            line,
            col,
            message: message.into(),
        }
    }
}

/// Checks the content of the seed file `part`.
pub fn check(part: Part, bytes: &[u8]) -> Result<(), TextProblem> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        if part == Part::UserData && bytes.starts_with(b"#!") {
            return Ok(()); // a script may be in any encoding
        }
        return Err(TextProblem::at(1, 1, "not UTF-8 text"));
    };
    match part {
        Part::UserData => check_user_data(text),
        Part::NetworkConfig => check_network_config(text),
        Part::MetaData => check_meta_data(text),
    }
}

fn check_user_data(text: &str) -> Result<(), TextProblem> {
    if text.starts_with("#!") {
        return Ok(());
    }
    let first = text.lines().next().unwrap_or("");
    if first.trim_end() != "#cloud-config" {
        return Err(TextProblem::at(
            1,
            1,
            "user data must start with a `#cloud-config` line (a cloud-config YAML document) \
             or `#!` (a script to run once)",
        ));
    }
    match parse(text)? {
        None | Some(Yaml::Hash(_)) => Ok(()),
        Some(_) => Err(TextProblem::at(
            2,
            1,
            "a cloud-config document must be a mapping (`key: value` lines)",
        )),
    }
}

fn check_network_config(text: &str) -> Result<(), TextProblem> {
    let doc = parse(text)?;
    let Some(Yaml::Hash(top)) = &doc else {
        return Err(TextProblem::at(
            1,
            1,
            "network config must be a YAML mapping with `version: 1` or `version: 2`",
        ));
    };
    let inner = match top.get(&Yaml::String("network".into())) {
        Some(Yaml::Hash(h)) => h,
        _ => top,
    };
    match inner.get(&Yaml::String("version".into())) {
        Some(Yaml::Integer(1 | 2)) => Ok(()),
        Some(other) => {
            let (line, col) = key_position(text, "version").unwrap_or((1, 1));
            Err(TextProblem::at(
                line,
                col,
                format!(
                    "network config version must be 1 or 2, not {}",
                    shown(other)
                ),
            ))
        }
        None => Err(TextProblem::at(
            1,
            1,
            "network config has no `version` (1 or 2), at the top or under `network:`",
        )),
    }
}

fn check_meta_data(text: &str) -> Result<(), TextProblem> {
    match parse(text)? {
        None => Ok(()),
        Some(Yaml::Hash(h)) => {
            if h.contains_key(&Yaml::String("instance-id".into())) {
                let (line, col) = key_position(text, "instance-id").unwrap_or((1, 1));
                return Err(TextProblem::at(
                    line,
                    col,
                    "instance-id is set by the engine (a digest of the seed, so a changed \
                     seed is a new instance for cloud-init); remove it",
                ));
            }
            Ok(())
        }
        Some(_) => Err(TextProblem::at(
            1,
            1,
            "meta data must be a YAML mapping (`key: value` lines)",
        )),
    }
}

/// The one YAML document of `text` (`None` when empty), or where it fails to parse.
fn parse(text: &str) -> Result<Option<Yaml>, TextProblem> {
    let mut docs = YamlLoader::load_from_str(text).map_err(|e| {
        let m = e.marker();
        TextProblem::at(
            m.line().max(1),
            m.col() + 1,
            format!("invalid YAML: {}", e.info()),
        )
    })?;
    if docs.len() > 1 {
        let line = text
            .lines()
            .enumerate()
            .skip(1)
            .find(|(_, l)| l.starts_with("---"))
            .map_or(1, |(i, _)| i + 1);
        return Err(TextProblem::at(
            line,
            1,
            "more than one YAML document; cloud-init reads one",
        ));
    }
    Ok(docs.pop().filter(|d| !d.is_null()))
}

/// Line and column of the first `key:` written at the start of a line (indentation
/// allowed), for messages.
fn key_position(text: &str, key: &str) -> Option<(usize, usize)> {
    text.lines().enumerate().find_map(|(i, line)| {
        let body = line.trim_start();
        let rest = body.strip_prefix(key)?;
        rest.trim_start()
            .starts_with(':')
            .then(|| (i + 1, line.len() - body.len() + 1))
    })
}

fn shown(value: &Yaml) -> String {
    match value {
        Yaml::Integer(n) => n.to_string(),
        Yaml::Real(s) | Yaml::String(s) => format!("{s:?}"),
        Yaml::Boolean(b) => b.to_string(),
        _ => "a structure".to_owned(),
    }
}

/// The seed's instance-id: `pv-` and a digest of everything the seed holds but the id
/// itself. A changed user data, network config, extra meta-data or VM name gives a new
/// id, and cloud-init treats the next boot as a new instance.
pub fn instance_id(vm: &str, files: &[(Part, &[u8])]) -> String {
    let mut input = Vec::new();
    input.extend_from_slice(b"plasmavmc-nocloud-1\0");
    input.extend_from_slice(vm.as_bytes());
    for (part, bytes) in files {
        input.push(0);
        input.extend_from_slice(part.seed_name().as_bytes());
        input.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        input.extend_from_slice(bytes);
    }
    format!("pv-{}", short_hash(&input, 8))
}

/// The `meta-data` file: `instance-id`, `local-hostname` (the VM's name unless `extra`
/// sets one), then `extra` as written (checked by [`check`] first).
pub fn meta_data(vm: &str, instance_id: &str, extra: Option<&str>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "instance-id: {instance_id}");
    let sets_hostname = extra.is_some_and(|e| key_position(e, "local-hostname").is_some());
    if !sets_hostname {
        let _ = writeln!(out, "local-hostname: {vm}");
    }
    if let Some(extra) = extra {
        out.push_str(extra);
        if !extra.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_is_cloud_config_or_a_script() {
        assert!(check(Part::UserData, b"#cloud-config\nhostname: web\n").is_ok());
        assert!(check(Part::UserData, b"#cloud-config\n").is_ok());
        assert!(check(Part::UserData, b"#!/bin/sh\necho hi\n").is_ok());
        let e = check(Part::UserData, b"hostname: web\n").expect_err("no header");
        assert_eq!((e.line, e.col), (1, 1));
        assert!(e.message.contains("#cloud-config"), "{}", e.message);
        let e = check(
            Part::UserData,
            b"#cloud-config\nusers:\n  - name: a\n   bad: [\n",
        )
        .expect_err("bad yaml");
        assert!(e.line >= 3, "{e:?}");
        assert!(e.message.starts_with("invalid YAML"), "{}", e.message);
        let e = check(Part::UserData, b"#cloud-config\n- a\n- b\n").expect_err("a list");
        assert!(e.message.contains("mapping"), "{}", e.message);
    }

    #[test]
    fn yaml_errors_point_at_their_line() {
        let e = check(
            Part::UserData,
            b"#cloud-config\nhostname: web\nusers: [a, b\n",
        )
        .expect_err("unclosed");
        assert!(e.line >= 3, "{e:?}");
        let e = check(Part::MetaData, b"a: 1\nb: \"open\n").expect_err("unclosed string");
        assert_eq!(e.line, 2, "{e:?}");
    }

    #[test]
    fn network_config_has_version_one_or_two() {
        assert!(check(Part::NetworkConfig, b"version: 2\nethernets: {}\n").is_ok());
        assert!(check(
            Part::NetworkConfig,
            b"network:\n  version: 1\n  config: []\n"
        )
        .is_ok());
        let e = check(Part::NetworkConfig, b"ethernets: {}\nversion: 3\n").expect_err("v3");
        assert_eq!((e.line, e.col), (2, 1));
        assert!(e.message.contains("not 3"), "{}", e.message);
        let e = check(Part::NetworkConfig, b"ethernets: {}\n").expect_err("none");
        assert!(e.message.contains("no `version`"), "{}", e.message);
    }

    #[test]
    fn meta_data_may_not_set_the_instance_id() {
        assert!(check(Part::MetaData, b"local-hostname: web.example\n").is_ok());
        let e = check(Part::MetaData, b"x: 1\ninstance-id: mine\n").expect_err("id");
        assert_eq!((e.line, e.col), (2, 1));
        assert!(check(Part::MetaData, b"- a\n").is_err());
    }

    #[test]
    fn meta_data_names_the_instance_and_the_host() {
        assert_eq!(
            meta_data("web", "pv-1", None),
            "instance-id: pv-1\nlocal-hostname: web\n"
        );
        assert_eq!(
            meta_data("web", "pv-1", Some("local-hostname: web.example")),
            "instance-id: pv-1\nlocal-hostname: web.example\n"
        );
    }

    #[test]
    fn the_instance_id_follows_every_input() {
        let base = instance_id("web", &[(Part::UserData, b"#cloud-config\n")]);
        assert!(base.starts_with("pv-") && base.len() == 3 + 16, "{base}");
        assert_eq!(
            base,
            instance_id("web", &[(Part::UserData, b"#cloud-config\n")])
        );
        assert_ne!(
            base,
            instance_id("db", &[(Part::UserData, b"#cloud-config\n")])
        );
        assert_ne!(
            base,
            instance_id("web", &[(Part::UserData, b"#cloud-config\n\n")])
        );
        assert_ne!(
            base,
            instance_id("web", &[(Part::NetworkConfig, b"#cloud-config\n")])
        );
    }
}
