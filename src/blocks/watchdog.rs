//! The FS watchdog (SPEC §7, CP2): runs a blocking operation on a helper
//! thread and waits at most a timeout for it. A stuck operation is abandoned
//! to its helper; at most [`MAX_ABANDONED`] may be outstanding at once.

use crossbeam_channel::RecvTimeoutError;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

/// Abandoned operations allowed before FS steps fail fast.
pub const MAX_ABANDONED: usize = 64;

const RUNNING: u8 = 0;
const DONE: u8 = 1;
const ABANDONED: u8 = 2;

/// Why the watchdog returned without a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchdogError {
    /// The operation did not finish in time and was abandoned.
    TimedOut,
    /// Too many operations are already abandoned; nothing was started.
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

/// Counts abandoned operations; cheap to share.
#[derive(Debug, Default, Clone)]
pub struct Watchdog {
    abandoned: Arc<AtomicUsize>,
}

impl Watchdog {
    /// A watchdog with no abandoned operations.
    pub fn new() -> Watchdog {
        Watchdog::default()
    }

    /// Operations abandoned and still blocked in their syscall.
    pub fn abandoned(&self) -> usize {
        self.abandoned.load(Ordering::Acquire)
    }

    /// Runs `op` on a helper thread and waits up to `timeout` for its result.
    pub fn run<T, F>(&self, timeout: Duration, op: F) -> Result<T, WatchdogError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        if self.abandoned() >= MAX_ABANDONED {
            return Err(WatchdogError::Saturated);
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let state = Arc::new(AtomicU8::new(RUNNING));
        let helper_state = state.clone();
        let abandoned = self.abandoned.clone();
        let spawned = std::thread::Builder::new()
            .name("caf-fs-op".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let out = op();
                let _ = tx.send(out);
                // The waiter counted us as abandoned before publishing ABANDONED,
                // so this decrement always follows its increment.
                if helper_state.swap(DONE, Ordering::AcqRel) == ABANDONED {
                    abandoned.fetch_sub(1, Ordering::AcqRel);
                }
            });
        if spawned.is_err() {
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
}
