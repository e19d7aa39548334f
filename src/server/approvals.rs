//! The approval routes of the ingress (SPEC §14.2): list the pending
//! approvals of a tenant, and decide one. The ingress routes them after its
//! one authorization check, like every other route.

use super::{Principal, Reply, error_body, json, json_text};
use crate::blocks::approval::MAX_NAME_BYTES;
use crate::engine::{DecideError, Decision, Engine, Verdict};
use serde_json::{Value, json};

/// Most approvals one listing returns.
pub const MAX_LISTED: usize = 1000;
/// Approvals a listing returns without `limit`.
pub const DEFAULT_LISTED: usize = 100;
/// Longest decision comment, in bytes.
pub const MAX_COMMENT_BYTES: usize = 4096;

/// `GET /api/v1/approvals?tenant_id=…[&limit=N]` (oldest first; `limit`
/// 1..=1000, default 100).
/// A tenant token lists only its own tenant's approvals (another tenant's
/// answer 404, as its assignments do).
pub(super) fn list(engine: &Engine, who: &Principal, query: &str) -> Reply {
    let Some(tenant) = super::ingress::query_param(query, "tenant_id").filter(|t| !t.is_empty())
    else {
        return json(
            400,
            &error_body(
                "invalid_request",
                "the query parameter tenant_id is required",
            ),
        );
    };
    if !who.authorize(&tenant) {
        return json(
            404,
            &error_body("not_found", "no approvals of that tenant are visible"),
        );
    }
    let limit = super::ingress::query_param(query, "limit")
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(DEFAULT_LISTED, |n| n.clamp(1, MAX_LISTED));
    let pending = engine.pending_approvals(&tenant, limit);
    json(200, &json!({"approvals": pending, "count": pending.len()}))
}

/// 404 for an approval that is unknown (or another tenant's).
pub(super) fn unknown(id: &str) -> Reply {
    json(
        404,
        &error_body("not_found", &format!("no approval {id:?} is known")),
    )
}

/// `POST /api/v1/approvals/{assignment_id}` with
/// `{"decision":"approve"|"reject","by":"name","comment":"…"}`.
pub(super) fn decide(engine: &Engine, id: &str, body: &[u8]) -> Reply {
    let decision = match parse_decision(body) {
        Ok(d) => d,
        Err(message) => return json(400, &error_body("invalid_request", &message)),
    };
    match engine.decide_approval(id, &decision) {
        Ok(result) => json_text(200, result.to_json_line()),
        Err(DecideError::NotApprover) => json(
            403,
            &error_body(
                "forbidden",
                &format!("{:?} is not among the approvers of {id:?}", decision.by),
            ),
        ),
        Err(DecideError::Unknown) => unknown(id),
        Err(DecideError::AlreadyDecided) => json(
            409,
            &error_body(
                "already_decided",
                &format!("approval {id:?} already has a result"),
            ),
        ),
    }
}

/// Reads a decision body; the error is a sentence naming the field.
pub fn parse_decision(body: &[u8]) -> Result<Decision, String> {
    // Duplicate keys are refused, as at intake: `"decision"` given twice must
    // not mean whatever the last one says.
    let v: Value = crate::contract::from_slice_unique(body)
        .map_err(|e| format!("the body is not JSON: {e}"))?;
    decision_from_value(&v)
}

/// Reads a decision from an already parsed body (the NATS front parses it
/// once for its `assignment_id` too); other keys are ignored.
pub fn decision_from_value(v: &Value) -> Result<Decision, String> {
    let verdict = match v.get("decision").and_then(Value::as_str) {
        Some("approve") => Verdict::Approve,
        Some("reject") => Verdict::Reject,
        _ => return Err(r#"decision must be "approve" or "reject""#.into()),
    };
    let by = match v.get("by").and_then(Value::as_str) {
        Some(b) if !b.is_empty() && b.len() <= MAX_NAME_BYTES => b.to_owned(),
        _ => return Err(format!("by must be a name of 1..={MAX_NAME_BYTES} bytes")),
    };
    let comment = match v.get("comment") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) if c.len() <= MAX_COMMENT_BYTES => Some(c.clone()),
        Some(_) => {
            return Err(format!(
                "comment must be a string of at most {MAX_COMMENT_BYTES} bytes"
            ));
        }
    };
    Ok(Decision {
        verdict,
        by,
        comment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_bodies() {
        let d = parse_decision(br#"{"decision":"reject","by":"ann","comment":"no"}"#).unwrap();
        assert_eq!(d.verdict, Verdict::Reject);
        assert_eq!(d.comment.as_deref(), Some("no"));
        assert!(parse_decision(br#"{"decision":"maybe","by":"ann"}"#).is_err());
        assert!(parse_decision(br#"{"decision":"approve"}"#).is_err());
        assert!(parse_decision(br#"{"decision":"approve","by":"a","comment":1}"#).is_err());
        assert!(parse_decision(b"nope").is_err());
        let twice = br#"{"decision":"reject","by":"ann","decision":"approve"}"#;
        let e = parse_decision(twice).unwrap_err();
        assert!(e.contains("duplicate"), "{e}");
    }
}
