//! Smoke test of the support helpers: the quickstart runs as the README says.
mod support;

use std::time::Duration;

#[test]
fn quickstart_runs_and_passes_the_shared_checker() {
    let dir = support::temp_dir();
    let fs_root = dir.path().join("data");
    let input = std::fs::read_to_string(support::root().join("examples/quickstart.jsonl")).unwrap();
    let out = support::run_cmd(
        &["run", "-"],
        &[("WORKER_FS_ROOT", fs_root.to_str().unwrap())],
        &input,
        Duration::from_secs(60),
    );
    assert_eq!(out.code, 0, "stderr: {:?}", out.stderr);
    let results = out.results();
    assert_eq!(results.len(), 6);
    assert_eq!(results["qs-get"]["outputs"]["content"], "hello, caf-worker");
    assert_eq!(results["qs-delete"]["outputs"]["deleted"], true);
    assert_eq!(results["qs-retry"]["retries_used"], 2);
    support::check_results(&out.stdout);
    for line in &out.stderr {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("stderr not JSON ({e}): {line}"));
        assert_eq!(v["component"], "worker");
    }
}
