//! Blocks: the step implementations (SPEC §4), one file per family.
//!
//! A block validates its payload before any I/O, runs one attempt, and returns
//! outputs or a typed [`BlockError`]. Blocks know nothing of retries, queues,
//! ingress or metrics: the engine decides what an error means for the step.

pub mod approval;
mod confine;
mod debug;
mod egress;
mod fs;
mod http;
mod payload;
mod sql;
mod watchdog;

use crate::cancel::{CancelReason, CancelToken};
use crate::contract::{ErrorCode, JobType};
use serde_json::{Map, Value};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use egress::{Cidr, EgressDenied, EgressPolicy, parse_ipv4_loose};
pub use sql::MAX_CONNECTIONS_PER_THREAD;
pub use watchdog::{MAX_ABANDONED, Watchdog, WatchdogError};

/// The phase a timeout happened in (the `phase` label of `worker_timeouts_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeoutPhase {
    /// TCP/TLS connect did not finish in time.
    Connect,
    /// One attempt ran past its timeout.
    Attempt,
    /// An FS operation's watchdog fired.
    Fs,
    /// The step's total deadline ended it.
    Deadline,
}

impl TimeoutPhase {
    /// Label spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutPhase::Connect => "connect",
            TimeoutPhase::Attempt => "attempt",
            TimeoutPhase::Fs => "fs",
            TimeoutPhase::Deadline => "deadline",
        }
    }
}

/// A failed attempt: the §3.4 code plus what the retry policy needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockError {
    /// The §3.4 code.
    pub code: ErrorCode,
    /// One human sentence.
    pub message: String,
    /// Partial outputs (HTTP status and body head).
    pub outputs: Option<Value>,
    /// HTTP status of a non-2xx response.
    pub http_status: Option<u16>,
    /// `Retry-After` of a 429/503 response.
    pub retry_after: Option<Duration>,
    /// The block knows a retry cannot help (e.g. the file exists).
    pub permanent: bool,
    /// Set when the attempt ended by a timeout.
    pub timeout: Option<TimeoutPhase>,
}

impl BlockError {
    /// An error with a code and message and nothing else.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> BlockError {
        BlockError {
            code,
            message: message.into(),
            outputs: None,
            http_status: None,
            retry_after: None,
            permanent: false,
            timeout: None,
        }
    }

    /// A payload problem: never retryable.
    pub fn input(code: ErrorCode, message: impl Into<String>) -> BlockError {
        BlockError::new(code, message).permanent()
    }

    /// A timeout in `phase`.
    pub fn timeout(phase: TimeoutPhase, message: impl Into<String>) -> BlockError {
        let code = match phase {
            TimeoutPhase::Connect => ErrorCode::ConnectionTimeout,
            _ => ErrorCode::CancelledByTimeout,
        };
        BlockError {
            timeout: Some(phase),
            ..BlockError::new(code, message)
        }
    }

    /// The attempt saw its cancellation token.
    pub fn cancelled(reason: CancelReason) -> BlockError {
        let why = match reason {
            CancelReason::User => "cancelled by request",
            CancelReason::Shutdown => "cancelled by worker shutdown",
            CancelReason::Deadline => {
                return BlockError::timeout(TimeoutPhase::Deadline, "the step deadline passed");
            }
        };
        BlockError::new(ErrorCode::CancelledByUser, why)
    }

    /// Marks the error as one a retry cannot fix.
    pub fn permanent(mut self) -> BlockError {
        self.permanent = true;
        self
    }

    /// Attaches partial outputs.
    pub fn with_outputs(mut self, outputs: Value) -> BlockError {
        self.outputs = Some(outputs);
        self
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for BlockError {}

/// What one attempt may use: its number, its cancel token and its time limit.
#[derive(Debug, Clone, Copy)]
pub struct AttemptContext<'a> {
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Polled by blocks that sleep or wait.
    pub cancel: &'a CancelToken,
    /// The attempt must end by then (`None`: no limit).
    pub deadline: Option<Instant>,
    /// CP2 connect timeout for HTTP (already capped by the attempt timeout).
    pub connect_timeout: Option<Duration>,
}

impl AttemptContext<'_> {
    /// Time left before the attempt's deadline (`None`: unlimited).
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }
}

/// Settings the blocks need, taken from the validated configuration.
#[derive(Debug, Clone)]
pub struct BlockSettings {
    /// Root of every fs path (created if missing).
    pub fs_root: PathBuf,
    /// Run FS operations under the watchdog (CP2 complete timeouts).
    pub fs_watchdog: bool,
    /// Watchdog timeouts for read, write and delete.
    pub fs_timeouts: FsTimeouts,
    /// Largest HTTP response body read.
    pub max_response_bytes: usize,
    /// Threads over all pools: `http.request` keeps one agent (one
    /// connection pool) per thread.
    pub pool_threads: usize,
    /// `WORKER_HTTP_DENY_NETS`.
    pub http_deny_nets: Vec<Cidr>,
    /// `WORKER_HTTP_ALLOW_NETS`.
    pub http_allow_nets: Option<Vec<Cidr>>,
    /// Root of every `sql.query` database (created if missing).
    pub sql_root: PathBuf,
    /// Default and cap of `sql.query` `max_rows`.
    pub sql_max_rows: usize,
    /// Whether `sql.query` may run in `write` mode.
    pub sql_allow_write: bool,
    /// CP2 per-attempt limit of a query (`None`: the attempt deadline only).
    pub sql_attempt_timeout: Option<Duration>,
    /// Create a missing FS root only when the first fs.* step runs (`run`),
    /// not at start-up (`serve`, whose health check probes the root).
    pub fs_root_on_demand: bool,
}

/// CP2 FS watchdog timeouts.
#[derive(Debug, Clone, Copy)]
pub struct FsTimeouts {
    /// `fs.blob_get`.
    pub read: Duration,
    /// `fs.blob_put`.
    pub write: Duration,
    /// `fs.blob_delete`.
    pub delete: Duration,
}

/// Why the blocks could not be set up.
#[derive(Debug)]
pub struct SetupError {
    /// The setting at fault.
    pub setting: &'static str,
    /// What went wrong.
    pub reason: String,
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.setting, self.reason)
    }
}

impl std::error::Error for SetupError {}

/// Runs the payload checks `job`'s block runs before any I/O, without
/// running anything (`caf-worker validate`). The blocks call the same
/// functions, so the two cannot disagree.
pub fn check_payload(job: JobType, payload: &Map<String, Value>) -> Result<(), BlockError> {
    match job {
        JobType::HttpRequest => http::prepare(payload).map(drop),
        JobType::FsBlobPut | JobType::FsBlobGet | JobType::FsBlobDelete => {
            fs::check_payload(job, payload)
        }
        JobType::DebugEcho => Ok(()),
        JobType::DebugSleep => debug::sleep_ms(payload).map(drop),
        JobType::DebugFail => debug::fail_spec(payload).map(drop),
        JobType::SqlQuery => sql::parse_request(payload, usize::MAX).map(drop),
        JobType::HumanApproval => approval::parse(payload).map(drop),
    }
}

/// All block families, sharing one HTTP agent, one FS root and one SQL root.
#[derive(Debug)]
pub struct Blocks {
    http: http::HttpBlock,
    fs: std::sync::OnceLock<Result<fs::FsBlock, String>>,
    sql: sql::SqlBlock,
    settings: BlockSettings,
}

impl Blocks {
    /// Builds the blocks; creates the SQL root and the FS root if missing
    /// (with `fs_root_on_demand`, the FS root only when the first fs.* step
    /// needs it).
    pub fn new(settings: &BlockSettings) -> Result<Blocks, SetupError> {
        let blocks = Blocks {
            http: http::HttpBlock::new(settings),
            fs: std::sync::OnceLock::new(),
            sql: sql::SqlBlock::new(settings)?,
            settings: settings.clone(),
        };
        if !settings.fs_root_on_demand || settings.fs_root.exists() {
            let fs = fs::FsBlock::new(settings)?;
            let _ = blocks.fs.set(Ok(fs));
        } else {
            // Not created yet, but a root that could never be created is
            // still a configuration error at start (exit 2).
            let missing = |p: &std::path::Path| !p.exists();
            let base = settings.fs_root.ancestors().skip(1).find(|p| !missing(p));
            if let Some(base) = base.filter(|b| !b.as_os_str().is_empty() && !b.is_dir()) {
                return Err(SetupError {
                    setting: "WORKER_FS_ROOT",
                    reason: format!(
                        "cannot create {}: {} is not a directory",
                        settings.fs_root.display(),
                        base.display()
                    ),
                });
            }
        }
        Ok(blocks)
    }

    /// The FS block, set up on first use when the root is created on demand.
    /// A root that cannot be set up fails every fs.* step (permanently).
    fn fs(&self) -> Result<&fs::FsBlock, BlockError> {
        let slot = self.fs.get_or_init(|| {
            fs::FsBlock::new(&self.settings).map_err(|e| {
                log::error!("{e}; fs.* steps fail");
                e.to_string()
            })
        });
        slot.as_ref()
            .map_err(|e| BlockError::new(ErrorCode::ExecutionFailed, e.clone()).permanent())
    }

    /// Runs one attempt of `job` on `payload`.
    pub fn execute(
        &self,
        job: JobType,
        payload: &Map<String, Value>,
        ctx: &AttemptContext<'_>,
    ) -> Result<Value, BlockError> {
        match job {
            JobType::HttpRequest => self.http.execute(payload, ctx),
            JobType::FsBlobPut => self.fs()?.put(payload, ctx),
            JobType::FsBlobGet => self.fs()?.get(payload, ctx),
            JobType::FsBlobDelete => self.fs()?.delete(payload, ctx),
            JobType::SqlQuery => self.sql.execute(payload, ctx),
            JobType::DebugEcho => Ok(Value::Object(payload.clone())),
            JobType::DebugSleep => debug::sleep(payload, ctx),
            JobType::DebugFail => debug::fail(payload, ctx),
            JobType::HumanApproval => approval::refuse(payload),
        }
    }

    /// Denies every later `http.request` hop to `addr`, one of the worker's
    /// own listening sockets (`0.0.0.0`/`::` binds cover every local address).
    pub fn deny_own_listener(&self, addr: std::net::SocketAddr) {
        self.http.egress().deny_own_listener(addr);
    }

    /// FS operations abandoned to their helper thread and still running.
    pub fn fs_abandoned(&self) -> usize {
        match self.fs.get() {
            Some(Ok(fs)) => fs.abandoned(),
            _ => 0,
        }
    }

    /// True if a probe file can be created and removed under the FS root.
    pub fn fs_root_writable(&self) -> bool {
        self.fs().is_ok_and(fs::FsBlock::root_writable)
    }

    /// The canonical FS root (as configured until it is set up).
    pub fn fs_root(&self) -> &std::path::Path {
        match self.fs.get() {
            Some(Ok(fs)) => fs.root(),
            _ => &self.settings.fs_root,
        }
    }
}
