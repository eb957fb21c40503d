//! A scripted fake QMP server for the client's tests.
//!
//! In: the server end of a unix stream. Out: helpers a test calls, in the order it chooses, to
//! greet, read commands, reply (in any order), inject events and raw bytes, or hang up.
//! Every read is bounded by [`DEADLINE`], so a broken client fails a test instead of hanging it.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::super::Qmp;

pub(crate) type TestError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type TestResult<T = ()> = Result<T, TestError>;

/// Upper bound for anything a test waits for.
pub(crate) const DEADLINE: Duration = Duration::from_secs(5);

/// What QEMU 7.2 (Debian 12) sends first.
pub(crate) fn greeting() -> Value {
    json!({"QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"},
        "capabilities": ["oob"]
    }})
}

/// The server side of one QMP connection.
pub(crate) struct FakeQemu {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl FakeQemu {
    pub(crate) fn new(stream: UnixStream) -> Self {
        let (read, writer) = stream.into_split();
        Self {
            reader: BufReader::new(read),
            writer,
        }
    }

    /// Sends one message as QEMU does: compact JSON, `\r\n`-terminated.
    pub(crate) async fn send(&mut self, message: &Value) -> TestResult {
        let mut line = message.to_string().into_bytes();
        line.extend_from_slice(b"\r\n");
        self.send_raw(&line).await
    }

    pub(crate) async fn send_raw(&mut self, bytes: &[u8]) -> TestResult {
        tokio::time::timeout(DEADLINE, self.writer.write_all(bytes)).await??;
        Ok(())
    }

    /// The next message from the client, or `None` at EOF.
    pub(crate) async fn recv(&mut self) -> TestResult<Option<Value>> {
        let mut line = String::new();
        let read = tokio::time::timeout(DEADLINE, self.reader.read_line(&mut line)).await??;
        if read == 0 {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str(&line)?))
    }

    /// The names of every command the client sends until it closes the connection.
    pub(crate) async fn rest(&mut self) -> TestResult<Vec<String>> {
        let mut names = Vec::new();
        while let Some(cmd) = self.recv().await? {
            names.push(cmd["execute"].as_str().unwrap_or_default().to_owned());
        }
        Ok(names)
    }

    /// Reads a command, checks its name, and returns its `id` and `arguments`.
    pub(crate) async fn expect(&mut self, command: &str) -> TestResult<(Value, Option<Value>)> {
        let (name, id, arguments) = self.next_command().await?;
        if name != command {
            return Err(format!("expected command {command:?}, got {name:?}").into());
        }
        Ok((id, arguments))
    }

    /// Reads a command: its name, `id` and `arguments`.
    pub(crate) async fn next_command(&mut self) -> TestResult<(String, Value, Option<Value>)> {
        let Some(mut message) = self.recv().await? else {
            return Err("client closed the connection instead of sending a command".into());
        };
        let name = message
            .get("execute")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("not a command: {message}"))?
            .to_owned();
        let id = message
            .get_mut("id")
            .map(Value::take)
            .ok_or_else(|| format!("command without id: {message}"))?;
        let arguments = message.get_mut("arguments").map(Value::take);
        Ok((name, id, arguments))
    }

    pub(crate) async fn reply(&mut self, id: &Value, value: Value) -> TestResult {
        self.send(&json!({"return": value, "id": id})).await
    }

    pub(crate) async fn reply_error(&mut self, id: &Value, class: &str, desc: &str) -> TestResult {
        self.send(&json!({"error": {"class": class, "desc": desc}, "id": id}))
            .await
    }

    /// Sends an event stamped 1700000000 s + `micros` µs.
    pub(crate) async fn event(
        &mut self,
        name: &str,
        data: Option<Value>,
        micros: u32,
    ) -> TestResult {
        let mut event = json!({
            "timestamp": {"seconds": 1_700_000_000_u64, "microseconds": micros},
            "event": name,
        });
        if let Some(data) = data {
            event["data"] = data;
        }
        self.send(&event).await
    }

    /// Hangs up as soon as the client's next bytes arrive, without reading them: the kernel then
    /// gives the client ECONNRESET instead of EOF, as QEMU 7.2 does after `quit`.
    pub(crate) async fn hang_up_unread(self) -> TestResult {
        if !self.reader.buffer().is_empty() {
            return Err("client bytes already read into the buffer".into());
        }
        tokio::time::timeout(DEADLINE, self.reader.get_ref().readable()).await??;
        Ok(())
    }

    /// Greeting and capabilities negotiation, sending `events` before the negotiation's reply.
    pub(crate) async fn greet_with(&mut self, events: &[(&str, u32)]) -> TestResult {
        self.send(&greeting()).await?;
        let (id, arguments) = self.expect("qmp_capabilities").await?;
        if arguments.is_some() {
            return Err("qmp_capabilities sent with arguments".into());
        }
        for (name, micros) in events {
            self.event(name, None, *micros).await?;
        }
        self.reply(&id, json!({})).await
    }

    pub(crate) async fn greet(&mut self) -> TestResult {
        self.greet_with(&[]).await
    }
}

/// A client connected to a fake server, handshake done.
pub(crate) async fn connected() -> TestResult<(Qmp, FakeQemu)> {
    let (client, server) = UnixStream::pair()?;
    let mut fake = FakeQemu::new(server);
    let (qmp, greeted) = tokio::join!(Qmp::from_stream(client, DEADLINE), fake.greet());
    greeted?;
    Ok((qmp?, fake))
}
