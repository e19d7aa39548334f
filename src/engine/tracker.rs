//! The assignment table: what is pending (queued or running) and the last
//! `WORKER_RESULT_RETENTION` results, at most `WORKER_RESULT_RETENTION_BYTES`
//! of them by size (oldest evicted first). It is the single place that
//! enforces "exactly one result per accepted assignment": the first
//! completion wins. A table made with `keep_results: false` (for `run`,
//! which never looks a result up) retains only the finished ids it
//! de-duplicates with.

use super::StepHandle;
use crate::contract::ExecResult;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

enum Slot {
    Pending(Arc<StepHandle>),
    /// Finished: the result, or `None` in a table that keeps ids only.
    Done(Option<Arc<ExecResult>>),
}

/// A retained entry in completion order: the result, or only its id.
enum Retained {
    Result(Arc<ExecResult>),
    Id(Box<str>),
}

impl Retained {
    fn id(&self) -> &str {
        match self {
            Retained::Result(r) => &r.assignment_id,
            Retained::Id(id) => id,
        }
    }
}

/// What a lookup found.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// Finished; the result.
    Done(Arc<ExecResult>),
    /// Queued or running.
    Pending,
    /// Never accepted, or aged out of retention.
    Unknown,
}

struct Table {
    slots: HashMap<String, Slot>,
    /// Retained results, oldest first, with their sizes: the result itself
    /// where results are kept (not a copy of its id: one allocation less
    /// per step), else a copy of its id, counted as twice the id plus
    /// [`ENTRY_OVERHEAD`] instead of [`retained_size`].
    done_order: VecDeque<(Retained, usize)>,
    /// Sum of the sizes in `done_order`.
    done_bytes: usize,
    /// Threads blocked in [`Tracker::wait`]. A completion wakes them only
    /// when there are any: std's `Condvar::notify_all` always makes a futex
    /// system call, which cost every step about a microsecond.
    waiters: usize,
}

pub(super) struct Tracker {
    table: Mutex<Table>,
    finished: Condvar,
    retention: usize,
    retention_bytes: usize,
    keep_results: bool,
}

/// Bookkeeping per retained result beyond its JSON: the map slot, the
/// order entry, the `Arc` and the result's own fields (the id, as map key,
/// is counted by [`retained_size`]).
const ENTRY_OVERHEAD: usize = 256;

/// What a retained result costs, closely: its serialized JSON size
/// (`json_len`: big outputs are strings, held at about their serialized
/// size) plus [`ENTRY_OVERHEAD`] and the id.
pub(super) fn retained_size(result: &ExecResult, json_len: usize) -> usize {
    json_len + result.assignment_id.len() + ENTRY_OVERHEAD
}

impl Tracker {
    /// Keeps at most `retention` results and `retention_bytes` of them; the
    /// newest result is always kept, whatever its size, so its submitter
    /// can read it. Without `keep_results` only the ids are retained (and
    /// counted): [`Tracker::lookup`] then knows pending steps only, and
    /// each result is freed as soon as it is delivered, by the thread that
    /// made it, instead of cold at its eviction.
    pub fn new(retention: usize, retention_bytes: usize, keep_results: bool) -> Tracker {
        Tracker {
            table: Mutex::new(Table {
                slots: HashMap::new(),
                done_order: VecDeque::new(),
                done_bytes: 0,
                waiters: 0,
            }),
            finished: Condvar::new(),
            retention: retention.max(1),
            retention_bytes,
            keep_results,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding this lock cannot leave the table half-updated
        // (each method does single map operations), so poisoning is ignored.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a pending step; `false` if the id is already pending or retained.
    pub fn insert(&self, handle: &Arc<StepHandle>) -> bool {
        self.insert_with(handle, || Ok::<(), ()>(()))
            .unwrap_or(false)
    }

    /// Checks for a duplicate, runs `enqueue` and registers the step, all under
    /// the table lock, so no other submission or cancel can see the step
    /// between its registration and the queue's verdict. `enqueue` must not
    /// block. `Ok(false)`: duplicate, nothing enqueued; `Err`: not registered.
    pub fn insert_with<E>(
        &self,
        handle: &Arc<StepHandle>,
        enqueue: impl FnOnce() -> Result<(), E>,
    ) -> Result<bool, E> {
        // The key is copied before the lock is taken: every submission and
        // completion waits on this lock, an allocation need not.
        let key = handle.assignment.assignment_id.clone();
        let mut t = self.lock();
        match t.slots.entry(key) {
            Entry::Occupied(_) => Ok(false),
            Entry::Vacant(slot) => {
                enqueue()?;
                slot.insert(Slot::Pending(handle.clone()));
                Ok(true)
            }
        }
    }

    /// Forgets `handle` if it is still the pending step of its id (it was
    /// registered but could not be queued).
    /// Returns `false` if it was no longer pending (it already has a result).
    pub fn remove_pending(&self, handle: &StepHandle) -> bool {
        let mut t = self.lock();
        let id = &handle.assignment.assignment_id;
        if matches!(t.slots.get(id), Some(Slot::Pending(h)) if std::ptr::eq(h.as_ref(), handle)) {
            t.slots.remove(id);
            return true;
        }
        false
    }

    /// Records the result of `handle` (`size`: its [`retained_size`]);
    /// `true` only for the first completion, and only while `handle` is
    /// still the pending step of its id. A stale handle (cancelled while
    /// queued, its id since aged out and re-sent) must not complete the newer
    /// assignment that reuses the id.
    pub fn complete(&self, handle: &StepHandle, result: &Arc<ExecResult>, size: usize) -> bool {
        // What leaves the table is dropped after the lock is released: the
        // step's handle and evicted results free many small allocations, and
        // every submission and completion waits on this lock.
        let replaced;
        let mut evicted = Vec::new();
        let wake;
        let (kept, entry, size) = if self.keep_results {
            let entry = Retained::Result(result.clone());
            (Some(result.clone()), entry, size)
        } else {
            let id: Box<str> = result.assignment_id.as_str().into();
            let size = 2 * id.len() + ENTRY_OVERHEAD;
            (None, Retained::Id(id), size)
        };
        {
            let mut t = self.lock();
            match t.slots.get_mut(&result.assignment_id) {
                Some(slot @ Slot::Pending(_)) => {
                    if !matches!(slot, Slot::Pending(h) if std::ptr::eq(h.as_ref(), handle)) {
                        return false;
                    }
                    replaced = std::mem::replace(slot, Slot::Done(kept));
                }
                _ => return false,
            }
            t.done_order.push_back((entry, size));
            t.done_bytes += size;
            while t.done_order.len() > 1
                && (t.done_order.len() > self.retention || t.done_bytes > self.retention_bytes)
            {
                if let Some((old, size)) = t.done_order.pop_front() {
                    t.done_bytes -= size;
                    evicted.push((t.slots.remove(old.id()), old));
                }
            }
            wake = t.waiters > 0;
        }
        if wake {
            self.finished.notify_all();
        }
        drop((replaced, evicted));
        true
    }

    pub fn lookup(&self, id: &str) -> Lookup {
        match self.lock().slots.get(id) {
            Some(Slot::Done(Some(r))) => Lookup::Done(r.clone()),
            Some(Slot::Pending(_)) => Lookup::Pending,
            Some(Slot::Done(None)) | None => Lookup::Unknown,
        }
    }

    /// The tenant of a pending or retained assignment.
    pub fn tenant_of(&self, id: &str) -> Option<String> {
        match self.lock().slots.get(id)? {
            Slot::Pending(h) => Some(h.assignment.tenant_id.clone()),
            Slot::Done(r) => Some(r.as_ref()?.tenant_id.clone()),
        }
    }

    /// Waits up to `timeout` for a pending step to finish.
    pub fn wait(&self, id: &str, timeout: Duration) -> Lookup {
        let deadline = Instant::now() + timeout;
        let mut t = self.lock();
        loop {
            match t.slots.get(id) {
                Some(Slot::Done(Some(r))) => return Lookup::Done(r.clone()),
                Some(Slot::Done(None)) | None => return Lookup::Unknown,
                Some(Slot::Pending(_)) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Lookup::Pending;
            }
            // Counted under the lock, so a completion that follows sees it.
            t.waiters += 1;
            t = self
                .finished
                .wait_timeout(t, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            t.waiters -= 1;
        }
    }

    /// The pending step with this id, if any.
    pub fn pending(&self, id: &str) -> Option<Arc<StepHandle>> {
        match self.lock().slots.get(id) {
            Some(Slot::Pending(h)) => Some(h.clone()),
            _ => None,
        }
    }

    /// Every pending step (for shutdown).
    pub fn all_pending(&self) -> Vec<Arc<StepHandle>> {
        self.lock()
            .slots
            .values()
            .filter_map(|s| match s {
                Slot::Pending(h) => Some(h.clone()),
                Slot::Done(_) => None,
            })
            .collect()
    }

    /// Number of pending steps.
    pub fn pending_count(&self) -> usize {
        self.lock()
            .slots
            .values()
            .filter(|s| matches!(s, Slot::Pending(_)))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{Outcome, StepStats};
    use crate::engine::test_handle as handle;

    fn finish(t: &Tracker, h: &StepHandle) -> bool {
        let worker: Arc<str> = "w".into();
        let outcome = Outcome::Success(serde_json::json!({}));
        let r = Arc::new(ExecResult::new(
            &h.assignment,
            outcome,
            StepStats::default(),
            &worker,
        ));
        t.complete(h, &r, retained_size(&r, 300))
    }

    /// Both kinds of table refuse a finished id while it is retained and
    /// forget it once evicted; only the full table answers lookups.
    #[test]
    fn retention_deduplicates_with_or_without_the_results() {
        for keep_results in [true, false] {
            let t = Tracker::new(2, usize::MAX, keep_results);
            let a = handle("a");
            assert!(t.insert(&a));
            assert!(!t.insert(&handle("a")), "pending id taken twice");
            assert!(finish(&t, &a));
            assert!(!finish(&t, &a), "a second completion counted");
            assert!(!t.insert(&handle("a")), "finished id taken again");
            match t.lookup("a") {
                Lookup::Done(r) => assert!(keep_results, "{r:?}"),
                Lookup::Unknown => assert!(!keep_results),
                Lookup::Pending => panic!("a finished step looked pending"),
            }
            for id in ["b", "c"] {
                let h = handle(id);
                assert!(t.insert(&h));
                assert!(finish(&t, &h));
            }
            // Two retained (b, c): a was evicted and may come again.
            assert!(t.insert(&handle("a")), "evicted id still refused");
            assert!(!t.insert(&handle("c")), "retained id taken again");
        }
    }
}
