//! Shared helpers for the black-box tests: the real binary with a scrubbed
//! environment and port-0 listeners, a scripted tiny_http upstream, per-test
//! temp dirs, and the shared result checker.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod nats;

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_caf-worker")
}

/// The repo root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared/vectors/<name>` when CI laid shared/ beside the checkout,
/// else our copy under `tests/vectors/`.
pub fn vector_file(name: &str) -> PathBuf {
    let shared = root().join("../shared/vectors").join(name);
    if shared.exists() {
        shared
    } else {
        root().join("tests/vectors").join(name)
    }
}

/// A command for the binary with only PATH and the given variables set.
pub fn command(env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(bin());
    c.env_clear();
    if let Ok(p) = std::env::var("PATH") {
        c.env("PATH", p);
    }
    c.env("WORKER_ID", "test-worker");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// Output of a finished `run`/`validate`.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

impl Output {
    /// stdout lines parsed as JSON.
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// Results (not Ack lines) keyed by assignment_id.
    pub fn results(&self) -> std::collections::HashMap<String, Value> {
        self.json_lines()
            .into_iter()
            .filter(|v| v.get("acknowledged_at").is_none())
            .map(|v| (v["assignment_id"].as_str().unwrap_or("").to_owned(), v))
            .collect()
    }
}

/// Runs `caf-worker <args>` with `stdin` as input; fails the test after `limit`.
pub fn run_cmd(args: &[&str], env: &[(&str, &str)], stdin: &str, limit: Duration) -> Output {
    let mut child = command(env)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn caf-worker");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_owned();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(data.as_bytes());
    });
    let out = wait_output(child, limit);
    let _ = writer.join();
    out
}

fn wait_output(mut child: Child, limit: Duration) -> Output {
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let err_t = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("caf-worker did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        code: status.code().unwrap_or(-1),
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// `caf-worker run -` over JSON Lines.
pub fn run_lines(lines: &[Value], env: &[(&str, &str)], limit: Duration) -> Output {
    let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
    run_cmd(&["run", "-"], env, &input, limit)
}

/// Runs `steps` through `run -` with `env` and returns their results in input
/// order, asserting none was rejected and the shared checker accepts them
/// (with one pool thread, steps of one pool run in input order).
pub fn run_in_order(steps: &[Value], env: &[(&str, &str)], limit: Duration) -> Vec<Value> {
    let out = run_lines(steps, env, limit);
    let results = out.json_lines();
    assert_eq!(
        results.len(),
        steps.len(),
        "stdout {:?} stderr {:?}",
        out.stdout,
        out.stderr
    );
    for (r, s) in results.iter().zip(steps) {
        assert!(r.get("acknowledged_at").is_none(), "rejected: {r}");
        assert_eq!(
            r["assignment_id"], s["assignment_id"],
            "results out of order"
        );
    }
    check_results(&out.stdout);
    results
}

/// A minimal valid assignment of `job_type` with `payload`.
pub fn assignment(id: &str, job_type: &str, payload: Value) -> Value {
    serde_json::json!({
        "version": "1", "assignment_id": id, "request_id": format!("req-{id}"),
        "tenant_id": "acme", "job": {"type": job_type, "payload": payload}
    })
}

/// A `debug.fail` step failing its first attempt with a retryable error,
/// then retrying once after `backoff_ms` (CP2 advanced retry; CP1 waits 100 ms).
pub fn fail_once(id: &str, backoff_ms: u64) -> Value {
    let mut a = assignment(
        id,
        "debug.fail",
        serde_json::json!({"error_code": "NETWORK_ERROR", "fail_attempts": 1}),
    );
    a["options"] = serde_json::json!({
        "deadline_ms": 600_000,
        "retry": {"max_attempts": 2, "backoff_ms": backoff_ms, "max_backoff_ms": backoff_ms},
    });
    a
}

/// Runs the shared checker (`check_result.py --strict-ids`) over JSON lines.
pub fn check_results(lines: &[String]) {
    let script = vector_file("check_result.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg("--strict-ids")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is needed for the shared result checker");
    let mut stdin = child.stdin.take().expect("stdin");
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::thread::spawn(move || {
        let _ = stdin.write_all(text.as_bytes());
    });
    let out = child.wait_with_output().expect("checker");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "check_result.py failed:\n{report}");
}

/// A temp dir removed on drop.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("caf-test-")
        .tempdir()
        .expect("tempdir")
}

/// Polls `f` until it returns `Some` or `limit` passes.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------- upstream

/// What the scripted upstream answers: status, headers, body, delay before answering.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub delay: Duration,
    /// Close the connection without answering (after `delay`).
    pub drop_connection: bool,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: Vec::new(),
            delay: Duration::ZERO,
            drop_connection: false,
        }
    }
    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Reply {
        self.body = b.into();
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
    pub fn drop_connection() -> Reply {
        Reply {
            drop_connection: true,
            ..Reply::status(0)
        }
    }
}

/// A request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

type Script = dyn Fn(usize, &Seen) -> Reply + Send + Sync;

/// A tiny_http server on 127.0.0.1:0 answering by script (request index from 0).
pub struct Upstream {
    pub addr: SocketAddr,
    server: Arc<tiny_http::Server>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    count: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Upstream {
    pub fn start(script: impl Fn(usize, &Seen) -> Reply + Send + Sync + 'static) -> Upstream {
        Upstream::with_threads(8, script)
    }

    pub fn with_threads(
        n: usize,
        script: impl Fn(usize, &Seen) -> Reply + Send + Sync + 'static,
    ) -> Upstream {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("bind upstream"));
        let addr = server.server_addr().to_ip().expect("ip addr");
        let script: Arc<Script> = Arc::new(script);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let threads = (0..n)
            .map(|_| {
                let (server, script, seen, count) =
                    (server.clone(), script.clone(), seen.clone(), count.clone());
                std::thread::spawn(move || {
                    for mut rq in server.incoming_requests() {
                        let mut body = Vec::new();
                        let _ = std::io::Read::read_to_end(rq.as_reader(), &mut body);
                        let s = Seen {
                            at: Instant::now(),
                            method: rq.method().to_string(),
                            url: rq.url().to_owned(),
                            headers: rq
                                .headers()
                                .iter()
                                .map(|h| (h.field.to_string(), h.value.to_string()))
                                .collect(),
                            body,
                        };
                        let n = count.fetch_add(1, Ordering::SeqCst);
                        seen.lock().unwrap().push(s.clone());
                        let reply = script(n, &s);
                        std::thread::sleep(reply.delay);
                        // tiny_http keeps the socket's read half open, so this server
                        // cannot cut a connection: use `HttpStub` for that.
                        assert!(
                            !reply.drop_connection,
                            "Upstream cannot drop connections; use HttpStub"
                        );
                        let mut resp = tiny_http::Response::from_data(reply.body)
                            .with_status_code(reply.status);
                        for (k, v) in &reply.headers {
                            resp.add_header(
                                tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap(),
                            );
                        }
                        let _ = rq.respond(resp);
                    }
                })
            })
            .collect();
        Upstream {
            addr,
            server,
            seen,
            count,
            threads,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn requests(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for _ in &self.threads {
            self.server.unblock();
        }
    }
}

// ---------------------------------------------------------------- serve

/// A running `caf-worker serve` on port-0 addresses.
pub struct Worker {
    pub child: Child,
    /// The ingress address (127.0.0.1:0 when `WORKER_INGRESS_ADDR=off`).
    pub ingress: SocketAddr,
    pub health: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub stderr: Arc<Mutex<Vec<String>>>,
    pub dir: tempfile::TempDir,
    /// The thread collecting `stderr` (ends when the process closes it).
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    /// Starts `serve` with `env` (ports default to 127.0.0.1:0, FS root in a temp dir)
    /// and waits for its "listening" log line.
    pub fn start(env: &[(&str, &str)]) -> Worker {
        let dir = temp_dir();
        let fs_root = dir.path().join("data");
        let fs_root = fs_root.to_str().unwrap().to_owned();
        let sql_root = dir.path().join("sql");
        let sql_root = sql_root.to_str().unwrap().to_owned();
        let mut all: Vec<(&str, &str)> = vec![
            ("WORKER_INGRESS_ADDR", "127.0.0.1:0"),
            ("WORKER_HEALTH_ADDR", "127.0.0.1:0"),
            ("WORKER_METRICS_ADDR", "127.0.0.1:0"),
            ("WORKER_FS_ROOT", &fs_root),
            ("WORKER_SQL_ROOT", &sql_root),
        ];
        all.extend_from_slice(env);
        let mut child = command(&all)
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let listening = serde_json::from_str::<Value>(&line)
                    .ok()
                    .filter(|v| {
                        v["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("listening"))
                    })
                    .map(|v| v["context"].clone());
                // Stored before `start` returns: every line up to and
                // including "listening" is in `stderr` when a test begins.
                sink.lock().unwrap().push(line);
                if let Some(ctx) = listening {
                    let _ = tx.send(ctx);
                }
            }
        });
        let ctx = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(c) => c,
            Err(_) => {
                let _ = child.kill();
                panic!("serve did not start: {:?}", lines.lock().unwrap());
            }
        };
        let addr = |k: &str| ctx[k].as_str().and_then(|s| s.parse().ok());
        Worker {
            // WORKER_INGRESS_ADDR=off logs "off": no address to reach.
            ingress: addr("ingress").unwrap_or_else(|| {
                assert_eq!(ctx["ingress"], "off", "ingress addr");
                SocketAddr::from(([127, 0, 0, 1], 0))
            }),
            health: addr("health").expect("health addr"),
            metrics: addr("metrics"),
            child,
            stderr: lines,
            dir,
            reader: Some(reader),
        }
    }

    /// What a failing test needs to know about the process: whether it is
    /// still running (and which threads it has: fewer `caf-http-poll-…`
    /// than ports means a port's poller ended) or how it ended (a signal
    /// such as SIGKILL or SIGABRT, or an exit code), and the last lines of
    /// its stderr.
    fn post_mortem(&mut self) -> String {
        let pid = self.child.id();
        let state = match self.child.try_wait() {
            Ok(Some(status)) => {
                self.drain_stderr();
                format!("serve (pid {pid}) had exited: {status}")
            }
            Ok(None) => {
                // Thread names as the kernel keeps them (15 bytes), counted.
                let mut threads = std::collections::BTreeMap::<String, usize>::new();
                for task in std::fs::read_dir(format!("/proc/{pid}/task"))
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    if let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) {
                        *threads.entry(comm.trim().to_owned()).or_default() += 1;
                    }
                }
                format!("serve (pid {pid}) is still running; threads: {threads:?}")
            }
            Err(e) => format!("serve (pid {pid}): cannot tell its state: {e}"),
        };
        let lines = self.stderr.lock().map(|l| l.clone()).unwrap_or_default();
        let tail = &lines[lines.len().saturating_sub(40)..];
        format!(
            "{state}; last {} of {} stderr lines:\n{}",
            tail.len(),
            lines.len(),
            tail.join("\n")
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.ingress, path)
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits for a stderr line containing every one of `needles` and returns
    /// it. Lines reach `stderr` through a reader thread, so a line the
    /// worker has written may land a moment after what it wrote next (a
    /// metric, a reply): poll, never look once.
    pub fn log_line(&self, needles: &[&str], limit: Duration) -> String {
        wait_for(limit, || {
            let logs = self.stderr.lock().unwrap();
            logs.iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .cloned()
        })
        .unwrap_or_else(|| {
            panic!(
                "no log line with {needles:?}: {:?}",
                self.stderr.lock().unwrap()
            )
        })
    }

    /// Lets the reader thread take the last lines once the process has
    /// exited (its end of the pipe is closed, so the reader ends soon).
    fn drain_stderr(&mut self) {
        if let Some(r) = self.reader.take() {
            let until = Instant::now() + Duration::from_secs(2);
            while !r.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Waits for exit; returns the exit code. Every line the process wrote
    /// is in `stderr` afterwards.
    pub fn wait_exit(&mut self, limit: Duration) -> i32 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                self.drain_stderr();
                return s.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("serve did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn fs_root(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A test failing mid-way (e.g. a refused connection) says why the
        // worker stopped answering.
        if std::thread::panicking() {
            eprintln!("{}", self.post_mortem());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client for tests: statuses are answers, not errors.
pub fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(70)))
        .build()
        .into()
}

/// (status, headers, body) of a request.
pub fn http(method: &str, url: &str, body: Option<&str>) -> (u16, Vec<(String, String)>, String) {
    let mut b = ureq::http::Request::builder().method(method).uri(url);
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    let req = b
        .body(body.unwrap_or("").as_bytes().to_vec())
        .expect("request");
    let agent = client();
    let mut resp = agent.run(req).expect("request failed");
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (status, headers, text)
}

/// Reads a JSON Lines file into values (empty if missing).
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l}: {e}")))
        .collect()
}

// ---------------------------------------------------------------- one step (issue 2)

/// Runs one assignment through `caf-worker run -` and returns its single
/// result line (asserting there is exactly one line and it is not an Ack).
pub fn run_one(a: &Value, env: &[(&str, &str)], limit: Duration) -> Value {
    let out = run_lines(std::slice::from_ref(a), env, limit);
    assert_eq!(
        out.stdout.len(),
        1,
        "expected one result line; stdout {:?} stderr {:?}",
        out.stdout,
        out.stderr
    );
    let v = out.json_lines().remove(0);
    assert!(
        v.get("acknowledged_at").is_none(),
        "assignment was rejected: {v}"
    );
    let expected_code = if v["status"] == "success" { 0 } else { 1 };
    assert_eq!(out.code, expected_code, "exit code for {v}");
    v
}

/// `a` with `options` set to `options`.
pub fn with_options(mut a: Value, options: Value) -> Value {
    a["options"] = options;
    a
}

// ---------------------------------------------------------------- retries and timeouts (issue 3)

/// A scripted HTTP/1.1 upstream on 127.0.0.1:0 with one thread per
/// connection and keep-alive, recording arrival times like [`Upstream`].
///
/// Why not tiny_http here: tiny_http 0.12's task pool can queue a new
/// connection behind threads parked on idle keep-alive connections (a race in
/// `TaskPool::spawn`), so with a worker that pools connections a request may
/// not be seen until some other connection closes. Tests with many concurrent
/// steps hung on that. A thread per connection has no such queue, and it can
/// really cut a connection mid-response for [`Reply::drop_connection`].
pub struct HttpStub {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    count: Arc<AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl HttpStub {
    /// Answers request `n` (0-based, across all paths) with `script(n, seen)`.
    pub fn start(script: impl Fn(usize, &Seen) -> Reply + Send + Sync + 'static) -> HttpStub {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind stub");
        let addr = listener.local_addr().expect("stub addr");
        let stub = HttpStub {
            addr,
            seen: Arc::new(Mutex::new(Vec::new())),
            count: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let script: Arc<Script> = Arc::new(script);
        let (seen, count, stop) = (stub.seen.clone(), stub.count.clone(), stub.stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (script, seen, count) = (script.clone(), seen.clone(), count.clone());
                std::thread::spawn(move || serve_stub_connection(conn, &*script, &seen, &count));
            }
        });
        stub
    }

    /// Answers each URL path from its own list: request `k` on `path` gets
    /// `replies[k]`, the last reply repeating; other paths get 404.
    pub fn routes(routes: &[(&str, Vec<Reply>)]) -> HttpStub {
        let routes: std::collections::HashMap<String, Vec<Reply>> = routes
            .iter()
            .map(|(p, r)| {
                assert!(!r.is_empty(), "route {p} has no replies");
                ((*p).to_owned(), r.clone())
            })
            .collect();
        let counters = Mutex::new(std::collections::HashMap::<String, usize>::new());
        HttpStub::start(move |_, s| {
            let path = s.url.split('?').next().unwrap_or("");
            let Some(replies) = routes.get(path) else {
                return Reply::status(404).body("no such route");
            };
            let mut c = counters.lock().unwrap();
            let k = c.entry(path.to_owned()).or_insert(0);
            let reply = replies[(*k).min(replies.len() - 1)].clone();
            *k += 1;
            reply
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Requests seen so far (all paths).
    pub fn requests(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Arrival times of the requests whose URL is `url` exactly, or whose path
    /// is `url` when it has no query; in order.
    pub fn arrivals(&self, url: &str) -> Vec<Instant> {
        let mut at: Vec<Instant> = self
            .seen()
            .into_iter()
            .filter(|s| {
                s.url == url || (!url.contains('?') && s.url.split('?').next() == Some(url))
            })
            .map(|s| s.at)
            .collect();
        at.sort();
        at
    }

    /// Requests seen on `url` (as in [`HttpStub::arrivals`]).
    pub fn requests_to(&self, url: &str) -> usize {
        self.arrivals(url).len()
    }

    /// Milliseconds between consecutive requests to `url`.
    pub fn gaps_ms(&self, url: &str) -> Vec<u64> {
        self.arrivals(url)
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis() as u64)
            .collect()
    }
}

impl Drop for HttpStub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(100));
    }
}

/// Serves one connection: requests in a loop until the client closes it or
/// asks to (`Connection: close`), or a reply drops it.
fn serve_stub_connection(
    conn: std::net::TcpStream,
    script: &Script,
    seen: &Mutex<Vec<Seen>>,
    count: &AtomicUsize,
) {
    use std::io::Read;
    // An idle client must not pin the thread forever.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(url)) = (parts.next(), parts.next()) else {
            return;
        };
        let (method, url) = (method.to_owned(), url.to_owned());
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let s = Seen {
            at: Instant::now(),
            method,
            url,
            headers,
            body,
        };
        let n = count.fetch_add(1, Ordering::SeqCst);
        seen.lock().unwrap().push(s.clone());
        let reply = script(n, &s);
        std::thread::sleep(reply.delay);
        if reply.drop_connection {
            // Promise 64 bytes, send a few, then cut the connection.
            let _ = writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 64\r\n\r\npartial");
            let _ = writer.flush();
            let _ = writer.shutdown(std::net::Shutdown::Both);
            return;
        }
        let mut head = format!(
            "HTTP/1.1 {} Stub\r\ncontent-length: {}\r\n",
            reply.status,
            reply.body.len()
        );
        for (k, v) in &reply.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if s.method != "HEAD" {
            out.extend_from_slice(&reply.body);
        }
        if writer
            .write_all(&out)
            .and_then(|()| writer.flush())
            .is_err()
            || close
        {
            return;
        }
    }
}

/// A loopback listener whose accept queue is full: it never accepts, and a
/// new `connect()` to it hangs (Linux drops the SYN while the queue is full).
pub struct FullBacklog {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _held: Vec<std::net::TcpStream>,
}

/// Builds a [`FullBacklog`] on 127.0.0.1:0 with `listen(0)`, fills the queue
/// with plain connects until one hangs, then checks that connects really hang.
pub fn full_backlog_listener() -> FullBacklog {
    use socket2::{Domain, Socket, Type};
    use std::net::TcpStream;
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    listener.bind(&any.into()).expect("bind 127.0.0.1:0");
    listener.listen(0).expect("listen");
    let addr = listener
        .local_addr()
        .expect("local addr")
        .as_socket()
        .expect("inet addr");
    assert!(addr.ip().is_loopback());
    let hangs = |limit_ms: u64| {
        matches!(
            TcpStream::connect_timeout(&addr, Duration::from_millis(limit_ms)),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut
        )
    };
    let mut held = Vec::new();
    // Each connect either completes into the queue (kept open) or times out
    // after 200 ms because the queue is full: bounded either way.
    for _ in 0..64 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => held.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break,
            Err(e) => panic!("unexpected connect error while filling the backlog: {e}"),
        }
    }
    assert!(
        hangs(100) && hangs(100),
        "connects to a full-backlog loopback listener do not hang on this kernel"
    );
    FullBacklog {
        addr,
        _listener: listener,
        _held: held,
    }
}

/// Creates a named pipe at `path` (with the `mkfifo` tool).
pub fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo is needed for the FS hang tests");
    assert!(status.success(), "mkfifo {} failed", path.display());
}

// ---------------------------------------------------------------- serve ports (issue 4)

/// Helpers for the `serve_*` tests: submissions, lookups, raw sockets and
/// the metrics gauges used to know when a pool is busy.
pub mod serve {
    use super::{Worker, http};
    use serde_json::{Value, json};
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::path::Path;
    use std::time::{Duration, Instant};

    /// `a` routed to pool `class` (`cpu`, `io`, `gpu`) via `job.resources.class`.
    pub fn on_pool(mut a: Value, class: &str) -> Value {
        a["job"]["resources"] = json!({ "class": class });
        a
    }

    /// A `debug.sleep` of `ms` on pool `class`.
    pub fn sleep_step(id: &str, ms: u64, class: &str) -> Value {
        on_pool(
            super::assignment(id, "debug.sleep", json!({ "ms": ms })),
            class,
        )
    }

    /// A response: status, headers, body parsed as JSON (`Null` if not JSON), raw body.
    #[derive(Debug, Clone)]
    pub struct Answer {
        pub status: u16,
        pub headers: Vec<(String, String)>,
        pub json: Value,
        pub text: String,
    }

    impl Answer {
        /// The first header named `name` (case-insensitive).
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    fn answer((status, headers, text): (u16, Vec<(String, String)>, String)) -> Answer {
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            json,
            text,
        }
    }

    /// Any request with extra headers (e.g. `Authorization`).
    pub fn request(
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Answer {
        let mut b = ureq::http::Request::builder().method(method).uri(url);
        if body.is_some() {
            b = b.header("content-type", "application/json");
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(body.unwrap_or(b"").to_vec()).expect("request");
        let mut resp = super::client().run(req).expect("request failed");
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        answer((status, headers, text))
    }

    /// `POST /api/v1/assignments`.
    pub fn submit(w: &Worker, a: &Value) -> Answer {
        answer(http(
            "POST",
            &w.url("/api/v1/assignments"),
            Some(&a.to_string()),
        ))
    }

    /// `POST /api/v1/execute?wait_ms=N`: submit and wait for the result.
    pub fn execute(w: &Worker, a: &Value, wait_ms: u64) -> Answer {
        request(
            "POST",
            &w.url(&format!("/api/v1/execute?wait_ms={wait_ms}")),
            &[],
            Some(a.to_string().as_bytes()),
        )
    }

    /// `GET /api/v1/results/{id}?wait_ms=N`.
    pub fn result(w: &Worker, id: &str, wait_ms: u64) -> Answer {
        answer(http(
            "GET",
            &w.url(&format!("/api/v1/results/{id}?wait_ms={wait_ms}")),
            None,
        ))
    }

    /// `POST /api/v1/assignments/{id}/cancel`.
    pub fn cancel(w: &Worker, id: &str) -> Answer {
        answer(http(
            "POST",
            &w.url(&format!("/api/v1/assignments/{id}/cancel")),
            None,
        ))
    }

    /// `GET` on the health port.
    pub fn health(w: &Worker, path: &str) -> Answer {
        answer(http("GET", &format!("http://{}{path}", w.health), None))
    }

    /// The value of an unlabelled-or-labelled sample on the metrics port,
    /// e.g. `worker_active_tasks{resource_pool="io"}`.
    pub fn metric(w: &Worker, sample: &str) -> Option<f64> {
        let addr = w
            .metrics
            .expect("metrics port (CP2_OBSERVABILITY_METRICS_ENABLED=1)");
        let (_, _, text) = http("GET", &format!("http://{addr}/metrics"), None);
        text.lines().find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    /// Waits until pool `pool` has `active` threads running steps and `queued`
    /// steps waiting (needs the metrics port).
    pub fn wait_pool(w: &Worker, pool: &str, active: u32, queued: u32, limit: Duration) {
        let a = format!("worker_active_tasks{{resource_pool=\"{pool}\"}}");
        let q = format!("worker_queue_depth{{resource_pool=\"{pool}\"}}");
        let reached = super::wait_for(limit, || {
            (metric(w, &a) == Some(f64::from(active)) && metric(w, &q) == Some(f64::from(queued)))
                .then_some(())
        });
        assert!(
            reached.is_some(),
            "the {pool} pool never reached {active} active / {queued} queued: {:?} / {:?}",
            metric(w, &a),
            metric(w, &q)
        );
    }

    /// Raw lines of a results file (empty if missing).
    pub fn result_lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Results of a results file, with how many lines each id has.
    pub fn result_counts(path: &Path) -> std::collections::HashMap<String, usize> {
        let mut counts = std::collections::HashMap::new();
        for v in super::read_jsonl(path) {
            let id = v["assignment_id"].as_str().unwrap_or("").to_owned();
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    }

    /// Polls until the results file has at least `n` lines.
    pub fn wait_result_lines(path: &Path, n: usize, limit: Duration) -> Vec<String> {
        super::wait_for(limit, || {
            let lines = result_lines(path);
            (lines.len() >= n).then_some(lines)
        })
        .unwrap_or_else(|| {
            panic!(
                "results file has {} of {n} lines after {limit:?}",
                result_lines(path).len()
            )
        })
    }

    /// A connected socket with read/write timeouts.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> TcpStream {
        let s = TcpStream::connect_timeout(&addr, timeout).expect("connect");
        s.set_read_timeout(Some(timeout)).expect("read timeout");
        s.set_write_timeout(Some(timeout)).expect("write timeout");
        s
    }

    /// Reads an HTTP/1.1 response head (up to the blank line) plus whatever
    /// body bytes arrive until `Content-Length` is met, EOF, or `limit`.
    pub fn read_response(s: &mut TcpStream, limit: Duration) -> (u16, String, Vec<u8>) {
        let deadline = Instant::now() + limit;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut head_end = None;
        loop {
            if head_end.is_none() {
                head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
            }
            if let Some(end) = head_end {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                // An interim answer (`100 Continue`) has no body.
                if head.starts_with("http/1.1 1") {
                    break;
                }
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if len.is_some_and(|n| buf.len() >= end + n) {
                    break;
                }
            }
            if Instant::now() > deadline {
                break;
            }
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let _ = s.set_read_timeout(Some(left));
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(_) => break,
            }
        }
        let end = head_end.unwrap_or(buf.len());
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, head, buf[end..].to_vec())
    }

    /// Sends `bytes` on a fresh connection and reads the response.
    pub fn raw_exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> (u16, String, Vec<u8>) {
        let mut s = connect(addr, limit);
        s.write_all(bytes).expect("write request");
        read_response(&mut s, limit)
    }

    /// Threads of process `pid` (Linux `/proc`).
    pub fn thread_count(pid: u32) -> usize {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Threads of `pid` the engine names `caf-*` (pool, timer and deadline
    /// threads), leaving out the ports' connection threads, whose number
    /// follows the clients.
    pub fn engine_threads(pid: u32) -> usize {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                    .filter(|n| n.starts_with("caf-") && n.trim() != "caf-worker")
                    .count()
            })
            .unwrap_or(0)
    }

    /// The soft limit on open files of this process (Linux `/proc`).
    pub fn open_files_limit() -> usize {
        std::fs::read_to_string("/proc/self/limits")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024)
    }
}

// ---------------------------------------------------------------- batch helpers

/// Runs `lines` through `caf-worker run -` with the FS root `root` and `env`
/// (later entries win), asserts one result per line and the shared checker,
/// and returns the results by assignment id.
pub fn run_checked(
    root: &Path,
    lines: &[Value],
    env: &[(&str, &str)],
    limit: Duration,
) -> std::collections::HashMap<String, Value> {
    let mut all = vec![("WORKER_FS_ROOT", root.to_str().expect("utf-8 temp path"))];
    all.extend_from_slice(env);
    let out = run_lines(lines, &all, limit);
    let results = out.results();
    assert_eq!(
        results.len(),
        lines.len(),
        "one result per assignment; stdout {:?} stderr {:?}",
        out.stdout,
        out.stderr
    );
    check_results(&out.stdout);
    results
}

/// An `http.request` GET of `url` with `options`.
pub fn http_get(id: &str, url: &str, options: Value) -> Value {
    let mut a = assignment(id, "http.request", serde_json::json!({ "url": url }));
    a["options"] = options;
    a
}

/// An integer field of a result, in ms.
pub fn field_ms(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing: {v}"))
}

/// Asserts `lo <= v <= hi` (milliseconds) with a readable message.
pub fn assert_ms_in(what: &str, v: u64, lo: u64, hi: u64) {
    assert!(
        (lo..=hi).contains(&v),
        "{what} = {v} ms, expected [{lo}, {hi}]"
    );
}

/// Reads one whole request head (up to and with the blank line) from a raw
/// HTTP connection: its text and its `Content-Length` (0 when absent), or
/// `None` at EOF or on a read error.
pub fn read_head_and_length(reader: &mut impl BufRead) -> Option<(String, usize)> {
    let mut head = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        head.push_str(&line);
        if line == "\r\n" {
            return Some((head, length));
        }
    }
}

/// Reads one request head (request line and header lines, up to the blank
/// line) from a raw HTTP connection; its request line, or `None` at EOF or
/// on a read error.
pub fn read_request_head(reader: &mut impl BufRead) -> Option<String> {
    let mut first = String::new();
    if reader.read_line(&mut first).unwrap_or(0) == 0 {
        return None;
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        if line.trim().is_empty() {
            return Some(first);
        }
    }
}
