//! Issue 12 finding 11: per-tenant tokens (`WORKER_API_TOKENS_FILE`). A
//! tenant token submits only for its own tenant (else 403 `unauthorized`)
//! and sees, waits for and cancels only its own assignments (others: 404,
//! as if unknown); operator tokens (`"*"` and `WORKER_API_TOKEN`) see all.
mod support;

use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::serve::{Answer, request, sleep_step};
use support::{Worker, assignment};

const TOKENS: &str = r#"[tokens]
"tok-acme" = "acme"
"tok-globex" = "globex"
"tok-ops" = "*"
"#;

fn tokens_file(dir: &tempfile::TempDir, mode: u32) -> PathBuf {
    let path = dir.path().join("tokens.toml");
    std::fs::write(&path, TOKENS).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn call(method: &str, w: &Worker, path: &str, token: Option<&str>, body: Option<&Value>) -> Answer {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let body = body.map(|b| b.to_string());
    request(
        method,
        &w.url(path),
        &headers,
        body.as_deref().map(str::as_bytes),
    )
}

fn for_tenant(mut a: Value, tenant: &str) -> Value {
    a["tenant_id"] = tenant.into();
    a
}

fn start(mode: u32) -> (Worker, tempfile::TempDir) {
    let dir = support::temp_dir();
    let file = tokens_file(&dir, mode);
    let w = Worker::start(&[
        ("WORKER_API_TOKENS_FILE", file.to_str().unwrap()),
        ("WORKER_API_TOKEN", "op-env"),
    ]);
    (w, dir)
}

#[test]
fn tenant_tokens_see_and_act_only_for_their_tenant() {
    let (w, _dir) = start(0o600);
    let submit = |token, a: &Value| call("POST", &w, "/api/v1/assignments", Some(token), Some(a));
    let get = |token, id: &str, wait: u64| {
        call(
            "GET",
            &w,
            &format!("/api/v1/results/{id}?wait_ms={wait}"),
            Some(token),
            None,
        )
    };
    let cancel = |token, id: &str| {
        call(
            "POST",
            &w,
            &format!("/api/v1/assignments/{id}/cancel"),
            Some(token),
            None,
        )
    };

    // Own tenant: accepted; another tenant: 403 unauthorized, nothing runs.
    let a1 = for_tenant(
        assignment("a-1", "debug.echo", serde_json::json!({})),
        "acme",
    );
    assert_eq!(submit("tok-acme", &a1).status, 202);
    let foreign = for_tenant(
        assignment("x-1", "debug.echo", serde_json::json!({})),
        "globex",
    );
    let r = submit("tok-acme", &foreign);
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(r.json["status"], "rejected");
    assert_eq!(r.json["reason"], "unauthorized");
    assert_eq!(
        get("tok-ops", "x-1", 0).status,
        404,
        "x-1 was never accepted"
    );
    let r = call(
        "POST",
        &w,
        "/api/v1/execute?wait_ms=1000",
        Some("tok-acme"),
        Some(&foreign),
    );
    assert_eq!(r.status, 403, "{}", r.text);

    // globex: one finished, one long-running.
    let g_done = for_tenant(
        assignment("g-done", "debug.echo", serde_json::json!({})),
        "globex",
    );
    assert_eq!(submit("tok-globex", &g_done).status, 202);
    assert_eq!(get("tok-globex", "g-done", 5000).status, 200);
    let g_run = for_tenant(sleep_step("g-run", 30_000, "cpu"), "globex");
    assert_eq!(submit("tok-globex", &g_run).status, 202);

    // acme cannot see, wait for or cancel them: 404 like an unknown id, at once.
    for id in ["g-done", "g-run"] {
        let r = get("tok-acme", id, 0);
        assert_eq!(r.status, 404, "{id}: {}", r.text);
        assert_eq!(
            r.text,
            get("tok-acme", "no-such-id", 0)
                .text
                .replace("no-such-id", id)
        );
        let t = Instant::now();
        assert_eq!(get("tok-acme", id, 3000).status, 404, "{id}");
        assert!(
            t.elapsed() < Duration::from_millis(2500),
            "a foreign wait must not wait"
        );
        assert_eq!(cancel("tok-acme", id).status, 404, "{id}");
    }
    assert_eq!(
        get("tok-globex", "g-run", 0).status,
        202,
        "still running, not cancelled"
    );

    // Operators see everything: the "*" token and WORKER_API_TOKEN.
    for op in ["tok-ops", "op-env"] {
        assert_eq!(get(op, "g-done", 0).status, 200, "{op}");
        assert_eq!(get(op, "a-1", 5000).status, 200, "{op}");
    }
    assert_eq!(get("tok-acme", "a-1", 0).status, 200);
    let r = submit(
        "op-env",
        &for_tenant(
            assignment("o-1", "debug.echo", serde_json::json!({})),
            "initech",
        ),
    );
    assert_eq!(r.status, 202, "{}", r.text);

    // The owner may cancel; no or unknown tokens are 401.
    assert_eq!(cancel("tok-globex", "g-run").status, 202);
    assert_eq!(
        call("GET", &w, "/api/v1/results/a-1", None, None).status,
        401
    );
    assert_eq!(get("tok-nobody", "a-1", 0).status, 401);

    let stderr = w.stderr.lock().unwrap().join("\n");
    assert!(!stderr.contains("tok-acme"), "tokens must never be logged");
    assert!(
        !stderr.contains("WORKER_API_TOKENS_FILE is readable"),
        "0600 file warned"
    );
}

#[test]
fn a_world_readable_tokens_file_logs_a_warning() {
    let (w, _dir) = start(0o644);
    let warned = w.stderr.lock().unwrap().iter().any(|l| {
        let v: Value = serde_json::from_str(l).unwrap_or(Value::Null);
        v["level"] == "WARN"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("WORKER_API_TOKENS_FILE"))
    });
    assert!(warned, "{:?}", w.stderr.lock().unwrap());
    // It still works.
    let r = call("GET", &w, "/api/v1/results/none", Some("tok-acme"), None);
    assert_eq!(r.status, 404);
}

#[test]
fn an_unusable_tokens_file_stops_the_start() {
    let dir = support::temp_dir();
    let path = dir.path().join("tokens.toml");
    std::fs::write(&path, "[tokens]\n\"tok-secret\" = 7\n").unwrap();
    let root = dir.path().join("data");
    let out = support::run_cmd(
        &["serve"],
        &[
            ("WORKER_FS_ROOT", root.to_str().unwrap()),
            ("WORKER_API_TOKENS_FILE", path.to_str().unwrap()),
            ("WORKER_INGRESS_ADDR", "127.0.0.1:0"),
            ("WORKER_HEALTH_ADDR", "127.0.0.1:0"),
        ],
        "",
        Duration::from_secs(20),
    );
    assert_eq!(out.code, 2, "{:?}", out.stderr);
    let err = out.stderr.join("\n");
    assert!(err.contains("WORKER_API_TOKENS_FILE"), "{err}");
    assert!(!err.contains("tok-secret"), "{err}");
}

#[test]
fn tenant_tokens_list_and_decide_only_their_own_approvals() {
    let (w, _dir) = start(0o600);
    let approval = |id: &str, tenant: &str| {
        let payload = serde_json::json!({"title": format!("Ship {id}?"), "approvers": ["ann"]});
        for_tenant(assignment(id, "human.approval", payload), tenant)
    };
    let submit = |token, a: &Value| call("POST", &w, "/api/v1/assignments", Some(token), Some(a));
    assert_eq!(
        submit("tok-globex", &approval("g-appr", "globex")).status,
        202
    );
    assert_eq!(submit("tok-acme", &approval("a-appr", "acme")).status, 202);
    let list = |token, tenant: &str| {
        call(
            "GET",
            &w,
            &format!("/api/v1/approvals?tenant_id={tenant}"),
            Some(token),
            None,
        )
    };
    let approve = serde_json::json!({"decision": "approve", "by": "ann"});
    let decide = |token, id: &str| {
        call(
            "POST",
            &w,
            &format!("/api/v1/approvals/{id}"),
            Some(token),
            Some(&approve),
        )
    };
    // acme lists its own, not globex's; it cannot decide globex's (404 as unknown).
    let own = list("tok-acme", "acme");
    assert_eq!(own.status, 200, "{}", own.text);
    assert_eq!(own.json["count"], 1, "{}", own.text);
    assert_eq!(list("tok-acme", "globex").status, 404);
    let r = decide("tok-acme", "g-appr");
    assert_eq!(r.status, 404, "{}", r.text);
    // Still pending for globex, who may decide it; the operator sees every tenant.
    assert_eq!(list("tok-ops", "globex").json["count"], 1);
    let r = decide("tok-globex", "g-appr");
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["outputs"]["decision"], "approved");
    assert_eq!(decide("op-env", "a-appr").status, 200);
}
