//! `plasmavmc console VM` and `plasmavmc logs VM [-f] [-n N]`: finds the host the VM
//! runs on (status file, else the engine's whereabouts record), starts that host's agent
//! in a serial mode through its usual transport, and relays the terminal to it.
//!
//! Neither takes the state directory's lock nor the host's: both work while `watch`
//! runs. The console puts a terminal stdin in raw mode (restored on every way out) and
//! leaves on Ctrl-] (0x1d), as `virsh console`; a stdin that is not a terminal is relayed
//! as it is (Ctrl-] in it leaves too).

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;
use clap::Args;
use nix::sys::termios::{self, SetArg, Termios};

use super::context::Ctx;
use super::RepoArgs;
use crate::records::whereabouts::Whereabouts;
use crate::records::StateDir;
use crate::status::StatusDir;

/// The escape byte: Ctrl-].
pub const ESCAPE: u8 = 0x1d;

/// `console` arguments.
#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// The VM.
    vm: String,
    #[command(flatten)]
    repo: RepoArgs,
}

/// `logs` arguments.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The VM.
    vm: String,
    /// Keep printing what the guest writes, across restarts, until interrupted.
    #[arg(short, long)]
    follow: bool,
    /// Only the last N lines (then, with -f, what follows).
    #[arg(short = 'n', long)]
    lines: Option<usize>,
    #[command(flatten)]
    repo: RepoArgs,
}

/// Where `vm` runs: the host of its status file, else the newest host of the engine's
/// record, else the only host there is.
pub fn pick_host(
    status: Option<String>,
    recorded: Option<&[String]>,
    hosts: &[String],
) -> Option<String> {
    status
        .or_else(|| recorded.and_then(|r| r.last().cloned()))
        .or_else(|| match hosts {
            [only] => Some(only.clone()),
            _ => None,
        })
}

/// The agent argv of the host `vm` runs on, with `mode` appended.
fn serial_agent(repo: &RepoArgs, vm: &str, mode: &[String]) -> anyhow::Result<Vec<String>> {
    let ctx = Ctx::open(repo)?;
    let target = match ctx.target()? {
        Ok(t) => t,
        Err((commit, _)) => anyhow::bail!("commit {commit} is invalid; run `plasmavmc validate`"),
    };
    let state = StateDir::at(&ctx.state);
    let status = StatusDir::new(&state.status_dir())
        .vm(vm)
        .ok()
        .flatten()
        .and_then(|s| s.host);
    let recorded = Whereabouts::new(&ctx.state).read().ok().flatten();
    let names: Vec<String> = target.desired.hosts.keys().cloned().collect();
    let host = pick_host(
        status,
        recorded.as_ref().and_then(|p| p.get(vm)).map(Vec::as_slice),
        &names,
    )
    .with_context(|| {
        format!("where {vm} runs is not known (no status file); run `plasmavmc status` first")
    })?;
    let entry = target.desired.hosts.get(&host).with_context(|| {
        format!(
            "{vm} runs on {host}, which is not in commit {}",
            target.commit.short()
        )
    })?;
    Ok(crate::host::serial_argv(entry, &state, mode)?)
}

fn spawn(argv: &[String], stdout: Stdio) -> anyhow::Result<Child> {
    let (exe, rest) = argv.split_first().context("empty agent command")?;
    Command::new(exe)
        .args(rest)
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot run {exe}"))
}

fn exit_code(child: &mut Child) -> anyhow::Result<u8> {
    let status = child.wait()?;
    Ok(u8::try_from(status.code().unwrap_or(1)).unwrap_or(1))
}

/// `plasmavmc logs`.
pub fn logs(args: &LogsArgs) -> anyhow::Result<u8> {
    let mut mode = vec!["--logs".to_owned(), args.vm.clone()];
    if args.follow {
        mode.push("--follow".to_owned());
    }
    if let Some(n) = args.lines {
        mode.extend(["--lines".to_owned(), n.to_string()]);
    }
    let agent = serial_agent(&args.repo, &args.vm, &mode)?;
    let mut child = spawn(&agent, Stdio::inherit())?;
    // Held (`wait` would close it first): the agent follows until this process ends.
    let _held = child.stdin.take();
    exit_code(&mut child)
}

/// Raw mode on a terminal stdin while it lives; the saved settings come back on drop.
struct RawMode(Option<Termios>);

impl RawMode {
    fn enter() -> Self {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Self(None);
        }
        let Ok(saved) = termios::tcgetattr(&stdin) else {
            return Self(None);
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        if termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
            return Self(None);
        }
        Self(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, saved);
        }
    }
}

/// `plasmavmc console`.
pub fn console(args: &ConsoleArgs) -> anyhow::Result<u8> {
    let mode = ["--console".to_owned(), args.vm.clone()];
    let agent = serial_agent(&args.repo, &args.vm, &mode)?;
    let mut child = spawn(&agent, Stdio::inherit())?;
    let mut to_agent = child.stdin.take().context("agent stdin")?;
    eprintln!("console of {} (leave with Ctrl-])\r", args.vm);
    let raw = RawMode::enter();
    let (left_tx, left_rx) = std::sync::mpsc::channel::<()>();
    // Blocking reads of stdin; the thread is abandoned when the process ends.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            let (keep, escaped) = match chunk.iter().position(|b| *b == ESCAPE) {
                Some(i) => (&chunk[..i], true),
                None => (chunk, false),
            };
            if to_agent
                .write_all(keep)
                .and_then(|()| to_agent.flush())
                .is_err()
                || escaped
            {
                let _ = left_tx.send(());
                return;
            }
        }
    });
    let code = loop {
        if let Some(status) = child.try_wait()? {
            break u8::try_from(status.code().unwrap_or(1)).unwrap_or(1);
        }
        match left_rx.recv_timeout(std::time::Duration::from_millis(100)) {
            Ok(()) => {
                let _ = child.kill();
                let _ = child.wait();
                break 0;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            // stdin ended: the agent sees its stdin close and ends too.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break exit_code(&mut child)?,
        }
    };
    drop(raw);
    eprintln!("\r\nconsole of {} closed", args.vm);
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_comes_from_status_then_the_record_then_the_only_host() {
        let rec = ["hv1".to_owned(), "hv2".to_owned()];
        let one = ["hv9".to_owned()];
        assert_eq!(
            pick_host(Some("hv3".into()), Some(&rec), &one).as_deref(),
            Some("hv3")
        );
        assert_eq!(pick_host(None, Some(&rec), &one).as_deref(), Some("hv2"));
        assert_eq!(pick_host(None, None, &one).as_deref(), Some("hv9"));
        assert_eq!(pick_host(None, None, &rec), None);
    }
}
