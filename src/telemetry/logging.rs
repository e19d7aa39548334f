//! JSON logging on stderr (SPEC §10) through env_logger with our own format.
//!
//! Correlation fields come from a thread-local "current step" that the pool
//! threads set while they run a step, so every log line a block writes carries
//! the step's ids without the block knowing about logging context.

use super::redact::redact;
use crate::config::LogFormat;
use crate::contract::Assignment;
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::io::Write;

/// Correlation fields attached to log lines of the current thread.
#[derive(Clone, Default)]
pub struct LogContext {
    fields: Fields,
}

#[derive(Clone, Default)]
enum Fields {
    #[default]
    None,
    /// Copied out of an assignment.
    Owned(Vec<(&'static str, String)>),
    /// Read from a shared step only when a line is written: entering this
    /// context costs a reference count, not a copy of every id (pool
    /// threads enter one per step; few steps log anything).
    Shared(std::sync::Arc<dyn Correlated>),
}

impl std::fmt::Debug for LogContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        self.each(&mut |k, v| {
            list.entry(&(k, v));
        });
        list.finish()
    }
}

/// Something that carries an assignment's correlation fields (a step).
pub trait Correlated: Send + Sync {
    /// The assignment whose ids the log lines carry.
    fn assignment(&self) -> &Assignment;
}

/// Calls `f` with each correlation field of `a` that is present.
fn assignment_fields(a: &Assignment, f: &mut dyn FnMut(&'static str, &str)) {
    let c = a.correlation();
    f("assignment_id", &a.assignment_id);
    f("tenant_id", &a.tenant_id);
    for (k, v) in [
        ("run_id", &c.run_id),
        ("flow_id", &c.flow_id),
        ("step_id", &c.step_id),
        ("trace_id", &c.trace_id),
    ] {
        if let Some(v) = v {
            f(k, v);
        }
    }
}

impl LogContext {
    /// The correlation fields of an assignment (copied).
    pub fn of(a: &Assignment) -> LogContext {
        let mut fields = Vec::new();
        assignment_fields(a, &mut |k, v| fields.push((k, v.to_owned())));
        LogContext {
            fields: Fields::Owned(fields),
        }
    }

    /// The correlation fields of a shared step, read when a line is written.
    pub fn shared(step: std::sync::Arc<dyn Correlated>) -> LogContext {
        LogContext {
            fields: Fields::Shared(step),
        }
    }

    fn each(&self, f: &mut dyn FnMut(&'static str, &str)) {
        match &self.fields {
            Fields::None => {}
            Fields::Owned(fields) => fields.iter().for_each(|(k, v)| f(k, v)),
            Fields::Shared(step) => assignment_fields(step.assignment(), f),
        }
    }
}

thread_local! {
    static CURRENT: RefCell<Option<LogContext>> = const { RefCell::new(None) };
}

/// Restores the previous context when dropped.
#[must_use = "the context is cleared when the guard drops"]
pub struct ContextGuard(Option<LogContext>);

impl Drop for ContextGuard {
    fn drop(&mut self) {
        let prev = self.0.take();
        CURRENT.with(|c| *c.borrow_mut() = prev);
    }
}

/// Sets the correlation context of this thread until the guard drops.
pub fn enter(ctx: LogContext) -> ContextGuard {
    ContextGuard(CURRENT.with(|c| c.borrow_mut().replace(ctx)))
}

struct KvCollector(Map<String, Value>);

impl<'kvs> log::kv::VisitSource<'kvs> for KvCollector {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        let v = serde_json::to_value(&value).unwrap_or_else(|_| Value::String(value.to_string()));
        self.0.insert(key.as_str().to_owned(), v);
        Ok(())
    }
}

/// Builds one JSON log line (without newline) for a record.
pub fn json_line(record: &log::Record<'_>) -> String {
    let mut obj = Map::new();
    obj.insert(
        "timestamp".into(),
        crate::time::rfc3339_micros(std::time::SystemTime::now()).into(),
    );
    obj.insert("level".into(), record.level().as_str().into());
    obj.insert("component".into(), "worker".into());
    obj.insert("message".into(), record.args().to_string().into());
    CURRENT.with(|c| {
        if let Some(ctx) = &*c.borrow() {
            ctx.each(&mut |k, v| {
                obj.insert(k.into(), v.into());
            });
        }
    });
    let mut kv = KvCollector(Map::new());
    let _ = record.key_values().visit(&mut kv);
    // Correlation ids passed explicitly as key-values are lifted to the top level.
    for k in [
        "assignment_id",
        "tenant_id",
        "run_id",
        "flow_id",
        "step_id",
        "trace_id",
    ] {
        if let Some(v) = kv.0.remove(k) {
            obj.insert(k.into(), v);
        }
    }
    obj.insert("context".into(), redact(Value::Object(kv.0)));
    Value::Object(obj).to_string()
}

/// At most `per_sec` lines per one-second window; the rest are counted and
/// reported as one "N similar lines suppressed" line, so a failure storm
/// cannot flood stderr.
#[derive(Debug)]
pub struct RateLimit {
    per_sec: u32,
    what: &'static str,
    state: std::sync::Mutex<(std::time::Instant, u32, u64)>,
}

impl RateLimit {
    /// A limiter of `per_sec` lines; `what` names them in the suppressed line.
    pub fn new(per_sec: u32, what: &'static str) -> RateLimit {
        RateLimit {
            per_sec,
            what,
            state: std::sync::Mutex::new((std::time::Instant::now(), 0, 0)),
        }
    }

    /// True if a line may be written now. Writes the suppressed line first
    /// when a new window opens after suppressing some.
    pub fn admit(&self) -> bool {
        let suppressed = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = std::time::Instant::now();
            if now.duration_since(st.0) >= std::time::Duration::from_secs(1) {
                st.0 = now;
                st.1 = 0;
            }
            if st.1 >= self.per_sec {
                st.2 += 1;
                return false;
            }
            st.1 += 1;
            std::mem::take(&mut st.2)
        };
        self.report(suppressed);
        true
    }

    /// Writes the suppressed line for what is still counted (at shutdown).
    pub fn flush(&self) {
        let suppressed = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut st.2)
        };
        self.report(suppressed);
    }

    fn report(&self, suppressed: u64) {
        if suppressed > 0 {
            log::warn!(suppressed = suppressed;
                "{suppressed} similar lines suppressed ({}; at most {} per second)",
                self.what, self.per_sec);
        }
    }
}

/// Set while `run` draws a progress line on a terminal's stderr: each log
/// line then first clears it (the progress line is redrawn on its next tick).
pub static PROGRESS_LINE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The prefix that clears a progress line, if one is drawn.
fn clear_progress() -> &'static str {
    if PROGRESS_LINE.load(std::sync::atomic::Ordering::Relaxed) {
        "\r\x1b[2K"
    } else {
        ""
    }
}

/// Installs the global logger (once; later calls are ignored) writing to stderr.
pub fn init(filter: &str, format: LogFormat) {
    let mut builder = env_logger::Builder::new();
    builder
        .parse_filters(filter)
        .target(env_logger::Target::Stderr);
    match format {
        LogFormat::Json => {
            builder
                .format(|buf, record| writeln!(buf, "{}{}", clear_progress(), json_line(record)));
        }
        LogFormat::Text => {
            builder.format(|buf, record| {
                let line: Value = serde_json::from_str(&json_line(record)).unwrap_or(Value::Null);
                let ts = line["timestamp"].as_str().unwrap_or("");
                let id = line["assignment_id"]
                    .as_str()
                    .map(|a| format!(" [{a}]"))
                    .unwrap_or_default();
                let ctx = match &line["context"] {
                    Value::Object(m) if !m.is_empty() => format!(" {}", line["context"]),
                    _ => String::new(),
                };
                writeln!(
                    buf,
                    "{}{ts} {:5}{id} {}{ctx}",
                    clear_progress(),
                    record.level(),
                    record.args()
                )
            });
        }
    }
    let _ = builder.try_init();
}

/// Routes panic messages through the logger, so stderr stays one JSON object
/// per line even when a block panics (the panic itself is caught and reported).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let what = panic_message(info.payload());
        log::error!(location = location.as_str(); "panic: {what}");
    }));
}

/// The text of a panic payload (`&str` or `String`), or "unknown panic".
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
