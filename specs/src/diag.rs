//! Diagnostics: one error in one file, located as `path:line:col: message`.
//!
//! In: a file's text and the key path of the offending value (or a byte span from
//! the TOML parser). Out: [`Diagnostic`]s with 1-based line and column. Touches
//! nothing outside the text it is given.

use std::fmt;
use std::ops::Range;

/// One problem found in the desired state, located in the file that holds it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Diagnostic {
    /// Path of the file, relative to the repository root (as git shows it).
    pub path: String,
    /// 1-based line; 0 when the problem concerns the whole file.
    pub line: usize,
    /// 1-based column (in characters); 0 when the problem concerns the whole file.
    pub col: usize,
    pub message: String,
}

impl Diagnostic {
    /// A diagnostic about the file as a whole (no position).
    pub fn file(path: &str, message: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            line: 0,
            col: 0,
            message: one_line(message.into()),
        }
    }

    /// A diagnostic at a byte offset of `text`.
    pub fn at_offset(path: &str, text: &str, offset: usize, message: impl Into<String>) -> Self {
        let (line, col) = line_col(text, offset);
        Self {
            path: path.to_owned(),
            line,
            col,
            message: one_line(message.into()),
        }
    }

    /// A diagnostic at the value found under `key` in the TOML `text`; falls back to the
    /// nearest enclosing key that exists, then to line 1.
    pub fn at_key(path: &str, text: &str, key: &[Seg<'_>], message: impl Into<String>) -> Self {
        let offset = locate(text, key).unwrap_or(0);
        Self::at_offset(path, text, offset, message)
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A committed file name may hold a newline: escape it, so a name can never forge
        // another diagnostic line.
        let path: String = if self.path.chars().any(char::is_control) {
            self.path.escape_debug().collect()
        } else {
            self.path.clone()
        };
        if self.line == 0 {
            write!(f, "{path}: {}", self.message)
        } else {
            write!(f, "{path}:{}:{}: {}", self.line, self.col, self.message)
        }
    }
}

/// `message` with its control characters escaped (`\n` as `\\n`): a message quotes
/// spec content (an unknown variant, a key), which must not start another
/// `path:line:col:` line nor rewrite the terminal.
fn one_line(message: String) -> String {
    if !message.contains(char::is_control) {
        return message;
    }
    let mut out = String::with_capacity(message.len() + 8);
    for c in message.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// One step of a key path into a TOML document: a table key or an array index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// Byte offset of the value at `key` in `text` (the key itself for table entries, so
/// the column points where the operator typed the field). `None` when the text does not
/// parse or has no such key at all.
pub fn locate(text: &str, key: &[Seg<'_>]) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut item: &toml_edit::Item = doc.as_item();
    let mut best: Option<Range<usize>> = None;
    for seg in key {
        let next = match seg {
            Seg::Key(k) => {
                let span = key_span(item, k);
                let next = item.get(*k);
                if let Some(span) = span {
                    best = Some(span);
                }
                next
            }
            Seg::Index(i) => item.get(*i),
        };
        let Some(next) = next else { break };
        if let Some(span) = item_span(next) {
            if !matches!(seg, Seg::Key(_)) || best.is_none() {
                best = Some(span);
            }
        }
        item = next;
    }
    best.map(|r| r.start)
}

fn key_span(item: &toml_edit::Item, key: &str) -> Option<Range<usize>> {
    match item {
        toml_edit::Item::Table(t) => t.key(key).and_then(toml_edit::Key::span),
        toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => {
            t.key(key).and_then(toml_edit::Key::span)
        }
        _ => None,
    }
}

fn item_span(item: &toml_edit::Item) -> Option<Range<usize>> {
    match item {
        toml_edit::Item::None => None,
        toml_edit::Item::Value(v) => v.span(),
        toml_edit::Item::Table(t) => t.span(),
        toml_edit::Item::ArrayOfTables(a) => a.span(),
    }
}

/// 1-based (line, column) of a byte offset; columns count characters, not bytes.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("a = 1\nbb = 2\n", 0), (1, 1));
        assert_eq!(line_col("a = 1\nbb = 2\n", 6), (2, 1));
        assert_eq!(line_col("a = 1\nbb = 2\n", 11), (2, 6));
        assert_eq!(line_col("é = 1", 3), (1, 3));
    }

    #[test]
    fn locate_finds_keys_tables_and_array_items() {
        let text = "vcpus = 1\nmemory_mb = 0\n\n[[disks]]\nname = \"a\"\n\n[[disks]]\nname = \"b\"\nsize_gb = 0\n";
        let at = |k: &[Seg<'_>]| line_col(text, locate(text, k).expect("found"));
        assert_eq!(at(&[Seg::Key("memory_mb")]), (2, 1));
        assert_eq!(
            at(&[Seg::Key("disks"), Seg::Index(1), Seg::Key("size_gb")]),
            (9, 1)
        );
        // A missing key falls back to its nearest parent that exists.
        assert_eq!(
            at(&[Seg::Key("disks"), Seg::Index(0), Seg::Key("size_gb")]).0,
            4
        );
    }

    #[test]
    fn display_is_path_line_col_message() {
        let d = Diagnostic::at_key(
            "vms/a.toml",
            "x = 1\nmemory_mb = 0\n",
            &[Seg::Key("memory_mb")],
            "too small",
        );
        assert_eq!(d.to_string(), "vms/a.toml:2:1: too small");
        assert_eq!(
            Diagnostic::file("vms/b.toml", "bad").to_string(),
            "vms/b.toml: bad"
        );
    }

    #[test]
    fn control_characters_in_messages_are_escaped() {
        let d = Diagnostic::file(
            "vms/a.toml",
            "unknown variant `x\nvms/b.toml:1:1: forged\r`",
        );
        assert_eq!(
            d.to_string(),
            "vms/a.toml: unknown variant `x\\nvms/b.toml:1:1: forged\\r`"
        );
    }
}
