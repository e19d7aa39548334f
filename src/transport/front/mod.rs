//! The worker's NATS front (SPEC §13), beside the HTTP ingress: takes
//! assignments from the bus, hands them to [`Engine::submit`] and publishes
//! Acks, results, heartbeats and DLQ records. Data flows one way:
//! NATS message → contract (`parse_assignment`) → engine → [`FrontSink`] →
//! result buffer → NATS.
//!
//! - [`core`]: queue-group subscription, at-most-once (§13.2).
//! - [`jetstream`]: durable pull consumer, at-least-once, results PubAcked
//!   before the assignment is ACKed (§13.3).
//! - [`approval`]: `human.approval` decisions, a plain subscription on every
//!   worker in both modes (§14.2, §12.17).
//!
//! Threads (all bounded, all named `caf-nats-*`): one or two intake threads,
//! one decision thread,
//! one result publisher, one housekeeper (connection events, heartbeats,
//! `+WPI`, PubAck time-outs) and, in JetStream mode, one PubAck reader.
//! The front reports to a [`TransportObserver`]; it never touches Prometheus.

mod approval;
mod core;
mod jetstream;
mod message;

pub use jetstream::ensure_streams;
pub use message::{dlq_record, heartbeat, parse_with_headers};

use crate::config::{NatsMode, NatsSettings, Settings};
use crate::contract::{Ack, Assignment, ExecResult, IntakeRules, Rejection};
use crate::engine::{Engine, ResultSink};
use crate::server::{ExtraCheck, HealthCheck};
use crate::telemetry::{Direction, JsAckKind, MessageKind, TransportObserver};
use crate::transport::nats::{self, Client, Event, Headers, Message};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Results kept while the connection is down (SPEC §13.5); beyond it the
/// newest are dropped and counted (JetStream redelivery covers them).
pub const RESULT_BUFFER: usize = 10_000;

/// Serialized bytes of the buffered results, at most: 10,000 results of a
/// few MiB each would otherwise be gigabytes (the buffer holds each result
/// alive even after retention let it go). One result is always taken,
/// whatever its size.
pub const RESULT_BUFFER_BYTES: usize = 64 << 20;

/// Results serialized up to this size are buffered with their JSON line.
const KEEP_JSON_UP_TO: usize = 16 * 1024;
/// How long the drain waits for buffered results, PubAcks and ACKs.
const FINISH_LIMIT: Duration = Duration::from_secs(5);
/// Assignments the pool mix remembers (halved beyond it).
const POOL_MIX_WINDOW: u32 = 256;
/// At most one WARN about publisher pauses this often (it counts the rest).
const PAUSE_LOG_EVERY: Duration = Duration::from_secs(60);
/// Poll slice of the front's threads (how fast they see a stop).
const SLICE: Duration = Duration::from_millis(50);

/// A result on its way out.
#[derive(Debug, Clone)]
struct Outgoing {
    result: Arc<ExecResult>,
    traceparent: Option<String>,
    /// The result as the engine serialized it, when it came that way.
    json: Option<String>,
    /// Its serialized size (counted against [`RESULT_BUFFER_BYTES`]).
    size: usize,
}

impl Outgoing {
    /// `json`: the result's line if the engine serialized it (else it is
    /// serialized here, once, to know its size).
    fn new(result: Arc<ExecResult>, traceparent: Option<String>, json: Option<&str>) -> Outgoing {
        let serialized;
        let json = match json {
            Some(line) => line,
            None => {
                serialized = result.to_json_line();
                serialized.as_str()
            }
        };
        Outgoing {
            size: json.len(),
            // A large result is serialized again when published rather than
            // held twice while it waits in the buffer.
            json: (json.len() <= KEEP_JSON_UP_TO).then(|| json.to_owned()),
            result,
            traceparent,
        }
    }
}

/// A JetStream delivery the worker holds until it ACKs, NAKs or TERMs it.
#[derive(Debug)]
struct JsHold {
    /// The newest delivery (its reply subject is where acks go).
    msg: Message,
    /// Last (re)delivery or `+WPI`.
    progress: Instant,
    /// The result is being published; waiting for its PubAck.
    publishing: bool,
}

/// An assignment taken from NATS, between intake and its final answer.
#[derive(Debug)]
struct InHand {
    traceparent: Option<String>,
    js: Option<JsHold>,
}

/// The bounded result buffer (oldest kept).
#[derive(Default)]
struct Outbox {
    items: Mutex<VecDeque<Outgoing>>,
    /// Sum of the `size` of `items` (changed only under its lock).
    bytes: AtomicUsize,
    ready: Condvar,
    overflow: AtomicU64,
}

/// State shared by the front's threads and its sink.
pub(crate) struct Shared {
    nats: NatsSettings,
    worker_id: String,
    rules: IntakeRules,
    heartbeat_every: Duration,
    observer: Arc<dyn TransportObserver>,
    client: Client,
    engine: OnceLock<Engine>,
    hand: Mutex<HashMap<String, InHand>>,
    outbox: Outbox,
    /// Stop taking work (SIGTERM).
    draining: AtomicBool,
    /// The shutdown grace ended: results of JetStream steps are NAKed, not published.
    grace_over: AtomicBool,
    /// Every thread ends.
    stop: AtomicBool,
    /// The intake is in place on the server (core: SUB confirmed by a
    /// PING/PONG; JetStream: streams, consumer and pull inbox set up).
    intake_ready: AtomicBool,
    /// The approval subscription is confirmed by a PING/PONG.
    approvals_ready: AtomicBool,
    started: Instant,
    /// JetStream publishes waiting for their PubAck, by reply token.
    pubacks: jetstream::PubWaits,
    next_token: AtomicU64,
    /// Reply prefix of PubAcks (`<inbox>.`).
    puback_prefix: String,
    /// Recent assignments per pool (decayed), to weigh the pools' room.
    pool_mix: Mutex<[u32; 3]>,
}

/// The NATS front: start it after the engine, stop it around the engine's shutdown.
pub struct Front {
    shared: Arc<Shared>,
    intake: Vec<JoinHandle<()>>,
    others: Vec<JoinHandle<()>>,
}

/// The engine sink that routes results of NATS assignments to the front.
pub struct FrontSink(Arc<Shared>);

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("mode", &self.shared.nats.mode)
            .finish_non_exhaustive()
    }
}

/// Client options from the settings.
pub fn client_options(nats: &NatsSettings, worker_id: &str) -> Result<nats::Options, nats::Error> {
    let mut opts = nats::Options::from_url_list(&nats.url)?;
    opts.name = worker_id.to_owned();
    opts.ca_file = nats.ca_file.clone();
    Ok(opts)
}

impl Front {
    /// Connects (in the background: an unreachable server is not fatal) and
    /// returns the sink to hand to [`Engine::start`]; call [`Front::start`] next.
    pub fn connect(
        settings: &Settings,
        nats: &NatsSettings,
        observer: Arc<dyn TransportObserver>,
    ) -> Result<FrontSink, nats::Error> {
        let opts = client_options(nats, &settings.worker_id)?;
        let client = Client::start(opts);
        observer.connected(false);
        let puback_prefix = format!("{}.", client.new_inbox());
        let shared = Arc::new(Shared {
            nats: nats.clone(),
            worker_id: settings.worker_id.clone(),
            rules: crate::contract::IntakeRules {
                max_body_bytes: settings.max_body_bytes,
                strict_ids: settings.strict_ids,
                default_deadline_ms: settings.default_deadline.as_millis() as u64,
            },
            heartbeat_every: settings.heartbeat_interval,
            observer,
            client,
            engine: OnceLock::new(),
            hand: Mutex::new(HashMap::new()),
            outbox: Outbox::default(),
            draining: AtomicBool::new(false),
            grace_over: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            intake_ready: AtomicBool::new(false),
            approvals_ready: AtomicBool::new(false),
            started: Instant::now(),
            pubacks: jetstream::PubWaits::default(),
            next_token: AtomicU64::new(1),
            puback_prefix,
            pool_mix: Mutex::new([0; 3]),
        });
        Ok(FrontSink(shared))
    }

    /// Starts taking work for `engine`. The front is a decision channel
    /// (the approval subject), so `human.approval` steps may park even with
    /// the HTTP ingress off.
    pub fn start(sink: &FrontSink, engine: Engine) -> std::io::Result<Front> {
        let shared = sink.0.clone();
        engine.enable_approvals();
        let _ = shared.engine.set(engine);
        let mut front = Front {
            shared: shared.clone(),
            intake: Vec::new(),
            others: Vec::new(),
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name.to_owned()).spawn(f)
        };
        let s = shared.clone();
        front.others.push(spawn(
            "caf-nats-publish",
            Box::new(move || s.publish_loop()),
        )?);
        let s = shared.clone();
        front
            .others
            .push(spawn("caf-nats-house", Box::new(move || s.housekeeping()))?);
        let s = shared.clone();
        front.intake.push(spawn(
            "caf-nats-approval",
            Box::new(move || approval::decision_loop(&s)),
        )?);
        match shared.nats.mode {
            NatsMode::Core => {
                let s = shared.clone();
                front.intake.push(spawn(
                    "caf-nats-in",
                    Box::new(move || core::intake_loop(&s)),
                )?);
            }
            NatsMode::JetStream => {
                let s = shared.clone();
                front
                    .others
                    .push(spawn("caf-nats-puback", Box::new(move || s.puback_loop()))?);
                let s = shared.clone();
                front.intake.push(spawn(
                    "caf-nats-pull",
                    Box::new(move || jetstream::pull_loop(&s)),
                )?);
            }
        }
        Ok(front)
    }

    /// The `nats` health check (SPEC §13.5): connected, and the intake in
    /// place, so a ready worker does not miss a core message published at once.
    pub fn health_check(&self) -> ExtraCheck {
        let shared = self.shared.clone();
        Arc::new(move || {
            let connected = shared.client.is_connected();
            let intake = shared.intake_ready.load(Ordering::Acquire)
                && shared.approvals_ready.load(Ordering::Acquire);
            HealthCheck {
                name: "nats",
                ok: connected && intake,
                detail: if !connected {
                    format!(
                        "not connected to {}",
                        crate::config::redact_url_list(&shared.nats.url)
                    )
                } else if !intake {
                    "connected; setting up the intake".into()
                } else {
                    "ok".into()
                },
            }
        })
    }

    /// SIGTERM, before the engine drains: stop taking work, publish a
    /// `draining` heartbeat, and (JetStream) `-NAK` every step not started.
    pub fn begin_drain(&mut self) {
        self.shared.draining.store(true, Ordering::Release);
        for t in self.intake.drain(..) {
            let _ = t.join();
        }
        self.shared.send_heartbeat("draining");
        if self.shared.nats.mode == NatsMode::JetStream {
            let handed_back = self.shared.nak_unstarted();
            log::info!(handed_back = handed_back; "NATS intake stopped; steps not started were handed back (-NAK)");
        } else {
            log::info!("NATS intake stopped (queue-group subscription closed)");
        }
    }

    /// Called by the engine when the grace ended with steps still running:
    /// their (cancelled) results are not published; JetStream NAKs them.
    pub fn grace_over(&self) {
        self.shared.grace_over.store(true, Ordering::Release);
    }

    /// After the engine stopped: publish what is buffered, wait for PubAcks
    /// (bounded), drain the connection and end every thread.
    pub fn finish(mut self) {
        let until = Instant::now() + FINISH_LIMIT;
        while Instant::now() < until && !self.shared.settled() {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !self.shared.settled() {
            log::warn!(
                buffered = self.shared.outbox_len(),
                in_hand = self.shared.hand().len();
                "NATS drain: not everything was published before the limit (JetStream redelivers the rest)"
            );
        }
        self.shared.stop.store(true, Ordering::Release);
        self.shared.outbox.ready.notify_all();
        for t in self.intake.drain(..).chain(self.others.drain(..)) {
            let _ = t.join();
        }
        self.shared.client.drain(Duration::from_secs(2));
        self.shared.observer.connected(false);
    }
}

/// How many more assignments fit if they arrive in the proportions of `mix`:
/// the scarcest pool, scaled by its share. No history yet: the sum.
fn weighted_room(room: [usize; 3], mix: [u32; 3]) -> usize {
    let total: u64 = mix.iter().map(|m| u64::from(*m)).sum();
    if total == 0 {
        return room.iter().sum();
    }
    room.iter()
        .zip(mix)
        .filter(|(_, m)| *m > 0)
        .map(|(r, m)| (*r as u64 * total / u64::from(m)) as usize)
        .min()
        .unwrap_or(0)
}

/// The stand-in for a result larger than the server's `max_payload`: the
/// same ids, no outputs, `QUOTA_EXCEEDED` (the full result stays retained
/// for the HTTP lookup).
fn too_large(out: &Outgoing, size: usize, max: usize) -> Outgoing {
    let mut r = (*out.result).clone();
    r.status = crate::contract::Status::Error;
    r.outputs = None;
    r.error_code = Some(crate::contract::ErrorCode::QuotaExceeded);
    r.error_message = Some(format!(
        "the result is {size} bytes, more than the NATS server's max_payload ({max}); its outputs were dropped"
    ));
    r.retryable = Some(false);
    Outgoing::new(Arc::new(r), out.traceparent.clone(), None)
}

impl ResultSink for FrontSink {
    fn deliver(&self, result: &Arc<ExecResult>) {
        self.0.deliver(result, None);
    }

    fn deliver_line(&self, result: &Arc<ExecResult>, line: &str) {
        self.0.deliver(result, Some(line));
    }
}

impl Shared {
    fn engine(&self) -> Option<&Engine> {
        self.engine.get()
    }

    fn hand(&self) -> MutexGuard<'_, HashMap<String, InHand>> {
        // Single map operations under the lock: a panic cannot leave it half-updated.
        self.hand.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn outbox_len(&self) -> usize {
        self.outbox
            .items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Nothing left to publish or acknowledge.
    fn settled(&self) -> bool {
        self.outbox_len() == 0 && self.hand().is_empty() && self.pubacks.is_empty()
    }

    /// A result from the engine: ours if the assignment came from NATS.
    /// Queues the result of a NATS assignment for publishing (`json`: its
    /// line as the engine serialized it, so it is not serialized again).
    fn deliver(&self, result: &Arc<ExecResult>, json: Option<&str>) {
        let traceparent = {
            let mut hand = self.hand();
            let Some(entry) = hand.get_mut(&result.assignment_id) else {
                return; // an HTTP assignment: answered there
            };
            match &mut entry.js {
                None => hand
                    .remove(&result.assignment_id)
                    .and_then(|e| e.traceparent),
                Some(js) if self.grace_over.load(Ordering::Acquire) => {
                    // Still running when the grace ended: hand it back, no result.
                    let msg = js.msg.clone();
                    hand.remove(&result.assignment_id);
                    drop(hand);
                    self.js_ack(&msg, JsAckKind::Nak);
                    return;
                }
                Some(js) if js.publishing => return,
                Some(js) => {
                    js.publishing = true;
                    entry.traceparent.clone()
                }
            }
        };
        self.enqueue(Outgoing::new(result.clone(), traceparent, json));
    }

    /// Adds a result to the bounded buffer; a full buffer drops it (counted, logged).
    fn enqueue(&self, out: Outgoing) {
        let mut items = self.outbox.items.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = self.outbox.bytes.load(Ordering::Acquire);
        if items.len() >= RESULT_BUFFER
            || (!items.is_empty() && bytes.saturating_add(out.size) > RESULT_BUFFER_BYTES)
        {
            drop(items);
            let n = self.outbox.overflow.fetch_add(1, Ordering::AcqRel) + 1;
            if n.is_power_of_two() {
                log::warn!(
                    assignment_id = out.result.assignment_id.as_str(),
                    dropped_total = n;
                    "NATS result buffer full ({RESULT_BUFFER} results or {} MiB); result dropped (JetStream redelivers, core loses it)",
                    RESULT_BUFFER_BYTES >> 20
                );
            }
            // JetStream: forget the held message (no +WPI for it), so its
            // redelivery after ack_wait publishes the retained result.
            let mut hand = self.hand();
            if hand
                .get(&out.result.assignment_id)
                .is_some_and(|e| e.js.is_some())
            {
                hand.remove(&out.result.assignment_id);
            }
            return;
        }
        self.outbox.bytes.fetch_add(out.size, Ordering::AcqRel);
        items.push_back(out);
        self.observer.buffered(items.len());
        drop(items);
        self.outbox.ready.notify_one();
    }

    /// Puts results back at the front, in order (the connection dropped).
    fn requeue_front(&self, mut back: Vec<Outgoing>) {
        let mut items = self.outbox.items.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(o) = back.pop() {
            self.outbox.bytes.fetch_add(o.size, Ordering::AcqRel);
            items.push_front(o);
        }
        self.observer.buffered(items.len());
    }

    /// Counts an incoming assignment and validates it as the HTTP ingress
    /// does; returns it with its `traceparent` header.
    fn intake(&self, msg: &Message) -> Result<(Assignment, Option<String>), Rejection> {
        self.observer.message(Direction::In, MessageKind::Assign);
        let a = parse_with_headers(&msg.payload, msg.headers.as_ref(), &self.rules)?;
        let traceparent = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("traceparent"))
            .map(str::to_owned);
        Ok((a, traceparent))
    }

    /// Headers of an Ack or result (SPEC §13.4).
    fn headers(
        tenant_id: Option<&str>,
        trace_id: Option<&str>,
        traceparent: Option<&str>,
    ) -> Headers {
        let mut h = Headers::new();
        h.insert("version", "1");
        if let Some(t) = tenant_id {
            h.insert("tenant_id", t);
        }
        if let Some(t) = trace_id {
            h.insert("trace_id", t);
        }
        if let Some(t) = traceparent {
            h.insert("traceparent", t);
        }
        h
    }

    /// The result publisher: sends buffered results while connected.
    fn publish_loop(&self) {
        const BATCH: usize = 256;
        let mut batch = Vec::with_capacity(BATCH);
        // Pauses at the PubAck byte bound (results waiting, connected): this
        // one counted, how many since the last WARN, and when that was.
        let (mut pause_counted, mut pauses, mut logged_at) = (false, 0u64, None::<Instant>);
        loop {
            {
                let mut items = self.outbox.items.lock().unwrap_or_else(|p| p.into_inner());
                // Paused too while too many bytes wait for PubAcks (JetStream).
                while (items.is_empty() || !self.client.is_connected() || self.pubacks.full())
                    && !self.stop.load(Ordering::Acquire)
                {
                    let pausing =
                        self.pubacks.full() && !items.is_empty() && self.client.is_connected();
                    if pausing && !pause_counted {
                        pause_counted = true;
                        pauses += 1;
                        if logged_at.is_none_or(|t| t.elapsed() >= PAUSE_LOG_EVERY) {
                            logged_at = Some(Instant::now());
                            let buffered = items.len();
                            drop(items); // Not held while stderr is written.
                            log::warn!(
                                pauses = std::mem::take(&mut pauses),
                                buffered = buffered;
                                "{} MiB of results wait for their JetStream PubAck: publishing paused until PubAcks or their time-out (WORKER_NATS_PUBACK_TIMEOUT_MS) free room",
                                jetstream::PUBACK_WAIT_BYTES >> 20
                            );
                            items = self.outbox.items.lock().unwrap_or_else(|p| p.into_inner());
                            continue;
                        }
                    }
                    items = self
                        .outbox
                        .ready
                        .wait_timeout(items, SLICE)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                if self.stop.load(Ordering::Acquire) && items.is_empty() {
                    return;
                }
                if self.stop.load(Ordering::Acquire) && !self.client.is_connected() {
                    return;
                }
                pause_counted = false;
                let n = items.len().min(BATCH);
                batch.extend(items.drain(..n));
                let sent: usize = batch.iter().map(|o| o.size).sum();
                self.outbox.bytes.fetch_sub(sent, Ordering::AcqRel);
                self.observer.buffered(items.len());
            }
            let mut sent = 0;
            for out in &batch {
                let paused = self.pubacks.full() && !self.stop.load(Ordering::Acquire);
                if paused || self.publish_result(out).is_err() {
                    break;
                }
                sent += 1;
            }
            if sent < batch.len() {
                self.requeue_front(batch.split_off(sent));
            }
            batch.clear();
        }
    }

    /// Publishes one result; JetStream: with a reply inbox for its PubAck.
    fn publish_result(&self, out: &Outgoing) -> Result<(), nats::Error> {
        let r = &out.result;
        let mut h = Self::headers(
            Some(&r.tenant_id),
            r.trace_id.as_deref(),
            out.traceparent.as_deref(),
        );
        h.insert("Nats-Msg-Id", &r.assignment_id);
        let serialized;
        let payload = match &out.json {
            Some(line) => line.as_str(),
            None => {
                serialized = r.to_json_line();
                serialized.as_str()
            }
        };
        let subject = &self.nats.result_subject;
        let sent = match self.nats.mode {
            NatsMode::Core => {
                self.client
                    .publish_with_headers(subject, None, &h, payload.as_bytes())
            }
            NatsMode::JetStream => {
                let token = self.next_token.fetch_add(1, Ordering::Relaxed);
                let reply = format!("{}{token}", self.puback_prefix);
                self.pubacks.insert(token, out.clone());
                let sent =
                    self.client
                        .publish_with_headers(subject, Some(&reply), &h, payload.as_bytes());
                if sent.is_err() {
                    self.pubacks.remove(token);
                }
                sent
            }
        };
        match sent {
            Ok(()) => {
                self.observer.message(Direction::Out, MessageKind::Result);
                Ok(())
            }
            // The connection is gone: the caller buffers it again.
            Err(e @ (nats::Error::NotConnected | nats::Error::Closed | nats::Error::Io(_))) => {
                Err(e)
            }
            Err(nats::Error::PayloadTooLarge { size, max }) => {
                self.publish_result(&too_large(out, size, max))
            }
            Err(e) => {
                // Not a connection problem: publishing it again would fail
                // the same way. JetStream redelivers (up to max_deliver).
                log::error!(
                    assignment_id = r.assignment_id.as_str(),
                    error = e.to_string();
                    "cannot publish a result; dropped"
                );
                self.hand().remove(&r.assignment_id);
                Ok(())
            }
        }
    }

    /// Publishes an Ack on the ack subject (and to `reply` when given).
    fn publish_ack(&self, ack: &Ack, traceparent: Option<&str>, reply: Option<&str>) {
        let h = Self::headers(
            ack.tenant_id.as_deref(),
            ack.trace_id.as_deref(),
            traceparent,
        );
        let body = serde_json::to_vec(ack).unwrap_or_default();
        for subject in std::iter::once(self.nats.ack_subject.as_str()).chain(reply) {
            match self.client.publish_with_headers(subject, None, &h, &body) {
                Ok(()) => self.observer.message(Direction::Out, MessageKind::Ack),
                Err(e) => log::debug!(error = e.to_string(); "cannot publish an Ack"),
            }
        }
    }

    /// An invalid message: rejected Ack and DLQ record (never the payload).
    fn reject_invalid(&self, msg: &Message, r: &Rejection, reply: Option<&str>) {
        if let Some(e) = self.engine() {
            e.note_rejection(r.reason);
        }
        let ack = Ack::rejected(r, &self.worker_id);
        let traceparent = msg.headers.as_ref().and_then(|h| h.get("traceparent"));
        self.publish_ack(&ack, traceparent, reply);
        let record = dlq_record(msg, r, &self.worker_id);
        let h = Self::headers(
            r.ids.tenant_id.as_deref(),
            r.ids.trace_id.as_deref(),
            traceparent,
        );
        match self.client.publish_with_headers(
            &self.nats.dlq_subject,
            None,
            &h,
            record.to_string().as_bytes(),
        ) {
            Ok(()) => self.observer.message(Direction::Out, MessageKind::Dlq),
            Err(e) => log::warn!(error = e.to_string(); "cannot publish a DLQ record"),
        }
        log::debug!(reason = r.reason.as_str(); "NATS assignment rejected: {}", r.message);
    }

    /// Sends a JetStream acknowledgement and counts it.
    fn js_ack(&self, msg: &Message, kind: JsAckKind) {
        let sent = match kind {
            JsAckKind::Ack => nats::jetstream::ack(&self.client, msg),
            JsAckKind::Nak => nats::jetstream::nak(&self.client, msg, None),
            JsAckKind::Term => nats::jetstream::term(&self.client, msg),
            JsAckKind::InProgress => nats::jetstream::in_progress(&self.client, msg),
        };
        match sent {
            Ok(()) => self.observer.js_ack(kind),
            Err(e) => {
                log::debug!(kind = kind.as_str(), error = e.to_string(); "cannot send a JetStream acknowledgement")
            }
        }
    }

    /// Publishes one heartbeat.
    fn send_heartbeat(&self, status: &str) {
        let Some(engine) = self.engine() else { return };
        let body = heartbeat(engine, self.nats.mode, status, self.started.elapsed());
        let h = Self::headers(None, None, None);
        match self.client.publish_with_headers(
            &self.nats.heartbeat_subject,
            None,
            &h,
            body.to_string().as_bytes(),
        ) {
            Ok(()) => self
                .observer
                .message(Direction::Out, MessageKind::Heartbeat),
            Err(e) => log::debug!(error = e.to_string(); "cannot publish a heartbeat"),
        }
    }

    /// Connection events, heartbeats, `+WPI` and PubAck time-outs.
    fn housekeeping(&self) {
        let events = self.client.events();
        let mut next_beat = Instant::now();
        let mut was_up = false;
        while !self.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            if now >= next_beat {
                if !self.draining.load(Ordering::Acquire) && self.client.is_connected() {
                    self.send_heartbeat("ready");
                }
                next_beat = now + self.heartbeat_every;
            }
            let wait = next_beat.saturating_duration_since(now).min(SLICE);
            if let Ok(ev) = events.recv_timeout(wait) {
                self.on_event(ev);
            }
            let up = self.client.is_connected();
            if up != was_up {
                self.observer.connected(up);
                was_up = up;
            }
            if self.nats.mode == NatsMode::JetStream {
                self.keep_in_progress();
                self.retry_pubacks(false);
            }
        }
    }

    fn on_event(&self, ev: Event) {
        match ev {
            Event::Connected { server } => {
                log::debug!(server = server.as_str(); "NATS connected")
            }
            // The client logs connection changes and server errors itself.
            Event::Reconnected { server } => {
                self.observer.reconnected();
                log::debug!(server = server.as_str(); "NATS reconnected");
                if self.nats.mode == NatsMode::JetStream {
                    self.retry_pubacks(true);
                }
            }
            Event::Disconnected { reason } => {
                log::debug!(reason = reason.as_str(); "NATS disconnected; results are buffered until it reconnects")
            }
            Event::ServerError(e) => log::debug!(error = e.as_str(); "NATS server error"),
            Event::LameDuck => log::debug!("NATS server entered lame-duck mode"),
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }

    /// Free room for more work from NATS, counting what is held unanswered.
    /// A message's pool is known only once it is read, so the per-pool room
    /// is weighed by the pools recent assignments went to: with cpu-only
    /// work, the io pool's idle threads do not invite more of it.
    fn room(&self) -> usize {
        let Some(engine) = self.engine() else {
            return 0;
        };
        let held = self.hand().len();
        let mix = *self.pool_mix.lock().unwrap_or_else(|p| p.into_inner());
        weighted_room(engine.room(), mix).min(RESULT_BUFFER.saturating_sub(held))
    }

    /// Counts an assignment towards the pool mix (recent ones weigh most).
    fn note_pool(&self, pool: crate::contract::PoolKind) {
        let mut mix = self.pool_mix.lock().unwrap_or_else(|p| p.into_inner());
        mix[pool.index()] += 1;
        if mix.iter().sum::<u32>() > POOL_MIX_WINDOW {
            for m in mix.iter_mut() {
                *m /= 2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::weighted_room;

    #[test]
    fn room_follows_the_pool_mix() {
        // No history: every pool's room counts.
        assert_eq!(weighted_room([0, 12, 5], [0, 0, 0]), 17);
        // cpu-only work: a full cpu pool means no room, idle io threads or not.
        assert_eq!(weighted_room([0, 12, 5], [100, 0, 0]), 0);
        assert_eq!(weighted_room([3, 12, 5], [100, 0, 0]), 3);
        // Half cpu, half io: twice the scarcer pool's room.
        assert_eq!(weighted_room([3, 12, 5], [50, 50, 0]), 6);
    }
}
