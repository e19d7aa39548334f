//! `human.approval` decisions over NATS (SPEC §14.2, decisions in §12.17):
//! a plain subscription (no queue group) on the approval subject, in both
//! modes, so every worker sees every decision and the one holding the
//! approval applies it through [`Engine::decide_approval`], the hook the
//! ingress calls. A worker that does not know the id stays silent: another
//! worker may hold it. Answers go to the message's reply subject, if any;
//! the decided step's result goes out like every result (on the result
//! subject when the assignment came from NATS).

use super::{SLICE, Shared};
use crate::contract::ExecResult;
use crate::engine::{DecideError, Engine};
use crate::telemetry::logging::RateLimit;
use crate::telemetry::{ApprovalRefusal, Direction, MessageKind};
use crate::transport::nats::{Headers, Message};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Decisions the subscription buffers (beyond it the client drops and
/// counts them, as NATS does for slow consumers). Each is handled in
/// microseconds, so this only absorbs bursts.
const SUBSCRIPTION_BUFFER: usize = 1024;

/// INFO lines per second for refused decisions that have no reply subject
/// (the rest are counted in one "suppressed" line): anyone who may publish
/// on the approval subject must not be able to flood the worker's log.
const REFUSAL_LINES_PER_SEC: u32 = 10;

/// What this worker does with one decision message.
#[derive(Debug)]
enum Answer {
    /// Applied: the approval's result.
    Decided(Arc<ExecResult>),
    /// Refused, with a sentence for the sender.
    Refused(ApprovalRefusal, String),
    /// Not an id this worker holds or retains: another worker may.
    NotMine,
}

/// The decision thread: subscribes, confirms the subscription with a
/// PING/PONG (health waits for it), then handles messages until the drain.
pub(super) fn decision_loop(s: &Shared) {
    let sub = loop {
        match s
            .client
            .subscribe_with_capacity(&s.nats.approval_subject, None, SUBSCRIPTION_BUFFER)
        {
            Ok(sub) => break sub,
            Err(e) => {
                log::warn!(error = e.to_string(); "cannot subscribe to the approval subject; retrying");
                if super::core::wait_or_stop(s, Duration::from_millis(500)) {
                    return;
                }
            }
        }
    };
    while s.client.flush(Duration::from_secs(2)).is_err() {
        if super::core::wait_or_stop(s, Duration::from_millis(100)) {
            return;
        }
    }
    s.approvals_ready.store(true, Ordering::Release);
    let rx = sub.receiver().clone();
    let refusals = RateLimit::new(
        REFUSAL_LINES_PER_SEC,
        "NATS approval decisions refused without a reply subject",
    );
    while !s.draining.load(Ordering::Acquire) {
        if let Ok(msg) = rx.recv_timeout(SLICE) {
            take(s, &msg, &refusals);
        }
    }
    refusals.flush();
    // Draining: the engine answers pending approvals `cancelled`; later
    // decisions would only meet 409s.
    sub.unsubscribe();
}

/// Handles one decision message: applies or refuses it, answers the reply
/// subject, counts and logs.
fn take(s: &Shared, msg: &Message, refusals: &RateLimit) {
    s.observer.message(Direction::In, MessageKind::Approval);
    let Some(engine) = s.engine() else { return };
    let (id, answer) = decide(
        engine,
        &msg.payload,
        msg.headers.as_ref(),
        s.rules.max_body_bytes,
    );
    let id = id.as_deref().unwrap_or("");
    let body = match &answer {
        Answer::NotMine => {
            log::debug!(assignment_id = id; "NATS decision for an approval this worker does not hold; ignored");
            return;
        }
        Answer::Decided(r) => {
            log::debug!(assignment_id = id; "approval decided over NATS");
            r.to_json_line()
        }
        Answer::Refused(reason, message) => {
            s.observer.approval_refused(*reason);
            // The sender learns the refusal from the answer; without a reply
            // subject this line is the only trace (a client's mistake, not
            // the worker's: INFO).
            if msg.reply.is_some() {
                log::debug!(assignment_id = id, reason = reason.as_str(); "NATS decision refused: {message}");
            } else if log::log_enabled!(log::Level::Info) && refusals.admit() {
                log::info!(assignment_id = id, reason = reason.as_str(); "NATS decision refused (no reply subject): {message}");
            }
            refusal_body(*reason, message).to_string()
        }
    };
    let Some(reply) = msg.reply.as_deref() else {
        return;
    };
    let mut h = Headers::new();
    h.insert("version", "1");
    match s
        .client
        .publish_with_headers(reply, None, &h, body.as_bytes())
    {
        Ok(()) => s.observer.message(Direction::Out, MessageKind::Approval),
        Err(e) => {
            log::debug!(assignment_id = id, error = e.to_string(); "cannot answer a NATS decision")
        }
    }
}

/// The answer to a refused decision: `{"error":{"code","message","status"}}`
/// (no top-level `status`, so it is never mistaken for an ExecResult).
fn refusal_body(reason: ApprovalRefusal, message: &str) -> Value {
    json!({"error": {"code": reason.as_str(), "message": message, "status": reason.status()}})
}

/// Decides what one message means for this worker; returns its
/// `assignment_id` when it has one. The order follows the ingress: the id
/// first (here from the body), then the tenant, then the decision itself;
/// only a body that names no id is refused by every worker (400).
fn decide(
    engine: &Engine,
    payload: &[u8],
    headers: Option<&Headers>,
    max_body: usize,
) -> (Option<String>, Answer) {
    let refuse = |reason, message: String| Answer::Refused(reason, message);
    if payload.len() > max_body {
        let m = format!(
            "the body is {} bytes, more than WORKER_MAX_BODY_BYTES ({max_body})",
            payload.len()
        );
        return (None, refuse(ApprovalRefusal::PayloadTooLarge, m));
    }
    // Duplicate keys are refused, as at the ingress and at intake.
    let v = match crate::contract::from_slice_unique(payload) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            let m = "the body must be a JSON object".to_owned();
            return (None, refuse(ApprovalRefusal::InvalidRequest, m));
        }
        Err(e) => {
            let m = format!("the body is not JSON: {e}");
            return (None, refuse(ApprovalRefusal::InvalidRequest, m));
        }
    };
    let id = match v.get("assignment_id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        _ => {
            let m = "assignment_id must be a non-empty string".to_owned();
            return (None, refuse(ApprovalRefusal::InvalidRequest, m));
        }
    };
    let Some(owner) = engine.tenant_of(&id) else {
        return (Some(id), Answer::NotMine);
    };
    // The body's tenant_id wins over the header, as for assignments (§12.8).
    let tenant = match v.get("tenant_id") {
        None | Some(Value::Null) => headers.and_then(|h| h.get("tenant_id")),
        Some(Value::String(t)) => Some(t.as_str()),
        Some(_) => {
            let m = "tenant_id must be a string".to_owned();
            return (Some(id), refuse(ApprovalRefusal::InvalidRequest, m));
        }
    };
    if tenant.is_some_and(|t| t != owner) {
        // Another tenant's approval is unknown to this sender, as at the ingress.
        let m = format!("no approval {id:?} is known");
        return (Some(id), refuse(ApprovalRefusal::NotFound, m));
    }
    let decision = match crate::server::decision_from_value(&v) {
        Ok(d) => d,
        Err(m) => return (Some(id), refuse(ApprovalRefusal::InvalidRequest, m)),
    };
    let answer = match engine.decide_approval(&id, &decision) {
        Ok(result) => Answer::Decided(result),
        Err(DecideError::NotApprover) => refuse(
            ApprovalRefusal::Forbidden,
            format!("{:?} is not among the approvers of {id:?}", decision.by),
        ),
        Err(DecideError::Unknown) => refuse(
            ApprovalRefusal::NotFound,
            format!("no approval {id:?} is known"),
        ),
        Err(DecideError::AlreadyDecided) => refuse(
            ApprovalRefusal::AlreadyDecided,
            format!("approval {id:?} already has a result"),
        ),
    };
    (Some(id), answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_carry_code_message_and_status() {
        let v = refusal_body(ApprovalRefusal::AlreadyDecided, "done");
        assert_eq!(
            v,
            json!({"error": {"code": "already_decided", "message": "done", "status": 409}})
        );
        assert!(
            v.get("status").is_none(),
            "never mistaken for an ExecResult"
        );
    }
}
