//! `http.request` against an upstream that writes raw bytes (SPEC §12.15):
//! response framings tiny_http does not produce (chunked, close-delimited,
//! a `100 Continue`, bytes past the framed response), each followed by a
//! second step on the same io thread, so connection reuse is checked too.
mod support;

use serde_json::{Value, json};
use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(20);

/// What the raw upstream does with one request.
struct Answer {
    /// Written before the request body is read (a `100 Continue`).
    interim: Option<&'static [u8]>,
    /// Written after the request (head and body) was read.
    bytes: Vec<u8>,
    /// Close the connection after writing.
    close: bool,
}

fn answer(bytes: &[u8]) -> Answer {
    Answer {
        interim: None,
        bytes: bytes.to_vec(),
        close: false,
    }
}

/// One request as the upstream read it.
#[derive(Debug, Clone)]
struct Got {
    head: String,
    body: Vec<u8>,
}

/// A loopback upstream answering the n-th request (over all connections)
/// with `script(n)`; counts connections and keeps what it read.
struct RawUpstream {
    addr: String,
    connections: Arc<AtomicUsize>,
    got: Arc<Mutex<Vec<Got>>>,
}

impl RawUpstream {
    fn start(script: impl Fn(usize) -> Answer + Send + Sync + 'static) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let connections = Arc::new(AtomicUsize::new(0));
        let got = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(script);
        let (c, g) = (connections.clone(), got.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                c.fetch_add(1, Ordering::SeqCst);
                let (g, script) = (g.clone(), script.clone());
                std::thread::spawn(move || serve(stream, &g, &*script));
            }
        });
        RawUpstream {
            addr,
            connections,
            got,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().expect("lock").clone()
    }
}

fn serve(stream: TcpStream, got: &Mutex<Vec<Got>>, script: &(dyn Fn(usize) -> Answer + Sync)) {
    let _ = stream.set_read_timeout(Some(LIMIT));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let Some((head, length)) = support::read_head_and_length(&mut reader) else {
            return;
        };
        let n = {
            let mut g = got.lock().expect("lock");
            g.push(Got {
                head: head.clone(),
                body: Vec::new(),
            });
            g.len() - 1
        };
        let a = script(n);
        if let Some(interim) = a.interim {
            let _ = writer.write_all(interim);
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        got.lock().expect("lock")[n].body = body;
        if writer.write_all(&a.bytes).is_err() || a.close {
            return;
        }
    }
}

fn get(id: &str, url: &str) -> Value {
    support::assignment(id, "http.request", json!({ "url": url }))
}

/// Runs `steps` on one io thread, in order.
fn run(steps: &[Value]) -> Vec<Value> {
    support::run_in_order(steps, &[("WORKER_IO_POOL_SIZE", "1")], LIMIT)
}

fn assert_ok(r: &Value, body: &str) {
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["attempts"], 1, "{r}");
    assert_eq!(r["outputs"]["body"], body, "{r}");
}

/// Two GETs in a row on one io thread: each succeeds at once with its
/// body, over `connections` connections in all.
fn two_gets(up: &RawUpstream, bodies: [&str; 2], connections: usize) {
    let results = run(&[get("get-1", &up.url("/a")), get("get-2", &up.url("/b"))]);
    assert_ok(&results[0], bodies[0]);
    assert_ok(&results[1], bodies[1]);
    assert_eq!(up.connections.load(Ordering::SeqCst), connections);
}

#[test]
fn a_chunked_body_is_joined_and_the_connection_kept() {
    let up = RawUpstream::start(|_| {
        answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
    });
    two_gets(&up, ["abcdefg", "abcdefg"], 1);
}

#[test]
fn a_body_that_ends_when_the_upstream_closes_is_whole_and_not_reused() {
    let up = RawUpstream::start(|_| Answer {
        close: true,
        ..answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
    });
    two_gets(&up, ["until the end", "until the end"], 2);
}

#[test]
fn bytes_past_the_framed_response_close_the_connection() {
    // The first answer says 2 bytes and sends 2 more: they must not be
    // read as the start of the next response.
    let up = RawUpstream::start(|n| match n {
        0 => answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokXX"),
        _ => answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"),
    });
    two_gets(&up, ["ok", "next"], 2);
}

#[test]
fn a_100_continue_lets_the_body_go_and_the_final_answer_counts() {
    let up = RawUpstream::start(|_| Answer {
        interim: Some(b"HTTP/1.1 100 Continue\r\n\r\n"),
        ..answer(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone")
    });
    let step = support::assignment(
        "e-1",
        "http.request",
        json!({"url": up.url("/up"), "method": "POST", "body": "payload",
               "headers": {"Expect": "100-continue"}}),
    );
    let results = run(&[step, get("e-2", &up.url("/b"))]);
    assert_ok(&results[0], "done");
    assert_eq!(results[0]["outputs"]["status_code"], 201);
    assert_ok(&results[1], "done");
    let got = up.got();
    assert_eq!(got[0].body, b"payload");
    assert!(
        got[0]
            .head
            .to_ascii_lowercase()
            .contains("expect: 100-continue")
    );
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn a_response_head_past_the_limit_fails_the_step_without_hanging() {
    // 80 KiB of headers, past ureq's 64 KiB response-head limit.
    let up = RawUpstream::start(|_| {
        let mut bytes = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..40 {
            bytes.extend_from_slice(
                format!("x-filler-{i:02}: {}\r\n", "v".repeat(2_000)).as_bytes(),
            );
        }
        bytes.extend_from_slice(b"Content-Length: 2\r\n\r\nok");
        answer(&bytes)
    });
    let results = run(&[get("big-1", &up.url("/a"))]);
    assert_eq!(results[0]["status"], "error", "{}", results[0]);
    let message = results[0]["error_message"].as_str().unwrap_or_default();
    assert!(message.contains("header"), "{}", results[0]);
}

#[test]
fn the_request_head_is_the_one_ureq_s_agent_sent() {
    // Pinned byte for byte (SPEC §12.15: the block builds its requests
    // itself; the wire must not drift): framing, the default headers, then
    // Host (with the port: not the scheme's default), then the payload's
    // (in name order, as the payload's object keeps them).
    let up = RawUpstream::start(|_| answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"));
    let post = support::assignment(
        "h-2",
        "http.request",
        json!({"url": up.url("/in?q=1"), "method": "POST", "body": "abc",
               "headers": {"X-Trace": "t-1", "Accept": "text/plain"}}),
    );
    let results = run(&[get("h-1", &up.url("/a")), post]);
    assert_ok(&results[0], "ok");
    assert_ok(&results[1], "ok");
    let got = up.got();
    let ua = format!("user-agent: caf-worker/{}\r\n", env!("CARGO_PKG_VERSION"));
    let host = format!("host: {}\r\n", up.addr);
    assert_eq!(
        got[0].head,
        format!("GET /a HTTP/1.1\r\ncontent-length: 0\r\n{ua}accept: */*\r\n{host}\r\n")
    );
    assert_eq!(
        got[1].head,
        format!(
            "POST /in?q=1 HTTP/1.1\r\ncontent-length: 3\r\n{ua}{host}accept: text/plain\r\nx-trace: t-1\r\n\r\n"
        )
    );
    assert_eq!(got[1].body, b"abc");
}
