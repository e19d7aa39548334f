//! A small load client for `scripts/bench.sh`, for the measurements that a
//! duration-based tool like wrk cannot bound by count. Loopback only.
//!
//! ```text
//! bench_client submit ADDR COUNT CONNS KIND CLASSES PREFIX [MAX_SECS]
//!     POST exactly COUNT assignments to http://ADDR/api/v1/assignments over
//!     CONNS keep-alive connections. KIND: `echo`, `sleep:MS`, `approval`
//!     (a `human.approval` that parks) or `invalid` (an unsupported job
//!     type, rejected 400). CLASSES: comma-separated
//!     `resources.class` values used round-robin, or `-` for none. Prints one
//!     line: `accepted=.. full=.. other=.. errors=.. secs=.. rate=.. p50_us=.. p99_us=..`.
//! bench_client startup BIN RUNS
//!     Starts `BIN serve` RUNS times (environment inherited, health port
//!     chosen here) and polls GET /readyz in a tight loop until it answers
//!     200. Prints every time and the median in ms, then kills the process.
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("submit") if args.len() >= 7 => submit(&args[1..]),
        Some("startup") if args.len() >= 3 => startup(&args[1], &args[2]),
        _ => {
            eprintln!("usage: bench_client submit ADDR COUNT CONNS KIND CLASSES PREFIX [MAX_SECS]");
            eprintln!("       bench_client startup BIN RUNS");
            2
        }
    };
    std::process::exit(code);
}

fn loopback(addr: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = addr
        .parse()
        .map_err(|e| format!("bad address {addr}: {e}"))?;
    if !a.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address"));
    }
    Ok(a)
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(Conn {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    /// Sends one request and reads the whole response; returns the status
    /// and whether the server keeps the connection open.
    fn exchange(&mut self, request: &[u8]) -> std::io::Result<(u16, bool)> {
        self.writer.write_all(request)?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let (mut length, mut keep) = (0usize, true);
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("connection") {
                    keep = !value.eq_ignore_ascii_case("close");
                }
            }
        }
        let mut body = vec![0u8; length];
        self.reader.read_exact(&mut body)?;
        Ok((status, keep))
    }
}

#[derive(Default)]
struct Tally {
    accepted: usize,
    full: usize,
    other: usize,
    errors: usize,
    latencies_us: Vec<u64>,
}

fn body(kind: &str, class: Option<&str>, id: &str) -> String {
    let resources = class
        .map(|c| format!(r#","resources":{{"class":"{c}"}}"#))
        .unwrap_or_default();
    let job = match kind.split_once(':') {
        Some(("sleep", ms)) => {
            format!(r#"{{"type":"debug.sleep","payload":{{"ms":{ms}}}{resources}}}"#)
        }
        _ if kind == "invalid" => r#"{"type":"no.such.block"}"#.to_owned(),
        _ if kind == "approval" => {
            r#"{"type":"human.approval","payload":{"title":"Approve?","approvers":["ann"]}}"#
                .to_owned()
        }
        _ => format!(r#"{{"type":"debug.echo","payload":{{"n":1}}{resources}}}"#),
    };
    format!(
        r#"{{"version":"1","assignment_id":"{id}","request_id":"req-{id}","tenant_id":"bench","job":{job},"options":{{"deadline_ms":3600000}}}}"#
    )
}

fn submit(args: &[String]) -> i32 {
    let addr = match loopback(&args[0]) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench_client: {e}");
            return 2;
        }
    };
    let count: usize = args[1].parse().unwrap_or(0);
    let conns: usize = args[2].parse().unwrap_or(1).max(1);
    let kind = args[3].clone();
    let classes: Vec<String> = if args[4] == "-" {
        Vec::new()
    } else {
        args[4].split(',').map(str::to_owned).collect()
    };
    let prefix = args[5].clone();
    let max_secs: u64 = args.get(6).and_then(|s| s.parse().ok()).unwrap_or(300);
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let start = Instant::now();
    let workers: Vec<_> = (0..conns)
        .map(|t| {
            let share = count / conns + usize::from(t < count % conns);
            let (kind, classes, prefix) = (kind.clone(), classes.clone(), prefix.clone());
            std::thread::spawn(move || {
                let mut tally = Tally {
                    latencies_us: Vec::with_capacity(share),
                    ..Tally::default()
                };
                let mut conn = None;
                for j in 0..share {
                    if Instant::now() >= deadline {
                        tally.errors += share - j;
                        break;
                    }
                    // Global index: every index in 0..count exactly once.
                    let k = j * conns + t;
                    let class = (!classes.is_empty()).then(|| classes[k % classes.len()].as_str());
                    let b = body(&kind, class, &format!("{prefix}-{k}"));
                    let request = format!(
                        "POST /api/v1/assignments HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                        b.len()
                    );
                    let sent = Instant::now();
                    if conn.is_none() {
                        conn = Conn::open(addr).ok();
                    }
                    let Some(c) = conn.as_mut() else {
                        tally.errors += 1;
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    match c.exchange(request.as_bytes()) {
                        Ok((status, keep)) => {
                            tally.latencies_us.push(sent.elapsed().as_micros() as u64);
                            match status {
                                200 | 202 => tally.accepted += 1,
                                429 => tally.full += 1,
                                _ => tally.other += 1,
                            }
                            if !keep {
                                conn = None;
                            }
                        }
                        Err(_) => {
                            tally.errors += 1;
                            conn = None;
                        }
                    }
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for w in workers {
        let t = w.join().unwrap_or_default();
        total.accepted += t.accepted;
        total.full += t.full;
        total.other += t.other;
        total.errors += t.errors;
        total.latencies_us.extend(t.latencies_us);
    }
    let secs = start.elapsed().as_secs_f64();
    total.latencies_us.sort_unstable();
    let pct = |p: f64| {
        let l = &total.latencies_us;
        if l.is_empty() {
            0
        } else {
            l[((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1]
        }
    };
    let answered = total.accepted + total.full + total.other;
    println!(
        "accepted={} full={} other={} errors={} secs={secs:.3} rate={:.0} p50_us={} p99_us={}",
        total.accepted,
        total.full,
        total.other,
        total.errors,
        answered as f64 / secs.max(1e-9),
        pct(0.50),
        pct(0.99),
    );
    i32::from(total.errors > 0)
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn readyz_ok(addr: SocketAddr) -> bool {
    let Ok(mut c) = Conn::open(addr) else {
        return false;
    };
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    matches!(c.exchange(request.as_bytes()), Ok((200, _)))
}

fn startup(bin: &str, runs: &str) -> i32 {
    let runs: usize = runs.parse().unwrap_or(5).max(1);
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let port = match free_port() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("bench_client: no free port: {e}");
                return 1;
            }
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let t0 = Instant::now();
        let child = Command::new(bin)
            .arg("serve")
            .env("WORKER_HEALTH_ADDR", addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                eprintln!("bench_client: cannot start {bin}: {e}");
                return 1;
            }
        };
        let limit = t0 + Duration::from_secs(10);
        let mut ready = None;
        while Instant::now() < limit {
            if readyz_ok(addr) {
                ready = Some(t0.elapsed());
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!("bench_client: serve exited early: {status}");
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        match ready {
            Some(d) => times.push(d.as_secs_f64() * 1000.0),
            None => {
                eprintln!("bench_client: /readyz never answered 200");
                return 1;
            }
        }
    }
    let shown: Vec<String> = times.iter().map(|t| format!("{t:.1}")).collect();
    times.sort_by(f64::total_cmp);
    println!(
        "median_ms={:.2} min_ms={:.2} max_ms={:.2} runs_ms={}",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        shown.join(",")
    );
    0
}
