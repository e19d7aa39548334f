//! The NATS [`Client`]: options parsed from the URL list, a supervisor thread
//! that connects, keeps the connection alive with PING/PONG and reconnects
//! with jittered exponential backoff across every known server, the
//! subscription table (re-sent after each reconnect), and request/reply over
//! one wildcard inbox subscription.
//!
//! Threads per client: one supervisor, plus one reader and one flusher per
//! live connection. Memory is bounded by the output buffer limit of the
//! connection, the bounded channel of each subscription (messages beyond it
//! are dropped and counted, as NATS does for slow consumers) and the bounded
//! event channel.

use super::conn::{self, Auth, Conn, ConnectParams, Inbound, ServerAddr, Sink, lock};
use super::proto::{self, Headers, Message, ServerInfo};
use super::{Error, Event};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Messages a subscription buffers before further ones are dropped.
pub const DEFAULT_SUBSCRIPTION_CAPACITY: usize = 8192;
/// Events buffered for [`Client::events`] before further ones are dropped.
const EVENT_CAPACITY: usize = 256;
/// Most servers remembered (URL list plus cluster announcements).
const MAX_SERVERS: usize = 64;
/// A connection that lived at least this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(1);
/// Default NATS port.
const DEFAULT_PORT: u16 = 4222;

/// Connection options (see `WORKER_NATS_URL` and `WORKER_NATS_CA_FILE`).
/// `Debug` redacts credentials in the server URLs.
#[derive(Clone)]
pub struct Options {
    /// Server URLs: `nats://` or `tls://`, optionally `user:pass@` or `token@`.
    pub servers: Vec<String>,
    /// CONNECT name (the worker id).
    pub name: String,
    /// Extra PEM root certificates for TLS.
    pub ca_file: Option<PathBuf>,
    /// Keep-alive PING period; two unanswered PINGs mark the connection stale.
    pub ping_interval: Duration,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Largest reconnect delay.
    pub reconnect_max: Duration,
    /// TCP connect plus handshake limit.
    pub connect_timeout: Duration,
    /// Largest message assumed until a server's INFO says otherwise.
    pub max_payload_hint: usize,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let servers: Vec<String> = self.servers.iter().map(|s| redact_url(s)).collect();
        f.debug_struct("Options")
            .field("servers", &servers)
            .field("name", &self.name)
            .field("ca_file", &self.ca_file)
            .field("ping_interval", &self.ping_interval)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_payload_hint", &self.max_payload_hint)
            .finish()
    }
}

impl Options {
    /// Options for a comma-separated URL list, with defaults for the rest.
    pub fn from_url_list(list: &str) -> Result<Options, Error> {
        let servers: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if servers.is_empty() {
            return Err(Error::InvalidUrl("no server URL given".into()));
        }
        for s in &servers {
            parse_url(s)?;
        }
        Ok(Options {
            servers,
            name: "caf-worker".into(),
            ca_file: None,
            ping_interval: Duration::from_secs(2),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            max_payload_hint: proto::DEFAULT_MAX_PAYLOAD,
        })
    }
}

fn percent_decode(s: &str) -> Result<String, Error> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::InvalidUrl("bad percent escape in credentials".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::InvalidUrl("credentials are not UTF-8".into()))
}

/// Parses `[nats|tls]://[user:pass@|token@]host[:port]` (bare `host:port` too).
pub(crate) fn parse_url(url: &str) -> Result<ServerAddr, Error> {
    let bad = |why: &str| Error::InvalidUrl(format!("{}: {why}", redact_url(url)));
    let (tls, rest) = if let Some(r) = url.strip_prefix("nats://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("tls://") {
        (true, r)
    } else if url.contains("://") {
        return Err(bad("scheme must be nats:// or tls://"));
    } else {
        (false, url)
    };
    let rest = rest.trim_end_matches('/');
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let auth = match userinfo {
        None => Auth::None,
        Some(u) => match u.split_once(':') {
            Some((user, pass)) => Auth::UserPass(percent_decode(user)?, percent_decode(pass)?),
            None if u.is_empty() => return Err(bad("empty credentials")),
            None => Auth::Token(percent_decode(u)?),
        },
    };
    let (host, port) = if let Some(r) = hostport.strip_prefix('[') {
        let (h, p) = r.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        let port = match p.strip_prefix(':') {
            Some(p) => Some(p),
            None if p.is_empty() => None,
            None => return Err(bad("junk after ']'")),
        };
        (h, port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() || host.contains(['/', ' ', '?', '#']) {
        return Err(bad("missing or invalid host"));
    }
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| bad("invalid port"))?,
        None => DEFAULT_PORT,
    };
    Ok(ServerAddr {
        host: host.to_string(),
        port,
        tls,
        tls_name: host.to_string(),
        auth,
    })
}

/// `url` with any credentials replaced by `***` (for logs and errors).
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    match rest.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}***@{host}"),
        None => url.to_string(),
    }
}

/// Jittered exponential backoff: `min·2^attempt` capped at `max`, then a
/// uniformly random point in its upper half so many clients spread out.
pub(crate) fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let base = min
        .saturating_mul(1u32 << attempt.min(20))
        .min(max)
        .max(Duration::from_millis(1));
    let half = base / 2;
    half + half.mul_f64(fastrand::f64())
}

/// A random 22-character token (like a NUID) for inbox names.
fn nuid() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    (0..22)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect()
}

enum Target {
    Chan(Sender<Message>),
    /// The request/reply inbox (`<prefix>.*`).
    Responses,
}

struct SubEntry {
    subject: String,
    queue: Option<String>,
    target: Target,
}

struct RespState {
    sid: Option<u64>,
    next: u64,
    waiters: HashMap<String, Sender<Message>>,
}

struct Inner {
    opts: Options,
    servers: Mutex<Vec<ServerAddr>>,
    conn: Mutex<Option<Arc<Conn>>>,
    subs: Mutex<HashMap<u64, SubEntry>>,
    next_sid: AtomicU64,
    connected: AtomicBool,
    closed: AtomicBool,
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
    last_error: Mutex<Option<String>>,
    dropped: AtomicU64,
    last_drop_log: Mutex<Option<Instant>>,
    max_payload: AtomicUsize,
    events: (Sender<Event>, Receiver<Event>),
    wake: (Sender<()>, Receiver<()>),
    inbox_prefix: String,
    resp: Mutex<RespState>,
    tls: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
}

/// Closes the connection when the last [`Client`] handle goes away.
struct CloseGuard(Arc<Inner>);

impl Drop for CloseGuard {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A NATS client. Cheap to clone; every clone shares one connection. The
/// connection closes when the last clone is dropped (or on [`Client::close`]).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    _guard: Arc<CloseGuard>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// A subscription: messages arrive on a bounded channel. Dropping it unsubscribes.
pub struct Subscription {
    inner: Arc<Inner>,
    sid: u64,
    subject: String,
    rx: Receiver<Message>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("sid", &self.sid)
            .field("subject", &self.subject)
            .finish()
    }
}

impl Subscription {
    /// The channel messages arrive on. It disconnects after unsubscribe or close.
    pub fn receiver(&self) -> &Receiver<Message> {
        &self.rx
    }

    /// The subscription id on the wire.
    pub fn sid(&self) -> u64 {
        self.sid
    }

    /// The subscribed subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Stops the subscription (also done on drop).
    pub fn unsubscribe(self) {}
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.inner.unsubscribe(self.sid);
    }
}

impl Client {
    /// Starts the connection thread and returns at once; never blocks on the
    /// network. Unreachable servers are retried forever with jittered backoff
    /// across all known servers (the URL list plus INFO `connect_urls`).
    pub fn start(opts: Options) -> Client {
        let servers: Vec<ServerAddr> = opts
            .servers
            .iter()
            .filter_map(|s| match parse_url(s) {
                Ok(a) => Some(a),
                Err(e) => {
                    log::error!("nats: ignoring server URL: {e}");
                    None
                }
            })
            .collect();
        let inner = Arc::new(Inner {
            max_payload: AtomicUsize::new(opts.max_payload_hint.max(1)),
            opts,
            servers: Mutex::new(servers),
            conn: Mutex::new(None),
            subs: Mutex::new(HashMap::new()),
            next_sid: AtomicU64::new(1),
            connected: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
            dropped: AtomicU64::new(0),
            last_drop_log: Mutex::new(None),
            events: crossbeam_channel::bounded(EVENT_CAPACITY),
            wake: crossbeam_channel::bounded(1),
            inbox_prefix: format!("_INBOX.{}", nuid()),
            resp: Mutex::new(RespState {
                sid: None,
                next: 0,
                waiters: HashMap::new(),
            }),
            tls: OnceLock::new(),
        });
        let sup = inner.clone();
        let spawned = std::thread::Builder::new()
            .name("nats-supervisor".into())
            .spawn(move || supervise(sup));
        if let Err(e) = spawned {
            log::error!("nats: cannot start the connection thread: {e}");
            inner.closed.store(true, Ordering::SeqCst);
        }
        Client {
            _guard: Arc::new(CloseGuard(inner.clone())),
            inner,
        }
    }

    /// Whether a connection is established right now.
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::SeqCst)
    }

    /// Successful reconnections after the first connection.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Connection attempts that failed (refused, timed out, TLS or auth errors).
    pub fn connect_failures(&self) -> u64 {
        self.inner.connect_failures.load(Ordering::Relaxed)
    }

    /// Why the last connection attempt failed or the last connection was
    /// lost (cleared by nothing: it is history, for health reports).
    pub fn last_error(&self) -> Option<String> {
        lock(&self.inner.last_error).clone()
    }

    /// Messages dropped because a subscription's channel was full.
    pub fn dropped_messages(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Lifecycle events. The channel is bounded and lossy when unread; all
    /// clones of the receiver share one queue.
    pub fn events(&self) -> Receiver<Event> {
        self.inner.events.1.clone()
    }

    /// The largest message (headers plus payload) the server accepts.
    pub fn server_max_payload(&self) -> usize {
        self.inner.max_payload.load(Ordering::Relaxed)
    }

    /// The server connected to, without credentials.
    pub fn connected_server(&self) -> Option<String> {
        lock(&self.inner.conn).as_ref().map(|c| c.server.display())
    }

    /// Every server the client may try (URL list plus those the cluster
    /// announced), without credentials.
    pub fn known_servers(&self) -> Vec<String> {
        lock(&self.inner.servers)
            .iter()
            .map(ServerAddr::display)
            .collect()
    }

    /// Buffered publish. `Err(NotConnected)` while disconnected.
    pub fn publish(&self, subject: &str, payload: &[u8]) -> Result<(), Error> {
        self.inner.publish(subject, None, None, payload)
    }

    /// Buffered publish with headers and an optional reply subject.
    pub fn publish_with_headers(
        &self,
        subject: &str,
        reply: Option<&str>,
        headers: &Headers,
        payload: &[u8],
    ) -> Result<(), Error> {
        self.inner.publish(subject, reply, Some(headers), payload)
    }

    /// Buffered publish with a reply subject.
    pub fn publish_with_reply(
        &self,
        subject: &str,
        reply: &str,
        payload: &[u8],
    ) -> Result<(), Error> {
        self.inner.publish(subject, Some(reply), None, payload)
    }

    /// Subscribes to `subject`. Works while disconnected: subscriptions are
    /// (re-)sent on every new connection.
    pub fn subscribe(&self, subject: &str) -> Result<Subscription, Error> {
        self.subscribe_with_capacity(subject, None, DEFAULT_SUBSCRIPTION_CAPACITY)
    }

    /// Subscribes as a member of queue group `queue`.
    pub fn queue_subscribe(&self, subject: &str, queue: &str) -> Result<Subscription, Error> {
        self.subscribe_with_capacity(subject, Some(queue), DEFAULT_SUBSCRIPTION_CAPACITY)
    }

    /// Subscribes with a channel of `capacity` messages (at least 1).
    pub fn subscribe_with_capacity(
        &self,
        subject: &str,
        queue: Option<&str>,
        capacity: usize,
    ) -> Result<Subscription, Error> {
        if !proto::valid_token(subject) || queue.is_some_and(|q| !proto::valid_token(q)) {
            return Err(Error::Protocol(format!(
                "invalid subject or queue {subject:?}"
            )));
        }
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        let sid = self.inner.add_sub(SubEntry {
            subject: subject.to_string(),
            queue: queue.map(str::to_string),
            target: Target::Chan(tx),
        })?;
        Ok(Subscription {
            inner: self.inner.clone(),
            sid,
            subject: subject.to_string(),
            rx,
        })
    }

    /// Request/reply over the client's wildcard inbox. `NoResponders` when
    /// the server reports nobody subscribed, `Timeout` when no reply came.
    pub fn request(
        &self,
        subject: &str,
        headers: Option<&Headers>,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Message, Error> {
        let inner = &self.inner;
        let (tx, rx) = crossbeam_channel::bounded(1);
        let token = {
            let mut r = lock(&inner.resp);
            if r.sid.is_none() {
                let sid = inner.add_sub(SubEntry {
                    subject: format!("{}.*", inner.inbox_prefix),
                    queue: None,
                    target: Target::Responses,
                })?;
                r.sid = Some(sid);
            }
            r.next += 1;
            let token = r.next.to_string();
            r.waiters.insert(token.clone(), tx);
            token
        };
        let reply = format!("{}.{token}", inner.inbox_prefix);
        let res = inner
            .publish(subject, Some(&reply), headers, payload)
            .and_then(|()| match rx.recv_timeout(timeout) {
                Ok(m) if m.status() == Some(503) && m.payload.is_empty() => {
                    Err(Error::NoResponders)
                }
                Ok(m) => Ok(m),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(Error::Timeout),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(Error::Closed),
            });
        lock(&inner.resp).waiters.remove(&token);
        res
    }

    /// A fresh unique inbox subject (`_INBOX.<nuid>`).
    pub fn new_inbox(&self) -> String {
        format!("_INBOX.{}", nuid())
    }

    /// Sends PING and waits for its PONG: everything published before has
    /// been written and processed by the server.
    pub fn flush(&self, timeout: Duration) -> Result<(), Error> {
        let conn = self.inner.current().ok_or(Error::NotConnected)?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        conn.ping(Some(tx))?;
        match rx.recv_timeout(timeout) {
            Ok(()) => Ok(()),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(Error::Timeout),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(Error::NotConnected),
        }
    }

    /// Unsubscribes everything, flushes (up to `timeout`) and closes. For shutdown.
    pub fn drain(&self, timeout: Duration) {
        let sids: Vec<u64> = lock(&self.inner.subs).keys().copied().collect();
        for sid in sids {
            self.inner.unsubscribe(sid);
        }
        if let Err(e) = self.flush(timeout) {
            log::debug!("nats: drain flush: {e}");
        }
        self.close();
    }

    /// Closes the connection now and stops reconnecting. Subscription
    /// channels disconnect once their buffered messages are read.
    pub fn close(&self) {
        self.inner.close();
    }
}

impl Inner {
    fn current(&self) -> Option<Arc<Conn>> {
        lock(&self.conn).clone()
    }

    fn emit(&self, ev: Event) {
        let _ = self.events.0.try_send(ev);
    }

    fn publish(
        &self,
        subject: &str,
        reply: Option<&str>,
        headers: Option<&Headers>,
        payload: &[u8],
    ) -> Result<(), Error> {
        if !proto::valid_token(subject) || reply.is_some_and(|r| !proto::valid_token(r)) {
            return Err(Error::Protocol(format!("invalid subject {subject:?}")));
        }
        if headers.is_some_and(|h| !h.is_valid()) {
            return Err(Error::Protocol("invalid header name or value".into()));
        }
        let max = self.max_payload.load(Ordering::Relaxed);
        let size = if headers.is_some() {
            proto::message_size(headers, payload)
        } else {
            payload.len()
        };
        if size > max {
            return Err(Error::PayloadTooLarge { size, max });
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let conn = self.current().ok_or(Error::NotConnected)?;
        conn.write(|b| proto::encode_pub(b, subject, reply, headers, payload))
    }

    fn add_sub(&self, entry: SubEntry) -> Result<u64, Error> {
        let mut subs = lock(&self.subs);
        // Checked under the lock `close` clears the table with, so no
        // subscription outlives a close.
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let sid = self.next_sid.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = self.current() {
            // A dead connection is fine: the next one re-sends every SUB.
            let _ = c.write(|b| proto::encode_sub(b, &entry.subject, entry.queue.as_deref(), sid));
        }
        subs.insert(sid, entry);
        Ok(sid)
    }

    fn unsubscribe(&self, sid: u64) {
        let mut subs = lock(&self.subs);
        if subs.remove(&sid).is_some()
            && let Some(c) = self.current()
        {
            let _ = c.write(|b| proto::encode_unsub(b, sid, None));
        }
        drop(subs);
        let mut r = lock(&self.resp);
        if r.sid == Some(sid) {
            r.sid = None;
        }
    }

    fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(c) = lock(&self.conn).take() {
            c.close("client closed");
        }
        self.connected.store(false, Ordering::SeqCst);
        lock(&self.subs).clear();
        lock(&self.resp).waiters.clear();
        let _ = self.wake.0.try_send(());
    }

    fn dispatch(&self, sid: u64, message: Message) {
        let subs = lock(&self.subs);
        let Some(entry) = subs.get(&sid) else {
            return; // unsubscribed while in flight
        };
        match &entry.target {
            Target::Chan(tx) => {
                if let Err(TrySendError::Full(_)) = tx.try_send(message) {
                    drop(subs);
                    self.note_drop(sid);
                }
            }
            Target::Responses => {
                drop(subs);
                let token = message
                    .subject
                    .strip_prefix(self.inbox_prefix.as_str())
                    .and_then(|t| t.strip_prefix('.'));
                if let Some(token) = token
                    && let Some(tx) = lock(&self.resp).waiters.get(token)
                {
                    let _ = tx.try_send(message);
                }
            }
        }
    }

    fn note_drop(&self, sid: u64) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = lock(&self.last_drop_log);
        // One line per second at most: a slow consumer must not flood the log.
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            log::warn!("nats: subscription {sid} is full; dropped messages so far: {n}");
        }
    }

    fn on_info(&self, info: &ServerInfo, from: &ServerAddr) {
        self.max_payload
            .store(info.max_payload(), Ordering::Relaxed);
        if let Some(urls) = &info.connect_urls {
            let mut servers = lock(&self.servers);
            for u in urls {
                if servers.len() >= MAX_SERVERS {
                    break;
                }
                let Ok(mut a) = parse_url(u) else { continue };
                a.tls = from.tls;
                a.auth = from.auth.clone();
                if a.host.parse::<std::net::IpAddr>().is_ok() {
                    // Certificates name the host we were given, not the IPs gossiped.
                    a.tls_name = from.tls_name.clone();
                }
                if !servers.iter().any(|s| s.host == a.host && s.port == a.port) {
                    log::info!("nats: learned server {}", a.display());
                    servers.push(a);
                }
            }
        }
        if info.ldm {
            log::warn!("nats: server {} entered lame duck mode", from.display());
            self.emit(Event::LameDuck);
        }
    }

    fn tls_config(&self) -> &Result<Arc<rustls::ClientConfig>, String> {
        self.tls
            .get_or_init(|| build_tls(self.opts.ca_file.as_deref()))
    }

    /// Installs a fresh connection: re-sends every subscription, then
    /// publishes it to other threads (subs lock held, so none is lost or doubled).
    fn install(&self, c: Arc<Conn>) {
        let subs = lock(&self.subs);
        let _ = c.write(|b| {
            for (sid, e) in subs.iter() {
                proto::encode_sub(b, &e.subject, e.queue.as_deref(), *sid);
            }
        });
        *lock(&self.conn) = Some(c);
        self.connected.store(true, Ordering::SeqCst);
    }
}

fn build_tls(ca_file: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("WORKER_NATS_CA_FILE {}: {e}", path.display()))?;
        let mut n = 0;
        for cert in certs {
            let cert = cert.map_err(|e| format!("WORKER_NATS_CA_FILE {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("WORKER_NATS_CA_FILE {}: {e}", path.display()))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!(
                "WORKER_NATS_CA_FILE {}: no certificate found",
                path.display()
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

fn make_sink(inner: &Arc<Inner>, from: ServerAddr) -> Sink {
    // Weak: a reader thread must not keep a closed client alive.
    let weak = Arc::downgrade(inner);
    Arc::new(move |ev| {
        let Some(inner) = weak.upgrade() else { return };
        match ev {
            Inbound::Msg { sid, message } => inner.dispatch(sid, message),
            Inbound::Info(info) => inner.on_info(&info, &from),
            Inbound::Err(e) => {
                log::warn!("nats: server {} reported an error: {e}", from.display());
                inner.emit(Event::ServerError(e));
            }
        }
    })
}

/// The connection thread: connect, keep alive, reconnect, until closed.
fn supervise(inner: Arc<Inner>) {
    let mut attempt: u32 = 0;
    let mut next = 0usize;
    let mut ever_connected = false;
    let mut first = true;
    while !inner.closed.load(Ordering::SeqCst) {
        if !first {
            let delay = backoff(
                attempt.saturating_sub(1),
                inner.opts.reconnect_min,
                inner.opts.reconnect_max,
            );
            // Wakes early when the client closes.
            let _ = inner.wake.1.recv_timeout(delay);
            if inner.closed.load(Ordering::SeqCst) {
                break;
            }
        }
        first = false;
        let addr = {
            let servers = lock(&inner.servers);
            if servers.is_empty() {
                log::error!("nats: no usable server URL; not connecting");
                return;
            }
            let a = servers[next % servers.len()].clone();
            next = next.wrapping_add(1);
            a
        };
        let params = ConnectParams {
            name: &inner.opts.name,
            timeout: inner.opts.connect_timeout,
            tls: &|| inner.tls_config().clone(),
        };
        let (c, info, lost) = match conn::connect(&addr, &params, make_sink(&inner, addr.clone())) {
            Ok(x) => x,
            Err(e) => {
                attempt = attempt.saturating_add(1);
                *lock(&inner.last_error) = Some(format!("{}: {e}", addr.display()));
                inner.connect_failures.fetch_add(1, Ordering::Relaxed);
                match &e {
                    Error::Server(text) => {
                        log::error!("nats: {} refused the connection: {text}", addr.display());
                        inner.emit(Event::ServerError(text.clone()));
                    }
                    _ => log::warn!("nats: connecting to {} failed: {e}", addr.display()),
                }
                continue;
            }
        };
        if inner.closed.load(Ordering::SeqCst) {
            c.close("client closed");
            break;
        }
        inner.on_info(&info, &addr);
        inner.install(c.clone());
        let server = addr.display();
        if ever_connected {
            inner.reconnects.fetch_add(1, Ordering::Relaxed);
            log::info!("nats: reconnected to {server}");
            inner.emit(Event::Reconnected { server });
        } else {
            log::info!("nats: connected to {server}");
            inner.emit(Event::Connected { server });
        }
        ever_connected = true;
        let since = Instant::now();
        let reason = loop {
            match lost.recv_timeout(inner.opts.ping_interval) {
                Ok(r) => break r,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break "lost".into(),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if c.outstanding_pings() >= 2 {
                        c.close("stale connection: no PONG to 2 PINGs");
                    } else if c.ping(None).is_err() {
                        c.close("ping failed");
                    }
                }
            }
        };
        {
            let mut slot = lock(&inner.conn);
            if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, &c)) {
                *slot = None;
            }
        }
        inner.connected.store(false, Ordering::SeqCst);
        if inner.closed.load(Ordering::SeqCst) {
            break;
        }
        log::warn!("nats: disconnected from {}: {reason}", addr.display());
        *lock(&inner.last_error) = Some(format!("{}: {reason}", addr.display()));
        inner.emit(Event::Disconnected { reason });
        attempt = if since.elapsed() >= STABLE_AFTER {
            1
        } else {
            attempt.saturating_add(1)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let a = parse_url("nats://u:p%40ss@host.example:4333").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.tls),
            ("host.example", 4333, false)
        );
        assert!(a.auth == Auth::UserPass("u".into(), "p@ss".into()));
        let a = parse_url("tls://tok@10.0.0.1").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.tls),
            ("10.0.0.1", DEFAULT_PORT, true)
        );
        assert!(a.auth == Auth::Token("tok".into()));
        let a = parse_url("[::1]:4223").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("::1", 4223));
        assert!(a.auth == Auth::None);
        assert_eq!(a.display(), "nats://[::1]:4223");
        for bad in [
            "http://x",
            "nats://",
            "nats://h:port",
            "nats://@h",
            "nats://h:99999",
            "nats://[::1",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        let o = Options::from_url_list(" nats://a:1 , tls://b:2 ,").unwrap();
        assert_eq!(o.servers, vec!["nats://a:1", "tls://b:2"]);
        assert!(Options::from_url_list(" , ").is_err());
        assert_eq!(redact_url("nats://u:secret@h:1"), "nats://***@h:1");
        let o = Options::from_url_list("nats://u:secret@h:1,tls://tok@h:2").unwrap();
        assert!(!format!("{o:?}").contains("secret") && !format!("{o:?}").contains("tok@"));
        assert!(!format!("{}", parse_url("nats://u:secret@h:x").unwrap_err()).contains("secret"));
    }

    #[test]
    fn backoff_grows_jittered_and_capped() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..200 {
            let d0 = backoff(0, min, max);
            assert!(d0 >= Duration::from_millis(50) && d0 <= min, "{d0:?}");
            let d3 = backoff(3, min, max);
            assert!(d3 >= Duration::from_millis(400) && d3 <= Duration::from_millis(800));
            let d = backoff(40, min, max);
            assert!(d >= max / 2 && d <= max);
        }
    }
}
