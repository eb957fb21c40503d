//! From the files of one commit to a validated [`Desired`] state, or every error.
//!
//! In: the committed files below the spec folder (path + bytes). Out: [`Desired`]
//! or all [`Diagnostic`]s at once — one bad file refuses the whole commit, and a file
//! that fails to parse is never read as "this VM was deleted". No I/O here: checks
//! that need the filesystem (kernel files exist) are the engine's.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::cluster::{ClusterSpec, NetworkDef};
use crate::diag::{Diagnostic, Seg};
use crate::host::{HostSpec, LOCAL_HOST};
use crate::name::name_problem;
use crate::vm::{Problem, VmSpec};

/// Largest spec file accepted, in bytes.
pub const MAX_FILE_BYTES: usize = 1 << 20;

/// One committed file below the spec folder.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Path for messages: relative to the repository root, as git shows it.
    pub path: String,
    /// Path relative to the spec folder (`vms/web/a.toml`); decides what the file is.
    pub rel: String,
    pub bytes: Vec<u8>,
}

/// The validated desired state of one commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub cluster: ClusterSpec,
    pub hosts: BTreeMap<String, HostEntry>,
    pub vms: BTreeMap<String, VmEntry>,
    /// True when the repository has no `hosts/`: one implicit host, `local`.
    pub implicit_local: bool,
}

/// A host and the file it came from (`None` for the implicit `local`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    pub name: String,
    pub file: Option<String>,
    pub spec: HostSpec,
}

impl HostEntry {
    /// The implicit host `local` of a repository without `hosts/`.
    pub fn implicit_local() -> Self {
        Self {
            name: LOCAL_HOST.to_owned(),
            file: None,
            spec: HostSpec::implicit_local(),
        }
    }
}

/// A VM, its file, and the hash of its normalised spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEntry {
    pub name: String,
    pub file: String,
    /// The spec with `name` filled in.
    pub spec: VmSpec,
    pub hash: String,
    /// The instance-id of its cloud-init seed, once the engine has read the seed's files
    /// (they are not spec files); its hash covers it then.
    pub seed: Option<String>,
    /// SHA-256 of its kernel, initrd and base images given by path (`kernel`, `initrd`,
    /// `image <disk>`), once the engine has read them (they are not in git).
    pub file_digests: BTreeMap<String, String>,
}

impl Desired {
    /// The desired state of a commit with no files: nothing to run, the implicit host.
    pub fn with_implicit_local() -> Self {
        let mut d = Self::empty();
        d.hosts
            .insert(LOCAL_HOST.to_owned(), HostEntry::implicit_local());
        d
    }

    /// No VMs, no hosts (the loader adds hosts).
    fn empty() -> Self {
        Self {
            cluster: ClusterSpec::default(),
            hosts: BTreeMap::new(),
            vms: BTreeMap::new(),
            implicit_local: true,
        }
    }
}

/// Stable short hash of a VM spec (hex, 16 digits): equal specs, equal hashes.
pub fn spec_hash(spec: &VmSpec) -> String {
    let json = serde_json::to_vec(&identity(spec)).expect("a VmSpec always serialises");
    short_hash(&json, 8)
}

/// The hash the engine compares a VM by: its spec's, and when it has NICs on declared
/// networks, those networks' definitions too, so a changed bridge or VLAN in
/// `plasmavmc.toml` reaches the VMs on it. A VM on `user` networking alone hashes as
/// its spec ([`spec_hash`]).
pub fn vm_hash(spec: &VmSpec, networks: &BTreeMap<String, NetworkDef>) -> String {
    let used: BTreeMap<&str, &NetworkDef> = spec
        .nics
        .iter()
        .filter(|n| !n.network.is_user())
        .filter_map(|n| networks.get_key_value(n.network.as_str()))
        .map(|(name, def)| (name.as_str(), def))
        .collect();
    if used.is_empty() {
        return spec_hash(spec);
    }
    let json = serde_json::to_vec(&(identity(spec), used)).expect("a VmSpec always serialises");
    short_hash(&json, 8)
}

/// `spec` as its hash counts it: a URL image by its SHA-256 alone, so moving an image to
/// another URL changes no disk and restarts nothing. Borrowed unchanged when it has none.
fn identity(spec: &VmSpec) -> std::borrow::Cow<'_, VmSpec> {
    use crate::image::Image;
    if !spec
        .disks
        .iter()
        .any(|d| matches!(d.image, Some(Image::Url(_))))
    {
        return std::borrow::Cow::Borrowed(spec);
    }
    let mut spec = spec.clone();
    for disk in &mut spec.disks {
        disk.image = disk.image.as_ref().map(Image::identity);
    }
    std::borrow::Cow::Owned(spec)
}

/// The first `bytes` bytes of the SHA-256 of `data`, in hex.
pub fn short_hash(data: &[u8], bytes: usize) -> String {
    Sha256::digest(data)
        .iter()
        .take(bytes)
        .fold(String::with_capacity(2 * bytes), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

enum Kind {
    Cluster,
    Host,
    Vm,
    Ignored,
}

fn kind_of(rel: &str) -> Result<Kind, String> {
    if rel == "plasmavmc.toml" {
        return Ok(Kind::Cluster);
    }
    if let Some(rest) = rel.strip_prefix("hosts/") {
        if !rest.ends_with(".toml") {
            return Ok(Kind::Ignored);
        }
        if rest.contains('/') {
            return Err("host files must sit directly in hosts/, not in subfolders".to_owned());
        }
        return Ok(Kind::Host);
    }
    if let Some(rest) = rel.strip_prefix("vms/") {
        return Ok(if rest.ends_with(".toml") {
            Kind::Vm
        } else {
            Kind::Ignored
        });
    }
    Ok(Kind::Ignored)
}

/// Validates the whole commit: every file on its own, then names, duplicates and pins
/// across files. Returns every problem found, sorted by file and position.
pub fn load(files: &[SourceFile]) -> Result<Desired, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let mut desired = Desired::empty();
    let mut texts: BTreeMap<&str, String> = BTreeMap::new();
    let mut vm_files: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let mut host_files: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let mut vms = Vec::new();

    for file in files {
        let kind = match kind_of(&file.rel) {
            Ok(Kind::Ignored) => continue,
            Ok(kind) => kind,
            Err(msg) => {
                diags.push(Diagnostic::file(&file.path, msg));
                continue;
            }
        };
        let Some(text) = file_text(file, &mut diags) else {
            continue;
        };
        match kind {
            Kind::Cluster => {
                if let Some(spec) = parse::<ClusterSpec>(file, &text, &mut diags) {
                    push_problems(file, &text, spec.problems(), &mut diags);
                    crate::net::cluster_problems(file, &text, &spec, &mut diags);
                    desired.cluster = spec;
                }
            }
            Kind::Host => {
                let Some(mut spec) = parse::<HostSpec>(file, &text, &mut diags) else {
                    continue;
                };
                push_problems(file, &text, spec.problems(), &mut diags);
                let Some(name) = entry_name(file, &text, spec.name.as_deref(), &mut diags) else {
                    continue;
                };
                spec.name = Some(name.clone());
                host_files.entry(name.clone()).or_default().push(&file.path);
                desired.hosts.insert(
                    name.clone(),
                    HostEntry {
                        name,
                        file: Some(file.path.clone()),
                        spec,
                    },
                );
            }
            Kind::Vm => {
                let Some(mut spec) = parse::<VmSpec>(file, &text, &mut diags) else {
                    continue;
                };
                push_problems(file, &text, spec.problems(), &mut diags);
                let Some(name) = entry_name(file, &text, spec.name.as_deref(), &mut diags) else {
                    continue;
                };
                spec.name = Some(name.clone());
                vm_files.entry(name.clone()).or_default().push(&file.path);
                vms.push((file, name, spec));
            }
            Kind::Ignored => {}
        }
        texts.insert(&file.path, text);
    }

    report_duplicates("VM", &vm_files, &mut diags);
    report_duplicates("host", &host_files, &mut diags);

    desired.implicit_local = desired.hosts.is_empty() && host_files.is_empty();
    if desired.implicit_local {
        desired
            .hosts
            .insert(LOCAL_HOST.to_owned(), HostEntry::implicit_local());
    }

    check_across(&desired, &vms, &texts, &mut diags);

    if !diags.is_empty() {
        diags.sort();
        diags.dedup();
        return Err(diags);
    }
    for (file, name, spec) in vms {
        let hash = vm_hash(&spec, &desired.cluster.networks);
        desired.vms.insert(
            name.clone(),
            VmEntry {
                name,
                file: file.path.clone(),
                spec,
                hash,
                seed: None,
                file_digests: BTreeMap::new(),
            },
        );
    }
    Ok(desired)
}

/// Checks between files: host pins exist; on the implicit local host, no two VMs
/// forward the same host port; networks are declared and MACs unique (`net`).
fn check_across(
    desired: &Desired,
    vms: &[(&SourceFile, String, VmSpec)],
    texts: &BTreeMap<&str, String>,
    diags: &mut Vec<Diagnostic>,
) {
    // Host ports forwarded to guests, per host: VMs that are sure to share a host (all
    // of them on the implicit one, pinned ones on their pin) may not share a port.
    let mut ports: BTreeMap<(&str, bool, u16), &str> = BTreeMap::new();
    // Once, not per VM: 100,000 VMs on 1,000 hosts made that 10^8 looks at hosts
    // (BENCHMARKS.md, "Planning 100,000 VMs").
    let any_shared = desired
        .hosts
        .values()
        .any(|h| h.spec.shared_storage.is_some());
    for (file, name, spec) in vms {
        let text = texts.get(file.path.as_str()).map_or("", String::as_str);
        if let Some(host) = &spec.host {
            if !desired.hosts.contains_key(host) {
                let known: Vec<&str> = desired.hosts.keys().map(String::as_str).collect();
                diags.push(Diagnostic::at_key(
                    &file.path,
                    text,
                    &[Seg::Key("host")],
                    format!("unknown host {host:?}; known hosts: {}", known.join(", ")),
                ));
            }
        }
        contradictions(desired, any_shared, file, text, spec, diags);
        let host = if desired.implicit_local {
            Some(LOCAL_HOST)
        } else {
            spec.host.as_deref()
        };
        let Some(host) = host else { continue };
        for fwd in spec.forwards() {
            if let Some(other) = ports.insert((host, fwd.udp, fwd.host_port), name) {
                let on = if desired.implicit_local {
                    String::new()
                } else {
                    format!(" on host {host:?}, where both are pinned")
                };
                diags.push(Diagnostic::at_key(
                    &file.path,
                    text,
                    &[Seg::Key("nics")],
                    format!(
                        "host port {} is already forwarded by VM {other:?}{on}",
                        fwd.host_port
                    ),
                ));
            }
        }
    }
    crate::net::check_networks(desired, vms, texts, diags);
}

/// Settings no host of this commit can ever satisfy (`any_shared`: whether a host has
/// shared storage).
fn contradictions(
    desired: &Desired,
    any_shared: bool,
    file: &SourceFile,
    text: &str,
    spec: &VmSpec,
    diags: &mut Vec<Diagnostic>,
) {
    let pinned = spec.host.as_ref().and_then(|h| desired.hosts.get(h));
    if let Some(memory) = pinned.and_then(|h| h.spec.memory_mb) {
        if spec.memory_mb > memory {
            let host = spec.host.as_deref().unwrap_or_default();
            let msg = format!(
                "memory_mb = {} can never fit on host {host:?}, which has memory_mb = {memory}",
                spec.memory_mb
            );
            diags.push(Diagnostic::at_key(
                &file.path,
                text,
                &[Seg::Key("memory_mb")],
                msg,
            ));
        }
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        if disk.storage != crate::vm::Storage::Shared {
            continue;
        }
        let msg = if !any_shared {
            format!(
                "disk {:?} wants storage = \"shared\" but no host has shared_storage",
                disk.name
            )
        } else if let Some(host) = pinned.filter(|h| h.spec.shared_storage.is_none()) {
            format!(
                "disk {:?} wants storage = \"shared\" but host {:?}, its pin, has no \
                 shared_storage",
                disk.name, host.name
            )
        } else {
            continue;
        };
        diags.push(Diagnostic::at_key(
            &file.path,
            text,
            &[Seg::Key("disks"), Seg::Index(i), Seg::Key("storage")],
            msg,
        ));
    }
}

/// One error per file that shares its name with another, naming the others.
fn report_duplicates(what: &str, names: &BTreeMap<String, Vec<&str>>, diags: &mut Vec<Diagnostic>) {
    for (name, paths) in names.iter().filter(|(_, p)| p.len() > 1) {
        for path in paths {
            let others: Vec<&str> = paths.iter().copied().filter(|p| p != path).collect();
            diags.push(Diagnostic::file(
                path,
                format!("{what} name {name:?} is also used by {}", others.join(", ")),
            ));
        }
    }
}

fn file_text(file: &SourceFile, diags: &mut Vec<Diagnostic>) -> Option<String> {
    if file.bytes.len() > MAX_FILE_BYTES {
        diags.push(Diagnostic::file(
            &file.path,
            format!(
                "file is {} bytes; spec files are limited to {MAX_FILE_BYTES} bytes",
                file.bytes.len()
            ),
        ));
        return None;
    }
    match String::from_utf8(file.bytes.clone()) {
        Ok(text) => Some(text),
        Err(e) => {
            let offset = e.utf8_error().valid_up_to();
            let valid = String::from_utf8_lossy(&file.bytes[..offset]).into_owned();
            diags.push(Diagnostic::at_offset(
                &file.path,
                &valid,
                offset,
                "file is not valid UTF-8 text",
            ));
            None
        }
    }
}

fn parse<T: DeserializeOwned>(
    file: &SourceFile,
    text: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<T> {
    match toml::from_str::<T>(text) {
        Ok(v) => Some(v),
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            diags.push(Diagnostic::at_offset(
                &file.path,
                text,
                offset,
                toml_message(text, offset, &e),
            ));
            None
        }
    }
}

/// The TOML error's message on one line. A syntax error comes in lines ("invalid table
/// header", then "expected `.`, `]`"), joined with ": "; at the end of a file after `=`
/// it is empty, and said in words. Errors of well-formed TOML (wrong type, unknown field)
/// stay as they are: a newline there is spec content, escaped by [`Diagnostic`].
fn toml_message(text: &str, offset: usize, e: &toml::de::Error) -> String {
    let message = e.message().trim();
    if message.is_empty() {
        return if offset >= text.len() {
            "unexpected end of file: expected a value".to_owned()
        } else {
            "invalid TOML".to_owned()
        };
    }
    if toml_edit::ImDocument::parse(text).is_ok() {
        return message.to_owned();
    }
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

fn push_problems(
    file: &SourceFile,
    text: &str,
    problems: Vec<Problem>,
    diags: &mut Vec<Diagnostic>,
) {
    for (key, msg) in problems {
        diags.push(Diagnostic::at_key(&file.path, text, &key, msg));
    }
}

/// The entry's name: `name` when set, else the file stem; both must be valid names.
fn entry_name(
    file: &SourceFile,
    text: &str,
    set: Option<&str>,
    diags: &mut Vec<Diagnostic>,
) -> Option<String> {
    if let Some(name) = set {
        // Problems with an explicit name were reported by `problems()`.
        return name_problem(name).is_none().then(|| name.to_owned());
    }
    let stem = file
        .rel
        .rsplit('/')
        .next()
        .unwrap_or(&file.rel)
        .strip_suffix(".toml")
        .unwrap_or_default();
    match name_problem(stem) {
        None => Some(stem.to_owned()),
        Some(p) => {
            diags.push(Diagnostic::at_offset(
                &file.path,
                text,
                0,
                format!("file name gives the {p}; rename the file or set `name`"),
            ));
            None
        }
    }
}
