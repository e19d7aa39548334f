//! JetStream mode (SPEC §13.3): streams and the durable pull consumer are
//! found or created at start; the worker pulls only what it has room for;
//! a result is published with `Nats-Msg-Id` and PubAcked before the
//! assignment is ACKed; `+WPI` keeps long steps from being redelivered.

use super::{InHand, JsHold, Outgoing, SLICE, Shared};
use crate::contract::Ack;
use crate::engine::{Admission, Backpressure, Lookup};
use crate::telemetry::{Direction, JsAckKind, MessageKind};
use crate::transport::nats::{
    self, ConsumerConfig, JetStream, Message, PullItem, Retention, StreamConfig,
};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most messages asked for in one pull request.
const MAX_BATCH: usize = 256;
/// How long one pull request waits on the server for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// Duplicate window of the result stream when the worker creates it (≥ 2 min).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Timeout of JetStream API requests.
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// Serialized bytes of the results waiting for their PubAck before the
/// publisher pauses. A stream that takes results but does not answer (no
/// responders, a stalled stream) leaves each one waiting for
/// `WORKER_NATS_PUBACK_TIMEOUT_MS`; without this bound the waiting results
/// were bounded only by the messages in hand (10,000 of up to
/// `WORKER_MAX_RESPONSE_BYTES` each). Paused, new results wait in the
/// bounded buffer instead.
pub const PUBACK_WAIT_BYTES: usize = 64 << 20;

/// A result publish waiting for its PubAck.
#[derive(Debug)]
struct PubWait {
    out: Outgoing,
    sent: Instant,
    /// Counted against [`PUBACK_WAIT_BYTES`]: no answer came yet. An error
    /// PubAck (say, the result is over the stream's message size) leaves
    /// the result waiting for its time-out, but no longer counted, so such
    /// results cannot stop the ones behind them.
    counted: bool,
}

/// The result publishes waiting for their PubAck, by reply token, with the
/// sum of their serialized sizes kept beside them (read without the lock
/// by the publisher, which pauses at [`PUBACK_WAIT_BYTES`]).
#[derive(Debug, Default)]
pub(super) struct PubWaits {
    waits: Mutex<HashMap<u64, PubWait>>,
    bytes: AtomicUsize,
}

impl PubWaits {
    fn waits(&self) -> MutexGuard<'_, HashMap<u64, PubWait>> {
        self.waits.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn uncount(&self, wait: &PubWait) {
        if wait.counted {
            self.bytes.fetch_sub(wait.out.size, Ordering::AcqRel);
        }
    }

    /// Starts waiting for the PubAck of `out`, published with `token`.
    pub(super) fn insert(&self, token: u64, out: Outgoing) {
        let mut waits = self.waits();
        self.bytes.fetch_add(out.size, Ordering::AcqRel);
        let wait = PubWait {
            out,
            sent: Instant::now(),
            counted: true,
        };
        if let Some(old) = waits.insert(token, wait) {
            self.uncount(&old);
        }
    }

    /// Stops waiting for `token`'s PubAck (it came, or the publish failed).
    pub(super) fn remove(&self, token: u64) -> Option<Outgoing> {
        let wait = self.waits().remove(&token)?;
        self.uncount(&wait);
        Some(wait.out)
    }

    /// An error PubAck for `token`: the result stays for its time-out but
    /// stops counting. Returns its assignment id (`None`: not waiting).
    fn refused(&self, token: u64) -> Option<String> {
        let mut waits = self.waits();
        let wait = waits.get_mut(&token)?;
        if wait.counted {
            wait.counted = false;
            self.bytes.fetch_sub(wait.out.size, Ordering::AcqRel);
        }
        Some(wait.out.result.assignment_id.clone())
    }

    /// Takes the waits older than `timeout` (every wait if `all`), oldest
    /// publish first.
    fn take_due(&self, all: bool, timeout: Duration) -> Vec<Outgoing> {
        let mut waits = self.waits();
        let mut due: Vec<u64> = waits
            .iter()
            .filter(|(_, w)| all || w.sent.elapsed() >= timeout)
            .map(|(t, _)| *t)
            .collect();
        due.sort_unstable();
        let mut out = Vec::with_capacity(due.len());
        for wait in due.iter().filter_map(|t| waits.remove(t)) {
            self.uncount(&wait);
            out.push(wait.out);
        }
        out
    }

    pub(super) fn is_empty(&self) -> bool {
        self.waits().is_empty()
    }

    /// At least [`PUBACK_WAIT_BYTES`] wait: the publisher pauses.
    pub(super) fn full(&self) -> bool {
        self.bytes.load(Ordering::Acquire) >= PUBACK_WAIT_BYTES
    }
}

/// Finds or creates both streams and the consumer; returns the name of the
/// stream that captures the assign subject.
fn ensure_setup(
    s: &Shared,
    js: &JetStream,
    warned: &mut HashSet<String>,
) -> Result<String, nats::Error> {
    let n = &s.nats;
    let assign = ensure_stream(
        js,
        &n.assign_subject,
        &n.stream,
        Retention::WorkQueue,
        None,
        warned,
    )?;
    ensure_stream(
        js,
        &n.result_subject,
        &n.result_stream,
        Retention::Limits,
        Some(DUPLICATE_WINDOW),
        warned,
    )?;
    match js.consumer_info(&assign, &n.consumer)? {
        Some(info) => {
            let c = &info["config"];
            let ack_wait = c["ack_wait"].as_u64().map(Duration::from_nanos);
            let max_deliver = c["max_deliver"].as_i64();
            if (ack_wait != Some(n.ack_wait) || max_deliver != Some(n.max_deliver))
                && warned.insert(format!("consumer {}", n.consumer))
            {
                log::warn!(
                    consumer = n.consumer.as_str(),
                    ack_wait_ms = ack_wait.map(|d| d.as_millis() as u64),
                    max_deliver = max_deliver;
                    "the existing JetStream consumer differs from WORKER_NATS_ACK_WAIT_MS/WORKER_NATS_MAX_DELIVER; using it as it is"
                );
            }
        }
        None => {
            js.add_consumer(
                &assign,
                &ConsumerConfig {
                    durable_name: n.consumer.clone(),
                    ack_wait: n.ack_wait,
                    max_deliver: n.max_deliver,
                    filter_subject: Some(n.assign_subject.clone()),
                    max_ack_pending: None,
                },
            )?;
            log::info!(stream = assign.as_str(), consumer = n.consumer.as_str(); "created the JetStream consumer");
        }
    }
    Ok(assign)
}

fn ensure_stream(
    js: &JetStream,
    subject: &str,
    name: &str,
    retention: Retention,
    duplicate_window: Option<Duration>,
    warned: &mut HashSet<String>,
) -> Result<String, nats::Error> {
    let want = match retention {
        Retention::WorkQueue => "workqueue",
        _ => "limits",
    };
    if let Some(existing) = js.stream_names_by_subject(subject)?.into_iter().next() {
        if let Some(info) = js.stream_info(&existing)? {
            let c = &info["config"];
            let window = c["duplicate_window"].as_u64().map(Duration::from_nanos);
            let mismatch = c["retention"].as_str() != Some(want)
                || c["storage"].as_str() != Some("file")
                || duplicate_window.is_some_and(|w| window.is_none_or(|x| x < w));
            if mismatch && warned.insert(format!("stream {existing}")) {
                log::warn!(
                    stream = existing.as_str(),
                    subject = subject,
                    retention = c["retention"].as_str(),
                    storage = c["storage"].as_str();
                    "the existing JetStream stream differs from what the worker would create ({want} retention, file storage); using it as it is"
                );
            }
        }
        return Ok(existing);
    }
    js.add_stream(&StreamConfig {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        retention,
        storage_file: true,
        duplicate_window: duplicate_window.unwrap_or(DUPLICATE_WINDOW),
    })?;
    log::info!(stream = name, subject = subject; "created the JetStream stream");
    Ok(name.to_owned())
}

/// The intake thread: set up, then pull while there is room.
pub(super) fn pull_loop(s: &Shared) {
    let js = JetStream::new(s.client.clone(), API_TIMEOUT);
    let mut warned = HashSet::new();
    let mut backoff = Duration::from_millis(100);
    let mut logged = false;
    let pull = loop {
        if s.draining.load(Ordering::Acquire) {
            return;
        }
        if s.client.is_connected() {
            match ensure_setup(s, &js, &mut warned)
                .and_then(|stream| js.pull_subscription(&stream, &s.nats.consumer))
            {
                Ok(p) => break p,
                Err(e) => {
                    if !logged {
                        log::warn!(error = e.to_string(); "JetStream set-up failed; retrying");
                        logged = true;
                    }
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        let until = Instant::now() + backoff;
        while Instant::now() < until && !s.draining.load(Ordering::Acquire) {
            std::thread::sleep(SLICE);
        }
    };
    s.intake_ready.store(true, Ordering::Release);
    let mut outstanding = 0usize;
    let mut request_until = Instant::now();
    while !s.draining.load(Ordering::Acquire) {
        if !s.client.is_connected() {
            outstanding = 0;
            std::thread::sleep(SLICE);
            continue;
        }
        if outstanding == 0 || Instant::now() >= request_until {
            let room = s.room().min(MAX_BATCH);
            if room == 0 {
                outstanding = 0;
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            match pull.request(room, PULL_EXPIRES, None) {
                Ok(()) => {
                    outstanding = room;
                    request_until = Instant::now() + PULL_EXPIRES + Duration::from_millis(500);
                }
                Err(e) => {
                    log::debug!(error = e.to_string(); "pull request failed");
                    std::thread::sleep(SLICE);
                    continue;
                }
            }
        }
        match pull.next(SLICE) {
            Some(PullItem::Message(msg, _meta)) => {
                outstanding = outstanding.saturating_sub(1);
                take(s, msg);
            }
            Some(PullItem::NoMessages | PullItem::RequestTimeout) => outstanding = 0,
            Some(PullItem::Other {
                status,
                description,
            }) => {
                log::debug!(status = status; "pull request ended: {description}");
                outstanding = 0;
            }
            Some(PullItem::Heartbeat) | None => {}
            #[allow(unreachable_patterns)]
            Some(_) => {}
        }
    }
    // A pull request still alive on the server would receive the messages
    // NAKed at drain (and hold them for `ack_wait`): wait for it to end,
    // handing back whatever it still brings.
    while outstanding > 0 && Instant::now() < request_until && s.client.is_connected() {
        match pull.next(SLICE) {
            Some(PullItem::Message(msg, _)) => {
                outstanding -= 1;
                s.observer.message(Direction::In, MessageKind::Assign);
                s.js_ack(&msg, JsAckKind::Nak);
            }
            Some(PullItem::NoMessages | PullItem::RequestTimeout | PullItem::Other { .. }) => {
                outstanding = 0
            }
            _ => {}
        }
    }
}

/// One delivery of an assignment.
fn take(s: &Shared, msg: Message) {
    let Some(engine) = s.engine() else { return };
    let (a, traceparent) = match s.intake(&msg) {
        Ok(x) => x,
        Err(r) => {
            s.reject_invalid(&msg, &r, None);
            s.js_ack(&msg, JsAckKind::Term);
            return;
        }
    };
    let id = a.assignment_id.clone();
    s.note_pool(a.pool);
    {
        let mut hand = s.hand();
        if let Some(held) = hand.get_mut(&id).and_then(|e| e.js.as_mut()) {
            // A redelivery of one this worker still holds: never a second run.
            held.msg = ack_handle(&msg);
            held.progress = Instant::now();
            let publishing = held.publishing;
            drop(hand);
            if !publishing {
                s.js_ack(&msg, JsAckKind::InProgress);
            }
            return;
        }
        hand.insert(
            id.clone(),
            InHand {
                traceparent: traceparent.clone(),
                js: Some(JsHold {
                    msg: ack_handle(&msg),
                    progress: Instant::now(),
                    publishing: false,
                }),
            },
        );
    }
    let worker = &s.worker_id;
    let ack = match engine.lookup(&id) {
        // Answered before (this worker retains it): publish it again, no run.
        Lookup::Done(result) => {
            republish(s, &id, result);
            Ack::duplicate(&a, worker)
        }
        // Known from the HTTP ingress: its result comes through the sink.
        Lookup::Pending => Ack::duplicate(&a, worker),
        Lookup::Unknown => match engine.submit(a, Backpressure::Reject) {
            Admission::Accepted(h) => Ack::accepted(&h.assignment, worker),
            Admission::Duplicate(a) => {
                if let Lookup::Done(result) = engine.lookup(&id) {
                    republish(s, &id, result);
                }
                Ack::duplicate(&a, worker)
            }
            Admission::Rejected(_, _) => {
                // JetStream never rejects for load or shutdown: the message
                // goes back to the stream for this or another worker.
                s.hand().remove(&id);
                s.js_ack(&msg, JsAckKind::Nak);
                return;
            }
        },
    };
    s.publish_ack(&ack, traceparent.as_deref(), None);
}

/// What acknowledging a delivery needs: its reply subject. The payload is
/// not kept (up to 10,000 held messages of up to `max_payload` each).
fn ack_handle(msg: &Message) -> Message {
    Message {
        subject: msg.subject.clone(),
        reply: msg.reply.clone(),
        headers: None,
        payload: Vec::new(),
    }
}

/// Publishes a retained result again for a held delivery.
fn republish(s: &Shared, id: &str, result: std::sync::Arc<crate::contract::ExecResult>) {
    let traceparent = {
        let mut hand = s.hand();
        let Some(entry) = hand.get_mut(id) else {
            return;
        };
        match entry.js.as_mut() {
            Some(js) if !js.publishing => js.publishing = true,
            _ => return,
        }
        entry.traceparent.clone()
    };
    s.enqueue(Outgoing::new(result, traceparent, None));
}

impl Shared {
    /// Reads PubAcks; a good one ACKs the assignment it answers.
    pub(super) fn puback_loop(&self) {
        let sub = loop {
            match self.client.subscribe(&format!("{}*", self.puback_prefix)) {
                Ok(sub) => break sub,
                Err(e) => {
                    log::warn!(error = e.to_string(); "cannot subscribe to the PubAck inbox; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                    if self.stop.load(Ordering::Acquire) {
                        return;
                    }
                }
            }
        };
        while !self.stop.load(Ordering::Acquire) {
            let Ok(msg) = sub.receiver().recv_timeout(SLICE) else {
                continue;
            };
            let Some(token) = msg
                .subject
                .strip_prefix(&self.puback_prefix)
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            let status = msg.headers.as_ref().and_then(|h| h.status());
            let body: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
            let good =
                status.is_none() && body.get("stream").is_some() && body.get("error").is_none();
            // Only a PubAck that ends a pause wakes the publisher (which
            // otherwise sleeps on the same condvar waiting for results).
            let was_full = self.pubacks.full();
            let resume = |s: &Self| {
                if was_full && !s.pubacks.full() {
                    s.outbox.ready.notify_one();
                }
            };
            if !good {
                // Left waiting: the time-out publishes it again.
                if let Some(id) = self.pubacks.refused(token) {
                    resume(self);
                    log::warn!(
                        assignment_id = id.as_str(),
                        status = status;
                        "result not stored by JetStream ({}); publishing it again later",
                        body.get("error").map_or_else(|| "no PubAck".to_owned(), |e| e.to_string())
                    );
                }
                continue;
            }
            let Some(out) = self.pubacks.remove(token) else {
                continue;
            };
            resume(self);
            let held = self
                .hand()
                .remove(&out.result.assignment_id)
                .and_then(|e| e.js);
            if let Some(js) = held {
                self.js_ack(&js.msg, JsAckKind::Ack);
            }
        }
        sub.unsubscribe();
    }

    /// Publishes again results whose PubAck did not come (all of them after a reconnect).
    pub(super) fn retry_pubacks(&self, all: bool) {
        let again = self.pubacks.take_due(all, self.nats.puback_timeout);
        if !again.is_empty() {
            log::debug!(results = again.len(); "publishing results again (no PubAck yet)");
            self.requeue_front(again);
            self.outbox.ready.notify_one();
        }
    }

    /// `+WPI` for held steps older than a third of `ack_wait`.
    pub(super) fn keep_in_progress(&self) {
        let every = self.nats.ack_wait / 3;
        let due: Vec<Message> = {
            let mut hand = self.hand();
            hand.values_mut()
                .filter_map(|e| e.js.as_mut())
                .filter(|js| js.progress.elapsed() >= every)
                .map(|js| {
                    js.progress = Instant::now();
                    js.msg.clone()
                })
                .collect()
        };
        for msg in due {
            self.js_ack(&msg, JsAckKind::InProgress);
        }
    }

    /// At drain: NAKs every held step the engine has not started, which it
    /// then never runs. Returns how many.
    pub(super) fn nak_unstarted(&self) -> usize {
        let Some(engine) = self.engine() else {
            return 0;
        };
        let ids: Vec<String> = self
            .hand()
            .iter()
            .filter(|(_, e)| e.js.as_ref().is_some_and(|j| !j.publishing))
            .map(|(id, _)| id.clone())
            .collect();
        let mut n = 0;
        for id in ids {
            if !engine.withdraw_unstarted(&id) {
                continue;
            }
            if let Some(js) = self.hand().remove(&id).and_then(|e| e.js) {
                self.js_ack(&js.msg, JsAckKind::Nak);
                n += 1;
            }
        }
        n
    }
}

/// Finds or creates the assign and result streams (not the consumer): for
/// `caf-worker submit`, so assignments published before any worker started
/// wait in the stream.
pub fn ensure_streams(
    client: &crate::transport::nats::Client,
    n: &crate::config::NatsSettings,
) -> Result<(), nats::Error> {
    let js = JetStream::new(client.clone(), API_TIMEOUT);
    let mut warned = HashSet::new();
    ensure_stream(
        &js,
        &n.assign_subject,
        &n.stream,
        Retention::WorkQueue,
        None,
        &mut warned,
    )?;
    ensure_stream(
        &js,
        &n.result_subject,
        &n.result_stream,
        Retention::Limits,
        Some(DUPLICATE_WINDOW),
        &mut warned,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::ExecResult;
    use std::sync::Arc;

    /// A result whose serialized size is about `pad` bytes.
    fn outgoing(id: &str, pad: usize) -> Outgoing {
        let r: ExecResult = serde_json::from_value(serde_json::json!({
            "version": "1", "assignment_id": id, "request_id": "r", "tenant_id": "t",
            "provider_id": "caf-worker", "job": {"type": "debug.echo"}, "status": "success",
            "latency_ms": 0, "queue_ms": 0, "cost": 0.0, "timestamp": 0, "attempts": 1,
            "retries_used": 0, "worker_id": "w", "outputs": {"pad": "x".repeat(pad)}
        }))
        .unwrap();
        Outgoing::new(Arc::new(r), None, None)
    }

    /// The waiting bytes follow every way out of the map, and an error
    /// PubAck stops counting its result (once) without dropping it.
    #[test]
    fn waiting_bytes_are_counted_once_and_error_pubacks_stop_counting() {
        let waits = PubWaits::default();
        let big = PUBACK_WAIT_BYTES / 2;
        waits.insert(1, outgoing("a", big));
        assert!(!waits.full());
        waits.insert(2, outgoing("b", big));
        assert!(waits.full());
        assert_eq!(waits.refused(2).as_deref(), Some("b"));
        assert_eq!(waits.refused(2).as_deref(), Some("b"));
        assert!(!waits.full(), "an error PubAck still counts");
        waits.insert(3, outgoing("c", 10));
        assert_eq!(
            waits.remove(1).map(|o| o.result.assignment_id.clone()),
            Some("a".into())
        );
        let due = waits.take_due(true, Duration::from_secs(60));
        let ids: Vec<&str> = due
            .iter()
            .map(|o| o.result.assignment_id.as_str())
            .collect();
        assert_eq!(ids, ["b", "c"]);
        assert!(waits.is_empty());
        assert_eq!(waits.bytes.load(Ordering::Acquire), 0);
        assert!(waits.take_due(false, Duration::ZERO).is_empty());
    }
}
