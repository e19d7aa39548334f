//! The process-wide retry budget (SPEC §6.2, CP2): over a sliding 10 s window,
//! retries may be at most `percent`% of first attempts plus `min_per_sec` per
//! second of the window — the same shape as Finagle's RetryBudget.

use std::sync::Mutex;
use std::time::Instant;

/// Window length in seconds.
pub const WINDOW_SECS: u64 = 10;

#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    second: u64,
    first_attempts: u64,
    retries: u64,
}

/// A sliding-window retry budget shared by all pool threads.
#[derive(Debug)]
pub struct RetryBudget {
    percent: u64,
    min_per_sec: u64,
    origin: Instant,
    buckets: Mutex<[Bucket; WINDOW_SECS as usize]>,
}

impl RetryBudget {
    /// A budget allowing `percent`% of first attempts plus `min_per_sec` retries per second.
    pub fn new(percent: u32, min_per_sec: u32) -> RetryBudget {
        RetryBudget {
            percent: u64::from(percent),
            min_per_sec: u64::from(min_per_sec),
            origin: Instant::now(),
            buckets: Mutex::new([Bucket::default(); WINDOW_SECS as usize]),
        }
    }

    /// Retries the window allows for `first_attempts` first attempts.
    pub fn allowance(&self, first_attempts: u64) -> u64 {
        first_attempts * self.percent / 100 + self.min_per_sec * WINDOW_SECS
    }

    /// Runs `f` on the current second's bucket with the window's totals
    /// (current bucket included), after expiring buckets older than the window.
    fn with_window<R>(&self, f: impl FnOnce(&mut Bucket, u64, u64) -> R) -> R {
        let mut guard = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        // Read the clock under the lock: a thread that read an earlier second
        // must not run after one that already moved the window forward.
        let now = self.origin.elapsed().as_secs();
        let slot_index = (now % WINDOW_SECS) as usize;
        if guard[slot_index].second != now {
            guard[slot_index] = Bucket {
                second: now,
                ..Bucket::default()
            };
        }
        let (mut firsts, mut retries) = (0, 0);
        for b in guard
            .iter()
            .filter(|b| now.saturating_sub(b.second) < WINDOW_SECS)
        {
            firsts += b.first_attempts;
            retries += b.retries;
        }
        f(&mut guard[slot_index], firsts, retries)
    }

    /// Counts a first attempt (a deposit into the budget).
    pub fn record_first_attempt(&self) {
        self.with_window(|slot, _, _| slot.first_attempts += 1);
    }

    /// Takes one retry from the budget; `false` means the retry is denied.
    pub fn try_spend(&self) -> bool {
        self.with_window(|slot, firsts, retries| {
            if retries < self.allowance(firsts) {
                slot.retries += 1;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_percent_plus_floor_within_the_window() {
        let b = RetryBudget::new(20, 10);
        for _ in 0..200 {
            b.record_first_attempt();
        }
        let granted = (0..1000).filter(|_| b.try_spend()).count() as u64;
        assert_eq!(granted, 200 * 20 / 100 + 10 * WINDOW_SECS);
    }

    #[test]
    fn zero_budget_denies() {
        let b = RetryBudget::new(0, 0);
        b.record_first_attempt();
        assert!(!b.try_spend());
    }
}
