//! Hostile tenants against the FS blocks (issue 12, SPEC §12.12): the health
//! probe's reserved names, a symlink swap racing puts and gets, temp files
//! (planted, half-written, swept at start-up) and the FS watchdog check.
mod support;

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};
use support::Worker;
use support::serve;

fn step(id: &str, op: &str, payload: Value) -> Value {
    support::with_options(
        support::assignment(id, &format!("fs.blob_{op}"), payload),
        json!({"retry": {"max_attempts": 1}}),
    )
}

/// Submits `a` and waits for its result.
fn run(w: &Worker, a: &Value) -> Value {
    let ack = serve::submit(w, a);
    assert_eq!(ack.status, 202, "{}", ack.text);
    let id = a["assignment_id"].as_str().unwrap();
    let r = serve::result(w, id, 20_000);
    assert_eq!(r.status, 200, "{}", r.text);
    r.json
}

/// Every file and directory under `dir`, relative, sorted (symlinks not followed).
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn a_tenant_cannot_squat_the_health_probe_or_any_caf_name() {
    let w = Worker::start(&[]);
    let root = w.fs_root();
    let pid = w.child.id();
    // What a tenant could do before: a directory where the probe file goes.
    std::fs::create_dir_all(root.join(format!(".caf-health-{pid}/x"))).unwrap();
    let h = serve::health(&w, "/_health");
    assert_eq!(
        h.status, 200,
        "a squatted probe name fails health: {}",
        h.text
    );

    let reserved = [
        format!(".caf-health-{pid}/y"),
        format!("a/.caf-health-{pid}"),
        ".caf-tmp-0123456789abcdef".to_owned(),
        "deep/.caf-anything/file".to_owned(),
    ];
    for (i, p) in reserved.iter().enumerate() {
        for op in ["put", "get", "delete"] {
            let r = run(
                &w,
                &step(
                    &format!("res-{op}-{i}"),
                    op,
                    json!({"path": p, "content": "x", "overwrite": true}),
                ),
            );
            assert_eq!(r["status"], "error", "{op} {p}: {r}");
            assert_eq!(r["error_code"], "PERMISSION_DENIED", "{op} {p}: {r}");
            assert_eq!(r["retryable"], false, "{r}");
        }
    }
    assert!(!root.join("a").exists() && !root.join("deep").exists());
    // Names that merely look alike are ordinary blobs.
    for (i, p) in [".cafe", "caf-health", ".caf", "x/.caf_"]
        .iter()
        .enumerate()
    {
        let r = run(
            &w,
            &step(
                &format!("ok-{i}"),
                "put",
                json!({"path": p, "content": "x"}),
            ),
        );
        assert_eq!(r["status"], "success", "{p}: {r}");
    }
    assert_eq!(serve::health(&w, "/_health").status, 200);
}

/// A thread swaps `root/d` between a real directory and a symlink to a
/// directory outside the root while many puts and gets run through `d/`.
/// Nothing may be written or read outside.
#[test]
fn a_symlink_swap_race_never_escapes_the_root() {
    let dir = support::temp_dir();
    let (root, outside) = (dir.path().join("data"), dir.path().join("outside"));
    std::fs::create_dir_all(root.join("d/sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), "outside secret").unwrap();
    std::fs::write(root.join("d/secret.txt"), "inside").unwrap();

    let mut steps = Vec::new();
    for i in 0..1500 {
        steps.push(step(
            &format!("put-{i}"),
            "put",
            json!({"path": format!("d/new-{i}.txt"), "content": "pwned", "overwrite": true}),
        ));
        steps.push(step(
            &format!("deep-{i}"),
            "put",
            json!({"path": format!("d/sub/n{}/x.txt", i % 7), "content": "pwned", "overwrite": true}),
        ));
        steps.push(step(
            &format!("get-{i}"),
            "get",
            json!({"path": "d/secret.txt"}),
        ));
        if i % 10 == 0 {
            steps.push(step(
                &format!("del-{i}"),
                "delete",
                json!({"path": format!("d/new-{}.txt", i / 2)}),
            ));
        }
    }

    let done = Arc::new(AtomicBool::new(false));
    // Swaps so far: the batch starts only once the swapper is running, so a
    // starved swapper on a busy machine cannot make the race a no-op.
    let counted = Arc::new(std::sync::atomic::AtomicU32::new(0));
    const WARM_UP: u32 = 20;
    let swapper = {
        let (root, done, counted) = (root.clone(), done.clone(), counted.clone());
        std::os::unix::fs::symlink(&outside, root.join("d-link")).unwrap();
        std::thread::spawn(move || {
            // RENAME_EXCHANGE: `d` is always there, a directory or a symlink
            // to `outside`, so the puts never recreate it.
            let (d, link) = (root.join("d"), root.join("d-link"));
            let exchange = || {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &d,
                    rustix::fs::CWD,
                    &link,
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .expect("renameat2(RENAME_EXCHANGE)")
            };
            let mut swaps = 0u32;
            // Bounded: the batch ends long before this many rounds.
            while !done.load(Ordering::Acquire) && swaps < 5_000_000 {
                exchange(); // `d` is the symlink
                std::thread::yield_now();
                exchange(); // `d` is the directory again
                swaps += 1;
                counted.store(swaps, Ordering::Release);
                std::thread::yield_now();
            }
            swaps
        })
    };
    let warm = std::time::Instant::now() + Duration::from_secs(30);
    while counted.load(Ordering::Acquire) < WARM_UP && std::time::Instant::now() < warm {
        std::thread::sleep(Duration::from_millis(1));
    }
    let env = [
        ("WORKER_FS_ROOT", root.to_str().unwrap()),
        ("WORKER_IO_POOL_SIZE", "8"),
    ];
    let out = support::run_lines(&steps, &env, Duration::from_secs(240));
    done.store(true, Ordering::Release);
    let swaps = swapper.join().unwrap();
    // At least one swap while the batch ran, beyond the warm-up.
    assert!(swaps > WARM_UP, "the race barely ran: {swaps} swaps");

    let results = out.json_lines();
    assert_eq!(results.len(), steps.len(), "stderr {:?}", out.stderr);
    let ok = |prefix: &str| {
        results
            .iter()
            .filter(|r| {
                r["assignment_id"].as_str().unwrap().starts_with(prefix) && r["status"] == "success"
            })
            .count()
    };
    for r in &results {
        assert!(
            !r.to_string().contains("outside secret"),
            "read outside the root: {r}"
        );
    }
    assert_eq!(
        tree(&outside),
        ["secret.txt"],
        "written outside the root ({} puts succeeded)",
        ok("put-")
    );
    assert_eq!(
        std::fs::read_to_string(outside.join("secret.txt")).unwrap(),
        "outside secret"
    );
    eprintln!(
        "{swaps} swaps; succeeded: puts {}, deep puts {}, gets {}, deletes {}",
        ok("put-"),
        ok("deep-"),
        ok("get-"),
        ok("del-")
    );
    // Not vacuous: while `d` was a directory the steps worked.
    assert!(
        ok("put-") > 0 && ok("deep-") > 0 && ok("get-") > 0 && ok("del-") > 0,
        "puts {}, deep puts {}, gets {}, deletes {} succeeded; e.g. {}",
        ok("put-"),
        ok("deep-"),
        ok("get-"),
        ok("del-"),
        results
            .iter()
            .filter(|r| r["status"] != "success")
            .map(|r| r["error_message"].to_string())
            .take(6)
            .collect::<Vec<_>>()
            .join(" | ")
    );
}

#[test]
fn a_failing_put_never_deletes_a_file_it_did_not_create() {
    let w = Worker::start(&[]);
    let root = w.fs_root();
    let pid = w.child.id();
    // Files named like the temp files of earlier versions (`.<name>.tmp-<pid>-<n>`).
    let planted: Vec<PathBuf> = (0..32)
        .map(|n| root.join(format!(".f.tmp-{pid}-{n}")))
        .collect();
    for p in &planted {
        std::fs::write(p, "planted").unwrap();
    }
    let r = run(
        &w,
        &step("put-f", "put", json!({"path": "f", "content": "new"})),
    );
    assert_eq!(r["status"], "success", "{r}");
    for p in &planted {
        assert_eq!(
            std::fs::read_to_string(p).ok().as_deref(),
            Some("planted"),
            "{} was removed by a put",
            p.display()
        );
    }
    // A failing put (the file exists, no overwrite) leaves no file of its own.
    let before = tree(&root);
    let r = run(
        &w,
        &step("put-f2", "put", json!({"path": "f", "content": "x"})),
    );
    assert_eq!(r["error_code"], "EXECUTION_FAILED", "{r}");
    assert_eq!(tree(&root), before);
}

#[test]
fn a_half_written_temp_file_is_not_a_blob_and_is_swept_at_start() {
    let dir = support::temp_dir();
    let root = dir.path().join("data");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let plant = |p: &Path, old: bool| {
        std::fs::write(p, "half a blo").unwrap();
        if old {
            let f = std::fs::File::options().write(true).open(p).unwrap();
            f.set_modified(hour_ago).unwrap();
        }
    };
    // Left by a put killed mid-write an hour ago: stale.
    let stale = [
        root.join(".caf-tmp-00112233445566aa"),
        root.join("sub/deeper/.caf-tmp-0123456789abcdef"),
    ];
    for p in &stale {
        plant(p, true);
    }
    // A put of another worker sharing the root may be writing this one now.
    let fresh = root.join("sub/.caf-tmp-fedcba9876543210");
    plant(&fresh, false);
    // Outside the root, even through a symlink inside it: never touched.
    let beyond = outside.join(".caf-tmp-aaaaaaaaaaaaaaaa");
    plant(&beyond, true);
    std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
    // Not the worker's pattern: an ordinary blob.
    let blob = root.join(".tmp-notours");
    plant(&blob, true);

    let env = [("WORKER_FS_ROOT", root.to_str().unwrap())];
    let steps = [
        step(
            "get-stale",
            "get",
            json!({"path": "sub/deeper/.caf-tmp-0123456789abcdef"}),
        ),
        step(
            "get-fresh",
            "get",
            json!({"path": "sub/.caf-tmp-fedcba9876543210"}),
        ),
    ];
    let out = support::run_lines(&steps, &env, Duration::from_secs(30));
    for r in out.json_lines() {
        assert_eq!(r["error_code"], "PERMISSION_DENIED", "{r}");
        assert!(!r.to_string().contains("half a blo"), "{r}");
    }
    // Planted again (the one-shot run may have swept them already): a
    // serve start sweeps them.
    for p in &stale {
        plant(p, true);
    }
    let w = Worker::start(&[("WORKER_FS_ROOT", root.to_str().unwrap())]);
    let swept = support::wait_for(Duration::from_secs(10), || {
        stale.iter().all(|p| !p.exists()).then_some(())
    });
    assert!(
        swept.is_some(),
        "stale temp files were not swept: {:?}",
        tree(&root)
    );
    assert!(fresh.exists(), "a fresh temp file was swept");
    assert!(beyond.exists(), "a file outside the root was swept");
    assert!(blob.exists(), "a blob that is not a temp file was swept");
    drop(w);
}

#[test]
fn health_fails_when_the_fs_watchdog_is_saturated() {
    let w = Worker::start(&[
        ("CP2_COMPLETE_TIMEOUT_ENABLED", "true"),
        ("WORKER_FS_READ_TIMEOUT_MS", "20"),
    ]);
    support::mkfifo(&w.fs_root().join("pipe"));
    assert_eq!(serve::health(&w, "/_health").status, 200);
    // Each get opens a pipe nobody writes to: its helper thread is stuck for good.
    for i in 0..64 {
        let r = run(
            &w,
            &step(&format!("pipe-{i}"), "get", json!({"path": "pipe"})),
        );
        assert_eq!(r["error_code"], "CANCELLED_BY_TIMEOUT", "{r}");
    }
    let r = run(&w, &step("after", "get", json!({"path": "nothing"})));
    assert_eq!(r["error_code"], "RESOURCE_UNAVAILABLE", "{r}");
    assert!(
        r["error_message"].as_str().unwrap_or("").contains("stuck"),
        "{r}"
    );

    let h = serve::health(&w, "/_health");
    assert_eq!(h.status, 503, "{}", h.text);
    let detail = h.json["checks"]["fs_watchdog"].as_str().unwrap_or("");
    assert!(detail.contains("64"), "{}", h.text);
    assert_eq!(h.json["checks"]["pools"], "ok", "{}", h.text);
    assert_eq!(h.json["checks"]["fs_root"], "ok", "{}", h.text);
    // Liveness is about pool threads only.
    assert_eq!(serve::health(&w, "/livez").status, 200);
}
