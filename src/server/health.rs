//! Health port (SPEC §8.2): `/_health`, `/livez`, `/readyz`, GET and HEAD.

use super::{Handler, Reply, json, method_not_allowed, not_found, respond};
use crate::engine::Engine;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tiny_http::{Method, Request};

/// One evaluated health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// `pools`, `fs_root` or `fs_watchdog` (the `check` label of `worker_health_status`).
    pub name: &'static str,
    /// Whether it passes.
    pub ok: bool,
    /// `ok`, or what is wrong.
    pub detail: String,
}

/// The health handler; also evaluates checks for the metrics gauges.
pub struct Health {
    engine: Engine,
    ready: Arc<AtomicBool>,
}

impl Health {
    /// A health handler; `ready` is false while starting and draining.
    pub fn new(engine: Engine, ready: Arc<AtomicBool>) -> Health {
        Health { engine, ready }
    }

    /// Pools with a dead thread, described. Threads leaving during a drain
    /// have not died: they are done (and a failed liveness probe then would
    /// get the process killed before every accepted step has its result).
    fn dead_pools(engine: &Engine) -> Vec<String> {
        if engine.is_draining() {
            return Vec::new();
        }
        engine
            .pool_stats()
            .iter()
            .filter(|p| p.alive < p.threads)
            .map(|p| {
                format!(
                    "{} pool: {} of {} threads alive",
                    p.kind.as_str(),
                    p.alive,
                    p.threads
                )
            })
            .collect()
    }

    /// Evaluates every check: all pool threads alive, FS root writable, FS
    /// watchdog below its cap of abandoned operations (at the cap every FS
    /// step fails fast, so the worker is not healthy).
    pub fn checks(engine: &Engine) -> Vec<HealthCheck> {
        let dead = Health::dead_pools(engine);
        let fs_ok = engine.blocks().fs_root_writable();
        let stuck = engine.blocks().fs_abandoned();
        let watchdog_ok = stuck < crate::blocks::MAX_ABANDONED;
        vec![
            HealthCheck {
                name: "pools",
                ok: dead.is_empty(),
                detail: if dead.is_empty() {
                    "ok".into()
                } else {
                    dead.join("; ")
                },
            },
            HealthCheck {
                name: "fs_root",
                ok: fs_ok,
                detail: if fs_ok {
                    "ok".into()
                } else {
                    format!("{} is not writable", engine.blocks().fs_root().display())
                },
            },
            HealthCheck {
                name: "fs_watchdog",
                ok: watchdog_ok,
                detail: if watchdog_ok {
                    "ok".into()
                } else {
                    format!(
                        "{stuck} file-system operations are stuck (cap {}); FS steps fail until they finish",
                        crate::blocks::MAX_ABANDONED
                    )
                },
            },
        ]
    }

    fn pools_alive(&self) -> bool {
        Health::dead_pools(&self.engine).is_empty()
    }

    fn route(&self, request: &Request) -> Reply {
        let path = request.url().split('?').next().unwrap_or("");
        if !matches!(path, "/_health" | "/livez" | "/readyz") {
            return not_found(path);
        }
        if !matches!(request.method(), Method::Get | Method::Head) {
            return method_not_allowed("GET, HEAD");
        }
        let timestamp = crate::time::rfc3339_micros(std::time::SystemTime::now());
        match path {
            "/_health" => {
                let checks = Health::checks(&self.engine);
                if checks.iter().all(|c| c.ok) {
                    json(200, &json!({"status": "healthy", "timestamp": timestamp}))
                } else {
                    let map: Map<String, Value> = checks
                        .into_iter()
                        .map(|c| (c.name.to_owned(), Value::String(c.detail)))
                        .collect();
                    json(
                        503,
                        &json!({"status": "unhealthy", "timestamp": timestamp, "checks": map}),
                    )
                }
            }
            "/livez" => {
                if self.pools_alive() {
                    json(200, &json!({"status": "alive", "timestamp": timestamp}))
                } else {
                    json(503, &json!({"status": "dead", "timestamp": timestamp}))
                }
            }
            _ => {
                if self.ready.load(Ordering::Acquire) && !self.engine.is_draining() {
                    json(200, &json!({"status": "ready", "timestamp": timestamp}))
                } else {
                    let why = if self.engine.is_draining() {
                        "draining"
                    } else {
                        "starting"
                    };
                    json(
                        503,
                        &json!({"status": "not_ready", "reason": why, "timestamp": timestamp}),
                    )
                }
            }
        }
    }
}

impl Handler for Health {
    fn handle(&self, request: Request) {
        let reply = self.route(&request);
        respond(request, reply);
    }
}
