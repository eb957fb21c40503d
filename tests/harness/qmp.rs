//! A blocking QMP client for benchmarks and tests that drive QEMU by hand (the engine's
//! own client is async and internal): one command at a time, events skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// A negotiated QMP connection.
#[derive(Debug)]
pub struct RawQmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl RawQmp {
    /// Connects to the socket at `path` (waiting up to `timeout` for it to appear) and
    /// leaves capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e).with_context(|| format!("QMP {}", path.display())),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let writer = stream.try_clone()?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.line()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn line(&mut self) -> Result<Value> {
        let mut text = String::new();
        if self.reader.read_line(&mut text)? == 0 {
            bail!("QMP connection closed");
        }
        serde_json::from_str(&text).with_context(|| format!("QMP said {text:?}"))
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        writeln!(self.writer, "{msg}")?;
        loop {
            let reply = self.line()?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                bail!("QMP {command}: {err}");
            }
        }
    }
}
