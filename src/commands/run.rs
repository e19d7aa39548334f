//! `caf-worker run FILE|-`: execute a batch through the same pools, retry
//! and timeout code as `serve`, printing each result as it finishes.

use super::progress::{Counters, Progress};
use super::validate::intake_rules;
use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, input, serve};
use crate::config::Settings;
use crate::contract::{Ack, AckStatus, Status};
use crate::engine::{Admission, Backpressure, Engine, ResultSink};
use crate::sinks::{BatchLine, ChannelSink};
use crossbeam_channel::{Receiver, Sender};
use std::io::{self, BufWriter, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the printer saw: results per status.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    results: usize,
    success: usize,
    error: usize,
    timeout: usize,
    cancelled: usize,
}

impl Tally {
    fn failures(&self) -> usize {
        self.results - self.success
    }
}

/// Runs the batch and returns the exit code (SPEC §1).
pub fn run(mut settings: Settings, path: &str) -> i32 {
    settings.fs_root_on_demand = true;
    settings.keep_results = false;
    let items = match input::open(path, intake_rules(&settings)) {
        Ok(items) => items,
        Err(e) => {
            eprintln!("caf-worker: {}", e.0);
            return EXIT_USAGE;
        }
    };
    let interrupts = match serve::Interrupts::install() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("caf-worker: cannot install signal handlers: {e}");
            return EXIT_USAGE;
        }
    };
    let (line_tx, line_rx) = crossbeam_channel::unbounded::<BatchLine>();
    let mut sinks: Vec<Arc<dyn ResultSink>> = vec![Arc::new(ChannelSink(line_tx.clone()))];
    let results_file = match serve::open_results_file(&settings) {
        Ok(f) => f,
        Err(code) => return code,
    };
    if let Some(f) = &results_file {
        sinks.push(f.clone());
    }
    let observer = crate::telemetry::observer_for(&settings);
    let engine = match Engine::start(&settings, observer, sinks) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("caf-worker: {e}");
            return EXIT_USAGE;
        }
    };
    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    let printer = spawn_printer(line_rx, counters.clone());
    let progress = Progress::start(counters.clone());

    // Signals are handled here, not on the reading thread: a submission may
    // be blocked on a full bounded queue (stopping intake makes it return
    // `shutting_down`), or the read itself on a quiet stdin.
    let finished = Arc::new(AtomicBool::new(false));
    let stop = interrupts.drain.clone();
    let watcher = {
        let (engine, finished, counters) = (engine.clone(), finished.clone(), counters.clone());
        let (interrupts, results_file) = (interrupts.clone(), results_file.clone());
        let (grace, file) = (settings.shutdown_grace, settings.results_file.clone());
        std::thread::spawn(move || {
            while !finished.load(Ordering::Acquire) {
                if interrupts.drain.load(Ordering::Acquire) {
                    drain(&engine, &interrupts, grace, file.as_deref());
                    exit_if_reading_blocks(&finished, &counters, results_file.as_deref());
                    return;
                }
                // Parked, so the end of the run wakes it at once (unpark).
                std::thread::park_timeout(Duration::from_millis(20));
            }
        })
    };

    let (accepted, rejected) = submit_all(&engine, items, &stop, &line_tx, &counters);
    counters.input_done.store(true, Ordering::Release);
    let printed = &counters.done;

    // Wait until every accepted step's result is printed; on a signal the
    // watcher drains and shutdown answers the rest as `cancelled`.
    while printed.load(Ordering::Acquire) < accepted {
        std::thread::sleep(Duration::from_millis(2));
    }
    finished.store(true, Ordering::Release);
    watcher.thread().unpark();
    let _ = watcher.join();
    engine.begin_shutdown();
    // The printer has every result; the results file (the second sink) may
    // still be writing the last one.
    engine.quiesce(Duration::from_secs(2));
    engine.flush_suppressed_logs();
    let _ = line_tx.send(BatchLine::Done);
    let tally = printer.join().unwrap_or_default();
    progress.stop();
    if let Some(f) = results_file {
        let _ = f.sync();
    }
    let elapsed = started.elapsed();
    let rate = tally.results as f64 / elapsed.as_secs_f64().max(1e-3);
    log::info!(accepted = accepted, rejected = rejected, failed = tally.failures(),
        success = tally.success, error = tally.error, timeout = tally.timeout, cancelled = tally.cancelled,
        elapsed_ms = elapsed.as_millis() as u64, steps_per_sec = rate.round() as u64;
        "run finished: {} result(s) in {:.1} s ({rate:.0} steps/s): {} success, {} error, {} timeout, {} cancelled; {rejected} rejected",
        tally.results, elapsed.as_secs_f64(), tally.success, tally.error, tally.timeout, tally.cancelled);
    // The process ends next: every result is out and the results file is
    // synced. Freeing the table of retained results one by one (10,000 by
    // default, allocated by other threads) only delayed that end by
    // milliseconds, so the engine is left to the exit.
    std::mem::forget(engine);
    if rejected == 0 && tally.failures() == 0 {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

/// The first signal's drain: announce it, wait up to `grace` (a second
/// signal cuts it short), then say what was cancelled and where it went.
fn drain(
    engine: &Engine,
    interrupts: &serve::Interrupts,
    grace: Duration,
    file: Option<&std::path::Path>,
) {
    engine.begin_shutdown();
    serve::Interrupts::announce_drain(engine.pending_count(), grace);
    let report = engine.shutdown_unless(grace, &interrupts.stop_now);
    let whereto = match file {
        Some(p) => format!("their results are on stdout and in {}", p.display()),
        None => "their results are on stdout".to_owned(),
    };
    interrupts.report_unfinished(&report, grace, &whereto);
}

/// After a drain every accepted step has its result. If the reading thread
/// still has not finished (blocked on a quiet stdin), end the process once
/// those results are printed instead of waiting for input that may never come.
fn exit_if_reading_blocks(
    finished: &AtomicBool,
    counters: &Counters,
    results_file: Option<&crate::sinks::JsonLinesFile>,
) {
    let until = Instant::now() + Duration::from_secs(1);
    loop {
        if finished.load(Ordering::Acquire) {
            return;
        }
        let all_printed =
            counters.done.load(Ordering::Acquire) >= counters.accepted.load(Ordering::Acquire);
        if all_printed && Instant::now() >= until {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    log::warn!("the input is still open; exiting without reading the rest of it");
    if let Some(f) = results_file {
        let _ = f.sync();
    }
    std::process::exit(EXIT_FAILED);
}

/// Feeds every input item to the engine, waiting for queue space. Returns
/// (accepted, rejected) counts; rejected and duplicate inputs get an Ack line.
fn submit_all(
    engine: &Engine,
    items: input::Items,
    stop: &AtomicBool,
    out: &Sender<BatchLine>,
    counters: &Counters,
) -> (usize, usize) {
    let (mut accepted, mut rejected) = (0, 0);
    let worker_id = engine.worker_id().to_owned();
    for item in items {
        if stop.load(Ordering::Acquire) {
            log::warn!("signal received: no further input is read");
            break;
        }
        let item = match item {
            Ok(i) => i,
            Err(e) => {
                log::error!("{}; the rest of the input is not read", e.0);
                rejected += 1;
                break;
            }
        };
        let n = item.number;
        let ack = match item.parsed {
            Err(r) => {
                engine.note_rejection(r.reason);
                log::warn!(line = n, reason = r.reason.as_str(); "line {n}: rejected: {}", r.message);
                Ack::rejected(&r, &worker_id)
            }
            Ok(a) => match engine.submit(a, Backpressure::Wait) {
                Admission::Accepted(_) => {
                    accepted += 1;
                    counters.accepted.store(accepted, Ordering::Release);
                    continue;
                }
                Admission::Duplicate(a) => {
                    log::warn!(line = n; "line {n}: duplicate assignment_id {}; not executed again", a.assignment_id);
                    Ack::duplicate(&a, &worker_id)
                }
                Admission::Rejected(a, reason) => {
                    Ack::refused(&a, reason, "the worker is shutting down", &worker_id)
                }
            },
        };
        if ack.status == AckStatus::Rejected {
            rejected += 1;
        }
        let _ = out.send(BatchLine::Ack(ack_line(&ack, n)));
    }
    (accepted, rejected)
}

/// The Ack as a JSON line with the input line it answers (`"line": N`).
fn ack_line(ack: &Ack, line: usize) -> String {
    let mut v = serde_json::to_value(ack).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        obj.insert("line".to_owned(), line.into());
    }
    v.to_string()
}

/// How long the printer sleeps when it caught up with the results: a line
/// waits at most this long to be written.
const POLL_PERIOD: Duration = Duration::from_micros(500);
/// Empty polls in a row (1 ms) before the printer blocks on the channel
/// instead: at high rates a poll always finds lines; at low rates (a result
/// every few ms) blocking costs one wake-up per line, less than polling.
const IDLE_POLLS: u32 = 2;

/// Writes lines to stdout, flushing whenever it catches up with the channel.
/// A closed stdout (e.g. `| head`) stops writing but not counting.
fn spawn_printer(lines: Receiver<BatchLine>, counters: Arc<Counters>) -> JoinHandle<Tally> {
    std::thread::spawn(move || {
        let stdout = io::stdout();
        let stdout_tty = std::io::IsTerminal::is_terminal(&stdout);
        let mut out = BufWriter::with_capacity(64 * 1024, stdout.lock());
        let mut broken = false;
        let mut tally = Tally::default();
        let mut idle_polls = 0;
        loop {
            // While results flow, poll with short sleeps instead of blocking
            // on the channel: a blocked receiver costs every sender a wake-up
            // (a futex call per result); a poll costs one timer sleep per
            // period for any number of lines. After a quiet 1 ms it blocks.
            let line = match lines.try_recv() {
                Ok(line) => line,
                Err(crossbeam_channel::TryRecvError::Empty) => {
                    broken = broken || out.flush().is_err();
                    if idle_polls < IDLE_POLLS {
                        idle_polls += 1;
                        std::thread::sleep(POLL_PERIOD);
                        continue;
                    }
                    match lines.recv() {
                        Ok(line) => line,
                        Err(_) => break,
                    }
                }
                Err(crossbeam_channel::TryRecvError::Disconnected) => break,
            };
            idle_polls = 0;
            let text = match line {
                BatchLine::Result { line, status } => {
                    tally.results += 1;
                    *match status {
                        Status::Success => &mut tally.success,
                        Status::Error => &mut tally.error,
                        Status::Timeout => &mut tally.timeout,
                        Status::Cancelled => &mut tally.cancelled,
                    } += 1;
                    line
                }
                BatchLine::Ack(a) => a,
                BatchLine::Done => break,
            };
            // On a terminal shared with the progress line, clear that first.
            let clear =
                if stdout_tty && crate::telemetry::logging::PROGRESS_LINE.load(Ordering::Relaxed) {
                    "\r\x1b[2K"
                } else {
                    ""
                };
            // Plain writes: `writeln!` went through the formatting
            // machinery, ~260 instructions a line (1.6 % of an echo step).
            broken = broken
                || out.write_all(clear.as_bytes()).is_err()
                || out.write_all(text.as_bytes()).is_err()
                || out.write_all(b"\n").is_err();
            // Counted after the write, so `run` never exits before a line is out.
            counters.done.store(tally.results, Ordering::Release);
        }
        let _ = out.flush();
        tally
    })
}
