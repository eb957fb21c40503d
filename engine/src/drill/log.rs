//! The daemon's JSON log (`plasmavmc watch --log-format json`), read back: the drill
//! times its rows by these lines, and the end-to-end tests wait for them
//! (`tests/harness/daemon.rs`).
//!
//! In: the text of a log file. Out: its complete lines as [`LogLine`]s (a line still
//! being written is left for the next read; lines that are not JSON objects are
//! skipped). Fields are found at the top level or, in tracing-subscriber's unflattened
//! layout, under `fields`.

use std::fmt::Display;
use std::time::SystemTime;

use anyhow::{Context as _, Result};
use serde_json::Value;

/// One JSON log line of the daemon.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub raw: Value,
}

/// Every complete JSON line of `text`, in order (other lines skipped).
pub fn lines(text: &str) -> Vec<LogLine> {
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(Value::is_object)
        .map(|raw| LogLine { raw })
        .collect()
}

impl LogLine {
    /// A field: at the top level, or (tracing-subscriber's unflattened layout) under
    /// `fields`.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.raw
            .get(name)
            .or_else(|| self.raw.get("fields")?.get(name))
    }

    /// A string field.
    pub fn str(&self, name: &str) -> Option<&str> {
        self.field(name)?.as_str()
    }

    /// An integer field (written as a number or a string).
    pub fn int(&self, name: &str) -> Option<i64> {
        match self.field(name)? {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
    }

    /// The `message` field.
    pub fn message(&self) -> &str {
        self.str("message").unwrap_or_default()
    }

    /// True if the message is `message` and, when given, the `vm` field is `vm`.
    pub fn is(&self, message: &str, vm: Option<&str>) -> bool {
        self.message() == message && vm.is_none_or(|vm| self.str("vm") == Some(vm))
    }

    /// The `pid` field as a pid.
    pub fn pid(&self) -> Result<i32> {
        self.int("pid")
            .and_then(|p| i32::try_from(p).ok())
            .with_context(|| format!("no pid in {}", self.raw))
    }

    /// Milliseconds from `start` to the line's timestamp (negative if the line is
    /// older: shown as is, not hidden).
    pub fn ms_after(&self, start: SystemTime) -> Result<f64> {
        let at = self.timestamp()?;
        Ok(match at.duration_since(start) {
            Ok(d) => d.as_secs_f64() * 1e3,
            Err(e) => -e.duration().as_secs_f64() * 1e3,
        })
    }

    /// The `timestamp` field (RFC 3339, UTC).
    pub fn timestamp(&self) -> Result<SystemTime> {
        let text = self
            .str("timestamp")
            .with_context(|| format!("log line without a timestamp: {}", self.raw))?;
        humantime::parse_rfc3339_weak(text)
            .with_context(|| format!("log timestamp {text:?} is not RFC 3339"))
    }
}

impl Display for LogLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.raw)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn line(text: &str) -> LogLine {
        LogLine {
            raw: serde_json::from_str(text).expect("test JSON"),
        }
    }

    #[test]
    fn fields_flat_or_nested_and_timestamps() -> Result<()> {
        let flat = line(
            r#"{"timestamp":"2026-11-26T21:30:00.123456Z","level":"INFO","message":"vm exited","vm":"web","pid":1234,"reason":"crash"}"#,
        );
        assert!(flat.is("vm exited", Some("web")));
        assert!(!flat.is("vm exited", Some("db")));
        assert_eq!(flat.int("pid"), Some(1234));
        assert_eq!(flat.str("reason"), Some("crash"));
        let at = flat.timestamp()?;
        let base = humantime::parse_rfc3339("2026-11-26T21:30:00Z")?;
        assert_eq!(at.duration_since(base)?, Duration::from_micros(123_456));

        let nested = line(
            r#"{"timestamp":"2026-11-26T21:30:00Z","level":"INFO","fields":{"message":"started","vm":"web","pid":"77"}}"#,
        );
        assert!(nested.is("started", Some("web")));
        assert_eq!(nested.int("pid"), Some(77));
        Ok(())
    }

    #[test]
    fn only_complete_json_objects_are_lines() {
        let text = "{\"message\":\"a\"}\nnot json\n[1]\n{\"message\":\"b\"}\n{\"message\":\"c";
        let read: Vec<String> = lines(text).iter().map(|l| l.message().to_owned()).collect();
        assert_eq!(read, ["a", "b"]);
    }
}
