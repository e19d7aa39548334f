//! ExecAssignment intake: parse the router's JSON and apply the envelope rules
//! of SPEC §3.1. The output is a validated [`Assignment`]; every violation is a
//! [`Rejection`] carrying the Ack reason and a sentence naming the field.

use super::ids;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::fmt;

/// The block families this worker runs (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobType {
    /// `http.request`
    HttpRequest,
    /// `fs.blob_put`
    FsBlobPut,
    /// `fs.blob_get`
    FsBlobGet,
    /// `fs.blob_delete`
    FsBlobDelete,
    /// `sql.query`
    SqlQuery,
    /// `debug.echo`
    DebugEcho,
    /// `debug.sleep`
    DebugSleep,
    /// `debug.fail`
    DebugFail,
    /// `human.approval` (parks until a decision; SPEC §14.2)
    HumanApproval,
}

impl JobType {
    /// Every supported job type.
    pub const ALL: &'static [JobType] = &[
        JobType::HttpRequest,
        JobType::FsBlobPut,
        JobType::FsBlobGet,
        JobType::FsBlobDelete,
        JobType::SqlQuery,
        JobType::DebugEcho,
        JobType::DebugSleep,
        JobType::DebugFail,
        JobType::HumanApproval,
    ];

    /// The wire spelling, also the `step_type` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::HttpRequest => "http.request",
            JobType::FsBlobPut => "fs.blob_put",
            JobType::FsBlobGet => "fs.blob_get",
            JobType::FsBlobDelete => "fs.blob_delete",
            JobType::SqlQuery => "sql.query",
            JobType::DebugEcho => "debug.echo",
            JobType::DebugSleep => "debug.sleep",
            JobType::DebugFail => "debug.fail",
            JobType::HumanApproval => "human.approval",
        }
    }

    /// Looks a wire spelling up.
    pub fn parse(s: &str) -> Option<JobType> {
        JobType::ALL.iter().copied().find(|t| t.as_str() == s)
    }

    /// The pool a block runs on unless `job.resources.class` says otherwise.
    pub fn default_pool(self) -> PoolKind {
        match self {
            // An approval occupies no pool while it waits; `cpu` only runs
            // the quick refusals (bad payload, or no approval channel in `run`).
            JobType::DebugEcho
            | JobType::DebugSleep
            | JobType::DebugFail
            | JobType::HumanApproval => PoolKind::Cpu,
            _ => PoolKind::Io,
        }
    }
}

impl fmt::Display for JobType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The three resource pools (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolKind {
    /// CPU-bound and debug steps.
    Cpu,
    /// HTTP and file-system steps.
    Io,
    /// Steps that need the (single) accelerator slot.
    Gpu,
}

impl PoolKind {
    /// All pools in index order.
    pub const ALL: [PoolKind; 3] = [PoolKind::Cpu, PoolKind::Io, PoolKind::Gpu];

    /// The wire and `resource_pool` label spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Cpu => "cpu",
            PoolKind::Io => "io",
            PoolKind::Gpu => "gpu",
        }
    }

    /// Position in [`PoolKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    fn parse(s: &str) -> Option<PoolKind> {
        PoolKind::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
    }
}

/// Trace and workflow identifiers echoed into results and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Correlation {
    /// W3C trace id or UUID.
    pub trace_id: Option<String>,
    /// Workflow run.
    pub run_id: Option<String>,
    /// Flow inside the run.
    pub flow_id: Option<String>,
    /// Step inside the flow.
    pub step_id: Option<String>,
}

/// Per-assignment retry overrides (`options.retry`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOptions {
    /// Attempts including the first, 1..=10.
    pub max_attempts: Option<u32>,
    /// CP2 backoff base in ms.
    pub backoff_ms: Option<u64>,
    /// CP2 backoff cap in ms.
    pub max_backoff_ms: Option<u64>,
}

/// A validated ExecAssignment.
#[derive(Debug, Clone)]
pub struct Assignment {
    /// Unique id of this assignment; the de-duplication key.
    pub assignment_id: String,
    /// The router's request id.
    pub request_id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// `executor.provider_id`, echoed into the result (`"caf-worker"`,
    /// borrowed, when absent).
    pub provider_id: Cow<'static, str>,
    /// Which block runs.
    pub job_type: JobType,
    /// The block's input (always an object).
    pub payload: Map<String, Value>,
    /// The pool that runs the step.
    pub pool: PoolKind,
    /// `options.deadline_ms`.
    pub deadline_ms: Option<u64>,
    /// `options.attempt_timeout_ms`.
    pub attempt_timeout_ms: Option<u64>,
    /// `options.retry`.
    pub retry: RetryOptions,
    /// Correlation identifiers, when any is given (boxed: most assignments
    /// carry none, and every hand-over between threads moves this struct;
    /// read them with [`Assignment::correlation`]).
    pub correlation: Option<Box<Correlation>>,
}

/// The correlation of an assignment that carries none.
static NO_CORRELATION: Correlation = Correlation {
    trace_id: None,
    run_id: None,
    flow_id: None,
    step_id: None,
};

impl Assignment {
    /// The correlation identifiers (all `None` when none were given).
    pub fn correlation(&self) -> &Correlation {
        self.correlation.as_deref().unwrap_or(&NO_CORRELATION)
    }
}

impl Correlation {
    /// `None` when no identifier is set, else the identifiers boxed (the
    /// form [`Assignment`] holds them in).
    pub fn boxed(self) -> Option<Box<Correlation>> {
        (self != NO_CORRELATION).then(|| Box::new(self))
    }
}

/// Why an assignment was rejected at intake (the Ack `reason`, SPEC §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not a JSON object.
    InvalidJson,
    /// Envelope field missing or out of range.
    InvalidAssignment,
    /// `version` is not `"1"`.
    UnsupportedVersion,
    /// `job.type` names no block.
    UnsupportedJobType,
    /// `job.payload_ref` was given.
    UnsupportedPayloadRef,
    /// Correlation ids malformed or incomplete.
    InvalidCorrelation,
    /// The pool's queue is full (CP2 queue management).
    QueueFull,
    /// The worker is draining.
    ShuttingDown,
    /// The body exceeds `WORKER_MAX_BODY_BYTES`.
    PayloadTooLarge,
    /// Missing or wrong bearer token.
    Unauthorized,
}

impl RejectReason {
    /// Every reason.
    pub const ALL: &'static [RejectReason] = &[
        RejectReason::InvalidJson,
        RejectReason::InvalidAssignment,
        RejectReason::UnsupportedVersion,
        RejectReason::UnsupportedJobType,
        RejectReason::UnsupportedPayloadRef,
        RejectReason::InvalidCorrelation,
        RejectReason::QueueFull,
        RejectReason::ShuttingDown,
        RejectReason::PayloadTooLarge,
        RejectReason::Unauthorized,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::InvalidAssignment => "invalid_assignment",
            RejectReason::UnsupportedVersion => "unsupported_version",
            RejectReason::UnsupportedJobType => "unsupported_job_type",
            RejectReason::UnsupportedPayloadRef => "unsupported_payload_ref",
            RejectReason::InvalidCorrelation => "invalid_correlation",
            RejectReason::QueueFull => "queue_full",
            RejectReason::ShuttingDown => "shutting_down",
            RejectReason::PayloadTooLarge => "payload_too_large",
            RejectReason::Unauthorized => "unauthorized",
        }
    }

    /// The HTTP status the ingress answers with (SPEC §8.1).
    pub fn http_status(self) -> u16 {
        match self {
            RejectReason::Unauthorized => 401,
            RejectReason::PayloadTooLarge => 413,
            RejectReason::QueueFull => 429,
            RejectReason::ShuttingDown => 503,
            _ => 400,
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The ids of an assignment as far as they could be read, for the Ack.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvelopeIds {
    /// `assignment_id` if it was a string.
    pub assignment_id: Option<String>,
    /// `request_id` if it was a string.
    pub request_id: Option<String>,
    /// `tenant_id` if it was a string.
    pub tenant_id: Option<String>,
    /// `trace_id` if it was a string.
    pub trace_id: Option<String>,
}

/// An intake rejection: reason, one human sentence, and the ids we could read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Ack reason.
    pub reason: RejectReason,
    /// One sentence naming the field or limit.
    pub message: String,
    /// Ids for the Ack (boxed: rejections travel in `Result`s).
    pub ids: Box<EnvelopeIds>,
}

impl Rejection {
    /// A rejection with no ids known yet.
    pub fn new(reason: RejectReason, message: impl Into<String>) -> Rejection {
        Rejection {
            reason,
            message: message.into(),
            ids: Box::default(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl std::error::Error for Rejection {}

/// Settings intake needs from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct IntakeRules {
    /// `WORKER_MAX_BODY_BYTES`.
    pub max_body_bytes: usize,
    /// `WORKER_STRICT_IDS`.
    pub strict_ids: bool,
    /// `WORKER_DEFAULT_DEADLINE_MS`, the bound of `attempt_timeout_ms` when no deadline is given.
    pub default_deadline_ms: u64,
}

pub(super) const MAX_ID_BYTES: usize = 256;
const MAX_DEADLINE_MS: u64 = 3_600_000;

/// Parses and validates one assignment from raw bytes.
pub fn parse_assignment(bytes: &[u8], rules: &IntakeRules) -> Result<Assignment, Rejection> {
    if bytes.len() > rules.max_body_bytes {
        return Err(Rejection::new(
            RejectReason::PayloadTooLarge,
            format!(
                "the assignment is {} bytes, more than WORKER_MAX_BODY_BYTES ({})",
                bytes.len(),
                rules.max_body_bytes
            ),
        ));
    }
    // A well-formed assignment takes the typed path; anything it does not
    // accept as it is (an invalid field, a duplicate key, an unusual type)
    // is parsed again the general way below, which names the problem.
    if let Some(a) = super::fast_intake::parse(bytes, rules) {
        return Ok(a);
    }
    parse_general(bytes, rules)
}

/// [`parse_assignment`] without its fast path: the JSON tree, then the checks.
pub(super) fn parse_general(bytes: &[u8], rules: &IntakeRules) -> Result<Assignment, Rejection> {
    let value = super::json::from_slice_unique(bytes).map_err(|e| {
        Rejection::new(
            RejectReason::InvalidJson,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    validate_assignment(value, rules)
}

/// Validates an already parsed JSON value as an assignment.
pub fn validate_assignment(value: Value, rules: &IntakeRules) -> Result<Assignment, Rejection> {
    let Value::Object(mut obj) = value else {
        return Err(Rejection::new(
            RejectReason::InvalidJson,
            "the assignment must be a JSON object",
        ));
    };
    check_envelope(&mut obj, rules).map_err(|(reason, message)| Rejection {
        reason,
        message,
        ids: Box::new(envelope_ids(&obj)),
    })
}

/// Reads whatever ids are present, for the Ack of a rejection.
fn envelope_ids(obj: &Map<String, Value>) -> EnvelopeIds {
    let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let corr = obj.get("correlation").and_then(Value::as_object);
    EnvelopeIds {
        assignment_id: s(obj.get("assignment_id")),
        request_id: s(obj.get("request_id")),
        tenant_id: s(obj.get("tenant_id")),
        trace_id: s(corr.and_then(|c| c.get("trace_id")).or(obj.get("trace_id"))),
    }
}

pub(super) type Invalid = (RejectReason, String);

fn invalid(message: impl Into<String>) -> Invalid {
    (RejectReason::InvalidAssignment, message.into())
}

fn check_envelope(
    obj: &mut Map<String, Value>,
    rules: &IntakeRules,
) -> Result<Assignment, Invalid> {
    match obj.get("version") {
        Some(Value::String(v)) if v == "1" => {}
        Some(other) => {
            return Err((
                RejectReason::UnsupportedVersion,
                format!("version must be the string \"1\", got {}", describe(other)),
            ));
        }
        None => {
            return Err((
                RejectReason::UnsupportedVersion,
                "version is missing; it must be the string \"1\"".into(),
            ));
        }
    }
    let assignment_id = id_field(obj, "assignment_id")?;
    let request_id = id_field(obj, "request_id")?;
    let tenant_id = id_field(obj, "tenant_id")?;

    let provider_id = provider_id(obj)?;

    let Some(Value::Object(job)) = obj.get_mut("job") else {
        return Err(invalid("job must be an object with a type"));
    };
    let job_type = match job.get("type") {
        Some(Value::String(t)) => JobType::parse(t).ok_or_else(|| {
            (
                RejectReason::UnsupportedJobType,
                format!(
                    "job.type {} is not supported; supported: {}",
                    describe_str(t),
                    JobType::ALL
                        .iter()
                        .map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?,
        Some(_) => return Err(invalid("job.type must be a string")),
        None => return Err(invalid("job.type is missing")),
    };
    no_payload_ref(job)?;
    let payload = match job.remove("payload") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => return Err(invalid("job.payload must be an object")),
    };
    let pool = pool(job_type, job)?;
    let correlation =
        correlation(obj, rules.strict_ids).map_err(|m| (RejectReason::InvalidCorrelation, m))?;
    let options = options(obj, rules)?;
    Ok(Assignment {
        assignment_id,
        request_id,
        tenant_id,
        provider_id,
        job_type,
        payload,
        pool,
        deadline_ms: options.deadline_ms,
        attempt_timeout_ms: options.attempt_timeout_ms,
        retry: options.retry,
        correlation: correlation.boxed(),
    })
}

/// `executor.provider_id`, or this worker's name when absent.
pub(super) fn provider_id(obj: &Map<String, Value>) -> Result<Cow<'static, str>, Invalid> {
    match obj.get("executor").map(|e| e.get("provider_id")) {
        None | Some(None) | Some(Some(Value::Null)) => Ok(Cow::Borrowed("caf-worker")),
        Some(Some(Value::String(p))) if !p.is_empty() => Ok(Cow::Owned(p.clone())),
        Some(Some(_)) => Err(invalid("executor.provider_id must be a non-empty string")),
    }
}

/// `job.payload_ref` must be absent or null.
pub(super) fn no_payload_ref(job: &Map<String, Value>) -> Result<(), Invalid> {
    if job.get("payload_ref").is_some_and(|v| !v.is_null()) {
        return Err((
            RejectReason::UnsupportedPayloadRef,
            "job.payload_ref is not supported; send the payload inline".into(),
        ));
    }
    Ok(())
}

/// The pool named by `job.resources.class`, else the job type's own.
pub(super) fn pool(job_type: JobType, job: &Map<String, Value>) -> Result<PoolKind, Invalid> {
    match job.get("resources").map(|r| r.get("class")) {
        None | Some(None) | Some(Some(Value::Null)) => Ok(job_type.default_pool()),
        Some(Some(Value::String(c))) => PoolKind::parse(c).ok_or_else(|| {
            invalid(format!(
                "job.resources.class must be cpu, io or gpu, got {}",
                describe_str(c)
            ))
        }),
        Some(Some(_)) => Err(invalid("job.resources.class must be a string")),
    }
}

/// The checked `options` object (the default: none given).
#[derive(Default)]
pub(super) struct Options {
    pub(super) deadline_ms: Option<u64>,
    pub(super) attempt_timeout_ms: Option<u64>,
    pub(super) retry: RetryOptions,
}

pub(super) fn options(obj: &Map<String, Value>, rules: &IntakeRules) -> Result<Options, Invalid> {
    let no_options = Map::new();
    let options = match obj.get("options") {
        None | Some(Value::Null) => &no_options,
        Some(Value::Object(o)) => o,
        Some(_) => return Err(invalid("options must be an object")),
    };
    let deadline_ms = int_option(options, "deadline_ms", 1, MAX_DEADLINE_MS)?;
    let deadline_bound = deadline_ms.unwrap_or(rules.default_deadline_ms);
    let attempt_timeout_ms = int_option(options, "attempt_timeout_ms", 1, deadline_bound)?;
    int_option(options, "priority", 0, u64::MAX)?;
    let retry = match options.get("retry") {
        None | Some(Value::Null) => RetryOptions::default(),
        Some(Value::Object(r)) => {
            let max_attempts = int_field(r, "options.retry.max_attempts", 1, 10)?;
            let backoff_ms = int_field(r, "options.retry.backoff_ms", 0, 60_000)?;
            let max_backoff_ms = int_field(
                r,
                "options.retry.max_backoff_ms",
                backoff_ms.unwrap_or(0),
                MAX_DEADLINE_MS,
            )?;
            RetryOptions {
                max_attempts: max_attempts.map(|n| n as u32),
                backoff_ms,
                max_backoff_ms,
            }
        }
        Some(_) => return Err(invalid("options.retry must be an object")),
    };
    Ok(Options {
        deadline_ms,
        attempt_timeout_ms,
        retry,
    })
}

/// A short description of a JSON value for messages: small scalars as
/// themselves, anything else by type (input is never echoed at length).
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => describe_str(s),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// A string for messages: quoted when short, else named by its length.
fn describe_str(s: &str) -> String {
    if s.len() <= 64 {
        format!("{s:?}")
    } else {
        format!("a {}-byte string", s.len())
    }
}

fn id_field(obj: &Map<String, Value>, name: &str) -> Result<String, Invalid> {
    match obj.get(name) {
        Some(Value::String(s)) if s.is_empty() => Err(invalid(format!("{name} must not be empty"))),
        Some(Value::String(s)) if s.len() > MAX_ID_BYTES => Err(invalid(format!(
            "{name} is {} bytes, more than {MAX_ID_BYTES}",
            s.len()
        ))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(invalid(format!("{name} must be a string"))),
        None => Err(invalid(format!("{name} is missing"))),
    }
}

fn int_option(
    options: &Map<String, Value>,
    key: &str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, Invalid> {
    // The "options.<key>" path only serves error messages: build it only then
    // (this runs three times per assignment on the intake path).
    match options.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => int_field(options, &format!("options.{key}"), min, max),
    }
}

/// Reads the last path segment of `path` from `map` as an integer in `min..=max`.
fn int_field(
    map: &Map<String, Value>,
    path: &str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, Invalid> {
    let key = path.rsplit('.').next().unwrap_or(path);
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            Some(n) => Err(invalid(format!("{path} must be in {min}..={max}, got {n}"))),
            None => Err(invalid(format!(
                "{path} must be an integer, got {}",
                describe(v)
            ))),
        },
    }
}

pub(super) fn correlation(obj: &Map<String, Value>, strict: bool) -> Result<Correlation, String> {
    let corr = match obj.get("correlation") {
        None | Some(Value::Null) => None,
        Some(Value::Object(c)) => Some(c),
        Some(_) => return Err("correlation must be an object".into()),
    };
    let field = |name: &str| -> Result<Option<String>, String> {
        let v = corr
            .and_then(|c| c.get(name))
            .filter(|v| !v.is_null())
            .or_else(|| obj.get(name).filter(|v| !v.is_null()));
        match v {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_BYTES => {
                Ok(Some(s.clone()))
            }
            Some(_) => Err(format!(
                "{name} must be a non-empty string of at most {MAX_ID_BYTES} bytes"
            )),
        }
    };
    let c = Correlation {
        trace_id: field("trace_id")?,
        run_id: field("run_id")?,
        flow_id: field("flow_id")?,
        step_id: field("step_id")?,
    };
    let present = [&c.run_id, &c.flow_id, &c.step_id]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if present != 0 && present != 3 {
        return Err("run_id, flow_id and step_id must all be present or all absent".into());
    }
    if strict {
        if let Some(t) = &c.trace_id {
            if !ids::is_trace_id(t) {
                return Err(format!("trace_id {t:?} is not 32 hex digits or a UUID"));
            }
        }
        for (name, v) in [
            ("run_id", &c.run_id),
            ("flow_id", &c.flow_id),
            ("step_id", &c.step_id),
        ] {
            if let Some(v) = v {
                if !ids::is_uuid(v) && !ids::is_ulid(v) {
                    return Err(format!("{name} {v:?} is not a UUID or ULID"));
                }
            }
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_messages_never_echo_long_input() {
        let rules = IntakeRules {
            max_body_bytes: 1 << 20,
            strict_ids: true,
            default_deadline_ms: 30_000,
        };
        let secret = "s".repeat(10_000);
        for doc in [
            serde_json::json!({"version": secret}),
            serde_json::json!({"version": "1", "assignment_id": "a", "request_id": "r",
                "tenant_id": "t", "job": {"type": secret}}),
            serde_json::json!({"version": "1", "assignment_id": "a", "request_id": "r",
                "tenant_id": "t", "job": {"type": "debug.echo"}, "options": {"deadline_ms": {"x": secret}}}),
        ] {
            let r = validate_assignment(doc, &rules).unwrap_err();
            assert!(r.message.len() < 200, "{}", r.message);
        }
    }
}
