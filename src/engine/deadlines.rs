//! CP2 deadlines of queued steps: a min-heap ordered by deadline, filled at
//! admission and drained by one deadline thread that sleeps until the
//! earliest deadline (no scan of the assignment table, no polling).
//!
//! Entries are removed lazily: a step that starts, finishes or is cancelled
//! leaves its entry behind, and the entry is skipped when popped. To keep
//! such leftovers from piling up under long deadlines, a push that finds the
//! heap over its threshold keeps only the steps still waiting and sets the
//! next threshold to twice that plus [`COMPACT_SLACK`]: the heap stays within
//! 2 × (steps waiting at the last compaction) + [`COMPACT_SLACK`] entries, and
//! each compaction is paid for by the pushes since the last one (amortised
//! O(1) per step).
//!
//! Entries hold a `Weak`: a finished step's assignment (up to a request body)
//! is freed when its last strong reference goes, not when its entry is
//! popped; only the handle's small allocation waits for the entry.

use super::StepHandle;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Instant;

/// Entries kept beyond twice the waiting steps before a compaction.
const COMPACT_SLACK: usize = 1024;

/// Due entries handed out per call of [`Deadlines::next_due`], so a burst of
/// expiries does not hold the lock against submissions for long.
const BATCH: usize = 1024;

/// One queued step's deadline.
struct Entry {
    at: Instant,
    step: Weak<StepHandle>,
}

// Ordered by deadline only, reversed: `BinaryHeap` is a max-heap.
impl Ord for Entry {
    fn cmp(&self, other: &Entry) -> Ordering {
        other.at.cmp(&self.at)
    }
}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Entry) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Entry {
    fn eq(&self, other: &Entry) -> bool {
        self.at == other.at
    }
}
impl Eq for Entry {}

/// The step behind `e` if it still waits: alive, not started, not cancelled.
fn waiting(e: &Entry) -> Option<Arc<StepHandle>> {
    e.step
        .upgrade()
        .filter(|h| h.started.get().is_none() && !h.cancel.is_cancelled())
}

struct State {
    heap: BinaryHeap<Entry>,
    /// A push beyond this many entries compacts the heap.
    compact_at: usize,
    /// The deadline thread sleeps until this (`Some(None)`: until woken);
    /// `None` while it is awake. A push wakes it only for an earlier entry,
    /// so an ordinary push costs no system call.
    asleep_until: Option<Option<Instant>>,
    stopped: bool,
}

/// The deadline heap, under one lock.
pub(super) struct Deadlines {
    state: Mutex<State>,
    wake: Condvar,
}

impl Deadlines {
    pub fn new() -> Deadlines {
        Deadlines {
            state: Mutex::new(State {
                heap: BinaryHeap::new(),
                compact_at: COMPACT_SLACK,
                asleep_until: None,
                stopped: false,
            }),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Whole heap operations only; a panic cannot leave it half-updated.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches the deadline of the queued step `h` (called at admission).
    pub fn push(&self, h: &Arc<StepHandle>) {
        let at = h.deadline;
        let mut st = self.lock();
        if st.stopped {
            return; // no thread to drain it: hold nothing
        }
        st.heap.push(Entry {
            at,
            step: Arc::downgrade(h),
        });
        if st.heap.len() > st.compact_at {
            st.heap.retain(|e| waiting(e).is_some());
            st.compact_at = 2 * st.heap.len() + COMPACT_SLACK;
        }
        if let Some(until) = st.asleep_until {
            if until.is_none_or(|u| at < u) {
                st.asleep_until = None;
                self.wake.notify_one();
            }
        }
    }

    /// Blocks until a watched step that still waits is at its deadline, then
    /// returns the due ones that still wait (at most [`BATCH`]). `None` once
    /// stopped.
    pub fn next_due(&self) -> Option<Vec<Arc<StepHandle>>> {
        let mut st = self.lock();
        loop {
            if st.stopped {
                return None;
            }
            let now = Instant::now();
            let first = st.heap.peek().map(|e| e.at);
            if first.is_some_and(|at| at <= now) {
                let mut due = Vec::new();
                while due.len() < BATCH && st.heap.peek().is_some_and(|e| e.at <= now) {
                    if let Some(h) = st.heap.pop().as_ref().and_then(waiting) {
                        due.push(h);
                    }
                }
                if !due.is_empty() {
                    return Some(due);
                }
                continue; // only leftovers were due
            }
            st.asleep_until = Some(first);
            st = match first {
                Some(at) => self
                    .wake
                    .wait_timeout(st, at - now)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0),
                None => self.wake.wait(st).unwrap_or_else(|p| p.into_inner()),
            };
            st.asleep_until = None;
        }
    }

    /// Ends the deadline thread (the engine is gone, or it never started)
    /// and drops every entry.
    pub fn stop(&self) {
        let mut st = self.lock();
        st.stopped = true;
        st.heap = BinaryHeap::new();
        drop(st);
        self.wake.notify_all();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{IntakeRules, parse_assignment};
    use std::time::Duration;

    fn handle(i: usize, deadline: Instant) -> Arc<StepHandle> {
        let a = format!(
            r#"{{"version":"1","assignment_id":"a-{i}","request_id":"r","tenant_id":"t","job":{{"type":"debug.echo","payload":{{}}}}}}"#
        );
        let rules = IntakeRules {
            max_body_bytes: 1 << 20,
            strict_ids: false,
            default_deadline_ms: 30_000,
        };
        let a = parse_assignment(a.as_bytes(), &rules).expect("a valid assignment");
        Arc::new(StepHandle::new(a, Instant::now(), deadline, None))
    }

    #[test]
    fn leftovers_of_started_steps_are_compacted_to_a_bound() {
        let d = Deadlines::new();
        let far = Instant::now() + Duration::from_secs(60);
        // 100 steps keep waiting; 20,000 more start right after admission
        // (the usual case: a deadline of 30 s, a queue of milliseconds).
        let queued: Vec<_> = (0..100).map(|i| handle(i, far)).collect();
        for h in &queued {
            d.push(h);
        }
        let mut alive = Vec::new();
        let mut max_len = 0;
        for i in 0..20_000 {
            let h = handle(100 + i, far);
            d.push(&h);
            let _ = h.started.set(Instant::now());
            // Some started steps are still running (alive), most are done.
            if i % 100 == 0 {
                alive.push(h);
            }
            max_len = max_len.max(d.len());
        }
        // Waiting at each compaction: the 100, and the step just pushed
        // (it starts only after its admission).
        let bound = 2 * (queued.len() + 1) + COMPACT_SLACK;
        assert!(max_len <= bound, "heap grew to {max_len} (bound {bound})");
        // A compaction keeps every step still waiting.
        let kept = d
            .lock()
            .heap
            .iter()
            .filter(|e| waiting(e).is_some())
            .count();
        assert_eq!(kept, queued.len());
        assert!(alive.iter().all(|h| h.started.get().is_some()));
    }

    #[test]
    fn a_new_earliest_deadline_wakes_the_thread_and_stop_ends_it() {
        let d = Arc::new(Deadlines::new());
        d.push(&handle(0, Instant::now() + Duration::from_secs(60)));
        let far = handle(1, Instant::now() + Duration::from_secs(60));
        d.push(&far);
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let d = d.clone();
            std::thread::spawn(move || {
                while let Some(due) = d.next_due() {
                    for h in due {
                        let _ = tx.send((h.assignment.assignment_id.clone(), Instant::now()));
                    }
                }
            })
        };
        // Let the thread fall asleep until the far deadline first.
        let t0 = Instant::now();
        while d.lock().asleep_until.is_none() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let near = handle(2, Instant::now() + Duration::from_millis(100));
        d.push(&near);
        let (id, at) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the near deadline was not handed out");
        assert_eq!(id, "a-2");
        let late = at.saturating_duration_since(near.deadline);
        assert!(
            at >= near.deadline && late < Duration::from_secs(1),
            "{late:?} late"
        );
        // The thread sleeps until the far deadline again; stop ends it now.
        let t1 = Instant::now();
        d.stop();
        thread.join().expect("the deadline thread ended");
        assert!(t1.elapsed() < Duration::from_secs(5));
        drop(far);
    }
}
