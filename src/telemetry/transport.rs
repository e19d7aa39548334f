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
}

impl MessageKind {
    /// Every kind.
    pub const ALL: [MessageKind; 5] = [
        MessageKind::Assign,
        MessageKind::Ack,
        MessageKind::Result,
        MessageKind::Heartbeat,
        MessageKind::Dlq,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Assign => "assign",
            MessageKind::Ack => "ack",
            MessageKind::Result => "result",
            MessageKind::Heartbeat => "heartbeat",
            MessageKind::Dlq => "dlq",
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
}

/// An observer that records nothing (metrics off).
#[derive(Debug, Default)]
pub struct NoopTransportObserver;

impl TransportObserver for NoopTransportObserver {}
