//! Issue 12 findings 7, 8 and 9 on the real binary against loopback
//! upstreams: credential headers do not follow a redirect to another origin,
//! payload headers cannot set framing, the egress policy denies hops by
//! resolved address (redirects and odd IPv4 spellings included, the
//! worker's own ports always), and a pooled connection the upstream closed
//! does not fail a step.
//!
//! No test sends traffic beyond loopback: the one non-loopback target
//! (169.254.169.254) is also outside `WORKER_HTTP_ALLOW_NETS`, so even a
//! broken deny list would refuse it before connecting.
mod support;

use serde_json::{Value, json};
use std::io::{BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use support::serve;
use support::{HttpStub, Reply, Upstream, Worker, assignment, run_lines, run_one};

const LIMIT: Duration = Duration::from_secs(30);
const ONE_ATTEMPT: &str = r#"{"retry":{"max_attempts":1},"deadline_ms":10000}"#;

fn http_step(id: &str, payload: Value) -> Value {
    let mut a = assignment(id, "http.request", payload);
    a["options"] = serde_json::from_str(ONE_ATTEMPT).unwrap();
    a
}

fn header<'a>(seen: &'a support::Seen, name: &str) -> Option<&'a str> {
    seen.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

const CREDENTIALS: &[&str] = &[
    "Authorization",
    "Proxy-Authorization",
    "Cookie",
    "X-Api-Key",
    "X-Auth-Token",
    "X-Client-Secret",
];

fn credential_headers() -> Value {
    let mut h = serde_json::Map::new();
    for name in CREDENTIALS {
        h.insert((*name).to_owned(), json!(format!("secret-of-{name}")));
    }
    h.insert("X-Trace".into(), json!("kept"));
    Value::Object(h)
}

#[test]
fn a_cross_origin_redirect_strips_every_credential_header() {
    // The second origin records what it got.
    let other = Upstream::start(|_, _| Reply::status(200).body("landed"));
    let target = other.url("/landing");
    let first = HttpStub::routes(&[
        (
            "/away",
            vec![Reply::status(302).header("Location", &target)],
        ),
        (
            "/here",
            vec![Reply::status(307).header("Location", "/same")],
        ),
        ("/same", vec![Reply::status(200).body("same origin")]),
    ]);
    let away = http_step(
        "redir-away",
        json!({"url": first.url("/away"), "headers": credential_headers(), "follow_redirects": true}),
    );
    let r = run_one(&away, &[], LIMIT);
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["outputs"]["body"], "landed");
    let seen = other.seen();
    assert_eq!(seen.len(), 1);
    for name in CREDENTIALS {
        assert_eq!(header(&seen[0], name), None, "{name} crossed origins");
    }
    assert_eq!(header(&seen[0], "X-Trace"), Some("kept"));

    // The same origin keeps them (scheme, host and port unchanged).
    let here = http_step(
        "redir-here",
        json!({"url": first.url("/here"), "headers": credential_headers(), "follow_redirects": true}),
    );
    let r = run_one(&here, &[], LIMIT);
    assert_eq!(r["status"], "success", "{r}");
    let same = first
        .seen()
        .into_iter()
        .find(|s| s.url == "/same")
        .expect("same-origin hop");
    assert_eq!(header(&same, "X-Api-Key"), Some("secret-of-X-Api-Key"));
    assert_eq!(
        header(&same, "Authorization"),
        Some("secret-of-Authorization")
    );
}

#[test]
fn payload_headers_cannot_set_framing() {
    let up = Upstream::start(|_, _| Reply::status(200));
    for (name, value) in [
        ("Content-Length", "0"),
        ("Transfer-Encoding", "chunked"),
        ("Connection", "close"),
        ("Host", "internal.example"),
        ("upgrade", "websocket"),
    ] {
        let a = http_step(
            "framing",
            json!({"url": up.url("/x"), "method": "POST", "body": "hello", "headers": {name: value}}),
        );
        let r = run_one(&a, &[], LIMIT);
        assert_eq!(r["status"], "error", "{name}: {r}");
        assert_eq!(r["error_code"], "INVALID_INPUT", "{name}: {r}");
        assert_eq!(r["retryable"], false, "{name}: {r}");
        assert!(
            r["error_message"].as_str().unwrap().contains(name),
            "{name}: {r}"
        );
    }
    assert_eq!(
        up.requests(),
        0,
        "a refused request never leaves the worker"
    );
}

fn assert_denied(r: &Value, what: &str) {
    assert_eq!(r["status"], "error", "{what}: {r}");
    assert_eq!(r["error_code"], "PERMISSION_DENIED", "{what}: {r}");
    assert_eq!(r["retryable"], false, "{what}: {r}");
}

#[test]
fn deny_nets_apply_to_the_resolved_address_of_every_hop() {
    let up = Upstream::start(|_, _| Reply::status(200).body("reached"));
    let port = up.addr.port();
    let deny = [("WORKER_HTTP_DENY_NETS", "127.0.0.0/8")];
    // A literal, the decimal form and the short form all name 127.0.0.1.
    for url in [
        format!("http://127.0.0.1:{port}/x"),
        format!("http://2130706433:{port}/x"),
        format!("http://127.1:{port}/x"),
        format!("http://localhost:{port}/x"),
    ] {
        let r = run_one(&http_step("deny", json!({ "url": url })), &deny, LIMIT);
        assert_denied(&r, &url);
        assert!(
            r["error_message"]
                .as_str()
                .unwrap()
                .contains("WORKER_HTTP_DENY_NETS"),
            "{r}"
        );
    }
    assert_eq!(up.requests(), 0, "a denied hop makes no connection");
    // Without the deny list the same spellings reach the loopback upstream.
    for url in [
        format!("http://2130706433:{port}/x"),
        format!("http://127.1:{port}/x"),
    ] {
        let r = run_one(&http_step("allow", json!({ "url": url })), &[], LIMIT);
        assert_eq!(r["status"], "success", "{url}: {r}");
    }
    assert_eq!(up.requests(), 2);

    // A redirect from an allowed host to a denied one: the second hop is
    // refused before it connects (127.0.0.2 has no listener at all).
    let first = HttpStub::routes(&[(
        "/hop",
        vec![Reply::status(302).header("Location", "http://127.0.0.2:9/secret")],
    )]);
    let r = run_one(
        &http_step(
            "redir-deny",
            json!({"url": first.url("/hop"), "follow_redirects": true}),
        ),
        &[("WORKER_HTTP_DENY_NETS", "127.0.0.2/32")],
        LIMIT,
    );
    assert_denied(&r, "redirect to a denied host");
    assert!(r["error_message"].as_str().unwrap().contains("127.0.0.2"));
    assert_eq!(first.requests(), 1);
}

#[test]
fn allow_nets_limit_hops_and_link_local_is_denied_by_default() {
    let up = Upstream::start(|_, _| Reply::status(200));
    let allow = [("WORKER_HTTP_ALLOW_NETS", "127.0.0.1/32")];
    let ok = run_one(&http_step("in", json!({"url": up.url("/")})), &allow, LIMIT);
    assert_eq!(ok["status"], "success", "{ok}");
    let r = run_one(
        &http_step("out", json!({"url": "http://127.0.0.3:9/"})),
        &allow,
        LIMIT,
    );
    assert_denied(&r, "outside the allow list");
    assert!(r["error_message"].as_str().unwrap().contains("ALLOW_NETS"));
    // The cloud metadata address: the default deny list answers first (its
    // message names it); the allow list is only a safety net so that a
    // broken deny list still makes no connection off loopback.
    let r = run_one(
        &http_step(
            "metadata",
            json!({"url": "http://169.254.169.254/latest/meta-data/"}),
        ),
        &allow,
        LIMIT,
    );
    assert_denied(&r, "link-local");
    assert!(
        r["error_message"]
            .as_str()
            .unwrap()
            .contains("WORKER_HTTP_DENY_NETS (169.254.0.0/16)"),
        "{r}"
    );
}

#[test]
fn a_step_cannot_call_the_workers_own_ports() {
    let w = Worker::start(&[("CP2_OBSERVABILITY_METRICS_ENABLED", "1")]);
    let ports = [
        ("ingress", w.ingress.port(), "/api/v1/results/x"),
        ("health", w.health.port(), "/livez"),
        (
            "metrics",
            w.metrics.expect("metrics port").port(),
            "/metrics",
        ),
    ];
    for (i, (what, port, path)) in ports.iter().enumerate() {
        for host in ["127.0.0.1", "127.1", "0.0.0.0"] {
            let id = format!("self-{i}-{host}");
            let a = http_step(&id, json!({"url": format!("http://{host}:{port}{path}")}));
            let ack = serve::submit(&w, &a);
            assert_eq!(ack.status, 202, "{}", ack.text);
            let r = serve::result(&w, &id, 10_000);
            assert_eq!(r.status, 200, "{}", r.text);
            assert_denied(&r.json, &format!("{what} via {host}"));
            assert!(
                r.json["error_message"]
                    .as_str()
                    .unwrap()
                    .contains("own listening socket"),
                "{}",
                r.text
            );
        }
    }
}

/// An upstream that answers every request with `Content-Length` and no
/// `Connection: close`, then closes the connection a moment later without
/// reading on: the client pools the connection (it still looks open), and
/// the next step that takes it finds it closed (like a keep-alive timeout
/// on the upstream that fires just as the connection is reused).
struct ClosingUpstream {
    port: u16,
    served: Arc<AtomicUsize>,
}

fn closing_upstream() -> ClosingUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let count = count.clone();
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                if support::read_request_head(&mut reader).is_none() {
                    return;
                }
                count.fetch_add(1, Ordering::SeqCst);
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                let _ = conn.flush();
                std::thread::sleep(Duration::from_millis(5));
                let _ = conn.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    ClosingUpstream { port, served }
}

#[test]
fn pooled_connections_closed_by_the_upstream_do_not_fail_steps() {
    let up = closing_upstream();
    let url = format!("http://127.0.0.1:{}/x", up.port);
    let lines: Vec<Value> = (0..200)
        .map(|i| http_step(&format!("stale-{i}"), json!({ "url": url })))
        .collect();
    let out = run_lines(&lines, &[], Duration::from_secs(60));
    let results = out.results();
    assert_eq!(results.len(), 200, "{:?}", out.stderr);
    let failed: Vec<_> = results
        .values()
        .filter(|r| r["status"] != "success")
        .map(|r| format!("{} {}", r["error_code"], r["error_message"]))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 200 failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(results.values().all(|r| r["attempts"] == 1));
    assert!(up.served.load(Ordering::SeqCst) >= 200);
}

/// A pooled connection is probed before reuse (SPEC §12.15): one the
/// upstream closed while it sat idle is dropped there, and the step goes out
/// on a fresh connection at once instead of through the stale-connection
/// resend.
#[test]
fn an_idle_pooled_connection_is_probed_before_reuse() {
    let up = closing_upstream();
    let slow = Upstream::start(|_, _| Reply::status(200).delay(Duration::from_millis(400)));
    let step = |id: &str, url: String| {
        support::with_options(
            http_step(id, json!({ "url": url })),
            json!({"retry": {"max_attempts": 1}, "deadline_ms": 10_000}),
        )
    };
    let steps = [
        step("first", format!("http://127.0.0.1:{}/x", up.port)),
        // Holds the only io thread for 400 ms: the first connection sits
        // idle in the pool meanwhile, and its upstream closes it.
        step("pause", slow.url("/slow")),
        step("again", format!("http://127.0.0.1:{}/x", up.port)),
    ];
    let env = [("WORKER_IO_POOL_SIZE", "1"), ("RUST_LOG", "debug")];
    let out = run_lines(&steps, &env, LIMIT);
    let results = out.results();
    for id in ["first", "pause", "again"] {
        assert_eq!(results[id]["status"], "success", "{}", results[id]);
    }
    let resent = out
        .stderr
        .iter()
        .filter(|l| l.contains("pooled connection was closed"))
        .count();
    assert_eq!(resent, 0, "reused without a probe: {:?}", out.stderr);
}

#[test]
fn redirects_followed_hop_by_hop_keep_their_rules() {
    let up = HttpStub::routes(&[
        ("/loop", vec![Reply::status(302).header("Location", "loop")]),
        ("/post", vec![Reply::status(303).header("Location", "/got")]),
        ("/got", vec![Reply::status(200).body("done")]),
        ("/keep", vec![Reply::status(307).header("Location", "/got")]),
    ]);
    let step = |id: &str, path: &str, method: &str, follow: bool| {
        http_step(
            id,
            json!({"url": up.url(path), "method": method, "body": {"a": 1}, "follow_redirects": follow}),
        )
    };
    // More than five redirects: a permanent EXECUTION_FAILED after six requests.
    let r = run_one(&step("loop", "/loop", "GET", true), &[], LIMIT);
    assert_eq!(r["error_code"], "EXECUTION_FAILED", "{r}");
    assert_eq!(r["retryable"], false, "{r}");
    assert_eq!(up.requests_to("/loop"), 6);
    // Not following: the 3xx is the answer.
    let r = run_one(&step("nofollow", "/loop", "GET", false), &[], LIMIT);
    assert_eq!(r["error_code"], "HTTP_ERROR", "{r}");
    assert_eq!(r["outputs"]["status_code"], 302, "{r}");
    // 303 turns a POST into a GET without a body; 307 does not follow a POST.
    let r = run_one(&step("post", "/post", "POST", true), &[], LIMIT);
    assert_eq!(r["status"], "success", "{r}");
    let got = up.seen().into_iter().find(|s| s.url == "/got").unwrap();
    assert_eq!(got.method, "GET");
    assert!(got.body.is_empty());
    assert_eq!(header(&got, "content-type"), None);
    let r = run_one(&step("keep", "/keep", "POST", true), &[], LIMIT);
    assert_eq!(r["error_code"], "EXECUTION_FAILED", "{r}");
    assert_eq!(up.requests_to("/got"), 1);
}

#[test]
fn proxy_variables_in_the_environment_are_not_used() {
    // A proxy from the environment would carry every request past the
    // egress rules (they would only ever see the proxy's address). The
    // "proxy" here is a closed loopback port: were it used, the step fails.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let up = Upstream::start(|_, _| Reply::status(200).body("direct"));
    let env = [
        ("HTTP_PROXY", proxy.as_str()),
        ("http_proxy", proxy.as_str()),
        ("ALL_PROXY", proxy.as_str()),
    ];
    let r = run_one(&http_step("np", json!({"url": up.url("/x")})), &env, LIMIT);
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(
        up.requests(),
        1,
        "the request went straight to the upstream"
    );
}
