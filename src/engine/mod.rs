//! The engine: three fixed pools of OS threads pulling steps from crossbeam
//! channels, the retry/timeout loop, and the assignment table.
//!
//! Data flows one way: [`Engine::submit`] → channel → pool thread → block →
//! [`ExecResult`] → result sinks. The engine reports what happened to an
//! [`Observer`]; it never touches metrics or transports itself.
//!
//! Shutdown follows crossbeam's disconnection rule: dropping the senders lets
//! the pool threads drain their queues and then see `recv()` fail.

mod budget;
mod retry;
mod step;
mod tracker;

pub use budget::RetryBudget;
pub use retry::{backoff, cp1_delay, is_retryable};
pub use tracker::Lookup;

use crate::blocks::{BlockError, BlockSettings, Blocks, FsTimeouts, SetupError, TimeoutPhase};
use crate::cancel::{CancelReason, CancelToken};
use crate::config::Settings;
use crate::contract::{
    Assignment, ExecResult, JobType, Outcome, PoolKind, RejectReason, StepStats,
};
use crate::telemetry::logging;
use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracker::Tracker;

/// Receives every result exactly once, right after it is recorded.
pub trait ResultSink: Send + Sync {
    /// Called on a pool thread (or the shutdown thread); keep it short.
    fn deliver(&self, result: &Arc<ExecResult>);
}

/// A finished step, as reported to the [`Observer`].
#[derive(Debug)]
pub struct StepReport<'a> {
    /// The assignment.
    pub assignment: &'a Assignment,
    /// Its result.
    pub result: &'a ExecResult,
    /// Acceptance → result (queue included).
    pub flow_duration: Duration,
}

/// Outcome events of the engine. Every method has an empty default, so an
/// observer implements only what it records. Calls happen on hot paths:
/// implementations must not block.
pub trait Observer: Send + Sync {
    /// An assignment was accepted (`duplicate: true` for a re-send).
    fn accepted(&self, _job: JobType, _duplicate: bool) {}
    /// An assignment was rejected, at intake or for load/shutdown.
    fn rejected(&self, _reason: RejectReason) {}
    /// A pool thread took a step off its queue after `waited`.
    fn dequeued(&self, _pool: PoolKind, _waited: Duration) {}
    /// A retry is about to start (after its backoff).
    fn retry(&self, _job: JobType) {}
    /// The process retry budget denied a retry.
    fn retry_budget_denied(&self, _job: JobType) {}
    /// A timeout happened in `phase`.
    fn timeout(&self, _job: JobType, _phase: TimeoutPhase) {}
    /// A step finished (called once per accepted assignment).
    fn finished(&self, _report: &StepReport<'_>) {}
}

/// An observer that records nothing (metrics off).
#[derive(Debug, Default)]
pub struct NoopObserver;

impl Observer for NoopObserver {}

/// What [`Engine::submit`] does when the pool's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backpressure {
    /// Reject at once with `queue_full` (the ingress).
    Reject,
    /// Wait for space (`caf-worker run`).
    Wait,
}

/// The answer to a submission. A refused assignment is handed back, so the
/// caller still has it for the Ack (as crossbeam's `TrySendError::Full(T)`).
#[derive(Debug)]
pub enum Admission {
    /// Queued; exactly one result will follow.
    Accepted(Arc<StepHandle>),
    /// Already queued, running or retained; not executed again.
    Duplicate(Box<Assignment>),
    /// Refused for load or shutdown; no result will follow.
    Rejected(Box<Assignment>, RejectReason),
}

/// The outcome of a cancel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The step will end `cancelled` (queued: at once; running: at the next boundary).
    Requested,
    /// It already has a result.
    AlreadyFinished,
    /// No such assignment (or aged out of retention).
    Unknown,
}

/// Live numbers of one pool, for health and gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Which pool.
    pub kind: PoolKind,
    /// Configured threads.
    pub threads: usize,
    /// Threads still alive.
    pub alive: usize,
    /// Steps waiting in the channel.
    pub queued: usize,
    /// Channel bound (`None`: unbounded, CP1).
    pub capacity: Option<usize>,
    /// Threads executing a step.
    pub active: usize,
}

/// A step between acceptance and result, shared by its queue entry, the
/// table and the thread running it.
#[derive(Debug)]
pub struct StepHandle {
    /// The validated assignment.
    pub assignment: Assignment,
    /// Set by cancel requests and shutdown.
    pub cancel: CancelToken,
    /// When it was accepted.
    pub accepted_at: Instant,
    /// Acceptance + `deadline_ms` (or the default).
    pub deadline: Instant,
    attempts: AtomicU32,
    pub(crate) started: OnceLock<Instant>,
}

struct Pool {
    kind: PoolKind,
    threads: usize,
    capacity: Option<usize>,
    sender: RwLock<Option<Sender<Arc<StepHandle>>>>,
    receiver: Receiver<Arc<StepHandle>>,
    active: AtomicUsize,
    alive: AtomicUsize,
}

pub(crate) struct Shared {
    settings: Settings,
    blocks: Blocks,
    tracker: Tracker,
    budget: RetryBudget,
    observer: Arc<dyn Observer>,
    sinks: Vec<Arc<dyn ResultSink>>,
    pools: [Pool; 3],
    draining: AtomicBool,
    /// `finish` calls between recording a result and delivering it.
    finishing: AtomicUsize,
}

/// The running engine. Cloning shares it.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    threads: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    exited: Receiver<()>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("worker_id", &self.shared.settings.worker_id)
            .finish_non_exhaustive()
    }
}

/// The result of [`Engine::shutdown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Steps still pending when the grace period ended (now `cancelled`).
    pub cancelled: usize,
    /// Whether every pool thread exited within the grace period.
    pub drained: bool,
}

impl Engine {
    /// Builds the blocks and starts every pool thread.
    pub fn start(
        settings: &Settings,
        observer: Arc<dyn Observer>,
        sinks: Vec<Arc<dyn ResultSink>>,
    ) -> Result<Engine, SetupError> {
        let blocks = Blocks::new(&BlockSettings {
            fs_root: settings.fs_root.clone(),
            fs_watchdog: settings.flags.complete_timeout,
            fs_timeouts: FsTimeouts {
                read: settings.fs_read_timeout,
                write: settings.fs_write_timeout,
                delete: settings.fs_delete_timeout,
            },
            max_response_bytes: settings.max_response_bytes,
            http_max_idle_per_host: settings.pool_sizes.iter().sum(),
        })?;
        let capacity = settings
            .flags
            .queue_management
            .then_some(settings.max_queue_size);
        let pools = PoolKind::ALL.map(|kind| {
            let (tx, rx) = match capacity {
                Some(n) => crossbeam_channel::bounded(n),
                None => crossbeam_channel::unbounded(),
            };
            Pool {
                kind,
                threads: settings.pool_sizes[kind.index()],
                capacity,
                sender: RwLock::new(Some(tx)),
                receiver: rx,
                active: AtomicUsize::new(0),
                alive: AtomicUsize::new(0),
            }
        });
        let shared = Arc::new(Shared {
            budget: RetryBudget::new(
                settings.retry_budget_percent,
                settings.retry_budget_min_per_sec,
            ),
            tracker: Tracker::new(settings.result_retention),
            settings: settings.clone(),
            blocks,
            observer,
            sinks,
            pools,
            draining: AtomicBool::new(false),
            finishing: AtomicUsize::new(0),
        });
        let (exit_tx, exit_rx) = crossbeam_channel::unbounded();
        let mut handles = Vec::new();
        for pool in &shared.pools {
            for i in 0..pool.threads {
                let shared = shared.clone();
                let kind = pool.kind;
                let exit_tx = exit_tx.clone();
                pool.alive.fetch_add(1, Ordering::AcqRel);
                let spawned = std::thread::Builder::new()
                    .name(format!("caf-{}-{i}", kind.as_str()))
                    .spawn(move || worker_loop(&shared, kind, exit_tx));
                match spawned {
                    Ok(h) => handles.push(h),
                    Err(e) => {
                        pool.alive.fetch_sub(1, Ordering::AcqRel);
                        return Err(SetupError {
                            setting: "WORKER_*_POOL_SIZE",
                            reason: format!("cannot spawn a {} pool thread: {e}", kind.as_str()),
                        });
                    }
                }
            }
        }
        if settings.flags.complete_timeout {
            let weak = Arc::downgrade(&shared);
            let spawned = std::thread::Builder::new()
                .name("caf-deadlines".into())
                .spawn(move || reap_expired(&weak));
            if let Err(e) = spawned {
                log::error!(error = e.to_string(); "cannot start the deadline thread; queued steps past their deadline are answered when dequeued");
            }
        }
        Ok(Engine {
            shared,
            threads: Arc::new(std::sync::Mutex::new(handles)),
            exited: exit_rx,
        })
    }

    /// The worker id stamped on acks and results.
    pub fn worker_id(&self) -> &str {
        &self.shared.settings.worker_id
    }

    /// The settings the engine runs with.
    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// The blocks (for health checks).
    pub fn blocks(&self) -> &Blocks {
        &self.shared.blocks
    }

    /// Accepts `a` onto its pool's queue, or says why not.
    pub fn submit(&self, a: Assignment, mode: Backpressure) -> Admission {
        let admission = self.admit(a, mode);
        let obs = &self.shared.observer;
        match &admission {
            Admission::Accepted(h) => obs.accepted(h.assignment.job_type, false),
            Admission::Duplicate(a) => obs.accepted(a.job_type, true),
            Admission::Rejected(_, reason) => obs.rejected(*reason),
        }
        admission
    }

    fn admit(&self, a: Assignment, mode: Backpressure) -> Admission {
        if self.shared.draining.load(Ordering::Acquire) {
            return Admission::Rejected(Box::new(a), RejectReason::ShuttingDown);
        }
        let accepted_at = Instant::now();
        let budget = a
            .deadline_ms
            .map_or(self.shared.settings.default_deadline, Duration::from_millis);
        let pool = &self.shared.pools[a.pool.index()];
        let handle = Arc::new(StepHandle {
            deadline: accepted_at + budget,
            assignment: a,
            cancel: CancelToken::new(),
            accepted_at,
            attempts: AtomicU32::new(0),
            started: OnceLock::new(),
        });
        let sender = pool
            .sender
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(sender) = sender else {
            return Admission::Rejected(
                Box::new(unwrap_handle(handle)),
                RejectReason::ShuttingDown,
            );
        };
        match mode {
            Backpressure::Reject => {
                let enqueue = || {
                    sender.try_send(handle.clone()).map_err(|e| match e {
                        TrySendError::Full(_) => RejectReason::QueueFull,
                        TrySendError::Disconnected(_) => RejectReason::ShuttingDown,
                    })
                };
                match self.shared.tracker.insert_with(&handle, enqueue) {
                    Ok(true) => Admission::Accepted(handle),
                    Ok(false) => Admission::Duplicate(Box::new(unwrap_handle(handle))),
                    Err(reason) => Admission::Rejected(Box::new(unwrap_handle(handle)), reason),
                }
            }
            Backpressure::Wait => {
                // A blocking send cannot run under the table lock. Only `run`
                // waits, from one thread, with no cancel route; the deadline
                // thread may answer the step meanwhile, which `refuse` respects.
                if !self.shared.tracker.insert(&handle) {
                    return Admission::Duplicate(Box::new(unwrap_handle(handle)));
                }
                loop {
                    match sender.send_timeout(handle.clone(), Duration::from_millis(50)) {
                        Ok(()) => return Admission::Accepted(handle),
                        Err(SendTimeoutError::Timeout(_)) if !self.is_draining() => {}
                        Err(_) => return self.refuse(handle, RejectReason::ShuttingDown),
                    }
                }
            }
        }
    }

    /// Withdraws a registered step that could not be queued. If it already
    /// has a result (the deadline thread answered it while `run` waited for
    /// queue space), it stays accepted: one assignment, one answer.
    fn refuse(&self, handle: Arc<StepHandle>, reason: RejectReason) -> Admission {
        if self.shared.tracker.remove_pending(&handle) {
            Admission::Rejected(Box::new(unwrap_handle(handle)), reason)
        } else {
            Admission::Accepted(handle)
        }
    }

    /// Reports an intake rejection that never reached [`Engine::submit`].
    pub fn note_rejection(&self, reason: RejectReason) {
        self.shared.observer.rejected(reason);
    }

    /// The result or state of an assignment.
    pub fn lookup(&self, id: &str) -> Lookup {
        self.shared.tracker.lookup(id)
    }

    /// Waits up to `timeout` for the result of a pending assignment.
    pub fn wait_result(&self, id: &str, timeout: Duration) -> Lookup {
        self.shared.tracker.wait(id, timeout)
    }

    /// Requests cancellation. A step still queued ends `cancelled` at once
    /// and never runs; a running one stops at its next attempt boundary or
    /// sleep slice.
    pub fn cancel(&self, id: &str) -> CancelOutcome {
        let Some(h) = self.shared.tracker.pending(id) else {
            return match self.shared.tracker.lookup(id) {
                Lookup::Done(_) => CancelOutcome::AlreadyFinished,
                _ => CancelOutcome::Unknown,
            };
        };
        h.cancel.cancel(CancelReason::User);
        // Pairs with the fence in `step::run`: see the comment there. If the
        // token already held another reason (deadline, shutdown), whoever set
        // it gives the answer.
        std::sync::atomic::fence(Ordering::SeqCst);
        if h.started.get().is_none() && h.cancel.reason() == Some(CancelReason::User) {
            self.shared.finish_cancelled(&h);
        }
        CancelOutcome::Requested
    }

    /// Takes back a step that has not started: it will never run and gets no
    /// result (its id is forgotten). For a transport that hands the work back
    /// to its source instead (JetStream `-NAK` at shutdown, SPEC §13.3).
    /// `false` if it is unknown, finished, already cancelled or running.
    pub fn withdraw_unstarted(&self, id: &str) -> bool {
        let Some(h) = self.shared.tracker.pending(id) else {
            return false;
        };
        if h.started.get().is_some() || !h.cancel.cancel(CancelReason::Shutdown) {
            return false;
        }
        // The same handshake as `cancel`: a pool thread that starts the step
        // now sees the token and ends it at once; its answer then finds the
        // id gone from the table and is dropped.
        std::sync::atomic::fence(Ordering::SeqCst);
        self.shared.tracker.remove_pending(&h)
    }

    /// Room for new work per pool (indexed by [`PoolKind::index`]): free
    /// queue slots plus idle threads. Unbounded queues (queue management off)
    /// count `WORKER_MAX_QUEUE_SIZE` as their bound, so a puller still holds
    /// no more than that.
    pub fn room(&self) -> [usize; 3] {
        if self.is_draining() {
            return [0; 3];
        }
        let bound = self.shared.settings.max_queue_size;
        self.pool_stats().map(|p| {
            let idle = p.threads.saturating_sub(p.active);
            idle + p.capacity.unwrap_or(bound).saturating_sub(p.queued)
        })
    }

    /// Live per-pool numbers.
    pub fn pool_stats(&self) -> [PoolStats; 3] {
        self.shared.pools.each_ref().map(|p| PoolStats {
            kind: p.kind,
            threads: p.threads,
            alive: p.alive.load(Ordering::Acquire),
            queued: p.receiver.len(),
            capacity: p.capacity,
            active: p.active.load(Ordering::Acquire),
        })
    }

    /// Steps accepted and not yet finished.
    pub fn pending_count(&self) -> usize {
        self.shared.tracker.pending_count()
    }

    /// True once [`Engine::begin_shutdown`] was called.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// Stops intake: later submissions are rejected `shutting_down`, and the
    /// pool threads exit once their queues are empty.
    pub fn begin_shutdown(&self) {
        self.shared.draining.store(true, Ordering::Release);
        for p in &self.shared.pools {
            p.sender.write().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    /// Drains for up to `grace`, then ends every step still pending as
    /// `cancelled` (retryable), so each accepted assignment has one result.
    pub fn shutdown(&self, grace: Duration) -> ShutdownReport {
        self.shutdown_with(grace, || {})
    }

    /// [`Engine::shutdown`], calling `grace_over` when the grace period ended
    /// with steps still running, just before they are cancelled (a transport
    /// that hands such steps back rather than answer them marks them here).
    pub fn shutdown_with(&self, grace: Duration, grace_over: impl FnOnce()) -> ShutdownReport {
        self.begin_shutdown();
        let deadline = Instant::now() + grace;
        let total: usize = self.shared.pools.iter().map(|p| p.threads).sum();
        let mut exited = 0;
        while exited < total && self.exited.recv_deadline(deadline).is_ok() {
            exited += 1;
        }
        let drained = exited == total;
        let mut cancelled = 0;
        if !drained {
            grace_over();
            for h in self.shared.tracker.all_pending() {
                h.cancel.cancel(CancelReason::Shutdown);
                if self.shared.finish_cancelled(&h) {
                    cancelled += 1;
                }
            }
        } else {
            let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
            for t in threads.drain(..) {
                let _ = t.join();
            }
        }
        self.quiesce(Duration::from_secs(2));
        ShutdownReport { cancelled, drained }
    }

    /// Waits (up to `limit`) until every result already recorded has been
    /// handed to the sinks: a pool or deadline thread may be between the two.
    /// Bounded because sinks are quick, but a stuck disk must not stop an exit.
    pub fn quiesce(&self, limit: Duration) {
        let until = Instant::now() + limit;
        while self.shared.finishing.load(Ordering::Acquire) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn unwrap_handle(handle: Arc<StepHandle>) -> Assignment {
    Arc::try_unwrap(handle)
        .map(|h| h.assignment)
        .unwrap_or_else(|h| h.assignment.clone())
}

impl Shared {
    /// Records a result and hands it to the sinks and the observer, once.
    fn finish(&self, h: &StepHandle, outcome: Outcome, stats: StepStats) -> bool {
        let result = Arc::new(ExecResult::new(
            &h.assignment,
            outcome,
            stats,
            &self.settings.worker_id,
        ));
        let _in_flight = InFlight::enter(&self.finishing);
        if !self.tracker.complete(h, &result) {
            return false;
        }
        for sink in &self.sinks {
            sink.deliver(&result);
        }
        self.observer.finished(&StepReport {
            assignment: &h.assignment,
            result: &result,
            flow_duration: h.accepted_at.elapsed(),
        });
        if result.status != crate::contract::Status::Success {
            let _ctx = logging::enter(logging::LogContext::of(&h.assignment));
            log::debug!(
                status = result.status.as_str(),
                error_code = result.error_code.map(|c| c.as_str()),
                attempts = result.attempts;
                "step finished without success: {}",
                result.error_message.as_deref().unwrap_or("")
            );
        }
        true
    }

    /// Ends a pending step as `cancelled` from outside its pool thread.
    /// The outcome follows the reason the token holds (the first one set).
    fn finish_cancelled(&self, h: &StepHandle) -> bool {
        let stats = stats_so_far(h);
        let reason = h.cancel.reason().unwrap_or(CancelReason::User);
        let e = BlockError::cancelled(reason);
        let outcome = Outcome::Failure {
            code: e.code,
            message: e.message,
            retryable: true,
            outputs: None,
        };
        self.finish(h, outcome, stats)
    }
}

/// How often queued steps are checked against their deadlines (CP2).
const REAP_INTERVAL: Duration = Duration::from_millis(50);

/// Answers queued steps whose deadline passed (CP2 timeouts) at the deadline,
/// not when a pool thread finally reaches them. Claims a step the way a
/// cancel does (token, fence, "started" check: see `step::run`), so a step a
/// pool thread already started is never answered here. Ends when the engine
/// is gone.
fn reap_expired(weak: &std::sync::Weak<Shared>) {
    loop {
        std::thread::sleep(REAP_INTERVAL);
        let Some(shared) = weak.upgrade() else { return };
        for h in shared.tracker.expired_unstarted(Instant::now()) {
            if !h.cancel.cancel(CancelReason::Deadline) {
                continue; // cancelled, shut down or claimed first: that answer stands
            }
            // Whoever sets the token counts the timeout (here or in
            // `step::run`), so it is counted once, whoever gives the answer:
            // a pool thread that started meanwhile sees this token and ends
            // the step `timeout` itself.
            shared
                .observer
                .timeout(h.assignment.job_type, TimeoutPhase::Deadline);
            std::sync::atomic::fence(Ordering::SeqCst);
            if h.started.get().is_some() {
                continue;
            }
            shared.finish(&h, step::queued_past_deadline(), stats_so_far(&h));
        }
    }
}

/// Attempts and timings of a step as far as it got (it may still be running).
fn stats_so_far(h: &StepHandle) -> StepStats {
    let now = Instant::now();
    match h.started.get() {
        Some(start) => StepStats {
            attempts: h.attempts.load(Ordering::Acquire),
            latency_ms: now.saturating_duration_since(*start).as_millis() as u64,
            queue_ms: start.saturating_duration_since(h.accepted_at).as_millis() as u64,
        },
        None => StepStats {
            attempts: 0,
            latency_ms: 0,
            queue_ms: now.saturating_duration_since(h.accepted_at).as_millis() as u64,
        },
    }
}

/// Counts a `finish` in progress (between recording a result and handing it
/// to the sinks), so shutdown can wait until every recorded result is out.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicUsize) -> InFlight<'a> {
        counter.fetch_add(1, Ordering::AcqRel);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Decrements the pool's live-thread count when the thread ends, even by panic.
struct AliveGuard<'a>(&'a AtomicUsize, Sender<()>);

impl Drop for AliveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        let _ = self.1.send(());
    }
}

fn worker_loop(shared: &Shared, kind: PoolKind, exit: Sender<()>) {
    let pool = &shared.pools[kind.index()];
    let _alive = AliveGuard(&pool.alive, exit);
    for handle in pool.receiver.iter() {
        pool.active.fetch_add(1, Ordering::AcqRel);
        shared.observer.dequeued(kind, handle.accepted_at.elapsed());
        let _ctx = logging::enter(logging::LogContext::of(&handle.assignment));
        // The step loop already catches block panics; this catch covers the
        // engine's own code so a bug cannot kill the thread or lose the result.
        let ran = catch_unwind(AssertUnwindSafe(|| step::run(shared, &handle)));
        pool.active.fetch_sub(1, Ordering::AcqRel);
        let (outcome, stats) = ran.unwrap_or_else(|_| {
            let outcome = Outcome::Failure {
                code: crate::contract::ErrorCode::InternalError,
                message: "internal error while running the step".into(),
                retryable: true,
                outputs: None,
            };
            (outcome, stats_so_far(&handle))
        });
        shared.finish(&handle, outcome, stats);
    }
}
