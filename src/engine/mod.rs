//! The engine: three fixed pools of OS threads pulling steps from crossbeam
//! channels, the retry/timeout loop, and the assignment table.
//!
//! Data flows one way: [`Engine::submit`] → channel → pool thread → block →
//! [`ExecResult`] → result sinks. Between attempts a retry parks in the
//! timer map (`parking.rs`) instead of sleeping on its thread, and comes back
//! on its pool's retry channel; a `human.approval` parks there until it is
//! decided (`approvals.rs`). Under CP2 timeouts a queued step waits in its
//! pool's deadline ring (`deadlines.rs`, a min-heap only for a deadline
//! earlier than its ring's latest) that one deadline thread sleeps on.
//! The engine reports what happened to an [`Observer`]; it never touches
//! metrics or transports itself.
//!
//! Shutdown follows crossbeam's disconnection rule: dropping the senders lets
//! the pool threads drain their queues and then see `recv()` fail.

mod approvals;
mod budget;
mod deadlines;
mod parking;
mod retry;
mod step;
mod tracker;

pub use approvals::{ApprovalOutcome, DecideError, Decision, PendingApproval, Verdict};
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
use deadlines::Deadlines;
use parking::{Parked, Parking, TimerKey};
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracker::Tracker;

/// Receives every result exactly once, right after it is recorded.
pub trait ResultSink: Send + Sync {
    /// Called on a pool thread (or the shutdown thread); keep it short.
    fn deliver(&self, result: &Arc<ExecResult>);

    /// [`ResultSink::deliver`] with the result already serialized as one
    /// JSON line (the engine serializes each result once, to size it for
    /// retention); a sink that writes JSON uses `line` instead of
    /// serializing again.
    fn deliver_line(&self, result: &Arc<ExecResult>, line: &str) {
        let _ = line;
        self.deliver(result);
    }

    /// [`ResultSink::deliver_line`] with the line to keep: the engine's
    /// last sink gets it by value, so a sink that holds lines (the `run`
    /// printer's channel) need not copy it.
    fn deliver_owned(&self, result: &Arc<ExecResult>, line: String) {
        self.deliver_line(result, &line);
    }
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
    /// More steps are queued for the pool thread that reports this (and it
    /// calls [`Observer::idle`] when it runs out of work): the observer may
    /// buffer the report until then. Otherwise it publishes it, and
    /// anything this thread buffered, before the result is delivered, so a
    /// scrape that follows a result counts it.
    pub batchable: bool,
}

/// Outcome events of the engine. Every method has an empty default, so an
/// observer implements only what it records. Calls happen on hot paths:
/// implementations must not block.
pub trait Observer: Send + Sync {
    /// An assignment was accepted (`duplicate: true` for a re-send).
    fn accepted(&self, _job: JobType, _duplicate: bool) {}
    /// An assignment was rejected, at intake or for load/shutdown.
    fn rejected(&self, _reason: RejectReason) {}
    /// A pool thread took a step off its queue after `waited`. (Always on a
    /// pool thread: it may be batched until [`Observer::idle`].)
    fn dequeued(&self, _pool: PoolKind, _waited: Duration) {}
    /// The calling pool thread is about to sleep on an empty queue (or is
    /// ending): anything it batched must be published now, so a batch is
    /// never older than the busy spell that made it.
    fn idle(&self) {}
    /// A retry is about to start (after its backoff).
    fn retry(&self, _job: JobType) {}
    /// The process retry budget denied a retry.
    fn retry_budget_denied(&self, _job: JobType) {}
    /// A timeout happened in `phase`.
    fn timeout(&self, _job: JobType, _phase: TimeoutPhase) {}
    /// A step finished (called once per accepted assignment).
    fn finished(&self, _report: &StepReport<'_>) {}
    /// A `human.approval` ended by a decision or its timeout.
    fn approval_decided(&self, _outcome: ApprovalOutcome) {}
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
    /// Threads executing a step (a parked retry is not active).
    pub active: usize,
    /// Retries waiting: parked in their backoff, or due and waiting for a thread.
    pub retries_waiting: usize,
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
    /// A pool thread is executing it (false while queued or parked).
    running: AtomicBool,
    /// Its timer entry while a retry of it is parked.
    park_key: Mutex<Option<TimerKey>>,
    /// Set for a `human.approval` that parks for a decision.
    approval: Option<Box<approvals::ApprovalMeta>>,
}

impl StepHandle {
    fn new(
        assignment: Assignment,
        accepted_at: Instant,
        deadline: Instant,
        approval: Option<Box<approvals::ApprovalMeta>>,
    ) -> StepHandle {
        StepHandle {
            assignment,
            cancel: CancelToken::new(),
            accepted_at,
            deadline,
            attempts: AtomicU32::new(0),
            started: OnceLock::new(),
            running: AtomicBool::new(false),
            park_key: Mutex::new(None),
            approval,
        }
    }
}

impl logging::Correlated for StepHandle {
    fn assignment(&self) -> &Assignment {
        &self.assignment
    }
}

struct Pool {
    kind: PoolKind,
    threads: usize,
    capacity: Option<usize>,
    sender: RwLock<Option<Sender<Arc<StepHandle>>>>,
    receiver: Receiver<Arc<StepHandle>>,
    /// Due retries, taken before the main queue and never full: a retry
    /// already holds its place and is never turned away for `queue_full`.
    retry_tx: Sender<(Arc<StepHandle>, Box<BlockError>)>,
    retry_rx: Receiver<(Arc<StepHandle>, Box<BlockError>)>,
    /// Retries parked or in `retry_rx`; the pool's threads outlive a drain
    /// until it is 0.
    waiting: AtomicUsize,
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
    /// Parked retries and pending approvals (one timer thread).
    parking: Arc<Parking>,
    /// Deadlines of queued steps (CP2 timeouts; one deadline thread).
    deadlines: Arc<Deadlines>,
    /// `human.approval` steps may park (a decision channel exists).
    approvals_enabled: AtomicBool,
    /// Bounds the WARN line of each step that does not succeed.
    failure_lines: logging::RateLimit,
    /// `settings.worker_id`, shared by every result.
    worker_id: Arc<str>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.parking.stop();
        self.deadlines.stop();
    }
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
            pool_threads: settings.pool_sizes.iter().sum(),
            http_deny_nets: settings.http_deny_nets.clone(),
            http_allow_nets: settings.http_allow_nets.clone(),
            sql_root: settings.sql_root.clone(),
            sql_max_rows: settings.sql_max_rows,
            sql_allow_write: settings.sql_allow_write,
            sql_attempt_timeout: settings
                .flags
                .complete_timeout
                .then_some(settings.sql_timeout),
            fs_root_on_demand: settings.fs_root_on_demand,
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
            let (retry_tx, retry_rx) = crossbeam_channel::unbounded();
            Pool {
                kind,
                threads: settings.pool_sizes[kind.index()],
                capacity,
                sender: RwLock::new(Some(tx)),
                receiver: rx,
                retry_tx,
                retry_rx,
                waiting: AtomicUsize::new(0),
                active: AtomicUsize::new(0),
                alive: AtomicUsize::new(0),
            }
        });
        let shared = Arc::new(Shared {
            budget: RetryBudget::new(
                settings.retry_budget_percent,
                settings.retry_budget_min_per_sec,
            ),
            tracker: Tracker::new(
                settings.result_retention,
                settings.result_retention_bytes,
                settings.keep_results,
            ),
            worker_id: Arc::from(settings.worker_id.as_str()),
            settings: settings.clone(),
            blocks,
            observer,
            sinks,
            pools,
            draining: AtomicBool::new(false),
            finishing: AtomicUsize::new(0),
            parking: Arc::new(Parking::new()),
            deadlines: Arc::new(Deadlines::new()),
            approvals_enabled: AtomicBool::new(false),
            failure_lines: logging::RateLimit::new(
                FAILURE_LINES_PER_SEC,
                "WARN lines of steps that did not succeed",
            ),
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
        {
            let weak = Arc::downgrade(&shared);
            let parking = shared.parking.clone();
            std::thread::Builder::new()
                .name("caf-timer".into())
                .spawn(move || timer_loop(&parking, &weak))
                .map_err(|e| SetupError {
                    setting: "WORKER_*_POOL_SIZE",
                    reason: format!("cannot spawn the timer thread: {e}"),
                })?;
        }
        if settings.flags.complete_timeout {
            let weak = Arc::downgrade(&shared);
            let deadlines = shared.deadlines.clone();
            let spawned = std::thread::Builder::new()
                .name("caf-deadlines".into())
                .spawn(move || reap_expired(&deadlines, &weak));
            if let Err(e) = spawned {
                shared.deadlines.stop();
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
        if a.job_type == JobType::HumanApproval
            && self.shared.approvals_enabled.load(Ordering::Acquire)
        {
            // A bad payload goes the ordinary way: the block answers it.
            if let Ok(request) = crate::blocks::approval::parse(&a.payload) {
                return self.admit_approval(a, &request, accepted_at, accepted_at + budget);
            }
        }
        let pool = &self.shared.pools[a.pool.index()];
        let handle = Arc::new(StepHandle::new(a, accepted_at, accepted_at + budget, None));
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
                    Ok(true) => {
                        self.watch_deadline(&handle);
                        Admission::Accepted(handle)
                    }
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
                self.watch_deadline(&handle);
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

    /// Hands a registered step to the deadline thread (CP2 timeouts), which
    /// answers it at its deadline if no pool thread started it by then.
    fn watch_deadline(&self, handle: &Arc<StepHandle>) {
        if self.shared.settings.flags.complete_timeout {
            self.shared.deadlines.push(handle);
        }
    }

    /// Parks a valid approval: no queue, no thread; its timeout is a timer
    /// entry. Beyond `WORKER_MAX_PENDING_APPROVALS` it is refused `queue_full`.
    fn admit_approval(
        &self,
        a: Assignment,
        request: &crate::blocks::approval::ApprovalRequest,
        accepted_at: Instant,
        deadline: Instant,
    ) -> Admission {
        let expires_at = request
            .timeout
            .map_or(deadline, |t| accepted_at.checked_add(t).unwrap_or(deadline))
            .min(deadline);
        let requested_at_ms = crate::time::now_ms();
        let meta = approvals::ApprovalMeta {
            requested_at_ms,
            expires_at_ms: requested_at_ms
                + expires_at
                    .saturating_duration_since(accepted_at)
                    .as_millis() as u64,
            expires_at,
        };
        let handle = Arc::new(StepHandle::new(
            a,
            accepted_at,
            deadline,
            Some(Box::new(meta)),
        ));
        // It "starts" when it parks: one attempt, no queue time.
        let _ = handle.started.set(accepted_at);
        handle.attempts.store(1, Ordering::Release);
        let max = self.shared.settings.max_pending_approvals;
        let park = || {
            self.shared
                .parking
                .park_approval(&handle, expires_at, max)
                .map_err(|refused| match refused {
                    parking::ApprovalRefused::Full => RejectReason::QueueFull,
                    parking::ApprovalRefused::ShuttingDown => RejectReason::ShuttingDown,
                })
        };
        match self.shared.tracker.insert_with(&handle, park) {
            Ok(true) => Admission::Accepted(handle),
            Ok(false) => Admission::Duplicate(Box::new(unwrap_handle(handle))),
            Err(reason) => Admission::Rejected(Box::new(unwrap_handle(handle)), reason),
        }
    }

    /// Withdraws a registered step that could not be queued. If it already
    /// has a result (the deadline thread answered it while `run` waited for
    /// queue space), it stays accepted: one assignment, one answer.
    fn refuse(&self, handle: Arc<StepHandle>, reason: RejectReason) -> Admission {
        // Claimed as a cancel would: the deadline thread, which still holds
        // it, leaves it alone from here on (a claim it made first stands).
        handle.cancel.cancel(CancelReason::Shutdown);
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

    /// The tenant owning assignment `id` while it is pending or retained.
    pub fn tenant_of(&self, id: &str) -> Option<String> {
        self.shared.tracker.tenant_of(id)
    }

    /// Waits up to `timeout` for the result of a pending assignment.
    pub fn wait_result(&self, id: &str, timeout: Duration) -> Lookup {
        self.shared.tracker.wait(id, timeout)
    }

    /// Requests cancellation. A step still queued or parked (a retry in its
    /// backoff) ends `cancelled` at once and never runs again; a running one
    /// stops at its next attempt boundary or sleep slice.
    pub fn cancel(&self, id: &str) -> CancelOutcome {
        let Some(h) = self.shared.tracker.pending(id) else {
            return match self.shared.tracker.lookup(id) {
                Lookup::Done(_) => CancelOutcome::AlreadyFinished,
                _ => CancelOutcome::Unknown,
            };
        };
        h.cancel.cancel(CancelReason::User);
        if h.approval.is_some() {
            // Whoever takes it out of the pending table answers it.
            if self.shared.parking.withdraw(&h) {
                self.shared.finish_cancelled(&h);
            }
            return CancelOutcome::Requested;
        }
        // Pairs with the fence in `step::run`: see the comment there. If the
        // token already held another reason (deadline, shutdown), whoever set
        // it gives the answer.
        std::sync::atomic::fence(Ordering::SeqCst);
        if !h.running.load(Ordering::SeqCst) && h.cancel.reason() == Some(CancelReason::User) {
            self.shared.withdraw_retry(&h);
            self.shared.finish_cancelled(&h);
        }
        CancelOutcome::Requested
    }

    /// Takes back one step that is not running — queued, parked between
    /// attempts, or an approval waiting for a decision: it will never run
    /// again here and gets no result (its id is forgotten). For a transport
    /// that hands the work back to its source instead (JetStream `-NAK` at
    /// shutdown, SPEC §13.3; parked retries too, issue 14). `false` if it is
    /// unknown, finished, already cancelled or running.
    pub fn withdraw_unstarted(&self, id: &str) -> bool {
        match self.shared.tracker.pending(id) {
            Some(h) => self.shared.withdraw(&h),
            None => false,
        }
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
            retries_waiting: p.waiting.load(Ordering::Acquire),
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
    /// Pending approvals end `cancelled` at once: nobody decides during a drain.
    pub fn begin_shutdown(&self) {
        self.shared.draining.store(true, Ordering::Release);
        for p in &self.shared.pools {
            p.sender.write().unwrap_or_else(|e| e.into_inner()).take();
        }
        self.shared.cancel_approvals();
    }

    /// Drains for up to `grace` (queued steps run, and so do parked retries
    /// that come due), then ends every step still pending as `cancelled`
    /// (retryable), so each accepted assignment has one result.
    pub fn shutdown(&self, grace: Duration) -> ShutdownReport {
        self.shutdown_with(grace, &AtomicBool::new(false), || {})
    }

    /// [`Engine::shutdown`], cut short when `stop_now` turns true (a second
    /// Ctrl-C): the pending steps then end `cancelled` at once.
    pub fn shutdown_unless(&self, grace: Duration, stop_now: &AtomicBool) -> ShutdownReport {
        self.shutdown_with(grace, stop_now, || {})
    }

    /// [`Engine::shutdown_unless`], calling `grace_over` when the grace
    /// period ended (or `stop_now` cut it short) with steps still running,
    /// just before they are cancelled (a transport that hands such steps
    /// back rather than answer them marks them here).
    pub fn shutdown_with(
        &self,
        grace: Duration,
        stop_now: &AtomicBool,
        grace_over: impl FnOnce(),
    ) -> ShutdownReport {
        self.begin_shutdown();
        let deadline = Instant::now() + grace;
        let total: usize = self.shared.pools.iter().map(|p| p.threads).sum();
        let mut exited = 0;
        while exited < total && !stop_now.load(Ordering::Acquire) {
            let slice = (Instant::now() + Duration::from_millis(50)).min(deadline);
            match self.exited.recv_deadline(slice) {
                Ok(()) => exited += 1,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => break,
            }
        }
        let drained = exited == total;
        let mut cancelled = 0;
        // Pending approvals were answered by `begin_shutdown`, and parking
        // refuses any after that (`Parking::take_approvals`).
        if !drained {
            grace_over();
            for h in self.shared.tracker.all_pending() {
                if h.approval.is_some() {
                    continue; // being decided right now: its claimer answers
                }
                h.cancel.cancel(CancelReason::Shutdown);
                self.shared.withdraw_retry(&h);
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
        self.shared.failure_lines.flush();
        ShutdownReport { cancelled, drained }
    }

    /// Writes the "N similar lines suppressed" line for WARN lines of
    /// unsuccessful steps still held back (shutdown does this itself).
    pub fn flush_suppressed_logs(&self) {
        self.shared.failure_lines.flush();
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
    /// Takes `h` back if it is not running (see [`Engine::withdraw_unstarted`]):
    /// it gets no result from this worker. True if this call removed it.
    fn withdraw(&self, h: &Arc<StepHandle>) -> bool {
        if h.approval.is_some() {
            if !self.parking.withdraw(h) {
                return false;
            }
        } else {
            if h.running.load(Ordering::SeqCst) || !h.cancel.cancel(CancelReason::Shutdown) {
                return false;
            }
            // Pairs with the fence in `step::run`, as in `Engine::cancel`.
            std::sync::atomic::fence(Ordering::SeqCst);
            if h.running.load(Ordering::SeqCst) {
                return false;
            }
            self.withdraw_retry(h);
        }
        self.tracker.remove_pending(h)
    }

    /// Records a result and hands it to the sinks and the observer, once.
    fn finish(
        &self,
        h: &StepHandle,
        outcome: Outcome,
        stats: StepStats,
    ) -> Option<Arc<ExecResult>> {
        let result = Arc::new(ExecResult::new(
            &h.assignment,
            outcome,
            stats,
            &self.worker_id,
        ));
        let _in_flight = InFlight::enter(&self.finishing);
        // Serialized once, outside the table lock: its length sizes the
        // retained result and JSON sinks write it as it is.
        let line = result.to_json_line();
        let size = tracker::retained_size(&result, line.len());
        if !self.tracker.complete(h, &result, size) {
            return None;
        }
        let queued = !self.pools[h.assignment.pool.index()].receiver.is_empty();
        let report = StepReport {
            assignment: &h.assignment,
            result: &result,
            flow_duration: h.accepted_at.elapsed(),
            batchable: queued && ON_POOL_THREAD.with(Cell::get),
        };
        // Before the delivery, so a scrape after a result counts it; caught,
        // so an observer's bug can never cost the step its result.
        if catch_unwind(AssertUnwindSafe(|| self.observer.finished(&report))).is_err() {
            log::error!(
                "the metrics observer panicked while recording step {}",
                h.assignment.assignment_id
            );
        }
        if let Some((last, others)) = self.sinks.split_last() {
            for sink in others {
                sink.deliver_line(&result, &line);
            }
            last.deliver_owned(&result, line);
        }
        if result.status != crate::contract::Status::Success && self.failure_lines.admit() {
            let _ctx = logging::enter(logging::LogContext::of(&h.assignment));
            let a = &h.assignment;
            let upstream = (a.job_type == JobType::HttpRequest)
                .then(|| upstream_host(&a.payload))
                .flatten();
            let path = matches!(
                a.job_type,
                JobType::FsBlobPut | JobType::FsBlobGet | JobType::FsBlobDelete
            )
            .then(|| a.payload.get("path").and_then(|p| p.as_str()))
            .flatten()
            .map(|p| p.chars().take(256).collect::<String>());
            let http_status = result
                .outputs
                .as_ref()
                .and_then(|o| o["status_code"].as_u64());
            log::warn!(
                job_type = a.job_type.as_str(),
                status = result.status.as_str(),
                error_code = result.error_code.map(|c| c.as_str()),
                attempts = result.attempts,
                upstream = upstream.as_deref(),
                path = path.as_deref(),
                http_status = http_status;
                "step {} ended {}: {}",
                a.assignment_id,
                result.status.as_str(),
                result.error_message.as_deref().unwrap_or("")
            );
        }
        Some(result)
    }

    /// Parks a retry of `h` (its attempt just failed on a pool thread) until
    /// `until`. Then hands the step back: if a cancel or shutdown arrived
    /// while it ran, the canceller may have left the answer to us.
    fn park_retry(&self, h: &Arc<StepHandle>, until: Instant, last: BlockError) {
        let pool = &self.pools[h.assignment.pool.index()];
        pool.waiting.fetch_add(1, Ordering::AcqRel);
        self.parking.park_retry(h.clone(), until, last);
        h.running.store(false, Ordering::SeqCst);
        // Pairs with the fence in `Engine::cancel` (see `step::run`).
        std::sync::atomic::fence(Ordering::SeqCst);
        if h.cancel.is_cancelled() {
            self.withdraw_retry(h);
            self.finish_cancelled(h);
        }
    }

    /// Removes a parked retry of `h` from the timer map, if there is one.
    fn withdraw_retry(&self, h: &StepHandle) {
        if h.approval.is_none() && self.parking.withdraw(h) {
            self.pools[h.assignment.pool.index()].retry_left();
        }
    }

    /// A parked retry's time came: at its deadline (CP2 timeouts) it ends
    /// `timeout` now; otherwise it goes back to its pool, ahead of the queue.
    fn retry_due(&self, h: Arc<StepHandle>, last: Box<BlockError>) {
        let pool = &self.pools[h.assignment.pool.index()];
        if h.cancel.is_cancelled() {
            pool.retry_left();
            self.finish_cancelled(&h);
            return;
        }
        if self.settings.flags.complete_timeout && Instant::now() >= h.deadline {
            pool.retry_left();
            // Claimed like a queued step at its deadline: a cancel that set
            // the token first gives its own answer.
            if h.cancel.cancel(CancelReason::Deadline) {
                let attempts = h.attempts.load(Ordering::Acquire);
                let outcome = step::deadline_failure(self, &h, *last, attempts);
                self.finish(&h, outcome, stats_so_far(&h));
            } else {
                self.finish_cancelled(&h);
            }
            return;
        }
        // Never fails: the pool holds the receiver for as long as it lives.
        let _ = pool.retry_tx.send((h, last));
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
        self.finish(h, outcome, stats).is_some()
    }
}

/// WARN lines of unsuccessful steps per second before they are summarised.
const FAILURE_LINES_PER_SEC: u32 = 10;

/// `scheme://host[:port]` of an `http.request` payload: never the path or
/// query string, which may carry tokens or tenant data.
fn upstream_host(payload: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    let url = payload.get("url")?.as_str()?;
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    // Drop user:password@ if present.
    let host = authority.rsplit('@').next()?;
    (!host.is_empty()).then(|| format!("{}://{host}", scheme.to_ascii_lowercase()))
}

/// Answers queued steps whose deadline passed (CP2 timeouts) at the deadline,
/// not when a pool thread finally reaches them: sleeps until the earliest
/// deadline of [`Deadlines`] (no scan). Claims a step the way a cancel does
/// (token, fence, "started" check: see `step::run`), so a step a pool thread
/// already started is never answered here. Ends when the engine is gone.
fn reap_expired(deadlines: &Deadlines, weak: &std::sync::Weak<Shared>) {
    while let Some(due) = deadlines.next_due() {
        let Some(shared) = weak.upgrade() else { return };
        for h in due {
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

/// How often a draining pool thread looks whether retries still wait.
const DRAIN_POLL: Duration = Duration::from_millis(50);

impl Pool {
    /// A waiting retry of this pool left the waiting set: taken by a thread,
    /// answered from the timer, or withdrawn. Each parked retry leaves once.
    fn retry_left(&self) {
        let before = self.waiting.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "a retry left the waiting set twice");
    }
}

/// Work for a pool thread: a fresh step, or a retry back from the timer.
enum Work {
    Fresh(Arc<StepHandle>),
    Retry(Arc<StepHandle>, Box<BlockError>),
}

/// How often a pool thread out of work yields before it sleeps.
const IDLE_YIELDS: usize = 64;

thread_local! {
    /// Set on the engine's pool threads (see [`StepReport::batchable`]).
    static ON_POOL_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// The next work of `pool`: due retries first (they already hold their
/// place), then the main queue. `None` once the pool is drained: the main
/// queue is closed and empty and no retry of this pool waits.
/// `after_step`: the thread just finished a step, so more work may follow at
/// once (only then it yields before sleeping: a thousand fresh threads
/// yielding at start-up cost 70 ms on two cores).
fn next_work(
    pool: &Pool,
    observer: &dyn Observer,
    main_open: &mut bool,
    after_step: bool,
) -> Option<Work> {
    let retry = |(h, e): (Arc<StepHandle>, Box<BlockError>)| {
        pool.retry_left();
        Work::Retry(h, e)
    };
    loop {
        if let Ok(r) = pool.retry_rx.try_recv() {
            return Some(retry(r));
        }
        if *main_open {
            // Out of work: yield a few times before sleeping. A producer
            // feeding the queue one step at a time (`run`, a busy ingress)
            // then finds this thread still awake, instead of waking it for
            // every step (a futex call, and the woken thread preempting the
            // producer, which starved the intake of `run` on two cores).
            let yields = if after_step { IDLE_YIELDS } else { 0 };
            for _ in 0..yields {
                if let Ok(r) = pool.retry_rx.try_recv() {
                    return Some(retry(r));
                }
                match pool.receiver.try_recv() {
                    Ok(h) => return Some(Work::Fresh(h)),
                    // Closed: the select below ends the pool's intake.
                    Err(crossbeam_channel::TryRecvError::Disconnected) => break,
                    Err(crossbeam_channel::TryRecvError::Empty) => std::thread::yield_now(),
                }
            }
            // About to sleep: publish what this thread batched.
            observer.idle();
            crossbeam_channel::select! {
                recv(pool.retry_rx) -> m => if let Ok(r) = m { return Some(retry(r)) },
                recv(pool.receiver) -> m => match m {
                    Ok(h) => return Some(Work::Fresh(h)),
                    Err(_) => *main_open = false,
                },
            }
        } else {
            // Draining: parked retries of this pool still get their attempts
            // within the grace, like queued steps. Polled, but only while draining.
            if pool.waiting.load(Ordering::Acquire) == 0 {
                observer.idle();
                return None;
            }
            if let Ok(r) = pool.retry_rx.recv_timeout(DRAIN_POLL) {
                return Some(retry(r));
            }
        }
    }
}

fn worker_loop(shared: &Shared, kind: PoolKind, exit: Sender<()>) {
    let pool = &shared.pools[kind.index()];
    let _alive = AliveGuard(&pool.alive, exit);
    let mut main_open = true;
    let mut after_step = false;
    ON_POOL_THREAD.with(|on| on.set(true));
    let observer = &*shared.observer;
    while let Some(work) = next_work(pool, observer, &mut main_open, after_step) {
        after_step = true;
        let (handle, resume) = match work {
            Work::Fresh(h) => {
                shared.observer.dequeued(kind, h.accepted_at.elapsed());
                (h, None)
            }
            Work::Retry(h, last) => (h, Some(*last)),
        };
        pool.active.fetch_add(1, Ordering::AcqRel);
        let _ctx = logging::enter(logging::LogContext::shared(handle.clone()));
        // The step loop already catches block panics; this catch covers the
        // engine's own code so a bug cannot kill the thread or lose the result.
        let ran = catch_unwind(AssertUnwindSafe(|| step::run(shared, &handle, resume)));
        pool.active.fetch_sub(1, Ordering::AcqRel);
        let progress = ran.unwrap_or_else(|_| {
            let outcome = Outcome::Failure {
                code: crate::contract::ErrorCode::InternalError,
                message: "internal error while running the step".into(),
                retryable: true,
                outputs: None,
            };
            step::Progress::Done(outcome, stats_so_far(&handle))
        });
        match progress {
            step::Progress::Done(outcome, stats) => {
                shared.finish(&handle, outcome, stats);
            }
            step::Progress::Park { until, last } => shared.park_retry(&handle, until, last),
        }
    }
}

/// The timer thread: hands due entries to the engine until it is gone.
fn timer_loop(parking: &Parking, weak: &std::sync::Weak<Shared>) {
    while let Some(due) = parking.next_due() {
        let Some(shared) = weak.upgrade() else { return };
        for parked in due {
            match parked {
                Parked::Retry { handle, last } => shared.retry_due(handle, last),
                Parked::Approval(handle) => shared.approval_expired(&handle),
            }
        }
    }
}

/// A pending `debug.echo` step `id` with a 30 s deadline, for unit tests.
#[cfg(test)]
pub(crate) fn test_handle(id: &str) -> Arc<StepHandle> {
    use crate::contract::{IntakeRules, parse_assignment};
    let a = format!(
        r#"{{"version":"1","assignment_id":"{id}","request_id":"r","tenant_id":"t","job":{{"type":"debug.echo"}}}}"#
    );
    let rules = IntakeRules {
        max_body_bytes: 1 << 20,
        strict_ids: false,
        default_deadline_ms: 30_000,
    };
    let a = parse_assignment(a.as_bytes(), &rules).expect("a valid assignment");
    let now = Instant::now();
    Arc::new(StepHandle::new(a, now, now + Duration::from_secs(30), None))
}
