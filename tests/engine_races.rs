//! Exactly-one-result races, driven through the library's engine directly
//! (deterministic ordering that is hard to force over HTTP).

use caf_worker::config::{Sources, load};
use caf_worker::contract::{Assignment, ExecResult, IntakeRules, Status, parse_assignment};
use caf_worker::engine::{
    Admission, Backpressure, CancelOutcome, Engine, Lookup, NoopObserver, ResultSink,
};
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Collect(Mutex<Vec<Arc<ExecResult>>>);

impl ResultSink for Collect {
    fn deliver(&self, r: &Arc<ExecResult>) {
        self.0.lock().unwrap().push(r.clone());
    }
}

fn engine(env: &[(&str, &str)], dir: &std::path::Path) -> (Engine, Arc<Collect>) {
    let mut vars: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    vars.push((
        "WORKER_FS_ROOT".into(),
        dir.join("data").display().to_string(),
    ));
    let settings = load(&Sources {
        env: vars.into_iter().collect(),
        ..Sources::default()
    })
    .unwrap();
    let sink = Arc::new(Collect::default());
    let e = Engine::start(&settings, Arc::new(NoopObserver), vec![sink.clone()]).unwrap();
    (e, sink)
}

fn step(id: &str, request: &str, job: &str, payload: serde_json::Value, class: &str) -> Assignment {
    let a = json!({"version": "1", "assignment_id": id, "request_id": request, "tenant_id": "t",
                   "job": {"type": job, "payload": payload, "resources": {"class": class}}});
    let rules = IntakeRules {
        max_body_bytes: 1 << 20,
        strict_ids: true,
        default_deadline_ms: 30_000,
    };
    parse_assignment(a.to_string().as_bytes(), &rules).unwrap()
}

fn wait_done(e: &Engine, id: &str) -> Arc<ExecResult> {
    match e.wait_result(id, Duration::from_secs(10)) {
        Lookup::Done(r) => r,
        other => panic!("{id}: {other:?}"),
    }
}

#[test]
fn a_stale_cancelled_handle_never_completes_a_resent_assignment() {
    let dir = tempfile::tempdir().unwrap();
    let (e, sink) = engine(
        &[
            ("WORKER_CPU_POOL_SIZE", "1"),
            ("WORKER_RESULT_RETENTION", "1"),
        ],
        dir.path(),
    );
    // A occupies the only cpu thread; B waits behind it and is cancelled there.
    assert!(matches!(
        e.submit(
            step("A", "ra", "debug.sleep", json!({"ms": 400}), "cpu"),
            Backpressure::Reject
        ),
        Admission::Accepted(_)
    ));
    assert!(matches!(
        e.submit(
            step("B", "r1", "debug.echo", json!({}), "cpu"),
            Backpressure::Reject
        ),
        Admission::Accepted(_)
    ));
    assert_eq!(e.cancel("B"), CancelOutcome::Requested);
    assert_eq!(wait_done(&e, "B").status, Status::Cancelled);
    // C finishes on the io pool and pushes B's result out of the retention of 1.
    assert!(matches!(
        e.submit(
            step("C", "rc", "debug.echo", json!({}), "io"),
            Backpressure::Reject
        ),
        Admission::Accepted(_)
    ));
    wait_done(&e, "C");
    assert!(matches!(e.lookup("B"), Lookup::Unknown));
    // B is sent again; its old queue entry is still behind A.
    assert!(matches!(
        e.submit(
            step("B", "r2", "debug.echo", json!({}), "cpu"),
            Backpressure::Reject
        ),
        Admission::Accepted(_)
    ));
    // Wait for A (the thread then drains the stale B and the new B) and the new B.
    let count = |id: &str| {
        sink.0
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.assignment_id == id)
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while (count("A") < 1 || count("B") < 2) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50)); // room for a wrong extra result to show up
    let b: Vec<_> = sink
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.assignment_id == "B")
        .cloned()
        .collect();
    let summary: Vec<_> = b.iter().map(|r| (r.request_id.clone(), r.status)).collect();
    assert_eq!(
        summary,
        vec![
            ("r1".to_owned(), Status::Cancelled),
            ("r2".to_owned(), Status::Success)
        ],
        "one result per accepted submission, each its own"
    );
    match e.lookup("B") {
        Lookup::Done(r) => assert_eq!((r.request_id.as_str(), r.status), ("r2", Status::Success)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_duplicate_is_never_acknowledged_for_an_assignment_the_queue_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let (e, _) = engine(
        &[
            ("WORKER_CPU_POOL_SIZE", "1"),
            ("CP2_QUEUE_MANAGEMENT_ENABLED", "1"),
            ("WORKER_MAX_QUEUE_SIZE", "1"),
        ],
        dir.path(),
    );
    assert!(matches!(
        e.submit(
            step("busy", "r", "debug.sleep", json!({"ms": 1500}), "cpu"),
            Backpressure::Reject
        ),
        Admission::Accepted(_)
    ));
    let deadline = Instant::now() + Duration::from_secs(5);
    while e.pool_stats()[0].active == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(matches!(
        e.submit(
            step("fill", "r", "debug.echo", json!({}), "cpu"),
            Backpressure::Reject
        ),
        Admission::Accepted(_)
    ));
    // The queue is full: every concurrent submission of X must be refused, and
    // none may be told "duplicate" of a registration that then vanishes.
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let e = e.clone();
            std::thread::spawn(move || {
                let mut dups = 0;
                for _ in 0..200 {
                    match e.submit(
                        step("X", "rx", "debug.echo", json!({}), "cpu"),
                        Backpressure::Reject,
                    ) {
                        Admission::Duplicate(_) => dups += 1,
                        Admission::Accepted(_) => panic!("the queue was full"),
                        Admission::Rejected(..) => {}
                    }
                }
                dups
            })
        })
        .collect();
    let dups: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(dups, 0);
    assert!(matches!(e.lookup("X"), Lookup::Unknown));
}

#[test]
fn a_queued_step_is_answered_at_its_deadline_even_behind_far_deadlines() {
    let dir = tempfile::tempdir().unwrap();
    let (e, sink) = engine(
        &[
            ("WORKER_CPU_POOL_SIZE", "1"),
            ("CP2_COMPLETE_TIMEOUT_ENABLED", "1"),
        ],
        dir.path(),
    );
    // The blocker holds the only cpu thread for 2 s; it and `far` have 60 s
    // deadlines. Once the deadline thread answered `first` (100 ms), it
    // sleeps until 60 s.
    let mut blocker = step("blocker", "rb", "debug.sleep", json!({"ms": 2000}), "cpu");
    blocker.deadline_ms = Some(60_000);
    let mut first = step("first", "r0", "debug.echo", json!({}), "cpu");
    first.deadline_ms = Some(100);
    let mut far = step("far", "rf", "debug.echo", json!({}), "cpu");
    far.deadline_ms = Some(60_000);
    for a in [blocker, first, far] {
        assert!(matches!(
            e.submit(a, Backpressure::Reject),
            Admission::Accepted(_)
        ));
    }
    let r = wait_done(&e, "first");
    assert_eq!(r.status, Status::Timeout, "{r:?}");
    assert!((100..=1500).contains(&r.queue_ms), "{r:?}");
    // A 300 ms deadline behind them must wake the thread: answered at its
    // deadline, not at 60 s nor when the blocker frees the thread (2 s).
    let mut near = step("near", "rn", "debug.echo", json!({}), "cpu");
    near.deadline_ms = Some(300);
    assert!(matches!(
        e.submit(near, Backpressure::Wait),
        Admission::Accepted(_)
    ));
    let r = wait_done(&e, "near");
    assert_eq!(r.status, Status::Timeout, "{r:?}");
    assert_eq!(r.attempts, 0, "{r:?}");
    // Slack for a loaded machine, well below the blocker's 2 s.
    assert!((300..=1500).contains(&r.queue_ms), "{r:?}");
    assert_eq!(wait_done(&e, "far").status, Status::Success);
    assert_eq!(wait_done(&e, "blocker").status, Status::Success);
    // The pool thread reached (and skipped) `near` after the blocker: still
    // one result for it.
    let results = sink.0.lock().unwrap();
    assert_eq!(
        results.iter().filter(|r| r.assignment_id == "near").count(),
        1
    );
}
