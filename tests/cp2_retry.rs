//! Reliability Wave 1, retries (SPEC §6.2, `CP2_ADVANCED_RETRY_ENABLED`): the
//! real binary against a scripted loopback upstream. Exponential backoff,
//! full jitter, the classification table, `Retry-After`, the per-step retry
//! budget and the process-wide retry budget under a storm.
//!
//! Timing assertions are ranges: lower bounds are what the worker guarantees
//! (it sleeps at least the delay), upper bounds leave room for noisy CI.
mod support;

use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, SystemTime};
use support::{HttpStub, Reply, assert_ms_in as assert_in, http_get as get};

/// Runs `lines` with the CP2 flags plus `extra` (later entries win).
fn run_batch(lines: &[Value], extra: &[(&str, &str)], limit: Duration) -> HashMap<String, Value> {
    let dir = support::temp_dir();
    let env: Vec<_> = CP2.iter().chain(extra).copied().collect();
    support::run_checked(&dir.path().join("data"), lines, &env, limit)
}

/// Wave 1 as shipped: both reliability flags on.
const CP2: [(&str, &str); 2] = [
    ("CP2_ADVANCED_RETRY_ENABLED", "1"),
    ("CP2_COMPLETE_TIMEOUT_ENABLED", "1"),
];

#[test]
fn exponential_backoff_doubles_from_the_base_and_stops_at_the_cap() {
    let up = HttpStub::routes(&[
        (
            "/flaky",
            vec![Reply::status(503), Reply::status(503), Reply::status(200)],
        ),
        ("/down", vec![Reply::status(503)]),
        ("/capped", vec![Reply::status(503)]),
    ]);
    let lines = [
        get("flaky", &up.url("/flaky"), json!({})),
        get(
            "down",
            &up.url("/down"),
            json!({"retry": {"max_attempts": 4}}),
        ),
        // options.retry overrides WORKER_RETRY_BASE_MS / WORKER_RETRY_MAX_DELAY_MS.
        get(
            "capped",
            &up.url("/capped"),
            json!({"retry": {"max_attempts": 4, "backoff_ms": 200, "max_backoff_ms": 250}}),
        ),
    ];
    let env = [
        ("WORKER_RETRY_BASE_MS", "100"),
        ("WORKER_RETRY_MAX_DELAY_MS", "5000"),
        ("WORKER_RETRY_JITTER", "none"),
    ];
    let r = run_batch(&lines, &env, Duration::from_secs(20));

    let flaky = &r["flaky"];
    assert_eq!(flaky["status"], "success", "{flaky}");
    assert_eq!(flaky["attempts"], 3);
    assert_eq!(flaky["retries_used"], 2);
    let g = up.gaps_ms("/flaky");
    assert_eq!(g.len(), 2, "{g:?}");
    assert_in("flaky gap 1 (100)", g[0], 90, 400);
    assert_in("flaky gap 2 (200)", g[1], 190, 600);

    // 100, 200, 400: the third gap is what tells doubling from CP1's 100·n.
    let down = &r["down"];
    assert_eq!(down["status"], "error", "{down}");
    assert_eq!(down["error_code"], "HTTP_ERROR");
    assert_eq!(down["retryable"], true);
    assert_eq!(down["attempts"], 4);
    assert_eq!(down["outputs"]["status_code"], 503);
    let g = up.gaps_ms("/down");
    assert_eq!(g.len(), 3, "{g:?}");
    assert_in("down gap 1 (100)", g[0], 90, 400);
    assert_in("down gap 2 (200)", g[1], 190, 600);
    assert_in("down gap 3 (400)", g[2], 390, 900);

    // 200, then min(400, 250) and min(800, 250).
    assert_eq!(r["capped"]["attempts"], 4);
    let g = up.gaps_ms("/capped");
    eprintln!(
        "measured gaps: flaky {:?}, down {:?}, capped {g:?}",
        up.gaps_ms("/flaky"),
        up.gaps_ms("/down")
    );
    assert_eq!(g.len(), 3, "{g:?}");
    assert_in("capped gap 1 (200)", g[0], 190, 500);
    assert_in("capped gap 2 (250)", g[1], 240, 550);
    assert_in("capped gap 3 (250)", g[2], 240, 550);
}

#[test]
fn full_jitter_draws_each_delay_from_zero_to_the_backoff() {
    // One retry per step with base = cap = 1000 ms from the environment: each
    // gap is uniform in [0, 1000]. Twelve draws all above 900 (no jitter) or
    // all below 300 (env base ignored, default 100) each have odds < 1e-6.
    // The first request of each step (one query string per step) fails.
    let up = HttpStub::start({
        let firsts = std::sync::Mutex::new(std::collections::HashSet::<String>::new());
        move |_, s| {
            if firsts.lock().unwrap().insert(s.url.clone()) {
                Reply::status(503)
            } else {
                Reply::status(200)
            }
        }
    });
    let lines: Vec<Value> = (0..12)
        .map(|i| {
            get(
                &format!("j{i}"),
                &up.url(&format!("/j?step={i}")),
                json!({"retry": {"max_attempts": 2}}),
            )
        })
        .collect();
    let env = [
        ("WORKER_RETRY_BASE_MS", "1000"),
        ("WORKER_RETRY_MAX_DELAY_MS", "1000"),
        ("WORKER_RETRY_JITTER", "full"),
        ("WORKER_IO_POOL_SIZE", "12"),
    ];
    let r = run_batch(&lines, &env, Duration::from_secs(20));
    assert!(r.values().all(|v| v["status"] == "success"), "{r:?}");
    let gaps: Vec<u64> = (0..12)
        .map(|i| {
            let g = up.gaps_ms(&format!("/j?step={i}"));
            assert_eq!(g.len(), 1, "step {i}: {g:?}");
            g[0]
        })
        .collect();
    assert!(gaps.iter().all(|&g| g <= 1400), "{gaps:?}");
    assert!(gaps.iter().any(|&g| g < 900), "no jitter: {gaps:?}");
    assert!(gaps.iter().any(|&g| g > 300), "base not 1000: {gaps:?}");
}

#[test]
fn classification_follows_the_spec_table() {
    const NOT_RETRIED: [u16; 8] = [400, 401, 403, 404, 409, 422, 501, 505];
    const RETRIED: [u16; 6] = [408, 429, 500, 502, 503, 504];
    let mut routes = Vec::new();
    for s in NOT_RETRIED {
        routes.push((format!("/s{s}"), vec![Reply::status(s)]));
    }
    for s in RETRIED {
        routes.push((format!("/s{s}"), vec![Reply::status(s), Reply::status(200)]));
    }
    let borrowed: Vec<(&str, Vec<Reply>)> = routes
        .iter()
        .map(|(p, r)| (p.as_str(), r.clone()))
        .collect();
    let up = HttpStub::routes(&borrowed);

    let mut lines: Vec<Value> = NOT_RETRIED
        .iter()
        .chain(&RETRIED)
        .map(|s| get(&format!("h{s}"), &up.url(&format!("/s{s}")), json!({})))
        .collect();
    // Non-HTTP codes through debug.fail: fail once, then succeed if retried.
    let retried_codes = [
        "NETWORK_ERROR",
        "CONNECTION_TIMEOUT",
        "INTERNAL_ERROR",
        "SYSTEM_OVERLOAD",
        "RESOURCE_UNAVAILABLE",
        "CANCELLED_BY_TIMEOUT", // debug.fail marks it an attempt timeout
    ];
    let final_codes = [
        "INVALID_INPUT",
        "INVALID_FORMAT",
        "MISSING_REQUIRED_FIELD",
        "PERMISSION_DENIED",
    ];
    for c in retried_codes.iter().chain(&final_codes) {
        lines.push(support::assignment(
            &format!("f-{c}"),
            "debug.fail",
            json!({"error_code": c, "fail_attempts": 1}),
        ));
    }
    let r = run_batch(
        &lines,
        &[("WORKER_RETRY_BASE_MS", "10")],
        Duration::from_secs(20),
    );

    for s in NOT_RETRIED {
        let v = &r[&format!("h{s}")];
        assert_eq!(v["status"], "error", "{s}: {v}");
        assert_eq!(v["error_code"], "HTTP_ERROR", "{s}");
        assert_eq!(v["retryable"], false, "{s}");
        assert_eq!(v["attempts"], 1, "{s}");
        assert_eq!(v["outputs"]["status_code"], s);
        assert_eq!(up.requests_to(&format!("/s{s}")), 1, "{s}");
    }
    for s in RETRIED {
        let v = &r[&format!("h{s}")];
        assert_eq!(v["status"], "success", "{s}: {v}");
        assert_eq!(v["attempts"], 2, "{s}");
        assert_eq!(up.requests_to(&format!("/s{s}")), 2, "{s}");
    }
    for c in retried_codes {
        let v = &r[&format!("f-{c}")];
        assert_eq!(v["status"], "success", "{c}: {v}");
        assert_eq!(v["attempts"], 2, "{c}");
    }
    for c in final_codes {
        let v = &r[&format!("f-{c}")];
        assert_eq!(v["status"], "error", "{c}: {v}");
        assert_eq!(v["error_code"], c);
        assert_eq!(v["retryable"], false, "{c}");
        assert_eq!(v["attempts"], 1, "{c}");
    }
}

#[test]
fn retry_after_on_429_and_503_lengthens_the_delay() {
    let up = HttpStub::routes(&[
        (
            "/ra-seconds",
            vec![
                Reply::status(429).header("Retry-After", "1"),
                Reply::status(200),
            ],
        ),
        ("/ra-date", vec![Reply::status(200)]),
        (
            "/ra-zero",
            vec![
                Reply::status(503).header("Retry-After", "0"),
                Reply::status(200),
            ],
        ),
        (
            "/ra-500",
            vec![
                Reply::status(500).header("Retry-After", "3"),
                Reply::status(200),
            ],
        ),
    ]);
    // The HTTP-date must be computed when the request arrives: a separate
    // upstream whose first answer is a 503 with a date 2 s ahead (truncated
    // to whole seconds, so 1–2 s after the first arrival).
    let dated = HttpStub::start(|n, _| {
        if n == 0 {
            let when = SystemTime::now() + Duration::from_secs(2);
            Reply::status(503).header("Retry-After", &httpdate::fmt_http_date(when))
        } else {
            Reply::status(200)
        }
    });
    let lines = [
        get("seconds", &up.url("/ra-seconds"), json!({})),
        get("date", &dated.url("/ra-date"), json!({})),
        // Retry-After only raises the delay: 0 s does not cut a 300 ms backoff.
        get(
            "zero",
            &up.url("/ra-zero"),
            json!({"retry": {"backoff_ms": 300}}),
        ),
        // Retry-After is honoured on 429/503 only.
        get("on500", &up.url("/ra-500"), json!({})),
    ];
    let r = run_batch(&lines, &[], Duration::from_secs(20));
    for id in ["seconds", "date", "zero", "on500"] {
        assert_eq!(r[id]["status"], "success", "{id}: {}", r[id]);
        assert_eq!(r[id]["attempts"], 2, "{id}");
    }
    let one = |g: Vec<u64>| {
        assert_eq!(g.len(), 1, "{g:?}");
        g[0]
    };
    eprintln!(
        "measured Retry-After gaps: 429/1 s {:?}, 503/date {:?}, 503/0 {:?}, 500/3 {:?}",
        up.gaps_ms("/ra-seconds"),
        dated.seen()[1].at - dated.seen()[0].at,
        up.gaps_ms("/ra-zero"),
        up.gaps_ms("/ra-500")
    );
    assert_in(
        "429 Retry-After: 1",
        one(up.gaps_ms("/ra-seconds")),
        1000,
        2500,
    );
    let at = dated.seen();
    assert_eq!(at.len(), 2);
    let date_gap = (at[1].at - at[0].at).as_millis() as u64;
    assert_in("503 Retry-After: <date +2 s>", date_gap, 950, 3000);
    assert_in("503 Retry-After: 0", one(up.gaps_ms("/ra-zero")), 290, 900);
    assert_in("500 Retry-After: 3", one(up.gaps_ms("/ra-500")), 90, 1500);
}

#[test]
fn dropped_connection_is_a_retried_network_error() {
    let up = HttpStub::routes(&[
        (
            "/drop-once",
            vec![Reply::drop_connection(), Reply::status(200).body("ok")],
        ),
        ("/drop-always", vec![Reply::drop_connection()]),
    ]);
    let lines = [
        get("once", &up.url("/drop-once"), json!({})),
        get(
            "always",
            &up.url("/drop-always"),
            json!({"retry": {"max_attempts": 3}}),
        ),
    ];
    let r = run_batch(
        &lines,
        &[("WORKER_RETRY_BASE_MS", "20")],
        Duration::from_secs(20),
    );
    assert_eq!(r["once"]["status"], "success", "{}", r["once"]);
    assert_eq!(r["once"]["attempts"], 2);
    assert_eq!(r["once"]["outputs"]["body"], "ok");
    let always = &r["always"];
    assert_eq!(always["status"], "error", "{always}");
    assert_eq!(always["error_code"], "NETWORK_ERROR");
    assert_eq!(always["retryable"], true);
    assert_eq!(always["attempts"], 3);
    assert_eq!(up.requests_to("/drop-always"), 3);
}

#[test]
fn per_step_budget_skips_a_retry_that_would_end_past_the_deadline() {
    // A 503 asking for 5 s against a 2 s deadline: the retry cannot fit, so
    // the step ends at once with the last error, marked retryable.
    let up = HttpStub::routes(&[(
        "/later",
        vec![Reply::status(503).header("Retry-After", "5")],
    )]);
    let lines = [get(
        "later",
        &up.url("/later"),
        json!({"deadline_ms": 2000, "retry": {"max_attempts": 5}}),
    )];
    let r = run_batch(&lines, &[], Duration::from_secs(20));
    let v = &r["later"];
    assert_eq!(v["status"], "error", "{v}");
    assert_eq!(v["error_code"], "HTTP_ERROR");
    assert_eq!(v["retryable"], true);
    assert_eq!(v["attempts"], 1);
    assert_eq!(v["outputs"]["status_code"], 503);
    let msg = v["error_message"].as_str().unwrap();
    assert!(msg.contains("budget"), "{msg}");
    assert!(v["latency_ms"].as_u64().unwrap() < 1000, "{v}");
    assert_eq!(up.requests_to("/later"), 1);
}

#[test]
fn process_retry_budget_caps_a_retry_storm() {
    const STEPS: u64 = 200;
    const PERCENT: u64 = 20;
    const MIN_PER_SEC: u64 = 10;
    const WINDOW_SECS: u64 = 10;
    const MAX_ATTEMPTS: u64 = 4;
    let up = HttpStub::routes(&[("/storm", vec![Reply::status(503)])]);
    let lines: Vec<Value> = (0..STEPS)
        .map(|i| {
            get(
                &format!("storm-{i}"),
                &up.url("/storm"),
                json!({"retry": {"max_attempts": MAX_ATTEMPTS}}),
            )
        })
        .collect();
    let env = [
        ("WORKER_RETRY_BUDGET_PERCENT", "20"),
        ("WORKER_RETRY_BUDGET_MIN_PER_SEC", "10"),
        ("WORKER_RETRY_BASE_MS", "10"),
        ("WORKER_IO_POOL_SIZE", "16"),
    ];
    let started = std::time::Instant::now();
    let r = run_batch(&lines, &env, Duration::from_secs(30));
    // The whole storm must sit inside one budget window for the formula to hold.
    assert!(
        started.elapsed() < Duration::from_secs(WINDOW_SECS),
        "storm took {:?}",
        started.elapsed()
    );

    let requests = up.requests_to("/storm") as u64;
    let attempts: u64 = r.values().map(|v| v["attempts"].as_u64().unwrap()).sum();
    assert_eq!(attempts, requests, "every attempt reached the upstream");
    let retries = requests - STEPS;
    let allowance = STEPS * PERCENT / 100 + MIN_PER_SEC * WINDOW_SECS;
    assert!(
        retries <= allowance,
        "{retries} retries > budget {allowance}"
    );
    // The floor alone grants MIN_PER_SEC·10 retries, and every step asks for one.
    assert!(
        retries >= MIN_PER_SEC * WINDOW_SECS,
        "only {retries} retries"
    );

    let mut denied = 0;
    for (id, v) in &r {
        assert_eq!(v["status"], "error", "{id}: {v}");
        assert_eq!(v["error_code"], "HTTP_ERROR", "{id}");
        assert_eq!(v["retryable"], true, "{id}");
        let msg = v["error_message"].as_str().unwrap();
        let mentions_budget = msg.contains("process retry budget");
        // A step ends short of max_attempts only when a retry was denied.
        let cut_short = v["attempts"].as_u64().unwrap() < MAX_ATTEMPTS;
        assert_eq!(mentions_budget, cut_short, "{id}: {v}");
        denied += u64::from(mentions_budget);
    }
    assert!(denied >= 1, "no retry was denied");
    eprintln!(
        "measured: storm {STEPS} steps, {requests} requests, {retries} retries (budget {allowance}), {denied} denied, {:?}",
        started.elapsed()
    );
}

#[test]
fn retry_budget_denials_are_counted_in_metrics() {
    // Through `serve` with metrics on: a budget of 0% + 1/s allows exactly
    // 10 retries in the window; every other retry is denied and counted.
    const STEPS: usize = 40;
    let up = HttpStub::routes(&[("/down", vec![Reply::status(503)])]);
    let mut env = CP2.to_vec();
    env.extend_from_slice(&[
        ("CP2_OBSERVABILITY_METRICS_ENABLED", "1"),
        ("WORKER_RETRY_BUDGET_PERCENT", "0"),
        ("WORKER_RETRY_BUDGET_MIN_PER_SEC", "1"),
        ("WORKER_RETRY_BASE_MS", "10"),
    ]);
    let w = support::Worker::start(&env);
    let ids: Vec<String> = (0..STEPS).map(|i| format!("m{i}")).collect();
    for id in &ids {
        let a = get(id, &up.url("/down"), json!({"retry": {"max_attempts": 4}}));
        let (status, _, body) =
            support::http("POST", &w.url("/api/v1/assignments"), Some(&a.to_string()));
        assert_eq!(status, 202, "{body}");
    }
    let results: Vec<Value> = ids
        .iter()
        .map(|id| {
            let (status, _, body) = support::http(
                "GET",
                &w.url(&format!("/api/v1/results/{id}?wait_ms=10000")),
                None,
            );
            assert_eq!(status, 200, "{id}: {body}");
            serde_json::from_str(&body).unwrap()
        })
        .collect();
    let denied = results
        .iter()
        .filter(|v| {
            v["error_message"]
                .as_str()
                .is_some_and(|m| m.contains("process retry budget"))
        })
        .count();
    let retries = up.requests_to("/down") - STEPS;
    assert_eq!(retries, 10, "granted retries");
    assert!(denied >= STEPS - 10, "denied {denied}");

    let addr = w.metrics.expect("metrics port");
    let (status, _, text) = support::http("GET", &format!("http://{addr}/metrics"), None);
    assert_eq!(status, 200);
    let sample = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
            .sum()
    };
    assert_eq!(
        sample("worker_retry_budget_denied_total") as usize,
        denied,
        "{text}"
    );
    assert_eq!(
        sample("worker_step_retries_total{step_type=\"http.request\"}") as usize,
        retries
    );
    eprintln!("measured: serve storm {STEPS} steps, {retries} retries granted, {denied} denied");
}
