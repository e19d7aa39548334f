//! Measures a running `caf-worker serve` under the two port attacks of
//! issue 12 (loopback only, bounded in connections and time):
//!
//! 1. slowloris: `--slow N` connections sending one header line every 3 s;
//!    samples the worker's threads and descriptors, `/livez` and submission
//!    latency;
//! 2. pipelining: one connection per port pipelining `GET /nope` (ingress,
//!    100,000) and `GET /livez` (health, 20,000) without ever reading;
//!    samples `/livez` and lookup latency.
//!
//! Usage: `hostile_ports --pid PID --ingress 127.0.0.1:9090
//!         --health 127.0.0.1:9091 [--slow 10000] [--secs 15]`
//! Figures are printed as `key value` lines (docs/SECURITY.md).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

struct Args {
    pid: u32,
    ingress: SocketAddr,
    health: SocketAddr,
    slow: usize,
    secs: u64,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        pid: 0,
        ingress: "127.0.0.1:9090".parse().map_err(|e| format!("{e}"))?,
        health: "127.0.0.1:9091".parse().map_err(|e| format!("{e}"))?,
        slow: 10_000,
        secs: 15,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{k} {v}: {e}");
        match k.as_str() {
            "--pid" => a.pid = v.parse().map_err(|e| bad(&e))?,
            "--ingress" => a.ingress = v.parse().map_err(|e| bad(&e))?,
            "--health" => a.health = v.parse().map_err(|e| bad(&e))?,
            "--slow" => a.slow = v.parse::<usize>().map_err(|e| bad(&e))?.min(20_000),
            "--secs" => a.secs = v.parse::<u64>().map_err(|e| bad(&e))?.min(120),
            _ => return Err(format!("unknown option {k}")),
        }
    }
    // Loopback only: this program attacks what it is pointed at.
    if !a.ingress.ip().is_loopback() || !a.health.ip().is_loopback() {
        return Err("only loopback addresses are allowed".into());
    }
    if a.pid == 0 {
        return Err("--pid of the worker is required".into());
    }
    Ok(a)
}

fn status_field(pid: u32, key: &str) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// One request on a fresh connection, `Connection: close`, bounded by 5 s:
/// the status (0 if none) and the latency.
fn timed(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Duration) {
    let limit = Duration::from_secs(5);
    let t = Instant::now();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, limit) else {
        return (0, t.elapsed());
    };
    let _ = s.set_read_timeout(Some(limit));
    let _ = s.set_write_timeout(Some(limit));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, t.elapsed());
    }
    let mut head = [0u8; 12];
    match s.read_exact(&mut head) {
        Ok(()) => {
            let status = std::str::from_utf8(&head[9..12])
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            (status, t.elapsed())
        }
        Err(_) => (0, t.elapsed()),
    }
}

#[derive(Default)]
struct Latencies(Vec<Duration>);

impl Latencies {
    fn report(&mut self, name: &str) {
        self.0.sort();
        let at = |q: f64| {
            self.0
                .get(((self.0.len() as f64 - 1.0) * q) as usize)
                .copied()
                .unwrap_or_default()
        };
        println!(
            "{name}_ms p50 {:.1} p99 {:.1} max {:.1} (n {})",
            at(0.5).as_secs_f64() * 1e3,
            at(0.99).as_secs_f64() * 1e3,
            at(1.0).as_secs_f64() * 1e3,
            self.0.len()
        );
    }
}

fn submission(i: usize) -> String {
    format!(
        r#"{{"version":"1","assignment_id":"hp-{i}","request_id":"req-hp-{i}","tenant_id":"bench","job":{{"type":"debug.echo","payload":{{}}}}}}"#
    )
}

fn slowloris(a: &Args) {
    let base_threads = status_field(a.pid, "Threads:");
    let base_fds = fds(a.pid);
    let mut conns = Vec::with_capacity(a.slow);
    let mut refused = 0;
    for i in 0..a.slow {
        let addr = if i % 10 == 0 { a.health } else { a.ingress };
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut s) => {
                let _ = s.set_nonblocking(true);
                let _ = s.write_all(b"POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\n");
                conns.push(s);
            }
            Err(_) => refused += 1,
        }
    }
    println!(
        "slowloris_connections {} (connect failed {refused})",
        conns.len()
    );
    let (mut threads, mut max_fds, mut ok, mut failed) = (0, 0, 0, 0);
    let (mut livez, mut submit) = (Latencies::default(), Latencies::default());
    let t = Instant::now();
    let mut line = 0;
    let mut next_line = Instant::now();
    while t.elapsed() < Duration::from_secs(a.secs) {
        if Instant::now() >= next_line {
            for s in &mut conns {
                let _ = s.write_all(format!("X-Slow-{line}: 1\r\n").as_bytes());
            }
            line += 1;
            next_line += Duration::from_secs(3);
        }
        threads = threads.max(status_field(a.pid, "Threads:"));
        max_fds = max_fds.max(fds(a.pid));
        let (s, took) = timed(a.health, "GET", "/livez", "");
        livez.0.push(took);
        let (st, took) = timed(
            a.ingress,
            "POST",
            "/api/v1/assignments",
            &submission(ok + failed),
        );
        submit.0.push(took);
        if s == 200 && st == 202 {
            ok += 1;
        } else {
            failed += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("slowloris_threads {base_threads} -> max {threads}");
    println!("slowloris_fds {base_fds} -> max {max_fds}");
    println!("slowloris_rounds ok {ok} failed {failed}");
    livez.report("slowloris_livez");
    submit.report("slowloris_submit");
}

fn pipeline(addr: SocketAddr, request: &'static str, max: usize, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let Ok(mut s) = TcpStream::connect(addr) else {
            return;
        };
        let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
        let batch = request.repeat(500);
        let mut sent = 0;
        while !stop.load(Ordering::Acquire) {
            if sent < max && s.write_all(batch.as_bytes()).is_ok() {
                sent += 500;
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
}

fn pipelining(a: &Args) {
    let stop = Arc::new(AtomicBool::new(false));
    pipeline(
        a.ingress,
        "GET /nope HTTP/1.1\r\nHost: w\r\n\r\n",
        100_000,
        stop.clone(),
    );
    pipeline(
        a.health,
        "GET /livez HTTP/1.1\r\nHost: w\r\n\r\n",
        20_000,
        stop.clone(),
    );
    let (mut livez, mut lookup) = (Latencies::default(), Latencies::default());
    let mut failed = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(a.secs) {
        let (s, took) = timed(a.health, "GET", "/livez", "");
        livez.0.push(took);
        let (st, took2) = timed(a.ingress, "GET", "/api/v1/results/none", "");
        lookup.0.push(took2);
        if s != 200 || st != 404 {
            failed += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Release);
    println!("pipelining_failed_rounds {failed}");
    livez.report("pipelining_livez");
    lookup.report("pipelining_lookup");
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hostile_ports: {e}");
            std::process::exit(2);
        }
    };
    pipelining(&a);
    slowloris(&a);
}
