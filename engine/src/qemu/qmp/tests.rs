//! Tests of the QMP client against the scripted fake server in `fake`.
//!
//! In: socket pairs and temp-dir sockets served by [`fake::FakeQemu`]. Out: assertions on the
//! client's results, events and close reports. Touches nothing outside its temp dirs.

pub(crate) mod fake;

use std::os::fd::AsRawFd;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tokio::net::{UnixListener, UnixStream};

use super::wire::{self, Message, MAX_LINE};
use super::{Closed, Qmp, QmpError, QmpEvent, QmpVersion, VmRunState};
use fake::{connected, FakeQemu, TestError, TestResult, DEADLINE};

const SHORT: Duration = Duration::from_millis(100);

fn stamp(micros: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_micros(micros)
}

async fn within<F: std::future::Future>(future: F) -> TestResult<F::Output> {
    Ok(tokio::time::timeout(DEADLINE, future).await?)
}

#[tokio::test]
async fn handshake_then_commands_with_and_without_arguments() -> TestResult {
    let (qmp, mut fake) = connected().await?;
    assert_eq!(
        qmp.version(),
        &QmpVersion {
            major: 7,
            minor: 2,
            micro: 0
        }
    );
    assert!(!qmp.is_closed());

    let script = async {
        let (id, arguments) = fake.expect("query-name").await?;
        assert!(id.is_u64(), "ids are numeric, got {id}");
        assert_eq!(arguments, None);
        fake.reply(&id, json!({"name": "vm1"})).await?;
        let (id, arguments) = fake.expect("stop").await?;
        assert_eq!(arguments, Some(json!({"force": true})));
        fake.reply(&id, json!({})).await
    };
    let run = async {
        let name = qmp.execute("query-name", None).await?;
        let stop = qmp.execute("stop", Some(json!({"force": true}))).await?;
        Ok::<_, QmpError>((name, stop))
    };
    let (results, script) = tokio::join!(run, script);
    script?;
    assert_eq!(results?, (json!({"name": "vm1"}), json!({})));
    Ok(())
}

#[tokio::test]
async fn out_of_order_replies_reach_their_callers() -> TestResult {
    let (qmp, mut fake) = connected().await?;
    let script = async {
        let mut ids = std::collections::HashMap::new();
        for _ in 0..3 {
            let (name, id, _) = fake.next_command().await?;
            ids.insert(name, id);
        }
        fake.event("STOP", None, 1).await?;
        fake.reply(&ids["c"], json!("reply-c")).await?;
        fake.reply(&ids["a"], json!("reply-a")).await?;
        fake.event("RESUME", None, 2).await?;
        fake.reply(&ids["b"], json!("reply-b")).await?;
        Ok::<_, TestError>(())
    };
    let (a, b, c, script) = tokio::join!(
        qmp.execute("a", None),
        qmp.execute("b", None),
        qmp.execute("c", None),
        script
    );
    script?;
    assert_eq!(
        (a?, b?, c?),
        (json!("reply-a"), json!("reply-b"), json!("reply-c"))
    );
    Ok(())
}

#[tokio::test]
async fn events_arrive_in_order_from_the_greeting_on() -> TestResult {
    let (client, server) = UnixStream::pair()?;
    let mut fake = FakeQemu::new(server);
    let (qmp, greeted) = tokio::join!(
        Qmp::from_stream(client, DEADLINE),
        fake.greet_with(&[("EARLY", 1)])
    );
    greeted?;
    let qmp = qmp?;
    let mut events = qmp.take_events().ok_or("events already taken")?;
    assert!(qmp.take_events().is_none(), "events can be taken once");

    let script = async {
        fake.event("BEFORE", Some(json!({"n": 1})), 2).await?;
        let (id, _) = fake.expect("cont").await?;
        fake.event("RESUME", None, 3).await?;
        fake.reply(&id, json!({})).await?;
        Ok::<_, TestError>(())
    };
    let (result, script) = tokio::join!(qmp.execute("cont", None), script);
    script?;
    result?;
    fake.send(&json!({"timestamp": {"seconds": -1, "microseconds": -1}, "event": "NOCLOCK"}))
        .await?;
    drop(fake);

    let mut seen = Vec::new();
    while let Some(event) = within(events.recv()).await? {
        seen.push(event);
    }
    let expected = [
        ("EARLY", Value::Null, Some(stamp(1))),
        ("BEFORE", json!({"n": 1}), Some(stamp(2))),
        ("RESUME", Value::Null, Some(stamp(3))),
        ("NOCLOCK", Value::Null, None),
    ]
    .map(|(event, data, timestamp)| QmpEvent {
        event: event.to_owned(),
        data,
        timestamp,
    });
    assert_eq!(seen, expected);
    Ok(())
}

#[tokio::test]
async fn error_reply_is_a_command_error() -> TestResult {
    let (qmp, mut fake) = connected().await?;
    let script = async {
        let (id, _) = fake.expect("device_del").await?;
        fake.reply_error(&id, "DeviceNotFound", "Device 'nic9' not found")
            .await
    };
    let (result, script) = tokio::join!(qmp.execute("device_del", None), script);
    script?;
    match result {
        Err(QmpError::Command {
            command,
            class,
            desc,
        }) => {
            assert_eq!(command, "device_del");
            assert_eq!(class, "DeviceNotFound");
            assert_eq!(desc, "Device 'nic9' not found");
        }
        other => return Err(format!("expected a command error, got {other:?}").into()),
    }
    Ok(())
}

#[tokio::test]
async fn stalled_command_times_out_and_the_connection_stays_usable() -> TestResult {
    let (qmp, mut fake) = connected().await?;
    let (result, stalled) = tokio::join!(
        qmp.execute_timeout("query-block", None, SHORT),
        fake.expect("query-block")
    );
    let (stalled_id, _) = stalled?;
    assert!(
        matches!(&result, Err(QmpError::Timeout { command, after }) if command == "query-block" && *after == SHORT),
        "expected a timeout, got {result:?}"
    );
    assert!(
        qmp.shared.pending().waiters.is_empty(),
        "timed-out waiter removed"
    );

    let script = async {
        // The late reply must be dropped, not given to the next command.
        fake.reply(&stalled_id, json!("late")).await?;
        let (id, _) = fake.expect("query-name").await?;
        fake.reply(&id, json!("fresh")).await
    };
    let (result, script) = tokio::join!(qmp.execute("query-name", None), script);
    script?;
    assert_eq!(result?, json!("fresh"));
    assert!(!qmp.is_closed());
    Ok(())
}

#[tokio::test]
async fn close_mid_command_fails_with_closed() -> TestResult {
    let (qmp, mut fake) = connected().await?;
    let script = async {
        fake.expect("query-status").await?;
        drop(fake);
        Ok::<_, TestError>(())
    };
    let (result, script) = tokio::join!(qmp.execute("query-status", None), script);
    script?;
    assert!(
        matches!(&result, Err(QmpError::Closed { command }) if command == "query-status"),
        "expected closed, got {result:?}"
    );
    assert_eq!(within(qmp.closed()).await?, Closed { shutdown: None });
    assert!(qmp.is_closed());
    let after = qmp.execute("query-status", None).await;
    assert!(
        matches!(after, Err(QmpError::Closed { .. })),
        "got {after:?}"
    );
    Ok(())
}

#[tokio::test]
async fn shutdown_then_eof_reports_the_first_shutdown() -> TestResult {
    let (qmp, mut fake) = connected().await?;
    let mut events = qmp.take_events().ok_or("events already taken")?;
    let first = json!({"guest": true, "reason": "guest-shutdown"});
    fake.event("SHUTDOWN", Some(first.clone()), 1).await?;
    fake.event(
        "SHUTDOWN",
        Some(json!({"guest": false, "reason": "host-signal"})),
        2,
    )
    .await?;
    drop(fake);

    let closed = within(qmp.closed()).await?;
    assert_eq!(closed.shutdown, Some(first));
    assert!(qmp.is_closed());
    for _ in 0..2 {
        let event = within(events.recv()).await?.ok_or("missing event")?;
        assert_eq!(event.event, "SHUTDOWN");
    }
    assert_eq!(within(events.recv()).await?, None);
    Ok(())
}

#[tokio::test]
async fn eof_without_shutdown_reports_none() -> TestResult {
    let (qmp, mut fake) = connected().await?;
    fake.event("STOP", None, 1).await?;
    drop(fake);
    assert_eq!(within(qmp.closed()).await?, Closed { shutdown: None });
    Ok(())
}

#[tokio::test]
async fn bad_greetings_are_handshake_errors() -> TestResult {
    let greetings: [&[u8]; 4] = [
        b"{\"hello\": \"world\"}\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"{\"QMP\": {\"capabilities\": []}}\r\n",
        b"",
    ];
    for greeting in greetings {
        let (client, server) = UnixStream::pair()?;
        let mut fake = FakeQemu::new(server);
        fake.send_raw(greeting).await?;
        drop(fake);
        let result = Qmp::from_stream(client, DEADLINE).await;
        assert!(
            matches!(result, Err(QmpError::Handshake { .. })),
            "greeting {:?} gave {result:?}",
            String::from_utf8_lossy(greeting)
        );
    }
    Ok(())
}

#[tokio::test]
async fn silent_server_is_a_handshake_timeout() -> TestResult {
    let (client, _server) = UnixStream::pair()?;
    let result = Qmp::from_stream(client, SHORT).await;
    assert!(
        matches!(result, Err(QmpError::HandshakeTimeout { after }) if after == SHORT),
        "got {result:?}"
    );
    Ok(())
}

#[tokio::test]
async fn refused_capabilities_are_a_command_error() -> TestResult {
    let (client, server) = UnixStream::pair()?;
    let mut fake = FakeQemu::new(server);
    let script = async {
        fake.send(&fake::greeting()).await?;
        let (id, _) = fake.expect("qmp_capabilities").await?;
        fake.reply_error(&id, "CommandNotFound", "nope").await
    };
    let (result, script) = tokio::join!(Qmp::from_stream(client, DEADLINE), script);
    script?;
    assert!(
        matches!(&result, Err(QmpError::Command { command, class, .. }) if command == "qmp_capabilities" && class == "CommandNotFound"),
        "got {result:?}"
    );
    Ok(())
}

#[tokio::test]
async fn long_socket_path_connects() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut dir = tmp.path().to_path_buf();
    while dir.as_os_str().len() < 120 {
        dir.push("a-rather-long-instance-directory");
    }
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("qmp.sock");
    assert!(path.as_os_str().len() > 108);
    // The server side needs the same detour to bind.
    let anchor = std::fs::File::open(&dir)?;
    let listener = UnixListener::bind(format!("/proc/self/fd/{}/qmp.sock", anchor.as_raw_fd()))?;
    assert!(path.exists(), "socket bound in the deep directory");
    assert!(
        std::os::unix::net::UnixStream::connect(&path).is_err(),
        "a plain connect cannot take this path"
    );

    let server = async {
        let (stream, _) = within(listener.accept()).await??;
        let mut fake = FakeQemu::new(stream);
        fake.greet().await?;
        Ok::<_, TestError>(fake)
    };
    let (qmp, fake) = tokio::join!(Qmp::connect(&path, DEADLINE), server);
    let (qmp, mut fake) = (qmp?, fake?);
    let script = async {
        let (id, _) = fake.expect("query-status").await?;
        fake.reply(
            &id,
            json!({"status": "running", "singlestep": false, "running": true}),
        )
        .await
    };
    let (status, script) = tokio::join!(qmp.query_status(), script);
    script?;
    assert!(status?.running);
    Ok(())
}

#[tokio::test]
async fn missing_socket_is_a_connect_error() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("absent.sock");
    let result = Qmp::connect(&path, DEADLINE).await;
    assert!(
        matches!(&result, Err(QmpError::Connect { path: p, .. }) if *p == path),
        "got {result:?}"
    );
    Ok(())
}

#[tokio::test]
async fn quit_succeeds_on_reply_or_on_eof() -> TestResult {
    // What QEMU 7.2 does: SHUTDOWN, the reply, then it closes the socket.
    let (qmp, mut fake) = connected().await?;
    let script = async {
        let (id, _) = fake.expect("quit").await?;
        let data = json!({"guest": false, "reason": "host-qmp-quit"});
        fake.event("SHUTDOWN", Some(data), 1).await?;
        fake.reply(&id, json!({})).await?;
        drop(fake);
        Ok::<_, TestError>(())
    };
    let (result, script) = tokio::join!(qmp.quit(), script);
    script?;
    result?;
    let closed = within(qmp.closed()).await?;
    assert_eq!(
        closed.shutdown,
        Some(json!({"guest": false, "reason": "host-qmp-quit"}))
    );
    // Quitting a closed connection is an error: nothing was sent.
    let again = qmp.quit().await;
    assert!(
        matches!(again, Err(QmpError::Closed { .. })),
        "got {again:?}"
    );

    // QEMU exits before its reply is written.
    let (qmp, mut fake) = connected().await?;
    let script = async {
        fake.expect("quit").await?;
        drop(fake);
        Ok::<_, TestError>(())
    };
    let (result, script) = tokio::join!(qmp.quit(), script);
    script?;
    result?;
    Ok(())
}

#[tokio::test]
async fn connection_reset_after_quit_is_an_ordinary_close() -> TestResult {
    let (qmp, mut fake) = connected().await?;
    let script = async {
        let (id, _) = fake.expect("quit").await?;
        let data = json!({"guest": false, "reason": "host-qmp-quit"});
        fake.event("SHUTDOWN", Some(data), 1).await?;
        fake.reply(&id, json!({})).await
    };
    let (result, script) = tokio::join!(qmp.quit(), script);
    script?;
    result?;
    // A command QEMU never reads: closing over unread bytes resets the connection.
    let (result, script) = tokio::join!(qmp.execute("query-status", None), fake.hang_up_unread());
    script?;
    assert!(
        matches!(result, Err(QmpError::Closed { .. })),
        "got {result:?}"
    );
    let closed = within(qmp.closed()).await?;
    assert_eq!(
        closed.shutdown,
        Some(json!({"guest": false, "reason": "host-qmp-quit"}))
    );
    Ok(())
}

#[tokio::test]
async fn typed_queries_and_powerdown() -> TestResult {
    let (qmp, mut fake) = connected().await?;
    let script = async {
        let (id, _) = fake.expect("query-status").await?;
        fake.reply(
            &id,
            json!({"status": "prelaunch", "singlestep": false, "running": false}),
        )
        .await?;
        let (id, _) = fake.expect("query-status").await?;
        fake.reply(&id, json!({"status": 7})).await?;
        let (id, _) = fake.expect("system_powerdown").await?;
        fake.reply(&id, json!({})).await
    };
    let run = async {
        let status = qmp.query_status().await;
        let broken = qmp.query_status().await;
        let powerdown = qmp.system_powerdown().await;
        (status, broken, powerdown)
    };
    let ((status, broken, powerdown), script) = tokio::join!(run, script);
    script?;
    assert_eq!(
        status?,
        VmRunState {
            running: false,
            status: "prelaunch".to_owned()
        }
    );
    assert!(
        matches!(&broken, Err(QmpError::Decode { command, .. }) if command == "query-status"),
        "got {broken:?}"
    );
    powerdown?;
    Ok(())
}

#[tokio::test]
async fn stray_messages_are_ignored() -> TestResult {
    let (qmp, mut fake) = connected().await?;
    let script = async {
        let (id, _) = fake.expect("query-name").await?;
        fake.send(&json!({"return": "no id"})).await?;
        fake.send(&json!({"return": "unknown id", "id": 999_999}))
            .await?;
        fake.send(&json!({"return": "string id", "id": "x"}))
            .await?;
        fake.send_raw(b"{not json\r\n\r\n[1, 2]\r\n").await?;
        fake.send(&fake::greeting()).await?;
        fake.reply(&id, json!("right")).await
    };
    let (result, script) = tokio::join!(qmp.execute("query-name", None), script);
    script?;
    assert_eq!(result?, json!("right"));
    assert!(!qmp.is_closed());
    Ok(())
}

#[tokio::test]
async fn overlong_line_closes_the_connection() -> TestResult {
    let (qmp, mut fake) = connected().await?;
    let script = async {
        fake.expect("query-name").await?;
        // The client may hang up before everything is written; that is the point.
        let _ = fake.send_raw(&vec![b' '; MAX_LINE + 1]).await;
        Ok::<_, TestError>(fake)
    };
    let (result, fake) = tokio::join!(qmp.execute("query-name", None), script);
    assert!(
        matches!(result, Err(QmpError::Closed { .. })),
        "got {result:?}"
    );
    assert_eq!(within(qmp.closed()).await?, Closed { shutdown: None });
    // The client released the socket: the server reads EOF.
    assert_eq!(fake?.recv().await?, None);
    Ok(())
}

#[tokio::test]
async fn dropping_the_last_handle_releases_the_socket() -> TestResult {
    let (qmp, mut fake) = connected().await?;
    let clone = qmp.clone();
    drop(qmp);
    let script = async {
        let (id, _) = fake.expect("query-name").await?;
        fake.reply(&id, json!("still here")).await
    };
    let (result, script) = tokio::join!(clone.execute("query-name", None), script);
    script?;
    assert_eq!(result?, json!("still here"));
    drop(clone);
    assert_eq!(
        fake.recv().await?,
        None,
        "tasks ended and closed the socket"
    );
    Ok(())
}

#[tokio::test]
async fn cancelled_command_leaves_no_waiter() -> TestResult {
    let (qmp, mut fake) = connected().await?;
    tokio::select! {
        biased;
        result = qmp.execute("query-name", None) => {
            return Err(format!("unexpected result {result:?}").into());
        }
        received = fake.expect("query-name") => { received?; }
    }
    assert!(qmp.shared.pending().waiters.is_empty());
    Ok(())
}

#[test]
fn wire_parses_events_and_encodes_commands() -> TestResult {
    let line = br#"{"timestamp": {"seconds": 1700000000, "microseconds": 5}, "event": "STOP"}"#;
    let Message::Event(event) = wire::parse_message(line)? else {
        return Err("not an event".into());
    };
    assert_eq!(event.timestamp, Some(stamp(5)));
    assert_eq!(event.data, Value::Null);

    let encoded = wire::encode_command("cont", None, 3);
    assert!(encoded.ends_with(b"\r\n"));
    let value: Value = serde_json::from_slice(&encoded)?;
    assert_eq!(value, json!({"execute": "cont", "id": 3}));

    assert!(matches!(
        wire::parse_message(b"{oops"),
        Err(QmpError::Protocol { .. })
    ));
    Ok(())
}
