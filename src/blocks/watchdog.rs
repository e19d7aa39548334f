//! The FS watchdog (SPEC §7, CP2): runs a blocking operation on a helper
//! thread and waits at most a timeout for it. A stuck operation is abandoned
//! to its helper. At most [`MAX_ABANDONED`] helpers (running or abandoned) exist
//! at once; beyond that FS steps fail fast.

use crossbeam_channel::RecvTimeoutError;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

/// Helper threads (running or abandoned) allowed before FS steps fail fast.
pub const MAX_ABANDONED: usize = 64;

const RUNNING: u8 = 0;
const DONE: u8 = 1;
const ABANDONED: u8 = 2;

/// Why the watchdog returned without a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchdogError {
    /// The operation did not finish in time and was abandoned.
    TimedOut,
    /// Too many operations are outstanding; nothing was started.
    Saturated,
    /// The helper thread could not be spawned or died.
    Failed,
}

impl fmt::Display for WatchdogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WatchdogError::TimedOut => "operation timed out",
            WatchdogError::Saturated => "too many stuck file-system operations",
            WatchdogError::Failed => "file-system helper thread failed",
        })
    }
}

/// Counts helper threads; cheap to share.
#[derive(Debug, Default, Clone)]
pub struct Watchdog {
    /// Helpers alive: running for a waiting caller, or abandoned.
    outstanding: Arc<AtomicUsize>,
    /// Helpers abandoned and still blocked in their operation.
    abandoned: Arc<AtomicUsize>,
}

/// Held by a helper thread; releases its slot when the thread ends, even by panic.
struct Slot {
    outstanding: Arc<AtomicUsize>,
    abandoned: Arc<AtomicUsize>,
    state: Arc<AtomicU8>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // The waiter counted us as abandoned before publishing ABANDONED,
        // so this decrement always follows its increment.
        if self.state.swap(DONE, Ordering::AcqRel) == ABANDONED {
            self.abandoned.fetch_sub(1, Ordering::AcqRel);
        }
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Watchdog {
    /// A watchdog with no helpers.
    pub fn new() -> Watchdog {
        Watchdog::default()
    }

    /// Operations abandoned and still blocked in their syscall.
    pub fn abandoned(&self) -> usize {
        self.abandoned.load(Ordering::Acquire)
    }

    /// Reserves a helper slot, or says the watchdog is saturated.
    fn reserve(&self) -> bool {
        self.outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_ABANDONED).then_some(n + 1)
            })
            .is_ok()
    }

    /// Runs `op` on a helper thread and waits up to `timeout` for its result.
    /// With no time left nothing is started.
    pub fn run<T, F>(&self, timeout: Duration, op: F) -> Result<T, WatchdogError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        if timeout.is_zero() {
            return Err(WatchdogError::TimedOut);
        }
        if !self.reserve() {
            return Err(WatchdogError::Saturated);
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let state = Arc::new(AtomicU8::new(RUNNING));
        let slot = Slot {
            outstanding: self.outstanding.clone(),
            abandoned: self.abandoned.clone(),
            state: state.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("caf-fs-op".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let _slot = slot;
                let _ = tx.send(op());
            });
        if spawned.is_err() {
            // The closure, and with it the slot, was dropped: nothing leaks.
            return Err(WatchdogError::Failed);
        }
        match rx.recv_timeout(timeout) {
            Ok(v) => Ok(v),
            Err(RecvTimeoutError::Timeout) => {
                self.abandoned.fetch_add(1, Ordering::AcqRel);
                match state.compare_exchange(
                    RUNNING,
                    ABANDONED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => Err(WatchdogError::TimedOut),
                    Err(_) => {
                        // Finished in the race window: take the result after all.
                        self.abandoned.fetch_sub(1, Ordering::AcqRel);
                        rx.try_recv().map_err(|_| WatchdogError::Failed)
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => Err(WatchdogError::Failed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn returns_fast_results_and_abandons_slow_ones() {
        let w = Watchdog::new();
        assert_eq!(w.run(Duration::from_secs(5), || 7), Ok(7));
        let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
        let start = Instant::now();
        let r = w.run(Duration::from_millis(50), move || release_rx.recv().is_ok());
        assert_eq!(r, Err(WatchdogError::TimedOut));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(w.abandoned(), 1);
        drop(release_tx); // unblocks the helper
        let deadline = Instant::now() + Duration::from_secs(5);
        while w.abandoned() != 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(w.abandoned(), 0);
    }

    #[test]
    fn saturates_at_the_bound() {
        let w = Watchdog::new();
        let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
        for _ in 0..MAX_ABANDONED {
            let rx = release_rx.clone();
            assert_eq!(
                w.run(Duration::from_millis(1), move || rx.recv().is_ok()),
                Err(WatchdogError::TimedOut)
            );
        }
        assert_eq!(
            w.run(Duration::from_secs(1), || 1),
            Err(WatchdogError::Saturated)
        );
        drop(release_tx);
    }

    #[test]
    fn zero_time_left_starts_nothing() {
        let w = Watchdog::new();
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = started.clone();
        let r = w.run(Duration::ZERO, move || s.store(true, Ordering::SeqCst));
        assert_eq!(r, Err(WatchdogError::TimedOut));
        assert!(!started.load(Ordering::SeqCst));
        assert_eq!(w.outstanding.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_panicking_operation_releases_its_slot() {
        let w = Watchdog::new();
        let r: Result<(), _> = w.run(Duration::from_secs(5), || panic!("boom"));
        assert_eq!(r, Err(WatchdogError::Failed));
        let deadline = Instant::now() + Duration::from_secs(5);
        while w.outstanding.load(Ordering::SeqCst) != 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(w.outstanding.load(Ordering::SeqCst), 0);
    }
}
