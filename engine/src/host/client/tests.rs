//! [`AgentHost`] against fake agents: shell commands that speak just enough protocol.

use std::time::{Duration, Instant};

use super::*;
use crate::observe::Capacity;

/// Writes the frames `msgs` to a file and returns an argv that sends them, then reads
/// (and ignores) everything the engine sends until EOF, keeping its stdout open (as fd
/// 3): an agent that welcomes its controller and then answers nothing, not even a ping.
fn silent_agent(dir: &Path, msgs: &[FromAgent]) -> Vec<String> {
    let mut bytes = Vec::new();
    for msg in msgs {
        let json = serde_json::to_vec(msg).expect("serialises");
        let len = u32::try_from(json.len()).expect("small frame");
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&json);
    }
    let path = dir.join("frames");
    std::fs::write(&path, bytes).expect("frames written");
    ["sh", "-c", "cat \"$1\"; exec cat 3>&1 >/dev/null", "sh"]
        .into_iter()
        .map(str::to_owned)
        .chain([path.display().to_string()])
        .collect()
}

fn welcome() -> FromAgent {
    FromAgent::Welcome {
        version: VERSION,
        host: HostFacts {
            hostname: "fake".into(),
            root: "/nowhere".into(),
            capacity: Capacity::default(),
            qemu: "qemu-system-x86_64".into(),
            agent_version: "test".into(),
        },
    }
}

#[tokio::test]
async fn a_call_to_an_agent_gone_silent_gives_up_after_down_after_a_look_sooner() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opts = ConnectOptions {
        heartbeat: Duration::from_millis(50),
        down_after: Duration::from_millis(300),
        request_timeout: Duration::from_secs(120),
        ..ConnectOptions::default()
    };
    let host = AgentHost::connect("hv1", &silent_agent(dir.path(), &[welcome()]), opts)
        .await
        .expect("the fake agent welcomes");
    let gave_up = |err: &HostError, after: &str| matches!(err, HostError::Unreachable { reason, .. } if reason.contains(&format!("sent nothing for {after}")));
    // A look (inventory) gives up once the host is suspect: two heartbeats of silence.
    let asked = Instant::now();
    let err = host.inventory().await.expect_err("nothing answers");
    assert!(gave_up(&err, "100ms"), "{err}");
    // An action waits until the host is down.
    let err = host.delete("web").await.expect_err("nothing answers");
    let waited = asked.elapsed();
    host.close();
    assert!(gave_up(&err, "300ms"), "{err}");
    // Not the 120 s request timeout: at most down_after, plus generous slack.
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    assert!(host.silence() >= Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_exits_at_once_is_reported_with_its_last_words() {
    // What ssh does when the host key does not match: a few lines, then exit 255.
    let argv = [
        "sh",
        "-c",
        "echo 'Offending key in known_hosts:1' >&2; \
         echo 'Host key verification failed.' >&2; exit 255",
    ]
    .map(String::from);
    // stdout's EOF used to overtake these lines now and then: try it many times.
    for _ in 0..20 {
        let err = AgentHost::connect("hv1", &argv, ConnectOptions::default())
            .await
            .expect_err("the agent exits without a welcome");
        let text = err.to_string();
        assert!(
            text.starts_with("host hv1 is unreachable: the agent exited: ")
                && text.ends_with("Host key verification failed."),
            "{text}"
        );
    }
}
