//! QMP wire format: reading bounded lines and classifying the JSON messages in them.
//!
//! In: raw bytes from the QMP stream. Out: [`Message`]s (events, replies, greetings) and the
//! encoded bytes of outgoing commands. Pure parsing: no sockets, no tasks, no shared state.

use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

use super::{QmpError, QmpEvent, QmpVersion};

/// Longest line accepted from QEMU; anything longer is a protocol error that closes the link.
pub(super) const MAX_LINE: usize = 16 * 1024 * 1024;

/// How many bytes of an offending line are kept in errors and logs.
const EXCERPT: usize = 256;

/// One JSON message received from QEMU.
#[derive(Debug)]
pub(super) enum Message {
    /// An asynchronous event.
    Event(QmpEvent),
    /// A command's reply; `id` is whatever QEMU echoed (missing for id-less commands).
    Reply { id: Option<Value>, answer: Answer },
    /// A greeting (`{"QMP": ...}`); only expected as the very first message.
    Greeting(Value),
    /// JSON of no known shape.
    Unknown,
}

/// The outcome of one command, as handed from the I/O tasks to the waiting caller.
#[derive(Debug)]
pub(super) enum Answer {
    /// `{"return": value}`.
    Return(Value),
    /// `{"error": {"class": ..., "desc": ...}}`.
    Error { class: String, desc: String },
    /// The command could not be written to the socket.
    SendFailed(std::io::Error),
}

/// Reads one `\n`-terminated line (terminator included) into `buf`, at most [`MAX_LINE`] bytes.
///
/// Returns `Ok(false)` at a clean EOF. A final line without terminator is returned as a line.
pub(super) async fn read_line<R>(reader: &mut R, buf: &mut Vec<u8>) -> Result<bool, QmpError>
where
    R: AsyncBufRead + Unpin,
{
    buf.clear();
    let limit = u64::try_from(MAX_LINE + 1).expect("MAX_LINE fits in u64");
    let read = reader
        .take(limit)
        .read_until(b'\n', buf)
        .await
        .map_err(QmpError::Io)?;
    if read == 0 {
        return Ok(false);
    }
    if buf.last() != Some(&b'\n') && buf.len() > MAX_LINE {
        return Err(QmpError::LineTooLong { limit: MAX_LINE });
    }
    Ok(true)
}

/// Whether a line holds nothing but whitespace (QEMU never sends these, but they are harmless).
pub(super) fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// A printable, bounded excerpt of a line for errors and logs.
pub(super) fn excerpt(line: &[u8]) -> String {
    let trimmed = line.trim_ascii();
    let cut = &trimmed[..trimmed.len().min(EXCERPT)];
    let mut text = String::from_utf8_lossy(cut).into_owned();
    if cut.len() < trimmed.len() {
        text.push('…');
    }
    text
}

/// Parses and classifies one line.
pub(super) fn parse_message(line: &[u8]) -> Result<Message, QmpError> {
    let value: Value = serde_json::from_slice(line).map_err(|source| QmpError::Protocol {
        line: excerpt(line),
        source,
    })?;
    let Value::Object(mut object) = value else {
        return Ok(Message::Unknown);
    };
    if let Some(Value::String(_)) = object.get("event") {
        return Ok(Message::Event(parse_event(object)));
    }
    if let Some(greeting) = object.remove("QMP") {
        return Ok(Message::Greeting(greeting));
    }
    let id = object.remove("id");
    if let Some(value) = object.remove("return") {
        return Ok(Message::Reply {
            id,
            answer: Answer::Return(value),
        });
    }
    if let Some(error) = object.remove("error") {
        let field = |name: &str| {
            error
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let answer = Answer::Error {
            class: field("class"),
            desc: field("desc"),
        };
        return Ok(Message::Reply { id, answer });
    }
    Ok(Message::Unknown)
}

/// Builds a [`QmpEvent`] from an object known to carry a string `event`.
fn parse_event(mut object: Map<String, Value>) -> QmpEvent {
    let event = match object.remove("event") {
        Some(Value::String(name)) => name,
        _ => String::new(),
    };
    QmpEvent {
        event,
        data: object.remove("data").unwrap_or(Value::Null),
        timestamp: object.get("timestamp").and_then(parse_timestamp),
    }
}

/// `{"seconds": s, "microseconds": us}` → time; QEMU sends `-1` when the clock was unavailable.
pub(super) fn parse_timestamp(value: &Value) -> Option<SystemTime> {
    let seconds = value.get("seconds")?.as_u64()?;
    let micros = value.get("microseconds")?.as_u64()?;
    let micros = u32::try_from(micros).ok().filter(|us| *us < 1_000_000)?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds, micros * 1000))
}

/// Extracts the QEMU version from a greeting's `QMP` object.
pub(super) fn parse_version(greeting: &Value) -> Option<QmpVersion> {
    let qemu = greeting.get("version")?.get("qemu")?;
    let number = |name: &str| qemu.get(name).and_then(Value::as_u64);
    Some(QmpVersion {
        major: number("major")?,
        minor: number("minor")?,
        micro: number("micro")?,
    })
}

/// Encodes `{"execute": command, "arguments": args, "id": id}` plus the line terminator.
pub(super) fn encode_command(command: &str, args: Option<Value>, id: u64) -> Vec<u8> {
    let mut object = Map::new();
    object.insert("execute".to_owned(), Value::from(command));
    if let Some(args) = args {
        object.insert("arguments".to_owned(), args);
    }
    object.insert("id".to_owned(), Value::from(id));
    let mut line = Value::Object(object).to_string().into_bytes();
    line.extend_from_slice(b"\r\n");
    line
}
