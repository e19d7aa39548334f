//! A focused synchronous NATS client: no async runtime, no `nats` crate.
//!
//! Module guide:
//! - [`proto`]: sans-I/O parser of server operations and encoders of client
//!   operations, `NATS/1.0` headers. Bounded: control-line and payload limits.
//! - `conn`: one connection — socket or TLS (rustls), handshake, a reader
//!   thread, a flusher thread that writes the shared buffer in batches.
//! - [`client`]: [`Client`] — reconnect with jittered exponential backoff
//!   across the URL list and the servers the cluster announces, subscriptions
//!   re-sent after reconnect, request/reply over one wildcard inbox, PING/PONG
//!   keep-alive with stale detection, lifecycle [`Event`]s.
//! - [`jetstream`]: the JetStream API over the same connection (streams,
//!   durable pull consumers, acks, publish with PubAck and `Nats-Msg-Id`).
//!
//! ```no_run
//! use caf_worker::transport::nats::{Client, Options};
//! use std::time::Duration;
//! let client = Client::start(Options::from_url_list("nats://127.0.0.1:4222").unwrap());
//! let sub = client.subscribe("greet.>").unwrap();
//! client.publish("greet.joe", b"hello").ok();
//! let _ = sub.receiver().recv_timeout(Duration::from_secs(1));
//! ```

pub mod client;
mod conn;
pub mod jetstream;
pub mod proto;

pub use client::{Client, Options, Subscription, redact_url};
pub use jetstream::{
    ConsumerConfig, JetStream, JsMeta, PubAck, PullItem, PullSubscription, Retention, StreamConfig,
    ack, ack_sync, in_progress, nak, term,
};
pub use proto::{Headers, Message};

use std::fmt;

/// Errors of the NATS client.
#[non_exhaustive]
#[derive(Debug)]
pub enum Error {
    /// A server URL could not be parsed (credentials are never shown).
    InvalidUrl(String),
    /// No connection right now; the client keeps reconnecting.
    NotConnected,
    /// No answer in time.
    Timeout,
    /// A request found no subscriber (status 503).
    NoResponders,
    /// Message larger than the server's `max_payload`.
    PayloadTooLarge {
        /// Headers plus payload.
        size: usize,
        /// The server's limit.
        max: usize,
    },
    /// `-ERR` text from the server.
    Server(String),
    /// Socket error.
    Io(std::io::Error),
    /// Malformed input (from the server, or an invalid subject/header given to us).
    Protocol(String),
    /// A JetStream API error.
    JetStream {
        /// HTTP-like status (404, 400, 503…).
        code: u16,
        /// JetStream error code (10059 stream not found, 10014 consumer not found…).
        err_code: u64,
        /// Server description.
        description: String,
    },
    /// The client was closed.
    Closed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidUrl(s) => write!(f, "invalid NATS URL {s}"),
            Error::NotConnected => f.write_str("not connected to NATS"),
            Error::Timeout => f.write_str("NATS operation timed out"),
            Error::NoResponders => f.write_str("no responders"),
            Error::PayloadTooLarge { size, max } => {
                write!(
                    f,
                    "message of {size} bytes exceeds the server's max_payload {max}"
                )
            }
            Error::Server(s) => write!(f, "server error: {s}"),
            Error::Io(e) => write!(f, "i/o error: {e}"),
            Error::Protocol(s) => write!(f, "protocol error: {s}"),
            Error::JetStream {
                code,
                err_code,
                description,
            } => write!(f, "jetstream error {code}/{err_code}: {description}"),
            Error::Closed => f.write_str("NATS client closed"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

/// Connection lifecycle events for the front (health, metrics, logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// First connection established.
    Connected {
        /// Server URL without credentials.
        server: String,
    },
    /// The connection was lost; the client is reconnecting.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// Connected again after a loss.
    Reconnected {
        /// Server URL without credentials.
        server: String,
    },
    /// `-ERR` from a server (e.g. `Authorization Violation`), during the
    /// handshake or later.
    ServerError(String),
    /// The server announced lame duck mode (it will shut down soon).
    LameDuck,
}
