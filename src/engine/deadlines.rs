//! CP2 deadlines of queued steps: a min-heap ordered by deadline, filled at
//! admission and drained by one deadline thread that sleeps until the
//! earliest deadline (no scan of the assignment table, no polling).
//!
//! Cheap per step, because almost no step ever reaches its deadline: the
//! heap holds plain numbers (deadline, pool, sequence number), and the steps
//! themselves wait in one FIFO ring per pool, in admission order, which is
//! the order the pool's queue hands them out. A ring holds a `Weak` to each
//! step: the step is freed by whichever thread drops it last (its pool
//! thread, with the step still warm in its cache), not by the admitting
//! thread; with an `Arc` in the ring, the admitting thread freed most steps,
//! cold, and CP2 timeouts cost +11.5 % CPU per echo step against +2.6 %
//! (SPEC §12.16). Each admission first drops the ring's leading steps that
//! started (or were cancelled, or are gone): those left their queue, so the
//! ring holds about what the queue holds, and a step's allocation is
//! released soon after it starts: at the next admission to its pool, or by
//! the deadline thread, which sweeps the rings at least once a second while
//! they hold steps. (Holding finished steps, or even a `Weak` to each, until
//! a compaction made allocations cold and cost 3× more per step; measured,
//! SPEC §12.16.)
//!
//! Heap entries are removed lazily: an entry whose step left its ring is
//! skipped when it comes due, and a push that finds the heap beyond its
//! threshold drops every such entry (integers only, no step is touched) and
//! sets the next threshold to twice what is left plus [`COMPACT_SLACK`]: the
//! heap stays O(steps in the rings), amortised O(1) per step.

use super::StepHandle;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Instant;

/// Entries kept beyond twice the ringed steps before a compaction.
const COMPACT_SLACK: usize = 1024;

/// Due steps handed out per call of [`Deadlines::next_due`], so a burst of
/// expiries does not hold the lock against admissions for long.
const BATCH: usize = 1024;

/// How often the deadline thread, while steps are ringed, releases those
/// that started (a pool with no further admissions releases none itself).
const SWEEP: std::time::Duration = std::time::Duration::from_secs(1);

/// Started steps a push releases from its ring at most (a push adds one, so
/// the ring keeps up with its queue); released after the lock.
const TRIM: usize = 4;

/// One queued step's deadline: its ring and place in it.
struct Entry {
    at: Instant,
    pool: u8,
    seq: u64,
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

/// The steps of one pool admitted and not yet seen started, oldest first;
/// `base` is the sequence number of the front.
#[derive(Default)]
struct Ring {
    steps: VecDeque<Weak<StepHandle>>,
    base: u64,
}

impl Ring {
    /// Pops the front if its step left the queue (started, cancelled or
    /// already gone). The check holds the step for a moment: should its
    /// pool thread drop it meanwhile, the step is freed here, under the
    /// lock (rare: the thread ran it to the end in that moment).
    fn pop_done(&mut self) -> Option<Weak<StepHandle>> {
        let done = match self.steps.front()?.upgrade() {
            None => true,
            Some(h) => !waiting(&h),
        };
        if done {
            self.base += 1;
            return self.steps.pop_front();
        }
        None
    }
}

/// The step still waits for a pool thread: not started, not cancelled.
fn waiting(h: &StepHandle) -> bool {
    h.started.get().is_none() && !h.cancel.is_cancelled()
}

struct State {
    heap: BinaryHeap<Entry>,
    rings: [Ring; 3],
    /// A push beyond this many entries compacts the heap.
    compact_at: usize,
    /// The deadline thread sleeps until this (`Some(None)`: until woken);
    /// `None` while it is awake. A push wakes it only for an earlier entry,
    /// so an ordinary push costs no system call.
    asleep_until: Option<Option<Instant>>,
    stopped: bool,
}

/// The deadline heap and the rings, under one lock.
pub(super) struct Deadlines {
    state: Mutex<State>,
    wake: Condvar,
}

impl Deadlines {
    pub fn new() -> Deadlines {
        Deadlines {
            state: Mutex::new(State {
                heap: BinaryHeap::new(),
                rings: Default::default(),
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

    /// Watches the deadline of the step `h`, just admitted to its pool.
    pub fn push(&self, h: &Arc<StepHandle>) {
        let at = h.deadline;
        let pool = h.assignment.pool.index();
        // Dropped after the lock: one may be the last hold on a step's
        // allocation (the step itself is freed by its last `Arc`).
        let mut released: [Option<Weak<StepHandle>>; TRIM] = Default::default();
        let mut st = self.lock();
        if st.stopped {
            return; // no thread to drain it: hold nothing
        }
        let st = &mut *st;
        let ring = &mut st.rings[pool];
        for slot in &mut released {
            *slot = ring.pop_done();
            if slot.is_none() {
                break;
            }
        }
        let seq = ring.base + ring.steps.len() as u64;
        ring.steps.push_back(Arc::downgrade(h));
        st.heap.push(Entry {
            at,
            pool: pool as u8,
            seq,
        });
        if st.heap.len() > st.compact_at {
            let bases = st.rings.each_ref().map(|r| r.base);
            st.heap.retain(|e| e.seq >= bases[usize::from(e.pool)]);
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
                // Steps that started meanwhile leave their rings here too,
                // should their pool see no further admission.
                let mut released = Vec::new();
                for ring in &mut st.rings {
                    released.extend(std::iter::from_fn(|| ring.pop_done()));
                }
                let mut due = Vec::new();
                while due.len() < BATCH && st.heap.peek().is_some_and(|e| e.at <= now) {
                    let Some(e) = st.heap.pop() else { break };
                    let ring = &st.rings[usize::from(e.pool)];
                    let Some(offset) = e.seq.checked_sub(ring.base) else {
                        continue; // left its ring: started long ago
                    };
                    let h = usize::try_from(offset).ok().and_then(|i| ring.steps.get(i));
                    if let Some(h) = h.and_then(Weak::upgrade).filter(|h| waiting(h)) {
                        due.push(h);
                    }
                }
                drop(st); // before `released`: a step's allocation may go
                drop(released);
                if !due.is_empty() {
                    return Some(due);
                }
                st = self.lock();
                continue; // only leftovers were due
            }
            // While steps are ringed, wake at least every SWEEP to release
            // those that started: a pool that sees no further admission
            // would otherwise keep them (payloads and all) until the
            // earliest deadline, which may be an hour away.
            let ringed = st.rings.iter().any(|r| !r.steps.is_empty());
            let until = match (first, ringed.then(|| now + SWEEP)) {
                (Some(at), Some(sweep)) => Some(at.min(sweep)),
                (at, sweep) => at.or(sweep),
            };
            st.asleep_until = Some(first);
            st = match until {
                Some(at) => self
                    .wake
                    .wait_timeout(st, at.saturating_duration_since(now))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0),
                None => self.wake.wait(st).unwrap_or_else(|p| p.into_inner()),
            };
            st.asleep_until = None;
            let mut released = Vec::new();
            for ring in &mut st.rings {
                released.extend(std::iter::from_fn(|| ring.pop_done()));
            }
            if !released.is_empty() {
                drop(st); // before `released`: a step's allocation may go
                drop(released);
                st = self.lock();
            }
        }
    }

    /// Ends the deadline thread (the engine is gone, or it never started)
    /// and releases every step it holds.
    pub fn stop(&self) {
        let mut st = self.lock();
        st.stopped = true;
        let heap = std::mem::take(&mut st.heap);
        let rings = std::mem::take(&mut st.rings);
        drop(st);
        self.wake.notify_all();
        drop((heap, rings));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().heap.len()
    }

    #[cfg(test)]
    fn ringed(&self) -> usize {
        self.lock().rings.iter().map(|r| r.steps.len()).sum()
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
    fn the_heap_and_rings_stay_near_the_queue_and_release_started_steps() {
        let d = Deadlines::new();
        let far = Instant::now() + Duration::from_secs(60);
        // A queue of 100 (FIFO, as a pool's channel): each admission, the
        // oldest queued step starts. Deadlines are far (the usual case: 30 s
        // against a queue of milliseconds), so nothing is popped.
        const QUEUE: usize = 100;
        let mut queue = VecDeque::new();
        let mut running = Vec::new();
        let mut first_done = None;
        let (mut max_len, mut max_ringed) = (0, 0);
        for i in 0..20_000 {
            let h = handle(i, far);
            d.push(&h);
            queue.push_back(h);
            if queue.len() > QUEUE {
                let started = queue.pop_front().expect("a queued step");
                let _ = started.started.set(Instant::now());
                if i % 100 == 0 {
                    running.push(started); // still running: alive
                } else if first_done.is_none() {
                    first_done = Some(Arc::downgrade(&started));
                }
            }
            max_len = max_len.max(d.len());
            max_ringed = max_ringed.max(d.ringed());
        }
        assert!(max_ringed <= QUEUE + 2, "rings grew to {max_ringed}");
        let bound = 2 * max_ringed + COMPACT_SLACK;
        assert!(max_len <= bound, "heap grew to {max_len} (bound {bound})");
        // A finished step is not held until its deadline or a compaction.
        let first_done = first_done.expect("a finished step");
        assert_eq!(
            first_done.strong_count(),
            0,
            "a finished step is still held"
        );
        // The rings hold no step alive: the queue's reference is the only
        // one, so the pool thread that runs a step frees it.
        assert!(queue.iter().all(|q| Arc::strong_count(q) == 1));
        // Every step still queued is in a ring and in the heap.
        let st = d.lock();
        let ringed: Vec<_> = st.rings.iter().flat_map(|r| r.steps.iter()).collect();
        for q in &queue {
            assert!(
                ringed
                    .iter()
                    .any(|h| std::ptr::eq(h.as_ptr(), Arc::as_ptr(q)))
            );
        }
        let bases = st.rings.each_ref().map(|r| r.base);
        let live = st
            .heap
            .iter()
            .filter(|e| e.seq >= bases[usize::from(e.pool)]);
        assert!(live.count() >= queue.len());
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
    #[test]
    fn an_idle_pool_s_started_steps_are_released_by_the_sweep() {
        // A burst to one pool, all started, then no further admission: the
        // deadline thread releases them within about a SWEEP, not at their
        // deadline an hour away.
        let d = Arc::new(Deadlines::new());
        let far = Instant::now() + Duration::from_secs(3600);
        let steps: Vec<Arc<StepHandle>> = (0..100).map(|i| handle(i, far)).collect();
        for h in &steps {
            d.push(h);
        }
        let thread = {
            let d = d.clone();
            std::thread::spawn(move || while d.next_due().is_some() {})
        };
        for h in &steps {
            let _ = h.started.set(Instant::now());
        }
        drop(steps);
        let t0 = Instant::now();
        while d.ringed() > 0 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let held = d.ringed();
        assert_eq!(
            held,
            0,
            "{held} started steps still ringed after {:?}",
            t0.elapsed()
        );
        assert!(
            t0.elapsed() < SWEEP * 4,
            "released after {:?}",
            t0.elapsed()
        );
        d.stop();
        thread.join().expect("the deadline thread ended");
    }
}
