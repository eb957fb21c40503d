//! This machine's CPU, for placing VMs by CPU model: its model name and a digest of its
//! vendor, model and flags (`/proc/cpuinfo`), and the QEMU CPU models it can run.
//!
//! The models come from QMP `query-cpu-definitions` of a throwaway QEMU (`-machine
//! none`, under the accelerator this host uses by default and under TCG): the ones whose
//! `unavailable-features` is empty. Asked once per agent process and cached (the CPU
//! does not change under a running agent); when QEMU cannot be asked, the CPU is
//! reported with no models and the reason logged.

use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::Digest as _;
use tracing::{debug, warn};

use super::LocalHost;
use crate::observe::HostCpu;
use crate::qemu::args::Accel;
use crate::qemu::process;
use crate::qemu::qmp::Qmp;

/// Bound on asking the throwaway QEMU, start to answer.
const ASK_QEMU: Duration = Duration::from_secs(10);

impl LocalHost {
    /// This machine's CPU (cached after the first call).
    pub(super) async fn cpu(&self) -> Option<HostCpu> {
        self.cpu
            .get_or_init(|| async {
                let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
                let mut cpu = from_cpuinfo(&text)?;
                let accel = self.default_accel();
                cpu.models = ask(accel).await;
                cpu.tcg_models = if accel == Accel::Tcg {
                    cpu.models.clone()
                } else {
                    ask(Accel::Tcg).await
                };
                Some(cpu)
            })
            .await
            .clone()
    }
}

/// The models QEMU runs here under `accel`; none (and the reason logged) when it cannot
/// be asked.
async fn ask(accel: Accel) -> Vec<String> {
    usable_models(accel).await.unwrap_or_else(|why| {
        warn!(accel = accel.as_str(), %why, "cannot ask QEMU which CPU models this host runs; reporting none");
        Vec::new()
    })
}

/// Model name and digest from `/proc/cpuinfo` (its first processor); `None` without a
/// model name (not an x86 machine).
pub fn from_cpuinfo(text: &str) -> Option<HostCpu> {
    let first = text.split("\n\n").next()?;
    let field = |key: &str| {
        first.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_owned())
        })
    };
    let model = field("model name")?;
    let vendor = field("vendor_id").unwrap_or_default();
    let mut flags: Vec<String> = field("flags")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    flags.sort();
    let digest = sha2::Sha256::digest(format!("{vendor}\n{model}\n{}", flags.join(" ")));
    Some(HostCpu {
        model,
        digest: crate::digest::hex(&digest),
        models: Vec::new(),
        tcg_models: Vec::new(),
    })
}

/// The names of the usable entries of a `query-cpu-definitions` answer, sorted.
pub fn usable(definitions: &Value) -> Vec<String> {
    let mut out: Vec<String> = definitions
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| {
            d.get("unavailable-features")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty)
        })
        .filter_map(|d| d.get("name")?.as_str().map(str::to_owned))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Asks a throwaway QEMU under `accel` which CPU models it can run.
async fn usable_models(accel: Accel) -> Result<Vec<String>, String> {
    let tmp = tempfile::tempdir().map_err(|e| format!("no temporary folder: {e}"))?;
    let socket = tmp.path().join("qmp.sock");
    let mut child = tokio::process::Command::new(process::qemu_binary())
        .args([
            "-machine",
            &format!("none,accel={}", accel.as_str()),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-qmp",
            &format!("unix:{},server=on,wait=off", socket.display()),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", process::qemu_binary()))?;
    let deadline = Instant::now() + ASK_QEMU;
    let qmp = loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                use tokio::io::AsyncReadExt as _;
                let _ = err.read_to_string(&mut stderr).await;
            }
            return Err(format!("QEMU exited ({status}): {}", stderr.trim()));
        }
        if socket.exists() {
            if let Ok(qmp) = Qmp::connect(&socket, Duration::from_secs(1)).await {
                break qmp;
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("QMP did not answer within {ASK_QEMU:?}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let answer = qmp
        .execute("query-cpu-definitions", None)
        .await
        .map_err(|e| format!("query-cpu-definitions: {e}"))?;
    let _ = qmp.quit().await;
    if tokio::time::timeout(Duration::from_secs(2), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    let models = usable(&answer);
    debug!(
        accel = accel.as_str(),
        models = models.len(),
        "QEMU CPU models"
    );
    Ok(models)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_gives_the_model_and_a_digest_of_vendor_model_and_flags() {
        let a = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse2 avx\n\nprocessor\t: 1\nmodel name\t: other\n";
        let cpu = from_cpuinfo(a).expect("cpu");
        assert_eq!(cpu.model, "Intel Xeon");
        assert_eq!(cpu.digest.len(), 64);
        // Flag order does not matter; a flag more does.
        let b = a.replace("fpu sse2 avx", "avx fpu sse2");
        assert_eq!(from_cpuinfo(&b).expect("cpu").digest, cpu.digest);
        let c = a.replace("fpu sse2 avx", "fpu sse2 avx avx2");
        assert_ne!(from_cpuinfo(&c).expect("cpu").digest, cpu.digest);
        assert!(from_cpuinfo("processor\t: 0\n").is_none());
    }

    #[test]
    fn only_models_without_unavailable_features_are_usable() {
        let answer = serde_json::json!([
            {"name": "qemu64", "unavailable-features": []},
            {"name": "Skylake-Server", "unavailable-features": ["avx512f"]},
            {"name": "max"},
            {"name": "x86-64-v2", "unavailable-features": []},
        ]);
        assert_eq!(usable(&answer), ["max", "qemu64", "x86-64-v2"]);
    }
}
