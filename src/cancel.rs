//! A per-step cancellation token, shared by the ingress (cancel route),
//! shutdown, the engine and the blocks that sleep or wait.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// Why a step was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// `POST /api/v1/assignments/{id}/cancel`.
    User,
    /// The shutdown grace period ran out.
    Shutdown,
    /// The step's deadline passed while it was still queued (CP2).
    Deadline,
}

/// A flag set once; readers poll it between attempts and in sleep slices.
#[derive(Debug, Default)]
pub struct CancelToken(AtomicU8);

const NONE: u8 = 0;
const USER: u8 = 1;
const SHUTDOWN: u8 = 2;
const DEADLINE: u8 = 3;

/// Longest uninterrupted sleep: cancellation and shutdown are seen within this.
pub const SLICE: Duration = Duration::from_millis(50);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    /// Requests cancellation; the first reason wins.
    /// Returns `true` if this call set the token (it was not cancelled yet).
    pub fn cancel(&self, reason: CancelReason) -> bool {
        let v = match reason {
            CancelReason::User => USER,
            CancelReason::Shutdown => SHUTDOWN,
            CancelReason::Deadline => DEADLINE,
        };
        self.0
            .compare_exchange(NONE, v, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The reason, once cancelled.
    pub fn reason(&self) -> Option<CancelReason> {
        match self.0.load(Ordering::Acquire) {
            USER => Some(CancelReason::User),
            SHUTDOWN => Some(CancelReason::Shutdown),
            DEADLINE => Some(CancelReason::Deadline),
            _ => None,
        }
    }

    /// True once cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire) != NONE
    }

    /// Sleeps until `until` in slices of at most [`SLICE`]; returns early
    /// (with `false`) when cancelled.
    pub fn sleep_until(&self, until: Instant) -> bool {
        loop {
            if self.is_cancelled() {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            std::thread::sleep((until - now).min(SLICE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_reason_wins_and_sleep_wakes_early() {
        let t = Arc::new(CancelToken::new());
        assert!(t.sleep_until(Instant::now() + Duration::from_millis(5)));
        let t2 = t.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            assert!(t2.cancel(CancelReason::User));
            assert!(!t2.cancel(CancelReason::Shutdown));
        });
        let start = Instant::now();
        assert!(!t.sleep_until(Instant::now() + Duration::from_secs(10)));
        assert!(start.elapsed() < Duration::from_secs(5));
        h.join().unwrap();
        assert_eq!(t.reason(), Some(CancelReason::User));
    }
}
