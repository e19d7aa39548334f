//! The NATS front (SPEC §13) against a real `nats-server` on loopback: the
//! real `caf-worker serve` binary, the project's own client on the test side.
//! Core mode: results, Acks, DLQ, heartbeats, a queue group of two workers.
//! JetStream mode: `kill -9` and SIGTERM of one of two workers, SIGTERM
//! with a retry parked in its backoff, a step longer than `ack_wait`, a
//! server restart, wrong credentials. `human.approval` decisions on the
//! approval subject: every answer the ingress gives, two workers (only the
//! holder answers), and the ingress off.

mod support;

use caf_worker::transport::nats::{
    Client, ConsumerConfig, Headers, JetStream, Message, Options, PullItem, Retention,
    StreamConfig, Subscription,
};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use support::nats::NatsServer;
use support::serve::{health, metric};
use support::{Worker, assignment, fail_once, wait_for};

const ASSIGN: &str = "caf.exec.assign.v1";
const RESULTS: &str = "caf.exec.result.v1";

/// A connected test-side client.
fn client(url: &str) -> Client {
    let mut o = Options::from_url_list(url).unwrap();
    o.name = "nats-front-test".into();
    let c = Client::start(o);
    assert!(
        wait_for(Duration::from_secs(5), || c.is_connected().then_some(())).is_some(),
        "test client cannot connect to {url}"
    );
    c
}

/// Subscribes and makes sure the server has the subscription.
fn sub(c: &Client, subject: &str) -> Subscription {
    let s = c.subscribe_with_capacity(subject, None, 1 << 16).unwrap();
    c.flush(Duration::from_secs(5)).unwrap();
    s
}

/// `serve` with the NATS front on `url`, metrics on, small queues (so a
/// A server with JetStream, a client's subscription to the result subject,
/// and the JetStream API on that client: how the JetStream tests begin.
fn jetstream_setup() -> (NatsServer, Subscription, JetStream) {
    let server = NatsServer::start();
    let c = client(&server.url());
    let results = sub(&c, RESULTS);
    let js = JetStream::new(c, Duration::from_secs(5));
    (server, results, js)
}

/// JetStream worker holds little and two share the work).
fn worker(url: &str, mode: &str, extra: &[(&str, &str)]) -> Worker {
    let mut env = vec![
        ("WORKER_NATS_URL", url),
        ("WORKER_NATS_MODE", mode),
        ("CP2_OBSERVABILITY_METRICS_ENABLED", "1"),
        ("WORKER_MAX_QUEUE_SIZE", "8"),
        ("WORKER_SHUTDOWN_GRACE_MS", "3000"),
    ];
    env.extend_from_slice(extra);
    Worker::start(&env)
}

fn ready(w: &Worker) -> u16 {
    health(w, "/readyz").status
}

/// Waits until the worker's NATS connection is up (readiness 200).
fn wait_ready(w: &Worker) {
    assert!(
        wait_for(Duration::from_secs(10), || (ready(w) == 200).then_some(())).is_some(),
        "worker never became ready: {:?}",
        w.stderr.lock().unwrap()
    );
}

/// Collects messages of `s` until `done` says so or `limit` passes.
fn collect(
    s: &Subscription,
    limit: Duration,
    mut done: impl FnMut(&[Message]) -> bool,
) -> Vec<Message> {
    let until = Instant::now() + limit;
    let mut out = Vec::new();
    while !done(&out) && Instant::now() < until {
        if let Ok(m) = s.receiver().recv_timeout(Duration::from_millis(20)) {
            out.push(m);
        }
    }
    out
}

fn body(m: &Message) -> Value {
    serde_json::from_slice(&m.payload).unwrap_or(Value::Null)
}

/// Results by assignment id (every copy kept, to count duplicates).
fn by_id(msgs: &[Message]) -> HashMap<String, Vec<Value>> {
    let mut map: HashMap<String, Vec<Value>> = HashMap::new();
    for m in msgs {
        let v = body(m);
        map.entry(v["assignment_id"].as_str().unwrap_or("").to_owned())
            .or_default()
            .push(v);
    }
    map
}

/// Distinct ids seen so far.
fn distinct(msgs: &[Message]) -> usize {
    msgs.iter()
        .map(|m| body(m)["assignment_id"].as_str().unwrap_or("").to_owned())
        .collect::<HashSet<_>>()
        .len()
}

/// Publishes assignments into the JetStream stream (the worker created it).
fn js_publish(js: &JetStream, items: &[Value]) {
    for a in items {
        let id = a["assignment_id"].as_str().unwrap();
        js.publish(ASSIGN, &Headers::new(), a.to_string().as_bytes(), Some(id))
            .unwrap_or_else(|e| panic!("publish {id}: {e}"));
    }
}

/// Waits until the worker created the streams and the consumer.
fn wait_js_setup(js: &JetStream) {
    let found = wait_for(Duration::from_secs(10), || {
        js.consumer_info("CAF_ASSIGN", "caf-workers").ok().flatten()
    });
    assert!(found.is_some(), "the worker did not create the consumer");
}

/// Every message of the result stream, read with a fresh durable consumer.
fn stored_results(js: &JetStream) -> Vec<Value> {
    let name = format!("reader{}", reader_id());
    js.add_consumer(
        "CAF_RESULTS",
        &ConsumerConfig {
            durable_name: name.clone(),
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            filter_subject: None,
            max_ack_pending: None,
        },
    )
    .unwrap();
    let pull = js.pull_subscription("CAF_RESULTS", &name).unwrap();
    let mut out = Vec::new();
    loop {
        pull.request_no_wait(1000).unwrap();
        let mut got = 0;
        loop {
            match pull.next(Duration::from_secs(5)) {
                Some(PullItem::Message(m, _)) => {
                    got += 1;
                    out.push(body(&m));
                }
                Some(PullItem::Heartbeat) => {}
                _ => break,
            }
        }
        if got == 0 {
            return out;
        }
    }
}

/// A consumer name unique within this test process.
fn reader_id() -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .to_string()
}

/// Waits until `stream` holds exactly `n` messages.
fn wait_stream(js: &JetStream, stream: &str, n: u64, limit: Duration) {
    let reached = wait_for(limit, || (stream_messages(js, stream) == n).then_some(()));
    assert!(
        reached.is_some(),
        "stream {stream} holds {} messages, expected {n}",
        stream_messages(js, stream)
    );
}

fn stream_messages(js: &JetStream, stream: &str) -> u64 {
    js.stream_info(stream).unwrap().unwrap()["state"]["messages"]
        .as_u64()
        .unwrap()
}

fn echo(id: &str) -> Value {
    assignment(id, "debug.echo", json!({"i": id}))
}

fn sleep(id: &str, ms: u64) -> Value {
    assignment(id, "debug.sleep", json!({ "ms": ms }))
}

#[test]
fn core_mode_answers_each_assignment_once_with_acks_dlq_and_heartbeats() {
    let server = NatsServer::start();
    let c = client(&server.url());
    let (results, acks, dlq, beats) = (
        sub(&c, RESULTS),
        sub(&c, "caf.exec.assign.v1.ack"),
        sub(&c, "caf.exec.dlq.v1"),
        sub(&c, "caf.worker.heartbeat.v1"),
    );
    let w = worker(
        &server.url(),
        "core",
        &[
            ("WORKER_HEARTBEAT_INTERVAL_MS", "300"),
            ("WORKER_INGRESS_ADDR", "127.0.0.1:0"),
        ],
    );
    wait_ready(&w);
    // The heartbeat period, measured before the load.
    let hb = collect(&beats, Duration::from_secs(5), |m| m.len() >= 5);
    assert!(hb.len() >= 5, "heartbeats: {}", hb.len());
    let times: Vec<u64> = hb
        .iter()
        .map(|m| body(m)["timestamp"].as_u64().unwrap())
        .collect();
    for gap in times.windows(2).map(|w| w[1] - w[0]) {
        assert!(
            (200..=600).contains(&gap),
            "heartbeat gap {gap} ms: {times:?}"
        );
    }
    let b = body(&hb[0]);
    assert_eq!(
        (
            b["version"].as_str(),
            b["status"].as_str(),
            b["mode"].as_str()
        ),
        (Some("1"), Some("ready"), Some("core"))
    );
    assert_eq!(b["pools"]["cpu"]["threads"], 4, "{b}");
    for k in ["worker_id", "in_flight", "uptime_s", "build"] {
        assert!(!b[k].is_null(), "heartbeat lacks {k}: {b}");
    }

    let n = 300;
    for i in 0..n {
        c.publish(ASSIGN, echo(&format!("core-{i}")).to_string().as_bytes())
            .unwrap();
    }
    // Headers fill what the body lacks; results and Acks carry them back.
    let mut h = Headers::new();
    h.insert("tenant_id", "hdr-tenant");
    h.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    let mut no_tenant = echo("core-hdr");
    no_tenant.as_object_mut().unwrap().remove("tenant_id");
    c.publish_with_headers(ASSIGN, None, &h, no_tenant.to_string().as_bytes())
        .unwrap();
    // Invalid ones: rejected Ack + DLQ record, never executed.
    let secret = b"{not json, secret-payload".to_vec();
    c.publish(ASSIGN, &secret).unwrap();
    c.publish(
        ASSIGN,
        assignment("core-bad-type", "no.such", json!({}))
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    // Request/reply: the Ack also goes to the reply subject.
    let reply = c
        .request(
            ASSIGN,
            None,
            echo("core-req").to_string().as_bytes(),
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(body(&reply)["status"], "accepted");
    let total = n + 2;

    let got = collect(&results, Duration::from_secs(20), |m| m.len() >= total);
    let extra = collect(&results, Duration::from_millis(300), |_| false);
    let map = by_id(&got);
    assert_eq!(
        got.len(),
        total,
        "results: {} (distinct {})",
        got.len(),
        map.len()
    );
    assert!(
        extra.is_empty(),
        "more results than assignments: {}",
        extra.len()
    );
    assert!(map.values().all(|v| v.len() == 1));
    assert!(!map.contains_key("core-bad-type"));
    let lines: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    support::check_results(&lines);
    let hdr = got
        .iter()
        .find(|m| body(m)["assignment_id"] == "core-hdr")
        .unwrap();
    assert_eq!(body(hdr)["tenant_id"], "hdr-tenant");
    let hh = hdr.headers.as_ref().expect("result headers");
    assert_eq!(hh.get("version"), Some("1"));
    assert_eq!(hh.get("tenant_id"), Some("hdr-tenant"));
    assert_eq!(hh.get("Nats-Msg-Id"), Some("core-hdr"));
    assert_eq!(hh.get("traceparent"), h.get("traceparent"));

    let acked = collect(&acks, Duration::from_secs(10), |m| m.len() >= total + 2);
    let statuses = |s: &str| acked.iter().filter(|m| body(m)["status"] == s).count();
    assert_eq!(
        (statuses("accepted"), statuses("rejected")),
        (total, 2),
        "acks"
    );
    let reasons: HashSet<String> = acked
        .iter()
        .filter(|m| body(m)["status"] == "rejected")
        .map(|m| body(m)["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        reasons,
        HashSet::from(["invalid_json".into(), "unsupported_job_type".into()])
    );

    let dead = collect(&dlq, Duration::from_secs(5), |m| m.len() >= 2);
    assert_eq!(dead.len(), 2);
    let rec = dead
        .iter()
        .map(body)
        .find(|v| v["reason"] == "invalid_json")
        .unwrap();
    assert_eq!(rec["payload_bytes"], secret.len());
    assert_eq!(rec["payload_sha256"].as_str().map(str::len), Some(64));
    assert_eq!(rec["original_subject"], ASSIGN);
    assert!(!String::from_utf8_lossy(&dead[0].payload).contains("secret-payload"));
    assert!(!String::from_utf8_lossy(&dead[1].payload).contains("secret-payload"));
    assert_eq!(
        metric(
            &w,
            "worker_nats_messages_total{direction=\"out\",kind=\"dlq\"}"
        ),
        Some(2.0)
    );
    assert_eq!(metric(&w, "worker_nats_connected"), Some(1.0));
}

#[test]
fn core_mode_two_workers_in_one_queue_group_share_the_work() {
    let server = NatsServer::start();
    let c = client(&server.url());
    let results = sub(&c, RESULTS);
    let a = worker(&server.url(), "core", &[("WORKER_ID", "wa")]);
    let b = worker(&server.url(), "core", &[("WORKER_ID", "wb")]);
    wait_ready(&a);
    wait_ready(&b);
    let n = 200;
    for i in 0..n {
        c.publish(ASSIGN, sleep(&format!("qg-{i}"), 5).to_string().as_bytes())
            .unwrap();
    }
    let got = collect(&results, Duration::from_secs(20), |m| m.len() >= n);
    let map = by_id(&got);
    assert_eq!(
        (got.len(), map.len()),
        (n, n),
        "each assignment answered once"
    );
    let per: HashMap<String, usize> = got.iter().fold(HashMap::new(), |mut acc, m| {
        *acc.entry(body(m)["worker_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
        acc
    });
    assert!(
        per.get("wa").copied().unwrap_or(0) > 0 && per.get("wb").copied().unwrap_or(0) > 0,
        "{per:?}"
    );
}

#[test]
fn jetstream_kill_9_of_one_worker_loses_nothing_and_stores_one_result_each() {
    let (server, results, js) = jetstream_setup();
    let mut a = worker(
        &server.url(),
        "jetstream",
        &[("WORKER_NATS_ACK_WAIT_MS", "2000"), ("WORKER_ID", "wa")],
    );
    let b = worker(
        &server.url(),
        "jetstream",
        &[("WORKER_NATS_ACK_WAIT_MS", "2000"), ("WORKER_ID", "wb")],
    );
    wait_js_setup(&js);
    let n = 600;
    let items: Vec<Value> = (0..n).map(|i| sleep(&format!("k9-{i}"), 5)).collect();
    js_publish(&js, &items);
    // Kill A in the middle: after some results, while it holds others.
    let first = collect(&results, Duration::from_secs(20), |m| distinct(m) >= n / 4);
    assert!(distinct(&first) >= n / 4);
    a.child.kill().unwrap();
    let _ = a.child.wait();
    let seen_first: HashSet<String> = first
        .iter()
        .map(|m| body(m)["assignment_id"].as_str().unwrap().to_owned())
        .collect();
    let rest = collect(&results, Duration::from_secs(30), |m| {
        let more = m
            .iter()
            .map(|x| body(x)["assignment_id"].as_str().unwrap_or("").to_owned())
            .filter(|id| !seen_first.contains(id))
            .collect::<HashSet<_>>();
        seen_first.len() + more.len() >= n
    });
    let all: HashSet<String> = first
        .iter()
        .chain(&rest)
        .map(|m| body(m)["assignment_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(all.len(), n, "every assignment answered");
    let b_answered = first
        .iter()
        .chain(&rest)
        .filter(|m| body(m)["worker_id"] == "wb")
        .count();
    assert!(b_answered > 0);
    // The stream holds exactly one result per assignment.
    wait_stream(&js, "CAF_RESULTS", n as u64, Duration::from_secs(5));
    let stored = stored_results(&js);
    let ids: HashSet<&str> = stored
        .iter()
        .filter_map(|v| v["assignment_id"].as_str())
        .collect();
    assert_eq!((stored.len(), ids.len()), (n, n));
    // Nothing is left unacknowledged (the work queue is empty).
    wait_stream(&js, "CAF_ASSIGN", 0, Duration::from_secs(5));
    drop(b);
}

#[test]
fn jetstream_sigterm_hands_back_queued_and_unfinished_steps_and_exits_0() {
    let server = NatsServer::start();
    let c = client(&server.url());
    let results = sub(&c, RESULTS);
    let beats = sub(&c, "caf.worker.heartbeat.v1");
    let js = JetStream::new(c.clone(), Duration::from_secs(5));
    // A: one cpu thread, so a long step keeps the rest queued behind it.
    let mut a = worker(
        &server.url(),
        "jetstream",
        &[
            ("WORKER_ID", "wa"),
            ("WORKER_CPU_POOL_SIZE", "1"),
            ("WORKER_SHUTDOWN_GRACE_MS", "500"),
            ("WORKER_NATS_ACK_WAIT_MS", "30000"),
        ],
    );
    wait_js_setup(&js);
    let mut items = vec![sleep("st-long", 3000)];
    items.extend((0..5).map(|i| sleep(&format!("st-{i}"), 50)));
    js_publish(&js, &items);
    assert!(
        wait_for(Duration::from_secs(10), || {
            (metric(&a, "worker_active_tasks{resource_pool=\"cpu\"}") == Some(1.0)
                && metric(&a, "worker_queue_depth{resource_pool=\"cpu\"}") == Some(5.0))
            .then_some(())
        })
        .is_some(),
        "A never held the long step and the five queued behind it"
    );
    let sent = Instant::now();
    a.sigterm();
    assert_eq!(a.wait_exit(Duration::from_secs(10)), 0);
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "exit took {:?}",
        sent.elapsed()
    );
    let draining = collect(&beats, Duration::from_secs(2), |m| {
        m.iter().any(|x| body(x)["status"] == "draining")
    });
    assert!(
        draining.iter().any(|x| body(x)["status"] == "draining"),
        "no draining heartbeat"
    );
    // A answered nothing: the queued steps were NAKed at once, the long one
    // NAKed when the grace ended.
    let from_a = collect(&results, Duration::from_millis(300), |_| false);
    assert!(
        from_a.is_empty(),
        "A published {:?}",
        from_a.iter().map(body).collect::<Vec<_>>()
    );
    // B takes them all at once (NAK: no ack_wait to sit out), each once.
    let b = worker(&server.url(), "jetstream", &[("WORKER_ID", "wb")]);
    let got = collect(&results, Duration::from_secs(15), |m| {
        m.len() >= items.len()
    });
    let map = by_id(&got);
    assert_eq!(map.len(), items.len(), "{:?}", map.keys());
    assert!(
        got.iter()
            .all(|m| body(m)["worker_id"] == "wb" && body(m)["status"] == "success")
    );
    wait_stream(
        &js,
        "CAF_RESULTS",
        items.len() as u64,
        Duration::from_secs(5),
    );
    drop(b);
}

#[test]
fn jetstream_sigterm_naks_a_retry_parked_in_its_backoff_and_exits_0() {
    let (server, results, js) = jetstream_setup();
    // The grace (30 s) outlasts the backoff (8 s): a worker that kept the
    // parked retry would run it within the grace and answer it itself.
    let mut a = worker(
        &server.url(),
        "jetstream",
        &[
            ("WORKER_ID", "wa"),
            ("CP2_ADVANCED_RETRY_ENABLED", "1"),
            ("WORKER_SHUTDOWN_GRACE_MS", "30000"),
            ("WORKER_NATS_ACK_WAIT_MS", "30000"),
        ],
    );
    wait_js_setup(&js);
    js_publish(&js, &[fail_once("parked-1", 8000)]);
    let waiting = "worker_retries_waiting{resource_pool=\"cpu\"}";
    assert!(
        wait_for(Duration::from_secs(10), || {
            (metric(&a, waiting) == Some(1.0)).then_some(())
        })
        .is_some(),
        "the retry never parked: {:?}",
        a.stderr.lock().unwrap()
    );
    let sent = Instant::now();
    a.sigterm();
    assert_eq!(a.wait_exit(Duration::from_secs(40)), 0);
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "exit took {:?}: the parked retry was not handed back at once",
        sent.elapsed()
    );
    let from_a = collect(&results, Duration::from_millis(300), |_| false);
    assert!(
        from_a.is_empty(),
        "A published {:?}",
        from_a.iter().map(body).collect::<Vec<_>>()
    );
    // B (CP1 retry: 100 ms) gets the redelivery at once, well within
    // `ack_wait` (30 s): A NAKed it. B runs it from its first attempt and
    // answers it exactly once.
    let b = worker(&server.url(), "jetstream", &[("WORKER_ID", "wb")]);
    let got = collect(&results, Duration::from_secs(15), |m| !m.is_empty());
    let extra = collect(&results, Duration::from_millis(500), |_| false);
    assert_eq!(got.len() + extra.len(), 1, "one result");
    let r = body(&got[0]);
    assert_eq!(
        (&r["assignment_id"], &r["worker_id"], &r["status"]),
        (&json!("parked-1"), &json!("wb"), &json!("success")),
        "{r}"
    );
    assert_eq!(r["attempts"], 2, "{r}");
    wait_stream(&js, "CAF_RESULTS", 1, Duration::from_secs(5));
    let stored = stored_results(&js);
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["assignment_id"], "parked-1");
    wait_stream(&js, "CAF_ASSIGN", 0, Duration::from_secs(5));
    let info = js
        .consumer_info("CAF_ASSIGN", "caf-workers")
        .unwrap()
        .unwrap();
    // Two deliveries in all: A's, then B's after the NAK.
    assert_eq!(info["delivered"]["consumer_seq"], 2, "{info}");
    drop(b);
}

#[test]
fn jetstream_step_longer_than_ack_wait_is_not_redelivered() {
    let (server, results, js) = jetstream_setup();
    let w = worker(
        &server.url(),
        "jetstream",
        &[("WORKER_NATS_ACK_WAIT_MS", "1000")],
    );
    wait_js_setup(&js);
    js_publish(&js, &[sleep("long-1", 3500)]);
    let got = collect(&results, Duration::from_secs(15), |m| !m.is_empty());
    let extra = collect(&results, Duration::from_millis(1500), |_| false);
    assert_eq!(got.len() + extra.len(), 1, "one result");
    assert_eq!(body(&got[0])["attempts"], 1);
    let info = js
        .consumer_info("CAF_ASSIGN", "caf-workers")
        .unwrap()
        .unwrap();
    // One delivery in all (a redelivery takes another consumer sequence).
    assert_eq!(info["delivered"]["consumer_seq"], 1, "{info}");
    assert_eq!(info["num_ack_pending"], 0, "{info}");
    assert_eq!(
        metric(
            &w,
            "worker_nats_messages_total{direction=\"in\",kind=\"assign\"}"
        ),
        Some(1.0)
    );
    let wpi = metric(&w, "worker_jetstream_acks_total{kind=\"in_progress\"}").unwrap();
    assert!(
        wpi >= 3.0,
        "+WPI sent {wpi} times over 3.5 s with ack_wait 1 s"
    );
}

#[test]
fn server_restart_buffers_results_and_reconnects() {
    let mut server = NatsServer::start();
    let c = client(&server.url());
    let js = JetStream::new(c.clone(), Duration::from_secs(5));
    let w = worker(&server.url(), "jetstream", &[("WORKER_IO_POOL_SIZE", "8")]);
    wait_js_setup(&js);
    wait_ready(&w);
    // Four steps run across the outage; their results wait in the buffer.
    let items: Vec<Value> = (0..4).map(|i| sleep(&format!("rs-{i}"), 1500)).collect();
    js_publish(&js, &items);
    assert!(
        wait_for(Duration::from_secs(10), || {
            (metric(&w, "worker_active_tasks{resource_pool=\"cpu\"}") == Some(4.0)).then_some(())
        })
        .is_some(),
        "the steps never started"
    );
    server.kill();
    let down = wait_for(Duration::from_secs(10), || (ready(&w) == 503).then_some(()));
    assert!(down.is_some(), "/readyz stayed 200 with the server down");
    assert_eq!(
        health(&w, "/_health").json["checks"]["nats"]
            .as_str()
            .map(|s| s.starts_with("not connected")),
        Some(true)
    );
    assert_eq!(metric(&w, "worker_nats_connected"), Some(0.0));
    let buffered = wait_for(Duration::from_secs(5), || {
        metric(&w, "worker_nats_publish_buffered").filter(|n| *n >= 4.0)
    });
    assert!(buffered.is_some(), "results not buffered while down");
    server.restart();
    wait_ready(&w);
    let c = client(&server.url());
    let js = JetStream::new(c.clone(), Duration::from_secs(5));
    let results = sub(&c, RESULTS);
    wait_stream(&js, "CAF_RESULTS", 4, Duration::from_secs(10));
    assert_eq!(metric(&w, "worker_nats_reconnects_total"), Some(1.0));
    // New work is taken.
    js_publish(&js, &[echo("rs-after")]);
    let got = collect(&results, Duration::from_secs(10), |m| {
        m.iter().any(|x| body(x)["assignment_id"] == "rs-after")
    });
    assert!(got.iter().any(|x| body(x)["assignment_id"] == "rs-after"));
    wait_stream(&js, "CAF_ASSIGN", 0, Duration::from_secs(5));
}

/// The result buffer is bounded in bytes as well as in count (64 MiB,
/// SPEC §12): results of ~0.9 MB finishing while the server is down fill it
/// after about 70, and the rest are dropped, counted and logged instead of
/// growing the worker's memory.
#[test]
fn the_result_buffer_is_bounded_in_bytes() {
    let mut server = NatsServer::start_core(&[]);
    let c = client(&server.url());
    let w = worker(
        &server.url(),
        "core",
        &[
            ("WORKER_CPU_POOL_SIZE", "1"),
            ("WORKER_MAX_QUEUE_SIZE", "200"),
        ],
    );
    wait_ready(&w);
    let acks = sub(&c, "caf.exec.assign.v1.ack");
    // One cpu thread: the echoes wait behind the sleep, which is cancelled
    // once the server is gone, so they all finish during the outage.
    c.publish(ASSIGN, sleep("big-sleep", 600_000).to_string().as_bytes())
        .unwrap();
    let pad = "x".repeat(900_000);
    for i in 0..80 {
        let a = assignment(&format!("big-{i}"), "debug.echo", json!({ "pad": pad }));
        c.publish(ASSIGN, a.to_string().as_bytes()).unwrap();
    }
    // Every one accepted by the engine (acked) before the server goes:
    // messages still in the subscription when the connection drops are
    // core NATS's to lose.
    let got = collect(&acks, Duration::from_secs(30), |m| m.len() >= 81);
    assert_eq!(got.len(), 81, "acks before the outage");
    assert_eq!(
        metric(&w, "worker_active_tasks{resource_pool=\"cpu\"}"),
        Some(1.0),
        "the sleep ahead of the echoes is not running"
    );
    server.kill();
    let cancel = format!("http://{}/api/v1/assignments/big-sleep/cancel", w.ingress);
    let (status, _, body) = support::http("POST", &cancel, None);
    assert!(
        (200..300).contains(&status) && body.contains("cancel"),
        "cancel: {status} {body}"
    );
    let full = wait_for(Duration::from_secs(20), || {
        w.stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("NATS result buffer full"))
            .then_some(())
    });
    assert!(
        full.is_some(),
        "no result was dropped: {:?} buffered",
        metric(&w, "worker_nats_publish_buffered")
    );
    let buffered = metric(&w, "worker_nats_publish_buffered").unwrap_or(0.0);
    assert!(
        (40.0..=81.0).contains(&buffered),
        "{buffered} results of ~0.9 MB buffered"
    );
}

/// Results waiting for their PubAck are bounded in bytes too (64 MiB, SPEC
/// §12): with the result stream gone, publishes reach this test's
/// subscriber but no PubAck comes back. Once all 100 echoes of ~0.9 MB have
/// run, about 75 distinct results have gone out and no more: at the bound
/// the publisher pauses. The PubAck time-out is 40 s so that all of them
/// are produced within it even on a slow machine (with a short one, early
/// results go back to the buffer before the bound is reached, and the
/// waiting bytes never get there). Once the stream is back, every result
/// is stored after the time-out: the pause loses nothing.
#[test]
fn jetstream_results_waiting_for_a_puback_are_bounded_in_bytes() {
    let (server, results, js) = jetstream_setup();
    let w = worker(
        &server.url(),
        "jetstream",
        &[("WORKER_NATS_PUBACK_TIMEOUT_MS", "40000")],
    );
    wait_ready(&w);
    wait_js_setup(&js);
    assert!(js.delete_stream("CAF_RESULTS").unwrap());
    let pad = "x".repeat(900_000);
    let items: Vec<Value> = (0..100)
        .map(|i| assignment(&format!("big-{i}"), "debug.echo", json!({ "pad": pad })))
        .collect();
    js_publish(&js, &items);
    let succeeded = || {
        let addr = w.metrics.expect("metrics port");
        let (_, _, text) = support::http("GET", &format!("http://{addr}/metrics"), None);
        text.lines()
            .filter(|l| l.starts_with("worker_step_executions_total{"))
            .filter(|l| l.contains("execution_status=\"success\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    // Within the time-out of the first publish (on a machine too slow for
    // all 100, the check below is weaker, never wrong).
    let _ = wait_for(Duration::from_secs(35), || {
        (succeeded() >= 100.0).then_some(())
    });
    let ran = succeeded() as usize;
    assert!(ran >= 10, "only {ran} of 100 echoes ran in 35 s");
    // Only the id is read: the test must keep up with ~0.9 MB messages.
    let id_of = |m: &Message| {
        let text = String::from_utf8_lossy(&m.payload[..m.payload.len().min(512)]).into_owned();
        let at = text.find("\"assignment_id\":\"big-")? + 17;
        Some(text[at..].split('"').next()?.to_owned())
    };
    let mut seen = HashSet::new();
    let until = Instant::now() + Duration::from_secs(10);
    while seen.len() < ran.min(75) && Instant::now() < until {
        if let Ok(m) = results.receiver().recv_timeout(Duration::from_millis(100)) {
            seen.extend(id_of(&m));
        }
    }
    // A little longer: a publisher that did not pause would go on to 100.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        if let Ok(m) = results.receiver().recv_timeout(Duration::from_millis(100)) {
            seen.extend(id_of(&m));
        }
    }
    eprintln!(
        "{ran} ran, {} distinct results out with no PubAck",
        seen.len()
    );
    assert!(
        (ran.min(70)..=76).contains(&seen.len()),
        "{ran} ran, {} distinct results of ~0.9 MB went out with no PubAck",
        seen.len()
    );
    if ran >= 70 {
        w.log_line(
            &["JetStream PubAck: publishing paused", "WARN"],
            Duration::from_secs(5),
        );
    }
    js.add_stream(&StreamConfig {
        name: "CAF_RESULTS".into(),
        subjects: vec![RESULTS.into()],
        retention: Retention::Limits,
        storage_file: true,
        duplicate_window: Duration::from_secs(120),
    })
    .unwrap();
    wait_stream(&js, "CAF_RESULTS", 100, Duration::from_secs(120));
    drop(w);
}

#[test]
fn wrong_credentials_log_each_attempt_back_off_and_stay_unready() {
    let server = NatsServer::start_with(&["--user", "caf", "--pass", "right"]);
    let mut w = worker(&server.url_with("caf:wrong"), "jetstream", &[]);
    let t0 = Instant::now();
    let attempts = |w: &Worker| {
        let logs = w.stderr.lock().unwrap();
        logs.iter()
            .filter(|l| l.contains("Authorization Violation"))
            .count()
    };
    // At least 2.5 s, so that a missing backoff shows as a flood of attempts,
    // and at least two attempts in (the log reader may lag on a busy host).
    wait_for(Duration::from_secs(10), || {
        (t0.elapsed() >= Duration::from_millis(2500) && attempts(&w) >= 2).then_some(())
    });
    assert_eq!(ready(&w), 503);
    let h = health(&w, "/_health");
    assert_eq!(h.status, 503);
    assert!(h.text.contains("nats"), "{}", h.text);
    assert!(!h.text.contains("wrong"), "the password leaked: {}", h.text);
    assert!(w.child.try_wait().unwrap().is_none(), "the worker died");
    let logs = w.stderr.lock().unwrap().clone();
    let auth: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("Authorization Violation"))
        .collect();
    let secs = t0.elapsed().as_secs_f64();
    assert!(auth.len() >= 2, "attempts logged: {auth:?}");
    assert!(
        (auth.len() as f64) < 12.0 * secs,
        "no backoff: {} attempts in {secs:.1} s",
        auth.len()
    );
    assert!(
        logs.iter().all(|l| !l.contains("caf:wrong")),
        "credentials in the log"
    );
    w.sigterm();
    assert_eq!(w.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn a_result_above_max_payload_is_replaced_by_a_quota_exceeded_result() {
    let dir = support::temp_dir();
    let conf = dir.path().join("small.conf");
    std::fs::write(&conf, "max_payload: 4096\n").unwrap();
    let server = NatsServer::start_with(&["-c", conf.to_str().unwrap()]);
    let c = client(&server.url());
    let results = sub(&c, RESULTS);
    let w = worker(&server.url(), "core", &[]);
    wait_ready(&w);
    // The assignment fits; its echo result (the payload plus the envelope) does not.
    let a = assignment("big-1", "debug.echo", json!({"blob": "x".repeat(3880)}));
    assert!(a.to_string().len() < 4096);
    c.publish(ASSIGN, a.to_string().as_bytes()).unwrap();
    let got = collect(&results, Duration::from_secs(10), |m| !m.is_empty());
    assert_eq!(got.len(), 1, "one (stand-in) result");
    let r = body(&got[0]);
    assert_eq!(
        (r["status"].as_str(), r["error_code"].as_str()),
        (Some("error"), Some("QUOTA_EXCEEDED")),
        "{} bytes",
        got[0].payload.len()
    );
    assert!(r["outputs"].is_null());
    assert_eq!(r["assignment_id"], "big-1");
    // The full result stays retained for the HTTP lookup.
    let full = support::serve::result(&w, "big-1", 0);
    assert_eq!(full.json["status"], "success");
}

#[test]
fn jetstream_invalid_message_is_rejected_dead_lettered_and_terminated() {
    let server = NatsServer::start();
    let c = client(&server.url());
    let (acks, dlq) = (
        sub(&c, "caf.exec.assign.v1.ack"),
        sub(&c, "caf.exec.dlq.v1"),
    );
    let js = JetStream::new(c.clone(), Duration::from_secs(5));
    let w = worker(&server.url(), "jetstream", &[]);
    wait_js_setup(&js);
    js.publish(ASSIGN, &Headers::new(), b"[1, 2", Some("garbage-1"))
        .unwrap();
    let dead = collect(&dlq, Duration::from_secs(10), |m| !m.is_empty());
    assert_eq!(dead.len(), 1);
    assert_eq!(body(&dead[0])["reason"], "invalid_json");
    let rejected = collect(&acks, Duration::from_secs(5), |m| !m.is_empty());
    assert_eq!(body(&rejected[0])["status"], "rejected");
    // +TERM: removed from the work queue at once, never redelivered.
    wait_stream(&js, "CAF_ASSIGN", 0, Duration::from_secs(5));
    assert_eq!(
        metric(&w, "worker_jetstream_acks_total{kind=\"term\"}"),
        Some(1.0)
    );
}

#[test]
fn submit_prints_every_answer_and_exits_0_or_1_after_the_timeout() {
    let server = NatsServer::start();
    let dir = support::temp_dir();
    let file = dir.path().join("in.jsonl");
    let mut text: String = (0..20)
        .map(|i| format!("{}\n", echo(&format!("sub-{i}"))))
        .collect();
    text.push_str("{broken\n\n");
    std::fs::write(&file, text).unwrap();
    let submit = |mode: &str, timeout: &str| {
        support::command(&[])
            .args(["submit", "--nats", &server.url(), "--mode", mode])
            .args(["--timeout-ms", timeout, file.to_str().unwrap()])
            .output()
            .unwrap()
    };
    // No worker yet: nothing answers, exit 1 after the idle timeout.
    let t0 = Instant::now();
    let out = submit("core", "500");
    assert_eq!(out.status.code(), Some(1));
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(String::from_utf8_lossy(&out.stderr).contains("21 unanswered"));

    let w = worker(&server.url(), "core", &[]);
    wait_ready(&w);
    let out = submit("core", "10000");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 21, "20 results and one rejected Ack");
    assert_eq!(
        lines.iter().filter(|v| v["status"] == "success").count(),
        20
    );
    assert_eq!(
        lines
            .iter()
            .filter(|v| v["reason"] == "invalid_json")
            .count(),
        1
    );
    assert!(stderr.contains("21 of 21 answered"), "{stderr}");
}

#[test]
fn jetstream_redelivered_retained_assignment_is_republished_not_rerun() {
    let (server, results, js) = jetstream_setup();
    let w = worker(&server.url(), "jetstream", &[]);
    wait_js_setup(&js);
    let a = echo("again-1");
    js_publish(&js, std::slice::from_ref(&a));
    let first = collect(&results, Duration::from_secs(10), |m| !m.is_empty());
    assert_eq!(first.len(), 1);
    wait_stream(&js, "CAF_ASSIGN", 0, Duration::from_secs(5));
    // The router sends it again (another stream message, same assignment_id).
    js.publish(
        ASSIGN,
        &Headers::new(),
        a.to_string().as_bytes(),
        Some("again-1-resent"),
    )
    .unwrap();
    let second = collect(&results, Duration::from_secs(10), |m| !m.is_empty());
    assert_eq!(second.len(), 1, "the retained result is published again");
    // The same result, not a new run: same timestamp, accepted once.
    assert_eq!(body(&second[0]), body(&first[0]));
    assert_eq!(
        metric(
            &w,
            "worker_assignments_total{outcome=\"accepted\",reason=\"\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &w,
            "worker_nats_messages_total{direction=\"out\",kind=\"result\"}"
        ),
        Some(2.0)
    );
    // Acknowledged; the result stream still holds one result.
    wait_stream(&js, "CAF_ASSIGN", 0, Duration::from_secs(5));
    wait_stream(&js, "CAF_RESULTS", 1, Duration::from_secs(5));
}

// ---------------------------------------------------------------------------
// human.approval decisions over NATS (SPEC §14.2, docs/SPEC.md §12.17)

const APPROVALS: &str = "caf.exec.approval.v1";

fn approval(id: &str, tenant: &str, approvers: &[&str]) -> Value {
    let mut a = assignment(
        id,
        "human.approval",
        json!({"title": format!("Ship {id}?"), "approvers": approvers}),
    );
    a["tenant_id"] = json!(tenant);
    a
}

fn decision(id: &str, verdict: &str, by: &str) -> Value {
    json!({"assignment_id": id, "decision": verdict, "by": by})
}

/// Publishes a decision with a reply subject of its own and returns every
/// answer: those arriving within 5 s, and 300 ms more after the first (so
/// a second answer would be seen). An empty list took the whole 5 s.
fn ask(c: &Client, headers: Option<&Headers>, payload: &[u8]) -> Vec<Value> {
    ask_within(c, headers, payload, Duration::from_secs(5))
}

fn ask_within(
    c: &Client,
    headers: Option<&Headers>,
    payload: &[u8],
    limit: Duration,
) -> Vec<Value> {
    let inbox = c.new_inbox();
    let answers = sub(c, &inbox);
    let h = headers.cloned().unwrap_or_default();
    c.publish_with_headers(APPROVALS, Some(&inbox), &h, payload)
        .unwrap();
    let mut got = collect(&answers, limit, |m| !m.is_empty());
    got.extend(collect(&answers, Duration::from_millis(300), |_| false));
    answers.unsubscribe();
    got.iter().map(body).collect()
}

/// The one answer to a decision, which must be a refusal with `status`.
fn refused(answers: &[Value], status: u16, code: &str) -> String {
    assert_eq!(answers.len(), 1, "one answer: {answers:?}");
    let e = &answers[0]["error"];
    assert_eq!(
        (e["status"].as_u64(), e["code"].as_str()),
        (Some(u64::from(status)), Some(code)),
        "{answers:?}"
    );
    e["message"].as_str().unwrap().to_owned()
}

/// Waits until `w` holds `n` pending approvals.
fn wait_pending(w: &Worker, n: usize) {
    let sample = "worker_approvals_pending";
    let reached = wait_for(Duration::from_secs(10), || {
        (metric(w, sample) == Some(n as f64)).then_some(())
    });
    assert!(
        reached.is_some(),
        "{sample} = {:?}, expected {n}",
        metric(w, sample)
    );
}

/// The first result of `id` on the result subscription.
fn result_of(results: &Subscription, id: &str) -> Value {
    let got = collect(results, Duration::from_secs(10), |m| {
        m.iter().any(|x| body(x)["assignment_id"] == id)
    });
    got.iter()
        .map(body)
        .find(|v| v["assignment_id"] == id)
        .unwrap_or_else(|| panic!("no result for {id}"))
}

#[test]
fn core_mode_decisions_over_nats_are_answered_like_the_ingress() {
    let server = NatsServer::start();
    let c = client(&server.url());
    let results = sub(&c, RESULTS);
    let w = worker(&server.url(), "core", &[("WORKER_MAX_BODY_BYTES", "4096")]);
    wait_ready(&w);
    for a in [
        approval("na-1", "acme", &["ann"]),
        approval("na-2", "acme", &["ann"]),
        approval("na-3", "acme", &["ann"]),
        echo("na-echo"),
    ] {
        c.publish(ASSIGN, a.to_string().as_bytes()).unwrap();
    }
    assert_eq!(result_of(&results, "na-echo")["status"], "success");
    wait_pending(&w, 3);

    // Approve with a reply: the ExecResult, also on the result subject.
    let mut d = decision("na-1", "approve", "ann");
    d["comment"] = json!("ship it");
    let answers = ask(&c, None, d.to_string().as_bytes());
    assert_eq!(answers.len(), 1, "{answers:?}");
    let r = &answers[0];
    assert_eq!(
        (r["assignment_id"].as_str(), r["status"].as_str()),
        (Some("na-1"), Some("success"))
    );
    assert_eq!(r["outputs"]["decision"], "approved");
    assert_eq!(r["outputs"]["by"], "ann");
    assert_eq!(r["outputs"]["comment"], "ship it");
    assert!(r["outputs"]["decided_at"].as_u64().is_some(), "{r}");
    assert_eq!(&result_of(&results, "na-1"), r);
    // A second decision: 409.
    let again = ask(
        &c,
        None,
        decision("na-1", "reject", "ann").to_string().as_bytes(),
    );
    refused(&again, 409, "already_decided");
    // Not an approver: 403, and it stays pending.
    let bob = ask(
        &c,
        None,
        decision("na-2", "approve", "bob").to_string().as_bytes(),
    );
    assert!(refused(&bob, 403, "forbidden").contains("bob"));
    wait_pending(&w, 2);
    // Reject without a reply subject: the result goes out all the same.
    c.publish(
        APPROVALS,
        decision("na-2", "reject", "ann").to_string().as_bytes(),
    )
    .unwrap();
    let rejected = result_of(&results, "na-2");
    assert_eq!(rejected["status"], "success", "a rejection is an answer");
    assert_eq!(rejected["outputs"]["decision"], "rejected");

    // Another tenant's approval is unknown (body or header), as at the ingress.
    let mut other = decision("na-3", "approve", "ann");
    other["tenant_id"] = json!("other");
    refused(
        &ask(&c, None, other.to_string().as_bytes()),
        404,
        "not_found",
    );
    let mut h = Headers::new();
    h.insert("tenant_id", "other");
    let plain = decision("na-3", "approve", "ann").to_string();
    refused(&ask(&c, Some(&h), plain.as_bytes()), 404, "not_found");
    // An id this worker holds that is no approval: 404.
    let echo_id = decision("na-echo", "approve", "ann").to_string();
    refused(&ask(&c, None, echo_id.as_bytes()), 404, "not_found");
    // An id it does not hold: silence (another worker may hold it).
    let nobody = decision("na-nobody", "approve", "ann").to_string();
    let silent = ask_within(&c, None, nobody.as_bytes(), Duration::from_secs(1));
    assert!(silent.is_empty(), "{silent:?}");
    // Bodies the ingress refuses: 400.
    refused(&ask(&c, None, b"{not json"), 400, "invalid_request");
    let twice = br#"{"assignment_id":"na-3","decision":"reject","by":"ann","decision":"approve"}"#;
    assert!(refused(&ask(&c, None, twice), 400, "invalid_request").contains("duplicate"));
    let no_by = json!({"assignment_id": "na-3", "decision": "approve"}).to_string();
    refused(&ask(&c, None, no_by.as_bytes()), 400, "invalid_request");
    let no_id = json!({"decision": "approve", "by": "ann"}).to_string();
    refused(&ask(&c, None, no_id.as_bytes()), 400, "invalid_request");
    // Larger than WORKER_MAX_BODY_BYTES: 413, as at the ingress.
    let mut big = decision("na-3", "approve", "ann");
    big["comment"] = json!("x".repeat(4096));
    refused(
        &ask(&c, None, big.to_string().as_bytes()),
        413,
        "payload_too_large",
    );
    // A refusal nobody hears is counted and logged.
    c.publish(
        APPROVALS,
        decision("na-3", "approve", "bob").to_string().as_bytes(),
    )
    .unwrap();
    let refusals = |reason: &str| {
        metric(
            &w,
            &format!("worker_nats_approval_refusals_total{{reason=\"{reason}\"}}"),
        )
    };
    assert!(
        wait_for(Duration::from_secs(5), || (refusals("forbidden")
            == Some(2.0))
        .then_some(()))
        .is_some(),
        "forbidden refusals: {:?}",
        refusals("forbidden")
    );
    // The metric may be read before the reader thread has the line: wait.
    w.log_line(&["no reply subject", "na-3"], Duration::from_secs(5));
    assert_eq!(
        (
            refusals("already_decided"),
            refusals("not_found"),
            refusals("invalid_request"),
            refusals("payload_too_large"),
        ),
        (Some(1.0), Some(3.0), Some(4.0), Some(1.0))
    );
    // Decisions count as they do from the ingress; na-3 still waits.
    let decided = |d: &str| {
        metric(
            &w,
            &format!("worker_approval_decisions_total{{decision=\"{d}\"}}"),
        )
    };
    assert_eq!(
        (decided("approved"), decided("rejected")),
        (Some(1.0), Some(1.0))
    );
    wait_pending(&w, 1);
    let messages = |dir: &str| {
        metric(
            &w,
            &format!("worker_nats_messages_total{{direction=\"{dir}\",kind=\"approval\"}}"),
        )
    };
    // 14 decisions in; 11 answered (not the two without a reply, nor the unknown id).
    assert_eq!((messages("in"), messages("out")), (Some(14.0), Some(11.0)));
}

/// Refusals nobody hears (no reply subject) are logged at most 10 a second;
/// the rest are counted in one "suppressed" line, so whoever may publish on
/// the approval subject cannot flood the worker's log.
#[test]
fn unanswered_refusals_cannot_flood_the_log() {
    let server = NatsServer::start();
    let c = client(&server.url());
    let mut w = worker(&server.url(), "core", &[]);
    wait_ready(&w);
    c.publish(
        ASSIGN,
        approval("flood-1", "acme", &["ann"]).to_string().as_bytes(),
    )
    .unwrap();
    wait_pending(&w, 1);
    let bob = decision("flood-1", "approve", "bob").to_string();
    for _ in 0..300 {
        c.publish(APPROVALS, bob.as_bytes()).unwrap();
    }
    let forbidden = || {
        metric(
            &w,
            "worker_nats_approval_refusals_total{reason=\"forbidden\"}",
        )
    };
    assert!(
        wait_for(Duration::from_secs(10), || (forbidden() == Some(300.0))
            .then_some(()))
        .is_some(),
        "refusals counted: {:?}",
        forbidden()
    );
    w.sigterm();
    assert_eq!(w.wait_exit(Duration::from_secs(10)), 0);
    let stderr = w.stderr.lock().unwrap();
    let logged = stderr
        .iter()
        .filter(|l| l.contains("no reply subject"))
        .count();
    assert!((1..=40).contains(&logged), "{logged} refusal lines logged");
    let suppressed: u64 = stderr
        .iter()
        .filter(|l| l.contains("similar lines suppressed") && l.contains("approval"))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["context"]["suppressed"].as_u64())
        .sum();
    assert_eq!(
        logged as u64 + suppressed,
        300,
        "{logged} logged, {suppressed} suppressed"
    );
}

#[test]
fn jetstream_two_workers_a_decision_reaches_the_worker_holding_the_approval() {
    let (server, results, js) = jetstream_setup();
    let c = client(&server.url());
    // Each worker takes its own assign subject, so which one holds which
    // approval is known; both subscribe to the same approval subject.
    let start = |id: &str, subject: &str, stream: &str| {
        worker(
            &server.url(),
            "jetstream",
            &[
                ("WORKER_ID", id),
                ("WORKER_NATS_ASSIGN_SUBJECT", subject),
                ("WORKER_NATS_STREAM", stream),
            ],
        )
    };
    let a = start("wa", "caf.exec.assign.a", "CAF_ASSIGN_A");
    let b = start("wb", "caf.exec.assign.b", "CAF_ASSIGN_B");
    wait_ready(&a);
    wait_ready(&b);
    for (subject, id) in [
        ("caf.exec.assign.a", "two-a"),
        ("caf.exec.assign.b", "two-b"),
    ] {
        let body = approval(id, "acme", &["ann"]).to_string();
        js.publish(subject, &Headers::new(), body.as_bytes(), Some(id))
            .unwrap();
    }
    wait_pending(&a, 1);
    wait_pending(&b, 1);
    for (id, holder) in [("two-a", "wa"), ("two-b", "wb")] {
        let answers = ask(
            &c,
            None,
            decision(id, "approve", "ann").to_string().as_bytes(),
        );
        assert_eq!(answers.len(), 1, "only the holder answers: {answers:?}");
        assert_eq!(
            (
                answers[0]["status"].as_str(),
                answers[0]["worker_id"].as_str()
            ),
            (Some("success"), Some(holder)),
            "{answers:?}"
        );
        let r = result_of(&results, id);
        assert_eq!(
            (r["worker_id"].as_str(), &r["outputs"]["decision"]),
            (Some(holder), &json!("approved"))
        );
    }
    // Published once each, PubAcked, and the held messages ACKed.
    wait_stream(&js, "CAF_RESULTS", 2, Duration::from_secs(5));
    wait_stream(&js, "CAF_ASSIGN_A", 0, Duration::from_secs(5));
    wait_stream(&js, "CAF_ASSIGN_B", 0, Duration::from_secs(5));
    for w in [&a, &b] {
        let m = |sample: &str| metric(w, sample);
        let counts = || {
            (
                m("worker_approval_decisions_total{decision=\"approved\"}"),
                m("worker_nats_messages_total{direction=\"in\",kind=\"approval\"}"),
                m("worker_nats_messages_total{direction=\"out\",kind=\"approval\"}"),
                m("worker_nats_approval_refusals_total{reason=\"not_found\"}"),
            )
        };
        // The other worker's decision may still be on its way to this one.
        let want = (Some(1.0), Some(2.0), Some(1.0), Some(0.0));
        wait_for(Duration::from_secs(5), || (counts() == want).then_some(()));
        assert_eq!(
            counts(),
            want,
            "each saw both decisions, applied and answered its own, ignored the other"
        );
    }
}

#[test]
fn with_the_ingress_off_an_approval_parks_and_is_decided_over_nats() {
    let server = NatsServer::start();
    let c = client(&server.url());
    let results = sub(&c, RESULTS);
    let w = worker(&server.url(), "core", &[("WORKER_INGRESS_ADDR", "off")]);
    wait_ready(&w);
    let listening = w
        .stderr
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("listening") && l.contains(r#""ingress":"off""#));
    assert!(listening, "the ingress is not off");
    let a = approval("off-1", "acme", &[]).to_string();
    let ack = c
        .request(ASSIGN, None, a.as_bytes(), Duration::from_secs(5))
        .unwrap();
    assert_eq!(body(&ack)["status"], "accepted");
    // It parks (no "needs serve" answer) until the decision.
    wait_pending(&w, 1);
    let early = collect(&results, Duration::from_millis(300), |m| !m.is_empty());
    assert!(
        early.is_empty(),
        "answered before any decision: {:?}",
        early.iter().map(body).collect::<Vec<_>>()
    );
    let answers = ask(
        &c,
        None,
        decision("off-1", "approve", "anyone")
            .to_string()
            .as_bytes(),
    );
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0]["outputs"]["decision"], "approved");
    let r = result_of(&results, "off-1");
    assert_eq!(
        (r["status"].as_str(), &r["outputs"]["by"]),
        (Some("success"), &json!("anyone"))
    );
    wait_pending(&w, 0);
}
