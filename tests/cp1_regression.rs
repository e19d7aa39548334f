//! CP1 baseline (all flags off, SPEC §6.1 and §7 CP1) must keep working
//! exactly as before Wave 1: fixed 100·n delays, every error retried, no
//! `Retry-After`, no retry budgets, no connect timeout, no per-attempt
//! timeout, no deadline for queued steps. The CP2 settings are set on purpose
//! to prove CP1 ignores them.
//!
//! Not covered on purpose: an FS read of a FIFO in CP1 blocks its pool thread
//! forever (no watchdog in CP1), so no test runs it.
mod support;

use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;
use support::{HttpStub, Reply, assert_ms_in as assert_in, field_ms as ms, http_get as get};

/// Runs `lines` with every CP2 flag explicitly off plus `extra`.
fn run_cp1(lines: &[Value], extra: &[(&str, &str)], limit: Duration) -> HashMap<String, Value> {
    let dir = support::temp_dir();
    let off = [
        ("CP2_ADVANCED_RETRY_ENABLED", "false"),
        ("CP2_COMPLETE_TIMEOUT_ENABLED", "false"),
        ("CP2_QUEUE_MANAGEMENT_ENABLED", "false"),
        ("CP2_OBSERVABILITY_METRICS_ENABLED", "false"),
    ];
    let env: Vec<_> = off.iter().chain(extra).copied().collect();
    support::run_checked(&dir.path().join("data"), lines, &env, limit)
}

#[test]
fn linear_delays_and_every_http_error_retried() {
    let up = HttpStub::routes(&[
        ("/404", vec![Reply::status(404)]),
        ("/501", vec![Reply::status(501)]),
        (
            "/429",
            vec![
                Reply::status(429).header("Retry-After", "3"),
                Reply::status(200),
            ],
        ),
    ]);
    let lines = [
        get("404", &up.url("/404"), json!({})),
        // CP1 ignores options.retry.backoff_ms as well.
        get(
            "501",
            &up.url("/501"),
            json!({"retry": {"backoff_ms": 1000, "max_backoff_ms": 1000}}),
        ),
        get("429", &up.url("/429"), json!({})),
    ];
    // A CP2 base of 250 ms would give 250/500/1000; CP1 must stay at 100/200/300.
    let env = [
        ("WORKER_RETRY_BASE_MS", "250"),
        ("WORKER_RETRY_MAX_DELAY_MS", "5000"),
    ];
    let r = run_cp1(&lines, &env, Duration::from_secs(20));
    for id in ["404", "501"] {
        let v = &r[id];
        assert_eq!(v["status"], "error", "{id}: {v}");
        assert_eq!(v["error_code"], "HTTP_ERROR");
        assert_eq!(v["attempts"], 4, "{id}: every error is retried in CP1");
        assert_eq!(up.requests_to(&format!("/{id}")), 4);
        let g = up.gaps_ms(&format!("/{id}"));
        assert_in(&format!("{id} gap 1 (100)"), g[0], 90, 240);
        assert_in(&format!("{id} gap 2 (200)"), g[1], 190, 480);
        assert_in(&format!("{id} gap 3 (300)"), g[2], 290, 900);
        eprintln!("measured: CP1 {id} gaps {g:?}");
    }
    // Retry-After is a CP2 feature: the retry comes after 100 ms, not 3 s.
    assert_eq!(r["429"]["status"], "success", "{}", r["429"]);
    assert_eq!(r["429"]["attempts"], 2);
    assert_in("429 gap (100)", up.gaps_ms("/429")[0], 90, 1500);
}

#[test]
fn every_error_code_is_retried_and_no_budget_applies() {
    // Codes CP2 never retries are retried in CP1.
    let mut lines: Vec<Value> = ["PERMISSION_DENIED", "INVALID_INPUT", "EXECUTION_FAILED"]
        .iter()
        .map(|c| {
            support::assignment(
                &format!("f-{c}"),
                "debug.fail",
                json!({"error_code": c, "fail_attempts": 1}),
            )
        })
        .collect();
    // A zero process budget would deny every retry in CP2; CP1 has none.
    for i in 0..24 {
        let mut a = support::assignment(
            &format!("b{i}"),
            "debug.fail",
            json!({"error_code": "INTERNAL_ERROR", "fail_attempts": 3}),
        );
        a["options"] = json!({"retry": {"max_attempts": 4}});
        lines.push(a);
    }
    let env = [
        ("WORKER_RETRY_BUDGET_PERCENT", "0"),
        ("WORKER_RETRY_BUDGET_MIN_PER_SEC", "0"),
        ("WORKER_CPU_POOL_SIZE", "24"),
    ];
    let r = run_cp1(&lines, &env, Duration::from_secs(20));
    for (id, v) in &r {
        assert_eq!(v["status"], "success", "{id}: {v}");
        let want = if id.starts_with("f-") { 2 } else { 4 };
        assert_eq!(v["attempts"], want, "{id}: {v}");
    }
}

#[test]
fn attempt_timeout_option_is_ignored_and_the_deadline_governs() {
    let up = HttpStub::routes(&[
        (
            "/slow",
            vec![Reply::status(200).delay(Duration::from_millis(700))],
        ),
        (
            "/hang",
            vec![Reply::status(200).delay(Duration::from_millis(3000))],
        ),
    ]);
    let lines = [
        // attempt_timeout_ms is CP2: the 700 ms answer still arrives.
        get(
            "slow",
            &up.url("/slow"),
            json!({"deadline_ms": 3000, "attempt_timeout_ms": 200, "retry": {"max_attempts": 1}}),
        ),
        // CP1's one total timeout per attempt is the step deadline.
        get(
            "hang",
            &up.url("/hang"),
            json!({"deadline_ms": 600, "retry": {"max_attempts": 1}}),
        ),
    ];
    let r = run_cp1(&lines, &[], Duration::from_secs(20));
    let slow = &r["slow"];
    assert_eq!(slow["status"], "success", "{slow}");
    assert_eq!(slow["attempts"], 1);
    assert!(ms(slow, "latency_ms") >= 650, "{slow}");
    let hang = &r["hang"];
    assert_eq!(hang["status"], "timeout", "{hang}");
    assert_eq!(hang["error_code"], "CANCELLED_BY_TIMEOUT");
    assert_in(
        "deadline as total timeout",
        ms(hang, "latency_ms"),
        550,
        1500,
    );
}

#[test]
fn connect_timeout_setting_is_ignored() {
    // WORKER_HTTP_CONNECT_TIMEOUT_MS is CP2: the hanging connect is only
    // cut by the attempt's total timeout (= the 1200 ms deadline).
    let hole = support::full_backlog_listener();
    let lines = [get(
        "hole",
        &format!("http://{}/never", hole.addr),
        json!({"deadline_ms": 1200, "retry": {"max_attempts": 1}}),
    )];
    let r = run_cp1(
        &lines,
        &[("WORKER_HTTP_CONNECT_TIMEOUT_MS", "300")],
        Duration::from_secs(20),
    );
    let v = &r["hole"];
    assert_eq!(v["status"], "timeout", "{v}");
    assert_eq!(v["error_code"], "CANCELLED_BY_TIMEOUT");
    assert_in(
        "connect cut by the total timeout",
        ms(v, "latency_ms"),
        1100,
        2500,
    );
}

#[test]
fn queued_step_still_runs_after_its_deadline() {
    let blocker = support::assignment("blocker", "debug.sleep", json!({"ms": 600}));
    let mut late = support::assignment("late", "debug.echo", json!({"x": 1}));
    late["options"] = json!({"deadline_ms": 100});
    let r = run_cp1(
        &[blocker, late],
        &[("WORKER_CPU_POOL_SIZE", "1")],
        Duration::from_secs(20),
    );
    let v = &r["late"];
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(v["attempts"], 1);
    assert!(ms(v, "queue_ms") >= 100, "{v}");
}
