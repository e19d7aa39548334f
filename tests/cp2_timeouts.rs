//! Reliability Wave 1, timeouts (SPEC §7, `CP2_COMPLETE_TIMEOUT_ENABLED`): real
//! faults on loopback — a listener whose accept queue is full (connect hangs),
//! a slow upstream, a FIFO nobody writes to (open() hangs), a busy pool.
//!
//! Timing assertions are ranges: lower bounds are what the worker guarantees,
//! upper bounds leave room for noisy CI.
mod support;

use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use support::{HttpStub, Reply, assert_ms_in as assert_in, field_ms as ms, http_get as get};

/// Runs `lines` with the FS root `root`, the CP2 flags and `extra`.
fn run_in(
    root: &Path,
    lines: &[Value],
    extra: &[(&str, &str)],
    limit: Duration,
) -> HashMap<String, Value> {
    let env: Vec<_> = CP2.iter().chain(extra).copied().collect();
    support::run_checked(root, lines, &env, limit)
}

fn run_batch(lines: &[Value], extra: &[(&str, &str)], limit: Duration) -> HashMap<String, Value> {
    let dir = support::temp_dir();
    run_in(&dir.path().join("data"), lines, extra, limit)
}

/// Wave 1 as shipped: both reliability flags on.
const CP2: [(&str, &str); 2] = [
    ("CP2_ADVANCED_RETRY_ENABLED", "1"),
    ("CP2_COMPLETE_TIMEOUT_ENABLED", "1"),
];

#[test]
fn connect_timeout_is_separate_from_the_attempt_timeout() {
    let hole = support::full_backlog_listener();
    let url = format!("http://{}/never", hole.addr);
    let lines = [
        get(
            "once",
            &url,
            json!({"deadline_ms": 10000, "attempt_timeout_ms": 3000, "retry": {"max_attempts": 1}}),
        ),
        // CONNECTION_TIMEOUT is retryable: two connect timeouts and a 100 ms backoff.
        get(
            "twice",
            &url,
            json!({"deadline_ms": 10000, "attempt_timeout_ms": 3000, "retry": {"max_attempts": 2}}),
        ),
        // An attempt timeout below the connect timeout caps it, and then it is
        // the attempt's total timeout that ends the hanging connect.
        get(
            "capped",
            &url,
            json!({"deadline_ms": 10000, "attempt_timeout_ms": 250, "retry": {"max_attempts": 1}}),
        ),
    ];
    let r = run_batch(
        &lines,
        &[("WORKER_HTTP_CONNECT_TIMEOUT_MS", "300")],
        Duration::from_secs(20),
    );
    let capped = &r["capped"];
    assert_eq!(capped["status"], "timeout", "{capped}");
    assert_eq!(capped["error_code"], "CANCELLED_BY_TIMEOUT");
    assert_in("capped connect", ms(capped, "latency_ms"), 200, 1200);
    for (id, attempts) in [("once", 1), ("twice", 2)] {
        let v = &r[id];
        assert_eq!(v["status"], "error", "{id}: {v}");
        assert_eq!(v["error_code"], "CONNECTION_TIMEOUT", "{id}");
        assert_eq!(v["retryable"], true, "{id}");
        assert_eq!(v["attempts"], attempts, "{id}");
    }
    // ≈300 ms, far below the 3000 ms attempt timeout.
    assert_in(
        "one connect timeout",
        ms(&r["once"], "latency_ms"),
        250,
        1500,
    );
    assert_in(
        "two connect timeouts + backoff",
        ms(&r["twice"], "latency_ms"),
        650,
        2500,
    );
    eprintln!(
        "measured: connect timeout latency {} ms, two attempts {} ms",
        r["once"]["latency_ms"], r["twice"]["latency_ms"]
    );
}

#[test]
fn attempt_timeout_ends_a_slow_attempt_and_is_retried() {
    let up = HttpStub::routes(&[
        (
            "/slow",
            vec![Reply::status(200).delay(Duration::from_millis(1500))],
        ),
        (
            "/slow-once",
            vec![
                Reply::status(200).delay(Duration::from_millis(1500)),
                Reply::status(200).body("fast"),
            ],
        ),
    ]);
    let opts = |n: u32| json!({"deadline_ms": 5000, "attempt_timeout_ms": 300, "retry": {"max_attempts": n}});
    let lines = [
        get("slow", &up.url("/slow"), opts(2)),
        get("slow-once", &up.url("/slow-once"), opts(3)),
    ];
    let r = run_batch(&lines, &[], Duration::from_secs(20));

    // Both attempts time out: the last attempt's timeout ends the step → timeout.
    let slow = &r["slow"];
    assert_eq!(slow["status"], "timeout", "{slow}");
    assert_eq!(slow["error_code"], "CANCELLED_BY_TIMEOUT");
    assert_eq!(slow["retryable"], true);
    assert_eq!(slow["attempts"], 2);
    assert_eq!(up.requests_to("/slow"), 2);
    // 300 + 100 backoff + 300, never the upstream's 1500 ms.
    assert_in("two attempt timeouts", ms(slow, "latency_ms"), 650, 1400);
    assert_in("attempt gap", up.gaps_ms("/slow")[0], 390, 1000);

    let once = &r["slow-once"];
    assert_eq!(once["status"], "success", "{once}");
    assert_eq!(once["attempts"], 2);
    assert_eq!(once["outputs"]["body"], "fast");
    assert_in("timeout then success", ms(once, "latency_ms"), 390, 1300);
    eprintln!(
        "measured: 2 attempt timeouts {} ms, timeout+success {} ms",
        slow["latency_ms"], once["latency_ms"]
    );
}

#[test]
fn deadline_ends_a_slow_step_and_no_attempt_runs_past_it() {
    let up = HttpStub::routes(&[
        (
            "/hang",
            vec![Reply::status(200).delay(Duration::from_millis(3000))],
        ),
        (
            "/hang-short",
            vec![Reply::status(200).delay(Duration::from_millis(3000))],
        ),
    ]);
    let lines = [
        // No attempt timeout: the one attempt is cut at the 1000 ms deadline.
        get(
            "hang",
            &up.url("/hang"),
            json!({"deadline_ms": 1000, "retry": {"max_attempts": 3}}),
        ),
        // 300 ms attempts with backoff: the last one is cut at the deadline.
        get(
            "hang-short",
            &up.url("/hang-short"),
            json!({"deadline_ms": 1000, "attempt_timeout_ms": 300, "retry": {"max_attempts": 10}}),
        ),
    ];
    let r = run_batch(&lines, &[], Duration::from_secs(20));
    for id in ["hang", "hang-short"] {
        let v = &r[id];
        assert_eq!(v["status"], "timeout", "{id}: {v}");
        assert_eq!(v["error_code"], "CANCELLED_BY_TIMEOUT", "{id}");
        assert_eq!(v["retryable"], true, "{id}");
        // The deadline counts from acceptance; queue time is ~0 here.
        assert_in(
            &format!("{id} queue + latency"),
            ms(v, "latency_ms") + ms(v, "queue_ms"),
            900,
            1500,
        );
    }
    assert_eq!(r["hang"]["attempts"], 1);
    assert!(
        r["hang"]["error_message"]
            .as_str()
            .unwrap()
            .contains("deadline"),
        "{}",
        r["hang"]
    );
    // 0–300, 400–700, 900–1000 (cut): three attempts unless CI is very slow.
    let attempts = r["hang-short"]["attempts"].as_u64().unwrap();
    assert!((2..=3).contains(&attempts), "{}", r["hang-short"]);
    assert_eq!(up.requests_to("/hang-short") as u64, attempts);
}

#[test]
fn deadline_bounds_retries_against_an_always_503_upstream() {
    // Backoff 100, 200, 400 puts attempt 4 at ≈700 ms; the next retry
    // (800 ms) would end at ≈1500 ms, past the deadline, so the per-step
    // retry budget ends the step with the last error (SPEC §6.2: error,
    // HTTP_ERROR, retryable, "budget" in the message) — before the deadline.
    let up = HttpStub::routes(&[("/down", vec![Reply::status(503)])]);
    let lines = [get(
        "down",
        &up.url("/down"),
        json!({"deadline_ms": 1500, "retry": {"max_attempts": 10}}),
    )];
    let r = run_batch(&lines, &[], Duration::from_secs(20));
    let v = &r["down"];
    assert_eq!(v["status"], "error", "{v}");
    assert_eq!(v["error_code"], "HTTP_ERROR");
    assert_eq!(v["retryable"], true);
    assert_eq!(v["outputs"]["status_code"], 503);
    let msg = v["error_message"].as_str().unwrap();
    assert!(msg.contains("budget"), "{msg}");
    let attempts = v["attempts"].as_u64().unwrap();
    assert!((3..=4).contains(&attempts), "{v}");
    assert_eq!(up.requests_to("/down") as u64, attempts);
    assert!(ms(v, "latency_ms") + ms(v, "queue_ms") <= 1500 + 300, "{v}");
    eprintln!(
        "measured: always-503 with a 1500 ms deadline: {attempts} attempts, {} ms",
        v["latency_ms"]
    );
}

#[test]
fn backoff_sleep_never_runs_past_the_deadline() {
    // Timeout flag alone (CP1 retries: 100·n): attempts at 0 and ≈100 ms, then
    // a 200 ms sleep that the 250 ms deadline cuts short.
    let mut a = support::assignment(
        "fail",
        "debug.fail",
        json!({"error_code": "INTERNAL_ERROR"}),
    );
    a["options"] = json!({"deadline_ms": 250, "retry": {"max_attempts": 4}});
    let r = run_batch(
        &[a],
        &[("CP2_ADVANCED_RETRY_ENABLED", "0")],
        Duration::from_secs(20),
    );
    let v = &r["fail"];
    assert_eq!(v["status"], "timeout", "{v}");
    assert_eq!(v["error_code"], "CANCELLED_BY_TIMEOUT");
    assert_eq!(v["attempts"], 2);
    assert_in("cut backoff", ms(v, "latency_ms"), 240, 600);
}

#[test]
fn step_queued_past_its_deadline_never_runs() {
    // One cpu thread, busy for 800 ms: the echo behind it has a 200 ms deadline.
    let mut blocker = support::assignment("blocker", "debug.sleep", json!({"ms": 800}));
    blocker["options"] = json!({"deadline_ms": 10000});
    let mut late = support::assignment("late", "debug.echo", json!({"x": 1}));
    late["options"] = json!({"deadline_ms": 200});
    let patient = support::assignment("patient", "debug.echo", json!({"x": 2}));
    let r = run_batch(
        &[blocker, late, patient],
        &[("WORKER_CPU_POOL_SIZE", "1")],
        Duration::from_secs(20),
    );
    assert_eq!(r["blocker"]["status"], "success", "{}", r["blocker"]);
    assert_eq!(r["patient"]["status"], "success", "{}", r["patient"]);
    let v = &r["late"];
    assert_eq!(v["status"], "timeout", "{v}");
    assert_eq!(v["error_code"], "CANCELLED_BY_TIMEOUT");
    assert_eq!(v["attempts"], 0);
    assert_eq!(v["retries_used"], 0);
    assert_eq!(v["latency_ms"], 0);
    assert!(v.get("outputs").is_none_or(Value::is_null), "{v}");
    assert!(ms(v, "queue_ms") >= 200, "{v}");
    // Answered at its deadline, not when the blocker freed the thread (800 ms).
    assert!(ms(v, "queue_ms") < 650, "{v}");
    assert!(
        v["error_message"]
            .as_str()
            .unwrap_or("")
            .contains("never ran"),
        "{v}"
    );
}

#[test]
fn fs_watchdog_times_out_a_read_stuck_on_a_fifo() {
    // open() of a FIFO nobody writes to blocks forever. With the timeout flag
    // off the pool thread would block with it (no watchdog in CP1), so that
    // case is deliberately not run anywhere. The abandoned helper threads stay
    // blocked until the process exits, which `run` does without waiting.
    let dir = support::temp_dir();
    let root = dir.path().join("data");
    std::fs::create_dir_all(&root).unwrap();
    support::mkfifo(&root.join("pipe"));
    std::fs::write(root.join("plain.txt"), "still served").unwrap();
    let get = |id: &str, path: &str, options: Value| {
        let mut a = support::assignment(id, "fs.blob_get", json!({ "path": path }));
        a["options"] = options;
        a
    };
    let lines = [
        get("stuck", "pipe", json!({"retry": {"max_attempts": 1}})),
        // The deadline caps the watchdog (600 < 5000 ms default read timeout).
        get(
            "stuck-deadline",
            "pipe",
            json!({"deadline_ms": 600, "retry": {"max_attempts": 1}}),
        ),
        // The only io thread came back: a normal read still works.
        get("plain", "plain.txt", json!({})),
    ];
    let started = std::time::Instant::now();
    let r = run_in(
        &root,
        &lines[..1],
        &[
            ("WORKER_FS_READ_TIMEOUT_MS", "300"),
            ("WORKER_IO_POOL_SIZE", "1"),
        ],
        Duration::from_secs(20),
    );
    let v = &r["stuck"];
    assert_eq!(v["status"], "timeout", "{v}");
    assert_eq!(v["error_code"], "CANCELLED_BY_TIMEOUT");
    assert_eq!(v["retryable"], true);
    assert_eq!(v["attempts"], 1);
    assert_in("FIFO read timeout", ms(v, "latency_ms"), 280, 1500);
    eprintln!(
        "measured: FIFO read timeout {} ms (run took {:?})",
        v["latency_ms"],
        started.elapsed()
    );

    let r = run_in(
        &root,
        &lines[1..],
        &[("WORKER_IO_POOL_SIZE", "1")],
        Duration::from_secs(20),
    );
    let v = &r["stuck-deadline"];
    assert_eq!(v["status"], "timeout", "{v}");
    assert_eq!(v["attempts"], 1);
    assert_in(
        "FIFO read cut by the deadline",
        ms(v, "latency_ms") + ms(v, "queue_ms"),
        550,
        1500,
    );
    let plain = &r["plain"];
    assert_eq!(plain["status"], "success", "{plain}");
    assert_eq!(plain["outputs"]["content"], "still served");
}

#[test]
fn fs_watchdog_bounds_abandoned_operations() {
    // One io thread, a 20 ms read timeout, 70 reads of a FIFO: the first 64
    // are abandoned to their helpers, then FS steps fail fast.
    const BOUND: usize = 64;
    let dir = support::temp_dir();
    let root = dir.path().join("data");
    std::fs::create_dir_all(&root).unwrap();
    support::mkfifo(&root.join("pipe"));
    let lines: Vec<Value> = (0..BOUND + 6)
        .map(|i| {
            let mut a =
                support::assignment(&format!("g{i}"), "fs.blob_get", json!({"path": "pipe"}));
            a["options"] = json!({"retry": {"max_attempts": 1}});
            a
        })
        .collect();
    let r = run_in(
        &root,
        &lines,
        &[
            ("WORKER_FS_READ_TIMEOUT_MS", "20"),
            ("WORKER_IO_POOL_SIZE", "1"),
        ],
        Duration::from_secs(30),
    );
    let timeouts = r.values().filter(|v| v["status"] == "timeout").count();
    let refused: Vec<&Value> = r
        .values()
        .filter(|v| v["error_code"] == "RESOURCE_UNAVAILABLE")
        .collect();
    assert_eq!(timeouts, BOUND, "{r:?}");
    assert_eq!(refused.len(), 6, "{r:?}");
    for v in refused {
        assert_eq!(v["status"], "error");
        assert!(ms(v, "latency_ms") < 20, "failed fast: {v}");
        // Which 6: the last ones, since the single thread takes them in order.
        let n: usize = v["assignment_id"].as_str().unwrap()[1..].parse().unwrap();
        assert!(n >= BOUND, "{v}");
    }
}
