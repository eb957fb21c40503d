//! A small HTTP/1.1 file server on 127.0.0.1 for the images-by-URL tests: `GET` of the
//! files it was given, `Range: bytes=N-` answered with `206` (or ignored on request),
//! and the first few responses cut short after a number of body bytes (the connection
//! closes mid-file), as a flaky network or server would. It records every request.
//!
//! One thread accepts, one thread per connection; every response closes its
//! connection. Dropping the server stops accepting.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use anyhow::{Context, Result};

/// How the server misbehaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Cut this many responses (the first ones) short.
    pub cut_responses: u32,
    /// …after this many body bytes.
    pub cut_after: u64,
    /// Answer every request with the whole file (`200`), as a server without range
    /// support does.
    pub ignore_range: bool,
}

/// One request the server saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    /// The `Range` header, as sent.
    pub range: Option<String>,
    /// The status answered.
    pub status: u16,
}

/// A running server; stops accepting when dropped.
#[derive(Debug)]
pub struct FileServer {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

struct Shared {
    files: BTreeMap<String, Vec<u8>>,
    faults: Faults,
    cut: AtomicU32,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FileServer {
    /// Serves `files` (`/name` → bytes) on a free port of 127.0.0.1.
    pub fn start(files: BTreeMap<String, Vec<u8>>, faults: Faults) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1")?;
        let port = listener.local_addr()?.port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            files,
            faults,
            cut: AtomicU32::new(0),
            seen: Arc::clone(&seen),
        });
        let stopping = Arc::clone(&stop);
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let shared = Arc::clone(&shared);
                thread::spawn(move || {
                    let _ = serve(&shared, conn);
                });
            }
        });
        Ok(Self { port, seen, stop })
    }

    /// `http://127.0.0.1:PORT/name`.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// Every request so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(shared: &Shared, mut conn: TcpStream) -> Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_owned());
            }
        }
    }
    let mut words = request_line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let file = shared.files.get(path).filter(|_| method == "GET");
    let Some(file) = file else {
        record(shared, path, range, 404);
        conn.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    };
    let len = file.len() as u64;
    let start = range
        .as_deref()
        .filter(|_| !shared.faults.ignore_range)
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<u64>().ok());
    let (status, from, head) = match start {
        Some(n) if n >= len => {
            record(shared, path, range, 416);
            let head = format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            conn.write_all(head.as_bytes())?;
            return Ok(());
        }
        Some(n) => (
            206,
            n,
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {n}-{}/{len}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                len - 1,
                len - n
            ),
        ),
        None => (
            200,
            0,
            format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n"),
        ),
    };
    record(shared, path, range, status);
    conn.write_all(head.as_bytes())?;
    let body = &file[usize::try_from(from)?..];
    let cut = shared.cut.fetch_add(1, Ordering::SeqCst) < shared.faults.cut_responses;
    if cut {
        let keep = body.len().min(usize::try_from(shared.faults.cut_after)?);
        conn.write_all(&body[..keep])?;
        conn.flush()?;
        // Closed mid-body: the client got fewer bytes than Content-Length promised.
        conn.shutdown(Shutdown::Both)?;
        return Ok(());
    }
    conn.write_all(body)?;
    Ok(())
}

fn record(shared: &Shared, path: &str, range: Option<String>, status: u16) {
    shared.seen.lock().expect("seen").push(Seen {
        path: path.to_owned(),
        range,
        status,
    });
}
