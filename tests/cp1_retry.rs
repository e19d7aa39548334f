//! CP1 retry baseline (SPEC §6.1, all flags off): every error is retried up
//! to `max_attempts`, the delay before retry n is 100·n ms, and a panicking
//! block is caught (SPEC §5) without killing its pool.
mod support;

use serde_json::{Value, json};
use std::time::Duration;
use support::{Reply, Upstream};

const LIMIT: Duration = Duration::from_secs(20);

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// Gaps between consecutive request arrivals at the upstream.
fn arrival_gaps(up: &Upstream) -> Vec<u128> {
    let seen = up.seen();
    seen.windows(2).map(|w| ms(w[1].at - w[0].at)).collect()
}

#[test]
fn debug_fail_succeeds_on_the_third_attempt_after_two_retries() {
    let a = support::assignment(
        "fail-twice",
        "debug.fail",
        json!({"error_code": "NETWORK_ERROR", "fail_attempts": 2}),
    );
    let r = support::run_one(&a, &[], LIMIT);
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["attempts"], 3);
    assert_eq!(r["retries_used"], 2);
    assert_eq!(r["outputs"]["attempt"], 3);
    assert!(r.get("error_code").is_none());
    // latency covers both backoff sleeps: 100 + 200 ms.
    let latency = r["latency_ms"].as_u64().unwrap();
    assert!((290..1500).contains(&latency), "latency {latency} ms");
    support::check_results(&[r.to_string()]);
}

#[test]
fn gaps_between_attempts_are_100_then_200_ms() {
    let up = Upstream::start(|n, _| match n {
        0 | 1 => Reply::status(503).body("busy"),
        _ => Reply::status(200).body("ok"),
    });
    let a = support::assignment("gaps", "http.request", json!({"url": up.url("/flaky")}));
    let r = support::run_one(&a, &[], LIMIT);
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["attempts"], 3);
    assert_eq!(r["retries_used"], 2);
    assert_eq!(r["outputs"]["body"], "ok");
    assert_eq!(up.requests(), 3);
    let gaps = arrival_gaps(&up);
    assert!(
        (90..=400).contains(&gaps[0]),
        "gap before retry 1: {gaps:?}"
    );
    assert!(
        (190..=600).contains(&gaps[1]),
        "gap before retry 2: {gaps:?}"
    );
}

#[test]
fn an_http_404_is_retried_until_max_attempts() {
    let up = Upstream::start(|_, _| Reply::status(404).body("no such thing"));
    let a = support::assignment("nf", "http.request", json!({"url": up.url("/missing")}));
    let r = support::run_one(&a, &[], LIMIT);
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(r["error_code"], "HTTP_ERROR");
    assert_eq!(r["outputs"]["status_code"], 404);
    assert_eq!(r["attempts"], 4, "WORKER_DEFAULT_MAX_ATTEMPTS is 4");
    assert_eq!(r["retries_used"], 3);
    assert_eq!(up.requests(), 4, "CP1 retries a 404 like any error");
    let gaps = arrival_gaps(&up);
    assert!((90..=400).contains(&gaps[0]), "{gaps:?}");
    assert!((190..=600).contains(&gaps[1]), "{gaps:?}");
    assert!((290..=800).contains(&gaps[2]), "{gaps:?}");
    support::check_results(&[r.to_string()]);
}

#[test]
fn max_attempts_comes_from_the_assignment_or_the_default_setting() {
    let up = Upstream::start(|_, _| Reply::status(404));
    let a = support::assignment("env-2", "http.request", json!({"url": up.url("/a")}));
    let r = support::run_one(&a, &[("WORKER_DEFAULT_MAX_ATTEMPTS", "2")], LIMIT);
    assert_eq!(r["attempts"], 2, "{r}");
    assert_eq!(up.requests(), 2);

    // The assignment's own value wins over the setting.
    let a = support::with_options(
        support::assignment("opt-3", "http.request", json!({"url": up.url("/b")})),
        json!({"retry": {"max_attempts": 3}}),
    );
    let r = support::run_one(&a, &[("WORKER_DEFAULT_MAX_ATTEMPTS", "2")], LIMIT);
    assert_eq!(r["attempts"], 3, "{r}");
    assert_eq!(up.requests(), 5);

    let a = support::with_options(
        support::assignment(
            "fail-more",
            "debug.fail",
            json!({"error_code": "NETWORK_ERROR", "fail_attempts": 5}),
        ),
        json!({"retry": {"max_attempts": 2}}),
    );
    let r = support::run_one(&a, &[], LIMIT);
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(r["error_code"], "NETWORK_ERROR");
    assert_eq!(r["attempts"], 2);
}

#[test]
fn cp1_retries_every_error_code_without_classification() {
    // In CP2 these codes are permanent; in CP1 every error gets its retry.
    let codes = [
        "INVALID_INPUT",
        "PERMISSION_DENIED",
        "EXECUTION_FAILED",
        "QUOTA_EXCEEDED",
    ];
    let steps: Vec<Value> = codes
        .iter()
        .map(|c| {
            support::assignment(
                c,
                "debug.fail",
                json!({"error_code": c, "fail_attempts": 1}),
            )
        })
        .collect();
    let out = support::run_lines(&steps, &[], LIMIT);
    assert_eq!(
        out.code, 0,
        "stdout {:?} stderr {:?}",
        out.stdout, out.stderr
    );
    let results = out.results();
    for c in codes {
        assert_eq!(results[c]["status"], "success", "{c}: {}", results[c]);
        assert_eq!(results[c]["attempts"], 2, "{c}");
    }
}

#[test]
fn a_panicking_block_is_internal_error_and_the_pool_keeps_working() {
    let panic_once = support::with_options(
        support::assignment(
            "panic-1",
            "debug.fail",
            json!({"error_code": "EXECUTION_FAILED", "panic": true}),
        ),
        json!({"retry": {"max_attempts": 1}}),
    );
    // Every attempt of this one panics; CP1 retries it on the same thread.
    let panic_all = support::assignment(
        "panic-all",
        "debug.fail",
        json!({"error_code": "EXECUTION_FAILED", "panic": true}),
    );
    let mut steps = vec![panic_once];
    steps.extend(
        (0..5).map(|i| support::assignment(&format!("after-{i}"), "debug.echo", json!({"i": i}))),
    );
    steps.push(panic_all);
    steps.push(support::assignment(
        "last",
        "debug.fail",
        json!({"error_code": "NETWORK_ERROR", "fail_attempts": 1}),
    ));
    // One cpu thread: every step after a panic runs on the thread that panicked.
    let out = support::run_lines(&steps, &[("WORKER_CPU_POOL_SIZE", "1")], LIMIT);
    assert_eq!(out.code, 1, "stderr {:?}", out.stderr);
    let results = out.results();
    assert_eq!(
        results.len(),
        steps.len(),
        "every step has a result: {:?}",
        out.stdout
    );
    for id in ["panic-1", "panic-all"] {
        let r = &results[id];
        assert_eq!(r["status"], "error", "{r}");
        assert_eq!(r["error_code"], "INTERNAL_ERROR", "{r}");
        assert!(
            r["error_message"].as_str().unwrap().contains("panic"),
            "{r}"
        );
    }
    assert_eq!(results["panic-1"]["attempts"], 1);
    assert_eq!(results["panic-all"]["attempts"], 4);
    for i in 0..5 {
        let r = &results[&format!("after-{i}")];
        assert_eq!(r["status"], "success", "{r}");
        assert_eq!(r["outputs"]["i"], i);
    }
    assert_eq!(results["last"]["status"], "success");
    assert_eq!(results["last"]["attempts"], 2);
    support::check_results(&out.stdout);
    // The panic message goes through the logger: stderr stays JSON lines.
    for line in &out.stderr {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert_eq!(v["component"], "worker");
    }
    assert!(
        out.stderr.iter().any(|l| l.contains("simulated panic")),
        "the panic is logged: {:?}",
        out.stderr
    );
}
