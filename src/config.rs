//! Settings (SPEC §2): one table of keys, read with the precedence
//! command line > environment > TOML file > default, then validated into a
//! plain [`Settings`] value. No runtime objects are built here.

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
    "api_token", "WORKER_API_TOKEN", None, "bearer token the ingress requires";
    "fs_root", "WORKER_FS_ROOT", Some("./data"), "root of every fs.* path";
    "default_deadline_ms", "WORKER_DEFAULT_DEADLINE_MS", Some("30000"), "step budget when the assignment gives none";
    "default_max_attempts", "WORKER_DEFAULT_MAX_ATTEMPTS", Some("4"), "attempts when the assignment gives none";
    "retry_base_ms", "WORKER_RETRY_BASE_MS", Some("100"), "CP2 backoff base";
    "retry_max_delay_ms", "WORKER_RETRY_MAX_DELAY_MS", Some("5000"), "CP2 backoff cap";
    "retry_jitter", "WORKER_RETRY_JITTER", Some("none"), "none or full (CP2)";
    "retry_budget_percent", "WORKER_RETRY_BUDGET_PERCENT", Some("20"), "process retry budget, % of first attempts";
    "retry_budget_min_per_sec", "WORKER_RETRY_BUDGET_MIN_PER_SEC", Some("10"), "process retry budget floor per second";
    "http_connect_timeout_ms", "WORKER_HTTP_CONNECT_TIMEOUT_MS", Some("5000"), "CP2 connect timeout";
    "fs_read_timeout_ms", "WORKER_FS_READ_TIMEOUT_MS", Some("5000"), "CP2 FS read watchdog";
    "fs_write_timeout_ms", "WORKER_FS_WRITE_TIMEOUT_MS", Some("10000"), "CP2 FS write watchdog";
    "fs_delete_timeout_ms", "WORKER_FS_DELETE_TIMEOUT_MS", Some("3000"), "CP2 FS delete watchdog";
    "max_body_bytes", "WORKER_MAX_BODY_BYTES", Some("1048576"), "largest assignment accepted";
    "max_response_bytes", "WORKER_MAX_RESPONSE_BYTES", Some("10485760"), "largest HTTP response body a step reads";
    "result_retention", "WORKER_RESULT_RETENTION", Some("10000"), "finished results kept for lookup and de-duplication";
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
    "nats_queue_group", "WORKER_NATS_QUEUE_GROUP", Some("caf-workers"), "core mode queue group";
    "nats_stream", "WORKER_NATS_STREAM", Some("CAF_ASSIGN"), "JetStream stream of assignments";
    "nats_result_stream", "WORKER_NATS_RESULT_STREAM", Some("CAF_RESULTS"), "JetStream stream of results";
    "nats_consumer", "WORKER_NATS_CONSUMER", Some("caf-workers"), "durable pull consumer shared by all workers";
    "nats_ack_wait_ms", "WORKER_NATS_ACK_WAIT_MS", Some("30000"), "consumer ack_wait when the worker creates it";
    "nats_max_deliver", "WORKER_NATS_MAX_DELIVER", Some("5"), "consumer max_deliver when the worker creates it";
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
    /// Bearer token the ingress requires, if any.
    pub api_token: Option<String>,
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
    /// CP2 FS read watchdog.
    pub fs_read_timeout: Duration,
    /// CP2 FS write watchdog.
    pub fs_write_timeout: Duration,
    /// CP2 FS delete watchdog.
    pub fs_delete_timeout: Duration,
    /// Largest assignment body.
    pub max_body_bytes: usize,
    /// Largest HTTP response body.
    pub max_response_bytes: usize,
    /// Finished results kept.
    pub result_retention: usize,
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
}

impl Origin {
    /// Lower-case name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Cli => "cli",
            Origin::Env => "env",
            Origin::File => "file",
            Origin::Default => "default",
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
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Invalid {
                setting,
                value,
                expected,
            } => write!(f, "invalid {setting}={value:?}: expected {expected}"),
            ConfigError::File { path, reason } => {
                write!(f, "config file {}: {reason}", path.display())
            }
            ConfigError::UnknownKey(k) => write!(
                f,
                "unknown setting {k:?} (known: {})",
                KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
            ),
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
    Reader {
        values: effective,
        warnings: Vec::new(),
    }
    .build()
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
            return Err(err(format!("unknown key {k:?}")));
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

    fn invalid(name: &str, value: &str, expected: &str) -> ConfigError {
        ConfigError::Invalid {
            setting: Self::env_of(name),
            value: value.to_owned(),
            expected: expected.to_owned(),
        }
    }

    /// A feature flag: true iff `true`/`1`/`yes`; anything else non-empty is false with a warning.
    fn flag(&mut self, name: &str) -> bool {
        let v = self.raw(name).unwrap_or("").trim().to_ascii_lowercase();
        match v.as_str() {
            "true" | "1" | "yes" => true,
            "" | "false" | "0" | "no" => false,
            other => {
                self.warnings.push(format!(
                    "{} has unrecognised value {other:?}; treating it as false (use true, 1 or yes)",
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
            _ => Err(Self::invalid(name, v, "true or false")),
        }
    }

    fn int(&self, name: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
        let v = self.raw(name).unwrap_or("");
        match v.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(Self::invalid(
                name,
                v,
                &format!("an integer in {min}..={max}"),
            )),
        }
    }

    fn millis(&self, name: &str, max: u64) -> Result<Duration, ConfigError> {
        self.int(name, 1, max).map(Duration::from_millis)
    }

    fn addr(&self, name: &str) -> Result<SocketAddr, ConfigError> {
        let v = self.raw(name).unwrap_or("");
        v.trim()
            .parse()
            .map_err(|_| Self::invalid(name, v, "an IP:port address such as 127.0.0.1:9090"))
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
            Err(Self::invalid(
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
            Err(Self::invalid(
                name,
                v,
                "a name of 1..=128 letters, digits, '_' or '-'",
            ))
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
            return Err(Self::invalid(
                "nats_url",
                &redact_url_list(u),
                "nats://[user:pass@ or token@]host:port (or tls://), comma-separated",
            ));
        }
        let mode = match self.raw("nats_mode").unwrap_or("").trim() {
            "jetstream" => NatsMode::JetStream,
            "core" => NatsMode::Core,
            other => return Err(Self::invalid("nats_mode", other, "jetstream or core")),
        };
        Ok(Some(NatsSettings {
            url,
            mode,
            assign_subject: self.subject("nats_assign_subject")?,
            ack_subject: self.subject("nats_ack_subject")?,
            result_subject: self.subject("nats_result_subject")?,
            heartbeat_subject: self.subject("nats_heartbeat_subject")?,
            dlq_subject: self.subject("nats_dlq_subject")?,
            queue_group: self.js_name("nats_queue_group")?,
            stream: self.js_name("nats_stream")?,
            result_stream: self.js_name("nats_result_stream")?,
            consumer: self.js_name("nats_consumer")?,
            ack_wait: self.millis("nats_ack_wait_ms", 3_600_000)?,
            max_deliver: self.int("nats_max_deliver", 1, 10_000)? as i64,
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
            return Err(Self::invalid(
                "retry_max_delay_ms",
                self.raw("retry_max_delay_ms").unwrap_or(""),
                "a value not below WORKER_RETRY_BASE_MS",
            ));
        }
        let jitter = match self.raw("retry_jitter").unwrap_or("").trim() {
            "none" => Jitter::None,
            "full" => Jitter::Full,
            other => return Err(Self::invalid("retry_jitter", other, "none or full")),
        };
        let log_format = match self.raw("log_format").unwrap_or("").trim() {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            other => return Err(Self::invalid("log_format", other, "json or text")),
        };
        let worker_id = self
            .optional("worker_id")
            .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
        let fs_root = PathBuf::from(self.raw("fs_root").unwrap_or("./data"));
        if fs_root.as_os_str().is_empty() {
            return Err(Self::invalid("fs_root", "", "a directory path"));
        }
        let settings = Settings {
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
            api_token: self.optional("api_token"),
            fs_root,
            default_deadline: self.millis("default_deadline_ms", HOUR_MS)?,
            default_max_attempts: self.int("default_max_attempts", 1, 10)? as u32,
            retry_base,
            retry_max_delay,
            retry_jitter: jitter,
            retry_budget_percent: self.int("retry_budget_percent", 0, 1000)? as u32,
            retry_budget_min_per_sec: self.int("retry_budget_min_per_sec", 0, 1_000_000)? as u32,
            http_connect_timeout: self.millis("http_connect_timeout_ms", HOUR_MS)?,
            fs_read_timeout: self.millis("fs_read_timeout_ms", HOUR_MS)?,
            fs_write_timeout: self.millis("fs_write_timeout_ms", HOUR_MS)?,
            fs_delete_timeout: self.millis("fs_delete_timeout_ms", HOUR_MS)?,
            max_body_bytes: self.int("max_body_bytes", 1, 1 << 30)? as usize,
            max_response_bytes: self.int("max_response_bytes", 1, 1 << 32)? as usize,
            result_retention: self.int("result_retention", 1, 10_000_000)? as usize,
            results_file: self.optional("results_file").map(PathBuf::from),
            shutdown_grace: self
                .int("shutdown_grace_ms", 0, HOUR_MS)
                .map(Duration::from_millis)?,
            strict_ids: self.boolean("strict_ids")?,
            metrics_detailed_labels: self.boolean("metrics_detailed_labels")?,
            metrics_max_tenants: self.int("metrics_max_tenants", 1, 1_000_000)? as usize,
            nats: self.nats()?,
            heartbeat_interval: self.millis("heartbeat_interval_ms", 3_600_000)?,
            log_filter: self.raw("log").unwrap_or("info").to_owned(),
            log_format,
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
        let e = load(&env(&[("WORKER_INGRESS_ADDR", "nowhere")])).unwrap_err();
        assert!(e.to_string().contains("WORKER_INGRESS_ADDR"), "{e}");
        let src = Sources {
            cli: vec![("no_such".into(), "1".into())],
            ..Sources::default()
        };
        assert!(matches!(load(&src), Err(ConfigError::UnknownKey(_))));
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
            (n.ack_wait, n.max_deliver),
            (Duration::from_millis(30_000), 5)
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
}
