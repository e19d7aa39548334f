//! One HTTP/1.1 exchange (SPEC §12.15): ureq's protocol engine
//! (`ureq-proto`, the state machine inside `ureq::Agent`) driven over
//! ureq's transports (TCP from `tcp.rs`, rustls), with the block's own
//! per-thread connection pool.
//!
//! Why not `Agent::run`: on a pooled keep-alive request, the agent's layers
//! around the protocol engine (timings for nine kinds of timeout,
//! middleware, a streaming body handler, a pool keyed by the whole config, a
//! resolver call before every pool lookup) cost as much CPU as the engine
//! itself, and the block needs none of them: it has two timeouts (connect,
//! and the attempt's total), follows redirects itself, and always reads the
//! whole body. What ureq does is kept: the wire format (request head as the
//! agent writes it, response parsing with its header-size limit, length,
//! chunked and close-delimited bodies, 1xx and `Expect: 100-continue`
//! handling, keep-alive decisions), the transports and the resolver.
//!
//! Timeouts: every I/O call, and a host-name lookup, gets the time left
//! until the attempt's deadline; connecting then gets the smaller of that
//! and the connect timeout (counted from the end of the lookup, as in ureq).
//!
//! Pooling: a connection goes back to its thread's pool only after its
//! response was read to the end, with keep-alive allowed and no byte past
//! the response buffered; it is probed (`is_open`, one non-blocking peek)
//! when taken out, not when put back (ureq probed both times).

use super::CachingResolver;
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use ureq::Timeout;
use ureq::config::Config;
use ureq::http::{self, HeaderValue, Method, Uri, header, response::Parts};
use ureq::unversioned::resolver::Resolver;
use ureq::unversioned::transport::time::{Duration as UreqDuration, Instant as UreqInstant};
use ureq::unversioned::transport::{ConnectionDetails, Connector, NextTimeout, Transport};
use ureq_proto::BodyMode;
use ureq_proto::client::state::{Await100, RecvBody, RecvResponse, SendBody, SendRequest};
use ureq_proto::client::{
    Await100Result, Call, RecvBodyResult, RecvResponseResult, SendRequestResult,
};

/// How long a request with `Expect: 100-continue` waits for the `100`
/// before it sends its body anyway (ureq's default).
const AWAIT_100: Duration = Duration::from_secs(1);
/// An idle pooled connection older than this is closed, not reused
/// (ureq's default).
const MAX_IDLE_AGE: Duration = Duration::from_secs(15);
/// Idle connections a pool keeps, over all hosts.
const IDLE_PER_POOL: usize = 8;
/// Idle connections a pool keeps per host (its thread uses one at a time;
/// a spare covers one being closed by the upstream).
const IDLE_PER_HOST: usize = 2;
/// Pools at most (one per pool thread up to this; more threads share).
const MAX_POOLS: usize = 256;

/// A boxed transport, as the connector chain makes it.
type BoxedTransport = Box<dyn Transport>;
/// The connector chain, boxed.
type BoxedConnector = dyn Connector<(), Out = BoxedTransport>;

/// What one request may send and how its body is read.
pub(super) struct Request<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a http::HeaderMap,
    pub body: &'a [u8],
    /// The attempt's time left (`None`: no limit).
    pub total: Option<Duration>,
    /// The connect timeout (`None`: only `total` applies).
    pub connect: Option<Duration>,
    /// Skip pooled connections to this host (and close them).
    pub fresh: bool,
}

/// How much of a response body is read, chosen from the response head.
#[derive(Debug, Clone, Copy)]
pub(super) enum BodyLimit {
    /// More than this many bytes is [`ureq::Error::BodyExceedsLimit`].
    Fail(u64),
    /// At most this many bytes are kept; the rest (or a read error) ends
    /// the body and closes the connection.
    Cut(u64),
}

/// A response read to its end.
#[derive(Debug)]
pub(super) struct Answer {
    pub head: Parts,
    pub body: Vec<u8>,
}

/// A failed exchange.
#[derive(Debug)]
pub(super) struct Failure {
    pub error: ureq::Error,
    /// It ran on a pooled connection and no response byte came back: the
    /// upstream may have closed that connection while it sat idle.
    pub on_idle_connection: bool,
}

/// Connects, pools and runs exchanges; one pool per pool thread.
pub(super) struct Client {
    config: Config,
    connector: Arc<BoxedConnector>,
    resolver: CachingResolver,
    pools: Vec<Mutex<Pool>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("pools", &self.pools.len())
            .finish()
    }
}

impl Client {
    /// `config` carries what the connectors read (TLS roots, `TCP_NODELAY`,
    /// buffer sizes) and the response-header size limit.
    pub(super) fn new(
        config: Config,
        connector: Arc<BoxedConnector>,
        resolver: CachingResolver,
        pool_threads: usize,
    ) -> Client {
        let pools = (0..pool_threads.clamp(1, MAX_POOLS))
            .map(|_| Mutex::new(Pool::default()))
            .collect();
        Client {
            config,
            connector,
            resolver,
            pools,
        }
    }

    /// This thread's pool: pool threads are numbered on their first
    /// request and each takes its own, so the lock is uncontended.
    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed);
        }
        let n = NUMBER.with(|n| *n);
        self.pools[n % self.pools.len()]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `req` and reads the whole response (its body as `limit` says).
    pub(super) fn run(
        &self,
        req: &Request<'_>,
        limit: &dyn Fn(&Parts) -> BodyLimit,
    ) -> Result<Answer, Failure> {
        let clock = Clock::start(req.total, req.connect);
        // A request that cannot be built costs no pooled connection.
        let call = prepare(req).map_err(|error| Failure {
            error,
            on_idle_connection: false,
        })?;
        let target = Target::of(req.uri);
        let pooled = match &target {
            Some(t) if req.fresh => {
                self.pool().discard(t);
                None
            }
            Some(t) => self.pool().take(t),
            None => None,
        };
        let reused = pooled.is_some();
        let (key, transport) = match pooled {
            Some((key, t)) => (Some(key), t),
            None => {
                let t = self.connect(req.uri, &clock).map_err(|error| Failure {
                    error,
                    on_idle_connection: false,
                })?;
                (target.as_ref().map(Target::key), t)
            }
        };
        let mut exchange = Exchange {
            transport,
            clock,
            received: false,
            max_head: self.config.max_response_header_size(),
        };
        match exchange.run(call, req.body, limit) {
            Ok((answer, keep)) => {
                // Bytes past the response (an upstream sending more than it
                // framed) mean the connection cannot be trusted again.
                let clean = exchange.transport.buffers().input().is_empty();
                if let (true, true, Some(key)) = (keep, clean, key) {
                    self.pool().put(key, exchange.transport);
                }
                Ok(answer)
            }
            Err(error) => Err(Failure {
                on_idle_connection: reused && !exchange.received,
                error,
            }),
        }
    }

    /// A new connection: resolve (with the egress check) within the
    /// attempt's time, then the connector chain within the connect timeout,
    /// which starts after the lookup (as in ureq). A pooled connection skips
    /// this: its address passed the same (fixed) egress policy when made.
    fn connect(&self, uri: &Uri, clock: &Clock) -> Result<BoxedTransport, ureq::Error> {
        let addrs = self.resolver.resolve(uri, &self.config, clock.io())?;
        let timeout = clock.connect();
        // ureq gives an exhausted connect budget one more second; the
        // attempt's deadline is firm here.
        if timeout.after.is_zero() {
            return Err(ureq::Error::Timeout(timeout.reason));
        }
        let connector = self.connector.clone();
        let details = ConnectionDetails {
            uri,
            addrs,
            config: &self.config,
            request_level: false,
            resolver: &self.resolver,
            now: UreqInstant::now(),
            timeout,
            current_time: Arc::new(UreqInstant::now),
            // Used by connectors that connect through another (proxies);
            // this chain has none, but the contract is kept.
            run_connector: Arc::new(move |details: &ConnectionDetails| {
                connector
                    .connect(details, None)?
                    .ok_or(ureq::Error::ConnectionFailed)
            }),
            // Only `Agent::shutdown` uses registered sockets; there is no agent.
            register_shutdown: Arc::new(|_| Ok(())),
        };
        let transport = self
            .connector
            .connect(&details, None)?
            .ok_or(ureq::Error::ConnectionFailed)?;
        if details.needs_tls() && !transport.is_tls() {
            return Err(ureq::Error::TlsRequired);
        }
        Ok(transport)
    }
}

/// The attempt's deadline and the connect timeout.
#[derive(Debug, Clone, Copy)]
struct Clock {
    end: Option<Instant>,
    connect: Option<Duration>,
}

impl Clock {
    fn start(total: Option<Duration>, connect: Option<Duration>) -> Clock {
        Clock {
            end: total.and_then(|t| Instant::now().checked_add(t)),
            connect,
        }
    }

    /// The timeout for I/O: the time left in the attempt.
    fn io(&self) -> NextTimeout {
        timeout_until(self.end, Timeout::Global)
    }

    /// The timeout for connecting, from now: whichever deadline comes
    /// first, named as ureq names it (the block's error mapping reads it).
    fn connect(&self) -> NextTimeout {
        let connect_end = self.connect.and_then(|c| Instant::now().checked_add(c));
        self.sooner(connect_end, Timeout::Connect)
    }

    /// Waiting for a `100 Continue`: up to [`AWAIT_100`] from `since`, or
    /// the attempt's deadline if that comes first.
    fn await_100(&self, since: Instant) -> NextTimeout {
        self.sooner(Some(since + AWAIT_100), Timeout::Await100)
    }

    /// Whichever comes first: the attempt's deadline (`Global`) or `other`
    /// (named `reason`; `None`: only the deadline applies).
    fn sooner(&self, other: Option<Instant>, reason: Timeout) -> NextTimeout {
        match (self.end, other) {
            (Some(end), Some(o)) if end <= o => timeout_until(Some(end), Timeout::Global),
            (_, Some(o)) => timeout_until(Some(o), reason),
            (end, None) => timeout_until(end, Timeout::Global),
        }
    }
}

fn timeout_until(end: Option<Instant>, reason: Timeout) -> NextTimeout {
    NextTimeout {
        after: match end {
            Some(end) => UreqDuration::Exact(end.saturating_duration_since(Instant::now())),
            None => UreqDuration::NotHappening,
        },
        reason,
        per_read: None,
        per_write: None,
    }
}

/// The end of the input, as ureq reports it (`Error::disconnected`).
fn disconnected(why: &'static str) -> ureq::Error {
    ureq::Error::Io(io::Error::new(io::ErrorKind::UnexpectedEof, why))
}

/// A protocol step that cannot go on (ureq unwraps these; a value here).
fn stuck(step: &'static str) -> ureq::Error {
    ureq::Error::Io(io::Error::other(format!("HTTP exchange stuck in {step}")))
}

/// One exchange on one connection.
struct Exchange {
    transport: BoxedTransport,
    clock: Clock,
    /// At least one response byte arrived.
    received: bool,
    max_head: usize,
}

impl Exchange {
    /// The response, and whether the connection can be pooled.
    fn run(
        &mut self,
        call: Call<SendRequest>,
        body: &[u8],
        limit: &dyn Fn(&Parts) -> BodyLimit,
    ) -> Result<(Answer, bool), ureq::Error> {
        let call = match self.send_request(call)? {
            SendRequestResult::Await100(call) => match self.await_100(call)? {
                Await100Result::SendBody(call) => self.send_body(call, body)?,
                Await100Result::RecvResponse(call) => call,
            },
            SendRequestResult::SendBody(call) => self.send_body(call, body)?,
            SendRequestResult::RecvResponse(call) => call,
        };
        let (response, next) = self.recv_response(call)?;
        let (head, ()) = response.into_parts();
        // No body: the head says which kind ends here; either may close.
        let keep = match next {
            RecvResponseResult::RecvBody(call) => {
                let (body, keep) = self.recv_body(call, limit(&head))?;
                return Ok((Answer { head, body }, keep));
            }
            RecvResponseResult::Redirect(call) => !call.must_close_connection(),
            RecvResponseResult::Cleanup(call) => !call.must_close_connection(),
        };
        let body = Vec::new();
        Ok((Answer { head, body }, keep))
    }

    fn send_request(
        &mut self,
        mut call: Call<SendRequest>,
    ) -> Result<SendRequestResult, ureq::Error> {
        while !call.can_proceed() {
            let amount = call.write(self.transport.buffers().output())?;
            self.transport.transmit_output(amount, self.clock.io())?;
        }
        call.proceed()?
            .ok_or_else(|| stuck("sending the request head"))
    }

    /// Waits for a `100 Continue` (or an early final response) before the
    /// body, as ureq does; silence past [`AWAIT_100`] sends the body.
    fn await_100(&mut self, mut call: Call<Await100>) -> Result<Await100Result, ureq::Error> {
        let since = Instant::now();
        while call.can_keep_await_100() {
            let timeout = self.clock.await_100(since);
            if timeout.after.is_zero() {
                if timeout.reason == Timeout::Await100 {
                    break;
                }
                return Err(ureq::Error::Timeout(timeout.reason));
            }
            match self.transport.maybe_await_input(timeout) {
                Ok(_) => {
                    let input = self.transport.buffers().input();
                    if input.is_empty() {
                        return Err(disconnected("await_100 empty input"));
                    }
                    self.received = true;
                    let amount = call.try_read_100(input)?;
                    // Consuming nothing clears the buffer's progress flag,
                    // so the next wait reads more instead of returning at
                    // once on the partial answer (a busy loop in ureq).
                    self.transport.buffers().input_consume(amount);
                    if amount > 0 {
                        break;
                    }
                }
                Err(ureq::Error::Timeout(Timeout::Await100)) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(call.proceed()?)
    }

    fn send_body(
        &mut self,
        mut call: Call<SendBody>,
        body: &[u8],
    ) -> Result<Call<RecvResponse>, ureq::Error> {
        let mut rest = body;
        while !call.can_proceed() {
            let output = self.transport.buffers().output();
            let n = rest.len().min(output.len());
            output[..n].copy_from_slice(&rest[..n]);
            call.consume_direct_write(n)?;
            rest = &rest[n..];
            self.transport.transmit_output(n, self.clock.io())?;
        }
        call.proceed()
            .ok_or_else(|| stuck("sending the request body"))
    }

    fn recv_response(
        &mut self,
        mut call: Call<RecvResponse>,
    ) -> Result<(http::Response<()>, RecvResponseResult), ureq::Error> {
        let response = loop {
            let progressed = self.transport.maybe_await_input(self.clock.io())?;
            let input = self.transport.buffers().input();
            self.received |= !input.is_empty();
            // Redirects are followed by the block, so never from a partial head.
            let (amount, response) = call.try_response(input, false)?;
            let size = if response.is_some() {
                amount
            } else {
                input.len()
            };
            if size > self.max_head {
                return Err(ureq::Error::LargeResponseHeader(input.len(), self.max_head));
            }
            self.transport.buffers().input_consume(amount);
            match response {
                Some(r) => break r,
                None if !progressed => return Err(disconnected("recv_response made no progress")),
                None => {}
            }
        };
        let next = call
            .proceed()
            .ok_or_else(|| stuck("reading the response head"))?;
        Ok((response, next))
    }

    /// Reads the body to its end (ureq's body handler, whole): the bytes,
    /// and whether the connection can be pooled.
    fn recv_body(
        &mut self,
        call: Call<RecvBody>,
        limit: BodyLimit,
    ) -> Result<(Vec<u8>, bool), ureq::Error> {
        let limit = match limit {
            BodyLimit::Fail(n) => (n, false),
            BodyLimit::Cut(n) => (n, true),
        };
        SCRATCH.with_borrow_mut(|buf| self.read_body(call, limit, buf))
    }

    /// `limit`: the most bytes kept, and whether more cuts the body (else
    /// fails it).
    fn read_body(
        &mut self,
        mut call: Call<RecvBody>,
        limit: (u64, bool),
        buf: &mut [u8],
    ) -> Result<(Vec<u8>, bool), ureq::Error> {
        let cut = limit.1;
        let mut body = Vec::new();
        let mut remote_closed = false;
        loop {
            let fulfilled = match call.body_mode() {
                BodyMode::NoBody => true,
                BodyMode::LengthDelimited(_) | BodyMode::Chunked => call.can_proceed(),
                // Ends only when the upstream closes.
                BodyMode::CloseDelimited => false,
            };
            if fulfilled {
                break;
            }
            // `None` from `decode`: the body ends here (a cut one).
            if self.transport.buffers().can_use_input() {
                let t = &mut self.transport;
                let Some((used, out)) = decode(&mut call, t, &mut body, buf, limit)? else {
                    return Ok((body, false));
                };
                if out > 0 || used > 0 {
                    continue;
                }
            }
            if remote_closed {
                break;
            }
            let progressed = match self.transport.maybe_await_input(self.clock.io()) {
                Ok(p) => p,
                Err(ureq::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    remote_closed = true;
                    true
                }
                Err(_) if cut => return Ok((body, false)),
                Err(e) => return Err(e),
            };
            let ended = self.transport.buffers().input().is_empty();
            let t = &mut self.transport;
            let Some((_, out)) = decode(&mut call, t, &mut body, buf, limit)? else {
                return Ok((body, false));
            };
            if out > 0 {
                continue;
            }
            if ended {
                break;
            }
            if !progressed {
                if cut {
                    return Ok((body, false));
                }
                return Err(ureq::Error::BodyStalled);
            }
        }
        // The end of the body (ureq's `ended`): a chunked body whose last
        // chunk came before the upstream closed is whole, but the
        // connection is not reused.
        if !call.can_proceed() {
            if call.is_ended_chunked() || cut {
                return Ok((body, false));
            }
            return Err(disconnected("ended call cannot proceed"));
        }
        let keep = match call.proceed() {
            Some(RecvBodyResult::Redirect(c)) => !c.must_close_connection(),
            Some(RecvBodyResult::Cleanup(c)) => !c.must_close_connection(),
            None => false,
        };
        Ok((body, keep && !remote_closed))
    }
}

thread_local! {
    /// Where a body is decoded before it is appended (zeroed once per
    /// thread, not once per response).
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; 16 * 1024].into_boxed_slice());
}

/// Decodes what the transport holds into `body`: input used and bytes
/// decoded. Past the limit, or on an error, a cut body (`limit.1`) ends:
/// `None`; a full one fails.
fn decode(
    call: &mut Call<RecvBody>,
    t: &mut BoxedTransport,
    body: &mut Vec<u8>,
    buf: &mut [u8],
    (max, cut): (u64, bool),
) -> Result<Option<(usize, usize)>, ureq::Error> {
    let (used, out) = match call.read(t.buffers().input(), buf) {
        Ok(r) => r,
        Err(_) if cut => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    t.buffers().input_consume(used);
    if out > 0 && !push(body, &buf[..out], max) {
        return if cut {
            Ok(None)
        } else {
            Err(ureq::Error::BodyExceedsLimit(max))
        };
    }
    Ok(Some((used, out)))
}

/// Appends `bytes` unless that takes `body` past `max` bytes (`false`).
fn push(body: &mut Vec<u8>, bytes: &[u8], max: u64) -> bool {
    if (body.len() + bytes.len()) as u64 > max {
        let room = (max as usize).saturating_sub(body.len());
        body.extend_from_slice(&bytes[..room.min(bytes.len())]);
        return false;
    }
    body.extend_from_slice(bytes);
    true
}

/// The request as the agent would send it: `Content-Length` (payload
/// headers cannot set framing), then `User-Agent` and `Accept` unless the
/// payload set them, then `Host` and the payload's headers.
fn prepare(req: &Request<'_>) -> Result<Call<SendRequest>, ureq::Error> {
    let mut request = http::Request::new(());
    *request.method_mut() = req.method.clone();
    *request.uri_mut() = req.uri.clone();
    *request.headers_mut() = req.headers.clone();
    let mut call = Call::new(request)?;
    let (has_ua, has_accept, has_host) = {
        let h = call.headers();
        (
            h.contains_key(header::USER_AGENT),
            h.contains_key(header::ACCEPT),
            h.contains_key(header::HOST),
        )
    };
    call.header(header::CONTENT_LENGTH, HeaderValue::from(req.body.len()))?;
    if !has_ua {
        call.header(header::USER_AGENT, HeaderValue::from_static(USER_AGENT))?;
    }
    if !has_accept {
        call.header(header::ACCEPT, HeaderValue::from_static("*/*"))?;
    }
    // The `Host` ureq-proto would add next, at the same place, built here
    // without the `format!` it uses whenever the port is not the default
    // (callgrind: ~170 instructions a step fewer, net). Putting every
    // header in the request's own map instead of `Call::header` measured
    // no better (the map's inserts and drop cost what the rescans saved).
    if let (false, Some(host)) = (has_host, req.uri.host()) {
        call.header(header::HOST, host_header(host, req.uri))?;
    }
    Ok(call.proceed())
}

/// `Host` for `uri`: the host, and `:port` only when the port is not the
/// scheme's default (an unknown scheme: never; a missing one counts as
/// `http`), as ureq-proto writes it: the port as a number, so without the
/// leading zeros a URL may give it.
fn host_header(host: &str, uri: &Uri) -> String {
    let default = default_port(uri.scheme_str().unwrap_or("http"));
    let mut value = String::with_capacity(host.len() + 6);
    value.push_str(host);
    if let (Some(port), Some(default)) = (uri.port(), default) {
        if port.as_u16() != default {
            // All digits (it parsed as a `u16`).
            let digits = port.as_str().trim_start_matches('0');
            value.push(':');
            value.push_str(if digits.is_empty() { "0" } else { digits });
        }
    }
    value
}

/// The port a scheme implies (`None`: neither `http` nor `https`).
fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// The `User-Agent` sent unless a step sets its own.
pub(super) const USER_AGENT: &str = concat!("caf-worker/", env!("CARGO_PKG_VERSION"));

/// Where a pooled connection goes: scheme, host (lower case), port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    https: bool,
    host: String,
    port: u16,
}

impl Key {
    fn is(&self, t: &Target<'_>) -> bool {
        self.https == t.https && self.port == t.port && self.host.eq_ignore_ascii_case(t.host)
    }
}

/// Where a request goes, borrowed from its URI (a [`Key`] without the
/// allocation: a pooled connection keeps the key it was made with).
#[derive(Debug, Clone, Copy)]
struct Target<'a> {
    https: bool,
    host: &'a str,
    port: u16,
}

impl<'a> Target<'a> {
    fn of(uri: &'a Uri) -> Option<Target<'a>> {
        let scheme = uri.scheme_str()?;
        let default = default_port(scheme)?;
        Some(Target {
            https: scheme == "https",
            host: uri.host()?,
            port: uri.port_u16().unwrap_or(default),
        })
    }

    fn key(&self) -> Key {
        Key {
            https: self.https,
            host: self.host.to_ascii_lowercase(),
            port: self.port,
        }
    }
}

/// An idle connection.
struct Idle {
    key: Key,
    transport: BoxedTransport,
    since: Instant,
}

/// One thread's idle connections, oldest first.
#[derive(Default)]
struct Pool {
    idle: VecDeque<Idle>,
}

impl Pool {
    /// The newest idle connection to `target` that is young enough and still
    /// open (a non-blocking peek: the upstream may have closed it).
    fn take(&mut self, target: &Target<'_>) -> Option<(Key, BoxedTransport)> {
        let now = Instant::now();
        while let Some(i) = self.idle.iter().rposition(|c| c.key.is(target)) {
            let mut c = self.idle.remove(i)?;
            if now.saturating_duration_since(c.since) < MAX_IDLE_AGE && c.transport.is_open() {
                return Some((c.key, c.transport));
            }
        }
        None
    }

    /// Closes every idle connection to `target`.
    fn discard(&mut self, target: &Target<'_>) {
        self.idle.retain(|c| !c.key.is(target));
    }

    fn put(&mut self, key: Key, transport: BoxedTransport) {
        let now = Instant::now();
        self.idle
            .retain(|c| now.saturating_duration_since(c.since) < MAX_IDLE_AGE);
        if self.idle.iter().filter(|c| c.key == key).count() >= IDLE_PER_HOST {
            if let Some(i) = self.idle.iter().position(|c| c.key == key) {
                self.idle.remove(i);
            }
        }
        if self.idle.len() >= IDLE_PER_POOL {
            self.idle.pop_front();
        }
        self.idle.push_back(Idle {
            key,
            transport,
            since: now,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ureq::unversioned::transport::{Buffers, LazyBuffers};

    #[test]
    fn host_header_is_the_one_ureq_proto_writes() {
        // The oracle: ureq-proto's own `Host`, from a request without one.
        fn theirs(url: &str) -> String {
            let mut request = http::Request::new(());
            *request.uri_mut() = url.parse().expect("a URL");
            let mut call = Call::new(request).expect("a call").proceed();
            let mut out = [0u8; 512];
            let n = call.write(&mut out).expect("a head");
            let head = String::from_utf8_lossy(&out[..n]).into_owned();
            head.lines()
                .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
                .expect("a host line")
        }
        for url in [
            "http://a.example/x",
            "http://a.example:80/x",
            "http://a.example:8080/x",
            "https://a.example/x",
            "https://a.example:443/x",
            "https://a.example:80/x",
            "http://a.example:443/x",
            "http://127.0.0.1:1/x",
            "http://127.0.0.1:65535/x",
            "http://[::1]:8080/x",
            "http://[::1]/x",
            "http://a.example:08080/x",
            "http://a.example:080/x",
            "http://a.example:0/x",
            "http://a.example:000/x",
            "http://user:pw@a.example:81/x",
        ] {
            let uri: Uri = url.parse().expect("a URL");
            let ours = host_header(uri.host().expect("a host"), &uri);
            assert_eq!(ours, theirs(url), "{url}");
        }
    }

    /// A transport that records which connection the pool probed.
    #[derive(Debug)]
    struct Probed {
        id: usize,
        open: bool,
        probes: Arc<Mutex<Vec<usize>>>,
        buffers: LazyBuffers,
    }

    impl Transport for Probed {
        fn buffers(&mut self) -> &mut dyn Buffers {
            &mut self.buffers
        }
        fn transmit_output(&mut self, _: usize, _: NextTimeout) -> Result<(), ureq::Error> {
            Ok(())
        }
        fn await_input(&mut self, _: NextTimeout) -> Result<bool, ureq::Error> {
            Ok(false)
        }
        fn is_open(&mut self) -> bool {
            self.probes.lock().expect("lock").push(self.id);
            self.open
        }
        fn is_tls(&self) -> bool {
            false
        }
    }

    fn uri(host: &str) -> Uri {
        format!("http://{host}/").parse().expect("uri")
    }

    fn key(host: &str) -> Key {
        Target::of(&uri(host)).expect("target").key()
    }

    #[test]
    fn the_pool_hands_out_the_newest_open_connection_within_its_limits() {
        let probes = Arc::new(Mutex::new(Vec::new()));
        let conn = |id: usize, open: bool| -> BoxedTransport {
            Box::new(Probed {
                id,
                open,
                probes: probes.clone(),
                buffers: LazyBuffers::new(1, 1),
            })
        };
        let taken = |pool: &mut Pool, host: &str| {
            probes.lock().expect("lock").clear();
            let u = uri(host);
            let t = pool.take(&Target::of(&u).expect("target")).is_some();
            (t, probes.lock().expect("lock").clone())
        };
        let mut pool = Pool::default();
        // Two per host: the oldest of three is closed.
        for id in 1..=3 {
            pool.put(key("a:1"), conn(id, true));
        }
        assert_eq!(pool.idle.len(), 2);
        // The newest first (host names ignore case); a closed one is
        // dropped and the next tried. (Putting 4 closed 2.)
        pool.put(key("a:1"), conn(4, false));
        assert_eq!(taken(&mut pool, "A:1"), (true, vec![4, 3]));
        assert_eq!(taken(&mut pool, "a:1"), (false, vec![]));
        // Another port is another key.
        pool.put(key("a:2"), conn(5, true));
        assert_eq!(taken(&mut pool, "a:1"), (false, vec![]));
        // Eight over all hosts: the oldest goes.
        for id in 10..20 {
            pool.put(key(&format!("h{id}:1")), conn(id, true));
        }
        assert_eq!(pool.idle.len(), IDLE_PER_POOL);
        assert_eq!(taken(&mut pool, "a:2"), (false, vec![]));
        assert_eq!(taken(&mut pool, "h19:1"), (true, vec![19]));
        // Discarded: closed without a probe.
        pool.discard(&Target::of(&uri("h18:1")).expect("target"));
        assert_eq!(taken(&mut pool, "h18:1"), (false, vec![]));
    }

    #[test]
    fn connecting_stops_at_whichever_deadline_comes_first() {
        let ms = Duration::from_millis;
        let c = Clock::start(Some(ms(5_000)), Some(ms(200))).connect();
        assert_eq!(c.reason, Timeout::Connect);
        let c = Clock::start(Some(ms(100)), Some(ms(200))).connect();
        assert_eq!(c.reason, Timeout::Global);
        let c = Clock::start(None, None).connect();
        assert_eq!(c.after, UreqDuration::NotHappening);
        assert_eq!(
            Clock::start(None, None).io().after,
            UreqDuration::NotHappening
        );
        let io = Clock::start(Some(ms(100)), Some(ms(50))).io();
        assert_eq!(io.reason, Timeout::Global);
        assert!(matches!(io.after, UreqDuration::Exact(d) if d <= ms(100)));
    }
}
