//! The one check of the spec loader that fuzzing runs, and how fuzzer bytes become a
//! commit. Not an API: both the cargo-fuzz target (`fuzz/fuzz_targets/specs.rs`,
//! nightly) and the stable smoke test (`specs/tests/fuzz_smoke.rs`, run by CI) call
//! [`check_bytes`], so a failure of either reproduces with the other.
//!
//! In: arbitrary bytes, read as a commit ([`commit_from_bytes`]). Out: nothing, or a
//! panic naming the broken invariant:
//! - [`load`] never panics, and its verdict does not depend on the order of the files;
//! - a refused commit has at least one diagnostic; each names a file of the commit,
//!   is either about the whole file (line 0, col 0) or at a line and column inside
//!   that file's text, has a message, and renders as one line (a spec cannot forge
//!   another `path:line:col:` line);
//! - an accepted commit holds only specs without problems, each VM's hash is the hash
//!   of its spec, and writing every spec back as TOML at its path loads to the same
//!   [`Desired`] (nothing the loader accepts is lost or changed by serialising it).

use std::collections::BTreeSet;

use crate::diag::Diagnostic;
use crate::load::{load, spec_hash, Desired, SourceFile};

/// Separates the files of a commit in fuzzer input (never part of UTF-8 text).
pub const SEP: u8 = 0xFF;

/// Paths of the first three parts of the input, in order; an empty part is no file.
pub const SLOTS: [&str; 3] = ["vms/web.toml", "hosts/hv1.toml", "plasmavmc.toml"];

/// What every path is shown under, as if the specs sat in folder `repo/` of the
/// repository (`SourceFile::path` = this + `rel`).
const PREFIX: &str = "repo/";

/// The commit that `data` stands for. `data` is split on [`SEP`]: the first three
/// parts are the files at [`SLOTS`] (absent when empty), the rest alternate between a
/// path (relative to the spec folder, lossy UTF-8) and that file's bytes. Like a git
/// tree, a commit holds a path once: later files at a path already taken are dropped.
pub fn commit_from_bytes(data: &[u8]) -> Vec<SourceFile> {
    let mut parts = data.split(|&b| b == SEP);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for slot in SLOTS {
        match parts.next() {
            Some(bytes) if !bytes.is_empty() => files.push((slot.to_owned(), bytes.to_vec())),
            _ => {}
        }
    }
    while let Some(path) = parts.next() {
        let bytes = parts.next().unwrap_or_default();
        files.push((String::from_utf8_lossy(path).into_owned(), bytes.to_vec()));
    }
    let mut seen = BTreeSet::new();
    files
        .into_iter()
        .filter(|(rel, _)| seen.insert(rel.clone()))
        .map(|(rel, bytes)| source_file(&rel, bytes))
        .collect()
}

/// The input [`commit_from_bytes`] reads back as these files (`(rel, bytes)`): the
/// seeds of the fuzzer and of the smoke test's mutations. Files holding [`SEP`]
/// cannot be written (spec files are text; it never occurs in UTF-8).
pub fn bytes_from_commit(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut slots: [Option<&[u8]>; 3] = [None; 3];
    let mut rest: Vec<(&str, &[u8])> = Vec::new();
    for (rel, bytes) in files {
        assert!(
            !bytes.contains(&SEP) && !rel.as_bytes().contains(&SEP),
            "{rel} holds the separator byte"
        );
        match SLOTS.iter().position(|s| s == rel) {
            Some(i) if !bytes.is_empty() => slots[i] = Some(bytes),
            _ => rest.push((rel, bytes)),
        }
    }
    let mut parts: Vec<&[u8]> = slots.iter().map(|s| s.unwrap_or_default()).collect();
    for (rel, bytes) in rest {
        parts.push(rel.as_bytes());
        parts.push(bytes);
    }
    parts.join(&SEP)
}

/// [`check_commit`] of the commit `data` stands for.
pub fn check_bytes(data: &[u8]) {
    check_commit(&commit_from_bytes(data));
}

/// Loads `files` and panics if any invariant of the module doc is broken.
pub fn check_commit(files: &[SourceFile]) {
    let outcome = load(files);
    let mut reversed = files.to_vec();
    reversed.reverse();
    match (&outcome, load(&reversed)) {
        (Ok(a), Ok(b)) => assert_eq!(*a, b, "the files' order changed what loads"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!(
            "the files' order changed the verdict: {:?} forward, {:?} reversed",
            a.as_ref().map(|_| "accepted"),
            b.map(|_| "accepted")
        ),
    }
    match outcome {
        Ok(desired) => check_accepted(files, &desired),
        Err(diags) => {
            assert!(!diags.is_empty(), "refused without a diagnostic");
            for d in &diags {
                check_diagnostic(files, d);
            }
        }
    }
}

fn check_diagnostic(files: &[SourceFile], d: &Diagnostic) {
    let Some(file) = files.iter().find(|f| f.path == d.path) else {
        panic!("diagnostic names no file of the commit: {d:?}");
    };
    assert!(
        !d.message.trim().is_empty(),
        "diagnostic without a message: {d:?}"
    );
    if d.line == 0 {
        assert_eq!(d.col, 0, "a whole-file diagnostic has a column: {d:?}");
    } else {
        let text = String::from_utf8_lossy(&file.bytes);
        let lines: Vec<&str> = text.split('\n').collect();
        assert!(
            d.line <= lines.len(),
            "line {} is past the end of {} ({} lines): {d:?}",
            d.line,
            d.path,
            lines.len()
        );
        let width = lines[d.line - 1].chars().count();
        assert!(
            (1..=width + 1).contains(&d.col),
            "column {} is outside line {} of {} ({width} characters): {d:?}",
            d.col,
            d.line,
            d.path
        );
    }
    let shown = d.to_string();
    assert!(
        !shown.contains(['\n', '\r']),
        "a diagnostic renders as more than one line: {shown:?}"
    );
}

fn check_accepted(files: &[SourceFile], desired: &Desired) {
    assert!(
        desired.cluster.problems().is_empty(),
        "accepted cluster settings with problems: {:?}",
        desired.cluster.problems()
    );
    for host in desired.hosts.values() {
        let problems = host.spec.problems();
        assert!(
            problems.is_empty(),
            "accepted host {} with problems: {problems:?}",
            host.name
        );
    }
    for vm in desired.vms.values() {
        let problems = vm.spec.problems();
        assert!(
            problems.is_empty(),
            "accepted VM {} with problems: {problems:?}",
            vm.name
        );
        assert_eq!(vm.hash, spec_hash(&vm.spec), "VM {}'s hash", vm.name);
    }
    let written = write_back(files, desired);
    match load(&written) {
        Ok(again) => assert_eq!(
            again, *desired,
            "the accepted specs, written back as TOML, load to something else"
        ),
        Err(diags) => panic!(
            "the accepted specs, written back as TOML, are refused: {:?}\n{written:#?}",
            diags.iter().map(ToString::to_string).collect::<Vec<_>>()
        ),
    }
}

/// Every spec of `desired` serialised at the path it came from, and the cluster
/// settings where the commit had them.
fn write_back(files: &[SourceFile], desired: &Desired) -> Vec<SourceFile> {
    let rel_of = |path: &str| {
        files.iter().find(|f| f.path == path).map_or_else(
            || panic!("{path} is not a file of the commit"),
            |f| f.rel.clone(),
        )
    };
    let toml = |what: &str, value: Result<String, toml::ser::Error>| -> Vec<u8> {
        value
            .unwrap_or_else(|e| panic!("{what} does not serialise as TOML: {e}"))
            .into_bytes()
    };
    let mut out = Vec::new();
    if files.iter().any(|f| f.rel == "plasmavmc.toml") {
        let bytes = toml("plasmavmc.toml", toml::to_string(&desired.cluster));
        out.push(source_file("plasmavmc.toml", bytes));
    }
    for host in desired.hosts.values() {
        if let Some(path) = &host.file {
            let bytes = toml(path, toml::to_string(&host.spec));
            out.push(source_file(&rel_of(path), bytes));
        }
    }
    for vm in desired.vms.values() {
        let bytes = toml(&vm.file, toml::to_string(&vm.spec));
        out.push(source_file(&rel_of(&vm.file), bytes));
    }
    out
}

fn source_file(rel: &str, bytes: Vec<u8>) -> SourceFile {
    SourceFile {
        path: format!("{PREFIX}{rel}"),
        rel: rel.to_owned(),
        bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_commits_convert_both_ways() {
        let files = vec![
            ("vms/web.toml".to_owned(), b"vcpus = 2\n".to_vec()),
            ("plasmavmc.toml".to_owned(), b"[timeouts]\n".to_vec()),
            ("vms/x/db.toml".to_owned(), Vec::new()),
        ];
        let data = bytes_from_commit(&files);
        assert_eq!(
            data,
            b"vcpus = 2\n\xff\xff[timeouts]\n\xffvms/x/db.toml\xff".to_vec()
        );
        let commit = commit_from_bytes(&data);
        let got: Vec<(&str, &str, &[u8])> = commit
            .iter()
            .map(|f| (f.path.as_str(), f.rel.as_str(), f.bytes.as_slice()))
            .collect();
        assert_eq!(
            got,
            [
                ("repo/vms/web.toml", "vms/web.toml", &b"vcpus = 2\n"[..]),
                ("repo/plasmavmc.toml", "plasmavmc.toml", b"[timeouts]\n"),
                ("repo/vms/x/db.toml", "vms/x/db.toml", b""),
            ]
        );
        check_commit(&commit);
        // A path given twice keeps its first file, as a git tree would.
        let twice = commit_from_bytes(b"vcpus = 1\xff\xff\xffvms/web.toml\xffvcpus = 0");
        assert_eq!(twice.len(), 1);
        assert_eq!(twice[0].bytes, b"vcpus = 1");
        assert!(commit_from_bytes(b"").is_empty());
    }
}
