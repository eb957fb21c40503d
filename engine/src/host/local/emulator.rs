//! This machine's QEMU, for placing VMs by what it can run: its version and machine
//! types (`--version`, `-machine help`), asked once per agent process and cached. A QEMU
//! that cannot be run is reported as such, so the planner refuses to place VMs here
//! with the host's own answer instead of a start failing later.

use std::time::Duration;

use tokio::process::Command;
use tracing::warn;

use super::LocalHost;
use crate::observe::HostQemu;
use crate::qemu::process;

/// Bound on each question to QEMU.
const ASK: Duration = Duration::from_secs(10);

impl LocalHost {
    /// This machine's QEMU (cached after the first call).
    pub(super) async fn emulator(&self) -> HostQemu {
        self.emulator
            .get_or_init(|| async {
                let binary = process::qemu_binary();
                let asked = async {
                    let version = run(&binary, &["--version"]).await?;
                    let machines = run(&binary, &["-machine", "help"]).await?;
                    Ok::<_, String>(HostQemu {
                        binary: binary.clone(),
                        version: version.lines().next().map(version_of),
                        machines: machine_names(&machines),
                        problem: None,
                    })
                };
                asked.await.unwrap_or_else(|problem| {
                    warn!(qemu = %binary, %problem, "cannot run QEMU; no VM will be placed here");
                    HostQemu {
                        binary,
                        problem: Some(problem),
                        ..HostQemu::default()
                    }
                })
            })
            .await
            .clone()
    }
}

/// The standard output of `binary args`, or why there is none.
async fn run(binary: &str, args: &[&str]) -> Result<String, String> {
    let out = tokio::time::timeout(
        ASK,
        Command::new(binary).args(args).kill_on_drop(true).output(),
    )
    .await
    .map_err(|_| format!("{binary} {} did not answer within {ASK:?}", args.join(" ")))?
    .map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{binary} not found"),
        _ => format!("cannot run {binary}: {e}"),
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "{binary} {} failed ({}): {}",
            args.join(" "),
            out.status,
            err.trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `7.2.22` of "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"; the
/// whole line when it does not read so.
fn version_of(line: &str) -> String {
    line.strip_prefix("QEMU emulator version ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or(line)
        .to_owned()
}

/// The machine types (and aliases) `-machine help` lists, sorted.
fn machine_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with("Supported machines"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_types_and_version_are_read_from_qemus_words() {
        let help = "Supported machines are:\nmicrovm              microvm (i386)\n\
                    pc                   Standard PC (alias of pc-i440fx-7.2)\n\
                    q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\n\
                    pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)\n\
                    none                 empty machine\n";
        assert_eq!(
            machine_names(help),
            ["microvm", "none", "pc", "pc-q35-7.2", "q35"]
        );
        assert_eq!(
            version_of("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)"),
            "7.2.22"
        );
    }
}
