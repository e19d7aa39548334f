//! Issue 12 finding 10: a JSON object with the same key twice, at any depth,
//! is rejected `invalid_json` at intake (serve and run), never run as "the
//! last one wins".
mod support;

use std::time::Duration;
use support::serve::{self, Answer};
use support::{Worker, run_cmd};

const TOP: &str = r#"{"version":"1","assignment_id":"dup-a","request_id":"r","tenant_id":"t","assignment_id":"dup-b","job":{"type":"debug.echo","payload":{}}}"#;
const NESTED: &str = r#"{"version":"1","assignment_id":"dup-n","request_id":"r","tenant_id":"t","job":{"type":"debug.echo","payload":{"x":{"k":1,"k":2}}}}"#;
const FINE: &str = r#"{"version":"1","assignment_id":"ok-1","request_id":"r","tenant_id":"t","job":{"type":"debug.echo","payload":{"x":{"k":1},"y":{"k":2}}}}"#;

fn post(w: &Worker, body: &str) -> Answer {
    serve::request(
        "POST",
        &w.url("/api/v1/assignments"),
        &[],
        Some(body.as_bytes()),
    )
}

#[test]
fn serve_rejects_duplicate_keys_at_top_level_and_nested() {
    let w = Worker::start(&[]);
    for body in [TOP, NESTED] {
        let a = post(&w, body);
        assert_eq!(a.status, 400, "{}", a.text);
        assert_eq!(a.json["status"], "rejected", "{}", a.text);
        assert_eq!(a.json["reason"], "invalid_json", "{}", a.text);
        assert!(
            a.json["message"]
                .as_str()
                .unwrap()
                .contains("duplicate key")
        );
    }
    // Neither id was accepted under any spelling.
    for id in ["dup-a", "dup-b", "dup-n"] {
        assert_eq!(serve::result(&w, id, 0).status, 404, "{id}");
    }
    // Equal keys in different objects are fine.
    assert_eq!(post(&w, FINE).status, 202);
}

#[test]
fn run_rejects_duplicate_keys_in_lines_and_arrays() {
    let limit = Duration::from_secs(20);
    let lines = format!("{TOP}\n{NESTED}\n{FINE}\n");
    let array = format!("[{TOP},{NESTED},{FINE}]");
    for input in [lines, array] {
        let out = run_cmd(&["run", "-"], &[], &input, limit);
        assert_eq!(out.code, 1, "{:?}", out.stderr);
        let v = out.json_lines();
        let rejected: Vec<_> = v
            .iter()
            .filter(|l| l["status"] == "rejected")
            .map(|l| l["reason"].as_str().unwrap_or("").to_owned())
            .collect();
        assert_eq!(rejected, ["invalid_json", "invalid_json"], "{v:?}");
        let results = out.results();
        assert_eq!(results.len(), 1, "{v:?}");
        assert_eq!(results["ok-1"]["status"], "success");
    }
}
