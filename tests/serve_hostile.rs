//! `caf-worker serve` against hostile or broken clients: malformed bodies,
//! oversized and stalled uploads, slow headers, many idle connections,
//! unknown routes and wrong methods, and ports left idle.
mod support;

use serde_json::{Value, json};
use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::serve::{self, sleep_step};
use support::{Worker, assignment};

/// Every request on this list must be answered within this, whatever the
/// hostile clients are doing (generous for two busy cores).
const PROMPT: Duration = Duration::from_millis(1000);

/// Health, a submission and a lookup all answer promptly.
fn assert_serving(w: &Worker, tag: &str) {
    let t = Instant::now();
    assert_eq!(serve::health(w, "/_health").status, 200, "{tag}");
    let health = t.elapsed();
    let id = format!("alive-{tag}");
    let t = Instant::now();
    let a = serve::submit(w, &assignment(&id, "debug.echo", json!({})));
    let submit = t.elapsed();
    assert_eq!(a.status, 202, "{tag}: {}", a.text);
    let t = Instant::now();
    let r = serve::result(w, &id, 2000);
    let lookup = t.elapsed();
    assert_eq!(r.status, 200, "{tag}: {}", r.text);
    eprintln!("{tag}: health {health:?}, submit {submit:?}, lookup {lookup:?}");
    for (what, took) in [("health", health), ("submit", submit), ("lookup", lookup)] {
        assert!(took < PROMPT, "{tag}: {what} took {took:?}");
    }
}

fn vm_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn malformed_bodies_get_a_400_invalid_json_ack() {
    let w = Worker::start(&[]);
    let url = w.url("/api/v1/assignments");
    let deep = "[".repeat(5000);
    let bodies: Vec<&[u8]> = vec![
        b"{not json",
        b"{\"version\": \"1\",",
        b"",
        b"null",
        b"\"a string\"",
        b"[1,2,3]",
        b"\xff\xfe\x00garbage",
        deep.as_bytes(),
    ];
    for body in bodies {
        let a = serve::request("POST", &url, &[], Some(body));
        let shown = String::from_utf8_lossy(&body[..body.len().min(40)]).into_owned();
        assert_eq!(a.status, 400, "{shown:?}: {}", a.text);
        assert_eq!(a.json["status"], "rejected", "{shown:?}: {}", a.text);
        assert_eq!(a.json["reason"], "invalid_json", "{shown:?}: {}", a.text);
        assert!(!a.text.contains("panicked"), "{}", a.text);
    }
    assert_serving(&w, "after-malformed");
}

#[test]
fn ten_megabyte_body_gets_413_before_it_is_sent() {
    let w = Worker::start(&[]);
    // The client declares 10 MiB, sends 64 KiB, then waits: the answer must
    // come without the rest.
    let mut s = serve::connect(w.ingress, Duration::from_secs(5));
    let head = "POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\nContent-Length: 10485760\r\n\r\n";
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&vec![b' '; 64 * 1024]).unwrap();
    let t = Instant::now();
    let (status, head, body) = serve::read_response(&mut s, Duration::from_secs(5));
    let took = t.elapsed();
    eprintln!("413 for a declared 10 MiB body after {took:?}");
    assert_eq!(status, 413, "{head}");
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    assert_eq!(v["reason"], "payload_too_large", "{head}");
    assert_eq!(v["status"], "rejected");
    assert!(took < PROMPT, "413 took {took:?}");

    // A client that does send all 10 MiB gets the same answer quickly, and
    // the worker does not hold the body in memory.
    let pid = w.child.id();
    let before = vm_kib(pid, "VmHWM:");
    let big = vec![b' '; 10 * 1024 * 1024];
    let t = Instant::now();
    let a = serve::request("POST", &w.url("/api/v1/assignments"), &[], Some(&big));
    let took = t.elapsed();
    let grew = vm_kib(pid, "VmHWM:").saturating_sub(before);
    eprintln!(
        "full 10 MiB upload answered {} after {took:?}; peak RSS grew {grew} KiB",
        a.status
    );
    assert_eq!(a.status, 413, "{}", a.text);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The unread body is drained through a small fixed buffer (vendored
    // tiny_http, patch 1); the bound catches a body that is actually stored.
    assert!(
        grew < 48 * 1024,
        "peak RSS grew {grew} KiB for a refused body"
    );
    drop(s);
    assert_serving(&w, "after-10mib");
}

/// Opens a connection that sends `head` and `body_part`, then stalls, and
/// waits until the worker's handler has seen it: the 413 of an oversized
/// body, or the `100 Continue` tiny_http sends when the handler starts to
/// read. Waiting per client also keeps clear of tiny_http's task-pool race
/// (see `connection_behind_stalled_ones_is_served`).
fn stalled_client(w: &Worker, head: &str, body_part: &[u8], expect: u16) -> TcpStream {
    let mut s = serve::connect(w.ingress, Duration::from_secs(5));
    s.write_all(head.as_bytes()).unwrap();
    if expect == 413 {
        s.write_all(body_part).unwrap();
    }
    let (status, head_seen, _) = serve::read_response(&mut s, Duration::from_secs(5));
    assert_eq!(status, expect, "{head_seen}");
    if expect == 100 {
        s.write_all(body_part).unwrap();
    }
    s
}

#[test]
fn stalled_uploads_do_not_pin_the_ingress() {
    let w = Worker::start(&[]);
    // More stalled clients than the ingress has handler threads (16).
    let oversized =
        "POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\nContent-Length: 10485760\r\n\r\n";
    let halfway = "POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\nContent-Length: 4000\r\nExpect: 100-continue\r\n\r\n";
    let mut stalled: Vec<TcpStream> = Vec::new();
    for i in 0..24 {
        stalled.push(if i % 2 == 0 {
            // Answered 413 at once; the unsent rest of the 10 MiB never comes.
            stalled_client(&w, oversized, &[b' '; 4096], 413)
        } else {
            // Within the limit, but the body stops halfway.
            stalled_client(&w, halfway, &[b' '; 1500], 100)
        });
    }
    assert_serving(&w, "with-24-stalled-uploads");
    // A chunked upload that stops mid-chunk, too.
    let chunked = "POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n";
    stalled.push(stalled_client(&w, chunked, b"400\r\n{\"version\"", 100));
    assert_serving(&w, "with-stalled-chunked");
    drop(stalled);
    assert_serving(&w, "after-stalled-closed");
}

/// tiny_http 0.12's task pool decides to reuse an idle thread from a count
/// that still includes a thread already woken for the previous connection;
/// in a burst, a new connection can then sit in its queue until some other
/// connection ends. With long-lived clients holding every thread, it waits.
#[test]
fn connection_behind_stalled_ones_is_served() {
    let w = Worker::start(&[]);
    let mut held = Vec::new();
    for i in 0..8 {
        let mut s = serve::connect(w.ingress, Duration::from_secs(5));
        let length = if i % 2 == 0 { 10_485_760 } else { 4000 };
        let head = format!(
            "POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\nContent-Length: {length}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&[b' '; 1500]).unwrap();
        if i % 2 == 0 {
            let (status, head, _) = serve::read_response(&mut s, Duration::from_secs(3));
            assert_eq!(status, 413, "client {i} was never served: {head:?}");
        }
        held.push(s);
    }
}

/// tiny_http 0.12 drains an unread body on drop with `vec![0; remaining]`,
/// sized by the client's declared Content-Length (upstream PR #290).
#[test]
fn huge_declared_content_length_does_not_crash_the_worker() {
    let mut w = Worker::start(&[]);
    for addr in [w.ingress, w.health] {
        let req = b"POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\nContent-Length: 999999999999999\r\nConnection: close\r\n\r\nabc";
        let (status, head, _) = serve::raw_exchange(addr, req, Duration::from_secs(5));
        assert!(status == 413 || status == 404, "{head}");
        let died = support::wait_for(Duration::from_millis(500), || w.child.try_wait().unwrap());
        assert!(
            died.is_none(),
            "the worker died ({died:?}): {:?}",
            w.stderr
                .lock()
                .unwrap()
                .iter()
                .rev()
                .find(|l| !l.starts_with(' '))
        );
    }
    assert_serving(&w, "after-huge-length");
}

#[test]
fn slow_client_does_not_block_other_requests() {
    let w = Worker::start(&[]);
    let body = assignment("slow-one", "debug.echo", json!({"slow": true})).to_string();
    let request = format!(
        "POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let dripping = Arc::new(AtomicBool::new(true));
    let addr = w.ingress;
    let flag = dripping.clone();
    let slow = std::thread::spawn(move || {
        let mut s = serve::connect(addr, Duration::from_secs(10));
        let bytes = request.as_bytes();
        // One byte per second for three seconds, then the rest at once.
        for b in &bytes[..3] {
            s.write_all(std::slice::from_ref(b)).unwrap();
            std::thread::sleep(Duration::from_secs(1));
        }
        flag.store(false, Ordering::Release);
        s.write_all(&bytes[3..]).unwrap();
        serve::read_response(&mut s, Duration::from_secs(5))
    });
    let mut rounds = 0;
    while dripping.load(Ordering::Acquire) {
        assert_serving(&w, &format!("while-dripping-{rounds}"));
        rounds += 1;
        // Pacing, not synchronisation: a few rounds per dripped byte suffice.
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        rounds >= 3,
        "only {rounds} rounds while the slow client dripped"
    );
    let (status, head, body) = slow.join().unwrap();
    assert_eq!(status, 202, "the slow client is still served: {head}");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["assignment_id"], "slow-one");
}

#[test]
fn many_idle_connections_do_not_stop_service() {
    let w = Worker::start(&[]);
    let pid = w.child.id();
    let base = serve::thread_count(pid);
    // Each connection costs a descriptor here and one in the worker.
    let n = 1000.min(serve::open_files_limit().saturating_sub(200));
    let mut idle = Vec::with_capacity(n);
    for i in 0..n {
        let (addr, partial) = if i % 10 == 0 {
            (w.health, &b"GET /_hea"[..])
        } else if i % 2 == 0 {
            (w.ingress, &b"POST /api/v1/assignments HTTP/1.1\r\nHost"[..])
        } else {
            (w.ingress, &b""[..])
        };
        let mut s = TcpStream::connect(addr).expect("connect");
        if !partial.is_empty() {
            s.write_all(partial).unwrap();
        }
        idle.push(s);
    }
    // Each port's poller holds them all: no thread per connection. Wait
    // until the worker holds them (one descriptor each).
    let held = support::wait_for(Duration::from_secs(10), || {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        std::thread::sleep(Duration::from_millis(50));
        (fds >= n).then_some(fds)
    });
    let threads = serve::thread_count(pid);
    eprintln!("{n} idle connections: worker threads {base} -> {threads}, descriptors {held:?}");
    assert!(held.is_some(), "the connections were not accepted");
    assert!(threads <= base + 2, "threads grew {base} -> {threads}");
    assert_serving(&w, &format!("with-{n}-idle"));
    // A long-running step and queued work are unaffected too.
    assert_eq!(
        serve::submit(&w, &sleep_step("idle-sleep", 50, "io")).status,
        202
    );
    assert_eq!(serve::result(&w, "idle-sleep", 3000).status, 200);
    drop(idle);
    assert_serving(&w, "after-idle-closed");
}

#[test]
fn unknown_routes_are_404_and_wrong_methods_405_with_allow() {
    let w = Worker::start(&[]);
    for path in [
        "/",
        "/api",
        "/api/v1/nope",
        "/api/v2/assignments",
        "/api/v1/results/",
    ] {
        for method in ["GET", "POST"] {
            let a = serve::request(method, &w.url(path), &[], None);
            assert_eq!(a.status, 404, "{method} {path}: {}", a.text);
            assert_eq!(a.json["error"], "not_found", "{method} {path}: {}", a.text);
        }
    }
    let cases = [
        ("GET", "/api/v1/assignments", "POST"),
        ("PUT", "/api/v1/assignments", "POST"),
        ("GET", "/api/v1/execute", "POST"),
        ("POST", "/api/v1/results/x", "GET, HEAD"),
        ("DELETE", "/api/v1/results/x", "GET, HEAD"),
        ("GET", "/api/v1/assignments/x/cancel", "POST"),
    ];
    for (method, path, allow) in cases {
        let a = serve::request(method, &w.url(path), &[], None);
        assert_eq!(a.status, 405, "{method} {path}: {}", a.text);
        assert_eq!(a.header("allow"), Some(allow), "{method} {path}");
        assert_eq!(a.json["error"], "method_not_allowed", "{method} {path}");
    }
    // HEAD of a result lookup works like GET.
    let a = serve::request("HEAD", &w.url("/api/v1/results/nobody"), &[], None);
    assert_eq!(a.status, 404);
}

/// Regression: a read timeout set on the listening socket also bounds
/// `accept()` on Linux, and tiny_http's accept thread stops for good on the
/// first error. A port idle for 10 s then refused every connection.
#[test]
fn ports_keep_accepting_after_being_idle() {
    let w = Worker::start(&[]);
    assert_serving(&w, "fresh");
    // The idleness is the condition under test, not a synchronisation.
    std::thread::sleep(Duration::from_millis(10_500));
    assert_serving(&w, "after-10.5s-idle");
}

/// Sends `head` and then `body` on one connection (from a thread, since the
/// worker stops reading), and returns every byte the worker answered until
/// it closed the connection.
fn exchange_all(addr: std::net::SocketAddr, head: String, body: Vec<u8>) -> String {
    use std::io::Read;
    let mut s = serve::connect(addr, Duration::from_secs(10));
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(head.as_bytes());
        let _ = writer.write_all(&body);
    });
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    drop(s);
    let _ = sender.join();
    String::from_utf8_lossy(&answer).into_owned()
}

/// The connection carried exactly one answer, the 413.
fn assert_only_413(answer: &str) {
    let head = &answer[..answer.len().min(400)];
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{head}");
    assert!(answer.starts_with("HTTP/1.1 413"), "{head}");
}

/// A request hidden in an undrained body must never be served: once the
/// worker gives up draining (16 MiB), the connection ends.
#[test]
fn a_request_inside_an_undrained_body_is_never_served() {
    let w = Worker::start(&[]);
    let smuggled = "GET /api/v1/results/smuggled HTTP/1.1\r\nHost: w\r\n\r\n";
    // Content-Length body: 24 MiB declared, 17 MiB of filler (past the 16 MiB
    // the worker drains), then the request.
    let mut body = vec![b'x'; 17 << 20];
    body.extend_from_slice(smuggled.as_bytes());
    let head = format!(
        "POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\nContent-Length: {}\r\n\r\n",
        24 << 20
    );
    assert_only_413(&exchange_all(w.ingress, head, body));

    // Chunked body over the limit by more than the drain allows (20 MiB), then a
    // pipelined request: the worker stops draining mid-body, so it must close
    // the connection rather than parse chunk data (or what follows) as requests.
    let mut chunked = Vec::new();
    for _ in 0..(20 << 20) / 4096 {
        chunked.extend_from_slice(b"1000\r\n");
        chunked.extend_from_slice(&[b'y'; 4096]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    chunked.extend_from_slice(smuggled.as_bytes());
    let head = "POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n"
        .to_owned();
    assert_only_413(&exchange_all(w.ingress, head, chunked));
    assert_serving(&w, "after-smuggling-attempts");
}

/// Framing the worker cannot trust ends the connection: an invalid or
/// conflicting Content-Length, a broken chunked body, an upgrade request.
/// Nothing after them on the same connection is ever served.
#[test]
fn ambiguous_framing_never_lets_a_second_request_through() {
    let w = Worker::start(&[]);
    let smuggled = "GET /api/v1/results/smuggled HTTP/1.1\r\nHost: w\r\n\r\n";
    let cases = [
        // Not plain digits: upstream tiny_http read this as "no body".
        format!(
            "POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\nContent-Length: 40, 40\r\n\r\n{smuggled}"
        ),
        format!(
            "POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\nContent-Length: +5\r\n\r\n{smuggled}"
        ),
        // Two different lengths.
        format!(
            "POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\nContent-Length: 0\r\nContent-Length: 50\r\n\r\n{smuggled}"
        ),
        // A chunk size that is not hex, followed by what looks like a valid end.
        format!(
            "POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n0\r\n\r\n{smuggled}"
        ),
        // Upgrade: tiny_http would hand over the raw socket as the body.
        format!(
            "POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n{smuggled}"
        ),
    ];
    for case in cases {
        let answer = exchange_all(w.ingress, case.clone(), Vec::new());
        let head = &answer[..answer.len().min(300)];
        assert!(
            answer.matches("HTTP/1.1 ").count() <= 1,
            "{case:?} → {head}"
        );
        assert!(!answer.contains("smuggled"), "{case:?} → {head}");
        assert!(!answer.starts_with("HTTP/1.1 2"), "{case:?} → {head}");
    }
    assert_serving(&w, "after-ambiguous-framing");
}

/// A request line or header without end is cut off at 8 KiB: one client
/// cannot make the worker buffer without bound.
#[test]
fn endless_header_lines_are_cut_off() {
    let w = Worker::start(&[]);
    let pid = w.child.id();
    let before = vm_kib(pid, "VmRSS:");
    let head = "GET /_health HTTP/1.1\r\nHost: w\r\nX-Endless: ".to_owned();
    let answer = exchange_all(w.health, head, vec![b'a'; 16 << 20]);
    assert!(
        !answer.contains("healthy"),
        "{}",
        &answer[..answer.len().min(300)]
    );
    let after = vm_kib(pid, "VmRSS:");
    assert!(
        after < before + 8 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let answer = exchange_all(
        w.health,
        format!("GET /_health HTTP/1.1\r\nHost: w\r\n{many}\r\n"),
        Vec::new(),
    );
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "{}",
        &answer[..answer.len().min(300)]
    );
    assert_serving(&w, "after-endless-headers");
}
