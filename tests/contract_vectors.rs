//! Conformance vectors (SPEC §3.1–§3.3): every valid vector is accepted and
//! every invalid one rejected with its `expect_reason`, both through the
//! library's `parse_assignment` and through the binary's `validate` / `run`;
//! every result of `run` passes the shared checker.
//!
//! The vectors are read from our copy under `tests/vectors/`, which must stay
//! byte-for-byte the same as `../shared/vectors/` (see
//! `shared_vectors_are_our_copy`).
mod support;

use caf_worker::contract::{IntakeRules, RejectReason, parse_assignment};
use serde_json::Value;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

fn rules(strict_ids: bool) -> IntakeRules {
    IntakeRules {
        max_body_bytes: 1_048_576,
        strict_ids,
        default_deadline_ms: 30_000,
    }
}

fn our_vectors(name: &str) -> PathBuf {
    support::root().join("tests/vectors").join(name)
}

fn lines_of(path: &PathBuf) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// One invalid case: the bytes to submit and the Ack reason they must get.
struct Case {
    bytes: String,
    expect: String,
    label: String,
}

fn invalid_cases() -> Vec<Case> {
    lines_of(&our_vectors("assignments_invalid.jsonl"))
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let v: Value = serde_json::from_str(line).expect("vector line is JSON");
            let bytes = match (&v["raw"], &v["assignment"]) {
                (Value::String(raw), Value::Null) => raw.clone(),
                (Value::Null, a @ Value::Object(_)) => a.to_string(),
                _ => panic!("vector line {} has neither raw nor assignment", i + 1),
            };
            let label = v["assignment"]["assignment_id"]
                .as_str()
                .map(|id| format!("line {} ({})", i + 1, &id[..id.len().min(24)]))
                .unwrap_or_else(|| format!("line {} (raw {bytes:?})", i + 1));
            Case {
                bytes,
                expect: v["expect_reason"].as_str().expect("expect_reason").into(),
                label,
            }
        })
        .collect()
}

fn valid_lines() -> Vec<String> {
    lines_of(&our_vectors("assignments_valid.jsonl"))
}

fn write_input(dir: &tempfile::TempDir, name: &str, lines: &[String]) -> String {
    let path = dir.path().join(name);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).expect("write input");
    path.to_str().unwrap().to_owned()
}

#[test]
fn library_accepts_every_valid_vector() {
    let lines = valid_lines();
    assert_eq!(lines.len(), 9, "the valid vector file changed size");
    for line in &lines {
        let id = serde_json::from_str::<Value>(line).unwrap()["assignment_id"].clone();
        match parse_assignment(line.as_bytes(), &rules(true)) {
            Ok(a) => assert_eq!(Value::from(a.assignment_id), id),
            Err(r) => panic!("valid vector {id} rejected: {r}"),
        }
    }
}

#[test]
fn library_rejects_every_invalid_vector_with_its_reason() {
    let cases = invalid_cases();
    assert_eq!(cases.len(), 19, "the invalid vector file changed size");
    for c in &cases {
        match parse_assignment(c.bytes.as_bytes(), &rules(true)) {
            Ok(a) => panic!("{}: accepted as {}", c.label, a.assignment_id),
            Err(r) => {
                assert_eq!(r.reason.as_str(), c.expect, "{}: {}", c.label, r.message);
                assert!(!r.message.is_empty(), "{}: empty message", c.label);
            }
        }
    }
    // Every reason an intake check can produce from bytes alone is covered.
    let covered: HashSet<&str> = cases.iter().map(|c| c.expect.as_str()).collect();
    for r in [
        RejectReason::InvalidJson,
        RejectReason::InvalidAssignment,
        RejectReason::UnsupportedVersion,
        RejectReason::UnsupportedJobType,
        RejectReason::UnsupportedPayloadRef,
        RejectReason::InvalidCorrelation,
    ] {
        assert!(covered.contains(r.as_str()), "no vector for {r}");
    }
}

#[test]
fn strict_id_vectors_pass_when_strict_ids_are_off() {
    // The two "(strict ids)" cases are format checks only; the partial
    // run/flow/step case is a structural rule that holds either way.
    let cases = invalid_cases();
    let by_id = |id: &str| {
        cases
            .iter()
            .find(|c| c.label.contains(id))
            .unwrap_or_else(|| panic!("no case {id}"))
    };
    for id in ["i-corr-trace", "i-corr-run-format"] {
        let c = by_id(id);
        assert!(
            parse_assignment(c.bytes.as_bytes(), &rules(false)).is_ok(),
            "{id} must pass without strict ids"
        );
    }
    let partial = by_id("i-corr-partial");
    let r = parse_assignment(partial.bytes.as_bytes(), &rules(false)).unwrap_err();
    assert_eq!(r.reason, RejectReason::InvalidCorrelation);
}

#[test]
fn shared_vectors_are_our_copy() {
    let shared_dir = support::root().join("../shared/vectors");
    if !shared_dir.join("assignments_invalid.jsonl").exists() {
        eprintln!("../shared/vectors is not beside the checkout; nothing to compare");
        return;
    }
    for name in ["assignments_valid.jsonl", "assignments_invalid.jsonl"] {
        let shared = lines_of(&shared_dir.join(name));
        let ours = lines_of(&our_vectors(name));
        let differing: Vec<usize> = (0..shared.len().max(ours.len()))
            .filter(|&i| shared.get(i) != ours.get(i))
            .map(|i| i + 1)
            .collect();
        assert!(
            differing.is_empty(),
            "shared {name} drifted from tests/vectors/ at lines {differing:?}"
        );
    }
}

#[test]
fn validate_accepts_every_valid_vector() {
    let out = support::run_cmd(
        &[
            "validate",
            our_vectors("assignments_valid.jsonl").to_str().unwrap(),
        ],
        &[],
        "",
        Duration::from_secs(20),
    );
    // Valid assignments, but `v-bad-payload-accepted` has a payload its block
    // refuses: `validate` reports that (SPEC §12.14), `run` accepts it.
    assert_eq!(
        out.code, 1,
        "stdout {:?} stderr {:?}",
        out.stdout, out.stderr
    );
    let ids: Vec<String> = valid_lines()
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["assignment_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(out.stdout.len(), ids.len(), "{:?}", out.stdout);
    for (i, (line, id)) in out.stdout.iter().zip(&ids).enumerate() {
        if id.contains("bad-payload") {
            assert_eq!(
                line,
                &format!(
                    "line {}: invalid payload: url: is required (MISSING_REQUIRED_FIELD)",
                    i + 1
                )
            );
        } else {
            assert_eq!(line, &format!("line {}: ok {id}", i + 1));
        }
    }
}

#[test]
fn validate_rejects_every_invalid_vector_with_its_reason() {
    let dir = support::temp_dir();
    let cases = invalid_cases();
    assert!(
        !cases[0].bytes.trim_start().starts_with('['),
        "the first case must not make the input look like a JSON array"
    );
    let lines: Vec<String> = cases.iter().map(|c| c.bytes.clone()).collect();
    let input = write_input(&dir, "invalid.jsonl", &lines);
    let out = support::run_cmd(&["validate", &input], &[], "", Duration::from_secs(20));
    assert_eq!(
        out.code, 1,
        "stdout {:?} stderr {:?}",
        out.stdout, out.stderr
    );
    assert_eq!(out.stdout.len(), cases.len(), "{:?}", out.stdout);
    for (i, (line, c)) in out.stdout.iter().zip(&cases).enumerate() {
        let prefix = format!("line {}: {}: ", i + 1, c.expect);
        assert!(line.starts_with(&prefix), "{}: got {line:?}", c.label);
        assert!(line.len() > prefix.len(), "{}: no message", c.label);
    }
}

#[test]
fn run_rejects_every_invalid_vector_with_an_ack_line() {
    let dir = support::temp_dir();
    let cases = invalid_cases();
    let mut lines: Vec<String> = cases.iter().map(|c| c.bytes.clone()).collect();
    // One valid line at the end proves the rest still runs.
    let tail = support::assignment("after-invalid", "debug.echo", serde_json::json!({"k": 1}));
    lines.push(tail.to_string());
    let input = write_input(&dir, "invalid.jsonl", &lines);
    let fs_root = dir.path().join("data");
    let out = support::run_cmd(
        &["run", &input],
        &[("WORKER_FS_ROOT", fs_root.to_str().unwrap())],
        "",
        Duration::from_secs(30),
    );
    assert_eq!(out.code, 1, "stderr {:?}", out.stderr);
    let json = out.json_lines();
    let acks: Vec<&Value> = json
        .iter()
        .filter(|v| v.get("acknowledged_at").is_some())
        .collect();
    let results: Vec<&Value> = json
        .iter()
        .filter(|v| v.get("acknowledged_at").is_none())
        .collect();
    assert_eq!(results.len(), 1, "only the valid tail runs: {results:?}");
    assert_eq!(results[0]["assignment_id"], "after-invalid");
    assert_eq!(results[0]["status"], "success");
    assert_eq!(acks.len(), cases.len(), "one Ack per rejected line");
    // Acks are written in input order (intake is sequential).
    for (ack, c) in acks.iter().zip(&cases) {
        assert_eq!(ack["status"], "rejected", "{}", c.label);
        assert_eq!(ack["reason"], c.expect.as_str(), "{}: {ack}", c.label);
        assert!(
            ack["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            c.label
        );
        assert_eq!(ack["worker_id"], "test-worker");
        assert_eq!(ack["version"], "1");
    }
    // Each rejection is reported on stderr with its line number.
    for i in 1..=cases.len() {
        let needle = format!("line {i}:");
        assert!(
            out.stderr
                .iter()
                .any(|l| l.contains(&needle) && l.contains("rejected")),
            "no stderr report for {needle} in {:?}",
            out.stderr
        );
    }
}

#[test]
fn run_on_valid_vectors_passes_the_shared_checker() {
    let dir = support::temp_dir();
    let fs_root = dir.path().join("data");
    let out = support::run_cmd(
        &[
            "run",
            our_vectors("assignments_valid.jsonl").to_str().unwrap(),
        ],
        &[("WORKER_FS_ROOT", fs_root.to_str().unwrap())],
        "",
        Duration::from_secs(30),
    );
    // v-bad-payload-accepted ends in error, so the run as a whole exits 1.
    assert_eq!(out.code, 1, "stderr {:?}", out.stderr);
    assert!(
        out.json_lines()
            .iter()
            .all(|v| v.get("acknowledged_at").is_none()),
        "no valid vector may be rejected: {:?}",
        out.stdout
    );
    let results = out.results();
    assert_eq!(results.len(), 9, "{:?}", out.stdout);
    assert_eq!(out.stdout.len(), 9, "exactly one line per assignment");
    support::check_results(&out.stdout);

    let bad = &results["v-bad-payload-accepted"];
    assert_eq!(bad["status"], "error");
    assert_eq!(bad["error_code"], "MISSING_REQUIRED_FIELD");
    assert_eq!(bad["retryable"], false);
    for (id, r) in &results {
        if id != "v-bad-payload-accepted" {
            assert_eq!(r["status"], "success", "{id}: {r}");
        }
    }
    // Echoes and correlation (SPEC §3.3).
    let corr = &results["v-echo-corr"];
    assert_eq!(corr["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(corr["run_id"], "0b9e6a3c-1f7d-4c2e-9a41-5d2f8c7e6b10");
    assert_eq!(corr["flow_id"], "6f1d2c3b-8a9e-4f7d-b2c1-0e9d8c7b6a54");
    assert_eq!(corr["step_id"], "01HZX3K9Q4V7T2M8N5P6R0S1W2");
    assert_eq!(corr["provider_id"], "caf");
    assert_eq!(corr["outputs"], serde_json::json!({"hello": "world"}));
    assert_eq!(
        results["v-echo-toplevel-trace"]["trace_id"],
        "00000000000000000000000000000001"
    );
    assert!(results["v-echo-1"].get("run_id").is_none());
    assert_eq!(results["v-no-executor"]["provider_id"], "caf-worker");
    assert_eq!(results["v-fail-then-ok"]["attempts"], 2);
    assert_eq!(results["v-fail-then-ok"]["retries_used"], 1);
    assert_eq!(results["v-put"]["outputs"]["size"], 5);
    assert_eq!(
        std::fs::read_to_string(fs_root.join("vectors/a.txt")).unwrap(),
        "hello"
    );
    for line in valid_lines() {
        let a: Value = serde_json::from_str(&line).unwrap();
        let r = &results[a["assignment_id"].as_str().unwrap()];
        assert_eq!(r["job"]["type"], a["job"]["type"], "{r}");
        assert_eq!(r["request_id"], a["request_id"]);
        assert_eq!(r["tenant_id"], a["tenant_id"]);
        assert_eq!(r["worker_id"], "test-worker");
    }
}
