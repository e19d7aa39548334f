//! What a message transport (the NATS front, SPEC §13) reports about itself.
//! The transport calls a [`TransportObserver`]; [`super::Metrics`] turns the
//! calls into Prometheus series. The transport never touches Prometheus.

/// `direction` label of `worker_nats_messages_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Received from the server.
    In,
    /// Published to the server.
    Out,
}

impl Direction {
    /// Both directions.
    pub const ALL: [Direction; 2] = [Direction::In, Direction::Out];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

/// `kind` label of `worker_nats_messages_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// An assignment.
    Assign,
    /// An Ack (SPEC §3.2).
    Ack,
    /// An ExecResult.
    Result,
    /// A heartbeat.
    Heartbeat,
    /// A DLQ record.
    Dlq,
    /// A `human.approval` decision (in) or the answer to one (out, to its reply subject).
    Approval,
}

impl MessageKind {
    /// Every kind.
    pub const ALL: [MessageKind; 6] = [
        MessageKind::Assign,
        MessageKind::Ack,
        MessageKind::Result,
        MessageKind::Heartbeat,
        MessageKind::Dlq,
        MessageKind::Approval,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Assign => "assign",
            MessageKind::Ack => "ack",
            MessageKind::Result => "result",
            MessageKind::Heartbeat => "heartbeat",
            MessageKind::Dlq => "dlq",
            MessageKind::Approval => "approval",
        }
    }
}

/// `kind` label of `worker_jetstream_acks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsAckKind {
    /// `+ACK`.
    Ack,
    /// `-NAK`.
    Nak,
    /// `+TERM`.
    Term,
    /// `+WPI`.
    InProgress,
}

impl JsAckKind {
    /// Every kind.
    pub const ALL: [JsAckKind; 4] = [
        JsAckKind::Ack,
        JsAckKind::Nak,
        JsAckKind::Term,
        JsAckKind::InProgress,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            JsAckKind::Ack => "ack",
            JsAckKind::Nak => "nak",
            JsAckKind::Term => "term",
            JsAckKind::InProgress => "in_progress",
        }
    }
}

/// Why a decision that came over NATS was refused: the `reason` label of
/// `worker_nats_approval_refusals_total`, the `error.code` of the answer and
/// its HTTP-like status (the ingress answers the same cases the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalRefusal {
    /// The body is not a decision (400).
    InvalidRequest,
    /// `by` is not among the approvers (403).
    Forbidden,
    /// This worker holds the id, but not as an approval of that tenant (404).
    NotFound,
    /// The approval already has a result (409).
    AlreadyDecided,
    /// The body is larger than `WORKER_MAX_BODY_BYTES` (413).
    PayloadTooLarge,
}

impl ApprovalRefusal {
    /// Every reason.
    pub const ALL: [ApprovalRefusal; 5] = [
        ApprovalRefusal::InvalidRequest,
        ApprovalRefusal::Forbidden,
        ApprovalRefusal::NotFound,
        ApprovalRefusal::AlreadyDecided,
        ApprovalRefusal::PayloadTooLarge,
    ];

    /// The label value (also the answer's `error.code`).
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalRefusal::InvalidRequest => "invalid_request",
            ApprovalRefusal::Forbidden => "forbidden",
            ApprovalRefusal::NotFound => "not_found",
            ApprovalRefusal::AlreadyDecided => "already_decided",
            ApprovalRefusal::PayloadTooLarge => "payload_too_large",
        }
    }

    /// The status the ingress answers for the same case.
    pub fn status(self) -> u16 {
        match self {
            ApprovalRefusal::InvalidRequest => 400,
            ApprovalRefusal::Forbidden => 403,
            ApprovalRefusal::NotFound => 404,
            ApprovalRefusal::AlreadyDecided => 409,
            ApprovalRefusal::PayloadTooLarge => 413,
        }
    }
}

/// Transport events. Every method has an empty default; calls happen on hot
/// paths and must not block.
pub trait TransportObserver: Send + Sync {
    /// The connection went up (`true`) or down (`false`).
    fn connected(&self, _up: bool) {}
    /// The client connected again after losing its connection.
    fn reconnected(&self) {}
    /// A message was received or published.
    fn message(&self, _direction: Direction, _kind: MessageKind) {}
    /// A JetStream acknowledgement was sent.
    fn js_ack(&self, _kind: JsAckKind) {}
    /// Results now waiting for the connection.
    fn buffered(&self, _results: usize) {}
    /// A decision from NATS was refused.
    fn approval_refused(&self, _reason: ApprovalRefusal) {}
}

/// An observer that records nothing (metrics off).
#[derive(Debug, Default)]
pub struct NoopTransportObserver;

impl TransportObserver for NoopTransportObserver {}
