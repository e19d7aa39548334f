//! Settings (SPEC §2): one table of keys, read with the precedence
//! command line > environment > TOML file > default, then validated into a
//! plain [`Settings`] value. No runtime objects are built here.

use crate::blocks::Cidr;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One configurable key: its file key, environment variable and default.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// Config-file key and `--set` name (`io_pool_size`).
    pub name: &'static str,
    /// Environment variable (`WORKER_IO_POOL_SIZE`).
    pub env: &'static str,
    /// Default as text; `None` means unset.
    pub default: Option<&'static str>,
    /// One line for `--help` and docs.
    pub help: &'static str,
}

macro_rules! keys {
    ($($name:literal, $env:literal, $default:expr, $help:literal;)*) => {
        /// Every setting the worker reads, in documentation order.
        pub const KEYS: &[Key] = &[$(Key { name: $name, env: $env, default: $default, help: $help },)*];
    };
}

keys! {
    "profile", "WORKER_PROFILE", Some("cp1"), "cp1 (baseline) or cp2 (all four CP2_* flags on; a flag set explicitly wins)";
    "cp2_advanced_retry_enabled", "CP2_ADVANCED_RETRY_ENABLED", Some("false"), "exponential backoff, classification, retry budget";
    "cp2_complete_timeout_enabled", "CP2_COMPLETE_TIMEOUT_ENABLED", Some("false"), "connect timeout, FS watchdog, total deadline";
    "cp2_queue_management_enabled", "CP2_QUEUE_MANAGEMENT_ENABLED", Some("false"), "bounded queues and queue_full rejection";
    "cp2_observability_metrics_enabled", "CP2_OBSERVABILITY_METRICS_ENABLED", Some("false"), "the /metrics port and metric collection";
    "worker_id", "WORKER_ID", None, "id in acks, results and logs (default <hostname>-<pid>)";
    "cpu_pool_size", "WORKER_CPU_POOL_SIZE", Some("4"), "threads of the cpu pool";
    "io_pool_size", "WORKER_IO_POOL_SIZE", Some("8"), "threads of the io pool";
    "gpu_pool_size", "WORKER_GPU_POOL_SIZE", Some("1"), "threads of the gpu pool";
    "max_queue_size", "WORKER_MAX_QUEUE_SIZE", Some("1000"), "per-pool queue bound (queue management on)";
    "ingress_addr", "WORKER_INGRESS_ADDR", Some("127.0.0.1:9090"), "assignment API address";
    "health_addr", "WORKER_HEALTH_ADDR", Some("0.0.0.0:9091"), "health address";
    "metrics_addr", "WORKER_METRICS_ADDR", Some("0.0.0.0:9092"), "metrics address";
    "max_long_polls", "WORKER_MAX_LONG_POLLS", Some("14"), "result long-polls waiting at once; more are answered at once (0..=14)";
    "api_token", "WORKER_API_TOKEN", None, "bearer token the ingress requires";
    "api_tokens_file", "WORKER_API_TOKENS_FILE", None, "TOML [tokens] table: token = tenant_id, or \"*\" for an operator";
    "fs_root", "WORKER_FS_ROOT", Some("./data"), "root of every fs.* path";
    "default_deadline_ms", "WORKER_DEFAULT_DEADLINE_MS", Some("30000"), "step budget when the assignment gives none";
    "default_max_attempts", "WORKER_DEFAULT_MAX_ATTEMPTS", Some("4"), "attempts when the assignment gives none";
    "retry_base_ms", "WORKER_RETRY_BASE_MS", Some("100"), "CP2 backoff base";
    "retry_max_delay_ms", "WORKER_RETRY_MAX_DELAY_MS", Some("5000"), "CP2 backoff cap";
    "retry_jitter", "WORKER_RETRY_JITTER", Some("none"), "none or full (CP2)";
    "retry_budget_percent", "WORKER_RETRY_BUDGET_PERCENT", Some("20"), "process retry budget, % of first attempts";
    "retry_budget_min_per_sec", "WORKER_RETRY_BUDGET_MIN_PER_SEC", Some("10"), "process retry budget floor per second";
    "http_connect_timeout_ms", "WORKER_HTTP_CONNECT_TIMEOUT_MS", Some("5000"), "CP2 connect timeout";
    "http_deny_nets", "WORKER_HTTP_DENY_NETS", Some("169.254.0.0/16,fe80::/10"), "CIDRs no http.request hop may reach (own ports always denied)";
    "http_allow_nets", "WORKER_HTTP_ALLOW_NETS", None, "if set, the only CIDRs http.request may reach (deny wins)";
    "fs_read_timeout_ms", "WORKER_FS_READ_TIMEOUT_MS", Some("5000"), "CP2 FS read watchdog";
    "fs_write_timeout_ms", "WORKER_FS_WRITE_TIMEOUT_MS", Some("10000"), "CP2 FS write watchdog";
    "fs_delete_timeout_ms", "WORKER_FS_DELETE_TIMEOUT_MS", Some("3000"), "CP2 FS delete watchdog";
    "sql_root", "WORKER_SQL_ROOT", Some("./data/sql"), "root of every sql.query database (<name>.db)";
    "sql_max_rows", "WORKER_SQL_MAX_ROWS", Some("1000"), "default and cap of sql.query max_rows";
    "sql_allow_write", "WORKER_SQL_ALLOW_WRITE", Some("false"), "allow sql.query mode write";
    "sql_timeout_ms", "WORKER_SQL_TIMEOUT_MS", Some("5000"), "CP2 per-attempt limit of a sql.query";
    "max_body_bytes", "WORKER_MAX_BODY_BYTES", Some("1048576"), "largest assignment accepted";
    "max_connections", "WORKER_MAX_CONNECTIONS", Some("1024"), "open connections per port (health and metrics keep a small reserve)";
    "max_response_bytes", "WORKER_MAX_RESPONSE_BYTES", Some("10485760"), "largest HTTP response body a step reads";
    "result_retention", "WORKER_RESULT_RETENTION", Some("10000"), "finished results kept for lookup and de-duplication";
    "result_retention_bytes", "WORKER_RESULT_RETENTION_BYTES", Some("268435456"), "retained results' total size (serialized JSON); oldest evicted first";
    "max_pending_approvals", "WORKER_MAX_PENDING_APPROVALS", Some("10000"), "human.approval steps parked at once (more: queue_full)";
    "results_file", "WORKER_RESULTS_FILE", None, "append every result here as a JSON line";
    "shutdown_grace_ms", "WORKER_SHUTDOWN_GRACE_MS", Some("30000"), "drain time on SIGTERM/SIGINT";
    "strict_ids", "WORKER_STRICT_IDS", Some("true"), "enforce the router's ID formats";
    "metrics_detailed_labels", "WORKER_METRICS_DETAILED_LABELS", Some("false"), "fill run_id/flow_id/step_id labels";
    "metrics_max_tenants", "WORKER_METRICS_MAX_TENANTS", Some("100"), "tenant_id label values before _other";
    "log", "RUST_LOG", Some("info"), "log filter (env_logger syntax)";
    "log_format", "WORKER_LOG_FORMAT", Some("json"), "json or text";
    "nats_url", "WORKER_NATS_URL", None, "NATS server URL(s), comma-separated; enables the NATS front (SPEC §13)";
    "nats_mode", "WORKER_NATS_MODE", Some("jetstream"), "jetstream (at-least-once) or core (at-most-once)";
    "nats_assign_subject", "WORKER_NATS_ASSIGN_SUBJECT", Some("caf.exec.assign.v1"), "assignments in";
    "nats_ack_subject", "WORKER_NATS_ACK_SUBJECT", Some("caf.exec.assign.v1.ack"), "Acks out";
    "nats_result_subject", "WORKER_NATS_RESULT_SUBJECT", Some("caf.exec.result.v1"), "ExecResults out";
    "nats_heartbeat_subject", "WORKER_NATS_HEARTBEAT_SUBJECT", Some("caf.worker.heartbeat.v1"), "heartbeats out";
    "nats_dlq_subject", "WORKER_NATS_DLQ_SUBJECT", Some("caf.exec.dlq.v1"), "undecodable/invalid assignments";
    "nats_approval_subject", "WORKER_NATS_APPROVAL_SUBJECT", Some("caf.exec.approval.v1"), "human.approval decisions in (every worker subscribes)";
    "nats_queue_group", "WORKER_NATS_QUEUE_GROUP", Some("caf-workers"), "core mode queue group";
    "nats_stream", "WORKER_NATS_STREAM", Some("CAF_ASSIGN"), "JetStream stream of assignments";
    "nats_result_stream", "WORKER_NATS_RESULT_STREAM", Some("CAF_RESULTS"), "JetStream stream of results";
    "nats_consumer", "WORKER_NATS_CONSUMER", Some("caf-workers"), "durable pull consumer shared by all workers";
    "nats_ack_wait_ms", "WORKER_NATS_ACK_WAIT_MS", Some("30000"), "consumer ack_wait when the worker creates it";
    "nats_max_deliver", "WORKER_NATS_MAX_DELIVER", Some("5"), "consumer max_deliver when the worker creates it";
    "nats_puback_timeout_ms", "WORKER_NATS_PUBACK_TIMEOUT_MS", Some("2000"), "JetStream: a result with no PubAck after this long is published again";
    "nats_ca_file", "WORKER_NATS_CA_FILE", None, "extra root certificate (PEM) for tls:// NATS servers";
    "heartbeat_interval_ms", "WORKER_HEARTBEAT_INTERVAL_MS", Some("5000"), "NATS heartbeat period";
}

/// The CP2 feature flags (SPEC §2), read once at start-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    /// `CP2_ADVANCED_RETRY_ENABLED`.
    pub advanced_retry: bool,
    /// `CP2_COMPLETE_TIMEOUT_ENABLED`.
    pub complete_timeout: bool,
    /// `CP2_QUEUE_MANAGEMENT_ENABLED`.
    pub queue_management: bool,
    /// `CP2_OBSERVABILITY_METRICS_ENABLED`.
    pub observability_metrics: bool,
}

/// `WORKER_PROFILE`: which generation of behaviour the flags default to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// The CP1 baseline: every `CP2_*` flag defaults to off.
    Cp1,
    /// Wave 1: every `CP2_*` flag defaults to on.
    Cp2,
}

/// `WORKER_RETRY_JITTER`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Sleep exactly the computed delay.
    None,
    /// Sleep uniformly in `[0, delay]`.
    Full,
}

/// `WORKER_LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (SPEC §10).
    Json,
    /// Human-readable lines.
    Text,
}

/// Validated settings. Durations are typed; every field has its §2 default.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `WORKER_PROFILE` (the flags below already reflect it).
    pub profile: Profile,
    /// Feature flags.
    pub flags: Flags,
    /// Worker identity.
    pub worker_id: String,
    /// Threads per pool, indexed by [`crate::contract::PoolKind::index`].
    pub pool_sizes: [usize; 3],
    /// Per-pool queue bound with queue management on.
    pub max_queue_size: usize,
    /// Assignment API; `None` with `WORKER_INGRESS_ADDR=off` (SPEC §13).
    pub ingress_addr: Option<SocketAddr>,
    /// Health port.
    pub health_addr: SocketAddr,
    /// Metrics port.
    pub metrics_addr: SocketAddr,
    /// Result long-polls that may wait at once (`WORKER_MAX_LONG_POLLS`).
    pub max_long_polls: usize,
    /// Bearer token the ingress requires, if any (an operator token).
    pub api_token: Option<String>,
    /// Per-tenant tokens file (read by the server at start-up).
    pub api_tokens_file: Option<PathBuf>,
    /// Root of every fs path.
    pub fs_root: PathBuf,
    /// Step budget when the assignment gives none.
    pub default_deadline: Duration,
    /// Attempts when the assignment gives none.
    pub default_max_attempts: u32,
    /// CP2 backoff base.
    pub retry_base: Duration,
    /// CP2 backoff cap.
    pub retry_max_delay: Duration,
    /// CP2 jitter.
    pub retry_jitter: Jitter,
    /// Process retry budget: percent of first attempts.
    pub retry_budget_percent: u32,
    /// Process retry budget: floor per second.
    pub retry_budget_min_per_sec: u32,
    /// CP2 HTTP connect timeout.
    pub http_connect_timeout: Duration,
    /// Networks no HTTP hop may reach.
    pub http_deny_nets: Vec<Cidr>,
    /// If set, the only networks an HTTP hop may reach.
    pub http_allow_nets: Option<Vec<Cidr>>,
    /// CP2 FS read watchdog.
    pub fs_read_timeout: Duration,
    /// CP2 FS write watchdog.
    pub fs_write_timeout: Duration,
    /// CP2 FS delete watchdog.
    pub fs_delete_timeout: Duration,
    /// Root of every `sql.query` database.
    pub sql_root: PathBuf,
    /// Default and cap of `sql.query` `max_rows`.
    pub sql_max_rows: usize,
    /// Whether `sql.query` may run in `write` mode.
    pub sql_allow_write: bool,
    /// CP2 per-attempt limit of a `sql.query`.
    pub sql_timeout: Duration,
    /// Largest assignment body.
    pub max_body_bytes: usize,
    /// Largest HTTP response body.
    pub max_response_bytes: usize,
    /// Open connections per port (SPEC §15).
    pub max_connections: usize,
    /// Finished results kept.
    pub result_retention: usize,
    /// Total serialized size of the finished results kept.
    pub result_retention_bytes: usize,
    /// `human.approval` steps that may wait for a decision at once.
    pub max_pending_approvals: usize,
    /// JSON Lines results file.
    pub results_file: Option<PathBuf>,
    /// Drain time on shutdown.
    pub shutdown_grace: Duration,
    /// Enforce router ID formats.
    pub strict_ids: bool,
    /// Fill run/flow/step metric labels.
    pub metrics_detailed_labels: bool,
    /// Distinct tenant label values before `_other`.
    pub metrics_max_tenants: usize,
    /// The NATS front (SPEC §13); `None` when `WORKER_NATS_URL` is unset.
    pub nats: Option<NatsSettings>,
    /// `WORKER_HEARTBEAT_INTERVAL_MS`.
    pub heartbeat_interval: Duration,
    /// env_logger filter.
    pub log_filter: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// Not a setting: `run` sets it so a batch without fs.* steps leaves no
    /// FS root behind; `serve` creates the root at start (health probes it).
    pub fs_root_on_demand: bool,
    /// Not a setting: `run` clears it, since a batch never looks a result
    /// up; the result table then retains only the ids it de-duplicates with.
    pub keep_results: bool,
    /// Warnings found while reading (e.g. a flag with an odd value); logged at start.
    pub warnings: Vec<String>,
    /// The effective value and origin of every key, for the start-up log.
    pub effective: BTreeMap<&'static str, (String, Origin)>,
}

/// `WORKER_NATS_MODE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsMode {
    /// Durable pull consumer, at-least-once (the default).
    JetStream,
    /// Queue-group subscription, at-most-once.
    Core,
}

impl NatsMode {
    /// The setting's spelling (also the heartbeat's `mode`).
    pub fn as_str(self) -> &'static str {
        match self {
            NatsMode::JetStream => "jetstream",
            NatsMode::Core => "core",
        }
    }
}

/// The NATS settings of SPEC §13.1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsSettings {
    /// `WORKER_NATS_URL` as given (may hold credentials: never log it).
    pub url: String,
    /// Delivery mode.
    pub mode: NatsMode,
    /// Assignments in.
    pub assign_subject: String,
    /// Acks out.
    pub ack_subject: String,
    /// Results out.
    pub result_subject: String,
    /// Heartbeats out.
    pub heartbeat_subject: String,
    /// Invalid assignments out.
    pub dlq_subject: String,
    /// `human.approval` decisions in (a plain subscription on every worker).
    pub approval_subject: String,
    /// Core mode queue group.
    pub queue_group: String,
    /// JetStream stream of assignments.
    pub stream: String,
    /// JetStream stream of results.
    pub result_stream: String,
    /// Durable pull consumer.
    pub consumer: String,
    /// Consumer `ack_wait` when the worker creates it.
    pub ack_wait: Duration,
    /// Consumer `max_deliver` when the worker creates it.
    pub max_deliver: i64,
    /// A result publish with no PubAck after this long is sent again (same
    /// `Nats-Msg-Id`: the stream drops the copy if the first one landed).
    pub puback_timeout: Duration,
    /// Extra PEM root for TLS.
    pub ca_file: Option<PathBuf>,
}

/// `url` with any `user:pass@`/`token@` part replaced by `[REDACTED]@`, for logs.
pub fn redact_url_list(list: &str) -> String {
    list.split(',')
        .map(|u| {
            let u = u.trim();
            let (scheme, rest) = u.split_once("://").unwrap_or(("", u));
            let rest = match rest.rsplit_once('@') {
                Some((_, host)) => format!("{}@{host}", crate::telemetry::REDACTED),
                None => rest.to_owned(),
            };
            if scheme.is_empty() {
                rest
            } else {
                format!("{scheme}://{rest}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A command-line option.
    Cli,
    /// An environment variable.
    Env,
    /// The TOML file.
    File,
    /// The built-in default.
    Default,
    /// Turned on by `WORKER_PROFILE=cp2` (no explicit value was given).
    Profile,
}

impl Origin {
    /// Lower-case name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Cli => "cli",
            Origin::Env => "env",
            Origin::File => "file",
            Origin::Default => "default",
            Origin::Profile => "profile",
        }
    }
}

/// A configuration problem; its `Display` is the one line printed before exit 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A value that does not parse or is out of range.
    Invalid {
        /// The environment variable naming the setting.
        setting: &'static str,
        /// The config-file / `--set` key of the same setting.
        key: &'static str,
        /// Where the value came from.
        origin: Origin,
        /// The offending value.
        value: String,
        /// What was expected.
        expected: String,
    },
    /// The config file could not be read or parsed.
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A `--set` or file key that names no setting.
    UnknownKey(String),
    /// Two settings that contradict each other; the message names both.
    Conflict(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Invalid {
                setting,
                key,
                origin,
                value,
                expected,
            } => {
                let from = match origin {
                    Origin::Cli => format!("the command line (--set {key})"),
                    Origin::Env => "the environment".to_owned(),
                    Origin::File => format!("the config file (key {key})"),
                    Origin::Default | Origin::Profile => "the default".to_owned(),
                };
                write!(
                    f,
                    "invalid {setting}={value:?} (from {from}): expected {expected}"
                )
            }
            ConfigError::File { path, reason } => {
                write!(f, "config file {}: {reason}", path.display())
            }
            ConfigError::UnknownKey(k) => match closest(k, KEYS.iter().map(|k| k.name)) {
                Some(near) => write!(f, "unknown setting {k:?}; did you mean {near}?"),
                None => write!(
                    f,
                    "unknown setting {k:?} (known: {})",
                    KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
                ),
            },
            ConfigError::Conflict(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The raw inputs of configuration, before any parsing of values.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// Command-line overrides as `(key name, value)`.
    pub cli: Vec<(String, String)>,
    /// The TOML file, if one was given.
    pub config_file: Option<PathBuf>,
    /// Environment snapshot (`std::env::vars()` in production, a map in tests).
    pub env: BTreeMap<String, String>,
}

impl Sources {
    /// Sources with the process environment.
    pub fn from_process_env(cli: Vec<(String, String)>, config_file: Option<PathBuf>) -> Sources {
        Sources {
            cli,
            config_file,
            env: std::env::vars().collect(),
        }
    }
}

/// Looks `name` up in the key table.
pub fn key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

/// Reads and validates every setting.
pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
    let file = match &sources.config_file {
        Some(p) => read_file(p)?,
        None => BTreeMap::new(),
    };
    for (k, _) in &sources.cli {
        if key(k).is_none() {
            return Err(ConfigError::UnknownKey(k.clone()));
        }
    }
    let mut effective = BTreeMap::new();
    for k in KEYS {
        let found = sources
            .cli
            .iter()
            .rev()
            .find(|(n, _)| n == k.name)
            .map(|(_, v)| (v.clone(), Origin::Cli))
            .or_else(|| sources.env.get(k.env).map(|v| (v.clone(), Origin::Env)))
            .or_else(|| file.get(k.name).map(|v| (v.clone(), Origin::File)))
            .or_else(|| k.default.map(|v| (v.to_owned(), Origin::Default)));
        if let Some(v) = found {
            effective.insert(k.name, v);
        }
    }
    let mut reader = Reader {
        values: effective,
        warnings: unknown_env_warnings(&sources.env),
    };
    reader.apply_profile()?;
    reader.build()
}

/// Environment variables that look like settings but are not: the usual
/// typo (`WORKER_IO_POLL_SIZE`) would otherwise be ignored in silence. A
/// warning, not an error: the environment is shared with other software.
fn unknown_env_warnings(env: &BTreeMap<String, String>) -> Vec<String> {
    /// Read by the command line itself, not by the settings table.
    const OTHER_KNOWN: &[&str] = &["WORKER_CONFIG"];
    env.keys()
        .filter(|k| k.starts_with("WORKER_") || k.starts_with("CP2_"))
        .filter(|k| !OTHER_KNOWN.contains(&k.as_str()) && !KEYS.iter().any(|key| key.env == *k))
        .map(|k| {
            let envs = KEYS.iter().map(|key| key.env).chain(OTHER_KNOWN.iter().copied());
            match closest(k, envs) {
                Some(near) => format!("unknown environment variable {k} is ignored; did you mean {near}?"),
                None => format!("unknown environment variable {k} is ignored (settings are listed in README.md, Configuration)"),
            }
        })
        .collect()
}

/// The candidate nearest to `name` by edit distance, if it is near enough to
/// be a likely typo (at most a third of the name's length, at least 2 edits).
pub fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(2);
    let lower = name.to_ascii_lowercase();
    candidates
        .map(|c| (edit_distance(&lower, &c.to_ascii_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Crates whose log lines a `RUST_LOG` module directive can select.
const LOG_TARGETS: &[&str] = &["caf_worker", "tiny_http", "ureq", "ureq_proto", "rustls"];
const LOG_LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

/// Checks a `RUST_LOG` filter (env_logger syntax). env_logger reads an
/// unknown word as a module name, so a typo such as `inof` would silently
/// drop every log line: a bare word must be a level or one of
/// [`LOG_TARGETS`], and `module=level` must name a real level.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    let mut parts = filter.split('/');
    let directives = parts.next().unwrap_or("");
    if parts.nth(1).is_some() {
        return Err("at most one '/' (the message filter) is allowed".to_owned());
    }
    let is_level = |s: &str| s.parse::<log::LevelFilter>().is_ok();
    let known_module = |m: &str| {
        LOG_TARGETS
            .iter()
            .any(|t| m == *t || m.starts_with(&format!("{t}::")))
    };
    let suggest = |w: &str| {
        closest(w, LOG_LEVELS.iter().chain(LOG_TARGETS).copied())
            .map(|n| format!("; did you mean {n}?"))
            .unwrap_or_default()
    };
    for d in directives
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
    {
        match d.split_once('=') {
            None if is_level(d) || known_module(d) => {}
            None => {
                return Err(format!(
                    "{d:?} is neither a level ({}) nor a module of caf-worker ({}){}",
                    LOG_LEVELS.join(", "),
                    LOG_TARGETS.join(", "),
                    suggest(d)
                ));
            }
            Some((module, level)) => {
                let (module, level) = (module.trim(), level.trim());
                if !known_module(module) {
                    return Err(format!(
                        "module {module:?} is not one of caf-worker's ({}){}",
                        LOG_TARGETS.join(", "),
                        suggest(module)
                    ));
                }
                if !level.is_empty() && !is_level(level) {
                    return Err(format!(
                        "{level:?} is not a level ({}){}",
                        LOG_LEVELS.join(", "),
                        suggest(level)
                    ));
                }
            }
        }
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let err = |reason: String| ConfigError::File {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| err(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (k, v) in table {
        if key(&k).is_none() {
            let hint = closest(&k, KEYS.iter().map(|k| k.name))
                .map(|near| format!("; did you mean {near}?"))
                .unwrap_or_else(|| " (keys are listed in README.md, Configuration)".to_owned());
            return Err(err(format!("unknown key {k:?}{hint}")));
        }
        let s = match v {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Float(f) => f.to_string(),
            other => {
                return Err(err(format!(
                    "key {k:?} must be a string, integer or boolean, got {other}"
                )));
            }
        };
        out.insert(k, s);
    }
    Ok(out)
}

struct Reader {
    values: BTreeMap<&'static str, (String, Origin)>,
    warnings: Vec<String>,
}

impl Reader {
    fn raw(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(|(v, _)| v.as_str())
    }

    fn env_of(name: &str) -> &'static str {
        key(name).map_or("?", |k| k.env)
    }

    fn invalid(&self, name: &str, value: &str, expected: &str) -> ConfigError {
        ConfigError::Invalid {
            setting: Self::env_of(name),
            key: key(name).map_or("?", |k| k.name),
            origin: self.values.get(name).map_or(Origin::Default, |(_, o)| *o),
            value: value.to_owned(),
            expected: expected.to_owned(),
        }
    }

    /// An enum setting, matched case-insensitively against `names`.
    fn choice<T: Copy>(&self, name: &str, names: &[(&str, T)]) -> Result<T, ConfigError> {
        let v = self.raw(name).unwrap_or("");
        let lower = v.trim().to_ascii_lowercase();
        names
            .iter()
            .find(|(n, _)| *n == lower)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                let all: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
                self.invalid(name, v, &format!("one of {} (any case)", all.join(", ")))
            })
    }

    /// `WORKER_PROFILE=cp2` turns on every `CP2_*` flag not set explicitly.
    fn apply_profile(&mut self) -> Result<(), ConfigError> {
        let profile = self.choice("profile", &[("cp1", Profile::Cp1), ("cp2", Profile::Cp2)])?;
        if profile == Profile::Cp2 {
            for k in KEYS.iter().filter(|k| k.env.starts_with("CP2_")) {
                let explicit = self
                    .values
                    .get(k.name)
                    .is_some_and(|(_, o)| *o != Origin::Default);
                if !explicit {
                    self.values
                        .insert(k.name, ("true".to_owned(), Origin::Profile));
                }
            }
        }
        Ok(())
    }

    /// A feature flag: true iff `true`/`1`/`yes`; anything else non-empty is false with a warning.
    fn flag(&mut self, name: &str) -> bool {
        let v = self.raw(name).unwrap_or("").trim().to_ascii_lowercase();
        match v.as_str() {
            "true" | "1" | "yes" => true,
            "" | "false" | "0" | "no" => false,
            other => {
                self.warnings.push(format!(
                    "{} has unrecognised value {other:?}; treating it as false (use true, 1 or yes to turn it on; false, 0 or no to turn it off; any case)",
                    Self::env_of(name)
                ));
                false
            }
        }
    }

    fn boolean(&self, name: &str) -> Result<bool, ConfigError> {
        let v = self.raw(name).unwrap_or("");
        match v.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(self.invalid(name, v, "true, false, 1, 0, yes or no (any case)")),
        }
    }

    fn int(&self, name: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
        let v = self.raw(name).unwrap_or("");
        match v.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.invalid(name, v, &format!("an integer in {min}..={max}"))),
        }
    }

    fn millis(&self, name: &str, max: u64) -> Result<Duration, ConfigError> {
        self.int(name, 1, max).map(Duration::from_millis)
    }

    fn addr(&self, name: &str) -> Result<SocketAddr, ConfigError> {
        let v = self.raw(name).unwrap_or("");
        v.trim()
            .parse()
            .map_err(|_| self.invalid(name, v, "an IP:port address such as 127.0.0.1:9090"))
    }

    /// A comma-separated CIDR list; `None` when unset.
    fn cidrs(&self, name: &str) -> Result<Option<Vec<Cidr>>, ConfigError> {
        let Some(v) = self.raw(name) else {
            return Ok(None);
        };
        Cidr::parse_list(v).map(Some).map_err(|e| {
            self.invalid(
                name,
                v,
                &format!("comma-separated CIDRs such as 10.0.0.0/8,fd00::/8 ({e})"),
            )
        })
    }

    /// A NATS subject to publish on: non-empty tokens, no spaces or wildcards.
    fn subject(&self, name: &str) -> Result<String, ConfigError> {
        let v = self.raw(name).unwrap_or("").trim();
        let ok = !v.is_empty()
            && v.len() <= 256
            && v.split('.').all(|t| {
                !t.is_empty() && t != "*" && t != ">" && !t.chars().any(|c| c.is_whitespace())
            });
        if ok {
            Ok(v.to_owned())
        } else {
            Err(self.invalid(
                name,
                v,
                "a NATS subject such as caf.exec.assign.v1 (dot-separated tokens, no spaces or wildcards)",
            ))
        }
    }

    /// A JetStream stream, consumer or queue-group name.
    fn js_name(&self, name: &str) -> Result<String, ConfigError> {
        let v = self.raw(name).unwrap_or("").trim();
        let ok = !v.is_empty()
            && v.len() <= 128
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if ok {
            Ok(v.to_owned())
        } else {
            Err(self.invalid(name, v, "a name of 1..=128 letters, digits, '_' or '-'"))
        }
    }

    fn nats(&self) -> Result<Option<NatsSettings>, ConfigError> {
        let Some(url) = self.optional("nats_url") else {
            return Ok(None);
        };
        let bad_url = url.split(',').map(str::trim).find(|u| {
            let Some((scheme, rest)) = u.split_once("://") else {
                return true;
            };
            let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            !matches!(scheme, "nats" | "tls") || host.is_empty() || host.contains('/')
        });
        if let Some(u) = bad_url {
            return Err(self.invalid(
                "nats_url",
                &redact_url_list(u),
                "nats://[user:pass@ or token@]host:port (or tls://), comma-separated",
            ));
        }
        let mode = match self.raw("nats_mode").unwrap_or("").trim() {
            "jetstream" => NatsMode::JetStream,
            "core" => NatsMode::Core,
            other => return Err(self.invalid("nats_mode", other, "jetstream or core")),
        };
        Ok(Some(NatsSettings {
            url,
            mode,
            assign_subject: self.subject("nats_assign_subject")?,
            ack_subject: self.subject("nats_ack_subject")?,
            result_subject: self.subject("nats_result_subject")?,
            heartbeat_subject: self.subject("nats_heartbeat_subject")?,
            dlq_subject: self.subject("nats_dlq_subject")?,
            approval_subject: self.subject("nats_approval_subject")?,
            queue_group: self.js_name("nats_queue_group")?,
            stream: self.js_name("nats_stream")?,
            result_stream: self.js_name("nats_result_stream")?,
            consumer: self.js_name("nats_consumer")?,
            ack_wait: self.millis("nats_ack_wait_ms", 3_600_000)?,
            max_deliver: self.int("nats_max_deliver", 1, 10_000)? as i64,
            puback_timeout: self.millis("nats_puback_timeout_ms", 600_000)?,
            ca_file: self.optional("nats_ca_file").map(PathBuf::from),
        }))
    }

    fn optional(&self, name: &str) -> Option<String> {
        self.raw(name).filter(|v| !v.is_empty()).map(str::to_owned)
    }

    fn build(mut self) -> Result<Settings, ConfigError> {
        const HOUR_MS: u64 = 3_600_000;
        let flags = Flags {
            advanced_retry: self.flag("cp2_advanced_retry_enabled"),
            complete_timeout: self.flag("cp2_complete_timeout_enabled"),
            queue_management: self.flag("cp2_queue_management_enabled"),
            observability_metrics: self.flag("cp2_observability_metrics_enabled"),
        };
        let retry_base = self
            .int("retry_base_ms", 0, 60_000)
            .map(Duration::from_millis)?;
        let retry_max_delay = self.millis("retry_max_delay_ms", HOUR_MS)?;
        if retry_max_delay < retry_base {
            return Err(ConfigError::Conflict(format!(
                "WORKER_RETRY_BASE_MS ({} ms) is greater than WORKER_RETRY_MAX_DELAY_MS ({} ms): \
                 lower the first (retry_base_ms) or raise the second (retry_max_delay_ms)",
                retry_base.as_millis(),
                retry_max_delay.as_millis()
            )));
        }
        let jitter = self.choice(
            "retry_jitter",
            &[("none", Jitter::None), ("full", Jitter::Full)],
        )?;
        let log_format = self.choice(
            "log_format",
            &[("json", LogFormat::Json), ("text", LogFormat::Text)],
        )?;
        let profile = self.choice("profile", &[("cp1", Profile::Cp1), ("cp2", Profile::Cp2)])?;
        let log_filter = self.raw("log").unwrap_or("info").to_owned();
        if let Err(why) = check_log_filter(&log_filter) {
            return Err(self.invalid(
                "log",
                &log_filter,
                &format!("an env_logger filter such as info or warn,caf_worker=debug: {why}"),
            ));
        }
        let worker_id = self
            .optional("worker_id")
            .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
        let fs_root = PathBuf::from(self.raw("fs_root").unwrap_or("./data"));
        if fs_root.as_os_str().is_empty() {
            return Err(self.invalid("fs_root", "", "a directory path"));
        }
        let sql_root = PathBuf::from(self.raw("sql_root").unwrap_or("./data/sql"));
        if sql_root.as_os_str().is_empty() {
            return Err(self.invalid("sql_root", "", "a directory path"));
        }
        let settings = Settings {
            profile,
            flags,
            worker_id,
            pool_sizes: [
                self.int("cpu_pool_size", 1, 1024)? as usize,
                self.int("io_pool_size", 1, 1024)? as usize,
                self.int("gpu_pool_size", 1, 1024)? as usize,
            ],
            max_queue_size: self.int("max_queue_size", 1, 10_000_000)? as usize,
            ingress_addr: match self.raw("ingress_addr").map(str::trim) {
                Some("off") => None,
                _ => Some(self.addr("ingress_addr")?),
            },
            health_addr: self.addr("health_addr")?,
            metrics_addr: self.addr("metrics_addr")?,
            max_long_polls: self.int("max_long_polls", 0, 14)? as usize,
            api_token: self.optional("api_token"),
            api_tokens_file: self.optional("api_tokens_file").map(PathBuf::from),
            fs_root,
            default_deadline: self.millis("default_deadline_ms", HOUR_MS)?,
            default_max_attempts: self.int("default_max_attempts", 1, 10)? as u32,
            retry_base,
            retry_max_delay,
            retry_jitter: jitter,
            retry_budget_percent: self.int("retry_budget_percent", 0, 1000)? as u32,
            retry_budget_min_per_sec: self.int("retry_budget_min_per_sec", 0, 1_000_000)? as u32,
            http_connect_timeout: self.millis("http_connect_timeout_ms", HOUR_MS)?,
            http_deny_nets: self.cidrs("http_deny_nets")?.unwrap_or_default(),
            http_allow_nets: self.cidrs("http_allow_nets")?,
            fs_read_timeout: self.millis("fs_read_timeout_ms", HOUR_MS)?,
            fs_write_timeout: self.millis("fs_write_timeout_ms", HOUR_MS)?,
            fs_delete_timeout: self.millis("fs_delete_timeout_ms", HOUR_MS)?,
            sql_root,
            sql_max_rows: self.int("sql_max_rows", 1, 1_000_000)? as usize,
            sql_allow_write: self.boolean("sql_allow_write")?,
            sql_timeout: self.millis("sql_timeout_ms", HOUR_MS)?,
            max_body_bytes: self.int("max_body_bytes", 1, 1 << 30)? as usize,
            max_response_bytes: self.int("max_response_bytes", 1, 1 << 32)? as usize,
            max_connections: self.int("max_connections", 1, 1_000_000)? as usize,
            result_retention: self.int("result_retention", 1, 10_000_000)? as usize,
            result_retention_bytes: self.int("result_retention_bytes", 1, 1 << 40)? as usize,
            max_pending_approvals: self.int("max_pending_approvals", 1, 1_000_000)? as usize,
            results_file: self.optional("results_file").map(PathBuf::from),
            shutdown_grace: self
                .int("shutdown_grace_ms", 0, HOUR_MS)
                .map(Duration::from_millis)?,
            strict_ids: self.boolean("strict_ids")?,
            metrics_detailed_labels: self.boolean("metrics_detailed_labels")?,
            metrics_max_tenants: self.int("metrics_max_tenants", 1, 1_000_000)? as usize,
            nats: self.nats()?,
            heartbeat_interval: self.millis("heartbeat_interval_ms", 3_600_000)?,
            log_filter,
            log_format,
            fs_root_on_demand: false,
            keep_results: true,
            warnings: std::mem::take(&mut self.warnings),
            effective: self.values,
        };
        Ok(settings)
    }
}

impl Settings {
    /// Defaults only (no environment, no file): handy for tests and embedding.
    pub fn defaults() -> Settings {
        // The built-in defaults are valid by construction; the test below keeps them so.
        load(&Sources::default()).unwrap_or_else(|e| panic!("built-in defaults are invalid: {e}"))
    }

    /// The effective configuration as JSON for the start-up log, secrets redacted.
    pub fn effective_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for (k, (v, origin)) in &self.effective {
            let v = if *k == "nats_url" {
                &redact_url_list(v)
            } else {
                v
            };
            map.insert(
                (*k).to_owned(),
                serde_json::json!({"value": v, "origin": origin.as_str()}),
            );
        }
        crate::telemetry::redact(serde_json::Value::Object(map))
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Sources {
        Sources {
            env: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Sources::default()
        }
    }

    #[test]
    fn defaults_match_the_spec() {
        let s = Settings::defaults();
        assert_eq!(s.pool_sizes, [4, 8, 1]);
        assert_eq!(s.max_queue_size, 1000);
        assert_eq!(s.default_deadline, Duration::from_millis(30_000));
        assert_eq!(s.default_max_attempts, 4);
        assert_eq!(s.flags, Flags::default());
        assert_eq!(
            s.ingress_addr.map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:9090")
        );
        assert_eq!(s.nats, None);
        assert_eq!(s.heartbeat_interval, Duration::from_millis(5000));
        assert_eq!(s.fs_read_timeout, Duration::from_millis(5000));
        assert_eq!(s.result_retention_bytes, 268_435_456);
        assert_eq!(s.sql_root, PathBuf::from("./data/sql"));
        assert_eq!(s.sql_max_rows, 1000);
        assert!(!s.sql_allow_write);
        assert_eq!(s.sql_timeout, Duration::from_millis(5000));
        assert!(s.strict_ids);
        assert!(s.worker_id.contains('-'));
    }

    #[test]
    fn flags_accept_true_1_yes_and_warn_otherwise() {
        let s = load(&env(&[
            ("CP2_ADVANCED_RETRY_ENABLED", " YES "),
            ("CP2_COMPLETE_TIMEOUT_ENABLED", "1"),
            ("CP2_QUEUE_MANAGEMENT_ENABLED", "on"),
        ]))
        .unwrap();
        assert!(s.flags.advanced_retry && s.flags.complete_timeout);
        assert!(!s.flags.queue_management);
        assert_eq!(s.warnings.len(), 1);
        assert!(s.warnings[0].contains("CP2_QUEUE_MANAGEMENT_ENABLED"));
    }

    #[test]
    fn precedence_cli_env_file_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.toml");
        std::fs::write(
            &file,
            "io_pool_size = 3\ncpu_pool_size = 5\ngpu_pool_size = 2\n",
        )
        .unwrap();
        let mut src = env(&[("WORKER_CPU_POOL_SIZE", "6"), ("WORKER_IO_POOL_SIZE", "7")]);
        src.config_file = Some(file);
        src.cli = vec![("io_pool_size".into(), "9".into())];
        let s = load(&src).unwrap();
        assert_eq!(s.pool_sizes, [6, 9, 2]);
        assert_eq!(s.effective["io_pool_size"].1, Origin::Cli);
        assert_eq!(s.effective["gpu_pool_size"].1, Origin::File);
    }

    #[test]
    fn invalid_values_name_the_setting() {
        let e = load(&env(&[("WORKER_IO_POOL_SIZE", "0")])).unwrap_err();
        assert!(e.to_string().contains("WORKER_IO_POOL_SIZE"), "{e}");
        let e = load(&env(&[("WORKER_DEFAULT_DEADLINE_MS", "abc")])).unwrap_err();
        assert!(e.to_string().contains("WORKER_DEFAULT_DEADLINE_MS"), "{e}");
        for (k, v) in [
            ("WORKER_SQL_MAX_ROWS", "0"),
            ("WORKER_SQL_ALLOW_WRITE", "maybe"),
            ("WORKER_SQL_TIMEOUT_MS", "0"),
            ("WORKER_SQL_ROOT", ""),
        ] {
            let e = load(&env(&[(k, v)])).unwrap_err();
            assert!(e.to_string().contains(k), "{e}");
        }
        let e = load(&env(&[("WORKER_INGRESS_ADDR", "nowhere")])).unwrap_err();
        assert!(e.to_string().contains("WORKER_INGRESS_ADDR"), "{e}");
        let src = Sources {
            cli: vec![("no_such".into(), "1".into())],
            ..Sources::default()
        };
        assert!(matches!(load(&src), Err(ConfigError::UnknownKey(_))));
    }

    #[test]
    fn egress_nets() {
        let s = Settings::defaults();
        assert_eq!(s.http_deny_nets.len(), 2);
        assert!(s.http_allow_nets.is_none());
        let s = load(&env(&[
            ("WORKER_HTTP_DENY_NETS", ""),
            ("WORKER_HTTP_ALLOW_NETS", "10.0.0.0/8, ::1"),
        ]))
        .unwrap();
        assert!(s.http_deny_nets.is_empty());
        assert_eq!(s.http_allow_nets.map(|a| a.len()), Some(2));
        let e = load(&env(&[("WORKER_HTTP_DENY_NETS", "10.0.0.0/40")])).unwrap_err();
        assert!(e.to_string().contains("WORKER_HTTP_DENY_NETS"), "{e}");
    }

    #[test]
    fn max_connections_defaults_to_1024_and_is_validated() {
        assert_eq!(Settings::defaults().max_connections, 1024);
        let s = load(&env(&[("WORKER_MAX_CONNECTIONS", "64")])).unwrap();
        assert_eq!(s.max_connections, 64);
        let e = load(&env(&[("WORKER_MAX_CONNECTIONS", "0")])).unwrap_err();
        assert!(e.to_string().contains("WORKER_MAX_CONNECTIONS"), "{e}");
    }

    #[test]
    fn nats_settings_default_validate_and_redact() {
        let s = load(&env(&[
            (
                "WORKER_NATS_URL",
                "nats://u:pw@127.0.0.1:4222, tls://tok@h:4443",
            ),
            ("WORKER_INGRESS_ADDR", "off"),
        ]))
        .unwrap();
        assert_eq!(s.ingress_addr, None);
        let n = s.nats.clone().unwrap();
        assert_eq!(n.mode, NatsMode::JetStream);
        assert_eq!(n.assign_subject, "caf.exec.assign.v1");
        assert_eq!(n.ack_subject, "caf.exec.assign.v1.ack");
        assert_eq!(
            (n.stream.as_str(), n.result_stream.as_str()),
            ("CAF_ASSIGN", "CAF_RESULTS")
        );
        assert_eq!(
            (n.ack_wait, n.max_deliver, n.puback_timeout),
            (Duration::from_millis(30_000), 5, Duration::from_secs(2))
        );
        let text = s.effective_json().to_string();
        assert!(!text.contains("pw") && !text.contains("tok@"), "{text}");
        assert!(text.contains("127.0.0.1:4222"), "{text}");
        for (k, v) in [
            ("WORKER_NATS_URL", "http://x:1"),
            ("WORKER_NATS_MODE", "push"),
            ("WORKER_NATS_RESULT_SUBJECT", "a..b"),
            ("WORKER_NATS_ASSIGN_SUBJECT", "a.*"),
            ("WORKER_NATS_STREAM", "A.B"),
            ("WORKER_NATS_ACK_WAIT_MS", "0"),
            ("WORKER_NATS_MAX_DELIVER", "0"),
            ("WORKER_NATS_PUBACK_TIMEOUT_MS", "0"),
            ("WORKER_NATS_PUBACK_TIMEOUT_MS", "600001"),
            ("WORKER_HEARTBEAT_INTERVAL_MS", "x"),
        ] {
            let mut pairs = vec![("WORKER_NATS_URL", "nats://127.0.0.1:4222")];
            pairs.push((k, v));
            let e = load(&env(&pairs)).unwrap_err();
            assert!(e.to_string().contains(k), "{e}");
        }
        let e = load(&env(&[("WORKER_NATS_URL", "nats://s3cret@")])).unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn effective_json_redacts_the_token() {
        let s = load(&env(&[("WORKER_API_TOKEN", "s3cret")])).unwrap();
        let text = s.effective_json().to_string();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("[REDACTED]"));
    }

    #[test]
    fn profile_cp2_turns_on_the_flags_an_explicit_flag_wins() {
        let s = load(&env(&[
            ("WORKER_PROFILE", "CP2"),
            ("CP2_QUEUE_MANAGEMENT_ENABLED", "false"),
        ]))
        .unwrap();
        assert_eq!(s.profile, Profile::Cp2);
        assert!(
            s.flags.advanced_retry && s.flags.complete_timeout && s.flags.observability_metrics
        );
        assert!(!s.flags.queue_management);
        assert_eq!(s.effective["cp2_advanced_retry_enabled"].1, Origin::Profile);
        let s = load(&env(&[])).unwrap();
        assert_eq!((s.profile, s.flags), (Profile::Cp1, Flags::default()));
        let e = load(&env(&[("WORKER_PROFILE", "cp3")])).unwrap_err();
        assert!(e.to_string().contains("WORKER_PROFILE"), "{e}");
    }

    #[test]
    fn typos_name_the_closest_key() {
        assert_eq!(
            closest("io_poll_size", KEYS.iter().map(|k| k.name)),
            Some("io_pool_size")
        );
        assert_eq!(closest("zzzzzz", KEYS.iter().map(|k| k.name)), None);
        let s = load(&env(&[
            ("WORKER_IO_POLL_SIZE", "3"),
            ("WORKER_CONFIG", "x"),
        ]))
        .unwrap();
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert!(s.warnings[0].contains("did you mean WORKER_IO_POOL_SIZE?"));
        let src = Sources {
            cli: vec![("io_poll_size".into(), "1".into())],
            ..Sources::default()
        };
        let e = load(&src).unwrap_err().to_string();
        assert!(e.contains("did you mean io_pool_size?"), "{e}");
    }

    #[test]
    fn log_filters_are_checked() {
        for ok in [
            "info",
            "WARN",
            "warn,caf_worker=debug",
            "caf_worker::engine=trace",
            "off",
            "debug/step",
            "",
        ] {
            assert!(check_log_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["inof", "caf_wroker=debug", "caf_worker=loud", "a/b/c"] {
            assert!(check_log_filter(bad).is_err(), "{bad}");
        }
        let e = load(&env(&[("RUST_LOG", "inof")])).unwrap_err().to_string();
        assert!(
            e.contains("RUST_LOG") && e.contains("did you mean info?"),
            "{e}"
        );
    }

    #[test]
    fn enums_ignore_case_and_conflicts_name_both_settings() {
        let s = load(&env(&[
            ("WORKER_LOG_FORMAT", "TEXT"),
            ("WORKER_RETRY_JITTER", "Full"),
        ]))
        .unwrap();
        assert_eq!(
            (s.log_format, s.retry_jitter),
            (LogFormat::Text, Jitter::Full)
        );
        let e = load(&env(&[
            ("WORKER_RETRY_BASE_MS", "300"),
            ("WORKER_RETRY_MAX_DELAY_MS", "200"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("WORKER_RETRY_BASE_MS") && e.contains("WORKER_RETRY_MAX_DELAY_MS"),
            "{e}"
        );
        let e = load(&env(&[("WORKER_STRICT_IDS", "maybe")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("true, false, 1, 0, yes or no"), "{e}");
    }
}
