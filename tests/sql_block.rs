//! `sql.query` (SPEC §14.1) on real SQLite files under a temp
//! `WORKER_SQL_ROOT`, through the real binary: typed columns, parameters,
//! one statement only, read-only reads, confinement, error codes, runaway
//! queries interrupted (CP1 deadline, CP2 attempt timeout, cancel) with the
//! thread's connection still usable, and SQLITE_BUSY retried.
mod support;

use rusqlite::Connection;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::serve;

const LIMIT: Duration = Duration::from_secs(30);
const RUNAWAY: &str =
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";

/// A temp dir with `sql/` (the SQL root, holding `demo.db`) and `outside/`.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = support::temp_dir();
        std::fs::create_dir_all(dir.path().join("sql")).unwrap();
        std::fs::create_dir_all(dir.path().join("outside")).unwrap();
        let f = Fixture { dir };
        f.conn("demo")
            .execute_batch(
                "CREATE TABLE t (id INTEGER PRIMARY KEY, r REAL, s TEXT, n, b BLOB);
                 INSERT INTO t VALUES (1, 1.5, 'one', NULL, x'00ff10');
                 INSERT INTO t VALUES (2, -2.25, 'two', NULL, NULL);
                 INSERT INTO t VALUES (3, 0.0, 'three', 7, x'');
                 CREATE TABLE users (name TEXT NOT NULL UNIQUE);
                 INSERT INTO users VALUES ('alice'), ('bob');",
            )
            .unwrap();
        f
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("sql")
    }
    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }
    /// A direct connection to `<root>/<name>.db` (created if missing).
    fn conn(&self, name: &str) -> Connection {
        Connection::open(self.root().join(format!("{name}.db"))).unwrap()
    }
    fn env<'a>(&'a self, root: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut env = vec![
            ("WORKER_SQL_ROOT", root),
            ("WORKER_FS_ROOT", self.dir.path().to_str().unwrap()),
            ("WORKER_IO_POOL_SIZE", "1"),
        ];
        env.extend_from_slice(extra);
        env
    }
    /// Runs `steps` in order on one io thread; results in input order.
    fn run_with(&self, steps: &[Value], extra: &[(&str, &str)]) -> Vec<Value> {
        let root = self.root();
        let root = root.to_str().unwrap();
        support::run_in_order(steps, &self.env(root, extra), LIMIT)
    }
    fn run(&self, steps: &[Value]) -> Vec<Value> {
        self.run_with(steps, &[])
    }
    fn one(&self, step: Value) -> Value {
        self.run(&[step]).remove(0)
    }
}

/// A one-attempt `sql.query` step.
fn step(id: &str, payload: Value) -> Value {
    support::with_options(
        support::assignment(id, "sql.query", payload),
        json!({"retry": {"max_attempts": 1}}),
    )
}

fn read(id: &str, sql: &str, params: Value) -> Value {
    step(
        id,
        json!({"database": "demo", "sql": sql, "params": params}),
    )
}

fn assert_error(r: &Value, code: &str, retryable: bool) {
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(r["error_code"], code, "{r}");
    assert_eq!(r["retryable"], retryable, "{r}");
}

#[test]
fn typed_columns_blobs_positional_and_named_parameters_and_the_row_cap() {
    let f = Fixture::new();
    let rs = f.run(&[
        read(
            "all",
            "SELECT id, r, s, n, b FROM t ORDER BY id",
            Value::Null,
        ),
        read(
            "pos",
            "SELECT s FROM t WHERE id = ? OR r = ?",
            json!([2, 1.5]),
        ),
        read(
            "named",
            "SELECT s, :extra AS e FROM t WHERE id = :id",
            json!({"id": 3, ":extra": "x"}),
        ),
        read(
            "blob",
            "SELECT ? AS b, typeof(?) AS t",
            json!([{"base64": "AAECAw=="}, {"base64": ""}]),
        ),
        step(
            "cap",
            json!({"database": "demo", "sql": "SELECT id FROM t ORDER BY id", "max_rows": 2}),
        ),
        step(
            "exact",
            json!({"database": "demo", "sql": "SELECT id FROM t", "max_rows": 3}),
        ),
    ]);
    let all = &rs[0];
    assert_eq!(all["status"], "success", "{all}");
    let o = &all["outputs"];
    assert_eq!(o["columns"], json!(["id", "r", "s", "n", "b"]));
    assert_eq!(
        o["rows"],
        json!([
            [1, 1.5, "one", null, {"base64": "AP8Q"}],
            [2, -2.25, "two", null, null],
            [3, 0.0, "three", 7, {"base64": ""}],
        ])
    );
    assert_eq!(o["row_count"], 3);
    assert_eq!(o["truncated"], false);
    assert!(o.get("changes").is_none(), "reads report no changes: {o}");
    assert_eq!(
        rs[1]["outputs"]["rows"],
        json!([["one"], ["two"]]),
        "{}",
        rs[1]
    );
    assert_eq!(
        rs[2]["outputs"]["rows"],
        json!([["three", "x"]]),
        "{}",
        rs[2]
    );
    assert_eq!(
        rs[3]["outputs"]["rows"],
        json!([[{"base64": "AAECAw=="}, "blob"]]),
        "{}",
        rs[3]
    );
    assert_eq!(rs[4]["outputs"]["rows"], json!([[1], [2]]), "{}", rs[4]);
    assert_eq!(rs[4]["outputs"]["row_count"], 2);
    assert_eq!(rs[4]["outputs"]["truncated"], true);
    assert_eq!(rs[5]["outputs"]["truncated"], false, "{}", rs[5]);
}

#[test]
fn parameter_mismatches_are_invalid_input() {
    let f = Fixture::new();
    let rs = f.run(&[
        read("missing", "SELECT * FROM t WHERE id = ?", Value::Null),
        read(
            "short",
            "SELECT * FROM t WHERE id = ? AND s = ?",
            json!([1]),
        ),
        read(
            "unknown-key",
            "SELECT * FROM t WHERE id = :id",
            json!({"id": 1, "idd": 2}),
        ),
        read(
            "no-key",
            "SELECT * FROM t WHERE id = :id",
            json!({"other": 1}),
        ),
        read("nested", "SELECT ?", json!([[1, 2]])),
    ]);
    for r in &rs {
        assert_error(r, "INVALID_INPUT", false);
    }
}

#[test]
fn an_injection_string_is_bound_as_a_value_and_the_table_stays() {
    let f = Fixture::new();
    let evil = "x'); DROP TABLE users; --";
    let rs = f.run_with(
        &[
            read("probe", "SELECT count(*) FROM users WHERE name = ?", json!([evil])),
            step(
                "insert",
                json!({"database": "demo", "mode": "write", "sql": "INSERT INTO users (name) VALUES (:name)", "params": {"name": evil}}),
            ),
        ],
        &[("WORKER_SQL_ALLOW_WRITE", "true")],
    );
    assert_eq!(rs[0]["outputs"]["rows"], json!([[0]]), "{}", rs[0]);
    assert_eq!(rs[1]["status"], "success", "{}", rs[1]);
    assert_eq!(rs[1]["outputs"]["changes"], 1);
    assert_eq!(rs[1]["outputs"]["last_insert_rowid"], 3);
    let names: Vec<String> = f
        .conn("demo")
        .prepare("SELECT name FROM users ORDER BY rowid")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(names, ["alice", "bob", evil]);
}

#[test]
fn exactly_one_statement() {
    let f = Fixture::new();
    let rs = f.run_with(
        &[
            read("two", "SELECT 1; SELECT 2", Value::Null),
            read("empty-between", "SELECT 1; ; SELECT 2", Value::Null),
            step(
                "write-two",
                json!({"database": "demo", "mode": "write", "sql": "DELETE FROM users; DROP TABLE users"}),
            ),
            read("trailing", "SELECT 1 AS one; -- done\n  /* really */  ", Value::Null),
        ],
        &[("WORKER_SQL_ALLOW_WRITE", "true")],
    );
    for r in &rs[..3] {
        assert_error(r, "INVALID_INPUT", false);
        assert!(
            r["error_message"]
                .as_str()
                .unwrap()
                .contains("one statement"),
            "{r}"
        );
    }
    assert_eq!(rs[3]["status"], "success", "{}", rs[3]);
    assert_eq!(rs[3]["outputs"]["rows"], json!([[1]]));
    let n: i64 = f
        .conn("demo")
        .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2, "the refused statements changed nothing");
}

#[test]
fn writes_are_refused_in_read_mode_and_without_the_flag() {
    let f = Fixture::new();
    let insert = |id: &str, mode: &str| {
        step(
            id,
            json!({"database": "demo", "mode": mode, "sql": "INSERT INTO users (name) VALUES ('carol')"}),
        )
    };
    // Read mode: SQLite itself refuses (read-only connection), flag or not.
    let rs = f.run_with(
        &[
            insert("read-insert", "read"),
            read("read-temp", "CREATE TEMP TABLE scratch (x)", Value::Null),
            read("read-pragma", "PRAGMA journal_mode = DELETE", Value::Null),
            read(
                "read-attach",
                "ATTACH DATABASE 'other.db' AS o",
                Value::Null,
            ),
            read(
                "read-info",
                "SELECT name FROM pragma_table_info('users')",
                Value::Null,
            ),
        ],
        &[("WORKER_SQL_ALLOW_WRITE", "true")],
    );
    assert_error(&rs[0], "PERMISSION_DENIED", false);
    assert!(
        rs[0]["error_message"]
            .as_str()
            .unwrap()
            .contains("readonly"),
        "{}",
        rs[0]
    );
    for r in &rs[1..4] {
        assert_error(r, "PERMISSION_DENIED", false);
    }
    assert_eq!(rs[4]["outputs"]["rows"], json!([["name"]]), "{}", rs[4]);
    // Write mode without WORKER_SQL_ALLOW_WRITE.
    let r = f.one(insert("no-flag", "write"));
    assert_error(&r, "PERMISSION_DENIED", false);
    assert!(
        r["error_message"]
            .as_str()
            .unwrap()
            .contains("WORKER_SQL_ALLOW_WRITE"),
        "{r}"
    );
    let n: i64 = f
        .conn("demo")
        .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
    assert!(!f.root().join("other.db").exists(), "ATTACH created a file");
}

#[test]
fn write_mode_may_create_a_database_and_reports_changes() {
    let f = Fixture::new();
    let w = |id: &str, sql: &str| {
        step(
            id,
            json!({"database": "fresh/new", "mode": "write", "sql": sql}),
        )
    };
    let rs = f.run_with(
        &[
            w(
                "create",
                "CREATE TABLE k (id INTEGER PRIMARY KEY, v TEXT UNIQUE)",
            ),
            w(
                "insert",
                "INSERT INTO k (v) VALUES ('a'), ('b') RETURNING id",
            ),
            w("dup", "INSERT INTO k (v) VALUES ('a')"),
            step(
                "read-back",
                json!({"database": "fresh/new", "sql": "SELECT v FROM k ORDER BY id"}),
            ),
        ],
        &[("WORKER_SQL_ALLOW_WRITE", "1")],
    );
    assert_eq!(rs[0]["status"], "success", "{}", rs[0]);
    assert_eq!(rs[1]["outputs"]["changes"], 2, "{}", rs[1]);
    assert_eq!(rs[1]["outputs"]["last_insert_rowid"], 2);
    assert_eq!(rs[1]["outputs"]["rows"], json!([[1], [2]]));
    assert_error(&rs[2], "EXECUTION_FAILED", false);
    assert_eq!(rs[3]["outputs"]["rows"], json!([["a"], ["b"]]), "{}", rs[3]);
    assert!(f.root().join("fresh/new.db").is_file());
}

#[test]
fn databases_stay_under_the_root_and_missing_ones_are_not_created() {
    let f = Fixture::new();
    let outside = f.outside();
    Connection::open(outside.join("secret.db"))
        .unwrap()
        .execute_batch("CREATE TABLE s (x); INSERT INTO s VALUES ('secret');")
        .unwrap();
    std::os::unix::fs::symlink(outside.join("secret.db"), f.root().join("evil.db")).unwrap();
    std::os::unix::fs::symlink(&outside, f.root().join("linkdir")).unwrap();
    std::os::unix::fs::symlink(f.root().join("demo.db"), f.root().join("alias.db")).unwrap();
    let q = |id: &str, db: &str| step(id, json!({"database": db, "sql": "SELECT 1"}));
    let rs = f.run_with(
        &[
            q("dotdot", "../outside/secret"),
            q("evil", "evil"),
            q("linkdir", "linkdir/secret"),
            q("absolute", "/etc/passwd"),
            q("missing", "nope"),
            step(
                "missing-write",
                json!({"database": "nope2", "sql": "SELECT 1"}),
            ),
            q("alias", "alias"),
            q("bad-name", "a b"),
            read("syntax", "SELEC 1", Value::Null),
            read("no-table", "SELECT * FROM nowhere", Value::Null),
        ],
        &[("WORKER_SQL_ALLOW_WRITE", "true")],
    );
    for r in &rs[..3] {
        assert_error(r, "PERMISSION_DENIED", false);
    }
    assert_error(&rs[3], "INVALID_INPUT", false);
    assert_error(&rs[4], "RESOURCE_UNAVAILABLE", true);
    assert_error(&rs[5], "RESOURCE_UNAVAILABLE", true);
    assert!(!f.root().join("nope.db").exists() && !f.root().join("nope2.db").exists());
    // As for blobs (SPEC §12.12): no symlink is followed, even one inside the root.
    assert_error(&rs[6], "PERMISSION_DENIED", false);
    assert_error(&rs[7], "INVALID_INPUT", false);
    assert_error(&rs[8], "INVALID_INPUT", false);
    assert_error(&rs[9], "INVALID_INPUT", false);
    assert!(
        rs[9]["error_message"]
            .as_str()
            .unwrap()
            .contains("no such table"),
        "{}",
        rs[9]
    );
}

#[test]
fn values_and_results_are_bounded_by_the_response_limit() {
    let f = Fixture::new();
    let rs = f.run_with(
        &[
            read(
                "huge-value",
                "SELECT length(randomblob(?))",
                json!([3_000_000]),
            ),
            read(
                "big-result",
                "SELECT randomblob(700000), randomblob(700000)",
                Value::Null,
            ),
            read("fits", "SELECT length(randomblob(?))", json!([900_000])),
        ],
        &[("WORKER_MAX_RESPONSE_BYTES", "1048576")],
    );
    assert_error(&rs[0], "INVALID_INPUT", false);
    assert!(
        rs[0]["error_message"].as_str().unwrap().contains("too big"),
        "{}",
        rs[0]
    );
    assert_error(&rs[1], "EXECUTION_FAILED", false);
    assert!(
        rs[1]["error_message"]
            .as_str()
            .unwrap()
            .contains("WORKER_MAX_RESPONSE_BYTES"),
        "{}",
        rs[1]
    );
    assert_eq!(rs[2]["outputs"]["rows"], json!([[900_000]]), "{}", rs[2]);
}

/// A runaway step with `options`, then a quick query on the same (only) io thread.
fn runaway_then_quick(f: &Fixture, options: Value, env: &[(&str, &str)]) -> (Value, Value) {
    let runaway = support::with_options(
        support::assignment(
            "runaway",
            "sql.query",
            json!({"database": "demo", "sql": RUNAWAY}),
        ),
        options,
    );
    let quick = read("after", "SELECT s FROM t WHERE id = ?", json!([1]));
    let mut rs = f.run_with(&[runaway, quick], env);
    let quick = rs.pop().unwrap();
    (rs.pop().unwrap(), quick)
}

#[test]
fn a_runaway_query_stops_at_the_cp1_deadline_and_the_thread_keeps_working() {
    let f = Fixture::new();
    let (r, after) = runaway_then_quick(
        &f,
        json!({"deadline_ms": 600, "retry": {"max_attempts": 1}}),
        &[],
    );
    assert_eq!(r["status"], "timeout", "{r}");
    assert_eq!(r["error_code"], "CANCELLED_BY_TIMEOUT");
    support::assert_ms_in(
        "CP1 runaway latency",
        support::field_ms(&r, "latency_ms"),
        590,
        3000,
    );
    assert_eq!(after["status"], "success", "{after}");
    assert_eq!(after["outputs"]["rows"], json!([["one"]]));
}

#[test]
fn a_runaway_query_stops_at_the_cp2_attempt_timeout_and_the_thread_keeps_working() {
    let f = Fixture::new();
    let (r, after) = runaway_then_quick(
        &f,
        json!({"deadline_ms": 20000, "retry": {"max_attempts": 1}}),
        &[
            ("CP2_COMPLETE_TIMEOUT_ENABLED", "1"),
            ("WORKER_SQL_TIMEOUT_MS", "400"),
        ],
    );
    assert_eq!(r["status"], "timeout", "{r}");
    assert_eq!(r["retryable"], true, "an attempt timeout is transient: {r}");
    support::assert_ms_in(
        "CP2 runaway latency",
        support::field_ms(&r, "latency_ms"),
        390,
        2500,
    );
    assert_eq!(after["status"], "success", "{after}");
    // The attempt timeout of the assignment wins when it is shorter.
    let (r, _) = runaway_then_quick(
        &f,
        json!({"deadline_ms": 20000, "attempt_timeout_ms": 300, "retry": {"max_attempts": 1}}),
        &[("CP2_COMPLETE_TIMEOUT_ENABLED", "1")],
    );
    support::assert_ms_in(
        "CP2 attempt_timeout_ms",
        support::field_ms(&r, "latency_ms"),
        290,
        2500,
    );
}

fn start(f: &Fixture, extra: &[(&str, &str)]) -> support::Worker {
    let root = f.root();
    let mut env = vec![
        ("WORKER_SQL_ROOT", root.to_str().unwrap()),
        ("WORKER_IO_POOL_SIZE", "1"),
        ("CP2_OBSERVABILITY_METRICS_ENABLED", "1"),
    ];
    env.extend_from_slice(extra);
    support::Worker::start(&env)
}

#[test]
fn cancel_interrupts_a_running_query_and_the_thread_keeps_working() {
    let f = Fixture::new();
    let w = start(&f, &[]);
    let runaway = support::with_options(
        support::assignment(
            "run-cancel",
            "sql.query",
            json!({"database": "demo", "sql": RUNAWAY}),
        ),
        json!({"deadline_ms": 60000, "retry": {"max_attempts": 1}}),
    );
    assert_eq!(serve::submit(&w, &runaway).status, 202);
    serve::wait_pool(&w, "io", 1, 0, Duration::from_secs(10));
    let asked = Instant::now();
    assert_eq!(serve::cancel(&w, "run-cancel").status, 202);
    let r = serve::result(&w, "run-cancel", 10_000);
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        asked.elapsed()
    );
    assert_eq!(r.json["status"], "cancelled", "{}", r.json);
    serve::wait_pool(&w, "io", 0, 0, Duration::from_secs(5));
    let quick = read("after-cancel", "SELECT count(*) FROM t", Value::Null);
    assert_eq!(serve::submit(&w, &quick).status, 202);
    let r = serve::result(&w, "after-cancel", 10_000);
    assert_eq!(r.json["outputs"]["rows"], json!([[3]]), "{}", r.json);
}

#[test]
fn sqlite_busy_is_resource_unavailable_and_retried_until_the_lock_is_released() {
    let f = Fixture::new();
    let w = start(
        &f,
        &[
            ("CP2_ADVANCED_RETRY_ENABLED", "1"),
            ("WORKER_RETRY_BASE_MS", "50"),
            ("WORKER_RETRY_MAX_DELAY_MS", "200"),
        ],
    );
    // An exclusive transaction of another connection locks readers out.
    let holder = f.conn("demo");
    holder
        .execute_batch("BEGIN EXCLUSIVE; UPDATE users SET name = name;")
        .unwrap();
    let once = read("busy-once", "SELECT count(*) FROM users", Value::Null);
    assert_eq!(serve::submit(&w, &once).status, 202);
    let r = serve::result(&w, "busy-once", 10_000);
    assert_error(&r.json, "RESOURCE_UNAVAILABLE", true);
    assert!(
        r.json["error_message"].as_str().unwrap().contains("locked"),
        "{}",
        r.json
    );

    let retried = support::with_options(
        support::assignment(
            "busy-retried",
            "sql.query",
            json!({"database": "demo", "sql": "SELECT count(*) FROM users"}),
        ),
        json!({"deadline_ms": 30000, "retry": {"max_attempts": 10}}),
    );
    assert_eq!(serve::submit(&w, &retried).status, 202);
    let sample = "worker_step_retries_total{step_type=\"sql.query\"}";
    let retried_once = support::wait_for(Duration::from_secs(10), || {
        serve::metric(&w, sample).filter(|n| *n >= 1.0)
    });
    assert!(
        retried_once.is_some(),
        "no retry seen: {:?}",
        serve::metric(&w, sample)
    );
    holder.execute_batch("COMMIT").unwrap();
    let r = serve::result(&w, "busy-retried", 20_000);
    assert_eq!(r.json["status"], "success", "{}", r.json);
    assert!(r.json["attempts"].as_u64().unwrap() >= 2, "{}", r.json);
    assert_eq!(r.json["outputs"]["rows"], json!([[2]]));
    // SQL steps are counted in the existing step metrics like any block.
    let metrics = support::http(
        "GET",
        &format!("http://{}/metrics", w.metrics.unwrap()),
        None,
    )
    .2;
    let has = |prefix: &str, labels: &[&str]| {
        metrics
            .lines()
            .any(|l| l.starts_with(prefix) && labels.iter().all(|x| l.contains(x)))
    };
    let sql = "step_type=\"sql.query\"";
    assert!(
        has(
            "worker_step_executions_total{",
            &[sql, "execution_status=\"success\""]
        ),
        "{metrics}"
    );
    assert!(
        has(
            "worker_step_executions_total{",
            &[sql, "execution_status=\"error\""]
        ),
        "{metrics}"
    );
    assert!(
        has(
            "worker_step_errors_total{",
            &[sql, "error_code=\"RESOURCE_UNAVAILABLE\""]
        ),
        "{metrics}"
    );
    assert!(
        has("worker_step_execution_duration_seconds_count{", &[sql]),
        "{metrics}"
    );
}
