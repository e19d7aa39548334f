//! Operator experience through the real binary (issue 11, SPEC §12.14): the
//! CP2 profile, configuration mistakes that point at the fix, payload checks
//! in `validate`, batch input shapes, Ctrl-C and progress.
mod support;

use serde_json::{Value, json};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

fn lines(values: &[Value]) -> String {
    values.iter().map(|v| format!("{v}\n")).collect()
}

fn stderr_text(out: &support::Output) -> String {
    out.stderr.join("\n")
}

/// A step that fails with a non-retryable code on every attempt: CP1 retries
/// it (4 attempts), CP2's classification ends it after one.
fn permanent_failure(id: &str) -> Value {
    support::assignment(id, "debug.fail", json!({"error_code": "INVALID_INPUT"}))
}

#[test]
fn profile_cp2_turns_on_every_cp2_flag_and_an_explicit_flag_still_wins() {
    let dir = support::temp_dir();
    let root = dir.path().join("data");
    let root = root.to_str().unwrap();
    let input = lines(&[permanent_failure("p-1")]);
    let attempts = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        all.push("-");
        let mut env = env.to_vec();
        env.push(("WORKER_FS_ROOT", root));
        let out = support::run_cmd(&all, &env, &input, LIMIT);
        assert_eq!(out.code, 1, "stderr {:?}", out.stderr);
        out.results()["p-1"]["attempts"].as_u64().unwrap()
    };
    assert_eq!(
        attempts(&[], &[]),
        4,
        "CP1 is the default: every error retried"
    );
    assert_eq!(attempts(&[], &[("WORKER_PROFILE", "cp2")]), 1);
    assert_eq!(
        attempts(&["--profile", "CP2"], &[]),
        1,
        "--profile, any case"
    );
    assert_eq!(
        attempts(&["--set", "profile=cp2"], &[]),
        1,
        "the TOML/--set key `profile`"
    );
    assert_eq!(
        attempts(
            &["--profile", "cp2"],
            &[("CP2_ADVANCED_RETRY_ENABLED", "false")]
        ),
        4,
        "a flag set explicitly wins over the profile"
    );
    let out = support::run_cmd(&["run", "--profile", "cp3", "-"], &[], &input, LIMIT);
    assert_eq!(out.code, 2);
    assert!(
        stderr_text(&out).contains("WORKER_PROFILE"),
        "{:?}",
        out.stderr
    );
}

#[test]
fn an_invalid_rust_log_exits_2_naming_it() {
    let input = lines(&[support::assignment("l-1", "debug.echo", json!({}))]);
    for filter in ["inof", "caf_wroker=debug", "caf_worker=debgu"] {
        let out = support::run_cmd(&["validate", "-"], &[("RUST_LOG", filter)], &input, LIMIT);
        assert_eq!(out.code, 2, "{filter}: {:?}", out.stderr);
        assert!(out.stdout.is_empty(), "{filter}: nothing validated");
        assert_eq!(out.stderr.len(), 1, "{:?}", out.stderr);
        assert!(out.stderr[0].contains("RUST_LOG"), "{:?}", out.stderr);
        assert!(out.stderr[0].contains("did you mean"), "{:?}", out.stderr);
    }
    let out = support::run_cmd(
        &["validate", "-"],
        &[("RUST_LOG", "warn,caf_worker=debug")],
        &input,
        LIMIT,
    );
    assert_eq!(out.code, 0, "{:?}", out.stderr);
}

#[test]
fn unknown_keys_and_variables_name_the_closest_valid_one() {
    let dir = support::temp_dir();
    let input = lines(&[support::assignment("k-1", "debug.echo", json!({}))]);
    let toml = dir.path().join("worker.toml");
    std::fs::write(&toml, "io_poll_size = 3\n").unwrap();
    let out = support::run_cmd(
        &["validate", "--config", toml.to_str().unwrap(), "-"],
        &[],
        &input,
        LIMIT,
    );
    assert_eq!(out.code, 2);
    assert!(
        stderr_text(&out).contains("did you mean io_pool_size?"),
        "{:?}",
        out.stderr
    );
    let out = support::run_cmd(
        &["validate", "--set", "retry_jiter=full", "-"],
        &[],
        &input,
        LIMIT,
    );
    assert_eq!(out.code, 2);
    assert!(stderr_text(&out).contains("did you mean retry_jitter?"));
    // The environment is shared with other software: a warning, not an exit.
    let out = support::run_cmd(
        &["validate", "-"],
        &[
            ("WORKER_IO_POLL_SIZE", "3"),
            ("CP2_QUEUE_MANAGMENT_ENABLED", "1"),
        ],
        &input,
        LIMIT,
    );
    assert_eq!(out.code, 0, "{:?}", out.stderr);
    let text = stderr_text(&out);
    assert!(text.contains("did you mean WORKER_IO_POOL_SIZE?"), "{text}");
    assert!(
        text.contains("did you mean CP2_QUEUE_MANAGEMENT_ENABLED?"),
        "{text}"
    );
}

#[test]
fn setting_errors_name_the_setting_and_the_accepted_values() {
    let input = lines(&[support::assignment("s-1", "debug.echo", json!({}))]);
    let one_line = |env: &[(&str, &str)]| {
        let out = support::run_cmd(&["validate", "-"], env, &input, LIMIT);
        assert_eq!(out.code, 2, "{env:?}: {:?}", out.stderr);
        assert_eq!(out.stderr.len(), 1, "{:?}", out.stderr);
        out.stderr[0].clone()
    };
    let line = one_line(&[
        ("WORKER_RETRY_BASE_MS", "300"),
        ("WORKER_RETRY_MAX_DELAY_MS", "200"),
    ]);
    assert!(
        line.contains("WORKER_RETRY_BASE_MS") && line.contains("WORKER_RETRY_MAX_DELAY_MS"),
        "{line}"
    );
    let line = one_line(&[("WORKER_STRICT_IDS", "maybe")]);
    assert!(line.contains("WORKER_STRICT_IDS"), "{line}");
    assert!(line.contains("true, false, 1, 0, yes or no"), "{line}");
    // Enum values ignore case.
    let out = support::run_cmd(
        &["validate", "-"],
        &[
            ("WORKER_LOG_FORMAT", "TEXT"),
            ("WORKER_RETRY_JITTER", "Full"),
        ],
        &input,
        LIMIT,
    );
    assert_eq!(out.code, 0, "{:?}", out.stderr);
    assert!(
        !out.stderr[0].starts_with('{'),
        "text format: {:?}",
        out.stderr
    );
    // So does job.resources.class.
    let mut gpu = support::assignment("s-2", "debug.echo", json!({}));
    gpu["job"]["resources"] = json!({"class": "GPU"});
    let out = support::run_cmd(&["validate", "-"], &[], &lines(&[gpu]), LIMIT);
    assert_eq!(out.stdout, ["line 1: ok s-2"], "{:?}", out.stderr);
}

#[test]
fn each_command_lists_only_the_options_it_uses() {
    let help = |cmd: &str| {
        let out = support::run_cmd(&[cmd, "--help"], &[], "", LIMIT);
        assert_eq!(out.code, 0);
        out.stdout.join("\n")
    };
    let (serve, run, validate) = (help("serve"), help("run"), help("validate"));
    for opt in [
        "--ingress-addr",
        "--health-addr",
        "--metrics-addr",
        "--profile",
        "--io-pool-size",
    ] {
        assert!(serve.contains(opt), "serve --help lists {opt}");
    }
    for opt in ["--profile", "--io-pool-size", "--fs-root", "--results-file"] {
        assert!(run.contains(opt), "run --help lists {opt}");
    }
    for opt in ["--ingress-addr", "--health-addr", "--metrics-addr"] {
        assert!(!run.contains(opt), "run --help does not list {opt}");
        assert!(
            !validate.contains(opt),
            "validate --help does not list {opt}"
        );
    }
    for opt in [
        "--io-pool-size",
        "--fs-root",
        "--results-file",
        "--worker-id",
        "--profile",
    ] {
        assert!(
            !validate.contains(opt),
            "validate --help does not list {opt}"
        );
    }
    for opt in ["--config", "--set", "--log"] {
        assert!(validate.contains(opt), "validate --help lists {opt}");
    }
}

#[test]
fn the_readme_lists_every_setting_with_its_env_name_and_key() {
    let readme = std::fs::read_to_string(support::root().join("README.md")).unwrap();
    for k in caf_worker::config::KEYS {
        let row = format!("| `{}` | `{}` |", k.env, k.name);
        assert!(
            readme.contains(&row),
            "README configuration table lacks {row}"
        );
    }
}

#[test]
fn validate_checks_payloads_like_the_blocks_and_reports_repeated_ids() {
    let a = support::assignment;
    let input = lines(&[
        a("pv-1", "http.request", json!({"method": "GET"})),
        a("pv-2", "http.request", json!({"url": "ftp://x/y"})),
        a(
            "pv-3",
            "http.request",
            json!({"url": "http://x/", "method": "FETCH"}),
        ),
        a("pv-4", "fs.blob_get", json!({"path": "../etc/passwd"})),
        a("pv-5", "fs.blob_put", json!({"path": "a.txt"})),
        a("pv-6", "debug.sleep", json!({"ms": "100"})),
        a("pv-6", "debug.echo", json!({})),
        a(
            "pv-7",
            "fs.blob_put",
            json!({"path": "ok.txt", "content": "x"}),
        ),
    ]);
    let out = support::run_cmd(&["validate", "-"], &[], &input, LIMIT);
    assert_eq!(out.code, 1, "{:?}", out.stderr);
    assert_eq!(
        out.stdout,
        [
            "line 1: invalid payload: url: is required (MISSING_REQUIRED_FIELD)",
            "line 2: invalid payload: url: must use http or https, got \"ftp\" (INVALID_INPUT)",
            "line 3: invalid payload: method: \"FETCH\" is not one of GET HEAD POST PUT PATCH DELETE OPTIONS (INVALID_INPUT)",
            "line 4: invalid payload: path: must not contain '..' components (PERMISSION_DENIED)",
            "line 5: invalid payload: content: payload.content or payload.content_base64 is required (MISSING_REQUIRED_FIELD)",
            "line 6: invalid payload: ms: must be a non-negative integer, got a string (INVALID_FORMAT)",
            "line 7: duplicate assignment_id: \"pv-6\" is already on line 6",
            "line 8: ok pv-7",
        ]
    );
    // `run` keeps the contract: accepted, then an `error` result each (the
    // repeat gets its duplicate Ack); nothing is written under the root.
    let dir = support::temp_dir();
    let root = dir.path().join("data");
    let out = support::run_cmd(
        &["run", "-"],
        &[("WORKER_FS_ROOT", root.to_str().unwrap())],
        &input,
        LIMIT,
    );
    assert_eq!(out.code, 1, "{:?}", out.stderr);
    let results = out.results();
    for id in ["pv-1", "pv-2", "pv-3", "pv-4", "pv-5", "pv-6"] {
        assert_eq!(results[id]["status"], "error", "{id}: {}", results[id]);
    }
    assert_eq!(results["pv-7"]["status"], "success");
}

fn echo(id: &str) -> Value {
    support::assignment(id, "debug.echo", json!({"id": id}))
}

/// Pretty-printed objects, one after another, and the line each starts on.
fn pretty_stream(values: &[Value]) -> (String, Vec<usize>) {
    let (mut text, mut starts) = (String::new(), Vec::new());
    for v in values {
        starts.push(text.lines().count() + 1);
        text.push_str(&serde_json::to_string_pretty(v).unwrap());
        text.push('\n');
    }
    (text, starts)
}

#[test]
fn batch_input_may_be_json_lines_an_array_or_concatenated_pretty_objects() {
    let mut bad = echo("in-bad");
    bad["version"] = json!("2");
    let values = [echo("in-1"), bad, echo("in-3")];
    let (pretty, starts) = pretty_stream(&values);
    let array = serde_json::to_string_pretty(&json!(values)).unwrap();
    let array_starts: Vec<usize> = array
        .lines()
        .enumerate()
        .filter(|(_, l)| *l == "  {")
        .map(|(i, _)| i + 1)
        .collect();
    let mixed = format!(
        "{}\n{}{}\n",
        values[0],
        serde_json::to_string_pretty(&values[1]).unwrap(),
        values[2]
    );
    let mixed_starts = vec![
        1,
        2,
        2 + serde_json::to_string_pretty(&values[1])
            .unwrap()
            .lines()
            .count()
            - 1,
    ];
    for (shape, text, starts) in [
        ("pretty objects", pretty, starts),
        ("pretty array", array, array_starts),
        ("mixed", mixed, mixed_starts),
    ] {
        let out = support::run_cmd(&["validate", "-"], &[], &text, LIMIT);
        assert_eq!(out.code, 1, "{shape}: {:?}", out.stderr);
        assert_eq!(out.stdout.len(), 3, "{shape}: {:?}", out.stdout);
        assert_eq!(
            out.stdout[0],
            format!("line {}: ok in-1", starts[0]),
            "{shape}"
        );
        assert!(
            out.stdout[1].starts_with(&format!("line {}: unsupported_version: ", starts[1])),
            "{shape}: {:?}",
            out.stdout
        );
        assert_eq!(
            out.stdout[2],
            format!("line {}: ok in-3", starts[2]),
            "{shape}"
        );

        let out = support::run_cmd(&["run", "-"], &[], &text, LIMIT);
        assert_eq!(out.code, 1, "{shape}: {:?}", out.stderr);
        let results = out.results();
        assert_eq!(results["in-1"]["status"], "success", "{shape}");
        assert_eq!(results["in-3"]["status"], "success", "{shape}");
        let acks: Vec<Value> = out
            .json_lines()
            .into_iter()
            .filter(|v| v.get("acknowledged_at").is_some())
            .collect();
        assert_eq!(acks.len(), 1, "{shape}: {acks:?}");
        assert_eq!(acks[0]["status"], "rejected");
        assert_eq!(
            acks[0]["line"], starts[1],
            "{shape}: the Ack names its line"
        );
    }
}

#[test]
fn a_cut_off_json_line_is_reported_and_the_next_lines_still_run() {
    let text = format!(
        "{}\n{{\"version\":\"1\",\"assignment_id\":\"cut\n{}\n",
        echo("c-1"),
        echo("c-3")
    );
    let out = support::run_cmd(&["run", "-"], &[], &text, LIMIT);
    assert_eq!(out.code, 1);
    let results = out.results();
    assert_eq!(results["c-1"]["status"], "success");
    assert_eq!(results["c-3"]["status"], "success");
    let ack: Vec<Value> = out
        .json_lines()
        .into_iter()
        .filter(|v| v.get("acknowledged_at").is_some())
        .collect();
    assert_eq!(ack.len(), 1);
    assert_eq!(
        (ack[0]["reason"].as_str(), ack[0]["line"].as_u64()),
        (Some("invalid_json"), Some(2))
    );
}

#[test]
fn run_creates_the_fs_root_only_when_an_fs_step_needs_it() {
    let dir = support::temp_dir();
    let root = dir.path().join("nested/data");
    let env = [("WORKER_FS_ROOT", root.to_str().unwrap())];
    let out = support::run_cmd(&["run", "-"], &env, &lines(&[echo("r-1")]), LIMIT);
    assert_eq!(out.code, 0, "{:?}", out.stderr);
    assert!(!dir.path().join("nested").exists(), "no fs step, no root");
    let put = support::assignment(
        "r-2",
        "fs.blob_put",
        json!({"path": "a.txt", "content": "x"}),
    );
    let out = support::run_cmd(&["run", "-"], &env, &lines(&[put]), LIMIT);
    assert_eq!(out.code, 0, "{:?}", out.stderr);
    assert_eq!(std::fs::read_to_string(root.join("a.txt")).unwrap(), "x");
}

#[test]
fn run_with_default_roots_creates_no_directory_for_steps_that_need_none() {
    // Defaults ./data and ./data/sql, in an empty working directory.
    let dir = support::temp_dir();
    let mut child = support::command(&[])
        .args(["run", "-"])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn run");
    let missing_db = support::assignment(
        "q-1",
        "sql.query",
        json!({"database": "nope", "sql": "SELECT 1"}),
    );
    let input = lines(&[echo("e-1"), missing_db]);
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "the query of a missing database fails"
    );
    let made: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(made.is_empty(), "run created {made:?}");
}

/// A `run` child whose stdout and stderr lines arrive as they are written.
struct LiveRun {
    child: std::process::Child,
    /// Kept open when the test wants `run` to wait for more input.
    stdin: Option<std::process::ChildStdin>,
    stdout: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::mpsc::Receiver<String>,
    seen_err: Vec<String>,
}

impl LiveRun {
    fn start(args: &[&str], env: &[(&str, &str)], input: &str) -> LiveRun {
        let mut run = LiveRun::start_open(args, env, input);
        run.stdin = None;
        run
    }

    /// Like `start`, but stdin stays open after `input`.
    fn start_open(args: &[&str], env: &[(&str, &str)], input: &str) -> LiveRun {
        use std::io::{BufRead, BufReader, Write};
        use std::process::Stdio;
        let mut child = support::command(env)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn run");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).unwrap();
        let pipe = |r: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
            rx
        };
        let stdout = pipe(Box::new(child.stdout.take().unwrap()));
        let stderr = pipe(Box::new(child.stderr.take().unwrap()));
        LiveRun {
            child,
            stdin: Some(stdin),
            stdout,
            stderr,
            seen_err: Vec::new(),
        }
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    /// The next stdout line (fails the test after `limit`).
    fn stdout_line(&self, limit: Duration) -> String {
        self.stdout
            .recv_timeout(limit)
            .expect("no stdout line in time")
    }

    /// Waits for a stderr line containing every word of `needles`.
    fn stderr_line(&mut self, needles: &[&str], limit: Duration) -> String {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(l) => {
                    self.seen_err.push(l.clone());
                    if needles.iter().all(|n| l.contains(n)) {
                        return l;
                    }
                }
                Err(_) => panic!("no stderr line with {needles:?}: {:?}", self.seen_err),
            }
        }
    }

    /// Exit code and the remaining stdout lines.
    fn finish(mut self, limit: Duration) -> (i32, Vec<String>) {
        let deadline = std::time::Instant::now() + limit;
        let code = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s.code().unwrap_or(-1);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "run did not exit in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let rest =
            std::iter::from_fn(|| self.stdout.recv_timeout(Duration::from_secs(2)).ok()).collect();
        (code, rest)
    }
}

/// Three 20 s sleeps on the cpu pool, then an echo on the io pool: once the
/// echo's result is out, all four are accepted and the sleeps are running.
fn three_sleeps_and_a_marker() -> String {
    let mut marker = echo("cc-marker");
    marker["job"]["resources"] = json!({"class": "io"});
    let mut v: Vec<Value> = (1..=3)
        .map(|i| support::assignment(&format!("cc-{i}"), "debug.sleep", json!({"ms": 20_000})))
        .collect();
    v.push(marker);
    lines(&v)
}

fn one_result_each(lines: &[String], ids: &[&str], status: &str) {
    let values: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for id in ids {
        let mine: Vec<&Value> = values
            .iter()
            .filter(|v| v["assignment_id"] == *id)
            .collect();
        assert_eq!(mine.len(), 1, "{id}: exactly one result: {lines:?}");
        assert_eq!(mine[0]["status"], status, "{id}: {}", mine[0]);
    }
}

#[test]
fn a_second_ctrl_c_ends_every_unfinished_step_cancelled_and_exits() {
    let mut run = LiveRun::start(&["run", "-"], &[], &three_sleeps_and_a_marker());
    let marker = run.stdout_line(LIMIT);
    assert!(marker.contains("cc-marker"), "{marker}");
    let t0 = std::time::Instant::now();
    run.signal("-INT");
    let first = run.stderr_line(&["draining 3 step(s)", "30 s", "Ctrl-C again"], LIMIT);
    assert!(first.contains("\"WARN\""), "{first}");
    run.signal("-INT");
    let warn = run.stderr_line(
        &["3 unfinished step(s) ended cancelled", "on stdout"],
        LIMIT,
    );
    assert!(warn.contains("\"WARN\""), "{warn}");
    let (code, rest) = run.finish(LIMIT);
    let took = t0.elapsed();
    assert_eq!(code, 1);
    assert!(
        took < Duration::from_secs(10),
        "stopped now, not after the 30 s grace: {took:?}"
    );
    one_result_each(&rest, &["cc-1", "cc-2", "cc-3"], "cancelled");
    assert_eq!(rest.len(), 3, "{rest:?}");
}

#[test]
fn a_drain_out_of_grace_says_how_many_were_cancelled_and_where_they_went() {
    let mut run = LiveRun::start(
        &["run", "-"],
        &[("WORKER_SHUTDOWN_GRACE_MS", "300")],
        &three_sleeps_and_a_marker(),
    );
    run.stdout_line(LIMIT);
    run.signal("-TERM");
    run.stderr_line(&["draining 3 step(s)", "0.3 s"], LIMIT);
    let warn = run.stderr_line(
        &["ran out of grace", "3 unfinished step(s)", "on stdout"],
        LIMIT,
    );
    assert!(warn.contains("\"WARN\""), "{warn}");
    let (code, rest) = run.finish(LIMIT);
    assert_eq!(code, 1);
    one_result_each(&rest, &["cc-1", "cc-2", "cc-3"], "cancelled");
}

#[test]
fn on_a_terminal_run_draws_a_progress_line_on_stderr() {
    let dir = support::temp_dir();
    let input = dir.path().join("batch.jsonl");
    let steps: Vec<Value> = (0..8)
        .map(|i| support::assignment(&format!("pg-{i}"), "debug.sleep", json!({"ms": 300})))
        .collect();
    std::fs::write(&input, lines(&steps)).unwrap();
    let out_file = dir.path().join("results.jsonl");
    // `script` gives the worker a pseudo-terminal; stdout goes to a file, so
    // what `script` prints is the worker's stderr as a terminal shows it.
    let inner = format!(
        "{} run --log-format text {} > {}",
        support::bin(),
        input.display(),
        out_file.display()
    );
    let out = std::process::Command::new("script")
        .args(["-qfec", &inner, "/dev/null"])
        .env("WORKER_FS_ROOT", dir.path().join("data"))
        .output()
        .expect("script(1) is installed (bsdutils)");
    assert!(out.status.success(), "{out:?}");
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(
        tty.contains("\r\x1b[2K"),
        "the line is redrawn in place: {tty:?}"
    );
    assert!(tty.contains("8/8 steps (100%)"), "done/total: {tty:?}");
    assert!(
        tty.contains("steps/s") && tty.contains("ETA"),
        "rate and ETA: {tty:?}"
    );
    assert!(tty.contains("run finished: 8 result(s) in"), "{tty:?}");
    assert_eq!(
        std::fs::read_to_string(&out_file).unwrap().lines().count(),
        8
    );
}

#[test]
fn without_a_terminal_a_long_batch_logs_progress_every_5_s_and_a_summary() {
    let mut timeout = support::assignment("sum-timeout", "debug.sleep", json!({"ms": 2000}));
    timeout["options"] = json!({"deadline_ms": 50});
    let input = lines(&[
        support::assignment("sum-long", "debug.sleep", json!({"ms": 5600})),
        echo("sum-ok"),
        permanent_failure("sum-error"),
        timeout,
    ]);
    let out = support::run_cmd(&["run", "-"], &[], &input, LIMIT);
    assert_eq!(out.code, 1, "{:?}", out.stderr);
    let logs: Vec<Value> = out
        .stderr
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("JSON: {l}")))
        .collect();
    let progress: Vec<&Value> = logs
        .iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("progress: "))
        })
        .collect();
    assert_eq!(progress.len(), 1, "one line at 5 s: {:?}", out.stderr);
    let ctx = &progress[0]["context"];
    assert_eq!(
        (ctx["done"].as_u64(), ctx["total"].as_u64()),
        (Some(3), Some(4)),
        "{ctx}"
    );
    assert!(
        ctx["rate_per_sec"].is_u64() && ctx["eta_s"].is_u64(),
        "{ctx}"
    );
    let summary = logs
        .iter()
        .find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("run finished"))
        })
        .expect("summary line");
    let c = &summary["context"];
    assert_eq!(
        [&c["success"], &c["error"], &c["timeout"], &c["cancelled"]],
        [&json!(2), &json!(1), &json!(1), &json!(0)],
        "{summary}"
    );
    assert!(c["elapsed_ms"].as_u64().unwrap() >= 5600, "{summary}");
    assert!(c["steps_per_sec"].is_u64(), "{summary}");

    // A short batch logs no progress line.
    let out = support::run_cmd(&["run", "-"], &[], &lines(&[echo("sum-short")]), LIMIT);
    assert!(
        !out.stderr.iter().any(|l| l.contains("progress: ")),
        "{:?}",
        out.stderr
    );
}

#[test]
fn each_unsuccessful_step_logs_one_warn_line_and_a_storm_is_summarised() {
    let upstream =
        support::HttpStub::routes(&[("/secret/path", vec![support::Reply::status(404)])]);
    let url = upstream.url("/secret/path") + "?token=abc";
    let mut http = support::assignment("w-http", "http.request", json!({"url": url}));
    http["options"] = json!({"retry": {"max_attempts": 1}});
    let out = support::run_cmd(&["run", "-"], &[], &lines(&[http]), LIMIT);
    assert_eq!(out.code, 1);
    let warns: Vec<Value> = out
        .stderr
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["level"] == "WARN")
        .collect();
    assert_eq!(warns.len(), 1, "{:?}", out.stderr);
    let (w, c) = (&warns[0], &warns[0]["context"]);
    assert_eq!(w["assignment_id"], "w-http");
    assert_eq!(
        (c["job_type"].as_str(), c["error_code"].as_str()),
        (Some("http.request"), Some("HTTP_ERROR"))
    );
    assert_eq!(
        (c["attempts"].as_u64(), c["http_status"].as_u64()),
        (Some(1), Some(404))
    );
    let host = c["upstream"].as_str().unwrap();
    assert_eq!(host, upstream.url("").trim_end_matches('/'), "host only");
    assert!(
        !w.to_string().contains("secret") && !w.to_string().contains("token"),
        "{w}"
    );

    // An fs.* step names its path instead.
    let get = support::assignment("w-fs", "fs.blob_get", json!({"path": "no/such.txt"}));
    let dir = support::temp_dir();
    let out = support::run_cmd(
        &["run", "--profile", "cp2", "-"],
        &[("WORKER_FS_ROOT", dir.path().to_str().unwrap())],
        &lines(&[get]),
        LIMIT,
    );
    let warn: Value = out
        .stderr
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["assignment_id"] == "w-fs")
        .unwrap_or_else(|| panic!("{:?}", out.stderr));
    assert_eq!(warn["context"]["path"], "no/such.txt", "{warn}");
    assert_eq!(
        warn["context"]["error_code"], "RESOURCE_UNAVAILABLE",
        "{warn}"
    );

    // 40 failures at once: at most 10 lines a second, the rest summarised.
    let storm: Vec<Value> = (0..40)
        .map(|i| permanent_failure(&format!("w-{i}")))
        .collect();
    let out = support::run_cmd(
        &["run", "--profile", "cp2", "-"],
        &[(
            "WORKER_FS_ROOT",
            support::temp_dir().path().to_str().unwrap(),
        )],
        &lines(&storm),
        LIMIT,
    );
    assert_eq!(out.code, 1);
    let logs: Vec<Value> = out
        .stderr
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let step_lines = logs
        .iter()
        .filter(|v| v["context"]["error_code"] == "INVALID_INPUT")
        .count();
    let suppressed: u64 = logs
        .iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("similar lines suppressed"))
        })
        .map(|v| v["context"]["suppressed"].as_u64().unwrap())
        .sum();
    assert_eq!(
        step_lines as u64 + suppressed,
        40,
        "every failure is a line or counted"
    );
    assert!(
        suppressed > 0 && step_lines >= 10,
        "{step_lines} lines, {suppressed} suppressed"
    );
}

#[test]
fn the_readme_api_examples_work_as_pasted() {
    let readme = std::fs::read_to_string(support::root().join("README.md")).unwrap();
    let from = readme.find("The assignment API").expect("API section");
    let start = readme[from..].find("```sh\n").unwrap() + from + 6;
    let end = readme[start..].find("```").unwrap() + start;
    let w = support::Worker::start(&[("WORKER_PROFILE", "cp2")]);
    // The README's upstream (python3 -m http.server on 8000) is played by a stub.
    let upstream = support::HttpStub::routes(&[("/", vec![support::Reply::status(200)])]);
    // The README uses the default ports; this worker listens on free ones.
    let block = readme[start..end]
        .replace("http://127.0.0.1:8000/", &upstream.url("/"))
        .replace("localhost:9090", &w.ingress.to_string())
        .replace("127.0.0.1:9091", &w.health.to_string())
        .replace("localhost:9091", &w.health.to_string());
    let out = std::process::Command::new("sh")
        .args(["-ec", &block])
        .output()
        .expect("sh and curl are installed");
    assert!(out.status.success(), "{out:?}");
    let answers: Vec<Value> = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let expect = [
        ("a-1", "accepted"),
        ("a-1", "success"),
        ("e-1", "success"),
        ("s-1", "accepted"),
        ("s-1", "cancellation_requested"),
    ];
    assert_eq!(answers.len(), expect.len() + 2, "{answers:?}");
    for (v, (id, status)) in answers.iter().zip(expect) {
        assert_eq!(
            (v["assignment_id"].as_str(), v["status"].as_str()),
            (Some(id), Some(status)),
            "{v}"
        );
    }
    assert_eq!(
        answers[1]["outputs"]["status_code"], 200,
        "the upstream exists"
    );
    assert_eq!(answers[5]["status"], "healthy");
    assert_eq!(answers[6]["status"], "ready");
}

#[test]
fn ctrl_c_ends_a_run_whose_input_is_still_open() {
    let mut run = LiveRun::start_open(
        &["run", "-"],
        &[("WORKER_SHUTDOWN_GRACE_MS", "300")],
        &three_sleeps_and_a_marker(),
    );
    assert!(run.stdin.is_some());
    run.stdout_line(LIMIT);
    let t0 = std::time::Instant::now();
    run.signal("-INT");
    run.stderr_line(&["ran out of grace", "3 unfinished step(s)"], LIMIT);
    run.stderr_line(&["input is still open"], LIMIT);
    let (code, rest) = run.finish(LIMIT);
    assert_eq!(code, 1);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    one_result_each(&rest, &["cc-1", "cc-2", "cc-3"], "cancelled");
}
