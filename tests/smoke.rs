//! Smoke test of the support helpers: the quickstart runs as the README says.
mod support;

use std::time::Duration;

#[test]
fn quickstart_runs_and_passes_the_shared_checker() {
    let dir = support::temp_dir();
    let fs_root = dir.path().join("data");
    // The quickstart puts its demo database under the FS root, where the
    // default SQL root (`./data/sql` beside `./data`) finds it.
    let sql_root = fs_root.join("sql");
    let input = std::fs::read_to_string(support::root().join("examples/quickstart.jsonl")).unwrap();
    let out = support::run_cmd(
        &["run", "-"],
        &[
            ("WORKER_FS_ROOT", fs_root.to_str().unwrap()),
            ("WORKER_SQL_ROOT", sql_root.to_str().unwrap()),
        ],
        &input,
        Duration::from_secs(60),
    );
    assert_eq!(out.code, 0, "stderr: {:?}", out.stderr);
    let results = out.results();
    assert_eq!(results.len(), 8);
    assert_eq!(results["qs-get"]["outputs"]["content"], "hello, caf-worker");
    assert_eq!(results["qs-delete"]["outputs"]["deleted"], true);
    assert_eq!(results["qs-retry"]["retries_used"], 2);
    assert_eq!(
        results["qs-sql"]["outputs"]["rows"],
        serde_json::json!([["pencil", 0.5], ["notebook", 2.25]]),
        "{}",
        results["qs-sql"]
    );
    support::check_results(&out.stdout);
    for line in &out.stderr {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("stderr not JSON ({e}): {line}"));
        assert_eq!(v["component"], "worker");
    }
}
