//! `http.request` (SPEC §4.1) against a real tiny_http upstream on
//! 127.0.0.1:0, CP1 baseline (all flags off).
mod support;

use base64::Engine as _;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::{Reply, Upstream};

const LIMIT: Duration = Duration::from_secs(20);

fn request(id: &str, payload: Value) -> Value {
    support::assignment(id, "http.request", payload)
}

/// One attempt only, so a failure is reported without CP1's retries.
fn once(a: Value) -> Value {
    support::with_options(a, json!({"retry": {"max_attempts": 1}}))
}

fn header<'a>(seen: &'a support::Seen, name: &str) -> Option<&'a str> {
    seen.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[test]
fn a_200_is_success_with_status_lower_case_headers_and_body() {
    let up = Upstream::start(|_, _| {
        Reply::status(200)
            .header("Content-Type", "text/plain; charset=utf-8")
            .header("X-Upstream-Thing", "Mixed-Case-Value")
            .body("hi there")
    });
    let r = support::run_one(
        &request("ok", json!({"url": up.url("/hello?x=1")})),
        &[],
        LIMIT,
    );
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["attempts"], 1);
    let out = &r["outputs"];
    assert_eq!(out["status_code"], 200);
    assert_eq!(out["body"], "hi there");
    assert!(out.get("body_base64").is_none());
    let headers = out["headers"].as_object().expect("headers object");
    assert!(
        headers.keys().all(|k| *k == k.to_ascii_lowercase()),
        "header names must be lower case: {headers:?}"
    );
    assert_eq!(
        headers["x-upstream-thing"], "Mixed-Case-Value",
        "values are kept as sent"
    );
    assert_eq!(headers["content-type"], "text/plain; charset=utf-8");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "GET", "GET is the default method");
    assert_eq!(seen[0].url, "/hello?x=1");
    support::check_results(&[r.to_string()]);
}

#[test]
fn non_2xx_is_http_error_with_status_code_and_body_head() {
    for status in [404u16, 503] {
        let up = Upstream::start(move |_, _| {
            Reply::status(status)
                .header("Content-Type", "text/plain")
                .body(format!("upstream says {status}"))
        });
        let r = support::run_one(
            &once(request("non2xx", json!({"url": up.url("/x")}))),
            &[],
            LIMIT,
        );
        assert_eq!(r["status"], "error", "{r}");
        assert_eq!(r["error_code"], "HTTP_ERROR", "{r}");
        assert!(
            r["error_message"]
                .as_str()
                .unwrap()
                .contains(&status.to_string()),
            "{r}"
        );
        assert_eq!(r["outputs"]["status_code"], status, "{r}");
        assert_eq!(r["outputs"]["body"], format!("upstream says {status}"));
        assert_eq!(r["outputs"]["headers"]["content-type"], "text/plain");
        assert!(r["retryable"].is_boolean());
        support::check_results(&[r.to_string()]);
    }
    // Only the first 4 KiB of an error body are kept.
    let big = "e".repeat(10_000);
    let up = Upstream::start(move |_, _| Reply::status(500).body(big.clone()));
    let r = support::run_one(
        &once(request("head", json!({"url": up.url("/")}))),
        &[],
        LIMIT,
    );
    assert_eq!(r["error_code"], "HTTP_ERROR");
    assert_eq!(r["outputs"]["status_code"], 500);
    assert_eq!(r["outputs"]["body"].as_str().unwrap().len(), 4096);
}

#[test]
fn request_headers_and_a_json_body_round_trip() {
    let up = Upstream::start(|_, seen| {
        Reply::status(201)
            .header("Content-Type", "application/json")
            .body(seen.body.clone())
    });
    let body =
        json!({"name": "caf", "n": 3, "tags": ["a", "b"], "nested": {"ok": true}, "none": null});
    let r = support::run_one(
        &request(
            "post",
            json!({
                "url": up.url("/items"), "method": "post",
                "headers": {"X-Request-Tag": "tag-1", "X-Count": 7, "Accept": "application/json"},
                "body": body,
            }),
        ),
        &[],
        LIMIT,
    );
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["outputs"]["status_code"], 201);
    let seen = &up.seen()[0];
    assert_eq!(seen.method, "POST", "method is case-insensitive");
    assert_eq!(seen.url, "/items");
    assert_eq!(header(seen, "x-request-tag"), Some("tag-1"));
    assert_eq!(
        header(seen, "x-count"),
        Some("7"),
        "JSON values are sent as text"
    );
    assert_eq!(header(seen, "accept"), Some("application/json"));
    assert_eq!(
        header(seen, "content-type"),
        Some("application/json"),
        "an object body is sent as JSON"
    );
    let sent: Value = serde_json::from_slice(&seen.body).expect("the body sent is JSON");
    assert_eq!(sent, body);
    // The echoed body comes back as a string.
    let echoed: Value = serde_json::from_str(r["outputs"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(echoed, body);

    // A string body is sent byte for byte, without a forced JSON content type;
    // an explicit content-type header wins for JSON bodies.
    let up = Upstream::start(|_, _| Reply::status(204));
    let r = support::run_one(
        &request(
            "put",
            json!({"url": up.url("/raw"), "method": "PUT", "body": "plain {not json} ✓"}),
        ),
        &[],
        LIMIT,
    );
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["outputs"]["status_code"], 204);
    let r2 = support::run_one(
        &request(
            "patch",
            json!({"url": up.url("/typed"), "method": "PATCH",
                   "headers": {"Content-Type": "application/merge-patch+json"}, "body": [1, 2]}),
        ),
        &[],
        LIMIT,
    );
    assert_eq!(r2["status"], "success", "{r2}");
    let seen = up.seen();
    assert_eq!(seen[0].method, "PUT");
    assert_eq!(seen[0].body, "plain {not json} ✓".as_bytes());
    assert_ne!(header(&seen[0], "content-type"), Some("application/json"));
    assert_eq!(seen[1].method, "PATCH");
    assert_eq!(
        header(&seen[1], "content-type"),
        Some("application/merge-patch+json")
    );
    assert_eq!(seen[1].body, b"[1,2]");
}

#[test]
fn a_non_utf8_body_comes_back_as_body_base64() {
    let bytes: Vec<u8> = vec![0xff, 0xfe, 0x00, 0x80, b'a', 0xc3];
    let reply = bytes.clone();
    let up = Upstream::start(move |_, _| {
        Reply::status(200)
            .header("Content-Type", "application/octet-stream")
            .body(reply.clone())
    });
    let r = support::run_one(&request("bin", json!({"url": up.url("/bin")})), &[], LIMIT);
    assert_eq!(r["status"], "success", "{r}");
    assert!(r["outputs"].get("body").is_none(), "{r}");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(r["outputs"]["body_base64"].as_str().expect("body_base64"))
        .unwrap();
    assert_eq!(decoded, bytes);
}

#[test]
fn a_slow_upstream_past_the_step_deadline_ends_in_timeout() {
    let up = Upstream::start(|_, _| {
        Reply::status(200)
            .body("late")
            .delay(Duration::from_secs(4))
    });
    let a = support::with_options(
        request("slow", json!({"url": up.url("/slow")})),
        json!({"deadline_ms": 300, "retry": {"max_attempts": 1}}),
    );
    let started = Instant::now();
    let r = support::run_one(&a, &[], LIMIT);
    let took = started.elapsed();
    assert_eq!(r["status"], "timeout", "{r}");
    assert_eq!(r["error_code"], "CANCELLED_BY_TIMEOUT");
    assert_eq!(r["attempts"], 1);
    let latency = r["latency_ms"].as_u64().unwrap();
    assert!(
        (250..2000).contains(&latency),
        "latency {latency} ms for a 300 ms deadline"
    );
    assert!(
        took < Duration::from_millis(3500),
        "the worker did not wait for the upstream: {took:?}"
    );
    assert_eq!(up.requests(), 1);
    support::check_results(&[r.to_string()]);

    // CP1 retries a timed-out attempt like any error; each attempt gets the
    // full 300 ms, the final status is still `timeout`.
    let a = support::with_options(
        request("slow-2", json!({"url": up.url("/slow")})),
        json!({"deadline_ms": 300, "retry": {"max_attempts": 2}}),
    );
    let r = support::run_one(&a, &[], LIMIT);
    assert_eq!(r["status"], "timeout", "{r}");
    assert_eq!(r["error_code"], "CANCELLED_BY_TIMEOUT");
    assert_eq!(r["attempts"], 2);
    assert_eq!(r["retries_used"], 1);
    let latency = r["latency_ms"].as_u64().unwrap();
    // 300 + 100 (CP1 delay) + 300 ms.
    assert!((650..2500).contains(&latency), "latency {latency} ms");
}

#[test]
fn non_http_schemes_are_invalid_input_without_any_network() {
    let up = Upstream::start(|_, _| Reply::status(200));
    let host = up.addr.to_string();
    for url in [
        "file:///etc/passwd".to_owned(),
        format!("ftp://{host}/x"),
        format!("gopher://{host}/"),
        format!("FILE://{host}/etc/passwd"),
    ] {
        let r = support::run_one(&request("scheme", json!({"url": url})), &[], LIMIT);
        assert_eq!(r["status"], "error", "{url}: {r}");
        assert_eq!(r["error_code"], "INVALID_INPUT", "{url}: {r}");
        assert_eq!(r["retryable"], false, "{url}");
        assert!(
            r.get("outputs")
                .is_none_or(|o| o.get("status_code").is_none()),
            "{r}"
        );
    }
    assert_eq!(up.requests(), 0, "no request may reach the network");
    // Payload type and presence problems use the other input codes.
    let r = support::run_one(&once(request("no-url", json!({}))), &[], LIMIT);
    assert_eq!(r["error_code"], "MISSING_REQUIRED_FIELD");
    let r = support::run_one(&once(request("num-url", json!({"url": 5}))), &[], LIMIT);
    assert_eq!(r["error_code"], "INVALID_FORMAT");
    let r = support::run_one(
        &once(request(
            "bad-method",
            json!({"url": up.url("/"), "method": "TRACE"}),
        )),
        &[],
        LIMIT,
    );
    assert_eq!(r["error_code"], "INVALID_INPUT");
    assert_eq!(up.requests(), 0);
}

#[test]
fn a_body_over_max_response_bytes_is_execution_failed() {
    let up = Upstream::start(|_, seen| {
        let n = if seen.url == "/big" { 5_000 } else { 1_000 };
        Reply::status(200).body(vec![b'x'; n])
    });
    let env = [("WORKER_MAX_RESPONSE_BYTES", "1000")];
    let r = support::run_one(
        &once(request("big", json!({"url": up.url("/big")}))),
        &env,
        LIMIT,
    );
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(r["error_code"], "EXECUTION_FAILED", "{r}");
    assert!(
        r["error_message"]
            .as_str()
            .unwrap()
            .contains("WORKER_MAX_RESPONSE_BYTES"),
        "{r}"
    );
    assert!(
        r.get("outputs").is_none_or(|o| o.get("body").is_none()),
        "never a partial body: {r}"
    );
    // Exactly at the limit is fine.
    let r = support::run_one(
        &once(request("fits", json!({"url": up.url("/fits")}))),
        &env,
        LIMIT,
    );
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["outputs"]["body"].as_str().unwrap().len(), 1_000);
}

#[test]
fn a_refused_connection_is_network_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let r = support::run_one(
        &once(request(
            "refused",
            json!({"url": format!("http://127.0.0.1:{port}/")}),
        )),
        &[],
        LIMIT,
    );
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(r["error_code"], "NETWORK_ERROR", "{r}");
    assert_eq!(r["retryable"], true);
}

/// A keep-alive upstream on a raw listener that counts its connections and
/// answers `/slow` after `slow`, everything else at once.
fn counting_upstream(slow: Duration) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufReader, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", listener.local_addr().unwrap());
    let conns = std::sync::Arc::new(AtomicUsize::new(0));
    let count = conns.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(20)));
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                while let Some(first) = support::read_request_head(&mut reader) {
                    if first.contains(" /slow ") {
                        std::thread::sleep(slow);
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if conn.write_all(answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (base, conns)
}

/// A pooled connection keeps the socket timeout its last request set while
/// that is still within the next request's time (SPEC §12.15): a step with a
/// long deadline followed, on the same connection, by one with a short
/// deadline must still end at the short one.
#[test]
fn a_pooled_connection_ends_a_short_step_at_its_own_deadline() {
    let (base, conns) = counting_upstream(Duration::from_secs(4));
    let with = |id: &str, path: &str, deadline: u64| {
        support::with_options(
            request(id, json!({"url": format!("{base}{path}")})),
            json!({"deadline_ms": deadline, "retry": {"max_attempts": 1}}),
        )
    };
    let steps = [
        with("long", "/fast", 60_000),
        with("short", "/slow", 300),
        with("after", "/fast", 60_000),
    ];
    let started = Instant::now();
    // One io thread: the steps run in order over one pooled connection.
    let r = support::run_in_order(&steps, &[("WORKER_IO_POOL_SIZE", "1")], LIMIT);
    assert_eq!(r[0]["status"], "success", "{}", r[0]);
    assert_eq!(r[1]["status"], "timeout", "{}", r[1]);
    assert_eq!(r[1]["error_code"], "CANCELLED_BY_TIMEOUT");
    let latency = r[1]["latency_ms"].as_u64().unwrap();
    assert!(
        (250..2000).contains(&latency),
        "latency {latency} ms for a 300 ms deadline on a pooled connection"
    );
    assert_eq!(r[2]["status"], "success", "{}", r[2]);
    assert!(started.elapsed() < Duration::from_millis(3500));
    // The first two steps shared a connection; the timed-out one was dropped.
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// An upstream that never reads a large request body: the blocked write
/// ends at the step's deadline (the socket write timeout is only set once
/// a non-blocking first write could not send everything).
#[test]
fn a_body_the_upstream_never_reads_ends_at_the_deadline() {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    // A small receive window (inherited by the accepted socket) and no
    // reads: the worker's send buffer fills and its write blocks.
    listener.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    listener.bind(&any.into()).expect("bind");
    listener.listen(8).expect("listen");
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((conn, _)) = listener.accept() {
            // Held unread until the test ends.
            let _ = rx.recv();
            drop(conn);
        }
    });
    let body = "x".repeat(8 << 20);
    let a = support::with_options(
        request(
            "unread",
            json!({"url": format!("http://{addr}/up"), "method": "POST", "body": body}),
        ),
        json!({"deadline_ms": 500, "retry": {"max_attempts": 1}}),
    );
    let r = support::run_one(&a, &[("WORKER_MAX_BODY_BYTES", "16777216")], LIMIT);
    let _ = tx.send(());
    assert_eq!(r["status"], "timeout", "{r}");
    assert_eq!(r["error_code"], "CANCELLED_BY_TIMEOUT");
    let latency = r["latency_ms"].as_u64().unwrap();
    assert!((450..2500).contains(&latency), "latency {latency} ms");
}

#[test]
fn each_io_thread_keeps_its_connection_alive_across_steps() {
    // 300 GETs on 3 io threads: every thread sends on the connection it
    // opened first (one agent, one pool per thread), so the upstream sees
    // about one connection per thread, not one per step.
    let (base, connections) = counting_upstream(Duration::ZERO);
    let url = format!("{base}/x");
    let lines: Vec<Value> = (0..300)
        .map(|i| support::assignment(&format!("ka-{i}"), "http.request", json!({ "url": url })))
        .collect();
    let out = support::run_lines(&lines, &[("WORKER_IO_POOL_SIZE", "3")], LIMIT);
    let results = out.results();
    assert_eq!(results.len(), 300, "{:?}", out.stderr);
    assert!(results.values().all(|r| r["status"] == "success"));
    let n = connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=6).contains(&n),
        "{n} connections for 300 steps on 3 threads"
    );
}
