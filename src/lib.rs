//! # caf-worker
//!
//! A synchronous step-execution worker for the Beamline router. The router
//! hands each workflow step to the worker as an *assignment*; the worker runs
//! it (an HTTP call, a file blob operation, a debug step) on a fixed pool of
//! OS threads, retries and times it out, and answers with exactly one
//! *result*. No async runtime: crossbeam channels feed the pools, ureq makes
//! blocking HTTP calls with explicit timeouts, tiny_http serves the ports.
//!
//! Layers point downward only:
//!
//! ```text
//! commands (run / validate / serve)
//!   ├── server     ingress, health, metrics ports (tiny_http)
//!   ├── telemetry  JSON logs, redaction, Prometheus observer
//!   └── engine     pools, retry, deadlines, assignment table
//!         └── blocks   http, fs, debug
//!               └── contract  wire types and validation (pure data)
//! ```
//!
//! The product contract is `docs/SPEC.md`.
#![deny(missing_docs)]

pub mod blocks;
pub mod cancel;
pub mod commands;
pub mod config;
pub mod contract;
pub mod engine;
pub mod server;
pub mod sinks;
pub mod telemetry;
pub mod time;
pub mod transport;

pub use config::{Settings, Sources};
pub use contract::{Ack, Assignment, ExecResult};
pub use engine::Engine;
