//! Helpers shared by unit and component tests (compiled only for tests).

use plasmavmc_specs::{load, Desired, SourceFile};

/// Spec files as a commit would give them: `(path, text)`, path = rel.
pub fn files(files: &[(&str, &str)]) -> Vec<SourceFile> {
    files
        .iter()
        .map(|(rel, text)| SourceFile {
            path: (*rel).to_owned(),
            rel: (*rel).to_owned(),
            bytes: text.as_bytes().to_vec(),
        })
        .collect()
}

/// The validated desired state of those files (panics when they are invalid).
pub fn desired(list: &[(&str, &str)]) -> Desired {
    load(&files(list)).expect("valid specs")
}
