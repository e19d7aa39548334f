//! The plain-rusqlite side of the `sql.query` benchmark in `scripts/bench.sh`.
//!
//! ```text
//! bench_sql make DB ROWS
//!     Creates DB with table items(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL)
//!     holding ROWS rows (replaces an existing file).
//! bench_sql steps DB_NAME ROWS COUNT
//!     Prints COUNT `sql.query` assignments (JSON Lines) doing the point queries below.
//! bench_sql plain DB ROWS COUNT THREADS
//!     Runs the same COUNT point queries with plain rusqlite: THREADS threads, each
//!     with its own read-only connection and cached prepared statement, reading
//!     every column of the row. Prints `queries=.. secs=.. rate=..`.
//! ```
//!
//! Query `i` (0-based) reads `id = key(i)`, the same sequence on both sides.

use rusqlite::{Connection, OpenFlags};
use std::time::Instant;

const QUERY: &str = "SELECT id, name, qty, price FROM items WHERE id = ?";

/// The id the `i`-th query reads: a fixed walk over the whole table.
fn key(i: u64, rows: u64) -> i64 {
    (i.wrapping_mul(7919) % rows + 1) as i64
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| -> u64 {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| usage())
    };
    match args.first().map(String::as_str) {
        Some("make") if args.len() == 3 => make(&args[1], num(2)),
        Some("steps") if args.len() == 4 => steps(&args[1], num(2), num(3)),
        Some("plain") if args.len() == 5 => plain(&args[1], num(2), num(3), num(4)),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_sql make DB ROWS | steps DB_NAME ROWS COUNT | plain DB ROWS COUNT THREADS"
    );
    std::process::exit(2)
}

fn make(path: &str, rows: u64) {
    let _ = std::fs::remove_file(path);
    let mut conn = Connection::open(path).expect("open");
    conn.execute_batch(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER, price REAL)",
    )
    .expect("create");
    let tx = conn.transaction().expect("begin");
    {
        let mut ins = tx
            .prepare("INSERT INTO items (id, name, qty, price) VALUES (?, ?, ?, ?)")
            .expect("prepare");
        for id in 1..=rows as i64 {
            ins.execute((id, format!("item-{id}"), id % 97, id as f64 / 100.0))
                .expect("insert");
        }
    }
    tx.commit().expect("commit");
}

fn steps(db: &str, rows: u64, count: u64) {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for i in 0..count {
        let line = serde_json::json!({
            "version": "1", "assignment_id": format!("sql-{i}"), "request_id": format!("req-{i}"),
            "tenant_id": "bench",
            "job": {"type": "sql.query", "payload": {"database": db, "sql": QUERY, "params": [key(i, rows)]}},
        });
        writeln!(out, "{line}").expect("write");
    }
}

fn plain(path: &str, rows: u64, count: u64, threads: u64) {
    let threads = threads.max(1);
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let path = path.to_owned();
            std::thread::spawn(move || {
                let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
                let conn = Connection::open_with_flags(&path, flags).expect("open");
                let mut stmt = conn.prepare_cached(QUERY).expect("prepare");
                let mut seen = 0u64;
                let mut i = t;
                while i < count {
                    let (id, name, qty, price): (i64, String, i64, f64) = stmt
                        .query_row([key(i, rows)], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                        })
                        .expect("query");
                    seen += (id + qty) as u64 + name.len() as u64 + price as u64;
                    i += threads;
                }
                seen
            })
        })
        .collect();
    let checksum: u64 = workers.into_iter().map(|w| w.join().expect("thread")).sum();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "queries={count} secs={secs:.3} rate={:.0} checksum={checksum}",
        count as f64 / secs
    );
}
