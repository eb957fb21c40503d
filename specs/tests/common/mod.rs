//! What the spec tests share: reading spec folders from the source tree.

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every regular file below `dir` as `(path relative to dir, bytes)`, sorted by path.
/// Files and folders whose name `keep` refuses are left out (folders not entered).
pub fn files_below(dir: &Path, keep: &dyn Fn(&str) -> bool) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    walk(dir, dir, keep, &mut out);
    out.sort();
    out
}

fn walk(dir: &Path, base: &Path, keep: &dyn Fn(&str) -> bool, out: &mut Vec<(String, Vec<u8>)>) {
    let entries = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .flatten();
    for entry in entries {
        let path = entry.path();
        if !keep(&entry.file_name().to_string_lossy()) {
            continue;
        }
        if path.is_dir() {
            walk(&path, base, keep, out);
        } else {
            let rel = path.strip_prefix(base).expect("inside").to_string_lossy();
            let bytes =
                std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            out.push((rel.into_owned(), bytes));
        }
    }
}
