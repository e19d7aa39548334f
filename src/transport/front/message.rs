//! The front's message bodies (SPEC §13.4): assignment intake with header
//! fallbacks, the heartbeat and the DLQ record. Pure functions.

use crate::config::NatsMode;
use crate::contract::{
    Assignment, Checked, IntakeRules, Rejection, parse_assignment, validate_assignment,
};
use crate::engine::Engine;
use crate::transport::nats::{Headers, Message};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// Parses an assignment as the HTTP ingress does. `tenant_id` and `trace_id`
/// headers fill in what the body lacks (the body wins where both are present).
pub fn parse_with_headers(
    payload: &[u8],
    headers: Option<&Headers>,
    rules: &IntakeRules,
) -> Result<Assignment, Rejection> {
    let tenant = headers.and_then(|h| h.get("tenant_id"));
    let trace = headers.and_then(|h| h.get("trace_id"));
    if (tenant.is_none() && trace.is_none()) || payload.len() > rules.max_body_bytes {
        return parse_assignment(payload, rules);
    }
    // Duplicate keys are refused here too (a plain parse keeps the last of
    // two `tenant_id`s, where another reader may keep the first): any body
    // this parse does not take goes to `parse_assignment`, which names the
    // problem exactly as the ingress does.
    let Ok(Checked {
        value: Value::Object(mut obj),
        duplicate: None,
    }) = serde_json::from_slice::<Checked>(payload)
    else {
        return parse_assignment(payload, rules);
    };
    if let Some(t) = tenant {
        obj.entry("tenant_id").or_insert_with(|| t.into());
    }
    if let Some(t) = trace {
        let in_corr = obj
            .get("correlation")
            .and_then(|c| c.get("trace_id"))
            .is_some_and(|v| !v.is_null());
        if !in_corr {
            obj.entry("trace_id").or_insert_with(|| t.into());
        }
    }
    validate_assignment(Value::Object(obj), rules)
}

/// The heartbeat body (SPEC §13.4).
pub fn heartbeat(engine: &Engine, mode: NatsMode, status: &str, uptime: Duration) -> Value {
    let pools: serde_json::Map<String, Value> = engine
        .pool_stats()
        .iter()
        .map(|p| {
            (
                p.kind.as_str().to_owned(),
                json!({"threads": p.threads, "active": p.active, "queued": p.queued,
                       "capacity": p.capacity}),
            )
        })
        .collect();
    json!({
        "version": "1",
        "worker_id": engine.worker_id(),
        "timestamp": crate::time::now_ms(),
        "status": status,
        "mode": mode.as_str(),
        "pools": pools,
        "in_flight": engine.pending_count(),
        "uptime_s": uptime.as_secs(),
        "build": env!("CARGO_PKG_VERSION"),
    })
}

/// The DLQ record of an invalid message: its digest and size, never its payload.
pub fn dlq_record(msg: &Message, r: &Rejection, worker_id: &str) -> Value {
    let header = |name: &str| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(str::to_owned)
    };
    let mut v = json!({
        "version": "1",
        "original_subject": msg.subject,
        "reason": r.reason.as_str(),
        "message": r.message,
        "payload_sha256": hex(&Sha256::digest(&msg.payload)),
        "payload_bytes": msg.payload.len(),
        "worker_id": worker_id,
        "timestamp": crate::time::now_ms(),
    });
    if let Some(t) = r.ids.tenant_id.clone().or_else(|| header("tenant_id")) {
        v["tenant_id"] = t.into();
    }
    if let Some(t) = r.ids.trace_id.clone().or_else(|| header("trace_id")) {
        v["trace_id"] = t.into();
    }
    v
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::RejectReason;

    fn rules() -> IntakeRules {
        IntakeRules {
            max_body_bytes: 4096,
            strict_ids: true,
            default_deadline_ms: 30_000,
        }
    }

    #[test]
    fn headers_fill_gaps_and_the_body_wins() {
        let mut h = Headers::new();
        h.insert("tenant_id", "from-header");
        h.insert("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736");
        let body = br#"{"version":"1","assignment_id":"a1","request_id":"r1","job":{"type":"debug.echo","payload":{}}}"#;
        let a = parse_with_headers(body, Some(&h), &rules()).unwrap();
        assert_eq!(a.tenant_id, "from-header");
        assert_eq!(
            a.correlation().trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let body = br#"{"version":"1","assignment_id":"a1","request_id":"r1","tenant_id":"body","job":{"type":"debug.echo","payload":{}}}"#;
        let a = parse_with_headers(body, Some(&h), &rules()).unwrap();
        assert_eq!(a.tenant_id, "body");
        let r = parse_with_headers(b"{nope", Some(&h), &rules()).unwrap_err();
        assert_eq!(r.reason, RejectReason::InvalidJson);
    }

    #[test]
    fn with_headers_a_duplicate_key_is_refused_as_at_the_ingress() {
        let mut h = Headers::new();
        h.insert("tenant_id", "from-header");
        for body in [
            br#"{"version":"1","assignment_id":"a1","request_id":"r1","tenant_id":"t1","tenant_id":"t2","job":{"type":"debug.echo"}}"#.as_slice(),
            br#"{"version":"1","assignment_id":"a1","request_id":"r1","job":{"type":"debug.echo","payload":{"k":1,"k":2}}}"#,
        ] {
            let with = parse_with_headers(body, Some(&h), &rules()).unwrap_err();
            let without = parse_assignment(body, &rules()).unwrap_err();
            assert_eq!(with.reason, without.reason);
            assert_eq!(with.message, without.message);
            assert!(with.message.contains("duplicate"), "{}", with.message);
        }
    }

    #[test]
    fn dlq_record_has_digest_and_size_not_the_payload() {
        let msg = Message {
            subject: "caf.exec.assign.v1".into(),
            reply: None,
            headers: None,
            payload: b"secret-payload".to_vec(),
        };
        let r = Rejection::new(RejectReason::InvalidJson, "bad");
        let v = dlq_record(&msg, &r, "w1");
        assert_eq!(v["payload_bytes"], 14);
        assert_eq!(v["reason"], "invalid_json");
        assert_eq!(v["payload_sha256"].as_str().unwrap().len(), 64);
        assert!(!v.to_string().contains("secret-payload"));
    }
}
