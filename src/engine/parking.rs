//! Parking: steps that wait without a thread. A retry in its backoff and a
//! `human.approval` waiting for a decision are entries in one timer map
//! ordered by due time; one timer thread sleeps on a condvar until the
//! earliest entry is due (no per-step threads, no scanning) and hands the
//! due entries to the engine. A parked step costs an entry, not a thread.
//!
//! Claims: an entry belongs to whoever removes it from this structure under
//! its lock (the timer thread when due, a cancel, shutdown, a decision), so a
//! parked step is answered or re-queued exactly once. A step's key lives in
//! its handle (`park_key`), so a claim by id needs no second index: the
//! assignment table finds the handle, the key finds the entry.

use super::StepHandle;
use crate::blocks::BlockError;
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// Due time plus a sequence number: unique, ordered by due time first.
pub(super) type TimerKey = (Instant, u64);

/// What waits in the timer map (kept small: it is the cost of a parked step).
pub(super) enum Parked {
    /// A retry waiting out its delay; `last` is the error that caused it
    /// (named in a deadline result).
    Retry {
        /// The step.
        handle: Arc<StepHandle>,
        /// The failed attempt's error.
        last: Box<BlockError>,
    },
    /// A `human.approval` whose timeout is this entry's due time.
    Approval(Arc<StepHandle>),
}

/// Why an approval could not park.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ApprovalRefused {
    /// `max` approvals are already pending.
    Full,
    /// Shutdown has taken the pending approvals: one parking now would
    /// never be answered.
    ShuttingDown,
}

struct State {
    timers: BTreeMap<TimerKey, Parked>,
    /// `Approval` entries in `timers`.
    approvals: usize,
    seq: u64,
    stopped: bool,
    /// Set when shutdown takes the approvals; no approval parks after.
    approvals_closed: bool,
}

/// The timer map, under one lock.
pub(super) struct Parking {
    state: Mutex<State>,
    wake: Condvar,
}

impl Parking {
    pub fn new() -> Parking {
        Parking {
            state: Mutex::new(State {
                timers: BTreeMap::new(),
                approvals: 0,
                seq: 0,
                stopped: false,
                approvals_closed: false,
            }),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every method does whole map operations under the lock; a panic
        // cannot leave the map half-updated, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts `parked` for `h` at `due` under `st`, waking the timer thread
    /// if it is the new earliest entry.
    fn insert(&self, st: &mut State, h: &StepHandle, due: Instant, parked: Parked) {
        st.seq += 1;
        let key = (due, st.seq);
        *key_slot(h) = Some(key);
        let earliest = st.timers.keys().next().is_none_or(|first| key < *first);
        st.timers.insert(key, parked);
        if earliest {
            self.wake.notify_one();
        }
    }

    /// Parks a retry until `due`.
    pub fn park_retry(&self, handle: Arc<StepHandle>, due: Instant, last: BlockError) {
        let mut st = self.lock();
        let h = handle.clone();
        let last = Box::new(last);
        self.insert(&mut st, &h, due, Parked::Retry { handle, last });
    }

    /// Parks an approval until `expires`, unless `max` are already pending
    /// or shutdown has already taken the pending ones
    /// ([`Parking::take_approvals`]).
    pub fn park_approval(
        &self,
        handle: &Arc<StepHandle>,
        expires: Instant,
        max: usize,
    ) -> Result<(), ApprovalRefused> {
        let mut st = self.lock();
        if st.approvals_closed {
            return Err(ApprovalRefused::ShuttingDown);
        }
        if st.approvals >= max {
            return Err(ApprovalRefused::Full);
        }
        st.approvals += 1;
        self.insert(&mut st, handle, expires, Parked::Approval(handle.clone()));
        Ok(())
    }

    /// Removes the parked entry of `h` (a waiting retry or a pending
    /// approval); `true` if this call claimed it.
    pub fn withdraw(&self, h: &StepHandle) -> bool {
        let mut st = self.lock();
        let Some(key) = key_slot(h).take() else {
            return false;
        };
        match st.timers.remove(&key) {
            Some(Parked::Approval(_)) => {
                st.approvals -= 1;
                true
            }
            Some(Parked::Retry { .. }) => true,
            None => false,
        }
    }

    /// Claims the pending approval `h` if `check` allows: `Ok(true)` claimed,
    /// `Ok(false)` no longer pending, `Err` refused (it stays pending).
    pub fn claim_approval<E>(
        &self,
        h: &StepHandle,
        check: impl FnOnce() -> Result<(), E>,
    ) -> Result<bool, E> {
        let mut st = self.lock();
        let mut slot = key_slot(h);
        let Some(key) = *slot else {
            return Ok(false);
        };
        if !matches!(st.timers.get(&key), Some(Parked::Approval(_))) {
            return Ok(false);
        }
        check()?;
        *slot = None;
        st.timers.remove(&key);
        st.approvals -= 1;
        Ok(true)
    }

    /// Claims every pending approval and refuses any later one (shutdown:
    /// an approval admitted just before the drain began, but parking after
    /// this, would otherwise wait unanswered until the process exits).
    pub fn take_approvals(&self) -> Vec<Arc<StepHandle>> {
        let mut st = self.lock();
        st.approvals_closed = true;
        let keys: Vec<TimerKey> = st
            .timers
            .iter()
            .filter(|(_, p)| matches!(p, Parked::Approval(_)))
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(Parked::Approval(h)) = st.timers.remove(&k) {
                key_slot(&h).take();
                out.push(h);
            }
        }
        st.approvals = 0;
        out
    }

    /// The pending approvals `filter` keeps, oldest first, at most `limit`.
    pub fn approvals(
        &self,
        filter: impl Fn(&StepHandle) -> bool,
        limit: usize,
    ) -> Vec<Arc<StepHandle>> {
        let st = self.lock();
        let mut found: Vec<Arc<StepHandle>> = st
            .timers
            .values()
            .filter_map(|p| match p {
                Parked::Approval(h) if filter(h) => Some(h.clone()),
                _ => None,
            })
            .collect();
        drop(st);
        found.sort_by_key(|h| h.accepted_at);
        found.truncate(limit);
        found
    }

    /// Approvals pending now.
    pub fn approvals_pending(&self) -> usize {
        self.lock().approvals
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
                        let h = match &p {
                            Parked::Retry { handle, .. } => handle,
                            Parked::Approval(h) => {
                                st.approvals -= 1;
                                h
                            }
                        };
                        key_slot(h).take();
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

/// The handle's timer key (only touched under the parking lock).
fn key_slot(h: &StepHandle) -> MutexGuard<'_, Option<TimerKey>> {
    h.park_key.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::test_handle as handle;
    use std::time::Duration;

    /// Shutdown takes the pending approvals once; an approval admitted just
    /// before (it passed the draining check) must not park after that, where
    /// nothing would ever answer it.
    #[test]
    fn no_approval_parks_after_shutdown_took_them() {
        let parking = Parking::new();
        let later = Instant::now() + Duration::from_secs(60);
        assert_eq!(parking.park_approval(&handle("a"), later, 1), Ok(()));
        assert_eq!(
            parking.park_approval(&handle("b"), later, 1),
            Err(ApprovalRefused::Full)
        );
        assert_eq!(parking.take_approvals().len(), 1);
        assert_eq!(
            parking.park_approval(&handle("c"), later, 10),
            Err(ApprovalRefused::ShuttingDown)
        );
        assert_eq!(parking.approvals_pending(), 0);
    }
}
