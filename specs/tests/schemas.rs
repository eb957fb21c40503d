//! The published JSON Schemas (`schemas/`) and the examples stay in step with the types.

use std::path::{Path, PathBuf};

use plasmavmc_specs::{load, SourceFile};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

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

fn collect(dir: &Path, base: &Path, out: &mut Vec<SourceFile>) {
    for entry in std::fs::read_dir(dir)
        .expect("readable example folder")
        .flatten()
    {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "guest" {
            continue;
        }
        if path.is_dir() {
            collect(&path, base, out);
        } else if name.ends_with(".toml") {
            let rel = path
                .strip_prefix(base)
                .expect("inside")
                .to_string_lossy()
                .into_owned();
            out.push(SourceFile {
                path: path.display().to_string(),
                rel,
                bytes: std::fs::read(&path).expect("readable"),
            });
        }
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
        let mut files = Vec::new();
        collect(&dir, &dir, &mut files);
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
