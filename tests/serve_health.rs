//! `caf-worker serve`, health port (SPEC §8.2): `/_health`, `/livez`,
//! `/readyz`, GET and HEAD, the FS-root check and readiness while draining.
mod support;

use std::time::{Duration, Instant};
use support::Worker;
use support::serve::{self, sleep_step};

/// `2026-11-27T10:00:00.123456Z`: UTC, exactly six fractional digits.
fn is_micros_utc(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    b.len() == 27
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..26)
        && b[26] == b'Z'
}

#[test]
fn timestamp_shape_checker_is_strict() {
    assert!(is_micros_utc("2026-11-27T10:00:00.123456Z"));
    assert!(!is_micros_utc("2026-11-27T10:00:00.123Z"));
    assert!(!is_micros_utc("2026-11-27T10:00:00.1234567Z"));
    assert!(!is_micros_utc("2026-11-27T10:00:00.123456+00:00"));
    assert!(!is_micros_utc("2026-11-27 10:00:00.123456Z"));
}

#[test]
fn health_livez_readyz_answer_200_with_a_microsecond_utc_timestamp() {
    let w = Worker::start(&[]);
    let h = serve::health(&w, "/_health");
    assert_eq!(h.status, 200, "{}", h.text);
    assert_eq!(h.json["status"], "healthy", "{}", h.text);
    let ts = h.json["timestamp"].as_str().unwrap();
    assert!(is_micros_utc(ts), "timestamp {ts:?}");
    assert!(
        h.header("content-type")
            .is_some_and(|v| v.starts_with("application/json"))
    );
    assert!(h.json.get("checks").is_none(), "{}", h.text);

    let l = serve::health(&w, "/livez");
    assert_eq!(l.status, 200, "{}", l.text);
    assert!(is_micros_utc(l.json["timestamp"].as_str().unwrap()));
    let r = serve::health(&w, "/readyz");
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "ready", "{}", r.text);
    // Query strings do not change the route.
    assert_eq!(serve::health(&w, "/_health?verbose=1").status, 200);
}

#[test]
fn head_works_like_get_without_a_body() {
    let w = Worker::start(&[]);
    for path in ["/_health", "/livez", "/readyz"] {
        let req = format!("HEAD {path} HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n");
        let (status, head, body) =
            serve::raw_exchange(w.health, req.as_bytes(), Duration::from_secs(5));
        assert_eq!(status, 200, "{path}: {head}");
        assert!(body.is_empty(), "{path}: HEAD sent a body: {body:?}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{path}: {head}"
        );
    }
}

#[test]
fn health_port_routes_404_and_405() {
    let w = Worker::start(&[]);
    let nf = serve::health(&w, "/health");
    assert_eq!(nf.status, 404, "{}", nf.text);
    assert_eq!(nf.json["error"], "not_found");
    let a = serve::request(
        "POST",
        &format!("http://{}/_health", w.health),
        &[],
        Some(b"{}"),
    );
    assert_eq!(a.status, 405, "{}", a.text);
    assert_eq!(a.header("allow"), Some("GET, HEAD"));
    assert_eq!(a.json["error"], "method_not_allowed");
}

/// Tests run as root in CI, where `chmod 0555` does not stop writes (root
/// bypasses permission bits). Moving the root away makes the worker's write
/// probe fail for any user; moving it back must heal the check.
#[test]
fn unwritable_fs_root_turns_health_503_with_checks_and_back() {
    let w = Worker::start(&[]);
    assert_eq!(serve::health(&w, "/_health").status, 200);
    let root = w.fs_root();
    let away = root.with_file_name("data-moved-away");
    std::fs::rename(&root, &away).unwrap();

    let h = serve::health(&w, "/_health");
    assert_eq!(h.status, 503, "{}", h.text);
    assert_eq!(h.json["status"], "unhealthy", "{}", h.text);
    assert!(is_micros_utc(h.json["timestamp"].as_str().unwrap()));
    let fs = h.json["checks"]["fs_root"].as_str().unwrap_or("");
    assert!(fs.contains("not writable"), "{}", h.text);
    assert_eq!(h.json["checks"]["pools"], "ok", "{}", h.text);
    // HEAD carries the same status.
    let (status, head, _) = serve::raw_exchange(
        w.health,
        b"HEAD /_health HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(status, 503, "{head}");
    // Liveness is about pool threads only.
    assert_eq!(serve::health(&w, "/livez").status, 200);

    std::fs::rename(&away, &root).unwrap();
    let h = serve::health(&w, "/_health");
    assert_eq!(h.status, 200, "{}", h.text);
    assert!(
        std::fs::read_dir(&root).unwrap().next().is_none(),
        "the probe file was left behind"
    );
}

#[test]
fn readyz_is_503_while_draining() {
    let mut w = Worker::start(&[("WORKER_SHUTDOWN_GRACE_MS", "1500")]);
    assert_eq!(
        serve::submit(&w, &sleep_step("hz-long", 20_000, "cpu")).status,
        202
    );
    assert_eq!(serve::health(&w, "/readyz").status, 200);
    let t0 = Instant::now();
    w.sigterm();
    let not_ready = support::wait_for(Duration::from_secs(1), || {
        let r = serve::health(&w, "/readyz");
        (r.status == 503).then_some(r)
    })
    .expect("/readyz stayed 200 after SIGTERM");
    assert_eq!(not_ready.json["status"], "not_ready", "{}", not_ready.text);
    assert_eq!(not_ready.json["reason"], "draining", "{}", not_ready.text);
    assert!(is_micros_utc(not_ready.json["timestamp"].as_str().unwrap()));
    // Draining is not dying: idle pool threads leave at once, yet a failed
    // liveness probe now would get the worker killed mid-drain. Probe for a
    // while to see the state after they left.
    let until = t0 + Duration::from_millis(900);
    let mut probes = 0;
    while Instant::now() < until {
        let l = serve::health(&w, "/livez");
        assert_eq!(l.status, 200, "livez while draining: {}", l.text);
        let h = serve::health(&w, "/_health");
        assert_eq!(h.status, 200, "_health while draining: {}", h.text);
        probes += 1;
    }
    assert!(probes >= 3, "only {probes} probes in the drain window");
    assert_eq!(w.wait_exit(Duration::from_secs(10)), 0);
}

/// Voluntary context switches of every thread of `pid` so far.
fn wakeups(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
                .filter_map(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .sum()
        })
        .unwrap_or(0)
}

/// An idle worker sleeps (SPEC §12.18, fifth pass): its threads wait for
/// work, a client or a signal instead of polling; their safety-net
/// timeouts come once a minute. Polling handler threads, main thread and
/// port pollers made ~150 wake-ups a second. (Voluntary switches only: they
/// do not grow with the machine's load, preemptions do.)
#[test]
fn an_idle_worker_does_not_poll() {
    let w = Worker::start(&[]);
    let pid = w.child.id();
    std::thread::sleep(Duration::from_millis(500)); // start-up settles
    let (before, t0) = (wakeups(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let per_sec = (wakeups(pid) - before) as f64 / t0.elapsed().as_secs_f64();
    eprintln!("idle worker: {per_sec:.0} wake-ups/s");
    assert!(
        per_sec < 10.0,
        "an idle worker woke {per_sec:.0} times a second"
    );
}
