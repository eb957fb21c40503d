//! The corpus of bad inputs (`tests/corpus/`, see its README): every bad commit is
//! refused as a whole with a clear `path:line:col:` (or `path:`) error and exit 1,
//! and nothing running is touched while it is the newest commit; every bad
//! repository, revision or spec folder fails with one clear line.
//!
//! - `every_bad_commit_is_refused_and_touches_nothing`: one repository with one
//!   running VM (`web`); for each case, baseline + the case's files is committed,
//!   then `validate`, `plan` and `apply --auto-approve` must each exit 1 with every
//!   expected fragment on stderr, `last_error` of `status/engine.toml` must hold the
//!   first one, and the VM's QEMU must be the same live process (no other QEMU, no
//!   applied revision). Then the case is removed (a commit back to the baseline).
//!   A case `validate` accepts is reported and its `plan`/`apply` are not run: they
//!   would act on the bad commit (start VMs, reach hosts it names, delete `web`).
//!   Every failing case is listed at the end; one does not hide the others.
//! - `bad_repositories_and_refs_fail_clearly`: a folder that is not a repository,
//!   one that does not exist, a repository with no commits, revisions that do not
//!   exist and spec folders that are not folders of the commit.
//!
//! Literal cases are folders of `tests/corpus/`; [`built_cases`] holds the ones that
//! cannot be plain files in the source tree (symbolic links, binary garbage, a file
//! over 1 MiB, a file name with a newline).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use plasmavmc_e2e::{
    artifacts, is_alive, last_tick, Output, Running, TestRepo, VmSpec, ACT_TIMEOUT, BOOT_TIMEOUT,
    RUN_TIMEOUT,
};

/// Largest spec file the engine accepts (`plasmavmc_specs::MAX_FILE_BYTES`).
const MAX_FILE_BYTES: usize = 1 << 20;

/// What a case puts at one path of the working tree.
#[derive(Debug, Clone)]
enum Entry {
    /// A regular file with these bytes.
    File(Vec<u8>),
    /// A symbolic link to this target; git records the link itself.
    Link(PathBuf),
}

/// One bad input: what to commit on top of the baseline and what stderr must say.
#[derive(Debug, Clone)]
struct Case {
    name: String,
    /// Working-tree path (`/`-separated) and what goes there; whatever the baseline
    /// has at that path (a file or a folder) is replaced.
    entries: Vec<(String, Entry)>,
    /// Fragments stderr must contain; the first must also be in `last_error`.
    expect: Vec<String>,
    /// Fragments stderr must not contain.
    reject: Vec<String>,
}

impl Case {
    fn new(name: &str, entries: Vec<(String, Entry)>, expect: &[&str], reject: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            entries,
            expect: expect.iter().map(|&e| e.to_owned()).collect(),
            reject: reject.iter().map(|&e| e.to_owned()).collect(),
        }
    }
}

fn file(path: &str, bytes: impl Into<Vec<u8>>) -> (String, Entry) {
    (path.to_owned(), Entry::File(bytes.into()))
}

fn link(path: &str, target: impl Into<PathBuf>) -> (String, Entry) {
    (path.to_owned(), Entry::Link(target.into()))
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

/// The folders of `tests/corpus/`, in name order.
fn literal_cases() -> Result<Vec<Case>> {
    let dir = corpus_dir();
    let mut folders: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| Ok(e?.path()))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    folders.sort();
    let mut cases = Vec::new();
    for folder in folders {
        let name = folder
            .file_name()
            .and_then(|n| n.to_str())
            .context("corpus folder names are UTF-8")?
            .to_owned();
        let expect_file = folder.join("expect.txt");
        let text = fs::read_to_string(&expect_file)
            .with_context(|| format!("reading {}", expect_file.display()))?;
        let (expect, reject) = parse_expect(&text);
        ensure!(
            !expect.is_empty(),
            "{}: expects no diagnostic",
            expect_file.display()
        );
        let mut entries = Vec::new();
        collect_files(&folder, &folder, &mut entries)?;
        ensure!(!entries.is_empty(), "corpus case {name} commits no file");
        cases.push(Case {
            name,
            entries,
            expect,
            reject,
        });
    }
    Ok(cases)
}

/// `expect.txt`: fragments to find, `!fragments` not to find; `#` comments.
fn parse_expect(text: &str) -> (Vec<String>, Vec<String>) {
    let mut expect = Vec::new();
    let mut reject = Vec::new();
    for line in text.lines().map(str::trim_end) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.strip_prefix('!') {
            Some(not) => reject.push(not.to_owned()),
            None => expect.push(line.to_owned()),
        }
    }
    (expect, reject)
}

/// Every regular file below `dir` except the case's own `expect.txt`.
fn collect_files(top: &Path, dir: &Path, out: &mut Vec<(String, Entry)>) -> Result<()> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)?
        .map(|e| Ok(e?.path()))
        .collect::<Result<_>>()?;
    paths.sort();
    for path in paths {
        let rel = path
            .strip_prefix(top)?
            .to_str()
            .context("corpus paths are UTF-8")?
            .to_owned();
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            collect_files(top, &path, out)?;
        } else if meta.is_file() {
            if rel != "expect.txt" {
                out.push((rel, Entry::File(fs::read(&path)?)));
            }
        } else {
            bail!(
                "{}: only regular files belong in tests/corpus/; build links in built_cases",
                path.display()
            );
        }
    }
    Ok(())
}

/// The cases that cannot be plain files in the source tree. `outside` is a folder
/// beside the repository holding copies of specs (`web.toml`, `vms/web.toml`,
/// `hosts/hv1.toml`, `hv1.toml`, `plasmavmc.toml`) and a `vmlinuz`.
fn built_cases(outside: &Path) -> Vec<Case> {
    let mut cases = byte_cases();
    cases.extend(link_cases(outside));
    cases
}

/// Bytes that are not text, a file over the size limit, a file name with a newline.
fn byte_cases() -> Vec<Case> {
    let huge = {
        let head = "vcpus = 1\n# ";
        let mut text = head.to_owned();
        text.push_str(&"x".repeat(MAX_FILE_BYTES + 1 - head.len() - 1));
        text.push('\n');
        text
    };
    let huge_msg = format!(
        "vms/huge.toml: file is {} bytes; spec files are limited to {MAX_FILE_BYTES} bytes",
        huge.len()
    );
    let utf16: Vec<u8> = "\u{feff}vcpus = 1\n"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let forged = "vms/x\nplasmavmc.toml:9:9: forged.toml";
    vec![
        Case::new(
            "binary-garbage",
            vec![file(
                "vms/garbage.toml",
                b"\xff\xfe\x00\x01\x80PLASMA\x00\xc0\xaf\x1b[2J\x7fELF".to_vec(),
            )],
            &["vms/garbage.toml:1:1: file is not valid UTF-8 text"],
            &[],
        ),
        Case::new(
            "binary-inside-a-string",
            vec![file(
                "vms/garbage.toml",
                b"vcpus = 1\nname = \"w\xc3\x28b\"\n".to_vec(),
            )],
            &["vms/garbage.toml:2:10: file is not valid UTF-8 text"],
            &[],
        ),
        Case::new(
            "utf16-file",
            vec![file("vms/wide.toml", utf16)],
            &["vms/wide.toml:1:1: file is not valid UTF-8 text"],
            &[],
        ),
        Case::new(
            "nul-byte-in-string",
            vec![file(
                "vms/nul.toml",
                b"vcpus = 1\nname = \"a\0b\"\n".to_vec(),
            )],
            &["vms/nul.toml:2:10: invalid basic string"],
            &[],
        ),
        Case::new(
            "huge-file",
            vec![file("vms/huge.toml", huge)],
            &[&huge_msg],
            &[],
        ),
        // A file name holding a newline and a fake diagnostic: the path must not be
        // printed raw, or a committed file name forges error lines.
        Case::new(
            "file-name-forging-a-diagnostic",
            vec![file(forged, "vcpus = 1\n")],
            &["file name gives the name \"x\\nplasmavmc.toml:9:9: forged\" contains '\\n'"],
            &["\nplasmavmc.toml:9:9: forged"],
        ),
    ]
}

/// Symbolic links: committed where specs live, or in the working tree on the way
/// to a kernel.
fn link_cases(outside: &Path) -> Vec<Case> {
    vec![
        Case::new(
            "symlink-vm-file-outside",
            vec![link("vms/link.toml", outside.join("web.toml"))],
            &["vms/link.toml: is a symbolic link"],
            &[],
        ),
        Case::new(
            "symlink-vm-file-inside",
            vec![link("vms/alias.toml", "web.toml")],
            &["vms/alias.toml: is a symbolic link"],
            &[],
        ),
        Case::new(
            "symlink-folder-in-vms",
            vec![link("vms/team", outside.join("vms"))],
            &["vms/team: is a symbolic link"],
            &[],
        ),
        Case::new(
            "symlink-cluster-settings",
            vec![link("plasmavmc.toml", outside.join("plasmavmc.toml"))],
            &["plasmavmc.toml: is a symbolic link"],
            &[],
        ),
        Case::new(
            "symlink-host-file",
            vec![link("hosts/hv1.toml", outside.join("hv1.toml"))],
            &["hosts/hv1.toml: is a symbolic link"],
            &[],
        ),
        // The whole `vms/` folder is a link: read as "no VMs", this would delete `web`.
        Case::new(
            "symlink-vms-folder",
            vec![link("vms", outside.join("vms"))],
            &["vms: must be a folder of spec files"],
            &[],
        ),
        Case::new(
            "symlink-hosts-folder",
            vec![link("hosts", outside.join("hosts"))],
            &["hosts: must be a folder of spec files"],
            &[],
        ),
        // A link in the working tree (not a spec path) that a relative kernel path
        // goes through: the real file is outside the spec folder.
        Case::new(
            "kernel-through-a-link-outside",
            vec![
                link("boot-link", outside),
                file("vms/bad.toml", "[boot]\nkernel = \"boot-link/vmlinuz\"\n"),
            ],
            &["vms/bad.toml:2:1: \"boot-link/vmlinuz\" leads outside the spec folder"],
            &[],
        ),
    ]
}

/// The files `outside` holds for [`built_cases`].
fn write_outside(outside: &Path, web: &[u8]) -> Result<()> {
    for (path, bytes) in [
        ("web.toml", web),
        ("vms/web.toml", web),
        ("plasmavmc.toml", b"[timeouts]\nstop = \"2s\"\n".as_slice()),
        ("hv1.toml", b"address = \"local\"\n".as_slice()),
        ("hosts/hv1.toml", b"address = \"local\"\n".as_slice()),
        ("vmlinuz", b"not a kernel".as_slice()),
    ] {
        let full = outside.join(path);
        fs::create_dir_all(full.parent().context("a parent")?)?;
        fs::write(&full, bytes)?;
    }
    Ok(())
}

/// Every file of the working tree (but `.git`), relative path and bytes.
fn snapshot(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    fn walk(top: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
        for e in fs::read_dir(dir)? {
            let path = e?.path();
            if path.file_name().is_some_and(|n| n == ".git") {
                continue;
            }
            let rel = path.strip_prefix(top)?.to_string_lossy().into_owned();
            let meta = fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                walk(top, &path, out)?;
            } else {
                ensure!(meta.is_file(), "baseline {rel} is not a regular file");
                out.push((rel, fs::read(&path)?));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Empties the working tree (but `.git`) and writes `files` back.
fn reset_worktree(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let path = e?.path();
        if path.file_name().is_some_and(|n| n == ".git") {
            continue;
        }
        remove_path(&path)?;
    }
    for (rel, bytes) in files {
        let full = dir.join(rel);
        fs::create_dir_all(full.parent().context("a parent")?)?;
        fs::write(&full, bytes)?;
    }
    Ok(())
}

/// Removes a file, a link (not what it points to) or a folder.
fn remove_path(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path)?,
        Ok(_) => fs::remove_file(path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Writes the case's entries into the working tree (over the baseline).
fn write_case(dir: &Path, case: &Case) -> Result<()> {
    for (rel, entry) in &case.entries {
        let full = dir.join(rel);
        remove_path(&full)?;
        fs::create_dir_all(full.parent().context("a parent")?)?;
        match entry {
            Entry::File(bytes) => fs::write(&full, bytes)?,
            Entry::Link(target) => std::os::unix::fs::symlink(target, &full)?,
        }
    }
    Ok(())
}

/// What went wrong with one run of the binary for a case (empty: nothing).
fn check_run(sub: &str, out: &Output, case: &Case) -> Vec<String> {
    let mut problems = Vec::new();
    if out.code != Some(1) {
        problems.push(format!("{sub} exited {:?}, not 1", out.code));
    }
    for e in &case.expect {
        if !out.stderr.contains(e.as_str()) {
            problems.push(format!("{sub}: stderr lacks {e:?}"));
        }
    }
    for r in &case.reject {
        if out.stderr.contains(r.as_str()) {
            problems.push(format!("{sub}: stderr holds {r:?}"));
        }
    }
    if !problems.is_empty() {
        problems.push(format!(
            "{sub} printed:\n{}",
            indent(&format!("{}{}", out.stdout, out.stderr))
        ));
    }
    problems
}

fn indent(text: &str) -> String {
    text.trim_end()
        .lines()
        .take(20)
        .map(|l| format!("        {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The world the cases run in: the repository, its running VM, the baseline.
struct World {
    repo: TestRepo,
    /// QEMU of `web`.
    pid: i32,
    /// The working tree of the baseline commit.
    baseline: Vec<(String, Vec<u8>)>,
    /// The last revision applied (the baseline's first commit).
    applied: String,
}

impl World {
    /// Runs one case; the problems found (empty: it passed).
    fn run(&self, case: &Case) -> Result<Vec<String>> {
        let dir = self.repo.repo_dir();
        reset_worktree(&dir, &self.baseline)?;
        write_case(&dir, case)?;
        let id = self.repo.commit(&format!("corpus: {}", case.name))?;
        for (rel, _) in &case.entries {
            ensure!(
                self.repo.file_at(&id, rel)?.is_some(),
                "harness: {rel:?} is not in the commit"
            );
        }

        let mut problems = Vec::new();
        let validate = self.repo.run(&["validate"])?;
        if validate.code == Some(1) {
            problems.extend(check_run("validate", &validate, case));
            for args in [&["plan"][..], &["apply", "--auto-approve"]] {
                problems.extend(check_run(args[0], &self.repo.run(args)?, case));
            }
            let engine = self
                .repo
                .engine_view()?
                .context("no status/engine.toml after apply")?;
            let first = &case.expect[0];
            if !engine
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains(first.as_str()))
            {
                problems.push(format!(
                    "status/engine.toml last_error lacks {first:?}: {:?}",
                    engine.last_error
                ));
            }
            if engine.last_attempted_revision.as_deref() != Some(id.as_str()) {
                problems.push(format!(
                    "last_attempted_revision is {:?}, not the bad commit {id}",
                    engine.last_attempted_revision
                ));
            }
            if engine.last_applied_revision.as_deref() != Some(self.applied.as_str()) {
                problems.push(format!(
                    "last_applied_revision moved from {} to {:?}",
                    self.applied, engine.last_applied_revision
                ));
            }
        } else {
            problems.push(format!(
                "accepted: validate exited {:?}, expected 1 with {:?}; plan and apply not run \
                 (they would act on the bad commit)\n{}",
                validate.code,
                case.expect,
                indent(&validate.all())
            ));
        }
        if let Some(touched) = self.touched() {
            problems.push(touched);
        }

        reset_worktree(&dir, &self.baseline)?;
        self.repo
            .commit(&format!("corpus: {} removed", case.name))?;
        Ok(problems)
    }

    /// Why the running VM does not look untouched, if it does not.
    fn touched(&self) -> Option<String> {
        let now = self.repo.try_qemu_pid("web");
        let all = self.repo.qemu_pids();
        if now != Some(self.pid) || !is_alive(self.pid) || all != [self.pid] {
            Some(format!(
                "the running VM was touched: QEMU {} alive={}, qemu.pid now {now:?}, QEMUs {all:?}",
                self.pid,
                is_alive(self.pid)
            ))
        } else {
            None
        }
    }
}

#[test]
fn every_bad_commit_is_refused_and_touches_nothing() -> Result<()> {
    let started = Instant::now();
    let repo = TestRepo::new()?;
    repo.write_vm("web", &VmSpec::new())?;
    let applied = repo.commit("baseline: web")?;
    repo.run(&["apply", "--auto-approve"])?.expect_code(0)?;
    let pid = repo.wait_qemu_alive("web", Duration::from_secs(10))?;
    repo.wait_serial("web", "tick 1", BOOT_TIMEOUT)?;
    let tick = last_tick(&repo.serial("web")).unwrap_or(0);
    let baseline = snapshot(&repo.repo_dir())?;
    let web = &baseline
        .iter()
        .find(|(p, _)| p == "vms/web.toml")
        .context("baseline has vms/web.toml")?
        .1;
    let outside = repo.root().join("outside");
    write_outside(&outside, web)?;

    let mut cases = literal_cases()?;
    let literal = cases.len();
    cases.extend(built_cases(&outside));
    let booted = started.elapsed();
    let mut world = World {
        repo,
        pid,
        baseline,
        applied,
    };

    let mut failures = Vec::new();
    for case in &cases {
        let problems = match world.run(case) {
            Ok(p) => p,
            Err(e) => vec![format!("harness error: {e:#}")],
        };
        if problems.is_empty() {
            continue;
        }
        failures.push(format!("{}:\n    {}", case.name, problems.join("\n    ")));
        // Keep the next cases meaningful if this one disturbed the VM.
        if world.touched().is_some() {
            world.repo.run(&["apply", "--auto-approve"])?;
            world.pid = world.repo.wait_qemu_alive("web", ACT_TIMEOUT)?;
        }
    }
    let ran = started.elapsed();

    // Back on the baseline: nothing to do, and the guest kept running all along.
    let repo = &world.repo;
    repo.run(&["plan", "--detailed-exitcode"])?.expect_code(0)?;
    repo.wait_ticks_past("web", tick, ACT_TIMEOUT)?;
    let instances: Vec<String> = fs::read_dir(repo.state_dir().join("local").join("vms"))?
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .collect();
    ensure!(
        instances == ["web"],
        "instance folders besides web: {instances:?}"
    );

    eprintln!(
        "corpus: {} cases ({} literal, {} built), {} passed, {} failed; boot {:.1}s, cases {:.1}s",
        cases.len(),
        literal,
        cases.len() - literal,
        cases.len() - failures.len(),
        failures.len(),
        booted.as_secs_f64(),
        ran.saturating_sub(booted).as_secs_f64()
    );
    if !failures.is_empty() {
        bail!(
            "{} of {} bad inputs were not refused cleanly:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

// ---- bad repositories, revisions and spec folders ------------------------------

/// Runs `plasmavmc <sub> --repo <repo> [--state-dir <state>] <extra>`.
fn run_on(repo: &Path, state: &Path, sub: &str, extra: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(artifacts::binary()?);
    cmd.arg(sub).arg("--repo").arg(repo);
    if sub != "validate" {
        cmd.arg("--state-dir").arg(state);
    }
    cmd.args(extra)
        .current_dir(state.parent().context("state has a parent")?)
        .env_remove("PLASMAVMC_STATE_DIR");
    Running::spawn(cmd)?.finish(RUN_TIMEOUT)
}

/// Fails unless `validate`, `plan` and `apply --auto-approve` each exit 1 with one
/// line on stderr holding `phrase`.
fn fails_clearly(
    what: &str,
    repo: &Path,
    state: &Path,
    extra: &[&str],
    phrase: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (sub, more) in [
        ("validate", &[][..]),
        ("plan", &[][..]),
        ("apply", &["--auto-approve"][..]),
    ] {
        let args: Vec<&str> = extra.iter().chain(more).copied().collect();
        let out = match run_on(repo, state, sub, &args) {
            Ok(out) => out,
            Err(e) => {
                problems.push(format!("{what}: {sub}: {e:#}"));
                continue;
            }
        };
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        if out.code != Some(1) || lines.len() != 1 || !lines[0].contains(phrase) {
            problems.push(format!(
                "{what}: {sub} must exit 1 with one line holding {phrase:?}\n{}",
                indent(&out.to_string())
            ));
        }
    }
    problems
}

#[test]
fn bad_repositories_and_refs_fail_clearly() -> Result<()> {
    let repo = TestRepo::new()?;
    let state = repo.state_dir();
    let plain = repo.root().join("plain");
    fs::create_dir_all(&plain)?;
    let mut problems = Vec::new();
    problems.extend(fails_clearly(
        "a folder that is not a git repository",
        &plain,
        &state,
        &[],
        "not a git repository",
    ));
    problems.extend(fails_clearly(
        "a folder that does not exist",
        &repo.root().join("no-such-folder"),
        &state,
        &[],
        "not a git repository",
    ));
    // `git init` done, nothing committed yet (the branch is `main`).
    problems.extend(fails_clearly(
        "a repository with no commits",
        &repo.repo_dir(),
        &state,
        &[],
        "no commits",
    ));

    repo.write_vm("web", &VmSpec::new())?;
    repo.commit("add web")?;
    let dir = repo.repo_dir();
    for (what, extra, phrase) in [
        (
            "a revision that does not exist",
            &["--rev", "does-not-exist"][..],
            "\"does-not-exist\" not found",
        ),
        (
            "a revision before the first commit",
            &["--rev", "HEAD~3"],
            "\"HEAD~3\" not found",
        ),
        (
            "a revision that is a tree, not a commit",
            &["--rev", "HEAD^{tree}"],
            "HEAD^{tree}",
        ),
        (
            "a spec folder the commit does not have",
            &["--path", "no/such/folder"],
            "is not a folder",
        ),
        (
            "a spec folder that is a file",
            &["--path", "plasmavmc.toml"],
            "is not a folder",
        ),
        (
            "a spec folder outside the repository",
            &["--path", "../.."],
            "outside the repository",
        ),
    ] {
        problems.extend(fails_clearly(what, &dir, &state, extra, phrase));
    }
    ensure!(
        repo.qemu_pids().is_empty(),
        "a QEMU was started: {:?}",
        repo.qemu_pids()
    );
    if !problems.is_empty() {
        bail!(
            "{} bad repositories/revisions did not fail clearly:\n{}",
            problems.len(),
            problems.join("\n")
        );
    }
    Ok(())
}
