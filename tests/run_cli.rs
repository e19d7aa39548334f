//! The command line of SPEC §1 (`run`, `validate`, `--help`), the exit codes,
//! configuration errors (§2), a 10,000-step batch, and the log format (§10).
mod support;

use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

fn echo(id: &str) -> Value {
    support::assignment(id, "debug.echo", json!({"id": id}))
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write input");
    path.to_str().unwrap().to_owned()
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`: RFC 3339 UTC with exactly six fractional digits.
fn is_rfc3339_micros(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 27
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            26 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

fn assert_log_line(line: &str) -> Value {
    let v: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("stderr line not JSON ({e}): {line}"));
    assert!(v.is_object(), "{line}");
    let ts = v["timestamp"]
        .as_str()
        .unwrap_or_else(|| panic!("no timestamp: {line}"));
    assert!(
        is_rfc3339_micros(ts),
        "timestamp {ts:?} is not RFC 3339 with 6 digits and Z"
    );
    assert!(
        ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&v["level"].as_str().unwrap_or("")),
        "level: {line}"
    );
    assert_eq!(v["component"], "worker", "{line}");
    assert!(v["message"].is_string(), "message: {line}");
    v
}

#[test]
fn run_reads_a_json_array() {
    let dir = support::temp_dir();
    let text = serde_json::to_string_pretty(&json!([echo("arr-1"), echo("arr-2"), echo("arr-3")]))
        .unwrap();
    // Leading whitespace before '[' must not hide the array shape.
    let input = write(&dir, "batch.json", &format!("\n  {text}\n"));
    let out = support::run_cmd(&["run", &input], &[], "", LIMIT);
    assert_eq!(out.code, 0, "stderr {:?}", out.stderr);
    let results = out.results();
    assert_eq!(out.stdout.len(), 3, "{:?}", out.stdout);
    for id in ["arr-1", "arr-2", "arr-3"] {
        assert_eq!(results[id]["status"], "success");
        assert_eq!(results[id]["outputs"], json!({"id": id}));
    }
    support::check_results(&out.stdout);
}

#[test]
fn run_reads_json_lines_from_stdin_skipping_blank_lines() {
    let input = format!("{}\n\n   \n{}\n", echo("jl-1"), echo("jl-2"));
    let out = support::run_cmd(&["run", "-"], &[], &input, LIMIT);
    assert_eq!(out.code, 0, "stderr {:?}", out.stderr);
    assert_eq!(out.stdout.len(), 2, "{:?}", out.stdout);
    let results = out.results();
    assert_eq!(results["jl-1"]["status"], "success");
    assert_eq!(results["jl-2"]["status"], "success");

    // Blank lines still count: the bad line is reported as physical line 5.
    let input = format!("\n{}\n\n   \n{{bad\n{}\n", echo("jl-3"), echo("jl-4"));
    let out = support::run_cmd(&["run", "-"], &[], &input, LIMIT);
    assert_eq!(out.code, 1, "stderr {:?}", out.stderr);
    assert_eq!(out.stdout.len(), 3, "{:?}", out.stdout);
    assert!(
        out.stderr
            .iter()
            .any(|l| l.contains("line 5:") && l.contains("invalid_json")),
        "{:?}",
        out.stderr
    );
}

#[test]
fn run_reports_a_bad_line_by_number_and_still_runs_the_rest() {
    let mut unsupported = echo("bad-version");
    unsupported["version"] = json!("2");
    let input = [
        echo("good-1").to_string(),
        "{broken json".to_owned(),
        echo("good-2").to_string(),
        unsupported.to_string(),
        echo("good-3").to_string(),
    ]
    .join("\n");
    let out = support::run_cmd(&["run", "-"], &[], &input, LIMIT);
    assert_eq!(
        out.code, 1,
        "a rejected line makes the run exit 1: {:?}",
        out.stderr
    );

    let lines = out.json_lines();
    assert_eq!(lines.len(), 5, "3 results + 2 Acks: {:?}", out.stdout);
    let acks: Vec<&Value> = lines
        .iter()
        .filter(|v| v.get("acknowledged_at").is_some())
        .collect();
    assert_eq!(acks.len(), 2, "{acks:?}");
    assert_eq!(acks[0]["status"], "rejected");
    assert_eq!(acks[0]["reason"], "invalid_json");
    assert!(acks[0]["assignment_id"].is_null());
    assert_eq!(acks[1]["status"], "rejected");
    assert_eq!(acks[1]["reason"], "unsupported_version");
    assert_eq!(acks[1]["assignment_id"], "bad-version");
    let results = out.results();
    for id in ["good-1", "good-2", "good-3"] {
        assert_eq!(results[id]["status"], "success", "{id}");
    }
    support::check_results(&out.stdout);

    // stderr names each bad line by number (and is still JSON).
    let logs: Vec<Value> = out.stderr.iter().map(|l| assert_log_line(l)).collect();
    for (n, reason) in [(2, "invalid_json"), (4, "unsupported_version")] {
        let found = logs.iter().any(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(&format!("line {n}:")))
                && v["context"]["reason"] == reason
        });
        assert!(found, "no stderr report of line {n}: {:?}", out.stderr);
    }
    assert!(
        !logs.iter().any(
            |v| v["message"].as_str().is_some_and(|m| m.contains("line 1:")
                || m.contains("line 3:")
                || m.contains("line 5:"))
        ),
        "good lines are not reported: {:?}",
        out.stderr
    );
}

#[test]
fn run_exits_0_only_when_every_step_succeeds() {
    let ok = support::run_lines(&[echo("ok-1"), echo("ok-2")], &[], LIMIT);
    assert_eq!(ok.code, 0, "stderr {:?}", ok.stderr);

    let mut fail = support::assignment(
        "fails",
        "debug.fail",
        json!({"error_code": "EXECUTION_FAILED"}),
    );
    fail["options"] = json!({"retry": {"max_attempts": 1}});
    let out = support::run_lines(&[echo("ok-3"), fail], &[], LIMIT);
    assert_eq!(out.code, 1, "stderr {:?}", out.stderr);
    let results = out.results();
    assert_eq!(results.len(), 2);
    assert_eq!(results["ok-3"]["status"], "success");
    assert_eq!(results["fails"]["status"], "error");
    assert_eq!(results["fails"]["error_code"], "EXECUTION_FAILED");
    assert_eq!(results["fails"]["attempts"], 1);
    support::check_results(&out.stdout);
}

#[test]
fn run_exits_2_for_an_unreadable_input_and_runs_nothing() {
    let dir = support::temp_dir();
    let missing = dir.path().join("does-not-exist.jsonl");
    let missing = missing.to_str().unwrap();
    let out = support::run_cmd(&["run", missing], &[], "", LIMIT);
    assert_eq!(out.code, 2, "stderr {:?}", out.stderr);
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);
    assert!(
        out.stderr
            .iter()
            .any(|l| l.contains("does-not-exist.jsonl")),
        "stderr names the file: {:?}",
        out.stderr
    );

    // A directory opens but cannot be read.
    let out = support::run_cmd(&["run", dir.path().to_str().unwrap()], &[], "", LIMIT);
    assert_eq!(out.code, 2, "stderr {:?}", out.stderr);
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);

    let out = support::run_cmd(&["validate", missing], &[], "", LIMIT);
    assert_eq!(out.code, 2, "validate: stderr {:?}", out.stderr);
}

#[test]
fn run_exits_2_for_bad_configuration_with_one_line_naming_the_setting() {
    let dir = support::temp_dir();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let marker = support::assignment(
        "must-not-run",
        "fs.blob_put",
        json!({"path": "ran.txt", "content": "x"}),
    );
    let input = format!("{marker}\n");
    // A regular file where the FS root's parent should be: not creatable.
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let uncreatable = file.join("root");
    let data_s = data.to_str().unwrap();
    for (var, value) in [
        ("WORKER_IO_POOL_SIZE", "0"),
        ("WORKER_CPU_POOL_SIZE", "four"),
        ("WORKER_DEFAULT_MAX_ATTEMPTS", "0"),
        ("WORKER_DEFAULT_DEADLINE_MS", "-5"),
        ("WORKER_LOG_FORMAT", "xml"),
        ("WORKER_FS_ROOT", uncreatable.to_str().unwrap()),
    ] {
        let env: Vec<(&str, &str)> = if var == "WORKER_FS_ROOT" {
            vec![(var, value)]
        } else {
            vec![("WORKER_FS_ROOT", data_s), (var, value)]
        };
        let out = support::run_cmd(&["run", "-"], &env, &input, LIMIT);
        assert_eq!(out.code, 2, "{var}={value}: stderr {:?}", out.stderr);
        assert!(
            out.stdout.is_empty(),
            "{var}={value}: nothing runs: {:?}",
            out.stdout
        );
        assert_eq!(
            out.stderr.len(),
            1,
            "{var}={value}: one stderr line: {:?}",
            out.stderr
        );
        assert!(
            out.stderr[0].contains(var),
            "{var}={value}: the line names the setting: {:?}",
            out.stderr[0]
        );
    }
    assert!(!data.join("ran.txt").exists(), "nothing ran");
}

#[test]
fn validate_prints_one_line_per_assignment_and_exits_0_only_if_all_valid() {
    let all_good = format!("{}\n{}\n", echo("v-1"), echo("v-2"));
    let out = support::run_cmd(&["validate", "-"], &[], &all_good, LIMIT);
    assert_eq!(out.code, 0, "stderr {:?}", out.stderr);
    assert_eq!(out.stdout, ["line 1: ok v-1", "line 2: ok v-2"]);

    let mut no_tenant = echo("v-no-tenant");
    no_tenant.as_object_mut().unwrap().remove("tenant_id");
    let mixed = format!(
        "{}\n{}\nnot json\n{}\n",
        echo("v-3"),
        no_tenant,
        echo("v-4")
    );
    let out = support::run_cmd(&["validate", "-"], &[], &mixed, LIMIT);
    assert_eq!(out.code, 1, "stderr {:?}", out.stderr);
    assert_eq!(out.stdout.len(), 4, "{:?}", out.stdout);
    assert_eq!(out.stdout[0], "line 1: ok v-3");
    assert!(
        out.stdout[1].starts_with("line 2: invalid_assignment: "),
        "{}",
        out.stdout[1]
    );
    assert!(
        out.stdout[1].contains("tenant_id"),
        "the message names the field: {}",
        out.stdout[1]
    );
    assert!(
        out.stdout[2].starts_with("line 3: invalid_json: "),
        "{}",
        out.stdout[2]
    );
    assert_eq!(out.stdout[3], "line 4: ok v-4");

    // validate executes nothing: a put would create the file.
    let dir = support::temp_dir();
    let put = support::assignment(
        "v-put",
        "fs.blob_put",
        json!({"path": "x.txt", "content": "x"}),
    );
    let data = dir.path().join("data");
    let out = support::run_cmd(
        &["validate", "-"],
        &[("WORKER_FS_ROOT", data.to_str().unwrap())],
        &format!("{put}\n"),
        LIMIT,
    );
    assert_eq!(out.code, 0);
    assert!(!data.join("x.txt").exists(), "validate must not execute");

    // A JSON array works too; each element is numbered by its start line.
    let arr = serde_json::to_string_pretty(&json!([echo("a-1"), {"version": "1"}])).unwrap();
    let second = arr.lines().position(|l| l == "  {").unwrap() + 1;
    let second = arr.lines().skip(second).position(|l| l == "  {").unwrap() + second + 1;
    let out = support::run_cmd(&["validate", "-"], &[], &arr, LIMIT);
    assert_eq!(out.code, 1);
    assert_eq!(out.stdout[0], "line 2: ok a-1");
    assert!(
        out.stdout[1].starts_with(&format!("line {second}: invalid_assignment: ")),
        "{:?}",
        out.stdout
    );
}

#[test]
fn help_and_version_work() {
    let out = support::run_cmd(&["--help"], &[], "", LIMIT);
    assert_eq!(out.code, 0, "stderr {:?}", out.stderr);
    let text = out.stdout.join("\n");
    for word in ["serve", "run", "validate", "Usage"] {
        assert!(text.contains(word), "--help mentions {word}: {text}");
    }
    let out = support::run_cmd(&["run", "--help"], &[], "", LIMIT);
    assert_eq!(out.code, 0);
    assert!(out.stdout.join("\n").contains("FILE|-"));
    let out = support::run_cmd(&["--version"], &[], "", LIMIT);
    assert_eq!(out.code, 0);
    assert_eq!(
        out.stdout,
        [format!("caf-worker {}", env!("CARGO_PKG_VERSION"))]
    );
    // A usage error is exit code 2.
    let out = support::run_cmd(&["run"], &[], "", LIMIT);
    assert_eq!(out.code, 2, "missing FILE is a usage error");
    let out = support::run_cmd(&["frobnicate"], &[], "", LIMIT);
    assert_eq!(out.code, 2);
}

#[test]
fn run_executes_ten_thousand_echo_steps_each_exactly_once() {
    const N: usize = 10_000;
    let input: String = (0..N)
        .map(|i| {
            format!(
                "{}\n",
                support::assignment(&format!("e-{i:05}"), "debug.echo", json!({"i": i}))
            )
        })
        .collect();
    let out = support::run_cmd(&["run", "-"], &[], &input, Duration::from_secs(55));
    assert_eq!(
        out.code,
        0,
        "stderr {:?}",
        out.stderr.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(out.stdout.len(), N, "one line per assignment");
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(N);
    for v in out.json_lines() {
        assert_eq!(v["status"], "success", "{v}");
        let id = v["assignment_id"]
            .as_str()
            .expect("assignment_id")
            .to_owned();
        let i: usize = id[2..].parse().unwrap();
        assert_eq!(v["outputs"]["i"], i, "outputs belong to their assignment");
        *seen.entry(id).or_default() += 1;
    }
    assert_eq!(seen.len(), N, "every assignment_id appears");
    assert!(seen.values().all(|&n| n == 1), "each exactly once");
}

#[test]
fn logs_are_one_json_object_per_line_with_the_spec_fields() {
    // debug level makes the engine log failed steps with their correlation ids.
    let mut fail = support::assignment(
        "log-fail",
        "debug.fail",
        json!({"error_code": "NETWORK_ERROR"}),
    );
    fail["options"] = json!({"retry": {"max_attempts": 1}});
    fail["correlation"] = json!({"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"});
    let out = support::run_lines(&[echo("log-ok"), fail], &[("RUST_LOG", "debug")], LIMIT);
    assert_eq!(out.code, 1);
    assert!(!out.stderr.is_empty(), "run logs at least its summary");
    let logs: Vec<Value> = out.stderr.iter().map(|l| assert_log_line(l)).collect();
    let step_line = logs
        .iter()
        .find(|v| v["assignment_id"] == "log-fail")
        .unwrap_or_else(|| panic!("no log line with the step's ids: {:?}", out.stderr));
    assert_eq!(step_line["tenant_id"], "acme");
    assert_eq!(step_line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(step_line["context"].is_object());
    assert!(
        logs.iter().any(|v| v["level"] == "INFO"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("run finished"))),
        "{:?}",
        out.stderr
    );
}

#[test]
fn secrets_never_reach_the_logs() {
    const TOKEN: &str = "tok-4f9a1c-very-secret";
    // serve logs its effective configuration once at start, redacted.
    let mut w = support::Worker::start(&[("WORKER_API_TOKEN", TOKEN)]);
    let lines = w.stderr.lock().unwrap().clone();
    let config = lines
        .iter()
        .map(|l| assert_log_line(l))
        .find(|v| v["message"] == "effective configuration")
        .unwrap_or_else(|| panic!("no effective configuration line: {lines:?}"));
    assert_eq!(
        config["context"]["config"]["api_token"], "[REDACTED]",
        "{config}"
    );
    assert_eq!(
        config["context"]["config"]["worker_id"]["value"],
        "test-worker"
    );
    w.sigterm();
    assert_eq!(w.wait_exit(Duration::from_secs(20)), 0);
    let all = w.stderr.lock().unwrap().join("\n");
    assert!(
        !all.contains(TOKEN),
        "the token leaked into the logs: {all}"
    );

    // A failing HTTP step's secret header and body are not logged at INFO.
    let upstream = support::Upstream::start(|_, _| support::Reply::status(401).body("no"));
    let mut step = support::assignment(
        "secret-step",
        "http.request",
        json!({"url": upstream.url("/login"), "method": "POST",
               "headers": {"Authorization": format!("Bearer {TOKEN}")},
               "body": {"password": TOKEN}}),
    );
    step["options"] = json!({"retry": {"max_attempts": 2}});
    let out = support::run_lines(&[step], &[], LIMIT);
    assert_eq!(out.code, 1);
    assert_eq!(upstream.requests(), 2);
    let seen = upstream.seen();
    assert!(
        String::from_utf8_lossy(&seen[0].body).contains(TOKEN),
        "the secret was sent"
    );
    assert!(!out.stderr.join("\n").contains(TOKEN), "{:?}", out.stderr);
}

#[test]
fn run_executes_a_repeated_assignment_id_once_and_acks_the_duplicate() {
    let out = support::run_lines(&[echo("dup"), echo("other"), echo("dup")], &[], LIMIT);
    assert_eq!(
        out.code, 0,
        "a duplicate is accepted, not rejected: {:?}",
        out.stderr
    );
    let lines = out.json_lines();
    assert_eq!(lines.len(), 3, "{:?}", out.stdout);
    let acks: Vec<&Value> = lines
        .iter()
        .filter(|v| v.get("acknowledged_at").is_some())
        .collect();
    assert_eq!(acks.len(), 1, "{acks:?}");
    assert_eq!(acks[0]["status"], "accepted");
    assert_eq!(acks[0]["reason"], "duplicate");
    assert_eq!(acks[0]["assignment_id"], "dup");
    let results: Vec<&Value> = lines
        .iter()
        .filter(|v| v.get("acknowledged_at").is_none())
        .collect();
    assert_eq!(results.len(), 2);
    assert_eq!(
        results
            .iter()
            .filter(|r| r["assignment_id"] == "dup")
            .count(),
        1,
        "executed once"
    );
}

#[test]
fn run_rejects_an_assignment_over_max_body_bytes() {
    let big = support::assignment("big", "debug.echo", json!({"pad": "x".repeat(600)}));
    let out = support::run_lines(
        &[echo("small"), big],
        &[("WORKER_MAX_BODY_BYTES", "500")],
        LIMIT,
    );
    assert_eq!(out.code, 1, "stderr {:?}", out.stderr);
    let lines = out.json_lines();
    let ack = lines
        .iter()
        .find(|v| v.get("acknowledged_at").is_some())
        .unwrap_or_else(|| panic!("no Ack: {:?}", out.stdout));
    assert_eq!(ack["status"], "rejected");
    assert_eq!(ack["reason"], "payload_too_large");
    assert!(
        ack["message"]
            .as_str()
            .is_some_and(|m| m.contains("WORKER_MAX_BODY_BYTES")),
        "{ack}"
    );
    assert_eq!(out.results()["small"]["status"], "success");
}

#[test]
fn a_large_batch_is_accepted_in_input_order_with_its_line_numbers() {
    // 300 lines (parsed in parallel batches): a repeated id is the duplicate
    // where it comes second in the input, and a bad line is named by its
    // own number, whatever thread parsed it.
    let mut text = String::new();
    for i in 1..=300 {
        let line = match i {
            50 | 250 => echo("twice").to_string(),
            170 => "{\"version\":\"1\",\"not\":\"an assignment\"}".to_owned(),
            _ => echo(&format!("b-{i}")).to_string(),
        };
        text.push_str(&line);
        text.push('\n');
    }
    let out = support::run_cmd(&["run", "-"], &[], &text, LIMIT);
    assert_eq!(out.code, 1, "one line is rejected: {:?}", out.stderr);
    let lines = out.json_lines();
    let acks: Vec<&Value> = lines
        .iter()
        .filter(|v| v.get("acknowledged_at").is_some())
        .collect();
    assert_eq!(acks.len(), 2, "{acks:?}");
    let duplicate = acks.iter().find(|a| a["reason"] == "duplicate").unwrap();
    assert_eq!(duplicate["line"], 250, "{duplicate}");
    let rejected = acks.iter().find(|a| a["status"] == "rejected").unwrap();
    assert_eq!(rejected["line"], 170, "{rejected}");
    assert_eq!(
        lines.len() - acks.len(),
        298,
        "one result per accepted line"
    );
}
