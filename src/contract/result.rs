//! ExecResult (SPEC §3.3): the one answer for every accepted assignment.

use super::assignment::Assignment;
use super::error_code::{ErrorCode, Status};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `{"type": "http.request"}` — the router reads the job type nested.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRef {
    /// The job type string.
    #[serde(rename = "type")]
    pub job_type: String,
}

/// The outcome of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Always `"1"`.
    pub version: String,
    /// Echoed.
    pub assignment_id: String,
    /// Echoed.
    pub request_id: String,
    /// Echoed.
    pub tenant_id: String,
    /// `executor.provider_id` or `"caf-worker"`.
    pub provider_id: String,
    /// The job type.
    pub job: JobRef,
    /// Final status.
    pub status: Status,
    /// First attempt start → final outcome, ms.
    pub latency_ms: u64,
    /// Acceptance → first attempt start, ms.
    pub queue_ms: u64,
    /// Always 0.0 for this worker's blocks.
    pub cost: f64,
    /// Epoch ms when the result was produced.
    pub timestamp: u64,
    /// Attempts started.
    pub attempts: u32,
    /// `max(attempts - 1, 0)`.
    pub retries_used: u32,
    /// Block outputs (success, and some errors).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub outputs: Option<Value>,
    /// Present unless success.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_code: Option<ErrorCode>,
    /// Present unless success.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_message: Option<String>,
    /// Present unless success: could resubmitting succeed?
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retryable: Option<bool>,
    /// Echoed when present.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub trace_id: Option<String>,
    /// Echoed when present.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub run_id: Option<String>,
    /// Echoed when present.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub flow_id: Option<String>,
    /// Echoed when present.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub step_id: Option<String>,
    /// This worker.
    pub worker_id: String,
}

/// What ended a step, before it is dressed as a wire result.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The block produced outputs.
    Success(Value),
    /// The step failed; status follows from the code.
    Failure {
        /// §3.4 code.
        code: ErrorCode,
        /// Human message.
        message: String,
        /// Could resubmitting succeed?
        retryable: bool,
        /// Partial outputs (e.g. HTTP status and body head).
        outputs: Option<Value>,
    },
}

/// Timing and attempt counts of a finished step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepStats {
    /// Attempts started.
    pub attempts: u32,
    /// First attempt start → outcome, ms.
    pub latency_ms: u64,
    /// Acceptance → first attempt start, ms.
    pub queue_ms: u64,
}

impl ExecResult {
    /// Builds the wire result of `a` from its outcome.
    pub fn new(a: &Assignment, outcome: Outcome, stats: StepStats, worker_id: &str) -> ExecResult {
        let (status, outputs, error_code, error_message, retryable) = match outcome {
            Outcome::Success(v) => (Status::Success, Some(v), None, None, None),
            Outcome::Failure {
                code,
                message,
                retryable,
                outputs,
            } => (
                code.status(),
                outputs,
                Some(code),
                Some(if message.is_empty() {
                    code.as_str().to_owned()
                } else {
                    message
                }),
                Some(retryable),
            ),
        };
        let c = &a.correlation;
        ExecResult {
            version: "1".into(),
            assignment_id: a.assignment_id.clone(),
            request_id: a.request_id.clone(),
            tenant_id: a.tenant_id.clone(),
            provider_id: a.provider_id.clone(),
            job: JobRef {
                job_type: a.job_type.as_str().into(),
            },
            status,
            latency_ms: stats.latency_ms,
            queue_ms: stats.queue_ms,
            cost: 0.0,
            timestamp: crate::time::now_ms(),
            attempts: stats.attempts,
            retries_used: stats.attempts.saturating_sub(1),
            outputs,
            error_code,
            error_message,
            retryable,
            trace_id: c.trace_id.clone(),
            run_id: c.run_id.clone(),
            flow_id: c.flow_id.clone(),
            step_id: c.step_id.clone(),
            worker_id: worker_id.to_owned(),
        }
    }

    /// The result as one JSON line (no trailing newline).
    pub fn to_json_line(&self) -> String {
        // Sized for a typical result, so the buffer rarely grows (a growth
        // copies everything written so far).
        let mut buf = Vec::with_capacity(512);
        // Serialising plain data with string keys cannot fail, and the
        // serializer writes UTF-8 only.
        serde_json::to_writer(&mut buf, self)
            .map_err(|e| e.to_string())
            .and_then(|()| String::from_utf8(buf).map_err(|e| e.to_string()))
            .unwrap_or_else(|e| format!("{{\"serialize_error\":\"{e}\"}}"))
    }
}
