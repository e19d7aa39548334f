//! A small, fast keep-alive HTTP upstream for `scripts/bench.sh`: every
//! request is answered `200 ok`. It binds to loopback, prints its bound
//! address on stdout (one line), and serves until killed or until its
//! lifetime limit ends, so a forgotten instance never outlives a benchmark.
//!
//! ```text
//! cargo run --release --example bench_upstream -- [ADDR] [MAX_CONNS] [MAX_SECS]
//! ```
//! Defaults: `127.0.0.1:0`, 256 connections, 900 s.
//!
//! One handler thread per connection, std only, each response one `write`:
//! the cheapest server we can write, so the comparison measures the worker.
//! (It started on tiny_http; crates.io tiny_http 0.12's connection task pool
//! then queued half of a burst of 8 new keep-alive connections behind the
//! others, stalling `http.request` steps for 30 s. The vendored copy in
//! `vendor/tiny_http` fixes that race; this upstream does not depend on it.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok";

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let max_conns: usize = args
        .next()
        .and_then(|t| t.parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(256);
    let max_secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(900);

    let listener = match TcpListener::bind(addr.as_str()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench_upstream: cannot listen on {addr}: {e}");
            std::process::exit(2);
        }
    };
    match listener.local_addr() {
        Ok(a) => println!("{a}"),
        Err(e) => {
            eprintln!("bench_upstream: no local address: {e}");
            std::process::exit(2);
        }
    }
    let _ = std::io::stdout().flush();

    // The whole process ends at the lifetime limit, whatever it is doing.
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(max_secs));
        std::process::exit(0);
    });
    let end = Instant::now() + Duration::from_secs(max_secs);
    let open = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if open.load(Ordering::Acquire) >= max_conns {
            continue; // dropped: closes the connection
        }
        open.fetch_add(1, Ordering::AcqRel);
        let open = open.clone();
        std::thread::spawn(move || {
            let _ = serve(stream, end);
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Answers every request on one connection until the peer closes it.
fn serve(stream: TcpStream, end: Instant) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while Instant::now() < end {
        // Request line (skipping stray blank lines), then headers.
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let (mut length, mut close) = (0u64, false);
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
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
                    close = value.eq_ignore_ascii_case("close");
                }
            }
        }
        std::io::copy(&mut (&mut reader).take(length), &mut std::io::sink())?;
        writer.write_all(RESPONSE)?;
        if close {
            return Ok(());
        }
    }
    Ok(())
}
