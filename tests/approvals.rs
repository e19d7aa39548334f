//! `human.approval` (SPEC §14.2) through the real binary: the step parks
//! without a thread or queue slot until a decision arrives on
//! `/api/v1/approvals`, its timeout passes, or it is cancelled or shut down.
mod support;

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::serve::{self, Answer, engine_threads, on_pool, thread_count};
use support::{Worker, assignment};

fn approval(id: &str, tenant: &str, approvers: &[&str], timeout_ms: Option<u64>) -> Value {
    let mut payload = json!({
        "title": format!("Ship {id}?"),
        "description": "needs a human",
        "approvers": approvers,
        "data": {"amount": 42, "id": id},
    });
    if let Some(t) = timeout_ms {
        payload["timeout_ms"] = json!(t);
    }
    let mut a = assignment(id, "human.approval", payload);
    a["tenant_id"] = json!(tenant);
    a
}

fn decide(w: &Worker, id: &str, body: Value) -> Answer {
    serve::request(
        "POST",
        &w.url(&format!("/api/v1/approvals/{id}")),
        &[],
        Some(body.to_string().as_bytes()),
    )
}

fn list(w: &Worker, tenant: &str) -> Answer {
    serve::request(
        "GET",
        &w.url(&format!("/api/v1/approvals?tenant_id={tenant}")),
        &[],
        None,
    )
}

fn listed_ids(a: &Answer) -> Vec<String> {
    a.json["approvals"]
        .as_array()
        .unwrap_or_else(|| panic!("no list: {}", a.text))
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn list_approve_reject_forbidden_conflict_and_unknown() {
    let w = Worker::start(&[("CP2_OBSERVABILITY_METRICS_ENABLED", "1")]);
    for a in [
        approval("ap-1", "acme", &["ann"], None),
        approval("ap-2", "acme", &[], None),
        approval("ap-3", "other", &["ann"], None),
    ] {
        let r = serve::submit(&w, &a);
        assert_eq!(r.status, 202, "{}", r.text);
    }
    let l = list(&w, "acme");
    assert_eq!(l.status, 200, "{}", l.text);
    assert_eq!(listed_ids(&l), ["ap-1", "ap-2"]);
    let first = &l.json["approvals"][0];
    assert_eq!(first["tenant"], "acme");
    assert_eq!(first["title"], "Ship ap-1?");
    assert_eq!(first["description"], "needs a human");
    assert_eq!(first["approvers"], json!(["ann"]));
    assert_eq!(first["data"], json!({"amount": 42, "id": "ap-1"}));
    let (req, exp) = (
        first["requested_at"].as_u64().unwrap(),
        first["expires_at"].as_u64().unwrap(),
    );
    support::assert_ms_in(
        "default timeout (the 30 s deadline)",
        exp - req,
        29_900,
        30_100,
    );
    assert_eq!(listed_ids(&list(&w, "other")), ["ap-3"]);
    assert_eq!(
        serve::request("GET", &w.url("/api/v1/approvals"), &[], None).status,
        400
    );
    assert_eq!(serve::result(&w, "ap-1", 0).status, 202, "pending");

    let bob = decide(&w, "ap-1", json!({"decision": "approve", "by": "bob"}));
    assert_eq!(bob.status, 403, "{}", bob.text);
    assert_eq!(
        listed_ids(&list(&w, "acme")),
        ["ap-1", "ap-2"],
        "still pending"
    );

    let ok = decide(
        &w,
        "ap-1",
        json!({"decision": "approve", "by": "ann", "comment": "ship it"}),
    );
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.json["status"], "success");
    assert_eq!(ok.json["job"]["type"], "human.approval");
    assert_eq!(ok.json["outputs"]["decision"], "approved");
    assert_eq!(ok.json["outputs"]["by"], "ann");
    assert_eq!(ok.json["outputs"]["comment"], "ship it");
    assert!(ok.json["outputs"]["decided_at"].as_u64().unwrap() >= req);
    assert_eq!(ok.json["attempts"], 1);
    assert_eq!(serve::result(&w, "ap-1", 0).json, ok.json);
    support::check_results(std::slice::from_ref(&ok.text));

    let no = decide(&w, "ap-2", json!({"decision": "reject", "by": "zed"}));
    assert_eq!(no.status, 200, "{}", no.text);
    assert_eq!(no.json["status"], "success", "a rejection is an answer");
    assert_eq!(no.json["outputs"]["decision"], "rejected");
    assert_eq!(no.json["outputs"]["comment"], Value::Null);

    for id in ["ap-1", "ap-2"] {
        let again = decide(&w, id, json!({"decision": "reject", "by": "ann"}));
        assert_eq!(again.status, 409, "{}", again.text);
    }
    assert_eq!(
        decide(&w, "nope", json!({"decision": "approve", "by": "ann"})).status,
        404
    );
    // A finished step of another type is no approval.
    let echo = on_pool(assignment("echo-1", "debug.echo", json!({})), "cpu");
    serve::submit(&w, &echo);
    assert_eq!(serve::result(&w, "echo-1", 5000).status, 200);
    assert_eq!(
        decide(&w, "echo-1", json!({"decision": "approve", "by": "ann"})).status,
        404
    );
    assert_eq!(
        decide(&w, "ap-3", json!({"decision": "perhaps", "by": "ann"})).status,
        400
    );
    assert_eq!(listed_ids(&list(&w, "acme")), Vec::<String>::new());

    let m = |s: &str| serve::metric(&w, s);
    assert_eq!(m("worker_approvals_pending"), Some(1.0));
    assert_eq!(
        m("worker_approval_decisions_total{decision=\"approved\"}"),
        Some(1.0)
    );
    assert_eq!(
        m("worker_approval_decisions_total{decision=\"rejected\"}"),
        Some(1.0)
    );
    assert_eq!(
        m("worker_approval_decisions_total{decision=\"timeout\"}"),
        Some(0.0)
    );
}

#[test]
fn timeout_and_cancel_end_a_pending_approval() {
    let w = Worker::start(&[("CP2_OBSERVABILITY_METRICS_ENABLED", "1")]);
    let t = Instant::now();
    assert_eq!(
        serve::submit(&w, &approval("late", "acme", &[], Some(300))).status,
        202
    );
    let r = serve::result(&w, "late", 5000);
    let took = t.elapsed();
    assert_eq!(r.json["status"], "timeout", "{}", r.text);
    assert_eq!(r.json["error_code"], "CANCELLED_BY_TIMEOUT");
    assert_eq!(r.json["retryable"], true);
    assert!(
        (Duration::from_millis(290)..Duration::from_millis(1500)).contains(&took),
        "timed out after {took:?}"
    );
    support::assert_ms_in(
        "latency",
        support::field_ms(&r.json, "latency_ms"),
        295,
        600,
    );
    assert_eq!(
        decide(&w, "late", json!({"decision": "approve", "by": "ann"})).status,
        409
    );
    assert_eq!(
        serve::metric(&w, "worker_approval_decisions_total{decision=\"timeout\"}"),
        Some(1.0)
    );

    // The step deadline caps timeout_ms.
    let mut capped = approval("capped", "acme", &[], Some(60_000));
    capped["options"] = json!({"deadline_ms": 400});
    assert_eq!(serve::submit(&w, &capped).status, 202);
    let exp = &list(&w, "acme").json["approvals"][0];
    let span = exp["expires_at"].as_u64().unwrap() - exp["requested_at"].as_u64().unwrap();
    support::assert_ms_in("expires_at - requested_at", span, 395, 405);
    assert_eq!(serve::result(&w, "capped", 5000).json["status"], "timeout");

    assert_eq!(
        serve::submit(&w, &approval("gone", "acme", &[], None)).status,
        202
    );
    let t = Instant::now();
    assert_eq!(serve::cancel(&w, "gone").status, 202);
    let r = serve::result(&w, "gone", 5000);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(r.json["status"], "cancelled", "{}", r.text);
    assert_eq!(r.json["retryable"], true);
    assert_eq!(
        decide(&w, "gone", json!({"decision": "approve", "by": "ann"})).status,
        409
    );
    assert_eq!(serve::metric(&w, "worker_approvals_pending"), Some(0.0));
}

#[test]
fn shutdown_answers_pending_approvals_cancelled_without_waiting_the_grace() {
    let dir = support::temp_dir();
    let file = dir.path().join("results.jsonl");
    let mut w = Worker::start(&[
        ("WORKER_SHUTDOWN_GRACE_MS", "20000"),
        ("WORKER_RESULTS_FILE", file.to_str().unwrap()),
    ]);
    for id in ["sd-1", "sd-2"] {
        assert_eq!(
            serve::submit(&w, &approval(id, "acme", &[], None)).status,
            202
        );
    }
    let t = Instant::now();
    w.sigterm();
    assert_eq!(w.wait_exit(Duration::from_secs(15)), 0);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "exit took {:?}",
        t.elapsed()
    );
    let lines = serve::result_lines(&file);
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["status"], "cancelled", "{v}");
        assert_eq!(v["retryable"], true, "{v}");
        assert!(
            v["error_message"].as_str().unwrap().contains("shutdown"),
            "{v}"
        );
    }
    support::check_results(&lines);
}

#[test]
fn two_thousand_parked_approvals_hold_no_thread_and_the_cap_is_queue_full() {
    const N: usize = 2000;
    let w = Worker::start(&[
        ("CP2_OBSERVABILITY_METRICS_ENABLED", "1"),
        ("WORKER_CPU_POOL_SIZE", "1"),
        ("WORKER_MAX_PENDING_APPROVALS", "2000"),
    ]);
    let pid = w.child.id();
    let (all_before, named_before) = (thread_count(pid), engine_threads(pid));
    let agent = support::client();
    let url = w.url("/api/v1/assignments");
    for i in 0..=N {
        // A long deadline: however slow the submissions, none times out meanwhile.
        let mut a = approval(&format!("many-{i:04}"), "acme", &["ann"], None);
        a["options"] = json!({"deadline_ms": 3_600_000});
        let body = a.to_string();
        let resp = agent
            .post(&url)
            .header("content-type", "application/json")
            .send(body.as_bytes())
            .expect("submit");
        let status = resp.status().as_u16();
        if i < N {
            assert_eq!(status, 202, "approval {i}");
        } else {
            // The 2001st: beyond WORKER_MAX_PENDING_APPROVALS.
            assert_eq!(status, 429, "approval {i}");
        }
    }
    drop(agent);
    assert_eq!(
        serve::metric(&w, "worker_approvals_pending"),
        Some(N as f64)
    );
    assert_eq!(engine_threads(pid), named_before, "no engine thread added");
    support::wait_for(Duration::from_secs(30), || {
        (thread_count(pid) <= all_before).then_some(())
    })
    .unwrap_or_else(|| panic!("process threads stay above {all_before}"));
    assert_eq!(
        serve::metric(&w, "worker_active_tasks{resource_pool=\"cpu\"}"),
        Some(0.0)
    );
    assert_eq!(
        serve::metric(&w, "worker_queue_depth{resource_pool=\"cpu\"}"),
        Some(0.0),
        "no queue slot either"
    );
    // The one cpu thread is free.
    let echo = on_pool(assignment("echo", "debug.echo", json!({})), "cpu");
    let r = serve::execute(&w, &echo, 5000);
    assert_eq!(r.json["status"], "success", "{}", r.text);
    assert_eq!(listed_ids(&list(&w, "acme")).len(), 100, "100 by default");
    let most = serve::request(
        "GET",
        &w.url("/api/v1/approvals?tenant_id=acme&limit=5000"),
        &[],
        None,
    );
    assert_eq!(listed_ids(&most).len(), 1000, "a listing is capped at 1000");
}

#[test]
fn the_ingress_token_guards_the_approval_routes() {
    let w = Worker::start(&[("WORKER_API_TOKEN", "s3cret")]);
    let auth = [("Authorization", "Bearer s3cret")];
    let body = approval("tok", "acme", &[], None).to_string();
    let r = serve::request(
        "POST",
        &w.url("/api/v1/assignments"),
        &auth,
        Some(body.as_bytes()),
    );
    assert_eq!(r.status, 202, "{}", r.text);
    let url = w.url("/api/v1/approvals?tenant_id=acme");
    assert_eq!(serve::request("GET", &url, &[], None).status, 401);
    assert_eq!(serve::request("GET", &url, &auth, None).status, 200);
    let decision = br#"{"decision":"approve","by":"ann"}"#;
    let url = w.url("/api/v1/approvals/tok");
    assert_eq!(
        serve::request("POST", &url, &[], Some(decision)).status,
        401
    );
    assert_eq!(
        serve::request("POST", &url, &auth, Some(decision)).status,
        200
    );
}

#[test]
fn run_answers_an_approval_invalid_input_it_needs_serve() {
    let v = support::run_one(
        &approval("in-run", "acme", &[], None),
        &[],
        Duration::from_secs(20),
    );
    assert_eq!(v["status"], "error", "{v}");
    assert_eq!(v["error_code"], "INVALID_INPUT", "{v}");
    assert!(
        v["error_message"].as_str().unwrap().contains("serve"),
        "{v}"
    );
    let mut bad = approval("no-title", "acme", &[], None);
    bad["job"]["payload"] = json!({"approvers": ["ann"]});
    let v = support::run_one(&bad, &[], Duration::from_secs(20));
    assert_eq!(v["error_code"], "MISSING_REQUIRED_FIELD", "{v}");
}
