//! Prometheus metrics (SPEC §9, CP2 observability). [`Metrics`] is an engine
//! [`Observer`]: the engine reports outcomes, this records them. Gauges that
//! describe live state (queue depth, active tasks, health) are refreshed from
//! the engine when `/metrics` is scraped, so they are never stale.

use crate::blocks::TimeoutPhase;
use crate::config::Settings;
use crate::contract::{ErrorCode, JobType, PoolKind, RejectReason, Status};
use crate::engine::{ApprovalOutcome, Observer, PoolStats, StepReport};
use crate::telemetry::transport::{
    ApprovalRefusal, Direction, JsAckKind, MessageKind, TransportObserver,
};
use prometheus::local::{LocalHistogram, LocalIntCounter};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Step duration buckets (seconds), SPEC §9.
pub const STEP_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];
/// Flow duration buckets (seconds), SPEC §9.
pub const FLOW_BUCKETS: &[f64] = &[0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
/// Queue wait buckets (seconds); our choice, docs/SPEC.md §9.
pub const QUEUE_WAIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0,
];

/// Label value for tenants beyond `WORKER_METRICS_MAX_TENANTS`.
pub const OTHER_TENANT: &str = "_other";

const PHASES: [TimeoutPhase; 4] = [
    TimeoutPhase::Connect,
    TimeoutPhase::Attempt,
    TimeoutPhase::Fs,
    TimeoutPhase::Deadline,
];

/// The process's metric registry and every family of SPEC §9.
pub struct Metrics {
    registry: Registry,
    step_executions: IntCounterVec,
    step_duration: HistogramVec,
    step_errors: IntCounterVec,
    http_errors: IntCounterVec,
    flow_duration: HistogramVec,
    queue_depth: IntGaugeVec,
    active_tasks: IntGaugeVec,
    queue_capacity: IntGaugeVec,
    pool_threads: IntGaugeVec,
    health_status: IntGaugeVec,
    assignments: IntCounterVec,
    fs_abandoned: IntGauge,
    retries_waiting: IntGaugeVec,
    approvals_pending: IntGauge,
    approval_decisions: [IntCounter; 3],
    budget_denied: IntCounter,
    // Handles resolved once at start-up: these label sets are small and fixed.
    queue_wait: [Histogram; 3],
    retries: Vec<IntCounter>,
    timeouts: Vec<[IntCounter; 4]>,
    accepted: IntCounter,
    duplicates: IntCounter,
    rejections: Vec<IntCounter>,
    nats_connected: IntGauge,
    nats_reconnects: IntCounter,
    nats_buffered: IntGauge,
    /// `[direction][kind]`, resolved once.
    nats_messages: [[IntCounter; 6]; 2],
    js_acks: [IntCounter; 4],
    nats_approval_refusals: [IntCounter; 5],
    detailed_labels: bool,
    max_tenants: usize,
    tenants: RwLock<HashSet<String>>,
    /// Tells registries apart in the per-thread [`SeriesCache`].
    id: usize,
}

/// Source of [`Metrics::id`].
static NEXT_METRICS_ID: AtomicUsize = AtomicUsize::new(1);

/// Label sets a pool thread keeps resolved before it starts over.
const SERIES_CACHE_CAP: usize = 1024;

/// Observations a pool thread buffers before it publishes them (a dequeue
/// and a finished step each: about 64 steps)...
const FLUSH_EVERY: u32 = 128;
/// ...or once this many ms passed since it last did (by the results'
/// timestamps, so no extra clock read), whichever comes first; and always
/// before it sleeps ([`Observer::idle`]).
const FLUSH_AFTER_MS: u64 = 100;

/// The series a finished step updates (without detailed labels), as this
/// thread's buffers of them: a pool thread adds to plain numbers and
/// publishes them in batches, instead of three contended atomic updates
/// per series per step on cache lines all pool threads share.
struct StepSeries {
    executions: LocalIntCounter,
    duration: LocalHistogram,
    flow: LocalHistogram,
}

impl StepSeries {
    fn flush(&self) {
        self.executions.flush();
        self.duration.flush();
        self.flow.flush();
    }
}

impl Drop for StepSeries {
    /// A thread that ends (even by a panic) publishes what it held; the
    /// histograms do so themselves, the counter does not.
    fn drop(&mut self) {
        self.executions.flush();
    }
}

/// Per-thread cache of resolved [`StepSeries`], keyed by the raw tenant id,
/// job type and status. Without it every finished step took the tenant-set
/// lock and three `with_label_values` look-ups (each a hash of the label
/// values, a read lock and an `Arc` clone/drop) — atomics on cache lines that
/// all pool threads share. A tenant's label never changes once decided (the
/// tenant set only grows, and `_other` is final once it is full), so a cached
/// entry stays exact.
#[derive(Default)]
struct SeriesCache {
    owner: usize,
    series: Vec<StepSeries>,
    /// Index into `series` by tenant id, then job type and status.
    by_tenant: HashMap<String, HashMap<(JobType, Status), usize>>,
    /// The last series used and its key: consecutive steps nearly always
    /// share it, and comparing the key costs less than hashing it twice.
    last: Option<(String, JobType, Status, usize)>,
    /// This thread's buffers of `worker_queue_wait_seconds`, per pool.
    queue_wait: Option<[LocalHistogram; 3]>,
    /// Observations buffered since the last flush...
    buffered: u32,
    /// ...which was at this result timestamp (epoch ms).
    flushed_at_ms: u64,
}

impl SeriesCache {
    /// This thread's cache for `owner`, flushing and starting over if it
    /// held another registry's series or grew to [`SERIES_CACHE_CAP`].
    fn for_owner(&mut self, owner: usize) -> &mut SeriesCache {
        if self.owner != owner || self.series.len() >= SERIES_CACHE_CAP {
            self.flush();
            *self = SeriesCache {
                owner,
                ..SeriesCache::default()
            };
        }
        self
    }

    /// Makes series `i` the `last` one, reusing the key's buffer (steps of
    /// alternating tenants would otherwise allocate one per step).
    fn remember(&mut self, tenant_id: &str, job: JobType, status: Status, i: usize) {
        match &mut self.last {
            Some((t, j, st, at)) => {
                t.clear();
                t.push_str(tenant_id);
                (*j, *st, *at) = (job, status, i);
            }
            None => self.last = Some((tenant_id.to_owned(), job, status, i)),
        }
    }

    /// Publishes everything buffered.
    fn flush(&mut self) {
        if self.buffered == 0 {
            return;
        }
        for s in &self.series {
            s.flush();
        }
        for h in self.queue_wait.iter().flatten() {
            h.flush();
        }
        self.buffered = 0;
    }
}

thread_local! {
    static SERIES: RefCell<SeriesCache> = RefCell::new(SeriesCache::default());
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn job_index(j: JobType) -> usize {
    JobType::ALL.iter().position(|t| *t == j).unwrap_or(0)
}

fn phase_index(p: TimeoutPhase) -> usize {
    PHASES.iter().position(|x| *x == p).unwrap_or(0)
}

fn reason_index(r: RejectReason) -> usize {
    RejectReason::ALL.iter().position(|x| *x == r).unwrap_or(0)
}

impl Metrics {
    /// Registers every family on a fresh registry.
    pub fn new(settings: &Settings) -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let step_labels = [
            "step_type",
            "execution_status",
            "tenant_id",
            "run_id",
            "flow_id",
            "step_id",
        ];
        let step_executions = IntCounterVec::new(
            Opts::new(
                "worker_step_executions_total",
                "Steps finished, by final status.",
            ),
            &step_labels,
        )?;
        let step_duration = HistogramVec::new(
            HistogramOpts::new(
                "worker_step_execution_duration_seconds",
                "Step duration over all attempts and backoff sleeps.",
            )
            .buckets(STEP_BUCKETS.to_vec()),
            &step_labels,
        )?;
        let http_errors_vec = IntCounterVec::new(
            Opts::new(
                "worker_step_http_errors_total",
                "Steps that ended with HTTP_ERROR, by upstream status class (4xx, 5xx, other).",
            ),
            &["step_type", "status_class"],
        )?;
        let step_errors = IntCounterVec::new(
            Opts::new(
                "worker_step_errors_total",
                "Steps that ended with status error, by error code.",
            ),
            &[
                "step_type",
                "error_code",
                "tenant_id",
                "run_id",
                "flow_id",
                "step_id",
            ],
        )?;
        let flow_duration = HistogramVec::new(
            HistogramOpts::new(
                "worker_flow_execution_duration_seconds",
                "One assignment end to end inside the worker: acceptance to result, queue included.",
            )
            .buckets(FLOW_BUCKETS.to_vec()),
            &["tenant_id", "run_id", "flow_id"],
        )?;
        let pool_gauge =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["resource_pool"]);
        let queue_depth = pool_gauge("worker_queue_depth", "Steps waiting in the pool's queue.")?;
        let active_tasks = pool_gauge("worker_active_tasks", "Pool threads executing a step.")?;
        let queue_capacity = pool_gauge(
            "worker_queue_capacity",
            "Queue bound of the pool; 0 when queues are unbounded (queue management off).",
        )?;
        let pool_threads = pool_gauge("worker_pool_threads", "Configured threads of the pool.")?;
        let retries_waiting = pool_gauge(
            "worker_retries_waiting",
            "Retries waiting out their backoff (parked, holding no thread) or due and not yet picked up.",
        )?;
        let approvals_pending = IntGauge::new(
            "worker_approvals_pending",
            "human.approval steps waiting for a decision (parked, holding no thread).",
        )?;
        let decisions_vec = IntCounterVec::new(
            Opts::new(
                "worker_approval_decisions_total",
                "Ended approvals by decision (approved, rejected, timeout).",
            ),
            &["decision"],
        )?;
        let queue_wait_vec = HistogramVec::new(
            HistogramOpts::new(
                "worker_queue_wait_seconds",
                "Acceptance to dequeue by a pool thread.",
            )
            .buckets(QUEUE_WAIT_BUCKETS.to_vec()),
            &["resource_pool"],
        )?;
        let health_status = IntGaugeVec::new(
            Opts::new(
                "worker_health_status",
                "1 if the health check passes, 0 if not.",
            ),
            &["check"],
        )?;
        let assignments = IntCounterVec::new(
            Opts::new(
                "worker_assignments_total",
                "Submissions by outcome (accepted/rejected) and reason (\"\", duplicate, or the rejection reason).",
            ),
            &["outcome", "reason"],
        )?;
        let retries_vec = IntCounterVec::new(
            Opts::new(
                "worker_step_retries_total",
                "Retries started (attempts after the first).",
            ),
            &["step_type"],
        )?;
        let budget_denied = IntCounter::new(
            "worker_retry_budget_denied_total",
            "Retries denied by the process-wide retry budget.",
        )?;
        let timeouts_vec = IntCounterVec::new(
            Opts::new(
                "worker_timeouts_total",
                "Timeouts by phase (connect, attempt, fs, deadline).",
            ),
            &["step_type", "phase"],
        )?;
        let fs_abandoned = IntGauge::new(
            "worker_fs_abandoned_operations",
            "File-system operations abandoned by the watchdog and still blocked.",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "worker_build_info",
                "Always 1; the version label names the build.",
            ),
            &["version"],
        )?;
        let nats_connected = IntGauge::new(
            "worker_nats_connected",
            "1 while the NATS connection is up, 0 while it is down or not configured.",
        )?;
        let nats_reconnects = IntCounter::new(
            "worker_nats_reconnects_total",
            "NATS connections re-established after a loss.",
        )?;
        let nats_buffered = IntGauge::new(
            "worker_nats_publish_buffered",
            "Results waiting for the NATS connection to be published.",
        )?;
        let nats_messages_vec = IntCounterVec::new(
            Opts::new(
                "worker_nats_messages_total",
                "NATS messages by direction (in, out) and kind (assign, ack, result, heartbeat, dlq, approval).",
            ),
            &["direction", "kind"],
        )?;
        let js_acks_vec = IntCounterVec::new(
            Opts::new(
                "worker_jetstream_acks_total",
                "JetStream acknowledgements sent, by kind (ack, nak, term, in_progress).",
            ),
            &["kind"],
        )?;
        let approval_refusals_vec = IntCounterVec::new(
            Opts::new(
                "worker_nats_approval_refusals_total",
                "human.approval decisions from NATS refused, by reason (invalid_request, forbidden, not_found, already_decided, payload_too_large).",
            ),
            &["reason"],
        )?;
        for c in [
            Box::new(nats_connected.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(approval_refusals_vec.clone()),
            Box::new(nats_reconnects.clone()),
            Box::new(nats_buffered.clone()),
            Box::new(nats_messages_vec.clone()),
            Box::new(js_acks_vec.clone()),
            Box::new(step_executions.clone()),
            Box::new(step_duration.clone()),
            Box::new(step_errors.clone()),
            Box::new(flow_duration.clone()),
            Box::new(queue_depth.clone()),
            Box::new(active_tasks.clone()),
            Box::new(queue_capacity.clone()),
            Box::new(pool_threads.clone()),
            Box::new(queue_wait_vec.clone()),
            Box::new(health_status.clone()),
            Box::new(assignments.clone()),
            Box::new(retries_vec.clone()),
            Box::new(budget_denied.clone()),
            Box::new(timeouts_vec.clone()),
            Box::new(fs_abandoned.clone()),
            Box::new(retries_waiting.clone()),
            Box::new(approvals_pending.clone()),
            Box::new(decisions_vec.clone()),
            Box::new(build_info.clone()),
            Box::new(http_errors_vec.clone()),
            Box::new(super::process::ProcessCollector::new()?),
        ] {
            registry.register(c)?;
        }
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let queue_wait = PoolKind::ALL.map(|p| queue_wait_vec.with_label_values(&[p.as_str()]));
        let retries = JobType::ALL
            .iter()
            .map(|j| retries_vec.with_label_values(&[j.as_str()]))
            .collect();
        let timeouts = JobType::ALL
            .iter()
            .map(|j| PHASES.map(|p| timeouts_vec.with_label_values(&[j.as_str(), p.as_str()])))
            .collect();
        let rejections = RejectReason::ALL
            .iter()
            .map(|r| assignments.with_label_values(&["rejected", r.as_str()]))
            .collect();
        let approval_decisions =
            ApprovalOutcome::ALL.map(|d| decisions_vec.with_label_values(&[d.as_str()]));
        for class in ["4xx", "5xx"] {
            http_errors_vec.with_label_values(&[JobType::HttpRequest.as_str(), class]);
        }
        let nats_messages = Direction::ALL.map(|d| {
            MessageKind::ALL.map(|k| nats_messages_vec.with_label_values(&[d.as_str(), k.as_str()]))
        });
        let js_acks = JsAckKind::ALL.map(|k| js_acks_vec.with_label_values(&[k.as_str()]));
        let nats_approval_refusals =
            ApprovalRefusal::ALL.map(|r| approval_refusals_vec.with_label_values(&[r.as_str()]));
        Ok(Metrics {
            retries_waiting,
            approvals_pending,
            approval_decisions,
            http_errors: http_errors_vec,
            nats_connected,
            nats_reconnects,
            nats_buffered,
            nats_messages,
            js_acks,
            nats_approval_refusals,
            accepted: assignments.with_label_values(&["accepted", ""]),
            duplicates: assignments.with_label_values(&["accepted", "duplicate"]),
            rejections,
            registry,
            step_executions,
            step_duration,
            step_errors,
            flow_duration,
            queue_depth,
            active_tasks,
            queue_capacity,
            pool_threads,
            health_status,
            assignments,
            fs_abandoned,
            budget_denied,
            queue_wait,
            retries,
            timeouts,
            detailed_labels: settings.metrics_detailed_labels,
            max_tenants: settings.metrics_max_tenants,
            tenants: RwLock::new(HashSet::new()),
            id: NEXT_METRICS_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The tenant label value: itself while under the cap, else `_other`.
    fn tenant_label<'a>(&self, tenant: &'a str) -> &'a str {
        if self
            .tenants
            .read()
            .map(|t| t.contains(tenant))
            .unwrap_or(false)
        {
            return tenant;
        }
        let mut t = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        if t.contains(tenant) {
            tenant
        } else if t.len() < self.max_tenants {
            t.insert(tenant.to_owned());
            tenant
        } else {
            OTHER_TENANT
        }
    }

    /// Calls `f` with the step series of this label set, from this thread's
    /// cache (borrowed, not cloned: a clone is an atomic on a shared `Arc`).
    /// Only without detailed labels, where `run_id`, `flow_id`, `step_id` are empty.
    /// With `batch_at: (true, now_ms)` (a batchable report at a result's
    /// timestamp) the updates stay buffered until [`FLUSH_EVERY`] reports,
    /// [`FLUSH_AFTER_MS`] or the thread's next [`Observer::idle`]; with
    /// `false` they are published at once, with everything else this
    /// thread buffered.
    fn with_step_series(
        &self,
        job: JobType,
        status: Status,
        tenant_id: &str,
        batch_at: (bool, u64),
        f: impl FnOnce(&StepSeries),
    ) {
        SERIES.with(|cache| {
            let mut cache = cache.borrow_mut();
            let c = cache.for_owner(self.id);
            let last = match &c.last {
                Some((t, j, st, i)) if *j == job && *st == status && t == tenant_id => Some(*i),
                _ => None,
            };
            let cached = last.or_else(|| {
                let i = *c.by_tenant.get(tenant_id)?.get(&(job, status))?;
                c.remember(tenant_id, job, status, i);
                Some(i)
            });
            let i = match cached {
                Some(i) => i,
                None => {
                    let tenant = self.tenant_label(tenant_id);
                    let labels = [job.as_str(), status.as_str(), tenant, "", "", ""];
                    let s = StepSeries {
                        executions: self.step_executions.with_label_values(&labels).local(),
                        duration: self.step_duration.with_label_values(&labels).local(),
                        flow: self
                            .flow_duration
                            .with_label_values(&[tenant, "", ""])
                            .local(),
                    };
                    let i = c.series.len();
                    c.series.push(s);
                    c.by_tenant
                        .entry(tenant_id.to_owned())
                        .or_default()
                        .insert((job, status), i);
                    c.remember(tenant_id, job, status, i);
                    i
                }
            };
            if let Some(s) = c.series.get(i) {
                f(s);
            }
            c.buffered += 1;
            let (batch, now_ms) = batch_at;
            if !batch
                || c.buffered >= FLUSH_EVERY
                || now_ms >= c.flushed_at_ms.saturating_add(FLUSH_AFTER_MS)
            {
                c.flush();
                c.flushed_at_ms = now_ms;
            }
        })
    }

    /// Updates the live gauges from the engine's pool numbers, pending
    /// approvals and health checks.
    pub fn refresh(
        &self,
        pools: &[PoolStats],
        fs_abandoned: usize,
        approvals_pending: usize,
        health: &[(&str, bool)],
    ) {
        self.approvals_pending.set(approvals_pending as i64);
        for p in pools {
            let l = [p.kind.as_str()];
            self.queue_depth.with_label_values(&l).set(p.queued as i64);
            self.active_tasks.with_label_values(&l).set(p.active as i64);
            self.queue_capacity
                .with_label_values(&l)
                .set(p.capacity.unwrap_or(0) as i64);
            self.pool_threads
                .with_label_values(&l)
                .set(p.threads as i64);
            self.retries_waiting
                .with_label_values(&l)
                .set(p.retries_waiting as i64);
        }
        self.fs_abandoned.set(fs_abandoned as i64);
        for (check, ok) in health {
            self.health_status
                .with_label_values(&[check])
                .set(i64::from(*ok));
        }
    }

    /// The registry in Prometheus text format 0.0.4.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            log::error!(error = e.to_string(); "cannot encode metrics");
        }
        buf
    }

    /// The content type of [`Metrics::encode`].
    pub fn content_type() -> &'static str {
        "text/plain; version=0.0.4; charset=utf-8"
    }

    /// Number of `worker_assignments_total` series (for tests of cardinality).
    pub fn assignment_series(&self) -> usize {
        self.assignments.collect_len()
    }
}

trait CollectLen {
    fn collect_len(&self) -> usize;
}

impl CollectLen for IntCounterVec {
    fn collect_len(&self) -> usize {
        use prometheus::core::Collector;
        self.collect().iter().map(|f| f.get_metric().len()).sum()
    }
}

impl TransportObserver for Metrics {
    fn connected(&self, up: bool) {
        self.nats_connected.set(i64::from(up));
    }

    fn reconnected(&self) {
        self.nats_reconnects.inc();
    }

    fn message(&self, direction: Direction, kind: MessageKind) {
        let d = Direction::ALL
            .iter()
            .position(|x| *x == direction)
            .unwrap_or(0);
        let k = MessageKind::ALL
            .iter()
            .position(|x| *x == kind)
            .unwrap_or(0);
        self.nats_messages[d][k].inc();
    }

    fn js_ack(&self, kind: JsAckKind) {
        let k = JsAckKind::ALL.iter().position(|x| *x == kind).unwrap_or(0);
        self.js_acks[k].inc();
    }

    fn buffered(&self, results: usize) {
        self.nats_buffered.set(results as i64);
    }

    fn approval_refused(&self, reason: ApprovalRefusal) {
        let r = ApprovalRefusal::ALL
            .iter()
            .position(|x| *x == reason)
            .unwrap_or(0);
        self.nats_approval_refusals[r].inc();
    }
}

impl Observer for Metrics {
    fn accepted(&self, _job: JobType, duplicate: bool) {
        if duplicate {
            self.duplicates.inc();
        } else {
            self.accepted.inc();
        }
    }

    fn rejected(&self, reason: RejectReason) {
        self.rejections[reason_index(reason)].inc();
    }

    fn dequeued(&self, pool: PoolKind, waited: Duration) {
        SERIES.with(|cache| {
            let mut cache = cache.borrow_mut();
            let c = cache.for_owner(self.id);
            let local = c
                .queue_wait
                .get_or_insert_with(|| self.queue_wait.each_ref().map(Histogram::local));
            local[pool.index()].observe(waited.as_secs_f64());
            c.buffered += 1;
        })
    }

    fn idle(&self) {
        SERIES.with(|cache| cache.borrow_mut().flush())
    }

    fn retry(&self, job: JobType) {
        self.retries[job_index(job)].inc();
    }

    fn retry_budget_denied(&self, _job: JobType) {
        self.budget_denied.inc();
    }

    fn timeout(&self, job: JobType, phase: TimeoutPhase) {
        self.timeouts[job_index(job)][phase_index(phase)].inc();
    }

    fn approval_decided(&self, outcome: ApprovalOutcome) {
        let i = ApprovalOutcome::ALL
            .iter()
            .position(|d| *d == outcome)
            .unwrap_or(0);
        self.approval_decisions[i].inc();
    }

    fn finished<'a>(&self, report: &StepReport<'a>) {
        let a = report.assignment;
        let r = report.result;
        if r.error_code == Some(ErrorCode::HttpError) {
            let status = r.outputs.as_ref().and_then(|o| o["status_code"].as_u64());
            let class = match status {
                Some(400..=499) => "4xx",
                Some(500..=599) => "5xx",
                _ => "other",
            };
            self.http_errors
                .with_label_values(&[a.job_type.as_str(), class])
                .inc();
        }
        if !self.detailed_labels {
            let batch_at = (report.batchable, r.timestamp);
            self.with_step_series(a.job_type, r.status, &a.tenant_id, batch_at, |s| {
                s.executions.inc();
                s.duration.observe(r.latency_ms as f64 / 1000.0);
                if let (Status::Error, Some(code)) = (r.status, r.error_code) {
                    let tenant = self.tenant_label(&a.tenant_id);
                    let labels = [a.job_type.as_str(), code.as_str(), tenant, "", "", ""];
                    self.step_errors.with_label_values(&labels).inc();
                }
                s.flow.observe(report.flow_duration.as_secs_f64());
            });
            return;
        }
        let tenant = self.tenant_label(&a.tenant_id);
        let c = a.correlation();
        let (run, flow, step) = if self.detailed_labels {
            let id = |v: &'a Option<String>| v.as_deref().unwrap_or("");
            (id(&c.run_id), id(&c.flow_id), id(&c.step_id))
        } else {
            ("", "", "")
        };
        let step_type = a.job_type.as_str();
        let labels = [step_type, r.status.as_str(), tenant, run, flow, step];
        self.step_executions.with_label_values(&labels).inc();
        self.step_duration
            .with_label_values(&labels)
            .observe(r.latency_ms as f64 / 1000.0);
        if let (crate::contract::Status::Error, Some(code)) = (r.status, r.error_code) {
            self.step_errors
                .with_label_values(&[step_type, ErrorCode::as_str(code), tenant, run, flow, step])
                .inc();
        }
        self.flow_duration
            .with_label_values(&[tenant, run, flow])
            .observe(report.flow_duration.as_secs_f64());
    }
}
