//! ExecResult (SPEC §3.3): the one answer for every accepted assignment.

use super::assignment::Assignment;
use super::error_code::{ErrorCode, Status};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;
use std::sync::Arc;

/// `{"type": "http.request"}` — the router reads the job type nested.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRef {
    /// The job type string.
    #[serde(rename = "type")]
    pub job_type: Cow<'static, str>,
}

/// The outcome of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Always `"1"`.
    pub version: Cow<'static, str>,
    /// Echoed.
    pub assignment_id: String,
    /// Echoed.
    pub request_id: String,
    /// Echoed.
    pub tenant_id: String,
    /// `executor.provider_id` or `"caf-worker"`.
    pub provider_id: Cow<'static, str>,
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
    /// This worker (shared by all its results).
    pub worker_id: Arc<str>,
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
    pub fn new(
        a: &Assignment,
        outcome: Outcome,
        stats: StepStats,
        worker_id: &Arc<str>,
    ) -> ExecResult {
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
        let c = a.correlation();
        ExecResult {
            version: Cow::Borrowed("1"),
            assignment_id: a.assignment_id.clone(),
            request_id: a.request_id.clone(),
            tenant_id: a.tenant_id.clone(),
            provider_id: a.provider_id.clone(),
            job: JobRef {
                job_type: Cow::Borrowed(a.job_type.as_str()),
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
            worker_id: worker_id.clone(),
        }
    }

    /// The result as one JSON line (no trailing newline): byte for byte
    /// what serde_json makes of it, written field by field (keys as
    /// constants, plain strings copied as they are), which took half the
    /// time of the derived serializer on the engine's hot path.
    pub fn to_json_line(&self) -> String {
        // Sized for a typical result, so the buffer rarely grows (a growth
        // copies everything written so far).
        let mut out = Vec::with_capacity(512);
        self.write_json(&mut out);
        // Every piece written is UTF-8 (the strings are `str`s, the rest
        // ASCII or serde_json's own output).
        String::from_utf8(out).unwrap_or_else(|e| format!("{{\"serialize_error\":\"{e}\"}}"))
    }

    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"version\":");
        json_str(out, &self.version);
        out.extend_from_slice(b",\"assignment_id\":");
        json_str(out, &self.assignment_id);
        out.extend_from_slice(b",\"request_id\":");
        json_str(out, &self.request_id);
        out.extend_from_slice(b",\"tenant_id\":");
        json_str(out, &self.tenant_id);
        out.extend_from_slice(b",\"provider_id\":");
        json_str(out, &self.provider_id);
        out.extend_from_slice(b",\"job\":{\"type\":");
        json_str(out, &self.job.job_type);
        out.extend_from_slice(b"},\"status\":");
        json_str(out, self.status.as_str());
        write_u64(out, b",\"latency_ms\":", self.latency_ms);
        write_u64(out, b",\"queue_ms\":", self.queue_ms);
        out.extend_from_slice(b",\"cost\":");
        json_value(out, &self.cost);
        write_u64(out, b",\"timestamp\":", self.timestamp);
        write_u64(out, b",\"attempts\":", u64::from(self.attempts));
        write_u64(out, b",\"retries_used\":", u64::from(self.retries_used));
        if let Some(v) = &self.outputs {
            out.extend_from_slice(b",\"outputs\":");
            json_value(out, v);
        }
        if let Some(c) = self.error_code {
            out.extend_from_slice(b",\"error_code\":");
            json_str(out, c.as_str());
        }
        if let Some(m) = &self.error_message {
            out.extend_from_slice(b",\"error_message\":");
            json_str(out, m);
        }
        if let Some(r) = self.retryable {
            out.extend_from_slice(if r {
                b",\"retryable\":true"
            } else {
                b",\"retryable\":false"
            });
        }
        for (key, v) in [
            (&b",\"trace_id\":"[..], &self.trace_id),
            (b",\"run_id\":", &self.run_id),
            (b",\"flow_id\":", &self.flow_id),
            (b",\"step_id\":", &self.step_id),
        ] {
            if let Some(v) = v {
                out.extend_from_slice(key);
                json_str(out, v);
            }
        }
        out.extend_from_slice(b",\"worker_id\":");
        json_str(out, &self.worker_id);
        out.push(b'}');
    }
}

/// Writes `s` as a JSON string: copied as it is when nothing needs an
/// escape (ids and names, nearly always), else by serde_json.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // Eight bytes at a time: a byte-at-a-time check cost ~140 instructions
    // per string, 8 strings a result.
    if super::scan::find_string_stop(s.as_bytes()).is_none() {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        json_value(out, s);
    }
}

/// `key` then `n` in decimal, two digits per division (a timestamp has 13).
fn write_u64(out: &mut Vec<u8>, key: &[u8], n: u64) {
    /// "00" to "99".
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    out.extend_from_slice(key);
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else {
        i -= 1;
        digits[i] = b'0' + n as u8;
    }
    out.extend_from_slice(&digits[i..]);
}

/// Writes `v` with serde_json (its output for plain data cannot fail).
fn json_value<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    if serde_json::to_writer(&mut *out, v).is_err() {
        out.extend_from_slice(b"null");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::ErrorCode;

    fn sample() -> ExecResult {
        ExecResult {
            version: "1".into(),
            assignment_id: "a-1".into(),
            request_id: "r-1".into(),
            tenant_id: "t".into(),
            provider_id: "caf-worker".into(),
            job: JobRef {
                job_type: "debug.echo".into(),
            },
            status: Status::Success,
            latency_ms: 0,
            queue_ms: 7,
            cost: 0.0,
            timestamp: 1_764_000_000_000,
            attempts: 1,
            retries_used: 0,
            outputs: Some(serde_json::json!({"n": 1, "s": "é\n\"x\"", "a": [1.5, null, true]})),
            error_code: None,
            error_message: None,
            retryable: None,
            trace_id: None,
            run_id: None,
            flow_id: None,
            step_id: None,
            worker_id: "w-1".into(),
        }
    }

    #[test]
    fn the_line_is_what_serde_json_writes() {
        let mut failed = sample();
        failed.status = Status::Error;
        failed.outputs = None;
        failed.error_code = Some(ErrorCode::NetworkError);
        failed.error_message = Some("bad \"quote\" \\ back\u{1}\t tab ✓".into());
        failed.retryable = Some(false);
        failed.trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".into());
        failed.run_id = Some("only a \"quote\"".into());
        failed.flow_id = Some("flow\u{7f}".into());
        failed.step_id = Some("step".into());
        failed.latency_ms = u64::MAX;
        failed.attempts = u32::MAX;
        failed.retries_used = 10;
        failed.cost = 1.25;
        failed.assignment_id = "id with \"quotes\" and \u{0}".into();
        let mut retryable = sample();
        retryable.retryable = Some(true);
        retryable.outputs = Some(serde_json::json!([]));
        for r in [sample(), failed, retryable] {
            let ours = r.to_json_line();
            assert_eq!(ours, serde_json::to_string(&r).unwrap());
            let back: ExecResult = serde_json::from_str(&ours).unwrap();
            assert_eq!(back, r);
        }
    }

    #[test]
    fn numbers_and_strings_are_written_as_serde_json_writes_them() {
        // Every digit count, each side of every power of ten, and the ends.
        let mut numbers = vec![0, 1, 9, 10, 11, 99, 100, 101, 999, u64::MAX, u64::MAX - 1];
        let mut p = 1u64;
        while let Some(next) = p.checked_mul(10) {
            numbers.extend([next - 1, next, next + 1, next + next / 2]);
            p = next;
        }
        for n in numbers {
            let mut out = Vec::new();
            write_u64(&mut out, b"", n);
            assert_eq!(out, n.to_string().as_bytes(), "{n}");
        }
        // Strings of every length around a word, with a byte needing an
        // escape at every place.
        for len in 0..20 {
            for at in 0..=len {
                for special in ['"', '\\', '\u{1f}', '\n', 'é', '\u{7f}'] {
                    let mut text: String = "abcdefghijklmnopqrstu"[..len].into();
                    if at < len {
                        text.replace_range(at..at + 1, &special.to_string());
                    }
                    let mut out = Vec::new();
                    json_str(&mut out, &text);
                    assert_eq!(out, serde_json::to_vec(&text).unwrap(), "{text:?}");
                }
            }
        }
    }
}
