//! CP2 deadlines of queued steps, handed to one deadline thread that sleeps
//! until the earliest one (no scan of the assignment table, no polling).
//!
//! Cheap per step, because almost no step ever reaches its deadline. The
//! steps wait in one FIFO ring per pool, in admission order, which is the
//! order the pool's queue hands them out. Most steps arrive with a deadline
//! no earlier than the one ringed before them (every `run` step has the
//! default deadline): such an *in-order* step needs no other entry, since the
//! in-order steps of a ring are already sorted, and the thread follows each
//! ring with a cursor. Only a step whose deadline is earlier than its ring's
//! latest goes on a min-heap of plain numbers (deadline, pool, sequence
//! number). Issue 13 asked for ≤ 1 % of throughput: the heap push, its
//! compactions and the release of each popped slot after the lock were half
//! of this module's cost per step (SPEC §12.16).
//!
//! A ring holds a `Weak` to each step: the step is freed by whichever thread
//! drops it last (its pool thread, with the step still warm in its cache),
//! not by the admitting thread; with an `Arc` in the ring, the admitting
//! thread freed most steps, cold, and CP2 timeouts cost +11.5 % CPU per echo
//! step against +2.6 % (SPEC §12.16). Every 16th admission to a ring first
//! drops the ring's leading steps that started (or were cancelled, or are
//! gone): those left their queue, so the ring holds about what the queue
//! holds, and a step's allocation is released soon after it starts: within
//! a few admissions to its pool, or by the deadline thread, which sweeps the
//! rings at least once a second while they hold steps. (Holding finished
//! steps, or even a `Weak` to each, until a compaction made allocations cold
//! and cost 3× more per step; measured, SPEC §12.16.)
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

/// Every this many pushes to a ring, the push releases its ring's leading
/// steps that started, at most twice this many (so the ring keeps up with
/// its queue, at most this many behind). Not on every push: when the
/// queue is backed up the front still waits, and finding that out costs
/// two atomic operations on a line the pool threads write (every 4th push:
/// +101 to +146 instructions per echo step; every 16th: +42 to +104).
const TRIM_EVERY: u64 = 16;

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

/// One ringed step.
struct Slot {
    step: Weak<StepHandle>,
    /// Its deadline is in the heap: it was earlier than one ringed before
    /// it. Otherwise the ring's cursor finds it.
    heaped: bool,
}

/// The steps of one pool admitted and not yet seen started, oldest first;
/// `base` is the sequence number of the front.
#[derive(Default)]
struct Ring {
    steps: VecDeque<Slot>,
    base: u64,
    /// The latest deadline of an in-order slot since the ring was last
    /// empty: the in-order slots are sorted by deadline.
    last_at: Option<Instant>,
    /// Sequence number of the first in-order slot the deadline thread has
    /// neither handed out nor passed (the ring's next deadline).
    cursor: u64,
}

impl Ring {
    /// Pops the front if its step left the queue (started, cancelled or
    /// already gone) and says whether it did. The popped `Weak` is dropped
    /// here, under the lock: at most the handle's allocation goes with it
    /// (its pool thread dropped the step itself). The check holds the step
    /// for a moment: should its pool thread drop it meanwhile, the step is
    /// freed here (rare: the thread ran it to the end in that moment).
    fn pop_done(&mut self) -> bool {
        let Some(front) = self.steps.front() else {
            return false;
        };
        // A step that is gone never comes back: a load, not an upgrade.
        let done =
            front.step.strong_count() == 0 || front.step.upgrade().is_none_or(|h| !waiting(&h));
        if done {
            self.base += 1;
            self.steps.pop_front();
            if self.steps.is_empty() {
                self.last_at = None;
            }
        }
        done
    }

    /// Moves the cursor over the in-order slots due by `now`, adding those
    /// that still wait to `due` (up to [`BATCH`] in all), and returns the
    /// deadline of the next in-order step that waits, if any.
    fn take_due(&mut self, now: Instant, due: &mut Vec<Arc<StepHandle>>) -> Option<Instant> {
        self.cursor = self.cursor.max(self.base);
        while due.len() < BATCH {
            let slot = usize::try_from(self.cursor - self.base)
                .ok()
                .and_then(|i| self.steps.get(i))?;
            if !slot.heaped {
                if let Some(h) = slot.step.upgrade().filter(|h| waiting(h)) {
                    if h.deadline > now {
                        return Some(h.deadline);
                    }
                    due.push(h);
                }
            }
            self.cursor += 1;
        }
        None // a full batch: the caller hands it out and comes back
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
        let mut st = self.lock();
        if st.stopped {
            return; // no thread to drain it: hold nothing
        }
        let st = &mut *st;
        let ring = &mut st.rings[pool];
        // The step's sequence number (a pop moves `base` and the length
        // together, so trimming leaves it as it is).
        let seq = ring.base + ring.steps.len() as u64;
        if seq % TRIM_EVERY == 0 {
            for _ in 0..2 * TRIM_EVERY {
                if !ring.pop_done() {
                    break;
                }
            }
        }
        let heaped = ring.last_at.is_some_and(|last| at < last);
        if !heaped {
            ring.last_at = Some(at);
        }
        ring.steps.push_back(Slot {
            step: Arc::downgrade(h),
            heaped,
        });
        if heaped {
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
            let state = &mut *st;
            // Steps that started leave their rings here too, should their
            // pool see no further admission.
            for ring in &mut state.rings {
                while ring.pop_done() {}
            }
            let now = Instant::now();
            let mut due = Vec::new();
            while due.len() < BATCH && state.heap.peek().is_some_and(|e| e.at <= now) {
                let Some(e) = state.heap.pop() else { break };
                let ring = &state.rings[usize::from(e.pool)];
                let Some(offset) = e.seq.checked_sub(ring.base) else {
                    continue; // left its ring: started long ago
                };
                let h = usize::try_from(offset).ok().and_then(|i| ring.steps.get(i));
                if let Some(h) = h.and_then(|s| s.step.upgrade()).filter(|h| waiting(h)) {
                    due.push(h);
                }
            }
            let mut first = state.heap.peek().map(|e| e.at);
            for ring in &mut state.rings {
                if let Some(at) = ring.take_due(now, &mut due) {
                    first = Some(first.map_or(at, |f| f.min(at)));
                }
            }
            if !due.is_empty() {
                return Some(due);
            }
            // While steps are ringed, wake at least every SWEEP to release
            // those that started: a pool that sees no further admission
            // would otherwise keep them (payloads and all) until the
            // earliest deadline, which may be an hour away.
            let ringed = state.rings.iter().any(|r| !r.steps.is_empty());
            let until = match (first, ringed.then(|| now + SWEEP)) {
                (Some(at), Some(sweep)) => Some(at.min(sweep)),
                (at, sweep) => at.or(sweep),
            };
            state.asleep_until = Some(first);
            st = match until {
                Some(at) => self
                    .wake
                    .wait_timeout(st, at.saturating_duration_since(now))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0),
                None => self.wake.wait(st).unwrap_or_else(|p| p.into_inner()),
            };
            st.asleep_until = None;
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

    /// Steps in a pool's queue: at most this many wait (FIFO, as a pool's
    /// channel); each admission beyond it starts the oldest.
    const QUEUE: usize = 100;

    /// Admits `h` to `d` and `queue`; returns the step it made start, if any.
    fn admit(
        d: &Deadlines,
        queue: &mut VecDeque<Arc<StepHandle>>,
        h: Arc<StepHandle>,
    ) -> Option<Arc<StepHandle>> {
        d.push(&h);
        queue.push_back(h);
        if queue.len() <= QUEUE {
            return None;
        }
        let started = queue.pop_front()?;
        let _ = started.started.set(Instant::now());
        Some(started)
    }

    /// A deadline thread over `d` that claims each due step as the engine
    /// does (so it is not handed out again) and sends its id and the time;
    /// returns once the thread is asleep.
    fn deadline_thread(
        d: &Arc<Deadlines>,
    ) -> (
        std::thread::JoinHandle<()>,
        std::sync::mpsc::Receiver<(String, Instant)>,
    ) {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let d = d.clone();
            std::thread::spawn(move || {
                while let Some(due) = d.next_due() {
                    for h in due {
                        h.cancel.cancel(crate::cancel::CancelReason::Deadline);
                        let _ = tx.send((h.assignment.assignment_id.clone(), Instant::now()));
                    }
                }
            })
        };
        let t0 = Instant::now();
        while d.lock().asleep_until.is_none() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        (thread, rx)
    }

    #[test]
    fn the_heap_and_rings_stay_near_the_queue_and_release_started_steps() {
        let d = Deadlines::new();
        let far = Instant::now() + Duration::from_secs(60);
        // Deadlines are far (the usual case: 30 s against a queue of
        // milliseconds), so nothing is popped.
        let mut queue = VecDeque::new();
        let mut running = Vec::new();
        let mut first_done = None;
        let (mut max_len, mut max_ringed) = (0, 0);
        for i in 0..20_000 {
            if let Some(started) = admit(&d, &mut queue, handle(i, far)) {
                if i % 100 == 0 {
                    running.push(started); // still running: alive
                } else if first_done.is_none() {
                    first_done = Some(Arc::downgrade(&started));
                }
            }
            max_len = max_len.max(d.len());
            max_ringed = max_ringed.max(d.ringed());
        }
        let bound = QUEUE + TRIM_EVERY as usize + 1;
        assert!(
            max_ringed <= bound,
            "rings grew to {max_ringed} (bound {bound})"
        );
        assert_eq!(max_len, 0, "in-order deadlines went on the heap");
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
        // Every step still queued is in a ring.
        let st = d.lock();
        let ringed: Vec<_> = st.rings.iter().flat_map(|r| r.steps.iter()).collect();
        for q in &queue {
            assert!(
                ringed
                    .iter()
                    .any(|s| std::ptr::eq(s.step.as_ptr(), Arc::as_ptr(q)))
            );
        }
    }

    #[test]
    fn out_of_order_deadlines_go_on_the_heap_and_the_heap_stays_near_the_queue() {
        // Every third step has an earlier deadline than the one before it.
        let d = Deadlines::new();
        let t0 = Instant::now() + Duration::from_secs(60);
        let mut queue = VecDeque::new();
        let mut max_len = 0;
        for i in 0..20_000u64 {
            let at = t0 + Duration::from_millis(if i % 3 == 2 { i } else { 10 * i });
            admit(&d, &mut queue, handle(i as usize, at));
            max_len = max_len.max(d.len());
        }
        let bound = 2 * (QUEUE + TRIM_EVERY as usize + 1) + COMPACT_SLACK;
        assert!(max_len <= bound, "heap grew to {max_len} (bound {bound})");
        // Each heaped slot still ringed has its entry; the rest is leftovers.
        let st = d.lock();
        let heaped = st
            .rings
            .iter()
            .flat_map(|r| r.steps.iter())
            .filter(|s| s.heaped);
        let bases = st.rings.each_ref().map(|r| r.base);
        let live = st
            .heap
            .iter()
            .filter(|e| e.seq >= bases[usize::from(e.pool)]);
        assert_eq!(heaped.count(), live.count());
        assert!(!st.heap.is_empty(), "no deadline went on the heap");
    }

    #[test]
    fn heap_and_ring_deadlines_are_handed_out_in_order_and_started_steps_never() {
        let d = Arc::new(Deadlines::new());
        // The thread sleeps with nothing to watch: the first push (in order,
        // its ring empty) must wake it.
        let (thread, rx) = deadline_thread(&d);
        let base = Instant::now();
        let ms = |m: u64| base + Duration::from_millis(m);
        // Ring order: 300 (in order), 100 and 200 (earlier: heap), 400 (in
        // order), 500 (in order, but started: never handed out), 450 (heap).
        let steps: Vec<Arc<StepHandle>> = [300, 100, 200, 400, 500, 450]
            .iter()
            .enumerate()
            .map(|(i, &m)| handle(i, ms(m)))
            .collect();
        for h in &steps {
            d.push(h);
        }
        let _ = steps[4].started.set(Instant::now());
        let mut got = Vec::new();
        while got.len() < 5 {
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(x) => got.push(x),
                Err(_) => break,
            }
        }
        let ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["a-1", "a-2", "a-0", "a-3", "a-5"]);
        for (id, at) in &got {
            let i: usize = id[2..].parse().expect("an index");
            let late = at.saturating_duration_since(steps[i].deadline);
            assert!(
                *at >= steps[i].deadline && late < Duration::from_secs(1),
                "{id}: {late:?} late"
            );
        }
        // The started step is not handed out (its deadline passed meanwhile).
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        d.stop();
        thread.join().expect("the deadline thread ended");
    }

    #[test]
    fn a_new_earliest_deadline_wakes_the_thread_and_stop_ends_it() {
        let d = Arc::new(Deadlines::new());
        d.push(&handle(0, Instant::now() + Duration::from_secs(60)));
        let far = handle(1, Instant::now() + Duration::from_secs(60));
        d.push(&far);
        // The thread falls asleep until the far deadline first.
        let (thread, rx) = deadline_thread(&d);
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
