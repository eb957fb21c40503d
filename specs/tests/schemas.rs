//! The published JSON Schemas (`schemas/`) and the examples stay in step with the types.

mod common;

use common::{files_below, workspace};
use plasmavmc_specs::{load, SourceFile};

#[test]
fn committed_schemas_are_up_to_date() {
    for (name, fresh) in plasmavmc_specs::schema::all() {
        let path = workspace().join("schemas").join(name);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == fresh,
            "{} is out of date with the spec types; regenerate with `cargo run -p plasmavmc -- schema --out schemas`",
            path.display()
        );
    }
}

#[test]
fn every_example_is_valid_and_points_editors_at_the_schema() {
    let examples = workspace().join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&examples).expect("examples/").flatten() {
        let dir = entry.path();
        if !dir.join("vms").is_dir() {
            continue;
        }
        let files: Vec<SourceFile> =
            files_below(&dir, &|name| !name.starts_with('.') && name != "guest")
                .into_iter()
                .filter(|(rel, _)| rel.ends_with(".toml"))
                .map(|(rel, bytes)| SourceFile {
                    path: dir.join(&rel).display().to_string(),
                    rel,
                    bytes,
                })
                .collect();
        for f in &files {
            let text = String::from_utf8_lossy(&f.bytes);
            assert!(
                text.starts_with("#:schema "),
                "{} lacks a #:schema directive on its first line",
                f.path
            );
        }
        let desired =
            load(&files).unwrap_or_else(|e| panic!("{} is invalid: {e:#?}", dir.display()));
        seen += desired.vms.len();
    }
    assert!(seen > 0, "no example VM found");
}
