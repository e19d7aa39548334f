//! `debug.sleep` and `debug.fail` (SPEC §4.3); `debug.echo` is inline in the dispatcher.

use super::payload::{optional_bool, optional_u64, required_str};
use super::{AttemptContext, BlockError, TimeoutPhase};
use crate::cancel::SLICE;
use crate::contract::ErrorCode;
use serde_json::{Map, Value, json};
use std::time::{Duration, Instant};

const MAX_SLEEP_MS: u64 = 3_600_000;

/// Sleeps `ms` in slices of ≤ 50 ms, ending early on cancellation or the attempt deadline.
pub fn sleep(p: &Map<String, Value>, ctx: &AttemptContext<'_>) -> Result<Value, BlockError> {
    let ms = sleep_ms(p)?;
    let start = Instant::now();
    let until = start + Duration::from_millis(ms);
    loop {
        if let Some(reason) = ctx.cancel.reason() {
            return Err(BlockError::cancelled(reason));
        }
        let now = Instant::now();
        if now >= until {
            return Ok(json!({"slept_ms": start.elapsed().as_millis() as u64}));
        }
        let mut next = until.min(now + SLICE);
        if let Some(d) = ctx.deadline {
            if now >= d {
                return Err(BlockError::timeout(
                    TimeoutPhase::Attempt,
                    format!(
                        "attempt timed out after {} ms of a {ms} ms sleep",
                        start.elapsed().as_millis()
                    ),
                ));
            }
            next = next.min(d);
        }
        std::thread::sleep(next - now);
    }
}

/// `payload.ms` of `debug.sleep`: required, at most [`MAX_SLEEP_MS`].
pub fn sleep_ms(p: &Map<String, Value>) -> Result<u64, BlockError> {
    let ms = optional_u64(p, "ms")?.ok_or_else(|| {
        BlockError::input(ErrorCode::MissingRequiredField, "payload.ms is required")
    })?;
    if ms > MAX_SLEEP_MS {
        return Err(BlockError::input(
            ErrorCode::InvalidInput,
            format!("payload.ms must be at most {MAX_SLEEP_MS}"),
        ));
    }
    Ok(ms)
}

/// What `debug.fail` was asked to do.
pub struct FailSpec {
    code: ErrorCode,
    fail_attempts: Option<u64>,
    http_status: Option<u64>,
    panic: bool,
}

/// Reads and checks the `debug.fail` payload.
pub fn fail_spec(p: &Map<String, Value>) -> Result<FailSpec, BlockError> {
    let code_text = required_str(p, "error_code")?;
    let code: ErrorCode = code_text.parse().map_err(|_| {
        BlockError::input(
            ErrorCode::InvalidInput,
            format!("payload.error_code {code_text:?} is not a known error code"),
        )
    })?;
    Ok(FailSpec {
        code,
        fail_attempts: optional_u64(p, "fail_attempts")?,
        http_status: optional_u64(p, "http_status")?,
        panic: optional_bool(p, "panic")? == Some(true),
    })
}

/// Fails the first `fail_attempts` attempts (default: all) with `error_code`, then succeeds.
///
/// Extras for tests and drills: `http_status` (with `HTTP_ERROR`, drives the
/// retry classification) and `panic: true` (panics, to prove panics are caught).
pub fn fail(p: &Map<String, Value>, ctx: &AttemptContext<'_>) -> Result<Value, BlockError> {
    let FailSpec {
        code,
        fail_attempts,
        http_status,
        panic,
    } = fail_spec(p)?;
    if panic {
        panic!("debug.fail: simulated panic on attempt {}", ctx.attempt);
    }
    if fail_attempts.is_some_and(|n| u64::from(ctx.attempt) > n) {
        return Ok(json!({"attempt": ctx.attempt, "failed_attempts": ctx.attempt - 1}));
    }
    let mut e = BlockError::new(
        code,
        format!("debug.fail: simulated {code} on attempt {}", ctx.attempt),
    );
    if code == ErrorCode::CancelledByTimeout {
        e.timeout = Some(TimeoutPhase::Attempt);
    }
    e.http_status = http_status.and_then(|s| u16::try_from(s).ok());
    Err(e)
}
