//! The JetStream API over a core [`Client`] connection: stream and consumer
//! lookup and creation (`$JS.API.*` requests with JSON bodies), publish with
//! a PubAck and `Nats-Msg-Id` de-duplication, durable pull consumers
//! (`CONSUMER.MSG.NEXT` with batch, expires and idle heartbeat) and the
//! acknowledgements `+ACK`, `-NAK`, `+TERM`, `+WPI`.
//!
//! API errors come back as `{"error":{"code","err_code","description"}}` and
//! become [`Error::JetStream`]; "not found" (10059 stream, 10014 consumer) is
//! `Ok(None)` from the `*_info` calls.

use super::Error;
use super::client::{Client, Subscription};
use super::proto::{Headers, Message};
use crossbeam_channel::Receiver;
use serde_json::{Value, json};
use std::time::Duration;

/// JetStream error code: stream not found.
pub const ERR_STREAM_NOT_FOUND: u64 = 10059;
/// JetStream error code: consumer not found.
pub const ERR_CONSUMER_NOT_FOUND: u64 = 10014;

/// Duration as the nanoseconds the JetStream API expects.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Stream retention policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Retention {
    /// Keep messages up to the stream limits.
    #[default]
    Limits,
    /// Remove a message once a consumer acknowledged it.
    WorkQueue,
}

/// The stream settings this project uses.
#[derive(Debug, Clone, Default)]
pub struct StreamConfig {
    /// Stream name.
    pub name: String,
    /// Subjects captured.
    pub subjects: Vec<String>,
    /// Retention policy.
    pub retention: Retention,
    /// File storage (else memory).
    pub storage_file: bool,
    /// `Nats-Msg-Id` de-duplication window (zero: server default, 2 min).
    pub duplicate_window: Duration,
}

/// The durable pull consumer settings this project uses (explicit acks).
#[derive(Debug, Clone, Default)]
pub struct ConsumerConfig {
    /// Durable name.
    pub durable_name: String,
    /// Redelivery after this long without an ack (or `+WPI`).
    pub ack_wait: Duration,
    /// Most deliveries of one message (-1: unlimited).
    pub max_deliver: i64,
    /// Only messages of this subject.
    pub filter_subject: Option<String>,
    /// Most unacknowledged messages in flight.
    pub max_ack_pending: Option<i64>,
}

/// The server's acknowledgement of a JetStream publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubAck {
    /// Stream that stored the message.
    pub stream: String,
    /// Its sequence number.
    pub seq: u64,
    /// The `Nats-Msg-Id` was seen within the duplicate window; nothing stored.
    pub duplicate: bool,
}

/// Delivery metadata parsed from a JetStream message's reply subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsMeta {
    /// Stream name.
    pub stream: String,
    /// Consumer name.
    pub consumer: String,
    /// Delivery count (1 on first delivery).
    pub delivered: u64,
    /// Stream sequence.
    pub stream_seq: u64,
    /// Consumer sequence.
    pub consumer_seq: u64,
    /// Messages still pending for the consumer.
    pub pending: u64,
    /// Publish time, nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
}

impl JsMeta {
    /// Parses `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`
    /// or the 11/12-token form `$JS.ACK.<domain>.<account hash>.<stream>…[.<token>]`.
    pub fn parse(reply: &str) -> Option<JsMeta> {
        let t: Vec<&str> = reply.split('.').collect();
        if t.len() < 9 || t[0] != "$JS" || t[1] != "ACK" {
            return None;
        }
        let o = match t.len() {
            9 => 2,
            n if n >= 11 => 4,
            _ => return None,
        };
        let num = |i: usize| t[o + i].parse::<u64>().ok();
        Some(JsMeta {
            stream: t[o].to_string(),
            consumer: t[o + 1].to_string(),
            delivered: num(2)?,
            stream_seq: num(3)?,
            consumer_seq: num(4)?,
            timestamp_ns: num(5)?,
            pending: num(6)?,
        })
    }
}

/// What a pull subscription yields.
#[derive(Debug, Clone)]
pub enum PullItem {
    /// A stored message with its delivery metadata.
    Message(Message, JsMeta),
    /// Status 100: idle heartbeat (the pull request is still alive).
    Heartbeat,
    /// Status 404: no messages (no-wait requests).
    NoMessages,
    /// Status 408: the pull request expired.
    RequestTimeout,
    /// Any other status (409 max waiting, consumer deleted, …) or a message
    /// whose reply subject is not a JetStream ack subject (status 0).
    Other {
        /// Status code (0 if none).
        status: u16,
        /// Description.
        description: String,
    },
}

impl PullItem {
    /// Sorts a message received on a pull inbox.
    pub fn classify(msg: Message) -> PullItem {
        if let Some(status) = msg.status() {
            return match status {
                100 => PullItem::Heartbeat,
                404 => PullItem::NoMessages,
                408 => PullItem::RequestTimeout,
                _ => PullItem::Other {
                    status,
                    description: msg
                        .headers
                        .as_ref()
                        .and_then(Headers::description)
                        .unwrap_or_default()
                        .to_string(),
                },
            };
        }
        match msg.reply.as_deref().and_then(JsMeta::parse) {
            Some(meta) => PullItem::Message(msg, meta),
            None => PullItem::Other {
                status: 0,
                description: format!("not a JetStream message: {}", msg.subject),
            },
        }
    }
}

/// JetStream API access through a [`Client`].
#[derive(Debug, Clone)]
pub struct JetStream {
    client: Client,
    prefix: String,
    timeout: Duration,
}

/// A durable pull consumer's inbox.
#[derive(Debug)]
pub struct PullSubscription {
    client: Client,
    sub: Subscription,
    inbox: String,
    next_subject: String,
}

impl PullSubscription {
    /// Asks for up to `batch` messages, waiting at most `expires` on the
    /// server; with `idle_heartbeat` the server sends status 100 while the
    /// request is alive (it must be under half of `expires`).
    pub fn request(
        &self,
        batch: usize,
        expires: Duration,
        idle_heartbeat: Option<Duration>,
    ) -> Result<(), Error> {
        let mut body = json!({"batch": batch, "expires": nanos(expires)});
        if let Some(hb) = idle_heartbeat {
            body["idle_heartbeat"] = nanos(hb).into();
        }
        self.client
            .publish_with_reply(&self.next_subject, &self.inbox, body.to_string().as_bytes())
    }

    /// Like [`request`](Self::request) but answered at once with 404 when nothing is pending.
    pub fn request_no_wait(&self, batch: usize) -> Result<(), Error> {
        let body = json!({"batch": batch, "no_wait": true});
        self.client
            .publish_with_reply(&self.next_subject, &self.inbox, body.to_string().as_bytes())
    }

    /// The next message or status, waiting at most `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<PullItem> {
        self.sub
            .receiver()
            .recv_timeout(timeout)
            .ok()
            .map(PullItem::classify)
    }

    /// The raw inbox channel (for `select!`); sort with [`PullItem::classify`].
    pub fn receiver(&self) -> &Receiver<Message> {
        self.sub.receiver()
    }
}

impl JetStream {
    /// JetStream under the default API prefix `$JS.API`; `timeout` bounds each API call.
    pub fn new(client: Client, timeout: Duration) -> JetStream {
        JetStream {
            client,
            prefix: "$JS.API".into(),
            timeout,
        }
    }

    /// The underlying client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn api(&self, suffix: &str, body: &Value) -> Result<Value, Error> {
        let subject = format!("{}.{suffix}", self.prefix);
        let payload = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let msg = self
            .client
            .request(&subject, None, &payload, self.timeout)?;
        parse_api_reply(&msg.payload)
    }

    /// Names of the streams capturing `subject`.
    pub fn stream_names_by_subject(&self, subject: &str) -> Result<Vec<String>, Error> {
        let v = self.api("STREAM.NAMES", &json!({"subject": subject}))?;
        Ok(v["streams"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Stream info, `None` when the stream does not exist.
    pub fn stream_info(&self, name: &str) -> Result<Option<Value>, Error> {
        check_name(name)?;
        not_found_as_none(
            self.api(&format!("STREAM.INFO.{name}"), &Value::Null),
            ERR_STREAM_NOT_FOUND,
        )
    }

    /// Creates a stream (idempotent when the configuration is identical).
    pub fn add_stream(&self, cfg: &StreamConfig) -> Result<Value, Error> {
        check_name(&cfg.name)?;
        let mut body = json!({
            "name": cfg.name,
            "subjects": cfg.subjects,
            "retention": match cfg.retention {
                Retention::Limits => "limits",
                Retention::WorkQueue => "workqueue",
            },
            "storage": if cfg.storage_file { "file" } else { "memory" },
            "discard": "old",
            "num_replicas": 1,
        });
        if !cfg.duplicate_window.is_zero() {
            body["duplicate_window"] = nanos(cfg.duplicate_window).into();
        }
        self.api(&format!("STREAM.CREATE.{}", cfg.name), &body)
    }

    /// Deletes a stream; `false` when it did not exist.
    pub fn delete_stream(&self, name: &str) -> Result<bool, Error> {
        check_name(name)?;
        let r = self.api(&format!("STREAM.DELETE.{name}"), &Value::Null);
        not_found_as_none(r, ERR_STREAM_NOT_FOUND).map(|v| v.is_some())
    }

    /// Deletes a consumer; `false` when it did not exist.
    pub fn delete_consumer(&self, stream: &str, consumer: &str) -> Result<bool, Error> {
        check_name(stream)?;
        check_name(consumer)?;
        let r = self.api(
            &format!("CONSUMER.DELETE.{stream}.{consumer}"),
            &Value::Null,
        );
        not_found_as_none(r, ERR_CONSUMER_NOT_FOUND).map(|v| v.is_some())
    }

    /// Consumer info, `None` when the consumer does not exist.
    pub fn consumer_info(&self, stream: &str, consumer: &str) -> Result<Option<Value>, Error> {
        check_name(stream)?;
        check_name(consumer)?;
        not_found_as_none(
            self.api(&format!("CONSUMER.INFO.{stream}.{consumer}"), &Value::Null),
            ERR_CONSUMER_NOT_FOUND,
        )
    }

    /// Creates a durable pull consumer with explicit acks.
    pub fn add_consumer(&self, stream: &str, cfg: &ConsumerConfig) -> Result<Value, Error> {
        check_name(stream)?;
        check_name(&cfg.durable_name)?;
        let mut config = json!({
            "durable_name": cfg.durable_name,
            "deliver_policy": "all",
            "ack_policy": "explicit",
            "replay_policy": "instant",
            "max_deliver": cfg.max_deliver,
        });
        if !cfg.ack_wait.is_zero() {
            config["ack_wait"] = nanos(cfg.ack_wait).into();
        }
        if let Some(f) = &cfg.filter_subject {
            config["filter_subject"] = f.as_str().into();
        }
        if let Some(m) = cfg.max_ack_pending {
            config["max_ack_pending"] = m.into();
        }
        self.api(
            &format!("CONSUMER.DURABLE.CREATE.{stream}.{}", cfg.durable_name),
            &json!({"stream_name": stream, "config": config}),
        )
    }

    /// Publishes to a stream subject and waits for the PubAck. `msg_id`
    /// becomes `Nats-Msg-Id` (the server drops duplicates within the window).
    pub fn publish(
        &self,
        subject: &str,
        headers: &Headers,
        payload: &[u8],
        msg_id: Option<&str>,
    ) -> Result<PubAck, Error> {
        let mut h;
        let headers = match msg_id {
            Some(id) => {
                h = headers.clone();
                h.insert("Nats-Msg-Id", id);
                &h
            }
            None => headers,
        };
        let hdrs = (!headers.is_empty()).then_some(headers);
        let msg = self.client.request(subject, hdrs, payload, self.timeout)?;
        let v = parse_api_reply(&msg.payload)?;
        match (v["stream"].as_str(), v["seq"].as_u64()) {
            (Some(stream), Some(seq)) => Ok(PubAck {
                stream: stream.to_string(),
                seq,
                duplicate: v["duplicate"].as_bool().unwrap_or(false),
            }),
            _ => Err(Error::Protocol(format!("not a PubAck: {v}"))),
        }
    }

    /// Opens the inbox of a durable pull consumer.
    pub fn pull_subscription(
        &self,
        stream: &str,
        consumer: &str,
    ) -> Result<PullSubscription, Error> {
        check_name(stream)?;
        check_name(consumer)?;
        let inbox = self.client.new_inbox();
        let sub = self.client.subscribe(&inbox)?;
        Ok(PullSubscription {
            client: self.client.clone(),
            sub,
            inbox,
            next_subject: format!("{}.CONSUMER.MSG.NEXT.{stream}.{consumer}", self.prefix),
        })
    }
}

/// Stream and consumer names become subject tokens: no dots, wildcards or spaces.
fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty()
        || name
            .bytes()
            .any(|b| b <= b' ' || matches!(b, b'.' | b'*' | b'>' | 0x7f))
    {
        return Err(Error::Protocol(format!("invalid JetStream name {name:?}")));
    }
    Ok(())
}

fn parse_api_reply(payload: &[u8]) -> Result<Value, Error> {
    let v: Value = serde_json::from_slice(payload)
        .map_err(|e| Error::Protocol(format!("JetStream reply is not JSON: {e}")))?;
    if let Some(err) = v.get("error") {
        return Err(Error::JetStream {
            code: err["code"]
                .as_u64()
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(0),
            err_code: err["err_code"].as_u64().unwrap_or(0),
            description: err["description"].as_str().unwrap_or_default().to_string(),
        });
    }
    Ok(v)
}

fn not_found_as_none(r: Result<Value, Error>, code: u64) -> Result<Option<Value>, Error> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(Error::JetStream { err_code, .. }) if err_code == code => Ok(None),
        Err(e) => Err(e),
    }
}

fn reply_of(msg: &Message) -> Result<&str, Error> {
    msg.reply
        .as_deref()
        .ok_or_else(|| Error::Protocol("message has no reply subject to acknowledge".into()))
}

/// Acknowledges a JetStream message (`+ACK`, fire and forget).
pub fn ack(client: &Client, msg: &Message) -> Result<(), Error> {
    client.publish(reply_of(msg)?, b"+ACK")
}

/// Acknowledges and waits until the server confirms (`+ACK` as a request).
pub fn ack_sync(client: &Client, msg: &Message, timeout: Duration) -> Result<(), Error> {
    client
        .request(reply_of(msg)?, None, b"+ACK", timeout)
        .map(|_| ())
}

/// Negative acknowledgement: redeliver now, or after `delay`.
pub fn nak(client: &Client, msg: &Message, delay: Option<Duration>) -> Result<(), Error> {
    match delay {
        None => client.publish(reply_of(msg)?, b"-NAK"),
        Some(d) => client.publish(
            reply_of(msg)?,
            format!("-NAK {}", json!({"delay": nanos(d)})).as_bytes(),
        ),
    }
}

/// Terminates: never redeliver this message.
pub fn term(client: &Client, msg: &Message) -> Result<(), Error> {
    client.publish(reply_of(msg)?, b"+TERM")
}

/// Work in progress: restarts the message's `ack_wait` timer.
pub fn in_progress(client: &Client, msg: &Message) -> Result<(), Error> {
    client.publish(reply_of(msg)?, b"+WPI")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_subjects_parse() {
        let m = JsMeta::parse("$JS.ACK.WORK.w1.2.15.7.1700000000000000000.3").unwrap();
        assert_eq!(
            m,
            JsMeta {
                stream: "WORK".into(),
                consumer: "w1".into(),
                delivered: 2,
                stream_seq: 15,
                consumer_seq: 7,
                pending: 3,
                timestamp_ns: 1_700_000_000_000_000_000,
            }
        );
        let m = JsMeta::parse("$JS.ACK.hub.ACCHASH.WORK.w1.1.2.3.4.5.rnd").unwrap();
        assert_eq!(
            (
                m.stream.as_str(),
                m.consumer.as_str(),
                m.delivered,
                m.pending
            ),
            ("WORK", "w1", 1, 5)
        );
        let m = JsMeta::parse("$JS.ACK._.ACCHASH.S.C.1.2.3.4.5").unwrap();
        assert_eq!(m.stream_seq, 2);
        for bad in [
            "$JS.ACK.S.C.1.2.3.4",
            "$JS.ACK.S.C.x.2.3.4.5",
            "foo.ACK.S.C.1.2.3.4.5",
            "$JS.ACK.a.b.S.C.1.2.3.4",
        ] {
            assert!(JsMeta::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn api_errors_are_typed() {
        let e = parse_api_reply(br#"{"type":"x","error":{"code":404,"err_code":10059,"description":"stream not found"}}"#)
            .unwrap_err();
        assert!(matches!(
            e,
            Error::JetStream {
                code: 404,
                err_code: 10059,
                ..
            }
        ));
        assert!(
            not_found_as_none(Err(e), ERR_STREAM_NOT_FOUND)
                .unwrap()
                .is_none()
        );
        assert!(parse_api_reply(b"not json").is_err());
        assert!(check_name("a.b").is_err() && check_name("ok-name_1").is_ok());
    }
}
