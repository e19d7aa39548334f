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
#[derive(Debug, Clone, Default)]
pub struct LogContext {
    fields: Vec<(&'static str, String)>,
}

impl LogContext {
    /// The correlation fields of an assignment.
    pub fn of(a: &Assignment) -> LogContext {
        let c = &a.correlation;
        let mut fields = vec![
            ("assignment_id", a.assignment_id.clone()),
            ("tenant_id", a.tenant_id.clone()),
        ];
        for (k, v) in [
            ("run_id", &c.run_id),
            ("flow_id", &c.flow_id),
            ("step_id", &c.step_id),
            ("trace_id", &c.trace_id),
        ] {
            if let Some(v) = v {
                fields.push((k, v.clone()));
            }
        }
        LogContext { fields }
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
            for (k, v) in &ctx.fields {
                obj.insert((*k).into(), v.clone().into());
            }
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
