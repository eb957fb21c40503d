//! The published JSON Schemas (`schemas/`) and the examples stay in step with the types;
//! the cloud-init files the examples name pass the engine's checks.

mod common;

use common::{files_below, workspace};
use std::path::Path;

use plasmavmc_specs::cloud_init::{check, Part};
use plasmavmc_specs::{load, CloudInit, SourceFile};

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
        for vm in desired.vms.values() {
            check_seed_files(&dir, vm.spec.cloud_init.as_ref());
        }
    }
    assert!(seen > 0, "no example VM found");
}

/// The seed files an example's `[cloud_init]` names in the example itself pass the
/// engine's checks (absolute paths, secrets on the controller, are not in the repo).
fn check_seed_files(dir: &Path, seed: Option<&CloudInit>) {
    let Some(seed) = seed else { return };
    for part in Part::ALL {
        let Some(rel) = seed.path(part).filter(|p| !p.starts_with('/')) else {
            continue;
        };
        let path = dir.join(rel);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(p) = check(part, &bytes) {
            panic!("{}:{}:{}: {}", path.display(), p.line, p.col, p.message);
        }
    }
}
