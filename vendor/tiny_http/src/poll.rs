//! caf-worker patch: the polled server mode ([`crate::Server::from_listener_polled`]).
//!
//! One thread per server owns every connection: it accepts (up to a cap),
//! reads request heads and bodies from non-blocking sockets, and writes the
//! answers back, all driven by epoll readiness (mio). Complete requests go to
//! the caller's handler threads through the usual `Server::recv`, with the
//! body already in memory and a response writer that only collects bytes, so
//! a handler never waits on a client. A connection holds at most one request
//! at a time: pipelined requests stay unread in its socket until the previous
//! answer has been written, so a client that does not read blocks only itself.
//! Idle and trickling connections cost a slot and a descriptor, no thread;
//! deadlines close those that stall (head, body rate, answer rate). Requests
//! an `InlineHook` takes are answered on the poller thread itself.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::common::{HTTPVersion, Header, Method};
use crate::util::MessagesQueue;
use crate::{Message, Request};

/// A hook the poller offers each complete request before queueing it for the
/// handler threads (`PollConfig::inline`). It answers the request itself and
/// returns `None`, or gives it back to be queued. It runs on the poller
/// thread, so it must be quick and must never wait (no long-polls, no locks
/// held for long): every connection of the server waits while it runs.
#[derive(Clone)]
pub struct InlineHook(pub Arc<dyn Fn(Request) -> Option<Request> + Send + Sync>);

impl std::fmt::Debug for InlineHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InlineHook")
    }
}

/// Limits of a polled server. When `max_connections` are open, a new
/// connection replaces the one that has waited longest for a request head;
/// if every open connection is busy (a body, a handler or an answer in
/// progress), it is closed at once, unless the `reserve` has room.
#[derive(Debug, Clone)]
pub struct PollConfig {
    /// Name of the poller thread.
    pub thread_name: String,
    /// Open connections beyond which new ones are closed at once.
    pub max_connections: usize,
    /// Extra connections accepted past `max_connections` when none of the
    /// open ones waits for a request head (those are closed first, longest
    /// waiting first, to make room for a new connection). Keeps a port
    /// answering probes while busy connections fill it.
    pub reserve: usize,
    /// Bodies up to this size are read before the request is dispatched;
    /// a larger one is dispatched without its body (the handler refuses it)
    /// and the connection closes after the answer.
    pub max_body: usize,
    /// A whole request head must arrive within this (measured from the
    /// connection's start or the end of its previous answer).
    pub head_timeout: Duration,
    /// Time a body or an answer may take before `min_rate` applies.
    pub transfer_grace: Duration,
    /// Minimum average rate (bytes per second) of a body or an answer
    /// after `transfer_grace`.
    pub min_rate: u64,
    /// Bytes of answers that may wait, unsent, for slow readers (all
    /// connections together). Past it, the connection with the most unsent
    /// bytes is closed until the rest fits.
    pub max_pending_bytes: usize,
    /// Requests this hook answers skip the handler threads: no hand-over to
    /// another thread and back, so a cheap answer costs one thread's time
    /// and its latency no longer depends on two wake-ups.
    pub inline: Option<InlineHook>,
}

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;
/// Longest request or header line, and most header lines (as the
/// thread-per-connection mode).
const MAX_LINE: usize = 8 * 1024;
const MAX_HEADERS: usize = 100;
/// Longest request head.
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size or trailer line (searched again as bytes arrive, so
/// kept short).
const MAX_CHUNK_LINE: usize = 1024;
/// What is read and discarded of a refused body before the connection
/// closes, so the client can read the refusal.
const DRAIN_LIMIT: usize = 16 << 20;
/// SO_SNDBUF of accepted sockets (Linux doubles it).
const SEND_BUFFER: usize = 256 * 1024;
/// How long a closing server keeps writing answers already produced.
const FINAL_FLUSH: Duration = Duration::from_secs(1);
/// Deadline checks run this often.
const TICK: Duration = Duration::from_millis(100);
/// The longest a poller with no open connection sleeps between turns (a
/// safety net: a client, a reply or the close wakes it).
const IDLE_WAIT: Duration = Duration::from_secs(60);

/// An answer collected by a handler, on its way back to the poller.
struct Reply {
    slot: usize,
    serial: u64,
    bytes: Vec<u8>,
}

/// The response writer a polled request carries: it only collects bytes and
/// hands them to the poller when dropped (after `respond`, or the 500 that
/// `Request` sends from `Drop`).
struct ReplySink {
    slot: usize,
    serial: u64,
    out: Vec<u8>,
    tx: Sender<Reply>,
    waker: Arc<Waker>,
}

thread_local! {
    /// Set on poller threads: a reply dropped there (an `InlineHook`
    /// answer) is collected by the poller right after, nobody needs waking.
    static ON_POLLER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Write for ReplySink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ReplySink {
    fn drop(&mut self) {
        let reply = Reply {
            slot: self.slot,
            serial: self.serial,
            bytes: std::mem::take(&mut self.out),
        };
        // The poller is gone when the server shut down: nothing to deliver.
        if self.tx.send(reply).is_ok() {
            if !ON_POLLER.with(|p| p.get()) {
                let _ = self.waker.wake();
            }
        }
    }
}

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(usize),
    Chunked,
}

/// A parsed request head.
struct Head {
    method: Method,
    path: String,
    version: HTTPVersion,
    headers: Vec<Header>,
    framing: Framing,
    expects_continue: bool,
    close_after: bool,
}

/// Incremental chunked-body decoder over the connection's buffer.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    Size,
    Data(usize),
    DataEnd,
    Trailer(usize),
    Done,
}

enum Phase {
    /// Waiting for (the rest of) a request head.
    Head,
    /// Reading the body of `head`.
    Body {
        head: Option<Head>,
        body: Vec<u8>,
        chunk: Chunk,
    },
    /// A handler holds the request.
    Handling,
    /// Writing an answer.
    Writing { out: Vec<u8>, pos: usize },
    /// Answered a refused body: discarding what the client still sends.
    Lingering { drained: usize },
}

struct Conn {
    stream: TcpStream,
    peer: Option<SocketAddr>,
    /// Bytes read and not yet consumed (the start of pipelined requests).
    buf: Vec<u8>,
    phase: Phase,
    /// Start of the current phase.
    since: Instant,
    /// Bytes moved (read or written) in the current phase.
    moved: usize,
    /// Head phase: bytes of `buf` already searched for the head's end, and
    /// where the line being received starts.
    scanned: usize,
    line_start: usize,
    /// Close once the current answer is written.
    close_after: bool,
    /// Drain (bounded) before closing: the body was not read.
    linger: bool,
    serial: u64,
}

enum Next {
    Wait,
    Dispatch(Head, Vec<u8>, Option<usize>),
    Close,
}

impl Conn {
    fn new(stream: TcpStream, peer: Option<SocketAddr>, serial: u64) -> Conn {
        Conn {
            stream,
            peer,
            buf: Vec::new(),
            phase: Phase::Head,
            since: Instant::now(),
            moved: 0,
            scanned: 0,
            line_start: 0,
            close_after: false,
            linger: false,
            serial,
        }
    }

    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        self.since = Instant::now();
        self.moved = 0;
    }

    /// Answers `status` with an empty body and closes.
    fn fail(&mut self, status: u16) {
        let reason = match status {
            400 => "Bad Request",
            408 => "Request Timeout",
            417 => "Expectation Failed",
            505 => "HTTP Version Not Supported",
            _ => "Error",
        };
        let out = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        self.close_after = true;
        self.linger = false;
        self.enter(Phase::Writing {
            out: out.into_bytes(),
            pos: 0,
        });
    }

    /// Reads what the socket has into `buf`: `Ok(true)` if bytes came,
    /// `Ok(false)` if none are ready, `Err` at end of stream or on error.
    fn fill(&mut self) -> Result<bool, ()> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(()),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    self.moved += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(_) => return Err(()),
            }
        }
    }

    /// Makes all the progress possible without blocking.
    fn advance(&mut self, config: &PollConfig) -> Next {
        loop {
            match &mut self.phase {
                Phase::Head => {
                    // Only bytes not yet scanned are searched (a head sent a
                    // byte at a time must not cost quadratic time).
                    let from = self.scanned.saturating_sub(3);
                    let Some(at) = find(&self.buf[from..], b"\r\n\r\n") else {
                        if let Some(p) = rfind(&self.buf[from..], b"\r\n") {
                            self.line_start = self.line_start.max(from + p + 2);
                        }
                        self.scanned = self.buf.len();
                        if self.buf.len() - self.line_start > MAX_LINE || self.buf.len() > MAX_HEAD
                        {
                            self.fail(400);
                            continue;
                        }
                        match self.fill() {
                            Ok(true) => continue,
                            Ok(false) => return Next::Wait,
                            Err(()) => return Next::Close,
                        }
                    };
                    let end = from + at;
                    let parsed = parse_head(&self.buf[..end]);
                    self.buf.drain(..end + 4);
                    self.scanned = 0;
                    self.line_start = 0;
                    let head = match parsed {
                        Ok(head) => head,
                        Err(status) => {
                            self.fail(status);
                            continue;
                        }
                    };
                    self.close_after |= head.close_after;
                    match head.framing {
                        Framing::None => return Next::Dispatch(head, Vec::new(), None),
                        Framing::Length(0) => return Next::Dispatch(head, Vec::new(), Some(0)),
                        Framing::Length(n) if n > config.max_body => {
                            self.close_after = true;
                            self.linger = true;
                            return Next::Dispatch(head, Vec::new(), Some(n));
                        }
                        _ => {
                            if head.expects_continue
                                && !self.interim(b"HTTP/1.1 100 Continue\r\n\r\n")
                            {
                                return Next::Close;
                            }
                            self.enter(Phase::Body {
                                head: Some(head),
                                body: Vec::new(),
                                chunk: Chunk::Size,
                            });
                        }
                    }
                }
                Phase::Body { head, body, chunk } => {
                    let framing = head.as_ref().map_or(Framing::None, |h| h.framing);
                    let done = match framing {
                        Framing::Length(n) => {
                            let take = (n - body.len()).min(self.buf.len());
                            body.extend(self.buf.drain(..take));
                            body.len() == n
                        }
                        _ => match decode_chunks(chunk, &mut self.buf, body) {
                            Ok(done) => done,
                            Err(()) => {
                                self.fail(400);
                                continue;
                            }
                        },
                    };
                    let over = body.len() > config.max_body;
                    if done || over {
                        let Some(head) = head.take() else {
                            return Next::Close;
                        };
                        let mut body = std::mem::take(body);
                        if over {
                            // The handler sees more than it allows and refuses;
                            // the rest of the body is never parsed.
                            body.truncate(config.max_body + 1);
                            self.close_after = true;
                            self.linger = true;
                        }
                        let length = match framing {
                            Framing::Length(n) => Some(n),
                            _ => None,
                        };
                        return Next::Dispatch(head, body, length);
                    }
                    match self.fill() {
                        Ok(true) => {}
                        Ok(false) => return Next::Wait,
                        Err(()) => return Next::Close,
                    }
                }
                Phase::Handling => return Next::Wait,
                Phase::Writing { out, pos } => {
                    while *pos < out.len() {
                        match self.stream.write(&out[*pos..]) {
                            Ok(0) => return Next::Close,
                            Ok(n) => {
                                *pos += n;
                                self.moved += n;
                            }
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Wait,
                            Err(_) => return Next::Close,
                        }
                    }
                    if self.linger {
                        let _ = self.stream.shutdown(Shutdown::Write);
                        self.buf = Vec::new();
                        self.enter(Phase::Lingering { drained: 0 });
                    } else if self.close_after {
                        return Next::Close;
                    } else {
                        self.enter(Phase::Head);
                    }
                }
                Phase::Lingering { drained } => {
                    let mut chunk = [0u8; 16 * 1024];
                    loop {
                        match self.stream.read(&mut chunk) {
                            Ok(0) => return Next::Close,
                            Ok(n) => {
                                *drained += n;
                                if *drained > DRAIN_LIMIT {
                                    return Next::Close;
                                }
                            }
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Wait,
                            Err(_) => return Next::Close,
                        }
                    }
                }
            }
        }
    }

    /// Writes a short interim answer (`100 Continue`); false if the socket
    /// would not take it at once (the client is not reading).
    fn interim(&mut self, bytes: &[u8]) -> bool {
        matches!(self.stream.write(bytes), Ok(n) if n == bytes.len())
    }

    /// Whether the connection missed its deadline at `now`.
    fn overdue(&self, now: Instant, config: &PollConfig) -> bool {
        let elapsed = now.saturating_duration_since(self.since);
        let allowed = |moved: usize| {
            let rate = config.min_rate.max(1);
            config.transfer_grace + Duration::from_millis(moved as u64 * 1000 / rate)
        };
        match self.phase {
            Phase::Head => elapsed > config.head_timeout,
            Phase::Body { .. } | Phase::Writing { .. } => elapsed > allowed(self.moved),
            Phase::Lingering { .. } => elapsed > config.transfer_grace,
            Phase::Handling => false,
        }
    }
}

/// Decodes chunks from `buf` into `body`; `Ok(true)` at the end of the body.
fn decode_chunks(state: &mut Chunk, buf: &mut Vec<u8>, body: &mut Vec<u8>) -> Result<bool, ()> {
    loop {
        match *state {
            Chunk::Size => {
                let Some(end) = find(buf, b"\r\n") else {
                    return if buf.len() > MAX_CHUNK_LINE { Err(()) } else { Ok(false) };
                };
                let line = std::str::from_utf8(&buf[..end]).map_err(|_| ())?;
                let size = line.split(';').next().unwrap_or("").trim();
                if size.is_empty() || size.len() > 15 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(());
                }
                let size = usize::from_str_radix(size, 16).map_err(|_| ())?;
                buf.drain(..end + 2);
                *state = if size == 0 { Chunk::Trailer(0) } else { Chunk::Data(size) };
            }
            Chunk::Data(left) => {
                let take = left.min(buf.len());
                body.extend(buf.drain(..take));
                if take < left {
                    *state = Chunk::Data(left - take);
                    return Ok(false);
                }
                *state = Chunk::DataEnd;
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(false);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(());
                }
                buf.drain(..2);
                *state = Chunk::Size;
            }
            Chunk::Trailer(count) => {
                let Some(end) = find(buf, b"\r\n") else {
                    return if buf.len() > MAX_CHUNK_LINE { Err(()) } else { Ok(false) };
                };
                buf.drain(..end + 2);
                if end == 0 {
                    *state = Chunk::Done;
                } else if count >= MAX_HEADERS {
                    return Err(());
                } else {
                    *state = Chunk::Trailer(count + 1);
                }
            }
            Chunk::Done => return Ok(true),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// Parses a request head (without its final blank line); `Err` is the
/// status to answer before closing.
fn parse_head(head: &[u8]) -> Result<Head, u16> {
    let Ok(text) = std::str::from_utf8(head) else {
        return Err(400);
    };
    if !text.is_ascii() {
        return Err(400);
    }
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    if request_line.len() > MAX_LINE {
        return Err(400);
    }
    let Some((method, path, version)) = crate::client::parse_request_line_for_poll(request_line.trim())
    else {
        return Err(400);
    };
    if version > (1, 1) {
        return Err(505);
    }
    let mut headers = Vec::new();
    for line in lines {
        if line.len() > MAX_LINE || headers.len() >= MAX_HEADERS {
            return Err(400);
        }
        match Header::from_str(line.trim()) {
            Ok(h) => headers.push(h),
            Err(()) => return Err(400),
        }
    }
    let value = |name: &'static str| {
        headers
            .iter()
            .find(|h| h.field.equiv(name))
            .map(|h| h.value.as_str().to_ascii_lowercase())
    };
    // A Content-Length that is not plain digits, or repeated with different
    // values, leaves the body's end ambiguous.
    let mut lengths = headers
        .iter()
        .filter(|h| h.field.equiv("Content-Length"))
        .map(|h| h.value.as_str().trim());
    let declared = match lengths.next() {
        None => None,
        Some(v) => {
            let digits = !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
            match usize::from_str(v) {
                Ok(n) if digits && lengths.all(|other| other == v) => Some(n),
                _ => return Err(400),
            }
        }
    };
    let chunked = value("Transfer-Encoding").is_some();
    let framing = match (chunked, declared) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::None,
    };
    let expects_continue = match value("Expect") {
        None => false,
        Some(v) if v == "100-continue" => true,
        Some(_) => return Err(417),
    };
    let connection = value("Connection").unwrap_or_default();
    let close_after = connection.contains("close")
        || connection.contains("upgrade")
        || (version == (1, 0) && !connection.contains("keep-alive"))
        // Both framings given: answer, then end the connection.
        || (chunked && declared.is_some());
    Ok(Head {
        method,
        path,
        version,
        headers,
        framing,
        expects_continue,
        close_after,
    })
}

/// The poller: owns the listener and every connection of one server.
struct Poller {
    poll: Poll,
    listener: TcpListener,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    open: usize,
    config: PollConfig,
    messages: Arc<MessagesQueue<Message>>,
    replies: Receiver<Reply>,
    tx: Sender<Reply>,
    waker: Arc<Waker>,
    close: Arc<AtomicBool>,
    serial: u64,
    /// Set after an accept error (e.g. out of descriptors): retry then.
    accept_retry: Option<Instant>,
}

/// Starts the poller thread for `listener`; returns its waker.
pub(crate) fn spawn(
    listener: std::net::TcpListener,
    config: PollConfig,
    messages: Arc<MessagesQueue<Message>>,
    close: Arc<AtomicBool>,
) -> io::Result<(Arc<Waker>, thread::JoinHandle<()>)> {
    listener.set_nonblocking(true)?;
    let mut listener = TcpListener::from_std(listener);
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, replies) = mpsc::channel();
    let name = config.thread_name.clone();
    let mut poller = Poller {
        poll,
        listener,
        conns: Vec::new(),
        free: Vec::new(),
        open: 0,
        config,
        messages,
        replies,
        tx,
        waker: waker.clone(),
        close,
        serial: 0,
        accept_retry: None,
    };
    let thread = thread::Builder::new()
        .name(name)
        .spawn(move || poller.run())?;
    Ok((waker, thread))
}

impl Poller {
    fn run(&mut self) {
        ON_POLLER.with(|p| p.set(true));
        let mut events = Events::with_capacity(1024);
        let mut last_sweep = Instant::now();
        let mut backlog = false;
        while !self.close.load(Ordering::Acquire) {
            // No connection, no deadline to keep: an idle port sleeps until
            // a client, a reply or the close wakes it (IDLE_WAIT is a
            // safety net), instead of waking ten times a second.
            let wait = if backlog {
                Duration::ZERO
            } else if self.open == 0 && self.accept_retry.is_none() {
                IDLE_WAIT
            } else {
                TICK
            };
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != ErrorKind::Interrupted {
                    log::warn!("poll failed: {}", e);
                    thread::sleep(Duration::from_millis(20));
                }
                continue;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(t) => self.drive(t - FIRST_CONN),
                }
            }
            let now = Instant::now();
            if self.accept_retry.is_some_and(|at| now >= at) {
                self.accept_retry = None;
                self.accept();
            }
            if now.duration_since(last_sweep) >= TICK {
                last_sweep = now;
                self.sweep(now);
            }
            // Last, so that answers an `InlineHook` gave anywhere above
            // (they wake nobody) are written in this turn.
            backlog = self.collect_replies();
        }
        self.finish(&mut events);
        // Dropping the poller closes the listener and every connection.
    }

    /// Writes the answers handed back so far, at most one more than there
    /// are open connections per call, so a client pipelining requests that
    /// an `InlineHook` answers (each answer lets its next request in, whose
    /// answer joins the channel) cannot keep the poller from its other
    /// sockets. True when answers are left for the next turn.
    fn collect_replies(&mut self) -> bool {
        for _ in 0..=self.open {
            match self.replies.try_recv() {
                Ok(reply) => self.answered(reply),
                Err(_) => return false,
            }
        }
        true
    }

    /// At shutdown: requests no handler took are answered 500 (dropping a
    /// `Request` does that), and answers already handed over are written,
    /// for at most [`FINAL_FLUSH`]; no client can hold the shutdown longer.
    fn finish(&mut self, events: &mut Events) {
        drop(self.messages.take_all());
        let until = Instant::now() + FINAL_FLUSH;
        loop {
            // Bounded per turn: a client pipelining inline-answered requests
            // must not keep this loop from its deadline.
            let backlog = self.collect_replies();
            let busy = backlog
                || self
                .conns
                .iter()
                .flatten()
                .any(|c| matches!(c.phase, Phase::Handling | Phase::Writing { .. }));
            let now = Instant::now();
            if !busy || now >= until {
                return;
            }
            let wait = if backlog {
                Duration::ZERO
            } else {
                (until - now).min(TICK)
            };
            if self.poll.poll(events, Some(wait)).is_err() {
                return;
            }
            for event in events.iter() {
                let Token(t) = event.token();
                if t >= FIRST_CONN {
                    self.drive(t - FIRST_CONN);
                }
            }
        }
    }

    fn accept(&mut self) {
        if self.accept_retry.is_some() {
            return;
        }
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    if self.open >= self.config.max_connections && !self.make_room() {
                        // Closed at once: the port is full of busy connections.
                        drop(stream);
                        continue;
                    }
                    self.insert(stream, peer);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted
                            | ErrorKind::ConnectionAborted
                            | ErrorKind::ConnectionReset
                    ) => {}
                Err(e) => {
                    // Out of descriptors or memory: back off briefly.
                    log::warn!("Error accepting new client: {}", e);
                    self.accept_retry = Some(Instant::now() + Duration::from_millis(50));
                    return;
                }
            }
        }
    }

    /// Makes room for a new connection on a full port: closes the connection
    /// that has waited longest for a request head (idle or trickling), or
    /// else uses the reserve. False when neither is possible.
    ///
    /// The candidate is read once before it is judged: a connection accepted
    /// before its client wrote may since hold a whole head in its socket
    /// that no poll turn has read (its readiness is queued behind the
    /// listener's), and it is busy, not idle. Each extra read
    /// either ends in the candidate's eviction or moves it out of the head
    /// phase on bytes its client sent, so the loop is bounded by the port's
    /// connections and a trickler cannot turn one accept into many reads.
    fn make_room(&mut self) -> bool {
        loop {
            let oldest = self
                .conns
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
                .filter(|(_, c)| matches!(c.phase, Phase::Head))
                .min_by_key(|(_, c)| c.since)
                .map(|(i, _)| i);
            let Some(i) = oldest else {
                return self.open < self.config.max_connections + self.config.reserve;
            };
            let open = self.open;
            self.drive(i);
            if self.open < open {
                return true; // The read found it closed (or it broke the rules).
            }
            let waiting = self
                .conns
                .get(i)
                .and_then(Option::as_ref)
                .is_some_and(|c| matches!(c.phase, Phase::Head));
            if waiting {
                self.close_conn(i);
                return true;
            }
        }
    }

    fn insert(&mut self, mut stream: TcpStream, peer: SocketAddr) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let interest = Interest::READABLE | Interest::WRITABLE;
        if self
            .poll
            .registry()
            .register(&mut stream, Token(slot + FIRST_CONN), interest)
            .is_err()
        {
            self.free.push(slot);
            return;
        }
        let _ = stream.set_nodelay(true);
        // Loopback autotuning lets the kernel buffer megabytes of an answer
        // per connection; keep that share small and countable.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        self.serial += 1;
        self.conns[slot] = Some(Conn::new(stream, Some(peer), self.serial));
        self.open += 1;
        self.drive(slot);
    }

    fn close_conn(&mut self, slot: usize) {
        if let Some(mut conn) = self.conns.get_mut(slot).and_then(Option::take) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
            self.free.push(slot);
            self.open -= 1;
        }
    }

    fn drive(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        match conn.advance(&self.config) {
            Next::Wait => {}
            Next::Close => self.close_conn(slot),
            Next::Dispatch(head, body, length) => {
                conn.enter(Phase::Handling);
                let sink = ReplySink {
                    slot,
                    serial: conn.serial,
                    out: Vec::new(),
                    tx: self.tx.clone(),
                    waker: self.waker.clone(),
                };
                let request = crate::request::new_buffered_request(
                    head.method,
                    head.path,
                    head.version,
                    head.headers,
                    conn.peer,
                    body,
                    length,
                    Box::new(sink),
                );
                let Some(InlineHook(hook)) = &self.config.inline else {
                    self.messages.push(request.into());
                    return;
                };
                // A panicking hook drops the request, which answers 500.
                let hook = std::panic::AssertUnwindSafe(|| hook(request));
                // Answered: the reply waits in the channel for the loop in
                // `run` (not written from here: a pipelining client would
                // recurse through `answered` and `drive`).
                if let Some(request) = std::panic::catch_unwind(hook).unwrap_or(None) {
                    self.messages.push(request.into());
                }
            }
        }
    }

    fn answered(&mut self, reply: Reply) {
        let Some(conn) = self.conns.get_mut(reply.slot).and_then(Option::as_mut) else {
            return;
        };
        if conn.serial != reply.serial || !matches!(conn.phase, Phase::Handling) {
            return;
        }
        conn.enter(Phase::Writing {
            out: reply.bytes,
            pos: 0,
        });
        self.drive(reply.slot);
        let still_writing = self
            .conns
            .get(reply.slot)
            .and_then(Option::as_ref)
            .is_some_and(|c| matches!(c.phase, Phase::Writing { .. }));
        if still_writing {
            self.shed_answers();
        }
    }

    /// Keeps the answers waiting for slow readers within
    /// `max_pending_bytes`, closing the connections with the most unsent
    /// bytes first.
    fn shed_answers(&mut self) {
        loop {
            let unsent = |c: &Conn| match &c.phase {
                Phase::Writing { out, pos } => out.len() - pos,
                _ => 0,
            };
            let total: usize = self.conns.iter().flatten().map(unsent).sum();
            if total <= self.config.max_pending_bytes {
                return;
            }
            let largest = self
                .conns
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.as_ref().map(|c| (i, unsent(c))))
                .max_by_key(|(_, n)| *n)
                .map(|(i, _)| i);
            match largest {
                Some(i) => self.close_conn(i),
                None => return,
            }
        }
    }

    /// Applies the deadlines: a late head or body is answered 408, a late
    /// answer or drain ends the connection.
    fn sweep(&mut self, now: Instant) {
        for slot in 0..self.conns.len() {
            let Some(conn) = self.conns[slot].as_mut() else {
                continue;
            };
            if !conn.overdue(now, &self.config) {
                continue;
            }
            match conn.phase {
                Phase::Head if conn.buf.is_empty() => self.close_conn(slot),
                Phase::Head | Phase::Body { .. } => {
                    conn.fail(408);
                    self.drive(slot);
                }
                _ => self.close_conn(slot),
            }
        }
    }
}
