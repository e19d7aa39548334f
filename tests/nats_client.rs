//! The NATS client against a real `nats-server` on loopback (and, for the
//! hostile cases, a scripted TCP "server" in the test): publish/subscribe
//! with headers, queue groups, request/reply, reconnect after a restart,
//! wrong credentials, garbage and silence from the server, and JetStream
//! streams, consumers, pulls and acknowledgements.

mod support;

use caf_worker::transport::nats::{
    self, Client, ConsumerConfig, Error, Event, Headers, JetStream, Options, PullItem, Retention,
    StreamConfig,
};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::nats::NatsServer;
use support::wait_for;

const T: Duration = Duration::from_secs(5);

fn options(url: &str) -> Options {
    let mut o = Options::from_url_list(url).unwrap();
    o.name = "nats-client-test".into();
    o
}

/// A client that is connected (or the test fails).
fn connected(url: &str) -> Client {
    let c = Client::start(options(url));
    assert!(
        wait_for(T, || c.is_connected().then_some(())).is_some(),
        "no connection to {url}"
    );
    c
}

/// Events seen within `limit` (or until `stop` says enough).
fn events_until(c: &Client, limit: Duration, mut stop: impl FnMut(&[Event]) -> bool) -> Vec<Event> {
    let rx = c.events();
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    while !stop(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        if let Ok(e) = rx.recv_timeout(left) {
            seen.push(e);
        }
    }
    seen
}

#[test]
fn publish_subscribe_with_headers_and_limits() {
    let server = NatsServer::start();
    let a = connected(&server.url());
    let b = connected(&server.url());
    let sub = a.subscribe("t.>").unwrap();
    a.flush(T).unwrap();

    let mut h = Headers::new();
    h.insert("X-Id", "42");
    h.append("X-Multi", "one");
    h.append("X-Multi", "two");
    b.publish_with_headers("t.one", Some("answers"), &h, b"line\r\nPUB x 1\r\n\0")
        .unwrap();
    b.publish("t.two", b"plain").unwrap();
    let m = sub.receiver().recv_timeout(T).unwrap();
    assert_eq!(m.subject, "t.one");
    assert_eq!(m.reply.as_deref(), Some("answers"));
    let got = m.headers.as_ref().unwrap();
    assert_eq!(got.get("X-Id"), Some("42"));
    assert_eq!(got.get_all("X-Multi").collect::<Vec<_>>(), ["one", "two"]);
    assert_eq!(m.payload, b"line\r\nPUB x 1\r\n\0");
    let m = sub.receiver().recv_timeout(T).unwrap();
    assert_eq!((m.subject.as_str(), m.headers.is_none()), ("t.two", true));
    assert_eq!(m.payload, b"plain");

    // The server's max_payload bounds what we send; at the limit passes.
    let max = b.server_max_payload();
    assert_eq!(max, 1024 * 1024);
    let big = vec![7u8; max];
    b.publish("t.big", &big).unwrap();
    assert_eq!(sub.receiver().recv_timeout(T).unwrap().payload.len(), max);
    assert!(matches!(
        b.publish("t.big", &vec![0u8; max + 1]),
        Err(Error::PayloadTooLarge { .. })
    ));
    // Protocol injection through a subject or header is refused.
    assert!(matches!(b.publish("a b", b""), Err(Error::Protocol(_))));
    let mut bad = Headers::new();
    bad.insert("X", "v\r\nPUB evil 0");
    assert!(b.publish_with_headers("t.x", None, &bad, b"").is_err());

    // Unsubscribed: the channel disconnects and nothing more arrives.
    let rx = sub.receiver().clone();
    sub.unsubscribe();
    a.flush(T).unwrap();
    b.publish("t.after", b"x").unwrap();
    b.flush(T).unwrap();
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
}

#[test]
fn queue_group_spreads_messages() {
    let server = NatsServer::start();
    let q1 = connected(&server.url());
    let q2 = connected(&server.url());
    let s1 = q1.queue_subscribe("work", "workers").unwrap();
    let s2 = q2.queue_subscribe("work", "workers").unwrap();
    let all = q1.subscribe("work").unwrap();
    q1.flush(T).unwrap();
    q2.flush(T).unwrap();
    let p = connected(&server.url());
    for i in 0..400 {
        p.publish("work", format!("{i}").as_bytes()).unwrap();
    }
    p.flush(T).unwrap();
    let mut counts = [0usize; 3];
    let deadline = Instant::now() + T;
    while counts[0] + counts[1] < 400 || counts[2] < 400 {
        assert!(Instant::now() < deadline, "got {counts:?}");
        crossbeam_channel::select! {
            recv(s1.receiver()) -> m => { m.unwrap(); counts[0] += 1 }
            recv(s2.receiver()) -> m => { m.unwrap(); counts[1] += 1 }
            recv(all.receiver()) -> m => { m.unwrap(); counts[2] += 1 }
            default(Duration::from_millis(50)) => {}
        }
    }
    assert_eq!(counts[0] + counts[1], 400, "each message once to the group");
    assert!(
        counts[0] > 0 && counts[1] > 0,
        "both members took work: {counts:?}"
    );
}

#[test]
fn request_reply_no_responders_and_timeout() {
    let server = NatsServer::start();
    let svc = connected(&server.url());
    let sub = svc.subscribe("svc.upper").unwrap();
    let silent = svc.subscribe("svc.silent").unwrap();
    svc.flush(T).unwrap();
    let responder = svc.clone();
    std::thread::spawn(move || {
        while let Ok(m) = sub.receiver().recv() {
            let mut h = Headers::new();
            h.insert(
                "Echo",
                m.headers
                    .as_ref()
                    .and_then(|h| h.get("Echo"))
                    .unwrap_or("-"),
            );
            let body = String::from_utf8_lossy(&m.payload).to_uppercase();
            let _ = responder.publish_with_headers(
                m.reply.as_deref().unwrap(),
                None,
                &h,
                body.as_bytes(),
            );
        }
    });

    let c = connected(&server.url());
    // Concurrent requests share one inbox subscription; each gets its own answer.
    let handles: Vec<_> = (0..6)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    let mut h = Headers::new();
                    h.insert("Echo", &format!("{t}-{i}"));
                    let r = c
                        .request("svc.upper", Some(&h), format!("hi {t} {i}").as_bytes(), T)
                        .unwrap();
                    assert_eq!(r.payload, format!("HI {t} {i}").as_bytes());
                    assert_eq!(
                        r.headers.unwrap().get("Echo"),
                        Some(format!("{t}-{i}").as_str())
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }

    let t0 = Instant::now();
    assert!(matches!(
        c.request("nobody.home", None, b"?", T),
        Err(Error::NoResponders)
    ));
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "no responders is immediate"
    );

    let t0 = Instant::now();
    let r = c.request("svc.silent", None, b"?", Duration::from_millis(300));
    assert!(matches!(r, Err(Error::Timeout)), "{r:?}");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert!(silent.receiver().recv_timeout(T).is_ok());
}

#[test]
fn reconnects_after_restart_and_resubscribes() {
    let mut server = NatsServer::start();
    let mut o = options(&server.url());
    o.reconnect_max = Duration::from_millis(500);
    let c = Client::start(o);
    let events = c.events();
    let sub = c.subscribe("r.>").unwrap(); // before the first connection
    assert!(wait_for(T, || c.is_connected().then_some(())).is_some());
    assert!(matches!(
        events.recv_timeout(T),
        Ok(Event::Connected { .. })
    ));
    let p = connected(&server.url());
    c.flush(T).unwrap();
    p.publish("r.1", b"before").unwrap();
    assert_eq!(sub.receiver().recv_timeout(T).unwrap().payload, b"before");

    server.kill();
    assert!(
        wait_for(T, || (!c.is_connected()).then_some(())).is_some(),
        "disconnect noticed"
    );
    assert!(matches!(
        events.recv_timeout(T),
        Ok(Event::Disconnected { .. })
    ));
    assert!(matches!(c.publish("r.2", b"x"), Err(Error::NotConnected)));
    assert!(matches!(c.flush(T), Err(Error::NotConnected)));

    server.restart();
    assert!(
        wait_for(T, || c.is_connected().then_some(())).is_some(),
        "reconnected"
    );
    let ev = events_until(&c, T, |e| {
        e.iter().any(|e| matches!(e, Event::Reconnected { .. }))
    });
    assert!(
        ev.iter().any(|e| matches!(e, Event::Reconnected { .. })),
        "{ev:?}"
    );
    assert_eq!(c.reconnects(), 1);
    c.flush(T).unwrap(); // the re-sent SUB is processed
    assert!(wait_for(T, || p.is_connected().then_some(())).is_some());
    p.publish("r.3", b"after").unwrap();
    assert_eq!(sub.receiver().recv_timeout(T).unwrap().payload, b"after");
    // Request/reply works again too (its inbox subscription was re-sent).
    assert!(matches!(
        c.request("none", None, b"", T),
        Err(Error::NoResponders)
    ));
}

#[test]
fn wrong_credentials_retry_with_backoff_and_never_panic() {
    let server = NatsServer::start_with(&["--user", "worker", "--pass", "s3cret"]);
    let bad = Client::start(options(&server.url_with("worker:wrong")));
    let t0 = Instant::now();
    let seen = events_until(&bad, T, |e| e.len() >= 3);
    let errors: Vec<_> = seen
        .iter()
        .filter(|e| matches!(e, Event::ServerError(s) if s.contains("Authorization Violation")))
        .collect();
    assert!(errors.len() >= 3, "{seen:?}");
    // Three attempts need at least two backoff pauses (≥ 50 ms, then ≥ 100 ms).
    assert!(
        t0.elapsed() >= Duration::from_millis(150),
        "{:?}",
        t0.elapsed()
    );
    assert!(!seen.iter().any(|e| matches!(e, Event::Connected { .. })));
    assert!(!bad.is_connected());
    assert!(bad.connect_failures() >= 3);
    assert!(
        bad.last_error()
            .unwrap()
            .contains("Authorization Violation")
    );
    assert!(matches!(bad.publish("x", b""), Err(Error::NotConnected)));

    let good = connected(&server.url_with("worker:s3cret"));
    let s = good.subscribe("auth.ok").unwrap();
    good.publish("auth.ok", b"1").unwrap();
    assert!(s.receiver().recv_timeout(T).is_ok());

    let tok = NatsServer::start_with(&["--auth", "t0ken"]);
    let c = connected(&tok.url_with("t0ken"));
    c.flush(T).unwrap();
    let bad = Client::start(options(&tok.url_with("nope")));
    let seen = events_until(&bad, T, |e| !e.is_empty());
    assert!(
        matches!(&seen[..], [Event::ServerError(s), ..] if s.contains("Authorization")),
        "{seen:?}"
    );
}

/// A scripted "server": INFO, then per connection a different misbehaviour.
#[test]
fn garbage_or_silence_from_the_server_reconnects() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, accepted) = mpsc::channel();
    std::thread::spawn(move || {
        let info = b"INFO {\"server_id\":\"fake\",\"max_payload\":64,\"headers\":true}\r\n";
        for (i, s) in listener.incoming().take(5).enumerate() {
            let Ok(mut s) = s else { continue };
            let _ = s.write_all(info);
            let _ = tx.send(i);
            let handshake = |s: &mut std::net::TcpStream| {
                let mut seen = Vec::new();
                let mut b = [0u8; 512];
                while !seen.ends_with(b"PING\r\n") {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => seen.extend_from_slice(&b[..n]),
                    }
                }
                s.write_all(b"PONG\r\n").is_ok()
            };
            // 0: junk instead of a handshake; 1: an oversized MSG; 2: a
            // control line without end; 3: handshake, then silence (stale
            // detection must notice).
            if i == 0 {
                let _ = s.write_all(b"\x00\xff\xfeGARBAGE\r\n");
            } else if (1..=3).contains(&i) && handshake(&mut s) {
                let _ = match i {
                    1 => s.write_all(b"MSG a 1 100000\r\n"),
                    2 => s.write_all(&[b'x'; 70_000]),
                    _ => {
                        let mut b = [0u8; 512];
                        while matches!(s.read(&mut b), Ok(n) if n > 0) {}
                        Ok(())
                    }
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut o = options(&format!("nats://127.0.0.1:{port}"));
    o.ping_interval = Duration::from_millis(150);
    o.reconnect_max = Duration::from_millis(300);
    let c = Client::start(o);
    let events = c.events();
    for want in 0..5 {
        assert_eq!(
            accepted.recv_timeout(T),
            Ok(want),
            "connection {want} attempted"
        );
    }
    let mut reasons = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let Event::Disconnected { reason } = e {
            reasons.push(reason);
        }
    }
    let all = reasons.join(" | ");
    assert!(all.contains("message of 100000 bytes"), "{all}");
    assert!(all.contains("control line"), "{all}");
    assert!(all.contains("stale"), "{all}");
    assert!(!c.is_connected() || c.reconnects() > 0);
}

// ------------------------------------------------------------ JetStream

fn js(server: &NatsServer) -> JetStream {
    JetStream::new(connected(&server.url()), T)
}

#[test]
fn jetstream_streams_consumers_and_dedup() {
    let server = NatsServer::start();
    let js = js(&server);
    assert!(js.stream_info("WORK").unwrap().is_none());
    let work = StreamConfig {
        name: "WORK".into(),
        subjects: vec!["work.>".into()],
        retention: Retention::WorkQueue,
        storage_file: true,
        duplicate_window: Duration::ZERO,
    };
    js.add_stream(&work).unwrap();
    js.add_stream(&work).unwrap(); // idempotent
    let results = StreamConfig {
        name: "RESULTS".into(),
        subjects: vec!["results.>".into()],
        retention: Retention::Limits,
        storage_file: true,
        duplicate_window: Duration::from_secs(60),
    };
    let info = js.add_stream(&results).unwrap();
    assert_eq!(info["config"]["duplicate_window"], 60_000_000_000u64);
    assert_eq!(info["config"]["retention"], "limits");
    assert_eq!(
        js.stream_info("WORK").unwrap().unwrap()["config"]["retention"],
        "workqueue"
    );
    assert_eq!(js.stream_names_by_subject("work.a.b").unwrap(), ["WORK"]);
    assert!(js.stream_names_by_subject("other").unwrap().is_empty());

    assert!(js.consumer_info("WORK", "w").unwrap().is_none());
    let cfg = ConsumerConfig {
        durable_name: "w".into(),
        ack_wait: Duration::from_secs(3),
        max_deliver: 5,
        filter_subject: Some("work.>".into()),
        max_ack_pending: Some(100),
    };
    js.add_consumer("WORK", &cfg).unwrap();
    let ci = js.consumer_info("WORK", "w").unwrap().unwrap();
    assert_eq!(ci["config"]["ack_wait"], 3_000_000_000u64);
    assert_eq!(ci["config"]["max_ack_pending"], 100);
    assert!(matches!(
        js.add_consumer("NOPE", &cfg),
        Err(Error::JetStream {
            err_code: 10059,
            ..
        })
    ));

    let h = Headers::new();
    let a1 = js.publish("results.1", &h, b"r1", Some("id-1")).unwrap();
    assert_eq!(
        (a1.stream.as_str(), a1.seq, a1.duplicate),
        ("RESULTS", 1, false)
    );
    let a2 = js
        .publish("results.1", &h, b"r1 again", Some("id-1"))
        .unwrap();
    assert_eq!((a2.seq, a2.duplicate), (1, true), "duplicate detected");
    let a3 = js.publish("results.2", &h, b"r2", Some("id-2")).unwrap();
    assert_eq!((a3.seq, a3.duplicate), (2, false));
    assert!(matches!(
        js.publish("nostream.x", &h, b"", None),
        Err(Error::NoResponders)
    ));
    assert_eq!(
        js.stream_info("RESULTS").unwrap().unwrap()["state"]["messages"],
        2
    );

    assert!(js.delete_consumer("WORK", "w").unwrap());
    assert!(!js.delete_consumer("WORK", "w").unwrap());
    assert!(js.delete_stream("RESULTS").unwrap());
    assert!(!js.delete_stream("RESULTS").unwrap());
    assert!(js.stream_info("RESULTS").unwrap().is_none());
}

fn work_stream(js: &JetStream, ack_wait: Duration) {
    js.add_stream(&StreamConfig {
        name: "WQ".into(),
        subjects: vec!["wq.>".into()],
        retention: Retention::WorkQueue,
        storage_file: true,
        duplicate_window: Duration::ZERO,
    })
    .unwrap();
    js.add_consumer(
        "WQ",
        &ConsumerConfig {
            durable_name: "c".into(),
            ack_wait,
            max_deliver: -1,
            filter_subject: None,
            max_ack_pending: None,
        },
    )
    .unwrap();
}

#[test]
fn jetstream_pull_batches_and_statuses() {
    let server = NatsServer::start();
    let js = js(&server);
    work_stream(&js, Duration::from_secs(30));
    for i in 0..3 {
        js.publish(
            &format!("wq.{i}"),
            &Headers::new(),
            format!("m{i}").as_bytes(),
            None,
        )
        .unwrap();
    }
    let pull = js.pull_subscription("WQ", "c").unwrap();
    let t0 = Instant::now();
    pull.request(10, Duration::from_millis(600), None).unwrap();
    let mut got = Vec::new();
    let timeout = loop {
        match pull.next(T).expect("an item") {
            PullItem::Message(m, meta) => got.push((m, meta)),
            other => break other,
        }
    };
    assert!(matches!(timeout, PullItem::RequestTimeout), "{timeout:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(got.len(), 3);
    for (i, (m, meta)) in got.iter().enumerate() {
        assert_eq!(m.payload, format!("m{i}").as_bytes());
        assert_eq!((meta.stream.as_str(), meta.consumer.as_str()), ("WQ", "c"));
        assert_eq!((meta.delivered, meta.stream_seq), (1, i as u64 + 1));
        assert_eq!(meta.pending, 2 - i as u64);
        nats::ack_sync(js.client(), m, T).unwrap();
    }
    pull.request_no_wait(5).unwrap();
    assert!(matches!(pull.next(T), Some(PullItem::NoMessages)));

    // Idle heartbeats while a long pull waits on an empty consumer.
    pull.request(
        1,
        Duration::from_millis(900),
        Some(Duration::from_millis(200)),
    )
    .unwrap();
    let mut beats = 0;
    loop {
        match pull.next(T).expect("an item") {
            PullItem::Heartbeat => beats += 1,
            PullItem::RequestTimeout => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(beats >= 2, "{beats} heartbeats");
    assert_eq!(
        js.stream_info("WQ").unwrap().unwrap()["state"]["messages"],
        0,
        "acked work is gone"
    );
}

#[test]
fn jetstream_nak_term_and_in_progress() {
    let server = NatsServer::start();
    let js = js(&server);
    let ack_wait = Duration::from_millis(800);
    work_stream(&js, ack_wait);
    let client = js.client().clone();
    for name in ["nak", "nakdelay", "term", "wpi"] {
        js.publish(
            &format!("wq.{name}"),
            &Headers::new(),
            name.as_bytes(),
            None,
        )
        .unwrap();
    }
    let pull = js.pull_subscription("WQ", "c").unwrap();
    pull.request(4, Duration::from_secs(1), None).unwrap();
    let mut first = HashMap::new();
    while first.len() < 4 {
        match pull.next(T).expect("an item") {
            PullItem::Message(m, meta) => {
                first.insert(m.subject.clone(), (m, meta));
            }
            other => panic!("{other:?}"),
        }
    }
    let nak_at = Instant::now();
    nats::nak(&client, &first["wq.nak"].0, None).unwrap();
    let delay = Duration::from_millis(600);
    nats::nak(&client, &first["wq.nakdelay"].0, Some(delay)).unwrap();
    nats::term(&client, &first["wq.term"].0).unwrap();
    let wpi = first["wq.wpi"].0.clone();
    nats::in_progress(&client, &wpi).unwrap();

    // For 2.5 ack_wait periods keep the wpi message alive and record every
    // delivery: the nak'ed ones come back once (one after its delay), the
    // others never.
    let mut redelivered: Vec<(String, u64)> = Vec::new();
    let mut delayed_after = None;
    let until = Instant::now() + ack_wait.mul_f32(2.5);
    let mut next_wpi = Instant::now() + ack_wait / 3;
    pull.request(10, ack_wait * 3, None).unwrap();
    while Instant::now() < until {
        if Instant::now() >= next_wpi {
            nats::in_progress(&client, &wpi).unwrap();
            next_wpi += ack_wait / 3;
        }
        if let Some(item) = pull.next(Duration::from_millis(50)) {
            match item {
                PullItem::Message(m, meta) => {
                    nats::ack(&client, &m).unwrap();
                    if m.subject == "wq.nakdelay" {
                        delayed_after = Some(nak_at.elapsed());
                    }
                    redelivered.push((m.subject, meta.delivered));
                }
                PullItem::RequestTimeout => pull.request(10, ack_wait * 3, None).unwrap(),
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(
        redelivered,
        [("wq.nak".to_string(), 2), ("wq.nakdelay".to_string(), 2)],
        "only the nak'ed messages came back"
    );
    let after = delayed_after.unwrap();
    assert!(
        after >= delay - Duration::from_millis(50),
        "NAK delay honoured: {after:?}"
    );
    nats::ack_sync(&client, &wpi, T).unwrap();
    assert_eq!(
        js.stream_info("WQ").unwrap().unwrap()["state"]["messages"],
        0
    );
}

// ------------------------------------------------------ cluster and TLS

#[test]
fn url_list_and_cluster_announced_servers_are_tried() {
    let (ca, cb) = (support::nats::free_port(), support::nats::free_port());
    let mut a = NatsServer::start_core(&[
        "--cluster_name",
        "c",
        "--cluster",
        &format!("nats://127.0.0.1:{ca}"),
    ]);
    let b = NatsServer::start_core(&[
        "--cluster_name",
        "c",
        "--cluster",
        &format!("nats://127.0.0.1:{cb}"),
        "--routes",
        &format!("nats://127.0.0.1:{ca}"),
    ]);
    // The first URL is dead; B is never listed: the client learns it from A.
    let dead = support::nats::free_port();
    let mut o = options(&format!("nats://127.0.0.1:{dead},{}", a.url()));
    o.reconnect_max = Duration::from_millis(300);
    let c = Client::start(o);
    assert!(wait_for(T, || c.is_connected().then_some(())).is_some());
    assert_eq!(c.connected_server().unwrap(), a.url());
    let b_url = b.url();
    let learned = wait_for(T, || c.known_servers().contains(&b_url).then_some(()));
    assert!(learned.is_some(), "{:?}", c.known_servers());
    let sub = c.subscribe("cl.x").unwrap();
    a.kill();
    assert!(
        wait_for(T, || (c.connected_server() == Some(b_url.clone()))
            .then_some(()))
        .is_some(),
        "failed over to the announced server: {:?}",
        c.connected_server()
    );
    c.flush(T).unwrap();
    let p = connected(&b.url());
    p.publish("cl.x", b"via b").unwrap();
    assert_eq!(sub.receiver().recv_timeout(T).unwrap().payload, b"via b");
}

/// A throwaway CA and a server certificate for 127.0.0.1, made with openssl.
fn make_certs(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (install it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=caf test ca",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

#[test]
fn tls_with_a_ca_file_and_tls_required_by_the_server() {
    let certs = support::temp_dir();
    make_certs(certs.path());
    let p = |f: &str| certs.path().join(f).to_string_lossy().into_owned();
    let server = NatsServer::start_with(&[
        "--tls",
        "--tlscert",
        &p("server.pem"),
        "--tlskey",
        &p("server.key"),
    ]);
    let tls_url = format!("tls://127.0.0.1:{}", server.port);
    let start = |url: &str, ca: Option<String>| {
        let mut o = options(url);
        o.ca_file = ca.map(Into::into);
        Client::start(o)
    };
    let c = start(&tls_url, Some(p("ca.pem")));
    assert!(
        wait_for(T, || c.is_connected().then_some(())).is_some(),
        "tls:// with the CA file"
    );
    // A nats:// URL still upgrades when INFO says tls_required.
    let plain = start(&server.url(), Some(p("ca.pem")));
    assert!(
        wait_for(T, || plain.is_connected().then_some(())).is_some(),
        "honours tls_required"
    );

    let sub = c.subscribe("tls.>").unwrap();
    c.flush(T).unwrap();
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    for i in 0..50 {
        plain
            .publish(&format!("tls.{i}"), &big[..20_000 * (i + 1)])
            .unwrap();
    }
    for i in 0..50 {
        let m = sub.receiver().recv_timeout(T).unwrap();
        assert_eq!(
            m.payload,
            &big[..20_000 * (i + 1)],
            "message {i} intact over TLS"
        );
    }
    // Request/reply and flush over TLS too.
    assert!(matches!(
        plain.request("nobody", None, b"", T),
        Err(Error::NoResponders)
    ));

    // Without our CA the certificate is refused: no connection, no panic.
    let untrusted = start(&tls_url, None);
    let bad_ca = start(&tls_url, Some(p("server.key")));
    for (client, why) in [
        (&untrusted, "UnknownIssuer"),
        (&bad_ca, "no certificate found"),
    ] {
        assert!(wait_for(T, || (client.connect_failures() >= 2).then_some(())).is_some());
        assert!(!client.is_connected());
        let err = client.last_error().unwrap();
        assert!(err.contains(why), "{err}");
    }
}

#[test]
fn lame_duck_mode_is_reported() {
    let server = NatsServer::start();
    let c = connected(&server.url());
    // nats-server signals its own kind: no procps needed.
    let pid = server.pid().unwrap();
    let ok = std::process::Command::new(support::nats::binary())
        .args(["--signal", &format!("ldm={pid}")])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    let seen = events_until(&c, T, |e| e.contains(&Event::LameDuck));
    assert!(seen.contains(&Event::LameDuck), "{seen:?}");
}

#[test]
fn slow_consumer_drops_without_blocking_and_drain_closes() {
    let server = NatsServer::start();
    let c = connected(&server.url());
    let tiny = c.subscribe_with_capacity("slow", None, 2).unwrap();
    let other = c.subscribe("slow").unwrap();
    c.flush(T).unwrap();
    for i in 0..100 {
        c.publish("slow", format!("{i}").as_bytes()).unwrap();
    }
    // The reader never waits for a full channel: PONG still comes back and
    // the other subscription gets everything.
    c.flush(T).unwrap();
    for i in 0..100 {
        assert_eq!(
            other.receiver().recv_timeout(T).unwrap().payload,
            format!("{i}").as_bytes()
        );
    }
    assert_eq!(c.dropped_messages(), 98);
    assert_eq!(tiny.receiver().len(), 2);
    assert!(c.is_connected());

    c.drain(T);
    assert!(!c.is_connected());
    assert!(matches!(c.publish("x", b""), Err(Error::Closed)));
    assert!(matches!(c.subscribe("x"), Err(Error::Closed)));
    // Buffered messages stay readable, then the channel reports the end.
    assert!(tiny.receiver().recv_timeout(T).is_ok());
    assert!(tiny.receiver().recv_timeout(T).is_ok());
    assert!(matches!(
        tiny.receiver().recv_timeout(T),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected)
    ));
}

#[test]
fn a_silent_or_dribbling_server_times_out_the_handshake() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        // First connection: silence. Later ones: INFO one byte at a time,
        // never finishing within the connect timeout.
        let mut held = Vec::new();
        for (i, s) in listener.incoming().take(3).enumerate() {
            let Ok(mut s) = s else { continue };
            if i > 0 {
                std::thread::spawn(move || {
                    for b in b"INFO {\"server_id\":\"slow\"}\r\n" {
                        if s.write_all(&[*b]).is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                });
            } else {
                held.push(s);
            }
        }
        std::thread::sleep(Duration::from_secs(10));
    });
    let mut o = options(&format!("nats://127.0.0.1:{port}"));
    o.connect_timeout = Duration::from_millis(400);
    o.reconnect_max = Duration::from_millis(100);
    let c = Client::start(o);
    let t0 = Instant::now();
    assert!(wait_for(T, || (c.connect_failures() >= 3).then_some(())).is_some());
    let took = t0.elapsed();
    // Three attempts bounded by the timeout each (plus short backoffs).
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(3500),
        "{took:?}"
    );
    assert!(
        c.last_error().unwrap().contains("timed out"),
        "{:?}",
        c.last_error()
    );
    assert!(!c.is_connected());
}
