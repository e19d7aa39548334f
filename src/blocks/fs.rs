//! `fs.blob_put`, `fs.blob_get`, `fs.blob_delete` (SPEC §4.2): blobs confined
//! to the FS root through directory handles ([`super::confine`]), atomic puts
//! with random `O_EXCL` temp files, and (CP2) a watchdog around every operation.

use super::confine::{self, ConfineError, How, TEMP_PREFIX};
use super::payload::{optional_bool, optional_str, required_str};
use super::watchdog::{Watchdog, WatchdogError};
use super::{AttemptContext, BlockError, BlockSettings, FsTimeouts, SetupError, TimeoutPhase};
use crate::contract::ErrorCode;
use base64::Engine as _;
use rustix::fs::{AtFlags, FileType};
use rustix::io::Errno;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

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

/// A validated payload path: relative, normalised, no `..`, no reserved name.
struct BlobPath {
    /// Normalised relative path, echoed in outputs.
    rel: String,
    /// Its directory part (empty for a file in the root).
    parent: PathBuf,
    /// Its last component.
    name: OsString,
    /// The path as the payload gave it, for messages.
    raw: String,
}

/// Longest wait for the health probe of the FS root.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A temp file older than this (and than twice the write watchdog) at
/// start-up belongs to no running put, even of another worker sharing the root.
const STALE_TEMP_AGE: Duration = Duration::from_secs(600);

/// Directory entries the start-up sweep looks at, at most.
const SWEEP_MAX_ENTRIES: usize = 100_000;

/// Deepest directory level the start-up sweep descends to.
const SWEEP_MAX_DEPTH: usize = 32;

impl FsBlock {
    pub(super) fn new(s: &BlockSettings) -> Result<FsBlock, SetupError> {
        let root = prepare_root(&s.fs_root, "WORKER_FS_ROOT")?;
        let stale_after = STALE_TEMP_AGE.max(s.fs_timeouts.write.saturating_mul(2));
        let sweep_root = root.clone();
        // In the background: a large root must not delay start-up.
        let _ = std::thread::Builder::new()
            .name("caf-fs-sweep".into())
            .stack_size(256 * 1024)
            .spawn(move || match sweep_stale_temps(&sweep_root, stale_after) {
                Ok(0) => {}
                Ok(n) => log::info!(removed = n; "removed stale temp files of interrupted puts"),
                Err(e) => log::warn!(error = e.to_string(); "temp file sweep stopped"),
            });
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
    /// The probe has a fresh random reserved name (`.caf-health-<hex>`,
    /// `O_EXCL`): no tenant can create or predict it.
    pub(super) fn root_writable(&self) -> bool {
        if self.probing.swap(true, Ordering::AcqRel) {
            return false;
        }
        let root = self.root.clone();
        let probing = self.probing.clone();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let spawned = std::thread::Builder::new()
            .name("caf-fs-probe".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                let ok = (|| -> io::Result<()> {
                    let dir = confine::open_root(&root)?;
                    let (mut f, name) = confine::create_unique(&dir, ".caf-health-")?;
                    let written = f.write_all(b"ok");
                    rustix::fs::unlinkat(&dir, name.as_str(), AtFlags::empty())?;
                    written
                })()
                .is_ok();
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
            write_atomic(&root, &path, &content, overwrite).map(|()| {
                json!({"path": path.rel, "size": content.len(), "sha256": sha256_hex(&content)})
            })
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
            let rel = path.rel.as_str();
            let dir = confine::open_root(&root).map_err(|e| io_error(rel, e))?;
            let full = path.parent.join(&path.name);
            let file = confine::open_beneath(&dir, &full, How::Read)
                .map_err(|e| path.confine_error(e))?;
            // The size check and the read use the same handle: what was
            // checked is what is read.
            let meta = file.metadata().map_err(|e| io_error(rel, e))?;
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
            file.take(max + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| io_error(rel, e))?;
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
            let rel = path.rel.as_str();
            let gone = || Ok(json!({"path": rel, "deleted": false}));
            let top = confine::open_root(&root).map_err(|e| io_error(rel, e))?;
            let dir = match confine::open_beneath(&top, &path.parent, How::Dir) {
                Ok(d) => d,
                Err(ConfineError::Io(e)) if e.kind() == io::ErrorKind::NotFound => return gone(),
                Err(e) => return Err(path.confine_error(e)),
            };
            match confine::check_leaf(&dir, &path.name) {
                Ok(()) => {}
                Err(e) => return Err(path.confine_error(e)),
            }
            // Unlinking by name in the directory handle: if the name was
            // swapped meanwhile, what goes is an entry under the root (a
            // directory is refused by unlinkat itself).
            match rustix::fs::unlinkat(&dir, path.name.as_os_str(), AtFlags::empty()) {
                Ok(()) => Ok(json!({"path": rel, "deleted": true})),
                Err(Errno::NOENT) => gone(),
                Err(e) => Err(path.confine_error(ConfineError::from(e))),
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

    /// Validates `payload.path` (no I/O: every file-system access runs
    /// under the watchdog). Components starting with `.caf-` are the
    /// worker's own (temp files, the health probe) → `PERMISSION_DENIED`.
    fn parse_path(&self, p: &Map<String, Value>) -> Result<BlobPath, BlockError> {
        let (rel, raw) = relative_path(p)?;
        let Some(name) = rel.file_name().map(OsString::from) else {
            return Err(BlockError::input(
                ErrorCode::InvalidInput,
                "payload.path must name a file under the FS root",
            ));
        };
        Ok(BlobPath {
            rel: rel.to_string_lossy().into_owned(),
            parent: rel.parent().map(Path::to_path_buf).unwrap_or_default(),
            name,
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
            Component::Normal(part) if confine::is_reserved(part) => {
                return Err(BlockError::input(
                    ErrorCode::PermissionDenied,
                    format!(
                        "payload.path component {:?} is reserved for the worker (names starting with {:?})",
                        part.to_string_lossy(),
                        confine::RESERVED_PREFIX
                    ),
                ));
            }
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
    /// The block error for a confinement failure of this path.
    fn confine_error(&self, e: ConfineError) -> BlockError {
        match e {
            ConfineError::Escape => BlockError::input(
                ErrorCode::PermissionDenied,
                format!(
                    "payload.path {:?} crosses a symlink or resolves outside the FS root",
                    self.raw
                ),
            ),
            ConfineError::Io(e) if e.kind() == io::ErrorKind::IsADirectory => BlockError::input(
                ErrorCode::InvalidInput,
                format!("{} is a directory, not a blob", self.rel),
            ),
            ConfineError::Io(e) => io_error(&self.rel, e),
        }
    }
}

/// Writes `content` to a new random temp file (`O_EXCL`) in the blob's
/// directory handle, fsyncs it, then renames it into place (or, without
/// overwrite, hard-links it so an existing file is never replaced). Only that
/// temp file is ever removed.
fn write_atomic(
    root: &Path,
    path: &BlobPath,
    content: &[u8],
    overwrite: bool,
) -> Result<(), BlockError> {
    let rel = path.rel.as_str();
    let exists = || {
        BlockError::new(
            ErrorCode::ExecutionFailed,
            format!("{rel} already exists and overwrite is false"),
        )
        .permanent()
    };
    let top = confine::open_root(root).map_err(|e| io_error(rel, e))?;
    let dir = confine::open_beneath(&top, &path.parent, How::CreateDir)
        .map_err(|e| path.confine_error(e))?;
    let name = path.name.as_os_str();
    match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                return Err(path.confine_error(ConfineError::Io(Errno::ISDIR.into())));
            }
            // Replacing a link would be harmless (rename replaces the link
            // itself), but it is refused like every other symlink.
            FileType::Symlink => return Err(path.confine_error(ConfineError::Escape)),
            _ if !overwrite => return Err(exists()),
            _ => {}
        },
        Err(Errno::NOENT) => {}
        Err(e) => return Err(io_error(rel, e.into())),
    }
    let (mut file, tmp) =
        confine::create_unique(&dir, TEMP_PREFIX).map_err(|e| io_error(rel, e))?;
    let placed = (|| -> io::Result<bool> {
        file.write_all(content)?;
        file.sync_all()?;
        if overwrite {
            rustix::fs::renameat(&dir, tmp.as_str(), &dir, name)?;
            return Ok(true);
        }
        match rustix::fs::linkat(&dir, tmp.as_str(), &dir, name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::EXIST) => Ok(false),
            Err(e) => Err(e.into()),
        }
    })();
    let renamed = overwrite && matches!(placed, Ok(true));
    if !renamed {
        // Ours: created with O_EXCL under a random reserved name no tenant can use.
        let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
    }
    match placed {
        Ok(true) => {
            // Persist the directory entry too; failure here is not worth failing the put.
            let _ = dir.sync_all();
            Ok(())
        }
        Ok(false) => Err(exists()),
        Err(e) if e.kind() == io::ErrorKind::IsADirectory => {
            Err(path.confine_error(ConfineError::Io(e)))
        }
        Err(e) => Err(io_error(rel, e)),
    }
}

/// Removes temp files (`.caf-tmp-*`, regular files only) older than
/// `stale_after` under `root`, breadth first through directory handles
/// (symlinks are never followed), looking at no more than
/// [`SWEEP_MAX_ENTRIES`] entries and [`SWEEP_MAX_DEPTH`] levels.
/// Returns how many it removed.
pub(super) fn sweep_stale_temps(root: &Path, stale_after: Duration) -> io::Result<usize> {
    let cutoff = SystemTime::now()
        .checked_sub(stale_after)
        .unwrap_or(SystemTime::UNIX_EPOCH)
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let top = confine::open_root(root)?;
    let mut queue = std::collections::VecDeque::from([(PathBuf::new(), 0usize)]);
    let (mut seen, mut removed) = (0usize, 0usize);
    while let Some((rel, depth)) = queue.pop_front() {
        let Ok(dir) = confine::open_beneath(&top, &rel, How::Dir) else {
            continue; // gone, or swapped for a link since it was listed
        };
        let Ok(entries) = rustix::fs::Dir::read_from(&dir) else {
            continue;
        };
        for entry in entries {
            let Ok(entry) = entry else { break };
            seen += 1;
            if seen > SWEEP_MAX_ENTRIES {
                return Ok(removed);
            }
            let name = std::ffi::OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let Ok(st) = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory if depth < SWEEP_MAX_DEPTH => {
                    queue.push_back((rel.join(name), depth + 1));
                }
                FileType::RegularFile
                    if name.as_bytes().starts_with(TEMP_PREFIX.as_bytes())
                        && st.st_mtime < cutoff =>
                {
                    removed +=
                        usize::from(rustix::fs::unlinkat(&dir, name, AtFlags::empty()).is_ok());
                }
                _ => {}
            }
        }
    }
    Ok(removed)
}

/// Creates `dir` if missing and returns its canonical form: the root of a
/// block's files (`setting` names it in errors). Shared with `sql.query`.
pub(super) fn prepare_root(dir: &Path, setting: &'static str) -> Result<PathBuf, SetupError> {
    let err = |reason: String| SetupError { setting, reason };
    std::fs::create_dir_all(dir)
        .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    let root = dir
        .canonicalize()
        .map_err(|e| err(format!("cannot resolve {}: {e}", dir.display())))?;
    if !root.is_dir() {
        return Err(err(format!("{} is not a directory", root.display())));
    }
    Ok(root)
}

/// A block error for an I/O failure on `rel` (shared with `sql.query`).
pub(super) fn io_error(rel: &str, e: io::Error) -> BlockError {
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
