//! Disk images by URL against real QEMU: the host's agent downloads the image from a
//! server on 127.0.0.1 ([`plasmavmc_e2e::http::FileServer`]) into its file store, checks
//! its SHA-256, and the disk is a qcow2 overlay on the stored file.
//!
//! What this file proves:
//! - a VM whose disk is `image = { url, sha256 }` runs on a simulated host; the first
//!   response was cut short and the download resumed with `Range` (206); the store holds
//!   the file under its digest and no part file; the overlay's backing file is the
//!   stored file, in qcow2; `apply` showed the download's progress; the stored file's
//!   digest is unchanged after the guest ran (a base image is never written);
//! - a second VM with the same image downloads nothing;
//! - a checksum mismatch refuses the VM with both digests, in `apply`'s output and the
//!   engine's status; no QEMU starts and nothing is stored under either digest;
//! - a server without `Range` support gets the file again from zero after a cut, and the
//!   result is the same verified file.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use plasmavmc_e2e::http::{Faults, FileServer};
use plasmavmc_e2e::{HostSpec, TestRepo, VmSpec, BOOT_TIMEOUT};
use sha2::{Digest, Sha256};

/// A qcow2 holding 4 MiB of data (not just metadata), made by `qemu-img convert`.
fn make_image(dir: &Path) -> Result<Vec<u8>> {
    let raw = dir.join("base.raw");
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&raw, data)?;
    let qcow2 = dir.join("base.qcow2");
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .output()
        .context("running qemu-img")?;
    ensure!(out.status.success(), "qemu-img convert: {out:?}");
    Ok(std::fs::read(&qcow2)?)
}

fn sha256_hex(bytes: &[u8]) -> String {
    plasmavmc::digest::hex(&Sha256::digest(bytes))
}

/// The test guest (direct kernel boot, no disks of its own) with disk `data` as an
/// overlay of the image at `url`.
fn vm_with_image(repo: &TestRepo, url: &str, sha256: &str) -> String {
    let mut text = VmSpec::new().no_disks().to_toml(repo.guest());
    let _ = write!(
        text,
        "\n[[disks]]\nname = \"data\"\nimage = {{ url = {url:?}, sha256 = {sha256:?} }}\n"
    );
    text
}

/// A server with `base.qcow2`, and its bytes.
fn serve(repo: &TestRepo, faults: Faults) -> Result<(FileServer, Vec<u8>)> {
    let image = make_image(repo.root())?;
    let files = BTreeMap::from([("/base.qcow2".to_owned(), image.clone())]);
    Ok((FileServer::start(files, faults)?, image))
}

/// The file store's entries on `host`: `(name, bytes)` (the guest's kernel and initrd
/// among them: they are shipped there too).
fn store(repo: &TestRepo, host: &str) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = std::fs::read_dir(repo.host_root(host).join("files"))
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            Some((e.file_name().to_str()?.to_owned(), e.metadata().ok()?.len()))
        })
        .collect();
    out.sort();
    out
}

/// What `qemu-img info` says of a disk (read without its lock: QEMU holds it).
fn image_info(path: &Path) -> Result<serde_json::Value> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()?;
    ensure!(
        out.status.success(),
        "qemu-img info {}: {out:?}",
        path.display()
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn a_url_image_is_downloaded_once_resumed_verified_and_overlaid() -> Result<()> {
    let repo = TestRepo::new()?;
    let (server, image) = serve(
        &repo,
        Faults {
            cut_responses: 1,
            cut_after: 1 << 20,
            ..Faults::default()
        },
    )?;
    let sha = sha256_hex(&image);
    let url = server.url("base.qcow2");
    repo.write_host("hv1", &HostSpec::default())?;
    repo.write("vms/web.toml", &vm_with_image(&repo, &url, &sha))?;
    repo.commit("web on an image by URL")?;
    let apply = repo.run(&["apply", "--auto-approve"])?;
    apply.expect_code(0)?;
    ensure!(
        apply.stderr.contains("web: hv1: downloading base.qcow2"),
        "apply showed no download progress:\n{apply}"
    );

    // Cut short once, then resumed where the part file ended.
    let seen = server.seen();
    ensure!(seen.len() == 2, "requests: {seen:#?}");
    ensure!(
        seen[0].range.is_none() && seen[0].status == 200,
        "{seen:#?}"
    );
    let resumed_at: u64 = seen[1]
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .with_context(|| format!("the second request did not resume: {seen:#?}"))?;
    ensure!(
        resumed_at > 0 && resumed_at <= 1 << 20 && seen[1].status == 206,
        "{seen:#?}"
    );

    // The store holds the verified file under its digest, and no part file.
    let stored: PathBuf = repo.host_root("hv1").join("files").join(&sha);
    let files = store(&repo, "hv1");
    ensure!(
        files.contains(&(sha.clone(), image.len() as u64))
            && !files.iter().any(|(name, _)| name.starts_with('.')),
        "store: {files:?}"
    );

    // The disk is a qcow2 overlay on the stored file, and the guest runs.
    repo.wait_serial("web", "tick 5", BOOT_TIMEOUT)?;
    let overlay = repo.instance_dir_on("hv1", "web").join("disks/data.qcow2");
    let info = image_info(&overlay)?;
    ensure!(
        info["backing-filename"].as_str() == Some(&*stored.to_string_lossy())
            && info["backing-filename-format"].as_str() == Some("qcow2"),
        "overlay: {info:#}"
    );
    repo.qemu_pid("web")?;

    // A second VM with the same image: nothing is downloaded.
    repo.write("vms/web2.toml", &vm_with_image(&repo, &url, &sha))?;
    repo.commit("web2 on the same image")?;
    let apply = repo.run(&["apply", "--auto-approve"])?;
    apply.expect_code(0)?;
    ensure!(
        server.seen().len() == 2 && !apply.stderr.contains("downloading"),
        "the second VM downloaded again: {:#?}\n{apply}",
        server.seen()
    );
    repo.wait_serial("web2", "tick 3", BOOT_TIMEOUT)?;

    // The base image was never written: both guests ran on it.
    ensure!(
        sha256_hex(&std::fs::read(&stored)?) == sha,
        "the stored image changed under the guests"
    );
    repo.cleanup()
}

#[test]
fn a_checksum_mismatch_refuses_the_vm_with_both_digests() -> Result<()> {
    let repo = TestRepo::new()?;
    let (server, image) = serve(&repo, Faults::default())?;
    let actual = sha256_hex(&image);
    let wrong = sha256_hex(b"not the image");
    repo.write_host("hv1", &HostSpec::default())?;
    repo.write(
        "vms/web.toml",
        &vm_with_image(&repo, &server.url("base.qcow2"), &wrong),
    )?;
    repo.commit("web on the wrong digest")?;
    let apply = repo.run(&["apply", "--auto-approve"])?;
    apply.expect_code(1)?;
    let fail = apply.fail_line("web")?;
    ensure!(
        fail.contains("checksum mismatch")
            && fail.contains(&format!("sha256 {wrong}"))
            && fail.contains(&format!("sha256 {actual}")),
        "the refusal does not name both digests: {fail}"
    );
    let status = repo.status_json()?;
    ensure!(
        status.to_string().contains(&actual),
        "status does not say it: {status:#}"
    );
    ensure!(repo.qemu_pids().is_empty(), "a QEMU started");
    let files = store(&repo, "hv1");
    ensure!(
        !files
            .iter()
            .any(|(name, _)| name.starts_with('.') || *name == wrong || *name == actual),
        "something of the image was kept: {files:?}"
    );
    repo.cleanup()
}

#[test]
fn a_server_without_ranges_restarts_a_cut_download_from_zero() -> Result<()> {
    let repo = TestRepo::new()?;
    let (server, image) = serve(
        &repo,
        Faults {
            cut_responses: 1,
            cut_after: 512 << 10,
            ignore_range: true,
        },
    )?;
    let sha = sha256_hex(&image);
    repo.write_host("hv1", &HostSpec::default())?;
    let text = vm_with_image(&repo, &server.url("base.qcow2"), &sha)
        .replace("power = \"running\"", "power = \"stopped\"");
    repo.write("vms/web.toml", &text)?;
    repo.commit("web, stopped, on an image by URL")?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    let seen = server.seen();
    ensure!(
        seen.len() == 2 && seen[1].range.is_some() && seen[1].status == 200,
        "{seen:#?}"
    );
    let files = store(&repo, "hv1");
    ensure!(
        files.contains(&(sha.clone(), image.len() as u64))
            && !files.iter().any(|(name, _)| name.starts_with('.')),
        "store: {files:?}"
    );
    let stored = std::fs::read(repo.host_root("hv1").join("files").join(&sha))?;
    ensure!(
        sha256_hex(&stored) == sha,
        "the restarted download is not the file"
    );
    ensure!(repo.qemu_pids().is_empty(), "a stopped VM started");
    repo.cleanup()
}
