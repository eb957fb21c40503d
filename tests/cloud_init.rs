//! `[cloud_init]`: the NoCloud seed, end to end on real QEMU and a simulated host.
//!
//! What this file proves (the seed's content is read back by independent readers:
//! `blkid` for the label, mtools for the files; real cloud-init reads it in
//! `tests/real_guest.rs`):
//! - the engine builds the seed from a repository file and a file outside the
//!   repository, sends it to the host, keeps it there `0600`, and QEMU gets it read-only;
//! - a changed user-data file restarts the VM with a new instance-id, and `plan` shows the
//!   file's diff but never the content of a file outside the repository;
//! - a live move takes the seed along (the target gets its own `0600` copy);
//! - bad user data is refused at `path:line:col` of the user-data file, and nothing is
//!   touched.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use plasmavmc_e2e::{HostSpec, TestRepo, VmSpec};

/// `mtype -i IMAGE ::NAME`: a file of the FAT volume, read by mtools.
fn mtype(image: &Path, name: &str) -> Result<String> {
    let out = Command::new("mtype")
        .arg("-i")
        .arg(image)
        .arg(format!("::{name}"))
        .output()
        .context("running mtype (mtools)")?;
    ensure!(
        out.status.success(),
        "mtype {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The volume label `blkid` reads.
fn label(image: &Path) -> Result<String> {
    let out = Command::new("blkid")
        .args(["-o", "value", "-s", "LABEL"])
        .arg(image)
        .output()
        .context("running blkid")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn instance_id(meta: &str) -> Option<String> {
    meta.lines()
        .find_map(|l| l.strip_prefix("instance-id: "))
        .map(str::to_owned)
}

#[test]
fn the_seed_is_built_sent_read_back_and_follows_its_files() -> Result<()> {
    let repo = TestRepo::new()?;
    repo.write_host("hv1", &HostSpec::default())?;
    repo.write_host("hv2", &HostSpec::default())?;
    let secret = repo.root().join("secret-meta.yaml");
    std::fs::write(
        &secret,
        "local-hostname: web.example\nsecret-token: s3cr3t-1\n",
    )?;
    let vm = |host: &str| {
        format!(
            "{}\n[cloud_init]\nuser_data = \"cloud-init/web.yaml\"\nnetwork_config = \
             \"cloud-init/net.yaml\"\nmeta_data = \"{}\"\n",
            VmSpec::new().pin(host).to_toml(repo.guest()),
            secret.display()
        )
    };
    repo.write("vms/web.toml", &vm("hv1"))?;
    repo.write("cloud-init/web.yaml", "#cloud-config\nhostname: web-1\n")?;
    repo.write("cloud-init/net.yaml", "version: 2\nethernets: {}\n")?;
    repo.commit("web with a seed")?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    let pid = repo.qemu_pid("web")?;

    let dir = repo.instance_dir_on("hv1", "web");
    let image = dir.join("cidata.img");
    let mode = std::fs::metadata(&image)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "the seed is mode {mode:o}, not 600");
    ensure!(label(&image)? == "cidata", "label {:?}", label(&image)?);
    ensure!(mtype(&image, "user-data")? == "#cloud-config\nhostname: web-1\n");
    ensure!(mtype(&image, "network-config")? == "version: 2\nethernets: {}\n");
    let meta = mtype(&image, "meta-data")?;
    let first_id = instance_id(&meta).context("no instance-id")?;
    ensure!(
        meta.contains("local-hostname: web.example\n") && !meta.contains("local-hostname: web\n"),
        "the extra meta-data's hostname should replace the VM's name:\n{meta}"
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    ensure!(
        cmdline.contains("filename=cidata.img,node-name=seed_file,read-only=on"),
        "QEMU does not get the seed read-only: {cmdline}"
    );

    // A changed user-data file: a new instance, a restart, the diff in the plan.
    repo.write("cloud-init/web.yaml", "#cloud-config\nhostname: web-2\n")?;
    std::fs::write(
        &secret,
        "local-hostname: web.example\nsecret-token: s3cr3t-2\n",
    )?;
    repo.commit("web-2")?;
    let plan = repo.run(&["plan"])?;
    plan.expect_code(0)?;
    for needle in [
        "restart web on hv1: the cloud-init seed (instance-id",
        "-hostname: web-1",
        "+hostname: web-2",
        "outside the repository, not shown",
    ] {
        ensure!(
            plan.stdout.contains(needle),
            "plan lacks {needle:?}:\n{plan}"
        );
    }
    ensure!(
        !plan.stdout.contains("s3cr3t"),
        "plan shows a secret:\n{plan}"
    );
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    let second = repo.qemu_pid("web")?;
    ensure!(second != pid, "the VM was not restarted for its new seed");
    ensure!(mtype(&image, "user-data")? == "#cloud-config\nhostname: web-2\n");
    let meta = mtype(&image, "meta-data")?;
    ensure!(meta.contains("s3cr3t-2"), "old extra meta-data:\n{meta}");
    let second_id = instance_id(&meta).context("no instance-id")?;
    ensure!(second_id != first_id, "the instance-id did not change");

    // A live move (local disks mirrored) takes the seed along: the target's QEMU has
    // the same seed device, from its own copy.
    let seen = repo.ticking_on("hv1", "web", 3)?;
    let on_hv1 = std::fs::read(&image)?;
    repo.write("vms/web.toml", &vm("hv2"))?;
    repo.commit("web to hv2")?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    let moved = repo.only_on("hv2", "web")?;
    repo.ticking_on("hv2", "web", seen)?;
    let there = repo.instance_dir_on("hv2", "web").join("cidata.img");
    ensure!(
        std::fs::read(&there)? == on_hv1,
        "hv2's seed differs from hv1's"
    );
    ensure!(std::fs::metadata(&there)?.permissions().mode() & 0o777 == 0o600);

    // Bad user data: refused where it is wrong, nothing touched.
    repo.write("cloud-init/web.yaml", "hostname: web-3\n")?;
    repo.commit("no header")?;
    let out = repo.run(&["apply", "--auto-approve"])?;
    out.expect_code(1)?;
    let all = format!("{}{}", out.stdout, out.stderr);
    ensure!(
        all.contains("cloud-init/web.yaml:1:1: user-data of VM web: user data must start with"),
        "no located error:\n{out}"
    );
    ensure!(
        repo.only_on("hv2", "web")? == moved,
        "a bad commit touched the VM"
    );
    ensure!(mtype(&there, "user-data")? == "#cloud-config\nhostname: web-2\n");
    Ok(())
}
