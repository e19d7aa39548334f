//! One step from start to result: the attempt loop with retries, deadlines
//! and cancellation (SPEC §6, §7). A retry does not sleep here: the step
//! returns [`Progress::Park`] and waits in the engine's timer map.

use super::retry::{backoff, cp1_delay, is_retryable, jittered};
use super::{Shared, StepHandle};
use crate::blocks::{AttemptContext, BlockError, TimeoutPhase};
use crate::cancel::CancelReason;
use crate::contract::{ErrorCode, Outcome, StepStats};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

/// Where an attempt left the step.
pub(super) enum Progress {
    /// The step has its outcome.
    Done(Outcome, StepStats),
    /// A retry is due at `until` (capped at the deadline under CP2 timeouts):
    /// the step parks, and the pool thread is free at once.
    Park {
        /// When to re-queue it.
        until: Instant,
        /// The error of the attempt that failed.
        last: BlockError,
    },
}

/// Runs the step of `h` up to its outcome or its next backoff. `resume` is
/// `None` for the first start, or the last error when a parked retry comes
/// back from the timer.
pub(super) fn run(shared: &Shared, h: &StepHandle, resume: Option<BlockError>) -> Progress {
    let s = &shared.settings;
    let a = &h.assignment;
    let accepted = h.accepted_at;
    let never_started = |outcome| {
        let stats = StepStats {
            attempts: 0,
            latency_ms: 0,
            queue_ms: ms(accepted.elapsed()),
        };
        Progress::Done(outcome, stats)
    };
    // Publish "running" before looking at the token; `Engine::cancel` sets
    // the token before looking at "running". With a SeqCst fence on both
    // sides at least one of us sees the other, so a waiting step (queued or
    // parked) is never both answered by the canceller and run here.
    let now = Instant::now();
    if resume.is_none() {
        let _ = h.started.set(now);
    }
    h.running.store(true, Ordering::SeqCst);
    fence(Ordering::SeqCst);
    let start = *h.started.get().unwrap_or(&now);
    let stats_now = |attempts| StepStats {
        attempts,
        latency_ms: ms(start.elapsed()),
        queue_ms: ms(start.saturating_duration_since(accepted)),
    };
    let mut attempt = h.attempts.load(Ordering::Acquire);
    if let Some(last) = resume {
        if let Some(reason) = h.cancel.reason() {
            let outcome = final_failure(BlockError::cancelled(reason), false, None);
            return Progress::Done(outcome, stats_now(attempt));
        }
        if s.flags.complete_timeout && Instant::now() >= h.deadline {
            let outcome = deadline_failure(shared, h, last, attempt);
            return Progress::Done(outcome, stats_now(attempt));
        }
        // Counted when the retry really starts, not when it was planned.
        shared.observer.retry(a.job_type);
    } else {
        if let Some(reason) = h.cancel.reason() {
            return never_started(final_failure(BlockError::cancelled(reason), false, None));
        }
        // `now` serves: only cheap checks ran since it was read.
        if s.flags.complete_timeout && now >= h.deadline {
            // Claim the step as the deadline thread would; whoever sets the
            // token counts the timeout, so it is counted once.
            if !h.cancel.cancel(CancelReason::Deadline) {
                let reason = h.cancel.reason().unwrap_or(CancelReason::Deadline);
                return never_started(final_failure(BlockError::cancelled(reason), false, None));
            }
            shared.observer.timeout(a.job_type, TimeoutPhase::Deadline);
            return never_started(queued_past_deadline());
        }
        if s.flags.advanced_retry {
            shared.budget.record_first_attempt();
        }
    }

    let max_attempts = a
        .retry
        .max_attempts
        .unwrap_or(s.default_max_attempts)
        .max(1);
    // One attempt per call: a retry parks and comes back through `resume`.
    let outcome = 'attempt: {
        attempt += 1;
        h.attempts.store(attempt, Ordering::Release);
        // The clock read at the start serves: only cheap checks ran since.
        let ctx = AttemptContext {
            attempt,
            cancel: &h.cancel,
            deadline: Some(attempt_deadline(shared, h, now)),
            connect_timeout: s.flags.complete_timeout.then(|| {
                let attempt_cap = a
                    .attempt_timeout_ms
                    .map_or(Duration::MAX, Duration::from_millis);
                s.http_connect_timeout.min(attempt_cap)
            }),
        };
        let result = catch_unwind(AssertUnwindSafe(|| {
            shared.blocks.execute(a.job_type, &a.payload, &ctx)
        }))
        .unwrap_or_else(|panic| Err(panic_error(panic)));
        let err = match result {
            Ok(outputs) => break 'attempt Outcome::Success(outputs),
            Err(e) => e,
        };
        if let Some(phase) = err.timeout {
            shared.observer.timeout(a.job_type, phase);
        }
        if let Some(reason) = h.cancel.reason() {
            break 'attempt final_failure(BlockError::cancelled(reason), false, None);
        }
        if err.code == ErrorCode::CancelledByUser || attempt >= max_attempts {
            break 'attempt final_failure(err, false, None);
        }
        if s.flags.complete_timeout && Instant::now() >= h.deadline {
            break 'attempt deadline_failure(shared, h, err, attempt);
        }
        let delay = if s.flags.advanced_retry {
            if !is_retryable(&err) {
                break 'attempt final_failure(err, false, None);
            }
            let base = a
                .retry
                .backoff_ms
                .map_or(s.retry_base, Duration::from_millis);
            let cap = a
                .retry
                .max_backoff_ms
                .map_or(s.retry_max_delay, Duration::from_millis);
            let mut d = jittered(backoff(base, cap, attempt), s.retry_jitter);
            if let Some(after) = err.retry_after {
                d = d.max(after);
            }
            if Instant::now() + d >= h.deadline {
                break 'attempt final_failure(
                    err,
                    true,
                    Some(format!(
                        "retry budget exhausted: the next retry (after {} ms) would end past the step deadline",
                        d.as_millis()
                    )),
                );
            }
            if !shared.budget.try_spend() {
                shared.observer.retry_budget_denied(a.job_type);
                break 'attempt final_failure(
                    err,
                    true,
                    Some("process retry budget exhausted; retry denied".into()),
                );
            }
            d
        } else {
            cp1_delay(attempt)
        };
        let mut until = Instant::now() + delay;
        if s.flags.complete_timeout {
            until = until.min(h.deadline);
        }
        return Progress::Park { until, last: err };
    };
    Progress::Done(outcome, stats_now(attempt))
}

/// The outcome of a step whose deadline passed while it was still queued
/// (given here or by the deadline thread, whichever claims the step).
pub(super) fn queued_past_deadline() -> Outcome {
    Outcome::Failure {
        code: ErrorCode::CancelledByTimeout,
        message: "deadline passed while the step was queued; it never ran".into(),
        retryable: true,
        outputs: None,
    }
}

/// When the current attempt must end.
///
/// CP1: the HTTP attempt's one total timeout is the step deadline, counted
/// from the attempt start. CP2: `min(attempt_timeout_ms, time left to the
/// deadline counted from acceptance)`.
fn attempt_deadline(shared: &Shared, h: &StepHandle, now: Instant) -> Instant {
    let a = &h.assignment;
    if shared.settings.flags.complete_timeout {
        match a.attempt_timeout_ms {
            Some(t) => (now + Duration::from_millis(t)).min(h.deadline),
            None => h.deadline,
        }
    } else {
        now + a
            .deadline_ms
            .map_or(shared.settings.default_deadline, Duration::from_millis)
    }
}

pub(super) fn deadline_failure(
    shared: &Shared,
    h: &StepHandle,
    last: BlockError,
    attempts: u32,
) -> Outcome {
    // One timeout, one count: an attempt cut short by the deadline was
    // already counted in its own phase.
    if last.timeout.is_none() {
        shared
            .observer
            .timeout(h.assignment.job_type, TimeoutPhase::Deadline);
    }
    Outcome::Failure {
        code: ErrorCode::CancelledByTimeout,
        message: format!(
            "step deadline of {} ms passed after {attempts} attempt(s); last error: {}",
            h.deadline
                .saturating_duration_since(h.accepted_at)
                .as_millis(),
            last
        ),
        retryable: true,
        outputs: last.outputs,
    }
}

/// The outcome for a final error. `budget_note` marks a retry that was
/// skipped for budget reasons: the step could still succeed if resubmitted.
fn final_failure(e: BlockError, budget_stop: bool, budget_note: Option<String>) -> Outcome {
    let retryable = match e.code {
        // A cancelled step, or one its deadline ended, did not fail on its
        // own: resubmitting it could succeed.
        ErrorCode::CancelledByUser => true,
        _ if e.timeout == Some(TimeoutPhase::Deadline) => true,
        _ => budget_stop || is_retryable(&e),
    };
    let message = match budget_note {
        Some(note) => format!("{note}; last error: {}", e.message),
        None => e.message,
    };
    Outcome::Failure {
        code: e.code,
        message,
        retryable,
        outputs: e.outputs,
    }
}

fn panic_error(panic: Box<dyn std::any::Any + Send>) -> BlockError {
    let what = crate::telemetry::logging::panic_message(panic.as_ref());
    BlockError::new(ErrorCode::InternalError, format!("block panicked: {what}"))
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}
