//! What the tests of whole commits share: a file of a commit, and the errors a refused
//! commit gets, as `path:line:col: message` lines.

use plasmavmc_specs::{load, Diagnostic, SourceFile};

/// `rel` of the spec folder with `text`, as the loader gets it from a commit.
pub fn file(rel: &str, text: &str) -> SourceFile {
    SourceFile {
        path: format!("repo/{rel}"),
        rel: rel.to_owned(),
        bytes: text.as_bytes().to_vec(),
    }
}

/// The diagnostics of a commit that must be refused.
pub fn errors(files: &[SourceFile]) -> Vec<String> {
    load(files)
        .expect_err("must be refused")
        .iter()
        .map(Diagnostic::to_string)
        .collect()
}
