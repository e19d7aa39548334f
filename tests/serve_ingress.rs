//! `caf-worker serve`, ingress port (SPEC §8.1): submission answers and their
//! status codes, the bearer token, the body limit, result lookups with
//! long-poll, retention, the results file and de-duplication.
mod support;

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::serve::{self, Answer, on_pool, sleep_step};
use support::{Worker, assignment};

fn results_env(dir: &tempfile::TempDir) -> String {
    dir.path()
        .join("results.jsonl")
        .to_str()
        .unwrap()
        .to_owned()
}

fn assert_ack(a: &Answer, status: u16, ack_status: &str, reason: Option<&str>) {
    assert_eq!(a.status, status, "{}", a.text);
    assert_eq!(a.json["version"], "1", "{}", a.text);
    assert_eq!(a.json["status"], ack_status, "{}", a.text);
    assert_eq!(a.json["reason"].as_str(), reason, "{}", a.text);
    assert_eq!(a.json["worker_id"], "test-worker", "{}", a.text);
    assert!(a.json["acknowledged_at"].as_u64().is_some(), "{}", a.text);
    assert!(
        a.header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{:?}",
        a.headers
    );
}

#[test]
fn submit_lookup_execute_and_results_file() {
    let out = support::temp_dir();
    let file = results_env(&out);
    let w = Worker::start(&[("WORKER_RESULTS_FILE", &file)]);

    let a = assignment("ing-echo", "debug.echo", json!({"hello": "world"}));
    let ack = serve::submit(&w, &a);
    assert_ack(&ack, 202, "accepted", None);
    assert_eq!(ack.json["assignment_id"], "ing-echo");
    assert_eq!(ack.json["request_id"], "req-ing-echo");
    assert_eq!(ack.json["tenant_id"], "acme");

    let r = serve::result(&w, "ing-echo", 5000);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "success");
    assert_eq!(r.json["outputs"], json!({"hello": "world"}));
    assert_eq!(r.json["attempts"], 1);

    // Submit and wait in one call.
    let e = assignment("ing-exec", "debug.echo", json!({"n": 1}));
    let (status, _, text) = support::http(
        "POST",
        &w.url("/api/v1/execute?wait_ms=5000"),
        Some(&e.to_string()),
    );
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["assignment_id"], "ing-exec");
    assert_eq!(v["status"], "success");

    // execute with an invalid assignment answers the rejection Ack.
    let (status, _, text) = support::http(
        "POST",
        &w.url("/api/v1/execute?wait_ms=1000"),
        Some(r#"{"version":"2"}"#),
    );
    assert_eq!(status, 400, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["status"], "rejected");

    // One line per result, written as each finishes.
    let lines = serve::wait_result_lines(std::path::Path::new(&file), 2, Duration::from_secs(5));
    let counts = serve::result_counts(std::path::Path::new(&file));
    assert_eq!(counts.get("ing-echo"), Some(&1), "{lines:?}");
    assert_eq!(counts.get("ing-exec"), Some(&1), "{lines:?}");
    assert_eq!(lines.len(), 2, "{lines:?}");
    support::check_results(&lines);
}

#[test]
fn intake_rejections_answer_400_with_their_reason_and_no_result() {
    let out = support::temp_dir();
    let file = results_env(&out);
    let w = Worker::start(&[("WORKER_RESULTS_FILE", &file)]);
    let valid = assignment("ing-bad", "debug.echo", json!({}));
    let with = |f: &dyn Fn(&mut Value)| {
        let mut a = valid.clone();
        f(&mut a);
        a.to_string()
    };
    // One case per 400 reason of §3.2 (the shared vectors cover the rules in depth).
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "invalid_json"),
        ("[1,2,3]".into(), "invalid_json"),
        (String::new(), "invalid_json"),
        (with(&|a| a["version"] = json!("2")), "unsupported_version"),
        (with(&|a| a["version"] = json!(1)), "unsupported_version"),
        (with(&|a| a["tenant_id"] = json!("")), "invalid_assignment"),
        (
            with(&|a| a["options"] = json!({"deadline_ms": 0})),
            "invalid_assignment",
        ),
        (
            with(&|a| a["job"]["type"] = json!("text.generate")),
            "unsupported_job_type",
        ),
        (
            with(&|a| a["job"] = json!({"type": "debug.echo", "payload_ref": "s3://b/k"})),
            "unsupported_payload_ref",
        ),
        (
            with(&|a| a["correlation"] = json!({"trace_id": "not-a-trace-id"})),
            "invalid_correlation",
        ),
    ];
    for (body, reason) in &cases {
        let a = serve::request(
            "POST",
            &w.url("/api/v1/assignments"),
            &[],
            Some(body.as_bytes()),
        );
        assert_ack(&a, 400, "rejected", Some(reason));
        assert!(
            a.json["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            a.text
        );
    }
    // A valid one afterwards proves the file is written at all; rejected ones add nothing.
    let ok = serve::submit(&w, &assignment("ing-after", "debug.echo", json!({})));
    assert_eq!(ok.status, 202, "{}", ok.text);
    assert_eq!(serve::result(&w, "ing-after", 5000).status, 200);
    let lines = serve::wait_result_lines(std::path::Path::new(&file), 1, Duration::from_secs(5));
    assert_eq!(
        lines.len(),
        1,
        "rejections must produce no result: {lines:?}"
    );
    support::check_results(&lines);
}

#[test]
fn bearer_token_is_required_when_configured() {
    let token = "s3cret-t0ken-value";
    let w = Worker::start(&[("WORKER_API_TOKEN", token)]);
    let body = assignment("ing-auth", "debug.echo", json!({})).to_string();
    let post = |headers: &[(&str, &str)]| {
        serve::request(
            "POST",
            &w.url("/api/v1/assignments"),
            headers,
            Some(body.as_bytes()),
        )
    };

    let none = post(&[]);
    assert_ack(&none, 401, "rejected", Some("unauthorized"));
    let wrong = post(&[("Authorization", "Bearer not-the-token")]);
    assert_ack(&wrong, 401, "rejected", Some("unauthorized"));
    let prefix = post(&[("Authorization", &format!("Bearer {token}x"))]);
    assert_eq!(prefix.status, 401, "{}", prefix.text);
    let basic = post(&[("Authorization", &format!("Basic {token}"))]);
    assert_eq!(basic.status, 401, "{}", basic.text);
    // Nothing was accepted by the refused attempts.
    let auth = format!("Bearer {token}");
    let lookup = serve::request(
        "GET",
        &w.url("/api/v1/results/ing-auth"),
        &[("Authorization", &auth)],
        None,
    );
    assert_eq!(lookup.status, 404, "{}", lookup.text);

    let ok = post(&[("Authorization", &auth)]);
    assert_ack(&ok, 202, "accepted", None);
    // Lookups and cancels are guarded too.
    let anon = serve::result(&w, "ing-auth", 0);
    assert_eq!(anon.status, 401, "{}", anon.text);
    assert_eq!(serve::cancel(&w, "ing-auth").status, 401);
    let r = serve::request(
        "GET",
        &w.url("/api/v1/results/ing-auth?wait_ms=5000"),
        &[("Authorization", &auth)],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "success");
    // The health port needs no token.
    assert_eq!(serve::health(&w, "/_health").status, 200);
    // The token never reaches the logs.
    let logs = w.stderr.lock().unwrap().join("\n");
    assert!(!logs.contains(token), "the API token leaked into the logs");
}

#[test]
fn body_limit_is_enforced_before_parsing() {
    let w = Worker::start(&[("WORKER_MAX_BODY_BYTES", "2048")]);
    let url = w.url("/api/v1/assignments");

    // Over the limit and not even JSON: the size is checked first.
    let junk = vec![b'{'; 4096];
    let a = serve::request("POST", &url, &[], Some(&junk));
    assert_ack(&a, 413, "rejected", Some("payload_too_large"));
    assert!(
        a.json["message"].as_str().unwrap().contains("2048"),
        "the message names the limit: {}",
        a.text
    );

    // A valid assignment padded past the limit.
    let mut big = assignment("ing-big", "debug.echo", json!({}));
    big["metadata"] = json!({"pad": "x".repeat(3000)});
    let a = serve::request("POST", &url, &[], Some(big.to_string().as_bytes()));
    assert_ack(&a, 413, "rejected", Some("payload_too_large"));

    // Just under the limit is fine.
    let mut fits = assignment("ing-fits", "debug.echo", json!({}));
    fits["metadata"] = json!({"pad": "x".repeat(1800)});
    let len = fits.to_string().len();
    assert!((1900..=2048).contains(&len), "padding gives {len} bytes");
    let a = serve::request("POST", &url, &[], Some(fits.to_string().as_bytes()));
    assert_ack(&a, 202, "accepted", None);

    // Chunked, with no Content-Length to check up front: still 413.
    let chunk = "x".repeat(1000);
    let mut req = String::from(
        "POST /api/v1/assignments HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    );
    for _ in 0..4 {
        req.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    req.push_str("0\r\n\r\n");
    let (status, head, body) =
        serve::raw_exchange(w.ingress, req.as_bytes(), Duration::from_secs(5));
    assert_eq!(status, 413, "{head}");
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    assert_eq!(v["reason"], "payload_too_large", "{head}");
}

#[test]
fn retention_keeps_only_the_newest_results() {
    let out = support::temp_dir();
    let file = results_env(&out);
    let w = Worker::start(&[
        ("WORKER_RESULT_RETENTION", "3"),
        ("WORKER_RESULTS_FILE", &file),
    ]);
    for i in 1..=5 {
        let id = format!("ret-{i}");
        let a = serve::submit(&w, &assignment(&id, "debug.echo", json!({"i": i})));
        assert_eq!(a.status, 202, "{}", a.text);
        assert_eq!(serve::result(&w, &id, 5000).status, 200, "{id}");
    }
    for (i, want) in [(1, 404), (2, 404), (3, 200), (4, 200), (5, 200)] {
        let r = serve::result(&w, &format!("ret-{i}"), 0);
        assert_eq!(r.status, want, "ret-{i}: {}", r.text);
        if want == 200 {
            assert_eq!(r.json["outputs"]["i"], i);
        } else {
            assert_eq!(r.json["error"], "not_found", "{}", r.text);
        }
    }
    // An id that aged out is no longer known: a re-send is new work, not a duplicate.
    let again = serve::submit(&w, &assignment("ret-1", "debug.echo", json!({"i": 1})));
    assert_ack(&again, 202, "accepted", None);
    assert_eq!(serve::result(&w, "ret-1", 5000).status, 200);
    // A retained one is still a duplicate.
    let dup = serve::submit(&w, &assignment("ret-5", "debug.echo", json!({"i": 5})));
    assert_ack(&dup, 200, "accepted", Some("duplicate"));
    let lines = serve::wait_result_lines(std::path::Path::new(&file), 6, Duration::from_secs(5));
    let counts = serve::result_counts(std::path::Path::new(&file));
    assert_eq!(counts["ret-1"], 2, "{lines:?}");
    assert_eq!(counts["ret-5"], 1, "{lines:?}");
    support::check_results(&lines);
}

#[test]
fn long_poll_returns_as_soon_as_the_step_finishes() {
    let w = Worker::start(&[]);
    let submitted = Instant::now();
    let a = serve::submit(&w, &sleep_step("lp-300", 300, "cpu"));
    assert_eq!(a.status, 202, "{}", a.text);
    let asked = Instant::now();
    let r = serve::result(&w, "lp-300", 2000);
    let waited = asked.elapsed();
    let since_submit = submitted.elapsed();
    eprintln!(
        "long-poll of a 300 ms sleep answered after {waited:?} ({since_submit:?} since submit)"
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "success");
    assert!(
        since_submit >= Duration::from_millis(290),
        "answered before the sleep could end: {since_submit:?}"
    );
    assert!(
        waited < Duration::from_millis(1200),
        "the long-poll waited for wait_ms instead of the result: {waited:?}"
    );
}

#[test]
fn long_poll_of_an_unfinished_step_answers_pending_after_wait_ms() {
    let w = Worker::start(&[]);
    assert_eq!(
        serve::submit(&w, &sleep_step("lp-long", 20_000, "cpu")).status,
        202
    );

    let t = Instant::now();
    let r = serve::result(&w, "lp-long", 400);
    let waited = t.elapsed();
    eprintln!("long-poll wait_ms=400 on an unfinished step answered after {waited:?}");
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.json["status"], "pending", "{}", r.text);
    assert!(
        (Duration::from_millis(380)..Duration::from_millis(1500)).contains(&waited),
        "pending after {waited:?}, wanted about 400 ms"
    );

    // Without wait_ms the answer is immediate.
    let t = Instant::now();
    let r = serve::result(&w, "lp-long", 0);
    assert_eq!(r.status, 202, "{}", r.text);
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );

    // An unknown id is 404 at once, even when asked to wait.
    let t = Instant::now();
    let r = serve::result(&w, "lp-nobody", 3000);
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(r.json["error"], "not_found");
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn duplicate_submission_is_acknowledged_but_not_executed_again() {
    let out = support::temp_dir();
    let file = results_env(&out);
    let w = Worker::start(&[("WORKER_IO_POOL_SIZE", "1"), ("WORKER_RESULTS_FILE", &file)]);
    let put = |content: &str, overwrite: bool| {
        assignment(
            "dup-put",
            "fs.blob_put",
            json!({"path": "dup.txt", "content": content, "overwrite": overwrite}),
        )
    };

    // Finished and retained.
    assert_eq!(serve::submit(&w, &put("first", false)).status, 202);
    let r = serve::result(&w, "dup-put", 5000);
    assert_eq!(r.json["status"], "success", "{}", r.text);
    let dup = serve::submit(&w, &put("second", true));
    assert_ack(&dup, 200, "accepted", Some("duplicate"));
    assert_eq!(dup.json["assignment_id"], "dup-put");

    // Still running.
    assert_eq!(
        serve::submit(&w, &sleep_step("dup-sleep", 300, "io")).status,
        202
    );
    let dup = serve::submit(&w, &sleep_step("dup-sleep", 300, "io"));
    assert_ack(&dup, 200, "accepted", Some("duplicate"));

    // A marker behind them on the single io thread: once it is done, a
    // duplicate that had been queued would have run too.
    let marker = on_pool(assignment("dup-marker", "debug.echo", json!({})), "io");
    assert_eq!(serve::submit(&w, &marker).status, 202);
    assert_eq!(serve::result(&w, "dup-marker", 5000).status, 200);

    let content = std::fs::read_to_string(w.fs_root().join("dup.txt")).unwrap();
    assert_eq!(content, "first", "the duplicate put was executed");
    let lines = serve::wait_result_lines(std::path::Path::new(&file), 3, Duration::from_secs(5));
    let counts = serve::result_counts(std::path::Path::new(&file));
    assert_eq!(counts["dup-put"], 1, "{lines:?}");
    assert_eq!(counts["dup-sleep"], 1, "{lines:?}");
    assert_eq!(lines.len(), 3, "{lines:?}");
    support::check_results(&lines);
}

#[test]
fn a_long_poll_over_the_cap_says_it_did_not_wait_and_bad_wait_ms_is_400() {
    let w = Worker::start(&[("WORKER_MAX_LONG_POLLS", "1")]);
    assert_eq!(
        serve::submit(&w, &sleep_step("cap-1", 20_000, "cpu")).status,
        202
    );
    // One long-poll takes the only slot (it tries again if a probe below
    // held the slot at that moment)...
    let holder = {
        let url = w.url("/api/v1/results/cap-1?wait_ms=8000");
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let r = serve::request("GET", &url, &[], None);
                if r.json["waited"] == true || Instant::now() > deadline {
                    return r;
                }
            }
        })
    };
    // ...after which another one is answered at once, saying so. The probes
    // ask for 1 ms, so they hold the slot only briefly.
    let skipped = support::wait_for(Duration::from_secs(6), || {
        let r = serve::result(&w, "cap-1", 1);
        assert_eq!(r.status, 202, "{}", r.text);
        (r.json["waited"] == false).then_some(r)
    })
    .expect("a long-poll over WORKER_MAX_LONG_POLLS was never skipped");
    assert_eq!(skipped.json["status"], "pending", "{}", skipped.text);
    assert_eq!(
        skipped.header("retry-after"),
        Some("1"),
        "{:?}",
        skipped.headers
    );
    let t = Instant::now();
    let again = serve::result(&w, "cap-1", 5000);
    assert_eq!(again.json["waited"], false, "{}", again.text);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    let held = holder.join().unwrap();
    assert_eq!(held.json["waited"], true, "{}", held.text);

    for bad in ["abc", "-1", "1.5", ""] {
        let r = serve::request(
            "GET",
            &w.url(&format!("/api/v1/results/cap-1?wait_ms={bad}")),
            &[],
            None,
        );
        assert_eq!(r.status, 400, "wait_ms={bad:?}: {}", r.text);
        assert_eq!(r.json["error"], "invalid_wait_ms", "{}", r.text);
        let r = serve::request(
            "POST",
            &w.url(&format!("/api/v1/execute?wait_ms={bad}")),
            &[],
            Some(sleep_step("cap-x", 1, "cpu").to_string().as_bytes()),
        );
        assert_eq!(r.status, 400, "execute wait_ms={bad:?}: {}", r.text);
    }
}

#[test]
fn with_no_long_polls_allowed_every_wait_is_skipped() {
    let w = Worker::start(&[("WORKER_MAX_LONG_POLLS", "0")]);
    assert_eq!(
        serve::submit(&w, &sleep_step("cap-0", 20_000, "cpu")).status,
        202
    );
    let t = Instant::now();
    let r = serve::result(&w, "cap-0", 5000);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.json["waited"], false, "{}", r.text);
    assert_eq!(r.header("retry-after"), Some("1"));
}
