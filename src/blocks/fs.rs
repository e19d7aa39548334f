//! `fs.blob_put`, `fs.blob_get`, `fs.blob_delete` (SPEC §4.2): blobs confined
//! to the FS root, atomic puts, and (CP2) a watchdog around every operation.

use super::payload::{optional_bool, optional_str, required_str};
use super::watchdog::{Watchdog, WatchdogError};
use super::{AttemptContext, BlockError, BlockSettings, FsTimeouts, SetupError, TimeoutPhase};
use crate::contract::ErrorCode;
use base64::Engine as _;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// The file-system blob block.
#[derive(Debug)]
pub struct FsBlock {
    root: PathBuf,
    watchdog: Option<Watchdog>,
    timeouts: FsTimeouts,
    /// Largest blob `get` reads (`WORKER_MAX_RESPONSE_BYTES`).
    max_read_bytes: u64,
    /// Set while a health probe of the root is running.
    probing: Arc<AtomicBool>,
}

/// A payload path joined to the root (not yet checked against symlinks).
struct BlobPath {
    /// Normalised relative path, echoed in outputs.
    rel: String,
    /// Absolute path under the root.
    abs: PathBuf,
    /// The path as the payload gave it, for messages.
    raw: String,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Longest wait for the health probe of the FS root.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl FsBlock {
    pub(super) fn new(s: &BlockSettings) -> Result<FsBlock, SetupError> {
        let err = |reason: String| SetupError {
            setting: "WORKER_FS_ROOT",
            reason,
        };
        std::fs::create_dir_all(&s.fs_root)
            .map_err(|e| err(format!("cannot create {}: {e}", s.fs_root.display())))?;
        let root = s
            .fs_root
            .canonicalize()
            .map_err(|e| err(format!("cannot resolve {}: {e}", s.fs_root.display())))?;
        if !root.is_dir() {
            return Err(err(format!("{} is not a directory", root.display())));
        }
        Ok(FsBlock {
            root,
            watchdog: s.fs_watchdog.then(Watchdog::new),
            timeouts: s.fs_timeouts,
            max_read_bytes: s.max_response_bytes as u64,
            probing: Arc::new(AtomicBool::new(false)),
        })
    }

    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    pub(super) fn abandoned(&self) -> usize {
        self.watchdog.as_ref().map_or(0, Watchdog::abandoned)
    }

    /// Creates and removes a probe file, waiting at most [`PROBE_TIMEOUT`]: a
    /// hung root reports unwritable instead of pinning a health thread. One
    /// probe at a time; while a stuck one is still running, the answer is no.
    pub(super) fn root_writable(&self) -> bool {
        if self.probing.swap(true, Ordering::AcqRel) {
            return false;
        }
        let probe = self
            .root
            .join(format!(".caf-health-{}", std::process::id()));
        let probing = self.probing.clone();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let spawned = std::thread::Builder::new()
            .name("caf-fs-probe".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                let ok = std::fs::write(&probe, b"ok").is_ok();
                let _ = std::fs::remove_file(&probe);
                probing.store(false, Ordering::Release);
                let _ = tx.send(ok);
            });
        if spawned.is_err() {
            self.probing.store(false, Ordering::Release);
            return false;
        }
        rx.recv_timeout(PROBE_TIMEOUT).unwrap_or(false)
    }

    pub(super) fn put(
        &self,
        p: &Map<String, Value>,
        ctx: &AttemptContext<'_>,
    ) -> Result<Value, BlockError> {
        let path = self.parse_path(p)?;
        let content = put_content(p)?;
        let overwrite = optional_bool(p, "overwrite")?.unwrap_or(false);
        let root = self.root.clone();
        self.guarded(ctx, self.timeouts.write, move || {
            path.confine(&root)?;
            let BlobPath { rel, abs, .. } = path;
            write_atomic(&root, &abs, &content, overwrite).map(
                |()| json!({"path": rel, "size": content.len(), "sha256": sha256_hex(&content)}),
            )
        })
    }

    pub(super) fn get(
        &self,
        p: &Map<String, Value>,
        ctx: &AttemptContext<'_>,
    ) -> Result<Value, BlockError> {
        let path = self.parse_path(p)?;
        let (root, max) = (self.root.clone(), self.max_read_bytes);
        self.guarded(ctx, self.timeouts.read, move || {
            path.confine(&root)?;
            let BlobPath { rel, abs, .. } = path;
            let meta = std::fs::metadata(&abs).map_err(|e| io_error(&rel, e))?;
            if meta.is_dir() {
                return Err(BlockError::input(
                    ErrorCode::InvalidInput,
                    format!("{rel} is a directory, not a blob"),
                ));
            }
            let too_big = || {
                BlockError::new(
                    ErrorCode::ExecutionFailed,
                    format!("{rel} is larger than WORKER_MAX_RESPONSE_BYTES ({max} bytes)"),
                )
                .permanent()
            };
            if meta.len() > max {
                return Err(too_big());
            }
            // Bounded even if the file grows meanwhile (or is a pipe).
            let mut bytes = Vec::with_capacity(meta.len() as usize);
            std::fs::File::open(&abs)
                .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
                .map_err(|e| io_error(&rel, e))?;
            if bytes.len() as u64 > max {
                return Err(too_big());
            }
            let modified = meta
                .modified()
                .map(crate::time::rfc3339_micros)
                .unwrap_or_default();
            let mut out = json!({
                "path": rel, "size": bytes.len(), "sha256": sha256_hex(&bytes), "modified": modified,
            });
            match String::from_utf8(bytes) {
                Ok(s) => out["content"] = Value::String(s),
                Err(e) => {
                    out["content_base64"] =
                        Value::String(base64::engine::general_purpose::STANDARD.encode(e.as_bytes()))
                }
            }
            Ok(out)
        })
    }

    pub(super) fn delete(
        &self,
        p: &Map<String, Value>,
        ctx: &AttemptContext<'_>,
    ) -> Result<Value, BlockError> {
        let path = self.parse_path(p)?;
        let root = self.root.clone();
        self.guarded(ctx, self.timeouts.delete, move || {
            path.confine(&root)?;
            let BlobPath { rel, abs, .. } = path;
            match std::fs::symlink_metadata(&abs) {
                Ok(m) if m.is_dir() => {
                    return Err(BlockError::input(
                        ErrorCode::InvalidInput,
                        format!("{rel} is a directory, not a blob"),
                    ));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Ok(json!({"path": rel, "deleted": false}));
                }
                Err(e) => return Err(io_error(&rel, e)),
            }
            match std::fs::remove_file(&abs) {
                Ok(()) => Ok(json!({"path": rel, "deleted": true})),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    Ok(json!({"path": rel, "deleted": false}))
                }
                Err(e) => Err(io_error(&rel, e)),
            }
        })
    }

    /// Runs `op` inline (CP1) or under the watchdog (CP2), never past the attempt deadline.
    fn guarded<F>(
        &self,
        ctx: &AttemptContext<'_>,
        op_timeout: Duration,
        op: F,
    ) -> Result<Value, BlockError>
    where
        F: FnOnce() -> Result<Value, BlockError> + Send + 'static,
    {
        let Some(watchdog) = &self.watchdog else {
            return op();
        };
        let (limit, phase) = match ctx.remaining() {
            Some(left) if left < op_timeout => (left, TimeoutPhase::Attempt),
            _ => (op_timeout, TimeoutPhase::Fs),
        };
        match watchdog.run(limit, op) {
            Ok(r) => r,
            Err(WatchdogError::TimedOut) => Err(BlockError::timeout(
                phase,
                format!(
                    "file-system operation did not finish within {} ms",
                    limit.as_millis()
                ),
            )),
            Err(WatchdogError::Saturated) => Err(BlockError::new(
                ErrorCode::ResourceUnavailable,
                format!(
                    "{} file-system operations are stuck; refusing new ones until they finish",
                    super::MAX_ABANDONED
                ),
            )),
            Err(WatchdogError::Failed) => Err(BlockError::new(
                ErrorCode::InternalError,
                "file-system helper thread failed",
            )),
        }
    }

    /// Validates `payload.path` and joins it to the root (no I/O: the
    /// symlink check, which touches the file system, runs under the watchdog).
    fn parse_path(&self, p: &Map<String, Value>) -> Result<BlobPath, BlockError> {
        let (rel, raw) = relative_path(p)?;
        Ok(BlobPath {
            abs: self.root.join(&rel),
            rel: rel.to_string_lossy().into_owned(),
            raw: raw.to_owned(),
        })
    }
}

/// The payload checks of an fs.* step that touch no file (`validate` runs
/// them; the block runs them again before its I/O).
pub(super) fn check_payload(
    job: crate::contract::JobType,
    p: &Map<String, Value>,
) -> Result<(), BlockError> {
    relative_path(p)?;
    if job == crate::contract::JobType::FsBlobPut {
        put_content(p)?;
        optional_bool(p, "overwrite")?;
    }
    Ok(())
}

/// The bytes of a put: `content` or `content_base64`, exactly one.
fn put_content(p: &Map<String, Value>) -> Result<Vec<u8>, BlockError> {
    match (
        optional_str(p, "content")?,
        optional_str(p, "content_base64")?,
    ) {
        (Some(_), Some(_)) => Err(BlockError::input(
            ErrorCode::InvalidInput,
            "give payload.content or payload.content_base64, not both",
        )),
        (Some(c), None) => Ok(c.as_bytes().to_vec()),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map_err(|e| {
                BlockError::input(
                    ErrorCode::InvalidFormat,
                    format!("payload.content_base64 is not valid base64: {e}"),
                )
            }),
        (None, None) => Err(BlockError::input(
            ErrorCode::MissingRequiredField,
            "payload.content or payload.content_base64 is required",
        )),
    }
}

/// `payload.path` normalised to a path relative to the root (no I/O), and
/// the path as given.
fn relative_path(p: &Map<String, Value>) -> Result<(PathBuf, &str), BlockError> {
    let raw = required_str(p, "path")?;
    if raw.contains('\0') {
        return Err(BlockError::input(
            ErrorCode::InvalidInput,
            "payload.path contains a NUL byte",
        ));
    }
    let mut rel = PathBuf::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(part) => rel.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                return Err(BlockError::input(
                    ErrorCode::PermissionDenied,
                    "payload.path must not contain '..' components",
                ));
            }
            Component::Prefix(_) => {
                return Err(BlockError::input(
                    ErrorCode::PermissionDenied,
                    "payload.path has a drive prefix",
                ));
            }
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(BlockError::input(
            ErrorCode::InvalidInput,
            "payload.path must name a file under the FS root",
        ));
    }
    Ok((rel, raw))
}

impl BlobPath {
    /// Follows symlinks of the deepest existing ancestor (and of the file itself)
    /// and refuses the path if the real location is outside the root.
    fn confine(&self, root: &Path) -> Result<(), BlockError> {
        let (abs, raw) = (&self.abs, self.raw.as_str());
        let outside = || {
            BlockError::input(
                ErrorCode::PermissionDenied,
                format!("payload.path {raw:?} resolves outside the FS root"),
            )
        };
        let mut probe = abs.to_path_buf();
        loop {
            match std::fs::symlink_metadata(&probe) {
                Ok(meta) => {
                    let real = match probe.canonicalize() {
                        Ok(r) => r,
                        // A dangling symlink: its target cannot be checked, so refuse it.
                        Err(_) if meta.file_type().is_symlink() => return Err(outside()),
                        Err(e) => return Err(io_error(raw, e)),
                    };
                    return if real.starts_with(root) {
                        Ok(())
                    } else {
                        Err(outside())
                    };
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !probe.pop() || !probe.starts_with(root) {
                        return Err(outside());
                    }
                }
                Err(e) => return Err(io_error(raw, e)),
            }
        }
    }
}

/// Writes `content` to a temporary file beside `dest`, fsyncs it, then renames
/// (or, without overwrite, hard-links so an existing file is never replaced).
fn write_atomic(
    root: &Path,
    dest: &Path,
    content: &[u8],
    overwrite: bool,
) -> Result<(), BlockError> {
    let rel = dest
        .strip_prefix(root)
        .unwrap_or(dest)
        .display()
        .to_string();
    let exists = || {
        BlockError::new(
            ErrorCode::ExecutionFailed,
            format!("{rel} already exists and overwrite is false"),
        )
        .permanent()
    };
    match std::fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => {
            return Err(BlockError::input(
                ErrorCode::InvalidInput,
                format!("{rel} is a directory, not a blob"),
            ));
        }
        Ok(_) if !overwrite => return Err(exists()),
        _ => {}
    }
    let dir = dest.parent().unwrap_or(root);
    std::fs::create_dir_all(dir).map_err(|e| io_error(&rel, e))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| -> io::Result<bool> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(content)?;
        f.sync_all()?;
        if overwrite {
            std::fs::rename(&tmp, dest)?;
            Ok(true)
        } else {
            match std::fs::hard_link(&tmp, dest) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    match result {
        Ok(true) => {
            // Persist the directory entry too; failure here is not worth failing the put.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        }
        Ok(false) => Err(exists()),
        Err(e) => Err(io_error(&rel, e)),
    }
}

fn io_error(rel: &str, e: io::Error) -> BlockError {
    match e.kind() {
        io::ErrorKind::NotFound => BlockError::new(
            ErrorCode::ResourceUnavailable,
            format!("{rel} does not exist"),
        ),
        io::ErrorKind::PermissionDenied => BlockError::input(
            ErrorCode::PermissionDenied,
            format!("{rel}: permission denied"),
        ),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
            BlockError::new(ErrorCode::QuotaExceeded, format!("{rel}: {e}"))
        }
        _ => BlockError::new(ErrorCode::ExecutionFailed, format!("{rel}: {e}")),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in digest.iter() {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 0xf)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_hello() {
        assert_eq!(
            sha256_hex(b"hello"),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }
}
