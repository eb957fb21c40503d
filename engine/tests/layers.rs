//! The layering of `engine/src/lib.rs`, checked: every `crate::MODULE` path in a source
//! file (comments and test code aside) names a module of a lower layer than the file's
//! own. A new module must be placed in the table; an import that runs up or sideways
//! fails here with the file and line.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Module -> its layer (0 = ground floor), from the text block under "## Layers".
fn layers(lib: &str) -> BTreeMap<String, usize> {
    let section = lib
        .split("//! ## Layers")
        .nth(1)
        .expect("lib.rs has a \"## Layers\" section");
    let block: Vec<&str> = section
        .lines()
        .map(|l| l.trim_start_matches("//!").trim_start())
        .skip_while(|l| !l.starts_with("```text"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .collect();
    let count = block.len();
    let mut out = BTreeMap::new();
    for (i, line) in block.iter().enumerate() {
        let names = line.split("  ").next().unwrap_or_default();
        for name in names.split_whitespace() {
            assert!(
                out.insert(name.to_owned(), count - 1 - i).is_none(),
                "{name} is in the layer table twice"
            );
        }
    }
    out
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("readable source folder").flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether a file is test code only (`tests.rs`, files under a `tests/` folder, the
/// test helpers).
fn is_test_file(rel: &Path) -> bool {
    rel.components().any(|c| c.as_os_str() == "tests")
        || rel
            .file_stem()
            .is_some_and(|s| s == "tests" || s == "test_utils")
}

/// `text` without its inline `#[cfg(test)] mod tests { ... }` blocks (braces counted).
fn without_test_modules(text: &str) -> String {
    const MARK: &str = "#[cfg(test)]\nmod tests {";
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(MARK) {
        out.push_str(&rest[..start]);
        let body = &rest[start + MARK.len()..];
        let mut depth = 1usize;
        let mut end = body.len();
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &body[end..];
    }
    out.push_str(rest);
    out
}

#[test]
fn every_import_runs_down_the_layer_table() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let table = layers(&fs::read_to_string(src.join("lib.rs")).expect("lib.rs"));
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|c| c.trim_end_matches(".rs").to_owned())
            .unwrap_or_default();
        if matches!(top.as_str(), "lib" | "main") || is_test_file(rel) {
            continue;
        }
        let Some(&own) = table.get(&top) else {
            wrong.push(format!(
                "{}: module {top} is not in the layer table of lib.rs",
                rel.display()
            ));
            continue;
        };
        let text = fs::read_to_string(&file).expect("readable source");
        let code = without_test_modules(&text);
        for (n, line) in code.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for piece in line.split("crate::").skip(1) {
                let used: String = piece
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if used == top || used == "test_utils" || used.is_empty() {
                    continue;
                }
                match table.get(&used) {
                    Some(&theirs) if theirs < own => {}
                    Some(_) => wrong.push(format!(
                        "{}:{}: {top} uses {used}, which is not below it",
                        rel.display(),
                        n + 1
                    )),
                    None => wrong.push(format!(
                        "{}:{}: {used} is not in the layer table of lib.rs",
                        rel.display(),
                        n + 1
                    )),
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn every_module_of_lib_rs_is_in_the_table() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
    let table = layers(&lib);
    for line in lib.lines() {
        if let Some(name) = line
            .strip_prefix("pub mod ")
            .and_then(|l| l.strip_suffix(';'))
        {
            assert!(
                table.contains_key(name),
                "pub mod {name} is not in the layer table"
            );
        }
    }
}

#[test]
fn inline_test_modules_are_left_out_and_what_follows_them_is_not() {
    let text = "use crate::a;\n#[cfg(test)]\nmod tests {\n    fn f() { let _ = \"{x}\"; }\n}\nuse crate::b;\n";
    let code = without_test_modules(text);
    assert!(
        code.contains("crate::a") && code.contains("crate::b"),
        "{code}"
    );
    assert!(!code.contains("fn f"), "{code}");
}
