//! The assignment table: what is pending (queued or running) and the last
//! `WORKER_RESULT_RETENTION` results, at most `WORKER_RESULT_RETENTION_BYTES`
//! of them by size (oldest evicted first). It is the single place that
//! enforces "exactly one result per accepted assignment": the first
//! completion wins.

use super::StepHandle;
use crate::contract::ExecResult;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

enum Slot {
    Pending(Arc<StepHandle>),
    Done(Arc<ExecResult>),
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
    /// Retained results, oldest first, with their [`retained_size`] (the
    /// result itself, not a copy of its id: one allocation less per step).
    done_order: VecDeque<(Arc<ExecResult>, usize)>,
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
    /// can read it.
    pub fn new(retention: usize, retention_bytes: usize) -> Tracker {
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
        {
            let mut t = self.lock();
            match t.slots.get_mut(&result.assignment_id) {
                Some(slot @ Slot::Pending(_)) => {
                    if !matches!(slot, Slot::Pending(h) if std::ptr::eq(h.as_ref(), handle)) {
                        return false;
                    }
                    replaced = std::mem::replace(slot, Slot::Done(result.clone()));
                }
                _ => return false,
            }
            t.done_order.push_back((result.clone(), size));
            t.done_bytes += size;
            while t.done_order.len() > 1
                && (t.done_order.len() > self.retention || t.done_bytes > self.retention_bytes)
            {
                if let Some((old, size)) = t.done_order.pop_front() {
                    evicted.push(t.slots.remove(&old.assignment_id));
                    t.done_bytes -= size;
                    evicted.push(Some(Slot::Done(old)));
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
            Some(Slot::Done(r)) => Lookup::Done(r.clone()),
            Some(Slot::Pending(_)) => Lookup::Pending,
            None => Lookup::Unknown,
        }
    }

    /// The tenant of a pending or retained assignment.
    pub fn tenant_of(&self, id: &str) -> Option<String> {
        match self.lock().slots.get(id)? {
            Slot::Pending(h) => Some(h.assignment.tenant_id.clone()),
            Slot::Done(r) => Some(r.tenant_id.clone()),
        }
    }

    /// Waits up to `timeout` for a pending step to finish.
    pub fn wait(&self, id: &str, timeout: Duration) -> Lookup {
        let deadline = Instant::now() + timeout;
        let mut t = self.lock();
        loop {
            match t.slots.get(id) {
                Some(Slot::Done(r)) => return Lookup::Done(r.clone()),
                None => return Lookup::Unknown,
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
