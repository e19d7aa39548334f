//! `caf-worker serve`, shutdown (SPEC §11): SIGTERM stops intake, drains
//! for the grace period, cancels the rest (retryable) so every accepted
//! assignment has exactly one result, flushes the results file, exits 0.
mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};
use support::Worker;
use support::serve::{self, sleep_step};

#[test]
fn sigterm_drains_then_cancels_so_every_accepted_step_has_one_result() {
    let out = support::temp_dir();
    let file = out.path().join("results.jsonl");
    let mut w = Worker::start(&[
        ("CP2_OBSERVABILITY_METRICS_ENABLED", "1"),
        ("WORKER_IO_POOL_SIZE", "2"),
        ("WORKER_SHUTDOWN_GRACE_MS", "2000"),
        ("WORKER_RESULTS_FILE", file.to_str().unwrap()),
    ]);
    let mut accepted: HashSet<String> = HashSet::new();
    for i in 0..22 {
        let id = format!("sd-{i:02}");
        let a = serve::submit(&w, &sleep_step(&id, 1000, "io"));
        assert_eq!(a.status, 202, "{}", a.text);
        accepted.insert(id);
    }
    serve::wait_pool(&w, "io", 2, 20, Duration::from_secs(5));

    let t0 = Instant::now();
    w.sigterm();
    // Submissions race the signal until the worker notices it; whatever is
    // accepted in that window must still get its one result.
    let mut rejected = Vec::new();
    let refused = support::wait_for(Duration::from_secs(2), || {
        let id = format!("sd-late-{}", rejected.len() + accepted.len());
        let a = serve::submit(&w, &sleep_step(&id, 1000, "io"));
        match a.status {
            202 => {
                accepted.insert(id);
                None
            }
            503 => {
                rejected.push(id);
                Some(a)
            }
            s => panic!("unexpected {s} during drain: {}", a.text),
        }
    })
    .expect("no 503 within 2 s of SIGTERM");
    let noticed = t0.elapsed();
    assert_eq!(refused.json["status"], "rejected", "{}", refused.text);
    assert_eq!(refused.json["reason"], "shutting_down", "{}", refused.text);
    // Draining: still answering, not ready, still refusing.
    assert_eq!(serve::health(&w, "/readyz").status, 503);
    for i in 0..3 {
        let id = format!("sd-refused-{i}");
        let a = serve::submit(&w, &sleep_step(&id, 10, "io"));
        assert_eq!(a.status, 503, "{}", a.text);
        assert_eq!(a.json["reason"], "shutting_down");
        rejected.push(id);
    }

    let code = w.wait_exit(Duration::from_secs(10));
    let took = t0.elapsed();
    eprintln!("SIGTERM noticed after {noticed:?}; exit {code} after {took:?} (grace 2000 ms)");
    assert_eq!(code, 0);
    assert!(
        (Duration::from_millis(1900)..Duration::from_millis(3500)).contains(&took),
        "exit after {took:?}, wanted about the 2000 ms grace"
    );

    let lines = serve::result_lines(&file);
    let counts = serve::result_counts(&file);
    assert_eq!(lines.len(), accepted.len(), "one line per accepted step");
    for id in &accepted {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "{id} must have exactly one result"
        );
    }
    for id in &rejected {
        assert!(!counts.contains_key(id), "refused {id} has a result");
    }
    let mut success = 0;
    for v in support::read_jsonl(&file) {
        match v["status"].as_str() {
            Some("success") => success += 1,
            Some("cancelled") => {
                assert_eq!(v["retryable"], true, "{v}");
                assert_eq!(v["error_code"], "CANCELLED_BY_USER", "{v}");
                let attempts = v["attempts"].as_u64().unwrap();
                assert!(attempts <= 1, "{v}");
            }
            _ => panic!("unexpected result during shutdown: {v}"),
        }
    }
    // Two threads, 1 s steps, 2 s grace: two rounds at most can finish.
    assert!((2..=4).contains(&success), "{success} steps succeeded");
    support::check_results(&lines);
}

#[test]
fn sigterm_exits_as_soon_as_the_work_is_done() {
    let out = support::temp_dir();
    let file = out.path().join("results.jsonl");
    let mut w = Worker::start(&[
        ("CP2_OBSERVABILITY_METRICS_ENABLED", "1"),
        ("WORKER_SHUTDOWN_GRACE_MS", "10000"),
        ("WORKER_RESULTS_FILE", file.to_str().unwrap()),
    ]);
    for id in ["sd-short-0", "sd-short-1"] {
        assert_eq!(serve::submit(&w, &sleep_step(id, 400, "cpu")).status, 202);
    }
    serve::wait_pool(&w, "cpu", 2, 0, Duration::from_secs(5));
    let t0 = Instant::now();
    w.sigterm();
    let code = w.wait_exit(Duration::from_secs(10));
    let took = t0.elapsed();
    eprintln!("drain of two 400 ms steps: exit after {took:?}");
    assert_eq!(code, 0);
    assert!(
        took < Duration::from_millis(2500),
        "waited for the grace instead of the work: {took:?}"
    );
    let lines = serve::result_lines(&file);
    assert_eq!(lines.len(), 2, "{lines:?}");
    for v in support::read_jsonl(&file) {
        assert_eq!(v["status"], "success", "{v}");
    }
    support::check_results(&lines);
}

#[test]
fn sigterm_on_an_idle_worker_exits_promptly() {
    let mut w = Worker::start(&[]);
    assert_eq!(serve::health(&w, "/readyz").status, 200);
    let t0 = Instant::now();
    w.sigterm();
    let code = w.wait_exit(Duration::from_secs(10));
    let took = t0.elapsed();
    assert_eq!(code, 0);
    assert!(
        took < Duration::from_millis(1500),
        "idle exit took {took:?}"
    );
    w.log_line(&["caf-worker stopped"], Duration::from_secs(2));
}

#[test]
fn a_second_signal_stops_now_with_one_cancelled_result_per_unfinished_step() {
    let out = support::temp_dir();
    let file = out.path().join("results.jsonl");
    let mut w = Worker::start(&[
        ("CP2_OBSERVABILITY_METRICS_ENABLED", "1"),
        ("WORKER_RESULTS_FILE", file.to_str().unwrap()),
    ]);
    let ids = ["sd2-0", "sd2-1", "sd2-2"];
    for id in ids {
        assert_eq!(
            serve::submit(&w, &sleep_step(id, 20_000, "cpu")).status,
            202
        );
    }
    serve::wait_pool(&w, "cpu", 3, 0, Duration::from_secs(5));
    let kill = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &w.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    let t0 = Instant::now();
    kill("-INT");
    w.log_line(
        &["draining 3 step(s)", "30 s", "Ctrl-C again"],
        Duration::from_secs(5),
    );
    kill("-INT");
    let warn = w.log_line(
        &["3 unfinished step(s) ended cancelled", "results.jsonl"],
        Duration::from_secs(5),
    );
    assert!(warn.contains("\"WARN\""), "{warn}");
    let code = w.wait_exit(Duration::from_secs(10));
    assert_eq!(code, 1, "a forced stop is not a clean exit");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let counts = serve::result_counts(&file);
    for id in ids {
        assert_eq!(counts.get(id), Some(&1), "{id}: one result");
    }
    for v in support::read_jsonl(&file) {
        assert_eq!(v["status"], "cancelled", "{v}");
    }
}

#[test]
fn a_drain_out_of_grace_without_a_results_file_says_the_results_are_lost() {
    let mut w = Worker::start(&[
        ("WORKER_PROFILE", "cp2"),
        ("WORKER_SHUTDOWN_GRACE_MS", "300"),
    ]);
    assert_eq!(
        serve::submit(&w, &sleep_step("sd3-0", 20_000, "cpu")).status,
        202
    );
    serve::wait_pool(&w, "cpu", 1, 0, Duration::from_secs(5));
    w.sigterm();
    let warn = w.log_line(
        &[
            "ran out of grace",
            "1 unfinished step(s)",
            "WORKER_RESULTS_FILE",
        ],
        Duration::from_secs(5),
    );
    assert!(warn.contains("\"WARN\""), "{warn}");
    assert_eq!(w.wait_exit(Duration::from_secs(10)), 0);
}
