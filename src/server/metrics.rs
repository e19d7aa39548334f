//! Metrics port (SPEC §8.3): `GET /metrics` in Prometheus text format.

use super::health::{ExtraCheck, Health};
use super::{Handler, Reply, method_not_allowed, not_found, respond};
use crate::engine::Engine;
use crate::telemetry::Metrics;
use std::sync::Arc;
use tiny_http::{Header, Method, Request, Response};

/// The `/metrics` handler: refreshes live gauges from the engine, then encodes.
pub struct MetricsEndpoint {
    engine: Engine,
    metrics: Arc<Metrics>,
    extra: Vec<ExtraCheck>,
}

impl MetricsEndpoint {
    /// An endpoint over `metrics`.
    pub fn new(engine: Engine, metrics: Arc<Metrics>) -> MetricsEndpoint {
        MetricsEndpoint::with_checks(engine, metrics, Vec::new())
    }

    /// An endpoint whose `worker_health_status` also covers transport checks.
    pub fn with_checks(
        engine: Engine,
        metrics: Arc<Metrics>,
        extra: Vec<ExtraCheck>,
    ) -> MetricsEndpoint {
        MetricsEndpoint {
            engine,
            metrics,
            extra,
        }
    }

    fn route(&self, request: &Request) -> Reply {
        let path = request.url().split('?').next().unwrap_or("");
        if path != "/metrics" {
            return not_found(path);
        }
        if !matches!(request.method(), Method::Get | Method::Head) {
            return method_not_allowed("GET, HEAD");
        }
        let checks = Health::checks_with(&self.engine, &self.extra);
        let health: Vec<(&str, bool)> = checks.iter().map(|c| (c.name, c.ok)).collect();
        self.metrics.refresh(
            &self.engine.pool_stats(),
            self.engine.blocks().fs_abandoned(),
            self.engine.approvals_pending(),
            &health,
        );
        let content_type =
            Header::from_bytes(&b"Content-Type"[..], Metrics::content_type().as_bytes())
                .expect("constant header is valid ASCII");
        Response::from_data(self.metrics.encode()).with_header(content_type)
    }
}

impl Handler for MetricsEndpoint {
    fn handle(&self, request: Request) {
        let reply = self.route(&request);
        respond(request, reply);
    }
}
