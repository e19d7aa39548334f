//! `caf-worker submit --nats URL FILE|-`: publishes a JSON Lines file of
//! assignments on the assign subject and prints each answer (ExecResult, or
//! a rejected Ack) on stdout as it arrives. A way to try the NATS front
//! without a NATS command-line tool.

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use crate::config::{NatsMode, Settings};
use crate::transport::front;
use crate::transport::nats::{Client, Headers, Message, Subscription};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Publishes waiting for their PubAck at once (JetStream).
const WINDOW: usize = 1024;
/// Core mode: assignments published ahead of their answers.
const CORE_WINDOW: usize = 4096;
/// Messages the answer subscriptions buffer.
const ANSWER_BUFFER: usize = 1 << 16;

/// What `submit` was asked to do.
#[derive(Debug, Clone)]
pub struct SubmitArgs {
    /// Input file or `-`.
    pub input: String,
    /// Give up after this long without any answer.
    pub idle_timeout: Duration,
    /// Only print the summary, not every answer.
    pub quiet: bool,
}

/// Runs `submit`; exit 0 when every assignment was answered.
pub fn submit(settings: &Settings, args: &SubmitArgs) -> i32 {
    let Some(nats) = &settings.nats else {
        eprintln!("caf-worker: submit needs --nats URL (or WORKER_NATS_URL)");
        return EXIT_USAGE;
    };
    let lines = match read_lines(&args.input) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("caf-worker: cannot read {}: {e}", args.input);
            return EXIT_USAGE;
        }
    };
    let opts = match front::client_options(nats, &format!("{}-submit", settings.worker_id)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("caf-worker: invalid WORKER_NATS_URL: {e}");
            return EXIT_USAGE;
        }
    };
    let client = Client::start(opts);
    let connected = wait_connected(&client, Duration::from_secs(10));
    if !connected {
        eprintln!(
            "caf-worker: cannot connect to {} within 10 s",
            crate::config::redact_url_list(&nats.url)
        );
        client.close();
        return EXIT_FAILED;
    }
    // Subscribe before publishing, so no answer can be missed.
    let subs = (
        client.subscribe_with_capacity(&nats.result_subject, None, ANSWER_BUFFER),
        client.subscribe_with_capacity(&nats.ack_subject, None, ANSWER_BUFFER),
    );
    let (results, acks) = match subs {
        (Ok(r), Ok(a)) => (r, a),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("caf-worker: cannot subscribe: {e}");
            return EXIT_FAILED;
        }
    };
    if let Err(e) = client.flush(Duration::from_secs(5)) {
        eprintln!("caf-worker: the server did not confirm the subscriptions: {e}");
        return EXIT_FAILED;
    }
    if nats.mode == NatsMode::JetStream {
        if let Err(e) = front::ensure_streams(&client, nats) {
            eprintln!("caf-worker: cannot set up the JetStream streams: {e}");
            return EXIT_FAILED;
        }
    }
    let mut tally = Tally::new(&lines);
    let started = Instant::now();
    let answered = AtomicUsize::new(0);
    let code = std::thread::scope(|scope| {
        let publisher = scope.spawn(|| match nats.mode {
            NatsMode::Core => publish_core(&client, &nats.assign_subject, &lines, &answered),
            NatsMode::JetStream => publish_js(&client, &nats.assign_subject, &lines),
        });
        let code = tally.collect(&results, &acks, args, started, &answered);
        match publisher.join() {
            Ok(Ok(())) => code,
            Ok(Err(e)) => {
                eprintln!("caf-worker: publishing failed: {e}");
                EXIT_FAILED
            }
            Err(_) => EXIT_FAILED,
        }
    });
    drop((results, acks));
    client.drain(Duration::from_secs(2));
    code
}

fn read_lines(path: &str) -> std::io::Result<Vec<Vec<u8>>> {
    let reader: Box<dyn BufRead> = if path == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(path)?))
    };
    let mut out = Vec::new();
    for line in reader.split(b'\n') {
        let line = line?;
        if !line.iter().all(u8::is_ascii_whitespace) {
            out.push(line);
        }
    }
    Ok(out)
}

fn wait_connected(client: &Client, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while !client.is_connected() {
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn id_of(line: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(line)
        .ok()?
        .get("assignment_id")?
        .as_str()
        .map(str::to_owned)
}

/// Core mode has no flow control: at most [`CORE_WINDOW`] assignments are
/// published ahead of their answers, so a busy worker's subscription does
/// not overflow (core NATS drops what a slow subscriber cannot take).
fn publish_core(
    client: &Client,
    subject: &str,
    lines: &[Vec<u8>],
    answered: &AtomicUsize,
) -> Result<(), String> {
    let mut stalled_since = None;
    for (i, line) in lines.iter().enumerate() {
        while i >= answered.load(Ordering::Acquire) + CORE_WINDOW {
            let since = *stalled_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "no answers for 30 s with {CORE_WINDOW} outstanding"
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        stalled_since = None;
        client.publish(subject, line).map_err(|e| e.to_string())?;
    }
    client
        .flush(Duration::from_secs(10))
        .map_err(|e| e.to_string())
}

/// Publishes with `Nats-Msg-Id` and a window of PubAcks in flight.
fn publish_js(client: &Client, subject: &str, lines: &[Vec<u8>]) -> Result<(), String> {
    let inbox = client.new_inbox();
    let acks = client
        .subscribe_with_capacity(&format!("{inbox}.*"), None, WINDOW * 2)
        .map_err(|e| e.to_string())?;
    let mut waiting: HashMap<usize, Instant> = HashMap::new();
    let mut next = 0;
    let mut last_progress = Instant::now();
    while next < lines.len() || !waiting.is_empty() {
        while next < lines.len() && waiting.len() < WINDOW {
            let mut h = Headers::new();
            if let Some(id) = id_of(&lines[next]) {
                h.insert("Nats-Msg-Id", &id);
            }
            client
                .publish_with_headers(subject, Some(&format!("{inbox}.{next}")), &h, &lines[next])
                .map_err(|e| e.to_string())?;
            waiting.insert(next, Instant::now());
            next += 1;
        }
        match acks.receiver().recv_timeout(Duration::from_millis(100)) {
            Ok(m) => {
                let Some(i) = m.subject.rsplit('.').next().and_then(|t| t.parse().ok()) else {
                    continue;
                };
                let body: Value = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
                if m.headers.as_ref().and_then(|h| h.status()) == Some(503) {
                    return Err(format!("no JetStream stream captures {subject}"));
                }
                if let Some(err) = body.get("error") {
                    return Err(format!("JetStream refused line {}: {err}", i + 1));
                }
                waiting.remove(&i);
                last_progress = Instant::now();
            }
            Err(_) if last_progress.elapsed() > Duration::from_secs(10) => {
                return Err(format!(
                    "{} publishes got no PubAck within 10 s",
                    waiting.len()
                ));
            }
            Err(_) => {}
        }
    }
    Ok(())
}

/// The fields of a result or Ack that `submit` looks at (the rest is skipped).
#[derive(serde::Deserialize)]
struct Answer<'a> {
    #[serde(borrow)]
    assignment_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    status: Option<std::borrow::Cow<'a, str>>,
}

/// What is still unanswered.
struct Tally {
    open: HashSet<String>,
    /// Lines with no readable id: each expects one rejected Ack without an id.
    anonymous: usize,
    total: usize,
    results: usize,
    rejected: usize,
    ok: usize,
}

impl Tally {
    fn new(lines: &[Vec<u8>]) -> Tally {
        let mut open = HashSet::new();
        let mut anonymous = 0;
        for l in lines {
            match id_of(l) {
                Some(id) => {
                    open.insert(id);
                }
                None => anonymous += 1,
            }
        }
        Tally {
            total: open.len() + anonymous,
            open,
            anonymous,
            results: 0,
            rejected: 0,
            ok: 0,
        }
    }

    fn done(&self) -> bool {
        self.open.is_empty() && self.anonymous == 0
    }

    fn on_result(&mut self, m: &Message, out: &mut impl Write, quiet: bool) {
        let Ok(v) = serde_json::from_slice::<Answer<'_>>(&m.payload) else {
            return;
        };
        let Some(id) = v.assignment_id else {
            return;
        };
        if self.open.remove(id.as_ref()) {
            self.results += 1;
            if v.status.as_deref() == Some("success") {
                self.ok += 1;
            }
            if !quiet {
                let _ = out.write_all(&m.payload);
                let _ = out.write_all(b"\n");
            }
        }
    }

    fn on_ack(&mut self, m: &Message, out: &mut impl Write, quiet: bool) {
        let Ok(v) = serde_json::from_slice::<Answer<'_>>(&m.payload) else {
            return;
        };
        if v.status.as_deref() != Some("rejected") {
            return;
        }
        let counted = match v.assignment_id {
            Some(id) => self.open.remove(id.as_ref()),
            None if self.anonymous > 0 => {
                self.anonymous -= 1;
                true
            }
            None => false,
        };
        if counted {
            self.rejected += 1;
            if !quiet {
                let _ = out.write_all(&m.payload);
                let _ = out.write_all(b"\n");
            }
        }
    }

    fn collect(
        &mut self,
        results: &Subscription,
        acks: &Subscription,
        args: &SubmitArgs,
        started: Instant,
        answered: &AtomicUsize,
    ) -> i32 {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        let mut last = Instant::now();
        while !self.done() && last.elapsed() < args.idle_timeout {
            crossbeam_channel::select! {
                recv(results.receiver()) -> m => if let Ok(m) = m {
                    self.on_result(&m, &mut out, args.quiet);
                    answered.store(self.results + self.rejected, Ordering::Release);
                    last = Instant::now();
                },
                recv(acks.receiver()) -> m => if let Ok(m) = m {
                    self.on_ack(&m, &mut out, args.quiet);
                    answered.store(self.results + self.rejected, Ordering::Release);
                    last = Instant::now();
                },
                default(Duration::from_millis(100)) => {
                    let _ = out.flush();
                }
            }
        }
        let _ = out.flush();
        let secs = started.elapsed().as_secs_f64();
        let answered = self.results + self.rejected;
        eprintln!(
            "caf-worker submit: {answered} of {} answered in {secs:.3} s ({:.0}/s): {} results ({} success), {} rejected",
            self.total,
            answered as f64 / secs.max(1e-9),
            self.results,
            self.ok,
            self.rejected
        );
        if self.done() {
            EXIT_OK
        } else {
            eprintln!(
                "caf-worker submit: {} unanswered after {} ms without an answer",
                self.total - answered,
                args.idle_timeout.as_millis()
            );
            EXIT_FAILED
        }
    }
}
