//! `WORKER_RESULT_RETENTION_BYTES` (SPEC §15, §12.12): retained results are
//! bounded by their total size as well as their count; oldest evicted first.
mod support;

use serde_json::json;
use support::Worker;
use support::serve;

/// Resident set of `pid` in KiB (Linux `/proc`).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_flood_of_large_results_is_bounded_by_bytes_oldest_first() {
    const N: usize = 200;
    const MB: usize = 1_000_000;
    // 8 MiB: at most 8 results of 1 MB are kept.
    let w = Worker::start(&[("WORKER_RESULT_RETENTION_BYTES", "8388608")]);
    let pid = w.child.id();
    let rss_before = rss_kib(pid);
    let big = "x".repeat(MB);
    for i in 0..N {
        let a = support::assignment(&format!("flood-{i}"), "debug.echo", json!({"data": big}));
        let ack = serve::submit(&w, &a);
        assert_eq!(ack.status, 202, "{i}: {}", ack.text);
        let r = serve::result(&w, &format!("flood-{i}"), 20_000);
        assert_eq!(r.status, 200, "{i}: {}", &r.text[..r.text.len().min(300)]);
    }
    let rss_after = rss_kib(pid);
    eprintln!("RSS before {rss_before} KiB, after {N} x 1 MB echoes {rss_after} KiB");

    // The newest results are there; the oldest were evicted (404, as unknown).
    let last = serve::result(&w, &format!("flood-{}", N - 1), 0);
    assert_eq!(last.status, 200);
    assert_eq!(
        last.json["outputs"]["data"].as_str().map(str::len),
        Some(MB)
    );
    let kept = (0..N)
        .filter(|i| serve::result(&w, &format!("flood-{i}"), 0).status == 200)
        .count();
    assert!((4..=8).contains(&kept), "{kept} results kept");
    for i in 0..N - 8 {
        let r = serve::result(&w, &format!("flood-{i}"), 0);
        assert_eq!(r.status, 404, "flood-{i} should be evicted: {}", r.status);
    }
    // 200 MB went through; what stays resident is the bound plus allocator
    // slack and buffers, far from the 200 MB kept without it.
    assert!(
        rss_after < rss_before + 96 * 1024,
        "RSS {rss_after} KiB after the flood (before {rss_before} KiB)"
    );
}

#[test]
fn the_setting_is_validated_and_named() {
    let out = support::run_cmd(
        &["run", "-"],
        &[("WORKER_RESULT_RETENTION_BYTES", "lots")],
        "",
        std::time::Duration::from_secs(20),
    );
    assert_eq!(out.code, 2, "{:?}", out.stderr);
    assert!(
        out.stderr
            .iter()
            .any(|l| l.contains("WORKER_RESULT_RETENTION_BYTES")),
        "{:?}",
        out.stderr
    );
}
