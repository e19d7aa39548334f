//! Observability Wave 1 (SPEC §9): the real `serve` with the metrics flag on
//! and off, scraped over its real port.
mod support;

use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use support::{Worker, http};

type Sample = (String, BTreeMap<String, String>, f64);

/// Parses the Prometheus text format into samples (comments skipped).
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (head, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
        let (name, labels) = match head.split_once('{') {
            None => (head.to_owned(), BTreeMap::new()),
            Some((n, rest)) => {
                let body = rest.trim_end_matches('}');
                let mut labels = BTreeMap::new();
                // Label values here never contain `",` so a plain split is enough.
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("label pair");
                    labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
                (n.to_owned(), labels)
            }
        };
        out.push((name, labels, value));
    }
    out
}

fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

fn scrape(w: &Worker) -> String {
    let addr = w.metrics.expect("metrics port");
    let (status, headers, body) = http("GET", &format!("http://{addr}/metrics"), None);
    assert_eq!(status, 200);
    let ct = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    body
}

fn execute(w: &Worker, a: &Value) -> Value {
    let (status, _, body) = http(
        "POST",
        &w.url("/api/v1/execute?wait_ms=10000"),
        Some(&a.to_string()),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn step(id: &str, job: &str, payload: Value) -> Value {
    support::assignment(id, job, payload)
}

/// Codes `debug.fail` can end with status `error` (all but the CANCELLED_* pair).
const ERROR_CODES: &[&str] = &[
    "INVALID_INPUT",
    "MISSING_REQUIRED_FIELD",
    "INVALID_FORMAT",
    "EXECUTION_FAILED",
    "RESOURCE_UNAVAILABLE",
    "PERMISSION_DENIED",
    "QUOTA_EXCEEDED",
    "NETWORK_ERROR",
    "CONNECTION_TIMEOUT",
    "HTTP_ERROR",
    "INTERNAL_ERROR",
    "SYSTEM_OVERLOAD",
];

#[test]
fn counters_histograms_and_labels_match_what_was_sent() {
    let w = Worker::start(&[
        ("CP2_OBSERVABILITY_METRICS_ENABLED", "true"),
        ("CP2_ADVANCED_RETRY_ENABLED", "true"),
        ("CP2_COMPLETE_TIMEOUT_ENABLED", "true"),
        ("CP2_QUEUE_MANAGEMENT_ENABLED", "true"),
        ("WORKER_MAX_QUEUE_SIZE", "50"),
        ("WORKER_RETRY_BASE_MS", "1"),
        ("WORKER_RETRY_MAX_DELAY_MS", "5"),
    ]);
    // success ×3
    for i in 0..3 {
        let r = execute(&w, &step(&format!("ok-{i}"), "debug.echo", json!({"i": i})));
        assert_eq!(r["status"], "success");
    }
    // error: one per code, each failing every attempt (max_attempts 2 → retries for retryable codes)
    for code in ERROR_CODES {
        let mut a = step(
            &format!("err-{code}"),
            "debug.fail",
            json!({"error_code": code}),
        );
        a["options"] = json!({"retry": {"max_attempts": 2}});
        let r = execute(&w, &a);
        assert_eq!(r["status"], "error");
        assert_eq!(r["error_code"], *code);
    }
    // timeout: an attempt timeout under CP2 (sleep 2 s, attempt timeout 100 ms, one attempt)
    let mut t = step("timeout-1", "debug.sleep", json!({"ms": 2000}));
    t["options"] = json!({"attempt_timeout_ms": 100, "retry": {"max_attempts": 1}});
    assert_eq!(execute(&w, &t)["status"], "timeout");
    // cancelled: cancel a running sleep
    let c = step("cancel-1", "debug.sleep", json!({"ms": 5000}));
    let (s, _, _) = http("POST", &w.url("/api/v1/assignments"), Some(&c.to_string()));
    assert_eq!(s, 202);
    let running = support::wait_for(Duration::from_secs(5), || {
        let body = scrape(&w);
        (value(
            &parse(&body),
            "worker_active_tasks",
            &[("resource_pool", "cpu")],
        ) >= 1.0)
            .then_some(())
    });
    assert!(
        running.is_some(),
        "the sleep never showed up as an active task"
    );
    let (s, _, _) = http("POST", &w.url("/api/v1/assignments/cancel-1/cancel"), None);
    assert_eq!(s, 202);
    let (s, _, body) = http("GET", &w.url("/api/v1/results/cancel-1?wait_ms=5000"), None);
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "cancelled"
    );
    // rejected at intake
    let (s, _, _) = http("POST", &w.url("/api/v1/assignments"), Some("{not json"));
    assert_eq!(s, 400);
    // duplicate
    let (s, _, _) = http(
        "POST",
        &w.url("/api/v1/assignments"),
        Some(&step("ok-0", "debug.echo", json!({})).to_string()),
    );
    assert_eq!(s, 200);

    let m = parse(&scrape(&w));
    let exec = "worker_step_executions_total";
    assert_eq!(
        value(
            &m,
            exec,
            &[
                ("step_type", "debug.echo"),
                ("execution_status", "success"),
                ("tenant_id", "acme")
            ]
        ),
        3.0
    );
    assert_eq!(
        value(
            &m,
            exec,
            &[("step_type", "debug.fail"), ("execution_status", "error")]
        ),
        ERROR_CODES.len() as f64
    );
    assert_eq!(
        value(
            &m,
            exec,
            &[
                ("step_type", "debug.sleep"),
                ("execution_status", "timeout")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            exec,
            &[
                ("step_type", "debug.sleep"),
                ("execution_status", "cancelled")
            ]
        ),
        1.0
    );
    for code in ERROR_CODES {
        assert_eq!(
            value(
                &m,
                "worker_step_errors_total",
                &[("step_type", "debug.fail"), ("error_code", code)]
            ),
            1.0,
            "{code}"
        );
    }
    // Errors are counted only for status `error`.
    let all_errors = value(&m, "worker_step_errors_total", &[]);
    assert_eq!(all_errors, ERROR_CODES.len() as f64);
    // One duration observation per step, over all its attempts.
    let total_steps = 3.0 + ERROR_CODES.len() as f64 + 2.0;
    assert_eq!(
        value(&m, "worker_step_execution_duration_seconds_count", &[]),
        total_steps
    );
    assert_eq!(
        value(
            &m,
            "worker_flow_execution_duration_seconds_count",
            &[("tenant_id", "acme")]
        ),
        total_steps
    );
    assert_eq!(
        value(
            &m,
            "worker_step_execution_duration_seconds_bucket",
            &[("step_type", "debug.echo"), ("le", "+Inf")]
        ),
        3.0
    );
    // Detailed labels are off: run/flow/step labels exist but are empty.
    assert!(
        m.iter()
            .filter(|(n, _, _)| n == exec)
            .all(|(_, l, _)| l["run_id"].is_empty() && l["step_id"].is_empty())
    );
    // Retries: the five retryable codes each retried once (max_attempts 2);
    // HTTP_ERROR without an HTTP status is not retryable.
    assert_eq!(
        value(
            &m,
            "worker_step_retries_total",
            &[("step_type", "debug.fail")]
        ),
        5.0
    );
    assert_eq!(
        value(
            &m,
            "worker_timeouts_total",
            &[("step_type", "debug.sleep"), ("phase", "attempt")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "worker_assignments_total",
            &[("outcome", "accepted"), ("reason", "")]
        ),
        total_steps
    );
    assert_eq!(
        value(
            &m,
            "worker_assignments_total",
            &[("outcome", "accepted"), ("reason", "duplicate")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "worker_assignments_total",
            &[("outcome", "rejected"), ("reason", "invalid_json")]
        ),
        1.0
    );
    // Live gauges.
    assert_eq!(
        value(&m, "worker_queue_capacity", &[("resource_pool", "io")]),
        50.0
    );
    assert_eq!(
        value(&m, "worker_pool_threads", &[("resource_pool", "io")]),
        8.0
    );
    assert_eq!(
        value(&m, "worker_queue_depth", &[("resource_pool", "cpu")]),
        0.0
    );
    assert_eq!(
        value(&m, "worker_health_status", &[("check", "pools")]),
        1.0
    );
    assert_eq!(
        value(&m, "worker_health_status", &[("check", "fs_root")]),
        1.0
    );
    assert_eq!(
        value(&m, "worker_health_status", &[("check", "fs_watchdog")]),
        1.0
    );
    assert_eq!(value(&m, "worker_build_info", &[]), 1.0);
    assert!(
        value(
            &m,
            "worker_queue_wait_seconds_count",
            &[("resource_pool", "cpu")]
        ) >= total_steps - 1.0
    );
    assert!(value(&m, "process_resident_memory_bytes", &[]) > 0.0);
}

/// Every metric name the dashboard and the alerts use, from the files themselves.
fn names_used() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for f in [
        "dashboards/worker-observability.json",
        "alerts/worker-alerts.yml",
    ] {
        let text = std::fs::read_to_string(support::root().join(f)).unwrap();
        let bytes = text.as_bytes();
        let mut i = 0;
        while let Some(pos) = text[i..].find("worker_") {
            let start = i + pos;
            let boundary = start == 0
                || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let end = text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(text.len(), |e| start + e);
            if boundary {
                names.insert(text[start..end].to_owned());
            }
            i = end;
        }
    }
    // Alert names like `WorkerHighErrorRate` are not metrics; anchors in runbook
    // URLs are lower-case words without the `worker_` prefix.
    names
}

#[test]
fn every_name_in_dashboard_and_alerts_appears_in_a_real_scrape() {
    let w = Worker::start(&[("CP2_OBSERVABILITY_METRICS_ENABLED", "1")]);
    for (i, job) in ["debug.echo", "debug.fail"].iter().enumerate() {
        let payload = if i == 0 {
            json!({})
        } else {
            json!({"error_code": "INVALID_INPUT"})
        };
        execute(&w, &step(&format!("n-{i}"), job, payload));
    }
    let scraped: BTreeSet<String> = parse(&scrape(&w)).into_iter().map(|(n, _, _)| n).collect();
    let used = names_used();
    assert!(used.len() >= 10, "found too few names: {used:?}");
    // A histogram's base name (in a description) counts as present via its `_bucket` series.
    let missing: Vec<_> = used
        .iter()
        .filter(|n| !scraped.contains(*n) && !scraped.contains(&format!("{n}_bucket")))
        .collect();
    assert!(
        missing.is_empty(),
        "used by dashboard/alerts but not scraped: {missing:?}"
    );
}

#[test]
fn promtool_check_metrics_reports_no_problems() {
    let w = Worker::start(&[("CP2_OBSERVABILITY_METRICS_ENABLED", "1")]);
    execute(&w, &step("p-1", "debug.echo", json!({})));
    let body = scrape(&w);
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed by scripts/test.sh (Debian package prometheus)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics:\n{report}"
    );
}

#[test]
fn flag_off_opens_no_metrics_port_and_results_are_unchanged() {
    // Find a free port, then let the worker (not) use it.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let addr_text = addr.to_string();
    let w = Worker::start(&[("WORKER_METRICS_ADDR", &addr_text)]);
    assert!(
        w.metrics.is_none(),
        "the listening line names no metrics port"
    );
    let err = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .expect_err("port must be closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let r = execute(&w, &step("off-1", "debug.echo", json!({"a": 1})));
    assert_eq!(r["status"], "success");
    assert_eq!(r["outputs"], json!({"a": 1}));
}

#[test]
fn cardinality_stays_bounded_with_distinct_run_ids_and_many_tenants() {
    use caf_worker::contract::{ExecResult, IntakeRules, Outcome, StepStats, parse_assignment};
    use caf_worker::engine::{Observer, StepReport};
    let settings = caf_worker::config::load(&caf_worker::Sources {
        env: [
            (
                "CP2_OBSERVABILITY_METRICS_ENABLED".to_owned(),
                "1".to_owned(),
            ),
            ("WORKER_METRICS_MAX_TENANTS".to_owned(), "100".to_owned()),
        ]
        .into(),
        ..Default::default()
    })
    .unwrap();
    let metrics = caf_worker::telemetry::Metrics::new(&settings).unwrap();
    let rules = IntakeRules {
        max_body_bytes: 1 << 20,
        strict_ids: true,
        default_deadline_ms: 30_000,
    };
    for i in 0..10_000u32 {
        let run = format!("00000000-0000-4000-8000-{i:012}");
        let a = json!({
            "version": "1", "assignment_id": format!("c-{i}"), "request_id": "r",
            "tenant_id": format!("tenant-{}", i % 500),
            "job": {"type": "debug.echo", "payload": {}},
            "correlation": {"run_id": run, "flow_id": run, "step_id": run},
        });
        let a = parse_assignment(a.to_string().as_bytes(), &rules).unwrap();
        let r = ExecResult::new(
            &a,
            Outcome::Success(json!({})),
            StepStats::default(),
            &"w".into(),
        );
        // As a busy pool thread reports: buffered, published in batches
        // and, for the last of them, by `idle`.
        metrics.finished(&StepReport {
            assignment: &a,
            result: &r,
            flow_duration: Duration::from_millis(1),
            batchable: true,
        });
    }
    // A pool thread that runs out of work publishes what it buffered.
    metrics.idle();
    let m = parse(&String::from_utf8(metrics.encode()).unwrap());
    let series = |name: &str| m.iter().filter(|(n, _, _)| n == name).count();
    // 100 tenants + `_other`, one status, one step type, empty run/flow/step labels.
    assert_eq!(series("worker_step_executions_total"), 101);
    assert_eq!(series("worker_flow_execution_duration_seconds_count"), 101);
    assert_eq!(
        value(
            &m,
            "worker_step_executions_total",
            &[("tenant_id", "_other")]
        ),
        8_000.0
    );
    let tenants: BTreeSet<_> = m
        .iter()
        .filter_map(|(_, l, _)| l.get("tenant_id").cloned())
        .collect();
    assert_eq!(tenants.len(), 101);
    assert!(
        m.iter()
            .all(|(_, l, _)| l.get("run_id").is_none_or(|v| v.is_empty()))
    );
}

#[test]
fn upstream_status_classes_and_fractional_process_cpu_are_scraped() {
    let upstream = support::HttpStub::routes(&[
        ("/missing", vec![support::Reply::status(404)]),
        ("/broken", vec![support::Reply::status(502)]),
    ]);
    let w = Worker::start(&[("WORKER_PROFILE", "cp2")]);
    let samples = parse(&scrape(&w));
    let labels = |class| [("step_type", "http.request"), ("status_class", class)];
    for class in ["4xx", "5xx"] {
        assert!(
            samples
                .iter()
                .any(|(n, l, v)| n == "worker_step_http_errors_total"
                    && l.get("status_class").map(String::as_str) == Some(class)
                    && *v == 0.0),
            "{class} series exists at zero before any step"
        );
    }
    let get = |id: &str, path: &str| {
        let a = step(id, "http.request", json!({"url": upstream.url(path)}));
        let mut a = a;
        a["options"] = json!({"retry": {"max_attempts": 1}});
        execute(&w, &a)
    };
    assert_eq!(get("m-404", "/missing")["error_code"], "HTTP_ERROR");
    assert_eq!(get("m-502", "/broken")["error_code"], "HTTP_ERROR");
    let samples = parse(&scrape(&w));
    assert_eq!(
        value(&samples, "worker_step_http_errors_total", &labels("4xx")),
        1.0
    );
    assert_eq!(
        value(&samples, "worker_step_http_errors_total", &labels("5xx")),
        1.0
    );
    // The crate's own collector truncated this to whole seconds (0 for a
    // fresh worker); ours reads clock ticks. An idle worker may not have
    // used one tick (10 ms) yet: give it work until it has.
    let mut cpu = value(&samples, "process_cpu_seconds_total", &[]);
    let until = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    while cpu == 0.0 && Instant::now() < until {
        for _ in 0..20 {
            n += 1;
            execute(
                &w,
                &step(&format!("cpu-{n}"), "debug.echo", json!({"n": n})),
            );
        }
        cpu = value(&parse(&scrape(&w)), "process_cpu_seconds_total", &[]);
    }
    assert!(
        cpu > 0.0 && cpu.fract() != 0.0,
        "process_cpu_seconds_total = {cpu}"
    );
    let rss = value(&samples, "process_resident_memory_bytes", &[]);
    assert!(rss > 1_000_000.0, "process_resident_memory_bytes = {rss}");
    for name in [
        "process_open_fds",
        "process_max_fds",
        "process_threads",
        "process_start_time_seconds",
        "process_virtual_memory_bytes",
    ] {
        assert!(value(&samples, name, &[]) > 0.0, "{name}");
    }
}

/// Pool threads batch per-step series while steps are queued behind them
/// (SPEC §12.6) and publish what they hold when their queue runs dry or
/// before they sleep, so once a burst is drained every step is counted
/// without any further work. (Break-checked: with every report batched and
/// no publishing before sleep, counts stayed behind.)
#[test]
fn a_drained_burst_is_counted_without_further_work() {
    let w = Worker::start(&[
        ("CP2_OBSERVABILITY_METRICS_ENABLED", "true"),
        ("WORKER_CPU_POOL_SIZE", "4"),
    ]);
    let post = |a: &Value| {
        let (s, _, body) = http("POST", &w.url("/api/v1/assignments"), Some(&a.to_string()));
        assert_eq!(s, 202, "{body}");
    };
    // Hold the four cpu threads while the burst queues behind them.
    let mut ids: Vec<String> = (0..4).map(|i| format!("hold-{i}")).collect();
    for id in &ids {
        post(&step(id, "debug.sleep", json!({"ms": 1000})));
    }
    for i in 0..14 {
        let id = format!("burst-{i}");
        post(&step(&id, "debug.sleep", json!({"ms": 20})));
        ids.push(id);
    }
    for id in &ids {
        let (s, _, body) = http(
            "GET",
            &w.url(&format!("/api/v1/results/{id}?wait_ms=10000")),
            None,
        );
        assert_eq!(s, 200, "{body}");
    }
    let sleeps = [
        ("step_type", "debug.sleep"),
        ("execution_status", "success"),
    ];
    let mut seen = 0.0;
    let counted = support::wait_for(Duration::from_secs(3), || {
        seen = value(&parse(&scrape(&w)), "worker_step_executions_total", &sleeps);
        (seen == ids.len() as f64).then_some(())
    });
    assert!(counted.is_some(), "{seen} of {} steps counted", ids.len());
}
