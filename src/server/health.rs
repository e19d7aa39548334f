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

/// A check contributed by a transport (e.g. `nats`: connected). A failing
/// one makes `/_health` unhealthy and `/readyz` 503 (SPEC §13.5).
pub type ExtraCheck = Arc<dyn Fn() -> HealthCheck + Send + Sync>;

/// The health handler; also evaluates checks for the metrics gauges.
pub struct Health {
    engine: Engine,
    ready: Arc<AtomicBool>,
    extra: Vec<ExtraCheck>,
}

impl Health {
    /// A health handler; `ready` is false while starting and draining.
    pub fn new(engine: Engine, ready: Arc<AtomicBool>) -> Health {
        Health::with_checks(engine, ready, Vec::new())
    }

    /// A health handler with transport checks besides the engine's own.
    pub fn with_checks(engine: Engine, ready: Arc<AtomicBool>, extra: Vec<ExtraCheck>) -> Health {
        Health {
            engine,
            ready,
            extra,
        }
    }

    /// The engine's checks followed by `extra`.
    pub fn checks_with(engine: &Engine, extra: &[ExtraCheck]) -> Vec<HealthCheck> {
        let mut checks = Health::checks(engine);
        checks.extend(extra.iter().map(|c| c()));
        checks
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
                let checks = Health::checks_with(&self.engine, &self.extra);
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
                let failing = self.extra.iter().map(|c| c()).find(|c| !c.ok);
                if self.ready.load(Ordering::Acquire)
                    && !self.engine.is_draining()
                    && failing.is_none()
                {
                    json(200, &json!({"status": "ready", "timestamp": timestamp}))
                } else {
                    let why = if self.engine.is_draining() {
                        "draining".to_owned()
                    } else if !self.ready.load(Ordering::Acquire) {
                        "starting".to_owned()
                    } else {
                        failing.map_or_else(String::new, |c| format!("{}: {}", c.name, c.detail))
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
