//! A per-step cancellation token, shared by the ingress (cancel route),
//! shutdown, the engine and the blocks that sleep or wait.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
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
/// A block that cannot poll (a running SQLite query) registers a hook with
/// [`CancelToken::on_cancel`] instead.
#[derive(Default)]
pub struct CancelToken {
    state: AtomicU8,
    hook: Mutex<Option<CancelHook>>,
}

/// Called once the token is cancelled, with the reason; must be quick (it
/// runs on the cancelling thread, under the token's hook lock).
pub type CancelHook = Arc<dyn Fn(CancelReason) + Send + Sync>;

impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CancelToken").field(&self.reason()).finish()
    }
}

/// Keeps a hook registered; dropping it unregisters the hook, after which the
/// hook is never called again (not even by a concurrent `cancel`).
#[must_use = "the hook is unregistered when the guard drops"]
pub struct HookGuard<'a>(&'a CancelToken);

impl Drop for HookGuard<'_> {
    fn drop(&mut self) {
        self.0.hook_slot().take();
    }
}

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
        let set = self
            .state
            .compare_exchange(NONE, v, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if set {
            if let Some(hook) = self.hook_slot().as_ref() {
                hook(reason);
            }
        }
        set
    }

    /// Registers `hook` until the guard drops, replacing any earlier one; if
    /// the token is already cancelled the hook runs at once. One hook at a
    /// time: the step's single running attempt owns it.
    pub fn on_cancel(&self, hook: CancelHook) -> HookGuard<'_> {
        let mut slot = self.hook_slot();
        // Checked under the lock `cancel` takes after setting the state, so
        // a concurrent cancel either sees the hook or is seen here.
        if let Some(reason) = self.reason() {
            hook(reason);
        }
        *slot = Some(hook);
        drop(slot);
        HookGuard(self)
    }

    fn hook_slot(&self) -> MutexGuard<'_, Option<CancelHook>> {
        self.hook.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reason, once cancelled.
    pub fn reason(&self) -> Option<CancelReason> {
        match self.state.load(Ordering::Acquire) {
            USER => Some(CancelReason::User),
            SHUTDOWN => Some(CancelReason::Shutdown),
            DEADLINE => Some(CancelReason::Deadline),
            _ => None,
        }
    }

    /// True once cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.state.load(Ordering::Acquire) != NONE
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

    #[test]
    fn hook_runs_once_while_registered_and_at_once_if_already_cancelled() {
        use std::sync::atomic::AtomicUsize;
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = || {
            let c = calls.clone();
            Arc::new(move |_: CancelReason| {
                c.fetch_add(1, Ordering::SeqCst);
            }) as CancelHook
        };
        let t = CancelToken::new();
        drop(t.on_cancel(counter()));
        assert!(t.cancel(CancelReason::Shutdown));
        assert_eq!(calls.load(Ordering::SeqCst), 0, "unregistered hook ran");
        let _g = t.on_cancel(counter());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let t2 = CancelToken::new();
        let _g2 = t2.on_cancel(counter());
        assert!(t2.cancel(CancelReason::User));
        assert!(!t2.cancel(CancelReason::User));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
