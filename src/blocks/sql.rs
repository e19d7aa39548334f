//! `sql.query` (SPEC §14.1, docs/SPEC.md §12.9): one bound statement against
//! an SQLite file under the SQL root, on the io pool thread itself.
//!
//! Connections are cached per thread and database (at most
//! [`MAX_CONNECTIONS_PER_THREAD`]), so a point query costs a cached prepared
//! statement, not an open. A query that runs past its limit, or whose step is
//! cancelled, is stopped with SQLite's interrupt from another thread: one
//! timer thread per block (started on first use) fires at the limit, and a
//! hook on the step's cancel token fires on cancel. The interrupt only ends
//! the running statement; the connection stays cached and usable.

use super::confine::{self, ConfineError, How};
use super::payload::{optional_str, optional_u64, required_str, wrong_type};
use super::{AttemptContext, BlockError, BlockSettings, SetupError, TimeoutPhase};
use crate::cancel::{CancelHook, CancelReason};
use crate::contract::ErrorCode;
use base64::Engine as _;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, InterruptHandle, OpenFlags, limits::Limit};
use serde_json::{Map, Number, Value};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Open connections one pool thread keeps (least recently used evicted).
pub const MAX_CONNECTIONS_PER_THREAD: usize = 8;

/// Longest `payload.database` name.
const MAX_NAME_LEN: usize = 255;

/// Pragmas a query may run: they only read. With a value (`PRAGMA x = v`)
/// only the first group is allowed, where the value is an argument (a table
/// name), not an assignment.
const READ_PRAGMAS_WITH_ARG: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
];
const READ_PRAGMAS: &[&str] = &[
    "user_version",
    "application_id",
    "schema_version",
    "page_count",
    "page_size",
    "freelist_count",
    "data_version",
    "encoding",
    "compile_options",
    "function_list",
    "pragma_list",
    "collation_list",
];

/// The `sql.query` block.
#[derive(Debug)]
pub struct SqlBlock {
    /// Canonical SQL root.
    root: PathBuf,
    max_rows: usize,
    allow_write: bool,
    /// CP2 per-attempt limit (`None` in CP1: the attempt deadline only).
    attempt_timeout: Option<Duration>,
    /// Largest result (rows as JSON, roughly) one query may build.
    max_output_bytes: usize,
    timer: Timer,
}

/// A validated payload.
pub(super) struct Request<'a> {
    database: &'a str,
    sql: &'a str,
    params: Option<&'a Value>,
    write: bool,
    max_rows: usize,
}

/// A database file resolved under the root.
struct DbFile {
    abs: PathBuf,
    /// (device, inode) of the existing file; `None` if it does not exist yet.
    id: Option<(u64, u64)>,
}

/// A cached connection and what it was opened for.
struct Cached {
    path: PathBuf,
    write: bool,
    id: (u64, u64),
    conn: Connection,
    interrupt: Arc<InterruptHandle>,
}

thread_local! {
    /// This thread's connections, least recently used first.
    static CONNECTIONS: RefCell<Vec<Cached>> = const { RefCell::new(Vec::new()) };
}

impl SqlBlock {
    pub(super) fn new(s: &BlockSettings) -> Result<SqlBlock, SetupError> {
        // `run` (roots on demand) leaves a missing root alone: a read of a
        // missing database needs no directory, and a write creates it.
        let root = if s.fs_root_on_demand && !s.sql_root.exists() {
            s.sql_root.clone()
        } else {
            super::fs::prepare_root(&s.sql_root, "WORKER_SQL_ROOT")?
        };
        Ok(SqlBlock {
            root,
            max_rows: s.sql_max_rows,
            allow_write: s.sql_allow_write,
            attempt_timeout: s.sql_attempt_timeout,
            max_output_bytes: s.max_response_bytes,
            timer: Timer::default(),
        })
    }

    pub(super) fn execute(
        &self,
        p: &Map<String, Value>,
        ctx: &AttemptContext<'_>,
    ) -> Result<Value, BlockError> {
        let req = self.parse(p)?;
        if req.write && !self.allow_write {
            return Err(BlockError::input(
                ErrorCode::PermissionDenied,
                "mode write needs WORKER_SQL_ALLOW_WRITE=true",
            ));
        }
        let start = Instant::now();
        let limit = match (ctx.deadline, self.attempt_timeout) {
            (Some(d), Some(t)) => Some(d.min(start + t)),
            (d, t) => d.or_else(|| t.map(|t| start + t)),
        };
        if limit.is_some_and(|l| l <= start) {
            return Err(BlockError::timeout(
                TimeoutPhase::Attempt,
                "no time left for the query",
            ));
        }
        let db = self.resolve_database(req.database, req.write)?;
        let cached = checkout(&db, req.write, self.max_output_bytes)?;
        let result = self.run(&cached, &req, limit, start, ctx);
        // A statement may have opened a transaction (`BEGIN`); never leave
        // one open on a connection the next step reuses.
        if !cached.conn.is_autocommit() {
            let _ = cached.conn.execute_batch("ROLLBACK");
        }
        checkin(cached);
        result
    }

    /// Validates the payload (no I/O).
    fn parse<'a>(&self, p: &'a Map<String, Value>) -> Result<Request<'a>, BlockError> {
        parse_request(p, self.max_rows)
    }

    /// Maps `payload.database` to `<root>/<name>.db` and checks it the way
    /// the FS blocks check their paths (no `..`, no symlink out of the root).
    /// A missing file is `RESOURCE_UNAVAILABLE` unless `create` (write mode),
    /// where its missing parent directories are created.
    ///
    /// The one place that turns a name into a file.
    fn resolve_database(&self, name: &str, create: bool) -> Result<DbFile, BlockError> {
        let bad = |why: &str| {
            BlockError::input(
                ErrorCode::InvalidInput,
                format!("payload.database {:?} {why}", clip(name)),
            )
        };
        let rel = database_path(name)?;
        let mut file = rel.into_os_string();
        file.push(".db");
        let rel = PathBuf::from(file);
        let abs = self.root.join(&rel);
        // Race-free check (the FS blocks' resolver): the parent directories
        // are opened beneath the root without following any symlink, and the
        // leaf must not be one. SQLite then opens `abs` by name with
        // SQLITE_OPEN_NOFOLLOW, and the connection cache compares the
        // (device, inode) seen here with what it holds.
        let io_err = |e: io::Error| super::fs::io_error(&format!("database {name:?}"), e);
        let escape = || {
            BlockError::input(
                ErrorCode::PermissionDenied,
                format!(
                    "payload.database {:?} crosses a symlink or resolves outside WORKER_SQL_ROOT",
                    clip(name)
                ),
            )
        };
        let confine_err = |e: ConfineError| match e {
            ConfineError::Escape => escape(),
            ConfineError::Io(e) => io_err(e),
        };
        if create && !self.root.exists() {
            std::fs::create_dir_all(&self.root).map_err(io_err)?;
        }
        let classify = |is_file: bool, is_symlink: bool, id: (u64, u64)| {
            if is_file {
                Ok(DbFile {
                    abs: abs.clone(),
                    id: Some(id),
                })
            } else if is_symlink {
                Err(escape())
            } else {
                Err(bad("is not a database file"))
            }
        };
        if rel.parent().is_none_or(|p| p.as_os_str().is_empty()) {
            // A database directly in the root: no directory between them to
            // swap, so one lstat is as safe as the handle walk (the root is
            // opened by name either way, and SQLite refuses a symlink leaf).
            return match std::fs::symlink_metadata(&abs) {
                Ok(m) => classify(m.is_file(), m.file_type().is_symlink(), (m.dev(), m.ino())),
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    Ok(DbFile { abs, id: None })
                }
                Err(e) => Err(io_err(e)),
            };
        }
        let root = confine::open_root(&self.root).map_err(io_err)?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        let how = if create { How::CreateDir } else { How::Dir };
        let dir = confine::open_beneath(&root, parent, how).map_err(confine_err)?;
        let leaf = rel.file_name().unwrap_or_default();
        match rustix::fs::statat(&dir, leaf, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
                classify(
                    kind == rustix::fs::FileType::RegularFile,
                    kind == rustix::fs::FileType::Symlink,
                    (st.st_dev, st.st_ino),
                )
            }
            Err(rustix::io::Errno::NOENT) if create => Ok(DbFile { abs, id: None }),
            Err(e) => Err(io_err(e.into())),
        }
    }

    /// Prepares, binds and steps the statement under the interrupt guards.
    fn run(
        &self,
        cached: &Cached,
        req: &Request<'_>,
        limit: Option<Instant>,
        start: Instant,
        ctx: &AttemptContext<'_>,
    ) -> Result<Value, BlockError> {
        let shot = Arc::new(Shot {
            handle: cached.interrupt.clone(),
            fired: AtomicU8::new(NOT_FIRED),
        });
        let armed = match limit {
            Some(at) => Some(self.timer.arm(at, shot.clone())?),
            None => None,
        };
        let on_cancel: CancelHook = {
            let shot = shot.clone();
            Arc::new(move |_: CancelReason| shot.fire(BY_CANCEL))
        };
        let hook = ctx.cancel.on_cancel(on_cancel);
        let outcome = self.query(&cached.conn, req);
        // After both guards drop nothing fires any more, so `fired` is final.
        drop(hook);
        drop(armed);
        outcome.map_err(|e| match e {
            Failure::Sql(e) if is_interrupt(&e) => match shot.fired.load(Ordering::Acquire) {
                BY_CANCEL => {
                    BlockError::cancelled(ctx.cancel.reason().unwrap_or(CancelReason::User))
                }
                BY_LIMIT => BlockError::timeout(
                    TimeoutPhase::Attempt,
                    format!(
                        "query interrupted at its time limit after {} ms",
                        start.elapsed().as_millis()
                    ),
                ),
                _ => map_sql_error(e),
            },
            Failure::Sql(e) => map_sql_error(e),
            Failure::Block(b) => b,
        })
    }

    fn query(&self, conn: &Connection, req: &Request<'_>) -> Result<Value, Failure> {
        let mut stmt = conn.prepare_cached(req.sql)?;
        bind(&mut stmt, req.params)?;
        let columns: Vec<Value> = stmt
            .column_names()
            .into_iter()
            .map(|c| Value::String(c.to_owned()))
            .collect();
        let before = conn.total_changes();
        let mut out_rows = Vec::new();
        let mut truncated = false;
        let mut bytes = 0usize;
        let mut rows = stmt.raw_query();
        while let Some(row) = rows.next()? {
            if out_rows.len() >= req.max_rows {
                truncated = true;
                break;
            }
            let mut cells = Vec::with_capacity(columns.len());
            for i in 0..columns.len() {
                let (cell, size) = to_json(row.get_ref(i)?);
                bytes += size;
                cells.push(cell);
            }
            if bytes > self.max_output_bytes {
                return Err(Failure::Block(
                    BlockError::new(
                        ErrorCode::ExecutionFailed,
                        format!(
                            "the result is larger than WORKER_MAX_RESPONSE_BYTES ({} bytes); select fewer rows or columns",
                            self.max_output_bytes
                        ),
                    )
                    .permanent(),
                ));
            }
            out_rows.push(Value::Array(cells));
        }
        drop(rows);
        let mut out = Map::new();
        out.insert("columns".into(), Value::Array(columns));
        out.insert("row_count".into(), Value::from(out_rows.len()));
        out.insert("rows".into(), Value::Array(out_rows));
        out.insert("truncated".into(), Value::Bool(truncated));
        if req.write {
            out.insert(
                "changes".into(),
                Value::from(conn.total_changes().saturating_sub(before)),
            );
            out.insert(
                "last_insert_rowid".into(),
                Value::from(conn.last_insert_rowid()),
            );
        }
        Ok(Value::Object(out))
    }
}

/// A query failure: from SQLite, or already a block error.
enum Failure {
    Sql(rusqlite::Error),
    Block(BlockError),
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Failure {
        Failure::Sql(e)
    }
}

impl From<BlockError> for Failure {
    fn from(e: BlockError) -> Failure {
        Failure::Block(e)
    }
}

/// Binds `params`: an array by position (`?`, `?NNN`), an object by name
/// (`"id"` or `":id"` binds `:id`; `@id` and `$id` likewise). Every parameter
/// needs a value and every value a parameter.
fn bind(stmt: &mut rusqlite::Statement<'_>, params: Option<&Value>) -> Result<(), BlockError> {
    let n = stmt.parameter_count();
    let invalid = |m: String| BlockError::input(ErrorCode::InvalidInput, m);
    let sql_err = |e: rusqlite::Error| invalid(format!("cannot bind a parameter: {e}"));
    match params {
        None if n == 0 => Ok(()),
        None => Err(invalid(format!(
            "the statement has {n} parameter(s) but payload.params is missing"
        ))),
        Some(Value::Array(values)) => {
            if values.len() != n {
                return Err(invalid(format!(
                    "the statement has {n} parameter(s) but payload.params has {} value(s)",
                    values.len()
                )));
            }
            for (i, v) in values.iter().enumerate() {
                let value = to_sql(v, &format!("params[{i}]"))?;
                stmt.raw_bind_parameter(i + 1, value).map_err(sql_err)?;
            }
            Ok(())
        }
        Some(Value::Object(map)) => {
            let mut used = 0;
            for i in 1..=n {
                let Some(name) = stmt.parameter_name(i).map(str::to_owned) else {
                    return Err(invalid(format!(
                        "parameter {i} is positional; give payload.params as an array"
                    )));
                };
                let key = name.get(1..).unwrap_or("");
                let value = match (name.starts_with(['@', ':', '$']), map.get(key)) {
                    (true, Some(v)) => v,
                    _ => match map.get(&name) {
                        Some(v) => v,
                        None => {
                            return Err(invalid(format!(
                                "payload.params has no value for {}",
                                clip(&name)
                            )));
                        }
                    },
                };
                used += 1;
                let value = to_sql(value, &format!("params.{}", clip(key)))?;
                stmt.raw_bind_parameter(i, value).map_err(sql_err)?;
            }
            if used != map.len() {
                return Err(invalid(format!(
                    "payload.params has {} key(s) but the statement uses {used}",
                    map.len()
                )));
            }
            Ok(())
        }
        Some(v) => Err(wrong_type("params", "an array or an object", v)),
    }
}

/// A JSON parameter as an SQLite value; `{"base64": "…"}` is a BLOB.
fn to_sql(v: &Value, field: &str) -> Result<SqlValue, BlockError> {
    let invalid = |m: String| BlockError::input(ErrorCode::InvalidInput, m);
    Ok(match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => SqlValue::Integer(i),
            (None, _) if n.is_u64() => {
                return Err(invalid(format!(
                    "payload.{field} is larger than a 64-bit signed integer"
                )));
            }
            (None, Some(f)) => SqlValue::Real(f),
            (None, None) => return Err(invalid(format!("payload.{field} is not a number"))),
        },
        Value::String(s) => SqlValue::Text(s.clone()),
        Value::Object(o) if o.len() == 1 && o.contains_key("base64") => {
            let text = o["base64"].as_str().ok_or_else(|| {
                BlockError::input(
                    ErrorCode::InvalidFormat,
                    format!("payload.{field}.base64 must be a string"),
                )
            })?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| {
                    BlockError::input(
                        ErrorCode::InvalidFormat,
                        format!("payload.{field}.base64 is not valid base64: {e}"),
                    )
                })?;
            SqlValue::Blob(bytes)
        }
        _ => {
            return Err(invalid(format!(
                "payload.{field} must be null, a boolean, a number, a string or {{\"base64\": …}}"
            )));
        }
    })
}

/// A result cell as JSON, with a rough size for the output cap.
fn to_json(v: ValueRef<'_>) -> (Value, usize) {
    match v {
        ValueRef::Null => (Value::Null, 4),
        ValueRef::Integer(i) => (Value::from(i), 20),
        ValueRef::Real(f) => (Number::from_f64(f).map_or(Value::Null, Value::Number), 24),
        ValueRef::Text(t) => {
            let s = String::from_utf8_lossy(t).into_owned();
            let n = s.len() + 2;
            (Value::String(s), n)
        }
        ValueRef::Blob(b) => {
            let s = base64::engine::general_purpose::STANDARD.encode(b);
            let n = s.len() + 12;
            let mut o = Map::new();
            o.insert("base64".into(), Value::String(s));
            (Value::Object(o), n)
        }
    }
}

fn is_interrupt(e: &rusqlite::Error) -> bool {
    sqlite_code(e) == Some(rusqlite::ErrorCode::OperationInterrupted)
}

/// SQLite's primary code, from a failure of a call or of a prepare.
fn sqlite_code(e: &rusqlite::Error) -> Option<rusqlite::ErrorCode> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => Some(f.code),
        rusqlite::Error::SqlInputError { error, .. } => Some(error.code),
        _ => None,
    }
}

/// The §14.1 code of an SQLite error.
fn map_sql_error(e: rusqlite::Error) -> BlockError {
    use rusqlite::ErrorCode as C;
    let Some(code) = sqlite_code(&e) else {
        return match e {
            rusqlite::Error::MultipleStatement => BlockError::input(
                ErrorCode::InvalidInput,
                "payload.sql must be exactly one statement",
            ),
            rusqlite::Error::InvalidParameterCount(..)
            | rusqlite::Error::InvalidParameterName(_)
            | rusqlite::Error::NulError(_)
            | rusqlite::Error::InvalidQuery => {
                BlockError::input(ErrorCode::InvalidInput, format!("invalid SQL: {e}"))
            }
            other => BlockError::new(ErrorCode::ExecutionFailed, format!("SQLite: {other}")),
        };
    };
    let text = match &e {
        // Its Display repeats the whole statement; the offset is enough.
        rusqlite::Error::SqlInputError { msg, offset, .. } => {
            format!("SQLite: {msg} (at offset {offset} of payload.sql)")
        }
        _ => format!("SQLite: {e}"),
    };
    match code {
        // Syntax errors, unknown tables and columns, type errors in the text.
        C::Unknown | C::ParameterOutOfRange | C::TooBig | C::TypeMismatch => {
            BlockError::input(ErrorCode::InvalidInput, text)
        }
        C::ReadOnly | C::AuthorizationForStatementDenied | C::PermissionDenied => {
            BlockError::input(ErrorCode::PermissionDenied, text)
        }
        C::DatabaseBusy | C::DatabaseLocked => {
            BlockError::new(ErrorCode::ResourceUnavailable, text)
        }
        C::CannotOpen => BlockError::new(ErrorCode::ResourceUnavailable, text),
        C::DiskFull => BlockError::new(ErrorCode::QuotaExceeded, text),
        C::ConstraintViolation => BlockError::new(ErrorCode::ExecutionFailed, text).permanent(),
        _ => BlockError::new(ErrorCode::ExecutionFailed, text),
    }
}

/// Takes this thread's connection for `db` out of the cache, or opens one.
fn checkout(db: &DbFile, write: bool, max_value: usize) -> Result<Cached, BlockError> {
    let found = CONNECTIONS.with_borrow_mut(|conns| {
        let at = conns
            .iter()
            .position(|c| c.write == write && c.path == db.abs)?;
        let c = conns.remove(at);
        // The file was replaced or removed since: that connection is stale.
        (Some(c.id) == db.id).then_some(c)
    });
    if let Some(c) = found {
        return Ok(c);
    }
    let flags = if write {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_NOFOLLOW;
    // No SQLITE_OPEN_URI: the name is a path, never a `file:` URI with options.
    let conn = Connection::open_with_flags(&db.abs, flags).map_err(map_sql_error)?;
    configure(&conn, write, max_value).map_err(map_sql_error)?;
    // A write may just have created the file: identify what was opened.
    let id = match db.id {
        Some(id) => id,
        None => std::fs::symlink_metadata(&db.abs)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|e| super::fs::io_error(&db.abs.display().to_string(), e))?,
    };
    Ok(Cached {
        path: db.abs.clone(),
        write,
        id,
        interrupt: Arc::new(conn.get_interrupt_handle()),
        conn,
    })
}

/// Returns a connection to this thread's cache, evicting the least recently used.
fn checkin(c: Cached) {
    CONNECTIONS.with_borrow_mut(|conns| {
        if conns.len() >= MAX_CONNECTIONS_PER_THREAD {
            conns.remove(0);
        }
        conns.push(c);
    });
}

/// Per-connection guards: no busy wait, no attached files, bounded values,
/// an authorizer.
fn configure(conn: &Connection, write: bool, max_value: usize) -> rusqlite::Result<()> {
    // BUSY surfaces at once as RESOURCE_UNAVAILABLE and the engine's retry
    // policy decides: no pool thread sleeps inside SQLite's busy handler.
    conn.busy_timeout(Duration::ZERO)?;
    // ATTACH (and VACUUM, which attaches) could open files outside the root.
    conn.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)?;
    // No string or BLOB, even an intermediate one, larger than a result may
    // be (SQLite's default is 1 GB per value): bounds a query's memory.
    let max_value = i32::try_from(max_value.max(1 << 20)).unwrap_or(i32::MAX);
    conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, max_value)?;
    conn.set_prepared_statement_cache_capacity(32);
    conn.authorizer(Some(move |ctx: AuthContext<'_>| authorize(&ctx, write)))
}

/// Refuses what would reach outside the database or change the cached
/// connection for later steps: ATTACH/DETACH, pragmas other than reads, and,
/// on read connections, temporary tables (SQLite allows those read-only).
fn authorize(ctx: &AuthContext<'_>, write: bool) -> Authorization {
    match ctx.action {
        AuthAction::Attach { .. } | AuthAction::Detach { .. } => Authorization::Deny,
        AuthAction::Pragma {
            pragma_name,
            pragma_value,
        } => {
            let name = pragma_name.to_ascii_lowercase();
            let ok = READ_PRAGMAS_WITH_ARG.contains(&name.as_str())
                || (pragma_value.is_none() && READ_PRAGMAS.contains(&name.as_str()));
            if ok {
                Authorization::Allow
            } else {
                Authorization::Deny
            }
        }
        AuthAction::CreateTempTable { .. }
        | AuthAction::CreateTempIndex { .. }
        | AuthAction::CreateTempTrigger { .. }
        | AuthAction::CreateTempView { .. }
            if !write =>
        {
            Authorization::Deny
        }
        _ => Authorization::Allow,
    }
}

/// At most 60 characters of user input in a message.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(60) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

// ------------------------------------------------------------------ interrupts

const NOT_FIRED: u8 = 0;
const BY_LIMIT: u8 = 1;
const BY_CANCEL: u8 = 2;

/// One query's interrupt: fired at most once, by the timer or by cancel.
struct Shot {
    handle: Arc<InterruptHandle>,
    fired: AtomicU8,
}

impl Shot {
    fn fire(&self, why: u8) {
        if self
            .fired
            .compare_exchange(NOT_FIRED, why, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.handle.interrupt();
        }
    }
}

/// Interrupts queries at their limit. One thread, started on first use,
/// sleeping until the earliest armed limit; at most one armed query per pool
/// thread, so the map stays small.
#[derive(Default)]
struct Timer {
    shared: Arc<TimerShared>,
}

#[derive(Default)]
struct TimerShared {
    state: Mutex<TimerState>,
    wake: Condvar,
}

#[derive(Default)]
struct TimerState {
    armed: BTreeMap<(Instant, u64), Arc<Shot>>,
    seq: u64,
    running: bool,
    stop: bool,
    /// When the timer thread wakes next on its own (`None`: only when woken).
    wakes_at: Option<Instant>,
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timer").finish_non_exhaustive()
    }
}

/// Disarms its entry on drop; afterwards the timer never fires it.
struct Armed<'a> {
    timer: &'a Timer,
    key: (Instant, u64),
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.timer.shared.lock().armed.remove(&self.key);
    }
}

impl TimerShared {
    fn lock(&self) -> MutexGuard<'_, TimerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Timer {
    fn arm(&self, at: Instant, shot: Arc<Shot>) -> Result<Armed<'_>, BlockError> {
        let mut st = self.shared.lock();
        if !st.running {
            let shared = self.shared.clone();
            std::thread::Builder::new()
                .name("caf-sql-timer".into())
                .stack_size(64 * 1024)
                .spawn(move || timer_loop(&shared))
                .map_err(|e| {
                    BlockError::new(
                        ErrorCode::ResourceUnavailable,
                        format!("cannot start the SQL timer thread: {e}"),
                    )
                })?;
            st.running = true;
        }
        st.seq += 1;
        let key = (at, st.seq);
        st.armed.insert(key, shot);
        // Wake the thread only if it would sleep past this limit: limits of
        // successive queries mostly come later, so most arms wake nobody.
        let wake = st.wakes_at.is_none_or(|w| at < w);
        drop(st);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(Armed { timer: self, key })
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
    }
}

fn timer_loop(shared: &TimerShared) {
    let mut st = shared.lock();
    loop {
        if st.stop {
            return;
        }
        let now = Instant::now();
        while let Some(entry) = st.armed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            entry.remove().fire(BY_LIMIT);
        }
        st.wakes_at = st.armed.keys().next().map(|&(at, _)| at);
        st = match st.wakes_at {
            Some(at) => {
                shared
                    .wake
                    .wait_timeout(st, at.saturating_duration_since(now))
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => shared.wake.wait(st).unwrap_or_else(|p| p.into_inner()),
        };
    }
}

/// `payload.database` as a relative path (without `.db`): segments of
/// letters, digits, `_`, `-` and `.` (not first) joined by `/`; `..` is
/// `PERMISSION_DENIED`. No I/O: `validate` runs it too.
fn database_path(name: &str) -> Result<PathBuf, BlockError> {
    let bad = |why: &str| {
        BlockError::input(
            ErrorCode::InvalidInput,
            format!("payload.database {:?} {why}", clip(name)),
        )
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(bad(&format!("must be 1 to {MAX_NAME_LEN} bytes")));
    }
    let mut rel = PathBuf::new();
    for part in name.split('/') {
        if part == ".." {
            return Err(BlockError::input(
                ErrorCode::PermissionDenied,
                "payload.database must not contain '..' components",
            ));
        }
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
        if part.is_empty() || part.starts_with('.') || !part.chars().all(ok_char) {
            return Err(bad(
                "must be names of letters, digits, '_', '-' and '.' (not first) joined by '/'",
            ));
        }
        rel.push(part);
    }
    Ok(rel)
}

/// Validates a `sql.query` payload (no I/O); `max_rows` is lowered to `cap`.
/// `validate` runs it too, so the two cannot disagree.
pub(super) fn parse_request(p: &Map<String, Value>, cap: usize) -> Result<Request<'_>, BlockError> {
    let database = required_str(p, "database")?;
    database_path(database)?;
    let sql = required_str(p, "sql")?;
    if sql.trim().is_empty() {
        return Err(BlockError::input(
            ErrorCode::InvalidInput,
            "payload.sql is empty",
        ));
    }
    let write = match optional_str(p, "mode")? {
        None | Some("read") => false,
        Some("write") => true,
        Some(other) => {
            return Err(BlockError::input(
                ErrorCode::InvalidInput,
                format!("payload.mode must be read or write, got {:?}", clip(other)),
            ));
        }
    };
    let max_rows = optional_u64(p, "max_rows")?.map_or(cap, |n| n.min(cap as u64) as usize);
    let params = match p.get("params") {
        None | Some(Value::Null) => None,
        Some(v @ (Value::Array(_) | Value::Object(_))) => Some(v),
        Some(v) => return Err(wrong_type("params", "an array or an object", v)),
    };
    Ok(Request {
        database,
        sql,
        params,
        write,
        max_rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_convert_and_reject_what_sqlite_cannot_hold() {
        assert_eq!(to_sql(&Value::from(3), "p").unwrap(), SqlValue::Integer(3));
        assert_eq!(
            to_sql(&Value::from(true), "p").unwrap(),
            SqlValue::Integer(1)
        );
        assert_eq!(to_sql(&Value::from(1.5), "p").unwrap(), SqlValue::Real(1.5));
        assert_eq!(
            to_sql(&serde_json::json!({"base64": "AAE="}), "p").unwrap(),
            SqlValue::Blob(vec![0, 1])
        );
        assert!(to_sql(&Value::from(u64::MAX), "p").is_err());
        assert!(to_sql(&serde_json::json!([1]), "p").is_err());
        assert!(to_sql(&serde_json::json!({"x": 1}), "p").is_err());
    }

    #[test]
    fn interrupt_hits_the_running_query_and_the_connection_keeps_working() {
        let conn = Connection::open_in_memory().unwrap();
        let timer = Timer::default();
        let shot = Arc::new(Shot {
            handle: Arc::new(conn.get_interrupt_handle()),
            fired: AtomicU8::new(NOT_FIRED),
        });
        let armed = timer
            .arm(Instant::now() + Duration::from_millis(50), shot.clone())
            .unwrap();
        let start = Instant::now();
        let e = conn
            .query_row(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap_err();
        drop(armed);
        assert!(is_interrupt(&e), "{e}");
        assert_eq!(shot.fired.load(Ordering::Acquire), BY_LIMIT);
        assert!(start.elapsed() < Duration::from_secs(5));
        let one: i64 = conn.query_row("SELECT 1", [], |r| r.get(0)).unwrap();
        assert_eq!(one, 1);
    }
}
