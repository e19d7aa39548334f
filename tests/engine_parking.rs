//! The engine's hooks for fronts other than the ingress, driven through the
//! library (the NATS transport calls them): `withdraw_unstarted` hands
//! back a step no thread runs, for a JetStream `+NAK`, and
//! `decide_approval` answers an approval.

use caf_worker::config::{Sources, load};
use caf_worker::contract::{Assignment, ExecResult, IntakeRules, Status, parse_assignment};
use caf_worker::engine::{
    Admission, Backpressure, DecideError, Decision, Engine, Lookup, NoopObserver, ResultSink,
    Verdict,
};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Collect(Mutex<Vec<Arc<ExecResult>>>);

impl ResultSink for Collect {
    fn deliver(&self, r: &Arc<ExecResult>) {
        self.0.lock().unwrap().push(r.clone());
    }
}

fn engine(dir: &std::path::Path) -> (Engine, Arc<Collect>) {
    let vars = [
        ("WORKER_FS_ROOT", dir.join("data").display().to_string()),
        ("WORKER_CPU_POOL_SIZE", "1".into()),
        ("CP2_ADVANCED_RETRY_ENABLED", "1".into()),
    ];
    let settings = load(&Sources {
        env: vars.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        ..Sources::default()
    })
    .unwrap();
    let sink = Arc::new(Collect::default());
    let e = Engine::start(&settings, Arc::new(NoopObserver), vec![sink.clone()]).unwrap();
    (e, sink)
}

fn step(id: &str, job: &str, payload: Value, options: Value) -> Assignment {
    let a = json!({"version": "1", "assignment_id": id, "request_id": "r", "tenant_id": "t",
                   "job": {"type": job, "payload": payload}, "options": options});
    let rules = IntakeRules {
        max_body_bytes: 1 << 20,
        strict_ids: true,
        default_deadline_ms: 30_000,
    };
    parse_assignment(a.to_string().as_bytes(), &rules).unwrap()
}

fn accept(e: &Engine, a: Assignment) {
    assert!(matches!(
        e.submit(a, Backpressure::Reject),
        Admission::Accepted(_)
    ));
}

fn until(limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "condition not reached in {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn withdraw_unstarted_takes_queued_parked_and_pending_work_and_leaves_running_steps() {
    let dir = tempfile::tempdir().unwrap();
    let (e, sink) = engine(dir.path());
    e.enable_approvals();
    // A parked retry (10 s backoff), then a running sleep on the only cpu
    // thread with an echo queued behind it, and a pending approval.
    let retry =
        json!({"retry": {"max_attempts": 2, "backoff_ms": 10_000, "max_backoff_ms": 10_000}});
    let fail = json!({"error_code": "NETWORK_ERROR", "fail_attempts": 1});
    accept(&e, step("parked", "debug.fail", fail, retry));
    until(Duration::from_secs(5), || {
        e.pool_stats()[0].retries_waiting == 1
    });
    accept(
        &e,
        step("running", "debug.sleep", json!({"ms": 300}), json!({})),
    );
    until(Duration::from_secs(5), || e.pool_stats()[0].active == 1);
    accept(&e, step("queued", "debug.echo", json!({}), json!({})));
    accept(
        &e,
        step("ask", "human.approval", json!({"title": "ok?"}), json!({})),
    );
    assert_eq!(e.approvals_pending(), 1);

    let withdrawn: BTreeSet<String> = ["running", "parked", "queued", "ask", "never-seen"]
        .into_iter()
        .filter(|id| e.withdraw_unstarted(id))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        withdrawn,
        ["ask", "parked", "queued"].map(str::to_owned).into(),
        "everything no thread runs"
    );
    assert_eq!(e.pool_stats()[0].retries_waiting, 0);
    assert_eq!(e.approvals_pending(), 0);
    let report = e.shutdown(Duration::from_secs(5));
    assert!(report.drained);
    let results: Vec<(String, Status)> = sink
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.assignment_id.clone(), r.status))
        .collect();
    assert_eq!(
        results,
        [("running".to_owned(), Status::Success)],
        "withdrawn steps get no result here; the running one finished in the grace"
    );
    for id in ["parked", "queued", "ask"] {
        assert!(matches!(e.lookup(id), Lookup::Unknown), "{id} is forgotten");
    }
}

#[test]
fn decide_approval_is_the_decision_hook() {
    let dir = tempfile::tempdir().unwrap();
    let (e, _) = engine(dir.path());
    e.enable_approvals();
    let payload = json!({"title": "ok?", "approvers": ["ann"], "data": [1, 2]});
    accept(&e, step("ask", "human.approval", payload, json!({})));
    let pending = e.pending_approvals("t", 10);
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].data, json!([1, 2]));
    assert!(e.pending_approvals("other", 10).is_empty());
    let by = |name: &str, verdict| Decision {
        verdict,
        by: name.to_owned(),
        comment: None,
    };
    assert_eq!(
        e.decide_approval("ask", &by("bob", Verdict::Approve))
            .unwrap_err(),
        DecideError::NotApprover
    );
    let r = e
        .decide_approval("ask", &by("ann", Verdict::Reject))
        .unwrap();
    assert_eq!(r.status, Status::Success);
    assert_eq!(r.outputs.as_ref().unwrap()["decision"], "rejected");
    assert_eq!(
        e.decide_approval("ask", &by("ann", Verdict::Approve))
            .unwrap_err(),
        DecideError::AlreadyDecided
    );
    assert_eq!(
        e.decide_approval("nope", &by("ann", Verdict::Approve))
            .unwrap_err(),
        DecideError::Unknown
    );
    e.shutdown(Duration::from_secs(1));
}
