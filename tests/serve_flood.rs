//! `caf-worker serve` against clients that try to hold its ports: pipelining
//! without reading, slow readers of large results, slowloris heads and
//! trickled bodies, floods of connections past `WORKER_MAX_CONNECTIONS`, and
//! SIGTERM while such a client is connected (issue 12, findings 1 and 2).
mod support;

use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use support::serve;
use support::{Worker, assignment};

/// These tests load both cores on purpose; run one at a time so they do
/// not measure each other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a well-behaved client's request may take while the attack runs
/// (generous for two busy cores).
const PROMPT: Duration = Duration::from_millis(1500);

/// One request on a fresh connection, bounded by `limit`: the status (0 when
/// no answer came in time) and how long it took.
fn timed(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    limit: Duration,
) -> (u16, Duration) {
    let t = Instant::now();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, limit) else {
        return (0, t.elapsed());
    };
    let _ = s.set_write_timeout(Some(limit));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, t.elapsed());
    }
    let (status, _, _) = serve::read_response(&mut s, limit.saturating_sub(t.elapsed()));
    (status, t.elapsed())
}

/// `/livez`, a submission and its lookup all answer within [`PROMPT`].
fn assert_prompt(w: &Worker, tag: &str) {
    let (status, livez) = timed(w.health, "GET", "/livez", "", PROMPT * 2);
    assert_eq!(status, 200, "{tag}: /livez after {livez:?}");
    let id = format!("ok-{tag}");
    let body = assignment(&id, "debug.echo", json!({})).to_string();
    let (status, submit) = timed(w.ingress, "POST", "/api/v1/assignments", &body, PROMPT * 2);
    assert_eq!(status, 202, "{tag}: submission after {submit:?}");
    let path = format!("/api/v1/results/{id}?wait_ms=1000");
    let (status, lookup) = timed(w.ingress, "GET", &path, "", PROMPT * 2);
    assert_eq!(status, 200, "{tag}: lookup after {lookup:?}");
    eprintln!("{tag}: livez {livez:?}, submit {submit:?}, lookup {lookup:?}");
    for (what, took) in [("livez", livez), ("submit", submit), ("lookup", lookup)] {
        assert!(took < PROMPT, "{tag}: {what} took {took:?}");
    }
}

/// A client that pipelines `request` up to `max` times on one connection and
/// never reads an answer. Returns once the worker stops taking its requests
/// (its socket buffers are full) or all were sent; the connection stays open
/// until the returned guard is dropped.
struct Pipeliner {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<usize>>,
}

impl Pipeliner {
    fn start(addr: SocketAddr, request: &str, max: usize) -> (Pipeliner, usize) {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let batch = request.repeat(500).into_bytes();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            // A small receive window: the answers cannot hide in the kernel's
            // buffers (loopback autotuning would take megabytes).
            let mut s = small_window_connect(addr);
            s.set_write_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut sent = 0;
            let mut announced = false;
            while sent < max && !flag.load(Ordering::Acquire) {
                match s.write_all(&batch) {
                    Ok(()) => sent += 500,
                    Err(_) => {
                        // The worker stopped reading: the attack is in place.
                        if !announced {
                            let _ = tx.send(sent);
                            announced = true;
                        }
                    }
                }
            }
            if !announced {
                let _ = tx.send(sent);
            }
            // Hold the connection, never reading, until told to go.
            while !flag.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(s);
            sent
        });
        let sent = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("pipeliner started");
        (
            Pipeliner {
                stop,
                thread: Some(thread),
            },
            sent,
        )
    }
}

impl Drop for Pipeliner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Finding 1: a connection pipelining requests without reading the answers
/// held every handler thread of the port (each blocked writing to it), so
/// other clients timed out. Now it holds at most one handler, briefly.
#[test]
fn a_pipelining_non_reader_blocks_only_itself() {
    let _serial = serial();
    let w = Worker::start(&[]);
    let (ingress_attack, sent) =
        Pipeliner::start(w.ingress, "GET /nope HTTP/1.1\r\nHost: w\r\n\r\n", 100_000);
    eprintln!("ingress pipeliner blocked after {sent} requests");
    let (health_attack, sent) =
        Pipeliner::start(w.health, "GET /livez HTTP/1.1\r\nHost: w\r\n\r\n", 20_000);
    eprintln!("health pipeliner blocked after {sent} requests");
    for round in 0..5 {
        assert_prompt(&w, &format!("pipelined-{round}"));
    }
    drop((ingress_attack, health_attack));
    assert_prompt(&w, "after-pipelining");
}

/// Finding 1: with a pipelining non-reader connected, SIGTERM with a 1 s
/// grace hung for good (the port's threads never finished their writes).
#[test]
fn sigterm_with_a_pipelining_non_reader_exits_within_grace() {
    let _serial = serial();
    let mut w = Worker::start(&[("WORKER_SHUTDOWN_GRACE_MS", "1000")]);
    let (attack, sent) =
        Pipeliner::start(w.ingress, "GET /nope HTTP/1.1\r\nHost: w\r\n\r\n", 100_000);
    let (health_attack, _) =
        Pipeliner::start(w.health, "GET /livez HTTP/1.1\r\nHost: w\r\n\r\n", 20_000);
    // Let the attack take hold: before the fix, handler threads end up
    // blocked writing to the pipeliners and a lookup stops answering. Give
    // it up to 5 s (a bound, not a synchronisation: after the fix the
    // lookups keep answering and the loop just ends).
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        let (status, _) = timed(w.ingress, "GET", "/api/v1/results/x", "", PROMPT);
        if status == 0 {
            eprintln!("the ingress stopped answering after {:?}", t.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("pipeliner blocked after {sent} requests; sending SIGTERM");
    let t = Instant::now();
    w.sigterm();
    let code = w.wait_exit(Duration::from_secs(6));
    eprintln!("exited {code} after {:?}", t.elapsed());
    assert_eq!(code, 0);
    drop((attack, health_attack));
}

/// Finding 1: clients reading a large result slowly (here: not at all) each
/// held a handler thread for as long as they liked; with more of them than
/// the ingress has threads, every submission timed out.
#[test]
fn slow_readers_of_a_large_result_do_not_stop_submissions() {
    let _serial = serial();
    let w = Worker::start(&[("WORKER_MAX_BODY_BYTES", "4194304")]);
    big_result(&w, "big");
    // More readers than the ingress has handler threads (16), each reading
    // 2 KiB every 2 s through a 4 KiB window: slow, but never stalled long
    // enough for a per-write timeout to free the thread writing to it.
    let mut readers = Vec::new();
    for _ in 0..20 {
        readers.push(small_window_get(w.ingress, "/api/v1/results/big"));
    }
    let reading = Arc::new(AtomicBool::new(true));
    let flag = reading.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let trickle = std::thread::spawn(move || {
        let mut got = vec![0usize; readers.len()];
        let t = Instant::now();
        while flag.load(Ordering::Acquire) && t.elapsed() < Duration::from_secs(30) {
            for (s, got) in readers.iter_mut().zip(got.iter_mut()) {
                let mut b = [0u8; 2048];
                let _ = s.set_read_timeout(Some(Duration::from_millis(10)));
                if let Ok(n) = s.read(&mut b) {
                    *got += n;
                }
            }
            let started = got.iter().filter(|n| **n > 0).count();
            let _ = tx.send(started);
            std::thread::sleep(Duration::from_millis(2000));
        }
    });
    // Wait until the worker has started answering (before the fix, only as
    // many readers as the ingress has threads ever got an answer).
    let mut started = 0;
    let t = Instant::now();
    while started < 20 && t.elapsed() < Duration::from_secs(15) {
        started = rx.recv_timeout(Duration::from_secs(5)).unwrap_or(started);
    }
    eprintln!(
        "{started} of 20 slow readers got their answer started after {:?}",
        t.elapsed()
    );
    for round in 0..3 {
        assert_prompt(&w, &format!("slow-readers-{round}"));
    }
    assert_eq!(started, 20);
    reading.store(false, Ordering::Release);
    let _ = trickle.join();
}

/// A connection whose receive buffer is 4 KiB (set before connecting, so
/// the advertised window stays small).
fn small_window_connect(addr: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
    s.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    s.connect(&addr.into()).expect("connect");
    s.into()
}

/// Runs `id`, a debug.echo whose result is over 2 MiB (the worker needs
/// `WORKER_MAX_BODY_BYTES` of 4 MiB).
fn big_result(w: &Worker, id: &str) {
    let a = assignment(id, "debug.echo", json!({ "blob": "x".repeat(2 << 20) }));
    assert_eq!(serve::submit(w, &a).status, 202);
    assert_eq!(serve::result(w, id, 5000).status, 200);
}

/// Sends `GET path` on a [`small_window_connect`] connection.
fn small_window_get(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = small_window_connect(addr);
    let req = format!("GET {path} HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s
}

/// The worker's open descriptors (Linux `/proc`).
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Finding 2: thousands of connections trickling request heads (one header
/// line at a time) cost one thread and two descriptors each. Now threads
/// stay flat, connections past `WORKER_MAX_CONNECTIONS` are closed at once,
/// and submissions and probes still answer.
#[test]
fn slowloris_connections_neither_grow_threads_nor_pass_the_cap() {
    let _serial = serial();
    let cap = 300;
    let w = Worker::start(&[("WORKER_MAX_CONNECTIONS", &cap.to_string())]);
    let pid = w.child.id();
    assert_prompt(&w, "before");
    let (threads_before, fds_before) = (serve::thread_count(pid), fd_count(pid));
    let n = 2000.min(serve::open_files_limit().saturating_sub(300) / 2);
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let addr = if i % 4 == 0 { w.health } else { w.ingress };
        let Ok(mut s) = TcpStream::connect(addr) else {
            continue;
        };
        let _ = s.set_nonblocking(true);
        let _ = s.write_all(b"POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\n");
        conns.push(s);
    }
    // Two more header lines, a second apart, on every connection.
    for line in 0..2 {
        std::thread::sleep(Duration::from_millis(1000));
        for s in &mut conns {
            let _ = s.write_all(format!("X-Slow-{line}: 1\r\n").as_bytes());
        }
    }
    let (threads, fds) = (serve::thread_count(pid), fd_count(pid));
    eprintln!(
        "{n} slow connections: threads {threads_before} -> {threads}, descriptors {fds_before} -> {fds}"
    );
    assert_prompt(&w, "with-slowloris");
    // Connections the worker closed read EOF (or a reset); the rest would block.
    let mut closed = 0;
    for s in &mut conns {
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => closed += 1,
            _ => {}
        }
    }
    eprintln!("{closed} of {n} connections were closed by the worker");
    assert!(
        threads <= threads_before + 2,
        "threads grew {threads_before} -> {threads}"
    );
    // Ingress and health each hold at most `cap` (+ the health reserve);
    // idle heads make room for new connections, so submissions still answer.
    assert!(
        fds <= fds_before + 2 * cap + 32,
        "descriptors grew {fds_before} -> {fds}"
    );
    assert!(
        closed >= n - 2 * cap - 32,
        "only {closed} of {n} were refused"
    );
}

/// Finding 2: one client can trickle a request head (a header line a
/// second) or a body (a byte a second) for ever without tripping a per-read
/// timeout. A whole head must arrive within 10 s and a body at a minimum
/// rate (after a 10 s grace), else the connection is closed.
#[test]
fn head_deadline_and_minimum_body_rate_close_tricklers() {
    let _serial = serial();
    let w = Worker::start(&[]);
    let trickle = |addr: SocketAddr, head: &'static str, each: &'static [u8]| {
        std::thread::spawn(move || {
            let t = Instant::now();
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_millis(1000)))
                .unwrap();
            s.write_all(head.as_bytes()).unwrap();
            // Bounded: the test fails if the worker still listens after 20 s.
            while t.elapsed() < Duration::from_secs(20) {
                let mut b = [0u8; 256];
                match s.read(&mut b) {
                    Ok(0) => return Some(t.elapsed()),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Some(t.elapsed()),
                }
                if s.write_all(each).is_err() {
                    return Some(t.elapsed());
                }
            }
            None
        })
    };
    let head = trickle(
        w.ingress,
        "POST /api/v1/assignments HTTP/1.1\r\n",
        b"X-A: b\r\n",
    );
    let body = trickle(
        w.ingress,
        "POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\nContent-Length: 100000\r\n\r\n",
        b" ",
    );
    let health = trickle(w.health, "GET /livez HTTP/1.1\r\n", b"X-A: b\r\n");
    for (what, t) in [("head", head), ("body", body), ("health head", health)] {
        let closed = t.join().unwrap();
        eprintln!("{what} trickler closed after {closed:?}");
        let closed = closed.unwrap_or_else(|| panic!("{what} trickler still open after 20 s"));
        assert!(
            closed >= Duration::from_secs(9) && closed < Duration::from_secs(15),
            "{what} trickler closed after {closed:?}"
        );
    }
    assert_prompt(&w, "after-tricklers");
}

/// Finding 2: past `WORKER_MAX_CONNECTIONS` busy connections (here: bodies
/// in progress), the ingress closes new connections at once, while the
/// health port keeps a small reserve, so probes still answer. Connections
/// that wait for a request head are closed first to make room.
#[test]
fn connection_cap_refuses_ingress_but_probes_still_answer() {
    let _serial = serial();
    let cap = 40;
    let w = Worker::start(&[("WORKER_MAX_CONNECTIONS", &cap.to_string())]);
    let busy = b"POST /x HTTP/1.1\r\nHost: w\r\nContent-Length: 1000\r\n\r\n{";
    let open = |addr: SocketAddr, bytes: &[u8]| {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(bytes).unwrap();
        s
    };
    // The ingress: full, one connection still waiting for its head.
    let mut held: Vec<TcpStream> = (1..cap).map(|_| open(w.ingress, busy)).collect();
    let mut idle = open(w.ingress, b"GET /api");
    // The waiting connection makes room: a new one replaces it.
    let (status, took) = timed(w.ingress, "GET", "/api/v1/results/x", "", PROMPT);
    eprintln!("ingress full with one idle head: {status} after {took:?}");
    assert_eq!(status, 404);
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        idle.read(&mut [0u8; 64]).ok(),
        Some(0),
        "the idle head was not closed"
    );
    // Full of unfinished bodies, the ingress refuses the next connection at once.
    held.push(open(w.ingress, busy));
    let refused = support::wait_for(Duration::from_secs(5), || {
        let (status, took) = timed(w.ingress, "GET", "/api/v1/results/x", "", PROMPT);
        (status == 0).then_some(took)
    });
    eprintln!("ingress past the cap refused after {refused:?}");
    let took = refused.expect("a connection past the cap was served");
    assert!(took < PROMPT, "refusal took {took:?}");
    // The health port, as full, still answers probes from its reserve.
    held.extend((0..cap).map(|_| open(w.health, busy)));
    for round in 0..5 {
        let (status, took) = timed(w.health, "GET", "/livez", "", PROMPT);
        eprintln!("probe {round} on a full health port: {status} after {took:?}");
        assert_eq!(status, 200);
    }
    drop(held);
    assert_prompt(&w, "after-cap");
}

/// Answers waiting for slow readers are held by the port's poller, so their
/// memory is bounded: at most 256 KiB per allowed connection in all
/// (`WORKER_MAX_CONNECTIONS` = 8 here: 2 MiB), plus a small kernel send
/// buffer each. Four non-readers of a 2 MiB answer: all but one or two are
/// closed at once (the largest unsent first); the rest are served.
#[test]
fn answers_waiting_for_slow_readers_have_a_memory_bound() {
    let _serial = serial();
    let w = Worker::start(&[
        ("WORKER_MAX_CONNECTIONS", "8"),
        ("WORKER_MAX_BODY_BYTES", "4194304"),
    ]);
    big_result(&w, "mib");
    let mut readers = Vec::new();
    for _ in 0..4 {
        let mut s = small_window_get(w.ingress, "/api/v1/results/mib");
        // Each answer starts before the next request: the order is known.
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut first = [0u8; 12];
        s.read_exact(&mut first).expect("answer starts");
        readers.push((s, 12usize));
    }
    // Now read everything, fast: a closed connection ends early.
    let (mut complete, mut cut) = (0, 0);
    for (s, got) in &mut readers {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        *got += rest.len();
        if *got > 2 << 20 {
            complete += 1;
        } else {
            cut += 1;
        }
    }
    let got: Vec<usize> = readers.iter().map(|(_, n)| *n).collect();
    eprintln!("bytes per reader: {got:?}");
    assert!(cut >= 2, "only {cut} answers were cut: {got:?}");
    assert!(complete >= 1, "no answer was delivered: {got:?}");
    assert_prompt(&w, "after-pending-bound");
}
