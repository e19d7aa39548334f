//! Race-free path confinement (SPEC §12.12): every file a block touches on a
//! tenant's behalf is opened *relative to a directory handle* of its root,
//! one component at a time or with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`, never by a path string the kernel would resolve
//! again later. A symlink anywhere in the path, or a component that would
//! leave the root, is refused ([`ConfineError::Escape`]); swapping a
//! directory for a symlink while an operation runs cannot redirect it,
//! because nothing resolved before is ever resolved again by name.
//!
//! This is the one confinement the worker has. The `fs.*` blocks use it for
//! get, put (and the `mkdir` of its parents), delete and the size check; the
//! coming `sql.query` block (SPEC §14.1: "the same confinement rules as
//! §4.2, symlinks included") must use it for its database files too:
//!
//! ```text
//! let root = confine::open_root(&settings.sql_root)?;             // once per operation
//! let dir  = confine::open_beneath(&root, parent, How::Dir)?;      // or How::CreateDir for writes
//! confine::check_leaf(&dir, name)?;                                // not a symlink, not a directory
//! // hand SQLite "/proc/self/fd/<dir fd>/<name>": the directory is the
//! // handle just opened, so its journal and WAL files land beside the
//! // database, under the root.
//! ```
//!
//! Names starting with `.caf-` are the worker's own (temp files, the health
//! probe): [`is_reserved`] tells callers to refuse them as tenant paths.

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};
use std::sync::atomic::{AtomicBool, Ordering};

/// Prefix of every name the worker keeps for itself under a root.
pub const RESERVED_PREFIX: &str = ".caf-";

/// Prefix of put's temporary files (swept at start-up when stale).
pub const TEMP_PREFIX: &str = ".caf-tmp-";

/// False once the kernel said it has no `openat2` (Linux < 5.6, or a
/// seccomp filter that answers ENOSYS): the component walk is used instead.
static OPENAT2: AtomicBool = AtomicBool::new(true);

/// Why a path could not be opened beneath its root.
#[derive(Debug)]
pub enum ConfineError {
    /// A component is a symlink or would leave the root.
    Escape,
    /// Any other failure (missing file, not a directory, EACCES, …).
    Io(io::Error),
}

impl fmt::Display for ConfineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfineError::Escape => f.write_str("the path leaves the root or crosses a symlink"),
            ConfineError::Io(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ConfineError {}

impl From<Errno> for ConfineError {
    fn from(e: Errno) -> ConfineError {
        match e {
            Errno::LOOP | Errno::XDEV => ConfineError::Escape,
            e => ConfineError::Io(e.into()),
        }
    }
}

/// What [`open_beneath`] opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// An existing file (or directory), read-only.
    Read,
    /// An existing directory, as a handle for further `*at` calls.
    Dir,
    /// A directory, created with its missing parents.
    CreateDir,
}

/// Opens the root directory itself (by its configured path, so a root moved
/// away or remounted is noticed by the next operation).
pub fn open_root(path: &Path) -> io::Result<File> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}

/// Opens `rel` beneath `root` without following any symlink and without
/// leaving `root`. `rel` must be relative and free of `..` (callers
/// normalise first); an empty `rel` names the root itself.
pub fn open_beneath(root: &File, rel: &Path, how: How) -> Result<File, ConfineError> {
    let parts = components(rel)?;
    let last_flags = match how {
        How::Read => OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        How::Dir | How::CreateDir => {
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
        }
    };
    if parts.is_empty() {
        return rustix::fs::openat(root, ".", last_flags, Mode::empty())
            .map(File::from)
            .map_err(ConfineError::from);
    }
    match openat2_beneath(root, rel, last_flags) {
        Some(Ok(fd)) => return Ok(File::from(fd)),
        // A missing directory is what the walk creates; anything else is the answer.
        Some(Err(Errno::NOENT)) if how == How::CreateDir => {}
        // O_DIRECTORY | O_NOFOLLOW on a trailing symlink says ENOTDIR, as it
        // does for a file: the walk tells the two apart.
        Some(Err(Errno::NOTDIR)) => {}
        Some(Err(e)) => return Err(e.into()),
        None => {}
    }
    walk(root, &parts, last_flags, how == How::CreateDir).map(File::from)
}

/// Checks the last component `name` in `dir` before a block hands the path
/// to a library that opens it by name: not a symlink (`Escape`), not a
/// directory (`Io` with `IsADirectory`). A missing file is fine.
pub fn check_leaf(dir: &File, name: &OsStr) -> Result<(), ConfineError> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => Err(ConfineError::Escape),
            FileType::Directory => Err(ConfineError::Io(Errno::ISDIR.into())),
            _ => Ok(()),
        },
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// True for a path component the worker keeps for itself (`.caf-…`,
/// compared ASCII case-insensitively for case-folding file systems).
pub fn is_reserved(component: &OsStr) -> bool {
    let b = component.as_bytes();
    b.len() >= RESERVED_PREFIX.len()
        && b[..RESERVED_PREFIX.len()].eq_ignore_ascii_case(RESERVED_PREFIX.as_bytes())
}

/// Creates a new file named `<prefix><16 random hex digits>` in `dir` with
/// `O_EXCL` (never an existing file, never through a symlink) and returns it
/// with its name. Only the caller that created it may remove it.
pub fn create_unique(dir: &File, prefix: &str) -> io::Result<(File, String)> {
    let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
    for _ in 0..8 {
        let name = format!("{prefix}{}", random_hex()?);
        match rustix::fs::openat(
            dir,
            name.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o666),
        ) {
            Ok(fd) => return Ok((File::from(fd), name)),
            Err(Errno::EXIST) => last = Errno::EXIST.into(),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last)
}

/// 16 lowercase hex digits from the kernel's random source.
fn random_hex() -> io::Result<String> {
    let mut bytes = [0u8; 8];
    let mut filled = 0;
    while filled < bytes.len() {
        let n =
            rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty())?;
        filled += n;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The normal components of `rel`; anything else (`..`, a prefix) is an escape.
fn components(rel: &Path) -> Result<Vec<&OsStr>, ConfineError> {
    let mut parts = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(p) => parts.push(p),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(ConfineError::Escape);
            }
        }
    }
    Ok(parts)
}

/// One `openat2` call, retried while the kernel reports a concurrent rename
/// (EAGAIN). `None`: use the component walk (no `openat2`, or still racing).
fn openat2_beneath(root: &File, rel: &Path, flags: OFlags) -> Option<Result<OwnedFd, Errno>> {
    if !OPENAT2.load(Ordering::Relaxed) {
        return None;
    }
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    for _ in 0..8 {
        match rustix::fs::openat2(root, rel, flags, Mode::empty(), resolve) {
            Err(Errno::AGAIN) => continue,
            Err(Errno::NOSYS) => {
                OPENAT2.store(false, Ordering::Relaxed);
                return None;
            }
            // Some seccomp filters answer EPERM to syscalls they do not know.
            Err(Errno::PERM) => return None,
            r => return Some(r),
        }
    }
    None
}

/// The fallback: `openat(O_NOFOLLOW)` one component at a time, each relative
/// to the handle of the one before; with `create`, missing directories are
/// made on the way (a directory swapped for a symlink after its `mkdirat` is
/// then refused by the `O_NOFOLLOW` open).
fn walk(
    root: &File,
    parts: &[&OsStr],
    last_flags: OFlags,
    create: bool,
) -> Result<OwnedFd, ConfineError> {
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut current: Option<OwnedFd> = None;
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let flags = if last { last_flags } else { dir_flags };
        let at = match &current {
            Some(fd) => fd.as_fd(),
            None => root.as_fd(),
        };
        if create {
            match rustix::fs::mkdirat(at, *part, Mode::from_raw_mode(0o777)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let fd = match rustix::fs::openat(at, *part, flags, Mode::empty()) {
            Ok(fd) => fd,
            // O_DIRECTORY on a symlink says ENOTDIR: tell a link from a file.
            Err(Errno::NOTDIR) => {
                let link = rustix::fs::statat(at, *part, AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
                return Err(if link {
                    ConfineError::Escape
                } else {
                    ConfineError::Io(Errno::NOTDIR.into())
                });
            }
            Err(e) => return Err(e.into()),
        };
        current = Some(fd);
    }
    current.ok_or(ConfineError::Escape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(dir: &Path) -> File {
        open_root(dir).unwrap()
    }

    fn both_ways(f: impl Fn()) {
        f();
        OPENAT2.store(false, Ordering::Relaxed);
        f();
        OPENAT2.store(true, Ordering::Relaxed);
    }

    #[test]
    fn opens_files_and_dirs_beneath_and_refuses_links() {
        let t = tempfile::tempdir().unwrap();
        let (data, outside) = (t.path().join("data"), t.path().join("outside"));
        std::fs::create_dir_all(data.join("a/b")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(data.join("a/b/f"), "in").unwrap();
        std::fs::write(outside.join("s"), "out").unwrap();
        std::os::unix::fs::symlink(&outside, data.join("a/link")).unwrap();
        std::os::unix::fs::symlink(data.join("a/b/f"), data.join("inner")).unwrap();
        both_ways(|| {
            let r = root(&data);
            let mut s = String::new();
            let mut f = open_beneath(&r, Path::new("a/b/f"), How::Read).unwrap();
            io::Read::read_to_string(&mut f, &mut s).unwrap();
            assert_eq!(s, "in");
            assert!(open_beneath(&r, Path::new("a/b"), How::Dir).is_ok());
            for p in ["a/link/s", "a/link", "inner", "../outside/s", "/etc/passwd"] {
                let e = open_beneath(&r, Path::new(p), How::Read).unwrap_err();
                assert!(matches!(e, ConfineError::Escape), "{p}: {e:?}");
            }
            let e = open_beneath(&r, Path::new("a/link/x"), How::CreateDir).unwrap_err();
            assert!(matches!(e, ConfineError::Escape), "{e:?}");
            let e = open_beneath(&r, Path::new("a/missing"), How::Read).unwrap_err();
            assert!(matches!(&e, ConfineError::Io(e) if e.kind() == io::ErrorKind::NotFound));
        });
        assert!(
            open_beneath(&root(&data), Path::new("n/e/w"), How::CreateDir).is_ok()
                && data.join("n/e/w").is_dir()
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
    }

    #[test]
    fn unique_files_are_new_and_reserved_names_are_recognised() {
        let t = tempfile::tempdir().unwrap();
        let r = root(t.path());
        let (_, a) = create_unique(&r, TEMP_PREFIX).unwrap();
        let (_, b) = create_unique(&r, TEMP_PREFIX).unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(TEMP_PREFIX) && a.len() == TEMP_PREFIX.len() + 16);
        assert!(is_reserved(OsStr::new(".caf-x")) && is_reserved(OsStr::new(".CAF-health")));
        assert!(!is_reserved(OsStr::new(".cafe")) && !is_reserved(OsStr::new(".caf")));
        assert!(check_leaf(&r, OsStr::new(&a)).is_ok());
        assert!(check_leaf(&r, OsStr::new("missing")).is_ok());
    }
}
