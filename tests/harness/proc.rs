//! Processes seen through `/proc`: liveness, argv, ownership, killing.
//!
//! Liveness reads `/proc/PID/stat` (a zombie counts as dead); `kill(pid, 0)` would
//! call a zombie alive.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::wait::wait_for;

/// The one-letter state of a process (`R`, `S`, `Z`, ...), or `None` if it is gone.
pub fn state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the state follows
    // the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// True if `pid` exists and is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    matches!(state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// The argv of `pid`.
pub fn cmdline(pid: i32) -> Result<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline"))
        .with_context(|| format!("reading /proc/{pid}/cmdline"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// The working directory of `pid`, if readable.
pub fn cwd(pid: i32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// The files `pid` has open (what `/proc/PID/fd/*` point to); empty if unreadable.
pub fn open_files(pid: i32) -> Vec<PathBuf> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .collect()
}

/// The value following `flag` in `args` (`-m 128` -> `"128"`).
pub fn arg_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// QEMU's memory size in MiB from `-m`: accepts `128`, `128M`, `size=128M,...`.
pub fn qemu_memory_mb(args: &[String]) -> Option<u64> {
    let value = arg_value(args, "-m")?;
    let first = value
        .split(',')
        .find(|p| !p.contains('=') || p.starts_with("size="))?;
    let size = first.trim_start_matches("size=");
    let (digits, unit) = size.split_at(
        size.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(size.len()),
    );
    let n: u64 = digits.parse().ok()?;
    match unit {
        "" | "M" | "m" | "MB" | "MiB" => Some(n),
        "G" | "g" | "GB" | "GiB" => Some(n * 1024),
        _ => None,
    }
}

/// QEMU's vCPU count from `-smp`: accepts `1`, `1,sockets=1`, `cpus=1,...`.
pub fn qemu_vcpus(args: &[String]) -> Option<u32> {
    let value = arg_value(args, "-smp")?;
    value
        .split(',')
        .find_map(|p| {
            if p.contains('=') {
                p.strip_prefix("cpus=")
            } else {
                Some(p)
            }
        })
        .and_then(|n| n.parse().ok())
}

/// Every process (other than this one) whose working directory is under `dir` or
/// whose argv mentions `dir`: what a test owns inside its temp folder.
pub fn processes_under(dir: &Path) -> Vec<i32> {
    let me = i32::try_from(std::process::id()).expect("pids fit in i32");
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me && is_alive(pid))
        .filter(|&pid| {
            cwd(pid).is_some_and(|c| c.starts_with(dir))
                || cmdline(pid).is_ok_and(|args| args.iter().any(|a| a.contains(&needle)))
        })
        .collect()
}

/// Every live QEMU (argv[0] names `qemu-system`) whose working directory is exactly
/// `dir`: the QEMUs running in one instance folder, whatever their pid files say.
pub fn qemus_in(dir: &Path) -> Vec<i32> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| is_alive(pid) && cwd(pid).is_some_and(|c| c == dir))
        .filter(|&pid| {
            cmdline(pid).is_ok_and(|a| a.first().is_some_and(|a| a.contains("qemu-system")))
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// Every live QEMU whose working directory is `dir` or below it: the QEMUs one host
/// root runs (each in its instance folder), whatever their pid files say.
pub fn qemus_under(dir: &Path) -> Vec<i32> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| is_alive(pid) && cwd(pid).is_some_and(|c| c.starts_with(&dir)))
        .filter(|&pid| {
            cmdline(pid).is_ok_and(|a| a.first().is_some_and(|a| a.contains("qemu-system")))
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// SIGKILLs `pid` and waits until it is gone (or a zombie).
pub fn kill_and_wait(pid: i32, timeout: Duration) -> Result<()> {
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    wait_for(format!("pid {pid} to die after SIGKILL"), timeout, || {
        !is_alive(pid)
    })
}

/// Checks that the drill sandbox named on `stderr` (`drill: sandbox in DIR`) left nothing
/// behind: no process of it runs any more (every one has the folder in its command line
/// or working directory) and the folder is gone. Only that drill's: others may run.
pub fn drill_sandbox_left_nothing(stderr: &str) -> Result<()> {
    let sandbox = stderr
        .lines()
        .find_map(|l| l.strip_prefix("drill: sandbox in "))
        .map(PathBuf::from)
        .context("the drill did not say where its sandbox is")?;
    wait_for(
        "the drill's processes to be gone",
        Duration::from_secs(10),
        || processes_under(&sandbox).is_empty(),
    )?;
    anyhow::ensure!(!sandbox.exists(), "{} was left behind", sandbox.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn memory_and_vcpus_forms() {
        assert_eq!(qemu_memory_mb(&argv("qemu -m 128 -smp 1")), Some(128));
        assert_eq!(qemu_memory_mb(&argv("qemu -m 192M")), Some(192));
        assert_eq!(
            qemu_memory_mb(&argv("qemu -m size=256M,slots=2,maxmem=1G")),
            Some(256)
        );
        assert_eq!(qemu_memory_mb(&argv("qemu -m 1G")), Some(1024));
        assert_eq!(qemu_vcpus(&argv("qemu -smp 2")), Some(2));
        assert_eq!(qemu_vcpus(&argv("qemu -smp 1,sockets=1")), Some(1));
        assert_eq!(qemu_vcpus(&argv("qemu -smp sockets=1,cpus=4")), Some(4));
        assert_eq!(qemu_vcpus(&argv("qemu -m 1")), None);
    }

    #[test]
    fn this_process_is_alive_and_a_stranger_is_not() {
        assert!(is_alive(
            i32::try_from(std::process::id()).expect("pids fit in i32")
        ));
        assert!(!is_alive(i32::MAX));
    }
}
