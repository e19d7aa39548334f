//! Telemetry: JSON logging with redaction, and (CP2) Prometheus metrics that
//! observe the engine's outcome events.

pub mod logging;
mod metrics;
mod process;
mod redact;
mod transport;

pub use metrics::{FLOW_BUCKETS, Metrics, OTHER_TENANT, QUEUE_WAIT_BUCKETS, STEP_BUCKETS};
pub use redact::{REDACTED, is_secret_key, redact};
pub use transport::{
    ApprovalRefusal, Direction, JsAckKind, MessageKind, NoopTransportObserver, TransportObserver,
};

use crate::config::Settings;
use crate::engine::{NoopObserver, Observer};
use std::sync::Arc;

/// The engine observer for these settings: Prometheus metrics when
/// `CP2_OBSERVABILITY_METRICS_ENABLED` is on, otherwise one that records nothing.
pub fn observer_for(settings: &Settings) -> Arc<dyn Observer> {
    match metrics_for(settings) {
        Some(m) => m,
        None => Arc::new(NoopObserver),
    }
}

/// The metrics registry when the observability flag is on.
pub fn metrics_for(settings: &Settings) -> Option<Arc<Metrics>> {
    if !settings.flags.observability_metrics {
        return None;
    }
    match Metrics::new(settings) {
        Ok(m) => Some(Arc::new(m)),
        Err(e) => {
            log::error!(error = e.to_string(); "cannot register metrics; continuing without them");
            None
        }
    }
}
