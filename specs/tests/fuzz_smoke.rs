//! The fuzz target's check (`plasmavmc_specs::fuzz::check_bytes`, see `fuzz/`) on
//! stable Rust, bounded and deterministic, so CI runs it on every change:
//!
//! - every case of `tests/corpus/` (on the corpus baseline, as `tests/corpus.rs`
//!   commits them) passes the check;
//! - so do a few thousand seeded mutations of valid commits and of those cases: bit
//!   flips, bytes set to TOML punctuation, truncations, cut or repeated ranges, splices
//!   of two inputs, and tokens of `fuzz/specs.dict` inserted.
//!
//! A failing mutation is saved under `CARGO_TARGET_TMPDIR` and named with its seed; it
//! reproduces with `cargo +nightly fuzz run specs FILE` (from `fuzz/`) or with the same
//! `PLASMAVMC_FUZZ_SEED`. `PLASMAVMC_FUZZ_MUTATIONS=N` runs longer;
//! `PLASMAVMC_FUZZ_SEEDS_OUT=DIR` writes the seed inputs into DIR (the real fuzzer's
//! starting corpus: `fuzz/corpus/specs`).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use common::{files_below, workspace};
use plasmavmc_specs::fuzz::{bytes_from_commit, check_bytes};

/// Mutations per run unless `PLASMAVMC_FUZZ_MUTATIONS` says otherwise (~2 s unoptimised).
const MUTATIONS: u64 = 4000;

/// The default seed of the mutation sequence.
const SEED: u64 = 0x706c_6173_6d61;

type Commit = Vec<(String, Vec<u8>)>;

fn file(rel: &str, text: &str) -> (String, Vec<u8>) {
    (rel.to_owned(), text.as_bytes().to_vec())
}

/// What every corpus case is committed on top of (as in `tests/corpus.rs`).
fn corpus_baseline() -> Commit {
    vec![
        file("plasmavmc.toml", "[timeouts]\nstop = \"2s\"\n"),
        file(
            "vms/web.toml",
            "vcpus = 1\nmemory_mb = 128\npower = \"running\"\n\n[boot]\nkernel = \"/g/vmlinuz\"\n\
             initrd = \"/g/initrd.img\"\ncmdline = \"console=ttyS0 quiet panic=-1\"\n\n\
             [[disks]]\nname = \"data\"\nsize_gb = 1\n\n[qemu]\naccel = \"tcg\"\n",
        ),
    ]
}

/// A valid commit that sets every field of every file kind at least once.
fn everything() -> Commit {
    vec![
        file(
            "plasmavmc.toml",
            "[timeouts]\nstop = \"10s\"\nqmp_ready = \"5s\"\n\n[restart]\nbackoff = \"1s\"\n\
             backoff_max = \"1m 30s\"\nmax_failures = 3\nwindow = \"10m\"\n\n[placement]\n\
             vcpu_overcommit = 2.5\n\n[heartbeat]\ninterval = \"200ms\"\ndown_after = \"1s\"\n\n\
             [migration]\nmax_bandwidth_mib = 512\ndowntime_limit = \"300ms\"\n\
             auto_converge = false\nprogress_timeout = \"30s\"\ntimeout_per_gib = \"2m\"\n",
        ),
        file(
            "hosts/hv1.toml",
            "address = \"ssh://root@hv1.example:2222\"\nknown_hosts = \"keys/known_hosts\"\n\
             identity_file = \"/etc/plasmavmc/id_ed25519\"\nroot = \"/var/lib/plasmavmc\"\n\
             vcpus = 16\nmemory_mb = 65536\nshared_storage = \"/mnt/vms\"\nstorage_pool = \"nfs1\"\n\
             fence = [\"/usr/local/sbin/fence-hv1\", \"--now\"]\naccel = \"kvm\"\n\
             migration_address = \"10.0.0.1\"\n\n[labels]\nrack = \"r1\"\n\"odd key\" = \"x\"\n",
        ),
        file(
            "hosts/hv2.toml",
            "name = \"hv2\"\nexec = [\"kubectl\", \"exec\", \"-i\", \"hv2\", \"--\", \"plasmavmc\", \
             \"agent\", \"--stdio\", \"--root\", \"/srv\"]\nroot = \"/srv\"\nstate = \"maintenance\"\n\
             shared_storage = \"/mnt/vms\"\nstorage_pool = \"nfs1\"\n",
        ),
        file(
            "vms/web/a.toml",
            "vcpus = 2\nmemory_mb = 512\npower = \"running\"\nhost = \"hv1\"\nrestart = \"on-failure\"\n\
             ha = true\nmigration = \"cold\"\ngroup = \"web\"\n\n[boot]\nkernel = \"guest/vmlinuz\"\n\
             initrd = \"guest/initrd.img\"\ncmdline = \"console=ttyS0 quiet\"\n\n[[disks]]\n\
             name = \"root\"\nimage = \"images/base.qcow2\"\nstorage = \"shared\"\n\n[[disks]]\n\
             name = \"data\"\nsize_gb = 10\nstorage = \"local\"\n\n[[nics]]\nnetwork = \"user\"\n\
             forward = [\"tcp:2222:22\", \"udp:5353:53\"]\n\n[qemu]\naccel = \"tcg\"\n\
             machine = \"pc-q35-7.2\"\nsandbox = false\n",
        ),
        file(
            "vms/db.toml",
            "name = \"db\"\npower = \"stopped\"\nrestart = \"never\"\nmigration = \"none\"\n\
             disks = [{ name = \"d\", size_gb = 1 }]\nnics = [{ forward = [\"tcp:80:80\"] }]\n\
             qemu = { machine = \"q35\" }\n",
        ),
        file("vms/empty.toml", ""),
        file("README.md", "not a spec\n"),
    ]
}

/// The valid commits mutations start from: the two above and every example.
fn valid_commits() -> Vec<(String, Commit)> {
    let mut out = vec![
        ("corpus-baseline".to_owned(), corpus_baseline()),
        ("everything".to_owned(), everything()),
    ];
    let examples = workspace().join("examples");
    for entry in std::fs::read_dir(&examples).expect("examples/").flatten() {
        let dir = entry.path();
        if dir.join("vms").is_dir() {
            let files = files_below(&dir, &|n| !n.starts_with('.') && n != "guest");
            let name = format!("example-{}", entry.file_name().to_string_lossy());
            out.push((name, files));
        }
    }
    out
}

/// Every literal case of `tests/corpus/`, on the baseline (a case's file at a baseline
/// path replaces it).
fn corpus_cases() -> Vec<(String, Commit)> {
    let dir = workspace().join("tests").join("corpus");
    let mut cases: Vec<(String, Commit)> = std::fs::read_dir(&dir)
        .expect("tests/corpus/")
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| {
            let mut files = corpus_baseline();
            for (rel, bytes) in files_below(&e.path(), &|n| n != "expect.txt") {
                files.retain(|(r, _)| *r != rel);
                files.push((rel, bytes));
            }
            (e.file_name().to_string_lossy().into_owned(), files)
        })
        .collect();
    cases.sort();
    assert!(cases.len() >= 50, "only {} corpus cases", cases.len());
    cases
}

/// The tokens of `fuzz/specs.dict` (libFuzzer's format: `"..."` with `\\`, `\"` and
/// `\xNN` escapes; `#` comments).
fn dictionary() -> Vec<Vec<u8>> {
    let path = workspace().join("fuzz").join("specs.dict");
    let text = std::fs::read_to_string(&path).expect("fuzz/specs.dict");
    let mut tokens = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let inner = line
            .split_once('"')
            .and_then(|(_, rest)| rest.strip_suffix('"'))
            .unwrap_or_else(|| panic!("bad dictionary line {line:?}"));
        let mut token = Vec::new();
        let mut bytes = inner.bytes();
        while let Some(b) = bytes.next() {
            if b != b'\\' {
                token.push(b);
                continue;
            }
            match bytes.next() {
                Some(b'x') => {
                    let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                    let hex = std::str::from_utf8(&hex).expect("hex digits");
                    token.push(u8::from_str_radix(hex, 16).expect("hex escape"));
                }
                Some(c) => token.push(c),
                None => panic!("dangling escape in {line:?}"),
            }
        }
        tokens.push(token);
    }
    assert!(tokens.len() > 50, "only {} dictionary tokens", tokens.len());
    tokens
}

/// Splitmix64: a small seeded generator, so every run mutates the same way.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A position in `0..=len`.
    fn at(&mut self, len: usize) -> usize {
        self.below(len + 1)
    }
}

/// Bytes that shape TOML and the input's files.
const PUNCTUATION: &[u8] = b"\"'=[]{},.\n#\\-+:0 9_eE\t\r\x00\xff";

/// One to four mutations of `input`, the other inputs at hand for splices.
fn mutate(rng: &mut Rng, input: &[u8], others: &[Vec<u8>], dict: &[Vec<u8>]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(7) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = PUNCTUATION[rng.below(PUNCTUATION.len())];
            }
            2 => data.truncate(rng.at(data.len())),
            3 if !data.is_empty() => {
                let from = rng.below(data.len());
                let to = (from + 1 + rng.below(16)).min(data.len());
                data.drain(from..to);
            }
            4 if !data.is_empty() => {
                let from = rng.below(data.len());
                let to = (from + 1 + rng.below(32)).min(data.len());
                let copy = data[from..to].to_vec();
                let at = rng.at(data.len());
                data.splice(at..at, copy);
            }
            5 => {
                let other = &others[rng.below(others.len())];
                let keep = rng.at(data.len());
                let from = rng.at(other.len());
                data.truncate(keep);
                data.extend_from_slice(&other[from..]);
            }
            _ => {
                let token = &dict[rng.below(dict.len())];
                let at = rng.at(data.len());
                data.splice(at..at, token.iter().copied());
            }
        }
    }
    data
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}"))
    })
}

/// Runs the check on `data`; on a panic, saves the input and returns what to report.
fn run_check(what: &str, data: &[u8]) -> Option<String> {
    let err = catch_unwind(AssertUnwindSafe(|| check_bytes(data))).err()?;
    let msg = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-smoke");
    let _ = std::fs::create_dir_all(&dir);
    let saved = dir.join(what.replace(['/', ' '], "-"));
    let _ = std::fs::write(&saved, data);
    Some(format!(
        "{what} (input saved as {}): {msg}",
        saved.display()
    ))
}

#[test]
fn every_corpus_case_passes_the_fuzz_check() {
    let failures: Vec<String> = corpus_cases()
        .iter()
        .filter_map(|(name, files)| run_check(&format!("corpus-{name}"), &bytes_from_commit(files)))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn seeded_mutations_of_valid_commits_pass_the_fuzz_check() {
    let seed = env_u64("PLASMAVMC_FUZZ_SEED", SEED);
    let count = env_u64("PLASMAVMC_FUZZ_MUTATIONS", MUTATIONS);
    let valid_commits = valid_commits();
    // Every valid commit is a seed first, so mutations start from what loads.
    let valid = valid_commits.len();
    let inputs: Vec<(String, Vec<u8>)> = valid_commits
        .into_iter()
        .chain(corpus_cases())
        .map(|(name, files)| (name, bytes_from_commit(&files)))
        .collect();
    if let Some(out) = std::env::var_os("PLASMAVMC_FUZZ_SEEDS_OUT") {
        std::fs::create_dir_all(&out).expect("creating PLASMAVMC_FUZZ_SEEDS_OUT");
        for (name, data) in &inputs {
            std::fs::write(Path::new(&out).join(name), data).expect("writing a seed");
        }
    }
    let dict = dictionary();
    let mut failures = Vec::new();
    for (name, data) in &inputs {
        failures.extend(run_check(name, data));
    }
    let others: Vec<Vec<u8>> = inputs.iter().map(|(_, d)| d.clone()).collect();
    for i in 0..count {
        let mut rng = Rng(seed ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d));
        // Two in three mutations start from a valid commit.
        let from = if rng.below(3) < 2 {
            rng.below(valid)
        } else {
            rng.below(inputs.len())
        };
        let data = mutate(&mut rng, &inputs[from].1, &others, &dict);
        let what = format!("mutation-{seed}-{i}-of-{}", inputs[from].0);
        if let Some(failure) = run_check(&what, &data) {
            failures.push(failure);
            if failures.len() >= 10 {
                break;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} inputs break the fuzz check (PLASMAVMC_FUZZ_SEED={seed}):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
