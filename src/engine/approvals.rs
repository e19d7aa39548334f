//! `human.approval` in the engine (SPEC §14.2): an approval parks in the
//! timer map (its timeout is the entry's due time) and in the table of
//! pending approvals; it holds no pool thread and no queue slot. A decision,
//! the timeout, a cancel or shutdown completes it, whichever claims it first.
//!
//! Fronts call [`Engine::decide_approval`] and [`Engine::pending_approvals`]:
//! the ingress routes `GET /api/v1/approvals` and `POST /api/v1/approvals/{id}`;
//! the NATS front's subscriber to `caf.exec.approval.v1` decides with the
//! same hook.

use super::{Engine, Lookup, Shared, StepHandle, stats_so_far};
use crate::cancel::CancelReason;
use crate::contract::{ErrorCode, ExecResult, JobType, Outcome};
use serde::Serialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Instant;

/// Approve or reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `"approve"`.
    Approve,
    /// `"reject"` (an answer, not an error: the step still succeeds).
    Reject,
}

/// One decision, as the ingress or a NATS message carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Approve or reject.
    pub verdict: Verdict,
    /// Who decides; must be among the step's approvers unless that list is empty.
    pub by: String,
    /// Free text, echoed in the result.
    pub comment: Option<String>,
}

/// Why a decision was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecideError {
    /// `by` is not among the approvers (HTTP 403); the approval stays pending.
    NotApprover,
    /// No such pending or finished approval (HTTP 404).
    Unknown,
    /// It already has a result: decided, timed out or cancelled (HTTP 409).
    AlreadyDecided,
}

/// How an approval ended, for `worker_approval_decisions_total{decision}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalOutcome {
    /// Approved by a decision.
    Approved,
    /// Rejected by a decision.
    Rejected,
    /// Nobody decided in time.
    Timeout,
}

impl ApprovalOutcome {
    /// Every outcome, in label order.
    pub const ALL: [ApprovalOutcome; 3] = [
        ApprovalOutcome::Approved,
        ApprovalOutcome::Rejected,
        ApprovalOutcome::Timeout,
    ];

    /// The `decision` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalOutcome::Approved => "approved",
            ApprovalOutcome::Rejected => "rejected",
            ApprovalOutcome::Timeout => "timeout",
        }
    }
}

/// What a parked approval keeps besides its assignment (its approvers are
/// read from the payload when needed, not copied).
#[derive(Debug)]
pub(crate) struct ApprovalMeta {
    pub requested_at_ms: u64,
    pub expires_at_ms: u64,
    pub expires_at: Instant,
}

/// A pending approval, as listed to approvers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PendingApproval {
    /// The step's assignment id (the id to decide on); `id` on the wire (§14.2).
    #[serde(rename = "id")]
    pub assignment_id: String,
    /// Its tenant; `tenant` on the wire (§14.2).
    #[serde(rename = "tenant")]
    pub tenant_id: String,
    /// `payload.title`.
    pub title: String,
    /// `payload.description`, if any.
    pub description: Option<String>,
    /// `payload.data` (any JSON), `null` if absent.
    pub data: Value,
    /// Who may decide; empty = anyone.
    pub approvers: Vec<String>,
    /// Acceptance, epoch ms.
    pub requested_at: u64,
    /// When it times out, epoch ms.
    pub expires_at: u64,
}

impl PendingApproval {
    fn of(h: &StepHandle, meta: &ApprovalMeta) -> PendingApproval {
        let p = &h.assignment.payload;
        let text = |k: &str| p.get(k).and_then(Value::as_str).map(str::to_owned);
        PendingApproval {
            assignment_id: h.assignment.assignment_id.clone(),
            tenant_id: h.assignment.tenant_id.clone(),
            title: text("title").unwrap_or_default(),
            description: text("description"),
            data: p.get("data").cloned().unwrap_or(Value::Null),
            approvers: approvers(p).map(str::to_owned).collect(),
            requested_at: meta.requested_at_ms,
            expires_at: meta.expires_at_ms,
        }
    }
}

/// The approver names of a (validated) approval payload.
fn approvers(p: &serde_json::Map<String, Value>) -> impl Iterator<Item = &str> {
    p.get("approvers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

/// Whether `by` may decide `h`: any name when the list is empty.
fn may_decide(h: &StepHandle, by: &str) -> bool {
    let p = &h.assignment.payload;
    approvers(p).next().is_none() || approvers(p).any(|n| n == by)
}

impl Engine {
    /// Lets `human.approval` steps park. Only a front with a decision
    /// channel (`serve`) calls this; without it (`run`) such a step is
    /// answered `INVALID_INPUT`.
    pub fn enable_approvals(&self) {
        self.shared
            .approvals_enabled
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Applies a decision to the pending approval `id` and returns its
    /// result. The hook for every decision channel (ingress, NATS).
    pub fn decide_approval(
        &self,
        id: &str,
        decision: &Decision,
    ) -> Result<Arc<ExecResult>, DecideError> {
        let shared = &self.shared;
        let Some(h) = shared.tracker.pending(id).filter(|h| h.approval.is_some()) else {
            return Err(shared.not_pending(id));
        };
        let check = || {
            if may_decide(&h, &decision.by) {
                Ok(())
            } else {
                Err(DecideError::NotApprover)
            }
        };
        if !shared.parking.claim_approval(&h, check)? {
            // Claimed meanwhile by another decision, its timeout or a cancel.
            return Err(DecideError::AlreadyDecided);
        }
        let outcome = match decision.verdict {
            Verdict::Approve => ApprovalOutcome::Approved,
            Verdict::Reject => ApprovalOutcome::Rejected,
        };
        let outputs = json!({
            "decision": outcome.as_str(),
            "by": decision.by,
            "comment": decision.comment,
            "decided_at": crate::time::now_ms(),
        });
        match shared.finish(&h, Outcome::Success(outputs), stats_so_far(&h)) {
            Some(result) => {
                shared.observer.approval_decided(outcome);
                Ok(result)
            }
            None => Err(shared.not_pending(id)),
        }
    }

    /// Pending approvals of `tenant`, oldest first, at most `limit`.
    pub fn pending_approvals(&self, tenant: &str, limit: usize) -> Vec<PendingApproval> {
        self.shared
            .parking
            .approvals(|h| h.assignment.tenant_id == tenant, limit)
            .iter()
            .filter_map(|h| h.approval.as_deref().map(|m| PendingApproval::of(h, m)))
            .collect()
    }

    /// Approvals waiting for a decision now.
    pub fn approvals_pending(&self) -> usize {
        self.shared.parking.approvals_pending()
    }
}

impl Shared {
    /// The error for a decision on an id that is not a pending approval.
    fn not_pending(&self, id: &str) -> DecideError {
        match self.tracker.lookup(id) {
            Lookup::Done(r) if r.job.job_type == JobType::HumanApproval.as_str() => {
                DecideError::AlreadyDecided
            }
            _ => DecideError::Unknown,
        }
    }

    /// An approval nobody decided in time (the timer thread claimed it).
    pub(super) fn approval_expired(&self, h: &StepHandle) {
        let waited = h
            .deadline
            .min(h.approval.as_deref().map_or(h.deadline, |m| m.expires_at));
        let outcome = Outcome::Failure {
            code: ErrorCode::CancelledByTimeout,
            message: format!(
                "no decision within {} ms",
                waited.saturating_duration_since(h.accepted_at).as_millis()
            ),
            retryable: true,
            outputs: None,
        };
        if self.finish(h, outcome, stats_so_far(h)).is_some() {
            self.observer.approval_decided(ApprovalOutcome::Timeout);
        }
    }

    /// Ends every pending approval `cancelled` (shutdown); returns how many.
    pub(super) fn cancel_approvals(&self) -> usize {
        let mut n = 0;
        for h in self.parking.take_approvals() {
            h.cancel.cancel(CancelReason::Shutdown);
            if self.finish_cancelled(&h) {
                n += 1;
            }
        }
        n
    }
}
