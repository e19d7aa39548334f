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

/// A minimal valid assignment of `job_type` with `payload`.
pub fn assignment(id: &str, job_type: &str, payload: Value) -> Value {
    serde_json::json!({
        "version": "1", "assignment_id": id, "request_id": format!("req-{id}"),
        "tenant_id": "acme", "job": {"type": job_type, "payload": payload}
    })
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
                        if reply.drop_connection {
                            // Take the raw socket and close it: the client sees a reset/EOF.
                            let stream = rq.into_writer();
                            drop(stream);
                            continue;
                        }
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
    pub ingress: SocketAddr,
    pub health: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub stderr: Arc<Mutex<Vec<String>>>,
    pub dir: tempfile::TempDir,
}

impl Worker {
    /// Starts `serve` with `env` (ports default to 127.0.0.1:0, FS root in a temp dir)
    /// and waits for its "listening" log line.
    pub fn start(env: &[(&str, &str)]) -> Worker {
        let dir = temp_dir();
        let fs_root = dir.path().join("data");
        let fs_root = fs_root.to_str().unwrap().to_owned();
        let mut all: Vec<(&str, &str)> = vec![
            ("WORKER_INGRESS_ADDR", "127.0.0.1:0"),
            ("WORKER_HEALTH_ADDR", "127.0.0.1:0"),
            ("WORKER_METRICS_ADDR", "127.0.0.1:0"),
            ("WORKER_FS_ROOT", &fs_root),
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
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("listening"))
                    {
                        let _ = tx.send(v["context"].clone());
                    }
                }
                sink.lock().unwrap().push(line);
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
            ingress: addr("ingress").expect("ingress addr"),
            health: addr("health").expect("health addr"),
            metrics: addr("metrics"),
            child,
            stderr: lines,
            dir,
        }
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

    /// Waits for exit; returns the exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> i32 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
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
