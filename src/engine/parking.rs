//! Parking: steps that wait without a thread. A retry in its backoff and a
//! `human.approval` waiting for a decision are entries in one timer map
//! ordered by due time; one timer thread sleeps on a condvar until the
//! earliest entry is due (no per-step threads, no scanning) and hands the
//! due entries to the engine. A parked step costs an entry, not a thread.
//!
//! Claims: an entry belongs to whoever removes it from this structure under
//! its lock (the timer thread when due, a cancel, shutdown, a decision), so a
//! parked step is answered or re-queued exactly once.

use super::StepHandle;
use crate::blocks::BlockError;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// Due time plus a sequence number: unique, ordered by due time first.
pub(super) type TimerKey = (Instant, u64);

/// What waits in the timer map.
pub(super) enum Parked {
    /// A retry waiting out its delay; `last` is the error that caused it
    /// (named in a deadline result).
    Retry {
        /// The step.
        handle: Arc<StepHandle>,
        /// The failed attempt's error.
        last: BlockError,
    },
    /// A `human.approval` whose timeout is this entry's due time.
    Approval(Arc<StepHandle>),
}

/// A pending approval: the step and its timer entry.
struct PendingApproval {
    handle: Arc<StepHandle>,
    key: TimerKey,
}

/// Why an approval could not park.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ApprovalsFull;

struct State {
    timers: BTreeMap<TimerKey, Parked>,
    approvals: HashMap<String, PendingApproval>,
    seq: u64,
    stopped: bool,
}

/// The timer map and the pending-approval table, under one lock.
pub(super) struct Parking {
    state: Mutex<State>,
    wake: Condvar,
}

impl Parking {
    pub fn new() -> Parking {
        Parking {
            state: Mutex::new(State {
                timers: BTreeMap::new(),
                approvals: HashMap::new(),
                seq: 0,
                stopped: false,
            }),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every method does whole map operations under the lock; a panic
        // cannot leave the maps half-updated, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh key for `due`.
    fn key(st: &mut State, due: Instant) -> TimerKey {
        st.seq += 1;
        (due, st.seq)
    }

    /// Inserts under `st`, waking the timer thread if the entry is the new earliest.
    fn insert(&self, st: &mut State, key: TimerKey, parked: Parked) {
        let earliest = st.timers.keys().next().is_none_or(|first| key < *first);
        st.timers.insert(key, parked);
        if earliest {
            self.wake.notify_one();
        }
    }

    /// Parks a retry until `due`.
    pub fn park_retry(&self, handle: Arc<StepHandle>, due: Instant, last: BlockError) {
        let mut st = self.lock();
        let key = Parking::key(&mut st, due);
        *handle.park_key.lock().unwrap_or_else(|p| p.into_inner()) = Some(key);
        self.insert(&mut st, key, Parked::Retry { handle, last });
    }

    /// Parks an approval until `expires`, unless `max` are already pending.
    pub fn park_approval(
        &self,
        handle: &Arc<StepHandle>,
        expires: Instant,
        max: usize,
    ) -> Result<(), ApprovalsFull> {
        let mut st = self.lock();
        if st.approvals.len() >= max {
            return Err(ApprovalsFull);
        }
        let key = Parking::key(&mut st, expires);
        self.insert(&mut st, key, Parked::Approval(handle.clone()));
        st.approvals.insert(
            handle.assignment.assignment_id.clone(),
            PendingApproval {
                handle: handle.clone(),
                key,
            },
        );
        Ok(())
    }

    /// Removes the parked retry of `h`, if any; `true` if this call claimed it.
    pub fn withdraw_retry(&self, h: &StepHandle) -> bool {
        let mut st = self.lock();
        let key = h.park_key.lock().unwrap_or_else(|p| p.into_inner()).take();
        key.is_some_and(|k| st.timers.remove(&k).is_some())
    }

    /// Removes the pending approval `h`; `true` if this call claimed it.
    pub fn withdraw_approval(&self, h: &StepHandle) -> bool {
        let mut st = self.lock();
        let id = &h.assignment.assignment_id;
        match st.approvals.get(id) {
            Some(p) if std::ptr::eq(p.handle.as_ref(), h) => {
                let key = p.key;
                st.approvals.remove(id);
                st.timers.remove(&key);
                true
            }
            _ => false,
        }
    }

    /// Looks at a pending approval under the lock and claims it if `check`
    /// allows: `Ok(Some(h))` claimed, `Ok(None)` not pending, `Err` refused.
    pub fn claim_approval<E>(
        &self,
        id: &str,
        check: impl FnOnce(&StepHandle) -> Result<(), E>,
    ) -> Result<Option<Arc<StepHandle>>, E> {
        let mut st = self.lock();
        let Some(p) = st.approvals.get(id) else {
            return Ok(None);
        };
        check(&p.handle)?;
        let key = p.key;
        st.timers.remove(&key);
        Ok(st.approvals.remove(id).map(|p| p.handle))
    }

    /// Claims every pending approval (shutdown).
    pub fn take_approvals(&self) -> Vec<Arc<StepHandle>> {
        let mut st = self.lock();
        let all: Vec<PendingApproval> = st.approvals.drain().map(|(_, p)| p).collect();
        all.into_iter()
            .map(|p| {
                st.timers.remove(&p.key);
                p.handle
            })
            .collect()
    }

    /// The pending approvals `filter` keeps, oldest first, at most `limit`.
    pub fn approvals(
        &self,
        filter: impl Fn(&StepHandle) -> bool,
        limit: usize,
    ) -> Vec<Arc<StepHandle>> {
        let st = self.lock();
        let mut found: Vec<Arc<StepHandle>> = st
            .approvals
            .values()
            .filter(|p| filter(&p.handle))
            .map(|p| p.handle.clone())
            .collect();
        drop(st);
        found.sort_by_key(|h| h.accepted_at);
        found.truncate(limit);
        found
    }

    /// Approvals pending now.
    pub fn approvals_pending(&self) -> usize {
        self.lock().approvals.len()
    }

    /// Blocks until at least one entry is due, then removes and returns the
    /// due ones (earliest first). `None` once stopped.
    pub fn next_due(&self) -> Option<Vec<Parked>> {
        let mut st = self.lock();
        loop {
            if st.stopped {
                return None;
            }
            let now = Instant::now();
            match st.timers.keys().next().copied() {
                Some(first) if first.0 <= now => {
                    let later = st.timers.split_off(&(now, u64::MAX));
                    let due = std::mem::replace(&mut st.timers, later);
                    let mut out = Vec::with_capacity(due.len());
                    for (_, p) in due {
                        match &p {
                            Parked::Retry { handle, .. } => {
                                handle
                                    .park_key
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .take();
                            }
                            Parked::Approval(h) => {
                                st.approvals.remove(&h.assignment.assignment_id);
                            }
                        }
                        out.push(p);
                    }
                    return Some(out);
                }
                Some(first) => {
                    st = self
                        .wake
                        .wait_timeout(st, first.0 - now)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                None => {
                    st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }

    /// Ends the timer thread (the engine is gone).
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.wake.notify_all();
    }
}
