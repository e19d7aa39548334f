//! Raw throughput of the project's own NATS client through a nats-server,
//! with no engine: the baseline the NATS front's end-to-end figures are
//! compared with (`scripts/bench.sh`). Loopback or any server you point it at.
//!
//! ```text
//! nats_raw_bench URL [COUNT] [SIZE] [MODE]
//!   URL    nats://127.0.0.1:4222 (a comma-separated list works too)
//!   COUNT  messages to publish (default 100000)
//!   SIZE   payload bytes (default 128)
//!   MODE   pubsub: one client publishes, a subscriber on a second
//!                  connection counts (default);
//!          echo:   a second connection subscribes and re-publishes every
//!                  message to a reply subject, a third counts the echoes
//!                  (the shape of core mode: assignment in, result out).
//! ```
//! Prints one line: `mode=.. count=.. size=.. received=.. secs=.. rate=..
//! dropped=..` where rate is messages received per second, measured from
//! the first publish to the last message counted.
//!
//! Try it: `nats-server -a 127.0.0.1 -p 4222 & cargo run --release --example
//! nats_raw_bench -- nats://127.0.0.1:4222 200000 128 echo`.

use caf_worker::transport::nats::{Client, Options};
use std::time::{Duration, Instant};

/// Give up when nothing arrives for this long (the server may have dropped
/// messages of a slow consumer).
const STALL: Duration = Duration::from_secs(5);

fn start(url: &str, name: &str) -> Result<Client, String> {
    let mut o = Options::from_url_list(url).map_err(|e| e.to_string())?;
    o.name = name.into();
    let c = Client::start(o);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.is_connected() {
        if Instant::now() > deadline {
            return Err(format!("no connection to {url}: {:?}", c.last_error()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(c)
}

fn run(args: &[String]) -> Result<(), String> {
    let url = args
        .first()
        .ok_or("usage: nats_raw_bench URL [COUNT] [SIZE] [pubsub|echo]")?;
    let num = |i: usize, d: usize| -> Result<usize, String> {
        args.get(i).map_or(Ok(d), |s| {
            s.parse().map_err(|_| format!("bad number {s:?}"))
        })
    };
    let count = num(1, 100_000)?;
    let size = num(2, 128)?;
    let mode = args.get(3).map_or("pubsub", String::as_str);
    let timeout = Duration::from_secs(5);

    let publisher = start(url, "bench-pub")?;
    let counter = start(url, "bench-count")?;
    let mut echo_client = None;
    let counted = match mode {
        "pubsub" => counter
            .subscribe_with_capacity("bench.in", None, 1 << 16)
            .map_err(|e| e.to_string())?,
        "echo" => {
            let echo = start(url, "bench-echo")?;
            let input = echo
                .subscribe_with_capacity("bench.in", None, 1 << 16)
                .map_err(|e| e.to_string())?;
            let out = echo.clone();
            std::thread::spawn(move || {
                while let Ok(m) = input.receiver().recv() {
                    if out.publish("bench.out", &m.payload).is_err() {
                        break;
                    }
                }
            });
            echo.flush(timeout).map_err(|e| e.to_string())?;
            echo_client = Some(echo);
            counter
                .subscribe_with_capacity("bench.out", None, 1 << 16)
                .map_err(|e| e.to_string())?
        }
        other => return Err(format!("unknown mode {other:?}")),
    };
    counter.flush(timeout).map_err(|e| e.to_string())?;

    let payload = vec![b'x'; size];
    let t0 = Instant::now();
    let pubs = publisher.clone();
    let feeder = std::thread::spawn(move || {
        for _ in 0..count {
            if let Err(e) = pubs.publish("bench.in", &payload) {
                return Err(e.to_string());
            }
        }
        pubs.flush(Duration::from_secs(30))
            .map_err(|e| e.to_string())
    });
    let mut received = 0usize;
    let mut last = t0;
    while received < count {
        match counted.receiver().recv_timeout(STALL) {
            Ok(_) => {
                received += 1;
                last = Instant::now();
            }
            Err(_) => break,
        }
    }
    let fed = feeder
        .join()
        .map_err(|_| "publisher thread panicked".to_string())?;
    let secs = last.duration_since(t0).as_secs_f64().max(1e-9);
    let dropped =
        counter.dropped_messages() + echo_client.as_ref().map_or(0, Client::dropped_messages);
    println!(
        "mode={mode} count={count} size={size} received={received} secs={secs:.3} rate={:.0} dropped={dropped}",
        received as f64 / secs
    );
    fed?;
    if received < count {
        return Err(format!("only {received} of {count} messages arrived"));
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("nats_raw_bench: {e}");
        std::process::exit(1);
    }
}
