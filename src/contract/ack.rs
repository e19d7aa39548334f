//! ExecAssignmentAck (SPEC §3.2).

use super::assignment::{Assignment, RejectReason, Rejection};
use serde::Serialize;

/// `accepted` or `rejected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AckStatus {
    /// The worker owns the assignment and will produce exactly one result.
    Accepted,
    /// The worker will produce no result.
    Rejected,
}

/// The worker's answer to a submission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ack {
    /// Always `"1"`.
    pub version: &'static str,
    /// Echoed when it could be read.
    pub assignment_id: Option<String>,
    /// Echoed when it could be read.
    pub request_id: Option<String>,
    /// Echoed when it could be read.
    pub tenant_id: Option<String>,
    /// Accepted or rejected.
    pub status: AckStatus,
    /// Rejection reason, or `duplicate` for a re-sent accepted assignment.
    pub reason: Option<&'static str>,
    /// One human sentence for rejections and duplicates.
    pub message: Option<String>,
    /// Echoed when present.
    pub trace_id: Option<String>,
    /// Epoch milliseconds.
    pub acknowledged_at: u64,
    /// This worker.
    pub worker_id: String,
}

impl Ack {
    /// Ack for a freshly accepted assignment.
    pub fn accepted(a: &Assignment, worker_id: &str) -> Ack {
        Ack {
            version: "1",
            assignment_id: Some(a.assignment_id.clone()),
            request_id: Some(a.request_id.clone()),
            tenant_id: Some(a.tenant_id.clone()),
            status: AckStatus::Accepted,
            reason: None,
            message: None,
            trace_id: a.correlation().trace_id.clone(),
            acknowledged_at: crate::time::now_ms(),
            worker_id: worker_id.to_owned(),
        }
    }

    /// Ack for a re-sent assignment that is queued, running or retained.
    pub fn duplicate(a: &Assignment, worker_id: &str) -> Ack {
        Ack {
            reason: Some("duplicate"),
            message: Some(format!(
                "assignment {} is already known; it is not executed again",
                a.assignment_id
            )),
            ..Ack::accepted(a, worker_id)
        }
    }

    /// Ack for an intake rejection.
    pub fn rejected(r: &Rejection, worker_id: &str) -> Ack {
        Ack {
            version: "1",
            assignment_id: r.ids.assignment_id.clone(),
            request_id: r.ids.request_id.clone(),
            tenant_id: r.ids.tenant_id.clone(),
            status: AckStatus::Rejected,
            reason: Some(r.reason.as_str()),
            message: Some(r.message.clone()),
            trace_id: r.ids.trace_id.clone(),
            acknowledged_at: crate::time::now_ms(),
            worker_id: worker_id.to_owned(),
        }
    }

    /// Ack rejecting a valid assignment for load or shutdown.
    pub fn refused(a: &Assignment, reason: RejectReason, message: &str, worker_id: &str) -> Ack {
        Ack {
            status: AckStatus::Rejected,
            reason: Some(reason.as_str()),
            message: Some(message.to_owned()),
            ..Ack::accepted(a, worker_id)
        }
    }
}
