//! `fs.blob_put`, `fs.blob_get`, `fs.blob_delete` (SPEC §4.2) under a temp
//! `WORKER_FS_ROOT`, CP1 baseline: round trips, overwrite rules, missing
//! files, and every way a path could leave the root (including real symlinks).
mod support;

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(20);

/// A temp dir with `data/` (the FS root) and `outside/` beside it.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = support::temp_dir();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::create_dir_all(dir.path().join("outside")).unwrap();
        Fixture { dir }
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }
    /// Runs `steps` one after another (one io thread, FIFO) and returns the
    /// results in input order.
    fn run(&self, steps: &[Value]) -> Vec<Value> {
        let root = self.root();
        let env = [
            ("WORKER_FS_ROOT", root.to_str().unwrap()),
            ("WORKER_IO_POOL_SIZE", "1"),
        ];
        support::run_in_order(steps, &env, LIMIT)
    }
    fn one(&self, step: Value) -> Value {
        self.run(&[step]).remove(0)
    }
}

fn step(id: &str, op: &str, payload: Value) -> Value {
    // One attempt: a failure is reported without CP1's retry delays.
    support::with_options(
        support::assignment(id, &format!("fs.blob_{op}"), payload),
        json!({"retry": {"max_attempts": 1}}),
    )
}

/// A get, an overwriting put and a delete of each path (ids `get-N`, …).
fn get_put_delete(paths: &[Value]) -> Vec<Value> {
    let mut steps = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        steps.push(step(&format!("get-{i}"), "get", json!({"path": p})));
        steps.push(step(
            &format!("put-{i}"),
            "put",
            json!({"path": p, "content": "x", "overwrite": true}),
        ));
        steps.push(step(&format!("del-{i}"), "delete", json!({"path": p})));
    }
    steps
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn assert_error(r: &Value, codes: &[&str]) {
    assert_eq!(r["status"], "error", "{r}");
    assert!(
        codes.contains(&r["error_code"].as_str().unwrap_or("")),
        "expected one of {codes:?}: {r}"
    );
    assert!(
        r.get("outputs")
            .is_none_or(|o| o.get("content").is_none() && o.get("content_base64").is_none()),
        "an error must not carry file content: {r}"
    );
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn put_get_delete_round_trip_with_sha256() {
    let f = Fixture::new();
    let text = "hello, blob ✓";
    let sha = sha256_hex(text.as_bytes());
    let r = f.run(&[
        step("put", "put", json!({"path": "a/b/c.txt", "content": text})),
        step("get", "get", json!({"path": "a/b/c.txt"})),
        step("get-dot", "get", json!({"path": "./a//b/./c.txt"})),
        step("delete", "delete", json!({"path": "a/b/c.txt"})),
        step("get-gone", "get", json!({"path": "a/b/c.txt"})),
        step("delete-again", "delete", json!({"path": "a/b/c.txt"})),
    ]);
    let put = &r[0];
    assert_eq!(put["status"], "success", "{put}");
    assert_eq!(put["outputs"]["path"], "a/b/c.txt");
    assert_eq!(put["outputs"]["size"], text.len());
    assert_eq!(put["outputs"]["sha256"], sha);

    let get = &r[1];
    assert_eq!(get["status"], "success", "{get}");
    assert_eq!(get["outputs"]["path"], "a/b/c.txt");
    assert_eq!(get["outputs"]["content"], text);
    assert_eq!(get["outputs"]["size"], text.len());
    assert_eq!(get["outputs"]["sha256"], sha);
    let modified = get["outputs"]["modified"].as_str().expect("modified");
    assert!(
        modified.len() == 27 && modified.ends_with('Z') && modified.as_bytes()[10] == b'T',
        "modified is RFC 3339 UTC: {modified}"
    );
    assert_eq!(
        r[2]["outputs"]["path"], "a/b/c.txt",
        "paths are normalised: {}",
        r[2]
    );
    assert_eq!(r[2]["outputs"]["content"], text);

    assert_eq!(r[3]["status"], "success");
    assert_eq!(
        r[3]["outputs"],
        json!({"path": "a/b/c.txt", "deleted": true})
    );
    assert_error(&r[4], &["RESOURCE_UNAVAILABLE"]);
    assert_eq!(r[5]["status"], "success");
    assert_eq!(r[5]["outputs"]["deleted"], false);
    // The atomic put left no temporary file behind.
    assert!(
        files_in(&f.root().join("a/b")).is_empty(),
        "{:?}",
        files_in(&f.root().join("a/b"))
    );
}

#[test]
fn put_writes_the_file_on_disk_without_leftovers() {
    let f = Fixture::new();
    let r = f.one(step(
        "put",
        "put",
        json!({"path": "dir/file.txt", "content": "on disk"}),
    ));
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(
        std::fs::read_to_string(f.root().join("dir/file.txt")).unwrap(),
        "on disk"
    );
    assert_eq!(files_in(&f.root().join("dir")), ["file.txt"]);
}

#[test]
fn put_without_overwrite_on_an_existing_file_fails_and_is_not_retryable() {
    let f = Fixture::new();
    std::fs::write(f.root().join("exists.txt"), "old").unwrap();
    let r = f.run(&[
        step(
            "no-overwrite",
            "put",
            json!({"path": "exists.txt", "content": "new"}),
        ),
        step(
            "explicit-false",
            "put",
            json!({"path": "exists.txt", "content": "new", "overwrite": false}),
        ),
    ]);
    for r in &r {
        assert_error(r, &["EXECUTION_FAILED"]);
        assert_eq!(r["retryable"], false, "{r}");
    }
    assert_eq!(
        std::fs::read_to_string(f.root().join("exists.txt")).unwrap(),
        "old"
    );
    // With more attempts (CP1 retries every error) the block refuses every time.
    let mut again = support::assignment(
        "two-attempts",
        "fs.blob_put",
        json!({"path": "exists.txt", "content": "new"}),
    );
    again["options"] = json!({"retry": {"max_attempts": 2}});
    let r = f.one(again);
    assert_error(&r, &["EXECUTION_FAILED"]);
    assert_eq!(r["retryable"], false);
    assert_eq!(
        std::fs::read_to_string(f.root().join("exists.txt")).unwrap(),
        "old"
    );

    let r = f.one(step(
        "overwrite",
        "put",
        json!({"path": "exists.txt", "content": "new", "overwrite": true}),
    ));
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(
        std::fs::read_to_string(f.root().join("exists.txt")).unwrap(),
        "new"
    );
    assert_eq!(files_in(&f.root()), ["exists.txt"], "no temp files left");
}

#[test]
fn get_of_a_missing_file_is_resource_unavailable() {
    let f = Fixture::new();
    let r = f.one(step("missing", "get", json!({"path": "nope/never.txt"})));
    assert_error(&r, &["RESOURCE_UNAVAILABLE"]);
    assert_eq!(r["retryable"], true, "a missing file may appear later: {r}");
}

#[test]
fn content_base64_round_trips_binary_bytes() {
    let f = Fixture::new();
    let bytes: Vec<u8> = (0u8..=255).chain([0xff, 0x00, 0xc3]).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let r = f.run(&[
        step(
            "put-bin",
            "put",
            json!({"path": "bin/blob.dat", "content_base64": b64}),
        ),
        step("get-bin", "get", json!({"path": "bin/blob.dat"})),
        step(
            "both",
            "put",
            json!({"path": "x", "content": "a", "content_base64": "YQ=="}),
        ),
        step(
            "bad-b64",
            "put",
            json!({"path": "x", "content_base64": "***"}),
        ),
        step("neither", "put", json!({"path": "x"})),
    ]);
    assert_eq!(r[0]["status"], "success", "{}", r[0]);
    assert_eq!(r[0]["outputs"]["size"], bytes.len());
    assert_eq!(r[0]["outputs"]["sha256"], sha256_hex(&bytes));
    assert_eq!(std::fs::read(f.root().join("bin/blob.dat")).unwrap(), bytes);
    assert_eq!(r[1]["status"], "success", "{}", r[1]);
    assert!(
        r[1]["outputs"].get("content").is_none(),
        "not UTF-8: {}",
        r[1]
    );
    assert_eq!(r[1]["outputs"]["content_base64"], b64);
    assert_eq!(r[1]["outputs"]["sha256"], sha256_hex(&bytes));
    assert_error(&r[2], &["INVALID_INPUT"]);
    assert_error(&r[3], &["INVALID_FORMAT"]);
    assert_error(&r[4], &["MISSING_REQUIRED_FIELD"]);
    assert!(!f.root().join("x").exists());
}

#[test]
fn dot_dot_empty_and_nul_paths_are_refused() {
    let f = Fixture::new();
    std::fs::write(f.outside().join("secret.txt"), "outside").unwrap();
    std::fs::create_dir_all(f.root().join("sub")).unwrap();
    let escaping = [
        "../outside/secret.txt",
        "sub/../../outside/secret.txt",
        "sub/..",
        "..",
    ];
    for r in f.run(&get_put_delete(&escaping.map(|p| json!(p)))) {
        assert_error(&r, &["PERMISSION_DENIED", "INVALID_INPUT"]);
        assert_eq!(r["retryable"], false, "{r}");
    }
    assert_eq!(
        std::fs::read_to_string(f.outside().join("secret.txt")).unwrap(),
        "outside"
    );

    let bad = [
        json!(""),
        json!("/"),
        json!("."),
        json!("./"),
        json!("a\u{0}b"),
        json!("sub/\u{0}"),
    ];
    for r in f.run(&get_put_delete(&bad)) {
        assert_error(&r, &["PERMISSION_DENIED", "INVALID_INPUT"]);
        assert_eq!(r["retryable"], false, "{r}");
    }
    let r = f.run(&[
        step("no-path", "get", json!({})),
        step("num-path", "get", json!({"path": 7})),
    ]);
    assert_error(&r[0], &["MISSING_REQUIRED_FIELD"]);
    assert_error(&r[1], &["INVALID_FORMAT"]);
    assert_eq!(
        files_in(&f.root()),
        ["sub"],
        "nothing was created in the root"
    );
    assert!(files_in(&f.root().join("sub")).is_empty());
    assert_eq!(
        files_in(&f.outside()),
        ["secret.txt"],
        "nothing was created outside"
    );
}

#[test]
fn absolute_paths_are_taken_relative_to_the_root() {
    let f = Fixture::new();
    let secret = f.outside().join("secret.txt");
    std::fs::write(&secret, "outside").unwrap();
    let abs = secret.to_str().unwrap().to_owned();
    let rel = abs.trim_start_matches('/').to_owned();
    let r = f.run(&[
        // The real outside file is never read: `/…` names a path under the root.
        step("get-abs", "get", json!({"path": abs})),
        step(
            "put-abs",
            "put",
            json!({"path": abs, "content": "inside", "overwrite": true}),
        ),
        step("get-abs-again", "get", json!({"path": abs})),
        step(
            "put-root-abs",
            "put",
            json!({"path": "/top.txt", "content": "top"}),
        ),
    ]);
    // SPEC §4.2: a leading `/` is taken relative to the root, so the first
    // get names a file under the root that does not exist yet.
    assert_error(&r[0], &["RESOURCE_UNAVAILABLE"]);
    assert_eq!(r[1]["status"], "success", "{}", r[1]);
    assert_eq!(r[1]["outputs"]["path"], rel.as_str());
    assert_eq!(
        std::fs::read_to_string(f.root().join(&rel)).unwrap(),
        "inside",
        "written under the root"
    );
    assert_eq!(r[2]["outputs"]["content"], "inside");
    assert_eq!(
        std::fs::read_to_string(&secret).unwrap(),
        "outside",
        "outside file untouched"
    );
    assert_eq!(r[3]["status"], "success", "{}", r[3]);
    assert_eq!(r[3]["outputs"]["path"], "top.txt");
    assert_eq!(
        std::fs::read_to_string(f.root().join("top.txt")).unwrap(),
        "top"
    );
}

#[test]
fn a_symlink_inside_the_root_pointing_outside_is_refused() {
    let f = Fixture::new();
    let secret = f.outside().join("secret.txt");
    std::fs::write(&secret, "outside secret").unwrap();
    std::os::unix::fs::symlink(&secret, f.root().join("link.txt")).unwrap();
    std::os::unix::fs::symlink(f.outside(), f.root().join("dirlink")).unwrap();
    std::os::unix::fs::symlink(
        f.outside().join("not-yet.txt"),
        f.root().join("dangling.txt"),
    )
    .unwrap();
    // Even a symlink that stays inside the root is refused: paths are
    // resolved without following any link (SPEC §12.12).
    std::fs::write(f.root().join("real.txt"), "inside").unwrap();
    std::os::unix::fs::symlink(f.root().join("real.txt"), f.root().join("inner-link.txt")).unwrap();

    let r = f.run(&[
        step("get-link", "get", json!({"path": "link.txt"})),
        step(
            "put-link",
            "put",
            json!({"path": "link.txt", "content": "pwned", "overwrite": true}),
        ),
        step(
            "put-link-no-ow",
            "put",
            json!({"path": "link.txt", "content": "pwned"}),
        ),
        step("del-link", "delete", json!({"path": "link.txt"})),
        step("get-via-dir", "get", json!({"path": "dirlink/secret.txt"})),
        step(
            "put-via-dir",
            "put",
            json!({"path": "dirlink/new.txt", "content": "pwned"}),
        ),
        step(
            "put-via-dir-deep",
            "put",
            json!({"path": "dirlink/sub/new.txt", "content": "pwned"}),
        ),
        step(
            "del-via-dir",
            "delete",
            json!({"path": "dirlink/secret.txt"}),
        ),
        step(
            "put-dangling",
            "put",
            json!({"path": "dangling.txt", "content": "pwned", "overwrite": true}),
        ),
        step("get-inner", "get", json!({"path": "inner-link.txt"})),
    ]);
    for res in &r {
        assert_error(res, &["PERMISSION_DENIED"]);
        assert_eq!(res["retryable"], false, "{res}");
        assert!(
            !res.to_string().contains("outside secret"),
            "content leaked: {res}"
        );
    }

    // The outside world is exactly as before.
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "outside secret");
    assert_eq!(files_in(&f.outside()), ["secret.txt"]);
    // And the links themselves were not replaced or removed.
    for link in ["link.txt", "dirlink", "dangling.txt"] {
        let meta = std::fs::symlink_metadata(f.root().join(link)).unwrap();
        assert!(meta.file_type().is_symlink(), "{link} is still a symlink");
    }
}
