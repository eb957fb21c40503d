//! `plasmavmc disks`: every disk the engine knows of, and the one explicit way to delete
//! one. Real QEMU on two simulated hosts sharing a storage pool.
//!
//! What this file proves (one test, in order):
//! - `disks` lists local disks per host and a shared disk once for its pool, all in use;
//! - after their specs are removed, a local disk is listed as retained (since when,
//!   why) and a shared disk as an orphan left in place; `--orphans` lists only those;
//! - beside a running `watch` the listing works, and a delete is refused (nothing
//!   deleted);
//! - a delete is refused without the same `--confirm` path, and for a disk a VM of the
//!   specs uses; the file stays;
//! - a retained and an orphaned shared disk are deleted, and no longer listed.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use plasmavmc_e2e::{HostSpec, TestRepo, VmSpec};
use serde_json::Value;

/// `disks [extra] --json`, parsed.
fn listed(repo: &TestRepo, extra: &[&str]) -> Result<Vec<Value>> {
    let mut args = vec!["disks", "--json"];
    args.extend_from_slice(extra);
    let out = repo.run(&args)?;
    out.expect_code(0)?;
    let all: Value = serde_json::from_str(&out.stdout).with_context(|| out.to_string())?;
    Ok(all.as_array().cloned().unwrap_or_default())
}

/// The listed disk of `vm` (exactly one).
fn one<'a>(disks: &'a [Value], vm: &str) -> Result<&'a Value> {
    let found: Vec<&Value> = disks.iter().filter(|d| d["vm"] == vm).collect();
    ensure!(
        found.len() == 1,
        "expected one disk of {vm}, got {found:#?}"
    );
    Ok(found[0])
}

fn path_of(disk: &Value) -> PathBuf {
    PathBuf::from(disk["path"].as_str().unwrap_or_default())
}

fn delete(repo: &TestRepo, path: &Path, confirm: &Path) -> Result<plasmavmc_e2e::Output> {
    let (p, c) = (path.display().to_string(), confirm.display().to_string());
    repo.run(&["disks", "delete", &p, "--confirm", &c])
}

#[test]
fn disks_are_listed_everywhere_and_deleted_only_on_request() -> Result<()> {
    let repo = TestRepo::new()?;
    let pool = repo.root().join("pool");
    std::fs::create_dir_all(&pool)?;
    for host in ["hv1", "hv2"] {
        repo.write_host(host, &HostSpec::agent().shared(&pool, "pool1"))?;
    }
    let mut local = VmSpec::new().no_disks().disk("data", 1);
    local.storage = Some("local".to_owned());
    repo.write_vm("web", &local.clone().pin("hv1"))?;
    repo.write_vm("keep", &local.clone().pin("hv2"))?;
    repo.write_vm("db", &VmSpec::new().shared_disks().pin("hv1"))?;
    repo.commit("web and keep with local disks, db with a shared one")?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;

    let disks = listed(&repo, &[])?;
    ensure!(disks.len() == 3, "expected 3 disks: {disks:#?}");
    let db = one(&disks, "db")?;
    ensure!(
        db["location"] == "pool pool1" && db["in_use"] == true && db["kind"] == "shared",
        "db's shared disk: {db:#}"
    );
    ensure!(one(&disks, "web")?["location"] == "host hv1");
    let keep = path_of(one(&disks, "keep")?);

    repo.remove("vms/web.toml")?;
    repo.remove("vms/db.toml")?;
    repo.commit("web and db removed")?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    let orphans = listed(&repo, &["--orphans"])?;
    ensure!(orphans.len() == 2, "expected 2 unused disks: {orphans:#?}");
    let web = one(&orphans, "web")?;
    ensure!(
        web["kind"] == "retained"
            && web["since"].is_string()
            && web["state"]
                .as_str()
                .is_some_and(|s| s.contains("VM removed from the specs")),
        "web's retained disk: {web:#}"
    );
    let db = one(&orphans, "db")?;
    ensure!(
        db["state"]
            .as_str()
            .is_some_and(|s| s.starts_with("orphan: VM db is not in the specs")),
        "db's shared disk: {db:#}"
    );
    let (web, db) = (path_of(web), path_of(db));

    // Beside a running engine: listed, never deleted.
    {
        let daemon = repo.watch(&[])?;
        daemon.wait_running("keep")?;
        ensure!(
            listed(&repo, &[])?.len() == 3,
            "the listing fails beside watch"
        );
        let out = delete(&repo, &web, &web)?;
        out.expect_code(1)?;
        ensure!(
            out.stderr.contains("holds the state directory") && web.exists(),
            "a delete beside watch:\n{out}"
        );
    }

    let out = delete(&repo, &web, &db)?;
    out.expect_code(1)?;
    ensure!(out.stderr.contains("--confirm must repeat the path") && web.exists());
    let out = delete(&repo, &keep, &keep)?;
    out.expect_code(1)?;
    ensure!(
        out.stderr
            .contains("is a disk of VM keep, which is in the specs")
            && keep.exists(),
        "deleting a disk in use:\n{out}"
    );

    for gone in [&web, &db] {
        delete(&repo, gone, gone)?.expect_code(0)?;
        ensure!(!gone.exists(), "{} is still there", gone.display());
    }
    let left = listed(&repo, &[])?;
    ensure!(
        left.len() == 1 && left[0]["vm"] == "keep",
        "after the deletes: {left:#?}"
    );
    Ok(())
}
