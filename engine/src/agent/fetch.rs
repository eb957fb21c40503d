//! Images by URL: the agent downloads each into its file store (`<root>/files/<sha256>`,
//! beside the kernels the engine sends) once, and hands out the stored path only after
//! its SHA-256 matched.
//!
//! In: a URL and the SHA-256 the spec promises. Out: the stored file's path, progress
//! (`done`/`total` bytes about once a second) to a callback, or why not — a mismatch
//! names both digests. The download goes to `.<sha256>.part`; a broken transfer is
//! resumed from the part's length (HTTP `Range`; a server that answers the whole file
//! instead restarts it from zero), and only a verified file is renamed to its final
//! name, so the store never holds a half or a wrong file under a digest. Requests for
//! the same digest wait for the one download in progress. A qcow2 that names a backing
//! or data file is refused: a base image must stand alone, and such a name could point
//! QEMU at any file of the host.
//!
//! ```text
//! stored? ─yes─> path
//!   │no
//! GET [Range: bytes=LEN-] ─206─> append ─┐
//!   ├─200─> truncate, write ────────────┼─> complete? ─> SHA-256 ─ok─> rename ─> path
//!   ├─416─> (part already whole) ───────┘     │broken (retry, resume)   └─bad─> delete, refuse
//!   └─4xx─> refuse
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt as _;
use tracing::{info, warn};

use super::files::{FileError, FileStore};
use crate::digest::sha256_file;
use crate::qemu::img;

/// Attempts per download: the first and the resumptions after a broken transfer.
const ATTEMPTS: u32 = 5;
/// A server that sends nothing for this long has broken the transfer.
const STALL: Duration = Duration::from_secs(60);
/// Progress is reported about this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Errors downloading an image.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Store(#[from] FileError),
    #[error("cannot set up the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("downloading {url} failed after {attempts} attempts")]
    Transfer {
        url: String,
        attempts: u32,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("checksum mismatch for {url}: the spec says sha256 {expected}, the download has sha256 {actual}; discarded, the VM is not started")]
    Mismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{url} is a qcow2 naming another file ({names}); a base image must stand alone")]
    NotStandalone { url: String, names: String },
    #[error("cannot read the image downloaded from {url}")]
    Inspect {
        url: String,
        #[source]
        source: img::ImgError,
    },
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How far a download is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    /// The file's size, when the server said it.
    pub total: Option<u64>,
}

/// Downloads into a [`FileStore`], one download per digest at a time.
#[derive(Debug, Clone)]
pub struct Fetcher {
    store: FileStore,
    client: reqwest::Client,
    /// One lock per digest being fetched: a second request waits, then finds it stored.
    busy: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Fetcher {
    pub fn new(store: FileStore) -> Result<Self, FetchError> {
        // reqwest is built without a default crypto provider (`rustls-no-provider`):
        // ring, set once per process. An error only says one is set already. rustls
        // deprecates ring's provider for lacking post-quantum key exchange; the other
        // (aws-lc-rs) needs cmake on every host, and what a download brings is vouched
        // for by its SHA-256, not by TLS.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(STALL)
            .user_agent(concat!("plasmavmc/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(FetchError::Client)?;
        Ok(Self {
            store,
            client,
            busy: Arc::default(),
        })
    }

    /// The stored file with SHA-256 `sha256`, downloaded from `url` first when the
    /// store lacks it; `progress` hears how far the download is.
    pub async fn fetch(
        &self,
        url: &str,
        sha256: &str,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PathBuf, FetchError> {
        if let Some(path) = self.store.get(sha256)? {
            return Ok(path);
        }
        let lock = self
            .busy
            .lock()
            .expect("busy downloads")
            .entry(sha256.to_owned())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        // The download this one waited for may have stored it.
        if let Some(path) = self.store.get(sha256)? {
            return Ok(path);
        }
        let result = self.download(url, sha256, progress).await;
        self.busy.lock().expect("busy downloads").remove(sha256);
        result
    }

    async fn download(
        &self,
        url: &str,
        sha256: &str,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PathBuf, FetchError> {
        let part = self.store.part(sha256)?;
        let mut attempt = 0;
        let mut restarted = false;
        loop {
            attempt += 1;
            match self.transfer(url, &part, progress).await {
                Ok(()) => {}
                Err(Broken::Fatal(e)) => return Err(e),
                Err(Broken::Retry(source)) if attempt < ATTEMPTS => {
                    warn!(url, attempt, error = %crate::errors::error_chain(&source), "download broken; resuming");
                    // Backoff between attempts, not a wait for a condition.
                    tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
                    continue;
                }
                Err(Broken::Retry(source)) => {
                    return Err(FetchError::Transfer {
                        url: url.to_owned(),
                        attempts: attempt,
                        source,
                    })
                }
            }
            let hashing = part.clone();
            let actual = tokio::task::spawn_blocking(move || sha256_file(&hashing))
                .await
                .map_err(|e| io(&part, std::io::Error::other(e)))?
                .map_err(|e| io(&part, e))?;
            if actual != sha256 {
                let _ = std::fs::remove_file(&part);
                if !restarted {
                    // A resumed download joins two transfers: the file may have changed
                    // between them. Once from zero before refusing it.
                    restarted = true;
                    if attempt > 1 {
                        warn!(url, "the resumed download does not match; downloading it again from the start");
                        continue;
                    }
                }
                return Err(FetchError::Mismatch {
                    url: url.to_owned(),
                    expected: sha256.to_owned(),
                    actual,
                });
            }
            self.check_standalone(url, &part).await?;
            let path = self.store.publish(sha256, &part)?;
            info!(url, sha256, path = %path.display(), "image downloaded and verified");
            return Ok(path);
        }
    }

    /// One GET, resuming the part file when it holds bytes already. `Ok` once the
    /// server sent the whole file.
    async fn transfer(
        &self,
        url: &str,
        part: &Path,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<(), Broken> {
        let have = std::fs::metadata(part).map_or(0, |m| m.len());
        let mut request = self.client.get(url);
        if have > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let mut response = request.send().await.map_err(Broken::Retry)?;
        let status = response.status();
        let (offset, total) = match status.as_u16() {
            206 if resumes_at(&response) == Some(have) => {
                (have, response.content_length().map(|n| n + have))
            }
            // A whole file part-way is one the server cannot extend: check it as it is.
            416 if have > 0 => return Ok(()),
            206 if resumes_at(&response) == Some(0) => (0, response.content_length()),
            200 => (0, response.content_length()),
            206 => {
                // Not the range asked for: drop the part, so the next attempt starts clean.
                let _ = std::fs::remove_file(part);
                return Err(Broken::Fatal(FetchError::Status {
                    url: url.to_owned(),
                    status: 206,
                }));
            }
            code if status.is_server_error() || code == 408 || code == 429 => {
                return Err(Broken::Retry(
                    response
                        .error_for_status()
                        .expect_err("a server error is an error"),
                ));
            }
            code => {
                return Err(Broken::Fatal(FetchError::Status {
                    url: url.to_owned(),
                    status: code,
                }))
            }
        };
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(offset == 0)
            .append(offset > 0)
            .open(part)
            .await
            .map_err(|e| Broken::Fatal(io(part, e)))?;
        let mut done = offset;
        let mut shown: Option<Instant> = None;
        let report = |done| progress(Progress { done, total });
        loop {
            if shown.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
                shown = Some(Instant::now());
                report(done);
            }
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => {
                    // What arrived stays in the part file: the next attempt resumes there.
                    let _ = file.flush().await;
                    return Err(Broken::Retry(e));
                }
            };
            file.write_all(&chunk)
                .await
                .map_err(|e| Broken::Fatal(io(part, e)))?;
            done += chunk.len() as u64;
        }
        file.sync_all()
            .await
            .map_err(|e| Broken::Fatal(io(part, e)))?;
        report(done);
        Ok(())
    }

    /// Refuses a qcow2 that names a backing file or an external data file.
    async fn check_standalone(&self, url: &str, part: &Path) -> Result<(), FetchError> {
        let format = img::detect_format(part).map_err(|e| io(part, e))?;
        if format != img::Format::Qcow2 {
            return Ok(());
        }
        let names = img::info(part)
            .await
            .map_err(|source| FetchError::Inspect {
                url: url.to_owned(),
                source,
            })?
            .other_files();
        if names.is_empty() {
            return Ok(());
        }
        let _ = std::fs::remove_file(part);
        Err(FetchError::NotStandalone {
            url: url.to_owned(),
            names: names.join(", "),
        })
    }
}

/// How one transfer ended badly: worth another attempt, or not.
enum Broken {
    Retry(reqwest::Error),
    Fatal(FetchError),
}

/// Where a 206 answer's `Content-Range: bytes START-END/LEN` starts.
fn resumes_at(response: &reqwest::Response) -> Option<u64> {
    let range = response
        .headers()
        .get(reqwest::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    range
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

fn io(path: &Path, source: std::io::Error) -> FetchError {
    FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use sha2::Digest as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A server on 127.0.0.1 answering every request with the whole of `body`; counts
    /// the requests.
    async fn serve(body: Vec<u8>) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let count = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&count);
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let body = body.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                    let _ = conn.write_all(&body).await;
                });
            }
        });
        (format!("http://127.0.0.1:{port}/disk.raw"), count)
    }

    #[tokio::test]
    async fn one_download_per_digest_and_a_mismatch_names_both_digests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let body: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        let sha = crate::digest::hex(&sha2::Sha256::digest(&body));
        let (url, requests) = serve(body.clone()).await;
        let fetcher = Fetcher::new(FileStore::new(dir.path())).expect("client");
        let seen = Mutex::new(Vec::new());
        let progress = |p: Progress| seen.lock().expect("seen").push(p);
        let (a, b) = tokio::join!(
            fetcher.fetch(&url, &sha, &progress),
            fetcher.fetch(&url, &sha, &progress)
        );
        let path = a.expect("first");
        assert_eq!(path, b.expect("second"));
        assert_eq!(requests.load(Ordering::SeqCst), 1, "downloaded twice");
        assert_eq!(std::fs::read(&path).expect("stored"), body);
        let last = *seen.lock().expect("seen").last().expect("progress");
        assert_eq!(last.done, body.len() as u64);
        assert_eq!(last.total, Some(body.len() as u64));

        let wrong = "ab".repeat(32);
        let err = fetcher
            .fetch(&url, &wrong, &|_| {})
            .await
            .expect_err("a mismatch");
        let text = err.to_string();
        assert!(
            text.contains(&format!("sha256 {wrong}")) && text.contains(&format!("sha256 {sha}")),
            "{text}"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path().join("files"))
            .expect("store")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        assert_eq!(left, [sha], "only the good file stays");
    }
}
