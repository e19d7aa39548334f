//! Progress of a `run` batch: a live line on a terminal's stderr, a JSON log
//! line every 5 s otherwise, and the final summary.
//!
//! The hot path only bumps atomic counters ([`Counters`]); one thread reads
//! them on a timer, so progress costs no lock per step.

use crate::telemetry::logging::PROGRESS_LINE;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the terminal line is redrawn.
const DRAW_EVERY: Duration = Duration::from_millis(200);
/// How often a progress log line is written when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// What the progress reporter reads.
#[derive(Debug, Default)]
pub struct Counters {
    /// Steps accepted so far.
    pub accepted: AtomicUsize,
    /// Results printed so far.
    pub done: AtomicUsize,
    /// Set once the whole input is read (the total is then known).
    pub input_done: AtomicBool,
    stop: AtomicBool,
}

/// The running reporter.
pub struct Progress {
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts the reporter thread.
    pub fn start(counters: Arc<Counters>) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("caf-progress".into())
            .stack_size(128 * 1024)
            .spawn(move || report(&c, tty))
            .ok();
        Progress { counters, thread }
    }

    /// Stops the reporter and clears its line.
    pub fn stop(mut self) {
        self.counters.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            // Wakes it at once: `run` ends (and is timed) without waiting
            // out the rest of a draw period.
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn report(c: &Counters, tty: bool) {
    let start = Instant::now();
    let mut last_log = start;
    let mut next = start + DRAW_EVERY;
    while !c.stop.load(Ordering::Acquire) {
        // Parked, not asleep, so `stop` can wake it (a wake-up before the
        // draw time, spurious or not, only loops).
        let now = Instant::now();
        if now < next {
            std::thread::park_timeout(next - now);
            continue;
        }
        next = now + DRAW_EVERY;
        let snap = Snapshot::take(c, start.elapsed());
        if tty {
            PROGRESS_LINE.store(true, Ordering::Relaxed);
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{}", snap.line());
            let _ = err.flush();
        } else if last_log.elapsed() >= LOG_EVERY {
            last_log = Instant::now();
            log::info!(done = snap.done, total = snap.total, total_known = snap.known,
                rate_per_sec = snap.rate.round() as u64, eta_s = snap.eta().map(|d| d.as_secs());
                "progress: {}", snap.line());
        }
    }
    if tty {
        // The last state (all done) is drawn once before the line is
        // cleared, as a period that ended would have drawn it.
        PROGRESS_LINE.store(false, Ordering::Relaxed);
        let snap = Snapshot::take(c, start.elapsed());
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{}\r\x1b[2K", snap.line());
        let _ = err.flush();
    }
}

struct Snapshot {
    done: usize,
    total: usize,
    known: bool,
    rate: f64,
}

impl Snapshot {
    fn take(c: &Counters, elapsed: Duration) -> Snapshot {
        let done = c.done.load(Ordering::Acquire);
        let secs = elapsed.as_secs_f64().max(1e-3);
        Snapshot {
            done,
            total: c.accepted.load(Ordering::Acquire).max(done),
            known: c.input_done.load(Ordering::Acquire),
            rate: done as f64 / secs,
        }
    }

    /// Time left at the current rate, once the total is known.
    fn eta(&self) -> Option<Duration> {
        (self.known && self.rate > 0.0)
            .then(|| Duration::from_secs_f64((self.total - self.done) as f64 / self.rate))
    }

    /// `1234/5000 steps (24%) · 812 steps/s · ETA 5s`
    fn line(&self) -> String {
        let total = if self.known {
            format!("{}", self.total)
        } else {
            format!("{}+", self.total)
        };
        let pct = if self.known && self.total > 0 {
            format!(" ({}%)", self.done * 100 / self.total)
        } else {
            String::new()
        };
        let eta = match self.eta() {
            Some(d) => format!("ETA {}", human(d)),
            None => "ETA ?".to_owned(),
        };
        format!(
            "{}/{total} steps{pct} · {:.0} steps/s · {eta}",
            self.done, self.rate
        )
    }
}

/// `42s`, `3m05s`, `1h02m`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{}s", s),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_reads_well() {
        let s = Snapshot {
            done: 250,
            total: 1000,
            known: true,
            rate: 125.0,
        };
        assert_eq!(s.line(), "250/1000 steps (25%) · 125 steps/s · ETA 6s");
        let s = Snapshot { known: false, ..s };
        assert_eq!(s.line(), "250/1000+ steps · 125 steps/s · ETA ?");
        assert_eq!(human(Duration::from_secs(185)), "3m05s");
        assert_eq!(human(Duration::from_secs(3720)), "1h02m");
    }
}
