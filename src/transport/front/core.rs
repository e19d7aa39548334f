//! Core mode (SPEC §13.2): a queue-group subscription on the assign subject,
//! at-most-once. Each message is validated as at the HTTP ingress and
//! answered with an Ack on the ack subject (and its reply subject).

use super::{InHand, SLICE, Shared};
use crate::contract::{Ack, RejectReason};
use crate::engine::{Admission, Backpressure};
use crate::transport::nats::Message;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Threads taking messages off the subscription (parsing is the cost).
pub(super) const INTAKE_THREADS: usize = 2;

/// Messages the assign subscription buffers (beyond it the client drops
/// and counts them, as NATS does for slow consumers). A count, not bytes:
/// with the server's default 1 MiB `max_payload` the worst case is 8 GiB,
/// so keep `max_payload` (and `WORKER_MAX_BODY_BYTES`) sized to the host.
const SUBSCRIPTION_BUFFER: usize = 8192;

/// The intake: owns the subscription and shares its receiver with
/// `INTAKE_THREADS - 1` scoped helpers. At drain the subscription is closed
/// and what it already delivered is still taken (the engine is not draining yet).
pub(super) fn intake_loop(s: &Shared) {
    let sub = loop {
        match s.client.subscribe_with_capacity(
            &s.nats.assign_subject,
            Some(&s.nats.queue_group),
            SUBSCRIPTION_BUFFER,
        ) {
            Ok(sub) => break sub,
            Err(e) => {
                log::warn!(error = e.to_string(); "cannot subscribe to the assign subject; retrying");
                if wait_or_stop(s, Duration::from_millis(500)) {
                    return;
                }
            }
        }
    };
    // Ready once the server has the subscription (PONG after SUB).
    while s.client.flush(Duration::from_secs(2)).is_err() {
        if wait_or_stop(s, Duration::from_millis(100)) {
            return;
        }
    }
    s.intake_ready.store(true, Ordering::Release);
    let rx = sub.receiver().clone();
    std::thread::scope(|scope| {
        for _ in 1..INTAKE_THREADS {
            let rx = rx.clone();
            scope.spawn(move || {
                while !s.draining.load(Ordering::Acquire) {
                    if let Ok(msg) = rx.recv_timeout(SLICE) {
                        take(s, msg);
                    }
                }
            });
        }
        while !s.draining.load(Ordering::Acquire) {
            if let Ok(msg) = rx.recv_timeout(SLICE) {
                take(s, msg);
            }
        }
    });
    sub.unsubscribe();
    while let Ok(msg) = rx.try_recv() {
        take(s, msg);
    }
}

/// Sleeps `d` in slices; `true` if the front is stopping meanwhile.
pub(super) fn wait_or_stop(s: &Shared, d: Duration) -> bool {
    let until = std::time::Instant::now() + d;
    while std::time::Instant::now() < until {
        if s.draining.load(Ordering::Acquire) || s.stop.load(Ordering::Acquire) {
            return true;
        }
        std::thread::sleep(SLICE);
    }
    false
}

/// Validates and submits one message.
fn take(s: &Shared, msg: Message) {
    let Some(engine) = s.engine() else { return };
    let reply = msg.reply.as_deref();
    let (a, traceparent) = match s.intake(&msg) {
        Ok(x) => x,
        Err(r) => return s.reject_invalid(&msg, &r, reply),
    };
    let id = a.assignment_id.clone();
    // Registered before submitting: the result may come back at once.
    let ours = {
        let mut hand = s.hand();
        if hand.contains_key(&id) {
            false
        } else {
            hand.insert(
                id.clone(),
                InHand {
                    traceparent: traceparent.clone(),
                    js: None,
                },
            );
            true
        }
    };
    let worker = &s.worker_id;
    let ack = match engine.submit(a, Backpressure::Reject) {
        Admission::Accepted(h) => Ack::accepted(&h.assignment, worker),
        Admission::Duplicate(a) => {
            if ours {
                s.hand().remove(&id); // the first one's answer stands
            }
            Ack::duplicate(&a, worker)
        }
        Admission::Rejected(a, reason) => {
            if ours {
                s.hand().remove(&id);
            }
            let why = match reason {
                RejectReason::QueueFull => format!(
                    "the {} pool's queue is full (WORKER_MAX_QUEUE_SIZE); retry later",
                    a.pool.as_str()
                ),
                _ => "the worker is shutting down; submit to another worker".to_owned(),
            };
            Ack::refused(&a, reason, &why, worker)
        }
    };
    s.publish_ack(&ack, traceparent.as_deref(), reply);
}
