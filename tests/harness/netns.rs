//! Real L2 between simulated hosts on one machine: network namespaces, bridges and veths
//! (DESIGN §3, "Simulated hosts with real L2").
//!
//! A [`Lan`] is, for one test:
//! - one namespace per simulated host, holding a bridge named [`BRIDGE`] (`stp_state 0
//!   forward_delay 0`, a fixed MAC) with the host's own address on it
//!   ([`Lan::host_ip`], as a real host has: where other hosts reach it for live
//!   migration) and the veth `uplink` enslaved to it; the host's agent runs in it (`ip
//!   netns exec NS plasmavmc agent …`, see [`crate::HostSpec::netns`]), so the taps it
//!   creates and its QEMUs live there;
//! - a "switch" namespace with a bridge `sw` and the other end of every host's uplink
//!   (`h0`, `h1`, …) and of the client's;
//! - a client namespace whose `eth0` ([`CLIENT_IP`]) sits on the switch: where the test
//!   pings and talks TCP to the guests from ([`Lan::ping`], [`Lan::prober`],
//!   [`Lan::echo_stream`]).
//!
//! Interface names are per namespace, so every Lan uses the same short ones (≤ 15
//! characters); only the namespaces' names are unique: `pvn-<pid>-<n>-<role>`
//! ([`PREFIX`], the test process's pid, a counter). Dropping the Lan deletes its
//! namespaces, and with them every bridge, veth and tap in them, even when the test
//! failed; [`Lan::new`] first sweeps namespaces left by test processes that died (their
//! pid is gone). Deleting a namespace while a QEMU still holds a tap in it only unlists
//! it: the kernel frees it when that QEMU (killed by the [`crate::TestRepo`]'s cleanup)
//! is gone.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::run::Output;

/// What every namespace a [`Lan`] makes is named after: `pvn-<pid>-<n>-<role>`.
pub const PREFIX: &str = "pvn-";

/// The bridge of network `lan` in every host namespace (`[networks.lan] bridge`).
pub const BRIDGE: &str = "br-lan";

/// The client's address on the switch (`/24`); guests take `10.77.0.N` beside it.
pub const CLIENT_IP: &str = "10.77.0.1";

/// The prefix length of the lan.
pub const PREFIX_LEN: u8 = 24;

/// `10.77.0.<n>`: a guest's address on the lan (guests take 2..=199).
pub fn lan_ip(n: u8) -> String {
    format!("10.77.0.{n}")
}

/// The address of the `i`-th host of a [`Lan`] on its bridge: `10.77.0.<200 + i>`.
fn host_address(i: usize) -> String {
    format!("10.77.0.{}", 200 + i)
}

/// One test's simulated L2 network (see the module doc).
#[derive(Debug)]
pub struct Lan {
    /// `pvn-<pid>-<n>-`: every namespace of this Lan starts with it.
    stem: String,
    /// `(host, namespace)`, in the order given.
    hosts: Vec<(String, String)>,
    switch: String,
    client: String,
    /// Namespaces made so far, removed by `Drop`.
    made: Vec<String>,
}

impl Lan {
    /// Namespaces for `hosts` (each with [`BRIDGE`] and an uplink), the switch and the
    /// client, all linked. Sweeps what dead test runs left first.
    pub fn new(hosts: &[&str]) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        sweep();
        let stem = format!(
            "{PREFIX}{}-{}-",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut lan = Self {
            switch: format!("{stem}sw"),
            client: format!("{stem}cl"),
            hosts: Vec::new(),
            stem,
            made: Vec::new(),
        };
        // Everything made is in `made` before the next step, so a failure half-way is
        // cleaned up by Drop.
        lan.add_ns(&lan.switch.clone()).context(
            "making a network namespace (tests on real L2 need root and iproute2; they do not skip)",
        )?;
        let sw = lan.switch.clone();
        bridge_up(&sw, "sw", &[])?;

        let client = lan.client.clone();
        lan.add_ns(&client)?;
        ip(&[
            "-n", &sw, "link", "add", "cl", "type", "veth", "peer", "name", "eth0", "netns",
            &client,
        ])?;
        ip(&["-n", &sw, "link", "set", "cl", "master", "sw", "up"])?;
        let addr = format!("{CLIENT_IP}/{PREFIX_LEN}");
        ip(&["-n", &client, "addr", "add", &addr, "dev", "eth0"])?;
        ip(&["-n", &client, "link", "set", "eth0", "up"])?;
        ip(&["-n", &client, "link", "set", "lo", "up"])?;

        for (i, host) in hosts.iter().enumerate() {
            let ns = format!("{}h{i}", lan.stem);
            lan.add_ns(&ns)?;
            lan.hosts.push(((*host).to_owned(), ns.clone()));
            let port = format!("h{i}");
            // A fixed MAC, as systemd-networkd gives a bridge: left to the kernel, a
            // bridge takes its lowest port's MAC, which changes as taps come and go, and
            // the other hosts' ARP entries for its address go stale (a live move's
            // migration stream to it then hung in setup for 30 s: seen once in 10 moves).
            let mac = format!("02:77:00:00:00:{:02x}", i + 1);
            bridge_up(&ns, BRIDGE, &["address", &mac])?;
            let addr = format!("{}/{PREFIX_LEN}", host_address(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", BRIDGE])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "uplink", "netns",
                &ns,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "sw", "up"])?;
            ip(&["-n", &ns, "link", "set", "uplink", "master", BRIDGE, "up"])?;
        }
        Ok(lan)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.made.push(name.to_owned());
        Ok(())
    }

    /// The namespace of simulated host `host`.
    pub fn host_ns(&self, host: &str) -> Result<&str> {
        self.hosts
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, ns)| ns.as_str())
            .with_context(|| format!("host {host} is not on this lan"))
    }

    /// `host`'s own address on its bridge (what its `migration_address` should be: other
    /// hosts' QEMUs reach its migration listener there).
    pub fn host_ip(&self, host: &str) -> Result<String> {
        self.hosts
            .iter()
            .position(|(h, _)| h == host)
            .map(host_address)
            .with_context(|| format!("host {host} is not on this lan"))
    }

    /// The client's namespace (on the switch, [`CLIENT_IP`]).
    pub fn client_ns(&self) -> &str {
        &self.client
    }

    /// Deletes `host`'s bridge: a host that says it has the network but lacks the bridge
    /// (and so has no address on the lan any more).
    pub fn remove_bridge(&self, host: &str) -> Result<()> {
        ip(&["-n", self.host_ns(host)?, "link", "del", BRIDGE])
    }

    /// Runs `argv` in namespace `ns` (`ip netns exec`), waits for it, returns its output.
    pub fn exec(&self, ns: &str, argv: &[&str]) -> Result<Output> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(argv);
        let out = cmd
            .output()
            .with_context(|| format!("running ip netns exec {ns} {}", argv.join(" ")))?;
        Ok(Output {
            command: format!("ip netns exec {ns} {}", argv.join(" ")),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// The taps (any `tap` device) in `host`'s namespace, by name.
    pub fn taps(&self, host: &str) -> Result<Vec<String>> {
        let out = Command::new("ip")
            .args([
                "-n",
                self.host_ns(host)?,
                "-o",
                "link",
                "show",
                "type",
                "tun",
            ])
            .output()
            .context("running ip link show type tun")?;
        ensure!(
            out.status.success(),
            "ip link show: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .collect())
    }

    /// `ping -c count -i interval` from the client to `ip`, each reply awaited at most
    /// 1 s; never fails on loss (see [`PingStats`]).
    pub fn ping(&self, ip: &str, count: u32, interval: Duration) -> Result<PingStats> {
        let started = SystemTime::now();
        let out = self.exec(
            &self.client,
            &[
                "ping",
                "-D",
                "-n",
                "-W",
                "1",
                "-c",
                &count.to_string(),
                "-i",
                &format!("{:.3}", interval.as_secs_f64()),
                ip,
            ],
        )?;
        PingStats::parse(&out.stdout, started, SystemTime::now())
            .with_context(|| format!("ping {ip}: {}{}", out.stdout, out.stderr))
    }

    /// Waits (at most `timeout`) until `ip` answers a ping from the client.
    pub fn wait_reachable(&self, ip: &str, timeout: Duration) -> Result<()> {
        let mut last = None;
        crate::wait_for(
            format!("{ip} to answer pings from the client"),
            timeout,
            || {
                let stats = self.ping(ip, 1, Duration::from_millis(10));
                let ok = stats.as_ref().is_ok_and(|s| s.received > 0);
                last = Some(stats);
                ok
            },
        )
        .with_context(|| format!("last ping: {last:?}"))
    }

    /// A ping from the client to `ip` every `interval` until [`Prober::stop`]: for the
    /// packets lost and the longest gap between replies while something happens.
    pub fn prober(&self, ip: &str, interval: Duration) -> Result<Prober> {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.client])
            .args(["ping", "-D", "-n", "-W", "1", "-i"])
            .arg(format!("{:.3}", interval.as_secs_f64()))
            .arg(ip)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning ping in the client namespace")?;
        Ok(Prober {
            child: Some(child),
            started: SystemTime::now(),
        })
    }

    /// A TCP connection from the client to `addr` (an echo server) exchanging a line
    /// every `every` until [`EchoStream::stop`]: proves a connection survives.
    pub fn echo_stream(&self, addr: SocketAddr, every: Duration) -> Result<EchoStream> {
        let ns = File::open(format!("/run/netns/{}", self.client))
            .with_context(|| format!("opening namespace {}", self.client))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || -> Result<EchoReport> {
            // Only this thread enters the client's namespace.
            let entered = setns(&ns, CloneFlags::CLONE_NEWNET).context("setns into the client");
            let stream = entered.and_then(|()| connect(addr));
            let stream = match stream {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return Err(e);
                }
            };
            echo_loop(stream, every, &flag)
        });
        match ready_rx.recv_timeout(CONNECT_TIMEOUT * 2) {
            Ok(Ok(())) => Ok(EchoStream {
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => bail!("echo stream to {addr}: {e}"),
            Err(_) => bail!(
                "echo stream to {addr}: no connection within {:?}",
                CONNECT_TIMEOUT * 2
            ),
        }
    }
}

/// Connects to `addr`, again while it is refused (the guest prints that its echo server
/// started before busybox `nc` listens), for at most [`CONNECT_TIMEOUT`].
fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(stream) => return Ok(stream),
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(crate::wait::POLL);
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {addr}")),
        }
    }
}

/// Bound for [`connect`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("lan cleanup: {e:#}");
            }
        }
    }
}

/// Runs `ip ARGS`; fails with its stderr unless it exits 0.
/// Makes bridge `name` in namespace `ns` (`extra`: more `ip link add` settings, such as
/// its MAC) with STP off and no forward delay, so a port forwards at once; and brings it
/// up.
fn bridge_up(ns: &str, name: &str, extra: &[&str]) -> Result<()> {
    let mut add = vec!["-n", ns, "link", "add", name];
    add.extend_from_slice(extra);
    add.extend_from_slice(&["type", "bridge", "stp_state", "0", "forward_delay", "0"]);
    ip(&add)?;
    ip(&["-n", ns, "link", "set", name, "up"])
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (iproute2)")?;
    ensure!(
        out.status.success(),
        "ip {}: {}: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Deletes the namespaces of test processes that are gone (`pvn-<pid>-…` whose pid
/// does not exist): what a killed test run left behind.
pub fn sweep() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !crate::proc::is_alive(pid) {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// Replies of a ping run: how many were sent and answered, and the longest time without
/// a reply (between replies, and from the start to the first / the last to the end).
#[derive(Debug, Clone, PartialEq)]
pub struct PingStats {
    pub transmitted: u32,
    pub received: u32,
    /// The longest stretch without a reply.
    pub longest_gap: Duration,
    /// When that stretch began (the reply before it, or the start).
    pub gap_start: SystemTime,
}

impl PingStats {
    /// Packets sent and not answered.
    pub fn lost(&self) -> u32 {
        self.transmitted.saturating_sub(self.received)
    }

    /// Parses `ping -D` output of a run between `started` and `ended`.
    pub fn parse(text: &str, started: SystemTime, ended: SystemTime) -> Result<Self> {
        let mut replies = Vec::new();
        let mut transmitted = None;
        let mut received = 0;
        for line in text.lines() {
            if let Some(stamp) = line
                .strip_prefix('[')
                .and_then(|l| l.split_once(']'))
                .filter(|(_, rest)| rest.contains("bytes from") && !rest.contains("DUP!"))
                .and_then(|(t, _)| t.parse::<f64>().ok())
            {
                replies.push(UNIX_EPOCH + Duration::from_secs_f64(stamp));
            }
            if line.contains("packets transmitted") {
                let mut words = line.split_whitespace();
                transmitted = words.next().and_then(|n| n.parse().ok());
                received = line
                    .split(", ")
                    .find(|p| p.ends_with("received"))
                    .and_then(|p| p.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
            }
        }
        let transmitted = transmitted.context("no `packets transmitted` summary")?;
        let mut points = vec![started];
        points.extend(replies);
        points.push(ended);
        let (gap_start, longest_gap) = points
            .windows(2)
            .map(|w| (w[0], w[1].duration_since(w[0]).unwrap_or_default()))
            .max_by_key(|(_, gap)| *gap)
            .unwrap_or((started, Duration::ZERO));
        Ok(Self {
            transmitted,
            received,
            longest_gap,
            gap_start,
        })
    }
}

/// A ping running in the background (see [`Lan::prober`]); killed on drop.
#[derive(Debug)]
pub struct Prober {
    child: Option<Child>,
    started: SystemTime,
}

impl Prober {
    /// Stops the ping (SIGINT: it prints its summary) and returns what it saw.
    pub fn stop(mut self) -> Result<PingStats> {
        let mut child = self.child.take().context("prober already stopped")?;
        let ended = SystemTime::now();
        let pid = i32::try_from(child.id()).context("pid")?;
        kill(Pid::from_raw(pid), Signal::SIGINT).context("interrupting ping")?;
        let mut text = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out).read_to_string(&mut text)?;
        }
        let status = child.wait()?;
        PingStats::parse(&text, self.started, ended).with_context(|| {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            format!("ping ({status}): {text}{err}")
        })
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What an [`EchoStream`] saw: lines echoed, and the slowest echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoReport {
    pub lines: u64,
    pub slowest: Duration,
}

/// A TCP connection exchanging lines with an echo server (see [`Lan::echo_stream`]).
#[derive(Debug)]
pub struct EchoStream {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<EchoReport>>>,
}

/// Bound for one echo: a TCP retransmission after a move's outage comes well within it.
const ECHO_TIMEOUT: Duration = Duration::from_secs(15);

fn echo_loop(stream: TcpStream, every: Duration, stop: &AtomicBool) -> Result<EchoReport> {
    stream.set_read_timeout(Some(ECHO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut report = EchoReport {
        lines: 0,
        slowest: Duration::ZERO,
    };
    while !stop.load(Ordering::Relaxed) {
        let line = format!("echo {}\n", report.lines);
        let sent = Instant::now();
        writer
            .write_all(line.as_bytes())
            .with_context(|| format!("sending line {} (after {report:?})", report.lines))?;
        let mut back = String::new();
        let n = reader
            .read_line(&mut back)
            .with_context(|| format!("reading echo {} (after {report:?})", report.lines))?;
        ensure!(n > 0, "the connection was closed after {report:?}");
        ensure!(back == line, "sent {line:?}, got back {back:?}");
        report.slowest = report.slowest.max(sent.elapsed());
        report.lines += 1;
        std::thread::sleep(every);
    }
    Ok(report)
}

impl EchoStream {
    /// Stops exchanging lines; fails if the connection broke or an echo was wrong.
    pub fn stop(mut self) -> Result<EchoReport> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().context("stopped twice")?;
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("the echo thread panicked"))?
    }
}

impl Drop for EchoStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_output_gives_loss_and_the_longest_gap() {
        let text = "PING 10.77.0.11 (10.77.0.11) 56(84) bytes of data.\n\
            [100.000] 64 bytes from 10.77.0.11: icmp_seq=1 ttl=64 time=0.3 ms\n\
            [100.010] 64 bytes from 10.77.0.11: icmp_seq=2 ttl=64 time=0.3 ms\n\
            [100.210] 64 bytes from 10.77.0.11: icmp_seq=22 ttl=64 time=0.3 ms\n\
            [100.215] 64 bytes from 10.77.0.11: icmp_seq=22 ttl=64 time=0.3 ms (DUP!)\n\
            [100.220] 64 bytes from 10.77.0.11: icmp_seq=23 ttl=64 time=0.3 ms\n\
            \n--- 10.77.0.11 ping statistics ---\n\
            23 packets transmitted, 4 received, +1 duplicates, 82.6087% packet loss, time 230ms\n";
        let at = |s: f64| UNIX_EPOCH + Duration::from_secs_f64(s);
        let stats = PingStats::parse(text, at(99.995), at(100.225)).expect("parses");
        assert_eq!(
            (stats.transmitted, stats.received, stats.lost()),
            (23, 4, 19)
        );
        assert_eq!(stats.longest_gap.as_millis(), 200);
        assert_eq!(stats.gap_start, at(100.010));
        // No reply at all: the whole run is the gap.
        let none =
            "--- x ping statistics ---\n5 packets transmitted, 0 received, 100% packet loss\n";
        let stats = PingStats::parse(none, at(1.0), at(3.0)).expect("parses");
        assert_eq!(
            (stats.received, stats.longest_gap),
            (0, Duration::from_secs(2))
        );
        assert!(PingStats::parse("garbage", at(1.0), at(2.0)).is_err());
    }
}
