//! The assignment API (SPEC §8.1) on `WORKER_INGRESS_ADDR`. Who may do what
//! is decided in [`super::auth`] alone.

use super::auth::{Auth, Principal};
use super::{
    Handler, Reply, error_body, header, json, json_text, method_not_allowed, not_found, respond,
};
use crate::contract::{Ack, IntakeRules, JobType, RejectReason, Rejection, parse_assignment};
use crate::engine::{Admission, Backpressure, CancelOutcome, Engine, Lookup};
use serde_json::json;
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tiny_http::Request;

/// Longest `wait_ms` honoured.
pub const MAX_WAIT_MS: u64 = 60_000;
/// `wait_ms` of `POST /api/v1/execute` when the query gives none.
pub const DEFAULT_EXECUTE_WAIT_MS: u64 = 30_000;
/// Largest submission body answered on the ingress poller thread (about
/// 50 µs of parsing); larger ones go to the handler threads, so one big body
/// cannot hold up every other connection's answer.
pub const INLINE_BODY_BYTES: usize = 16 * 1024;

/// The ingress handler.
pub struct Ingress {
    engine: Engine,
    rules: IntakeRules,
    auth: Auth,
    waiters: AtomicUsize,
    max_waiters: usize,
}

impl Ingress {
    /// An ingress for `engine`. `threads` handler threads serve it; at most
    /// all but two of them may long-poll at once, so submissions and lookups
    /// always have a thread. `auth` decides who may call it (see [`Auth`]).
    pub fn new(engine: Engine, rules: IntakeRules, auth: Auth, threads: usize) -> Ingress {
        Ingress {
            engine,
            rules,
            auth,
            waiters: AtomicUsize::new(0),
            max_waiters: threads.saturating_sub(2).max(1),
        }
    }

    /// Caps the long-polls that wait at once at `n` (`WORKER_MAX_LONG_POLLS`),
    /// never above all-but-two handler threads.
    pub fn with_max_long_polls(mut self, n: usize) -> Ingress {
        self.max_waiters = self.max_waiters.min(n);
        self
    }

    fn route(&self, request: &mut Request) -> Reply {
        let url = request.url().to_owned();
        let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        let method = request.method().clone();
        let known = match segments.as_slice() {
            ["", "api", "v1", "assignments"] => Some("POST"),
            ["", "api", "v1", "execute"] => Some("POST"),
            ["", "api", "v1", "results", id] if !id.is_empty() => Some("GET, HEAD"),
            ["", "api", "v1", "assignments", id, "cancel"] if !id.is_empty() => Some("POST"),
            ["", "api", "v1", "approvals"] => Some("GET, HEAD"),
            ["", "api", "v1", "approvals", id] if !id.is_empty() => Some("POST"),
            _ => None,
        };
        let Some(allow) = known else {
            return not_found(path);
        };
        if !allow.split(", ").any(|m| m == method.as_str()) {
            return method_not_allowed(allow);
        }
        let authorization = request
            .headers()
            .iter()
            .find(|h| h.field.equiv("Authorization"))
            .map(|h| h.value.as_str());
        let Some(who) = self.auth.authenticate(authorization) else {
            self.engine.note_rejection(RejectReason::Unauthorized);
            let r = Rejection::new(RejectReason::Unauthorized, "missing or wrong bearer token");
            return ack_reply(401, &Ack::rejected(&r, self.engine.worker_id()));
        };
        match segments.as_slice() {
            ["", "api", "v1", "assignments"] => self.submit(&who, request, None),
            ["", "api", "v1", "execute"] => match wait_ms(query) {
                Ok(wait) => {
                    self.submit(&who, request, Some(wait.unwrap_or(DEFAULT_EXECUTE_WAIT_MS)))
                }
                Err(reply) => reply,
            },
            ["", "api", "v1", "results", id] => match wait_ms(query) {
                Ok(wait) => self.result(&who, &percent_decode(id), wait.unwrap_or(0)),
                Err(reply) => reply,
            },
            ["", "api", "v1", "assignments", id, "cancel"] => {
                self.cancel(&who, &percent_decode(id))
            }
            ["", "api", "v1", "approvals"] => super::approvals::list(&self.engine, &who, query),
            ["", "api", "v1", "approvals", id] => self.decide(&who, request, &percent_decode(id)),
            _ => not_found(path),
        }
    }

    /// True if `who` may see assignment `id`: it is known and belongs to a
    /// tenant `who` is authorized for. Anything else is answered as unknown.
    fn visible(&self, who: &Principal, id: &str) -> bool {
        self.engine.tenant_of(id).is_some_and(|t| who.authorize(&t))
    }

    /// A decision on approval `id`: another tenant's approval is unknown (404).
    fn decide(&self, who: &Principal, request: &mut Request, id: &str) -> Reply {
        if !self.visible(who, id) {
            return super::approvals::unknown(id);
        }
        match read_body(request, self.rules.max_body_bytes) {
            Ok(body) => super::approvals::decide(&self.engine, id, &body),
            Err(BodyError::TooLarge(n)) => json(
                413,
                &error_body(
                    "payload_too_large",
                    &format!("the body is {n} bytes, more than WORKER_MAX_BODY_BYTES"),
                ),
            ),
            Err(BodyError::Io(e)) => json(
                408,
                &error_body("request_timeout", &format!("could not read the body: {e}")),
            ),
        }
    }

    fn submit(&self, who: &Principal, request: &mut Request, wait: Option<u64>) -> Reply {
        let worker = self.engine.worker_id();
        let body = match read_body(request, self.rules.max_body_bytes) {
            Ok(b) => b,
            Err(BodyError::TooLarge(n)) => {
                self.engine.note_rejection(RejectReason::PayloadTooLarge);
                let r = Rejection::new(
                    RejectReason::PayloadTooLarge,
                    format!(
                        "the body is {n} bytes, more than WORKER_MAX_BODY_BYTES ({})",
                        self.rules.max_body_bytes
                    ),
                );
                return ack_reply(413, &Ack::rejected(&r, worker));
            }
            Err(BodyError::Io(e)) => {
                return json(
                    408,
                    &error_body("request_timeout", &format!("could not read the body: {e}")),
                );
            }
        };
        let assignment = match parse_assignment(&body, &self.rules) {
            Ok(a) => a,
            Err(r) => {
                self.engine.note_rejection(r.reason);
                return ack_reply(r.reason.http_status(), &Ack::rejected(&r, worker));
            }
        };
        if !who.authorize(&assignment.tenant_id) {
            self.engine.note_rejection(RejectReason::Unauthorized);
            let ack = Ack::refused(
                &assignment,
                RejectReason::Unauthorized,
                "this token may not submit assignments for this tenant_id",
                worker,
            );
            return ack_reply(403, &ack);
        }
        let (id, status, ack) = match self.engine.submit(assignment, Backpressure::Reject) {
            Admission::Accepted(h) => (
                h.assignment.assignment_id.clone(),
                202,
                Ack::accepted(&h.assignment, worker),
            ),
            Admission::Duplicate(a) => (a.assignment_id.clone(), 200, Ack::duplicate(&a, worker)),
            Admission::Rejected(a, reason) => {
                let msg = match reason {
                    RejectReason::QueueFull if a.job_type == JobType::HumanApproval => {
                        "WORKER_MAX_PENDING_APPROVALS approvals are already waiting; retry later"
                            .to_owned()
                    }
                    RejectReason::QueueFull => format!(
                        "the {} pool's queue is full (WORKER_MAX_QUEUE_SIZE); retry later",
                        a.pool.as_str()
                    ),
                    _ => "the worker is shutting down; submit to another worker".to_owned(),
                };
                let reply = ack_reply(
                    reason.http_status(),
                    &Ack::refused(&a, reason, &msg, worker),
                );
                return if reason == RejectReason::QueueFull {
                    reply.with_header(header("Retry-After", "1"))
                } else {
                    reply
                };
            }
        };
        match wait {
            None => ack_reply(status, &ack),
            Some(ms) => self.result(who, &id, ms),
        }
    }

    fn result(&self, who: &Principal, id: &str, wait_ms: u64) -> Reply {
        if !self.visible(who, id) {
            return unknown(id);
        }
        // `waited`: None when no wait was asked for, else whether it happened.
        let (lookup, waited) = if wait_ms == 0 {
            (self.engine.lookup(id), None)
        } else if self.waiters.fetch_add(1, Ordering::AcqRel) < self.max_waiters {
            let l = self
                .engine
                .wait_result(id, Duration::from_millis(wait_ms.min(MAX_WAIT_MS)));
            self.waiters.fetch_sub(1, Ordering::AcqRel);
            (l, Some(true))
        } else {
            // Every long-poll slot is taken: answer now rather than starve the port.
            self.waiters.fetch_sub(1, Ordering::AcqRel);
            (self.engine.lookup(id), Some(false))
        };
        match lookup {
            // Checked again: the id may have aged out and been reused meanwhile.
            Lookup::Done(r) if who.authorize(&r.tenant_id) => json_text(200, r.to_json_line()),
            Lookup::Pending => match waited {
                None => json(202, &json!({"status": "pending", "assignment_id": id})),
                Some(true) => json(
                    202,
                    &json!({"status": "pending", "assignment_id": id, "waited": true}),
                ),
                // Tell the client the wait did not happen and when to come back.
                Some(false) => json(
                    202,
                    &json!({"status": "pending", "assignment_id": id, "waited": false}),
                )
                .with_header(header("Retry-After", "1")),
            },
            Lookup::Done(_) | Lookup::Unknown => unknown(id),
        }
    }

    fn cancel(&self, who: &Principal, id: &str) -> Reply {
        if !self.visible(who, id) {
            return unknown(id);
        }
        match self.engine.cancel(id) {
            CancelOutcome::Requested => json(
                202,
                &json!({"status": "cancellation_requested", "assignment_id": id}),
            ),
            CancelOutcome::AlreadyFinished => json(
                409,
                &error_body(
                    "already_finished",
                    &format!("assignment {id:?} already has a result"),
                ),
            ),
            CancelOutcome::Unknown => unknown(id),
        }
    }
}

/// `404` for an id that is unknown, or not the caller's to see.
fn unknown(id: &str) -> Reply {
    json(
        404,
        &error_body("not_found", &format!("no assignment {id:?} is known")),
    )
}

impl Handler for Ingress {
    fn handle(&self, mut request: Request) {
        // HEAD is routed like GET; tiny_http leaves the body out.
        let reply = self.route(&mut request);
        respond(request, reply);
    }

    /// Plain submissions with a small body: admission never waits
    /// ([`Backpressure::Reject`]), and parsing is bounded by the body, so a
    /// `queue_full` answer costs no thread hand-over.
    fn answers_inline(&self, request: &Request) -> bool {
        *request.method() == tiny_http::Method::Post
            && request.url().trim_end_matches('/') == "/api/v1/assignments"
            && request
                .body_length()
                .is_some_and(|n| n <= INLINE_BODY_BYTES)
    }
}

fn ack_reply(status: u16, ack: &Ack) -> Reply {
    json_text(status, serde_json::to_string(ack).unwrap_or_default())
}

enum BodyError {
    TooLarge(usize),
    Io(std::io::Error),
}

/// Reads at most `max` bytes; the declared length is checked before reading.
fn read_body(request: &mut Request, max: usize) -> Result<Vec<u8>, BodyError> {
    if let Some(n) = request.body_length().filter(|n| *n > max) {
        return Err(BodyError::TooLarge(n));
    }
    let mut body = Vec::with_capacity(request.body_length().unwrap_or(1024).min(max));
    request
        .as_reader()
        .take(max as u64 + 1)
        .read_to_end(&mut body)
        .map_err(BodyError::Io)?;
    if body.len() > max {
        return Err(BodyError::TooLarge(body.len()));
    }
    Ok(body)
}

/// `wait_ms` from the query: absent → `None`; not a non-negative integer → 400.
/// Values above [`MAX_WAIT_MS`] are capped.
fn wait_ms(query: &str) -> Result<Option<u64>, Reply> {
    let Some(raw) = query
        .split('&')
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .find(|(k, _)| *k == "wait_ms")
        .map(|(_, v)| v)
    else {
        return Ok(None);
    };
    match raw.parse::<u64>() {
        Ok(v) => Ok(Some(v.min(MAX_WAIT_MS))),
        Err(_) => {
            let shown: String = raw.chars().take(32).collect();
            Err(json(
                400,
                &error_body(
                    "invalid_wait_ms",
                    &format!(
                        "wait_ms must be a whole number of milliseconds (0..={MAX_WAIT_MS}), got {shown:?}"
                    ),
                ),
            ))
        }
    }
}

/// The percent-decoded value of `key` in a query string.
pub(super) fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(wait_ms("a=1&wait_ms=250").ok(), Some(Some(250)));
        assert_eq!(wait_ms("wait_ms=999999").ok(), Some(Some(MAX_WAIT_MS)));
        assert_eq!(wait_ms("a=1").ok(), Some(None));
        for bad in [
            "wait_ms=x",
            "wait_ms=-1",
            "wait_ms=1.5",
            "wait_ms=",
            "wait_ms",
        ] {
            assert!(wait_ms(bad).is_err(), "{bad}");
        }
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("abc%"), "abc%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%é1"), "%é1");
    }
}
