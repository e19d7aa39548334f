//! One NATS connection: the socket (plain TCP or TLS through rustls), the
//! handshake (INFO, optional TLS upgrade, CONNECT, PING → PONG), one reader
//! thread that parses server operations, and one flusher thread that writes
//! the shared output buffer in batches.
//!
//! Writers append encoded operations to a bounded buffer under a mutex and
//! wake the flusher only when the buffer was empty; the flusher swaps the
//! whole buffer out and writes it with one `write_all`, so a burst of
//! publishes becomes a few large writes. PINGs and PONG waiters are queued
//! under the same lock, so a PONG acknowledges everything written before its
//! PING (that is what `flush` relies on).
//!
//! With TLS the rustls `ClientConnection` sits behind a mutex shared by both
//! threads; the socket itself is never read or written under that mutex.
//! Encryption and the socket write happen under a second "send" mutex so
//! TLS records leave in order.

use super::Error;
use super::proto::{self, Limits, ServerInfo, ServerOp};
use crossbeam_channel::{Receiver, Sender};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most bytes buffered for the flusher before writers wait.
const MAX_PENDING: usize = 8 * 1024 * 1024;
/// How long a writer waits for buffer space before giving up.
const PENDING_WAIT: Duration = Duration::from_secs(5);
/// Retained capacity of an idle write buffer (bounded memory after a burst).
const KEEP_CAPACITY: usize = 1024 * 1024;
/// Socket read size.
const READ_CHUNK: usize = 64 * 1024;

/// Credentials taken from a server URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Auth {
    None,
    UserPass(String, String),
    Token(String),
}

/// One server to try.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ServerAddr {
    pub host: String,
    pub port: u16,
    /// The URL asked for TLS (`tls://`).
    pub tls: bool,
    /// Name checked against the server certificate.
    pub tls_name: String,
    pub auth: Auth,
}

impl std::fmt::Debug for ServerAddr {
    // Never prints credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display())
    }
}

impl ServerAddr {
    /// `host:port` without credentials, for logs and events.
    pub fn display(&self) -> String {
        let scheme = if self.tls { "tls" } else { "nats" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// What a connection reports to its owner.
pub(crate) enum Inbound {
    Msg { sid: u64, message: proto::Message },
    Info(Box<ServerInfo>),
    Err(String),
}

/// Where the reader delivers inbound operations.
pub(crate) type Sink = Arc<dyn Fn(Inbound) + Send + Sync>;

/// Settings of one connection attempt.
pub(crate) struct ConnectParams<'a> {
    pub name: &'a str,
    pub timeout: Duration,
    /// Built on first use: a plain setup never reads the CA file.
    pub tls: &'a (dyn Fn() -> Result<Arc<rustls::ClientConfig>, String> + 'a),
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the connection down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn io_err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

struct TlsShared {
    tls: Mutex<rustls::ClientConnection>,
    send: Mutex<TcpStream>,
}

impl TlsShared {
    /// Encrypts `plain` (possibly empty: pending handshake/alert records) and writes it.
    fn send(&self, plain: &[u8]) -> io::Result<()> {
        let mut sock = lock(&self.send);
        let mut out = Vec::with_capacity(plain.len() + 64);
        {
            let mut tls = lock(&self.tls);
            if !plain.is_empty() {
                tls.writer().write_all(plain)?;
            }
            while tls.wants_write() {
                tls.write_tls(&mut out)?;
            }
        }
        sock.write_all(&out)
    }
}

enum ReadHalf {
    Plain(TcpStream),
    Tls(Arc<TlsShared>, TcpStream, Vec<u8>),
}

impl ReadHalf {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            ReadHalf::Plain(s) | ReadHalf::Tls(_, s, _) => s.set_read_timeout(t),
        }
    }

    /// Appends at least one byte to `data`, or returns 0 at end of stream.
    fn read_into(&mut self, data: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            ReadHalf::Plain(s) => {
                let old = data.len();
                data.resize(old + READ_CHUNK, 0);
                let r = s.read(&mut data[old..]);
                data.truncate(old + *r.as_ref().unwrap_or(&0));
                r
            }
            ReadHalf::Tls(shared, sock, raw) => loop {
                raw.resize(READ_CHUNK, 0);
                let n = sock.read(raw)?;
                if n == 0 {
                    return Ok(0);
                }
                let old = data.len();
                let (wants_write, closed) = {
                    let mut tls = lock(&shared.tls);
                    let mut input = &raw[..n];
                    let mut closed = false;
                    while !input.is_empty() {
                        if tls.read_tls(&mut input)? == 0 {
                            break;
                        }
                        let state = tls
                            .process_new_packets()
                            .map_err(|e| io_err(format!("tls: {e}")))?;
                        let avail = state.plaintext_bytes_to_read();
                        if avail > 0 {
                            let at = data.len();
                            data.resize(at + avail, 0);
                            tls.reader().read_exact(&mut data[at..])?;
                        }
                        closed |= state.peer_has_closed();
                    }
                    (tls.wants_write(), closed)
                };
                if wants_write {
                    shared.send(&[])?;
                }
                if data.len() > old {
                    return Ok(data.len() - old);
                }
                if closed {
                    return Ok(0);
                }
            },
        }
    }
}

enum WriteHalf {
    Plain(TcpStream),
    Tls(Arc<TlsShared>),
}

impl WriteHalf {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            WriteHalf::Plain(s) => s.write_all(buf),
            WriteHalf::Tls(t) => t.send(buf),
        }
    }
}

struct WState {
    buf: Vec<u8>,
    /// One entry per PING in flight; `Some` wakes a `flush` caller.
    pongs: VecDeque<Option<Sender<()>>>,
    dead: Option<String>,
}

/// A live connection. Dropping the last handle does not close it; call [`Conn::close`].
pub(crate) struct Conn {
    state: Mutex<WState>,
    data_cv: Condvar,
    space_cv: Condvar,
    sock: TcpStream,
    lost_tx: Sender<String>,
    pub server: ServerAddr,
}

impl Conn {
    /// Appends to the output buffer through `f`; waits (bounded) while the buffer is full.
    pub fn write(&self, f: impl FnOnce(&mut Vec<u8>)) -> Result<(), Error> {
        let mut st = lock(&self.state);
        let deadline = Instant::now() + PENDING_WAIT;
        while st.buf.len() >= MAX_PENDING && st.dead.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout);
            }
            st = self
                .space_cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if st.dead.is_some() {
            return Err(Error::NotConnected);
        }
        let was_empty = st.buf.is_empty();
        f(&mut st.buf);
        if was_empty {
            self.data_cv.notify_one();
        }
        Ok(())
    }

    /// Sends PING; `waiter` is signalled when its PONG arrives. Returns the
    /// number of PINGs in flight before this one.
    pub fn ping(&self, waiter: Option<Sender<()>>) -> Result<usize, Error> {
        let mut st = lock(&self.state);
        if st.dead.is_some() {
            return Err(Error::NotConnected);
        }
        let before = st.pongs.len();
        st.pongs.push_back(waiter);
        let was_empty = st.buf.is_empty();
        st.buf.extend_from_slice(proto::PING);
        if was_empty {
            self.data_cv.notify_one();
        }
        Ok(before)
    }

    /// PINGs sent without a PONG yet.
    pub fn outstanding_pings(&self) -> usize {
        lock(&self.state).pongs.len()
    }

    /// Marks the connection dead (first reason wins), wakes every waiter and
    /// shuts the socket so both threads end.
    pub fn close(&self, reason: &str) {
        let mut st = lock(&self.state);
        if st.dead.is_some() {
            return;
        }
        st.dead = Some(reason.to_string());
        st.pongs.clear();
        st.buf = Vec::new();
        drop(st);
        self.data_cv.notify_all();
        self.space_cv.notify_all();
        let _ = self.sock.shutdown(Shutdown::Both);
        let _ = self.lost_tx.try_send(reason.to_string());
    }

    fn pong(&self) {
        let w = lock(&self.state).pongs.pop_front();
        if let Some(Some(tx)) = w {
            let _ = tx.try_send(());
        }
    }
}

/// Connects, handshakes and starts the reader and flusher threads. Returns
/// the connection, the server's INFO and a channel that yields the reason
/// once the connection is lost.
pub(crate) fn connect(
    addr: &ServerAddr,
    params: &ConnectParams<'_>,
    sink: Sink,
) -> Result<(Arc<Conn>, ServerInfo, Receiver<String>), Error> {
    let deadline = Instant::now() + params.timeout;
    let sock = tcp_connect(addr, params.timeout)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(params.timeout))?;
    sock.set_write_timeout(Some(params.timeout))?;

    // INFO arrives in clear text even when TLS follows.
    let mut limits = Limits::default();
    let mut data = Vec::new();
    let mut plain_rd = ReadHalf::Plain(sock.try_clone()?);
    let info = match next_op(&mut plain_rd, &mut data, &limits, deadline)? {
        ServerOp::Info(info) => *info,
        // E.g. "maximum connections exceeded".
        ServerOp::Err(e) => return Err(Error::Server(e)),
        other => {
            return Err(Error::Protocol(format!(
                "expected INFO, got {}",
                op_name(&other)
            )));
        }
    };
    limits.max_payload = info.max_payload();
    let use_tls = addr.tls || info.tls_required;

    let (mut rd, mut wr) = if use_tls {
        let cfg = (params.tls)().map_err(|e| Error::Protocol(format!("tls setup: {e}")))?;
        let name = rustls::pki_types::ServerName::try_from(addr.tls_name.clone())
            .map_err(|e| Error::InvalidUrl(format!("tls name {:?}: {e}", addr.tls_name)))?;
        let mut tls = rustls::ClientConnection::new(cfg, name)
            .map_err(|e| Error::Protocol(format!("tls: {e}")))?;
        let mut hs = sock.try_clone()?;
        let left = deadline.saturating_duration_since(Instant::now());
        hs.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        while tls.is_handshaking() {
            tls.complete_io(&mut hs)
                .map_err(|e| Error::Protocol(format!("tls handshake: {e}")))?;
        }
        // Our own buffer bounds what is queued; rustls need not refuse writes.
        tls.set_buffer_limit(None);
        let shared = Arc::new(TlsShared {
            tls: Mutex::new(tls),
            send: Mutex::new(sock.try_clone()?),
        });
        (
            ReadHalf::Tls(shared.clone(), sock.try_clone()?, Vec::new()),
            WriteHalf::Tls(shared),
        )
    } else {
        (plain_rd, WriteHalf::Plain(sock.try_clone()?))
    };

    let mut hello = Vec::with_capacity(256);
    proto::encode_connect(&mut hello, &connect_json(addr, params.name, use_tls));
    hello.extend_from_slice(proto::PING);
    wr.write_all(&hello)?;
    let mut info = info;
    loop {
        match next_op(&mut rd, &mut data, &limits, deadline)? {
            ServerOp::Pong => break,
            ServerOp::Err(e) => return Err(Error::Server(e)),
            ServerOp::Ping => wr.write_all(proto::PONG)?,
            ServerOp::Info(i) => {
                limits.max_payload = i.max_payload();
                info = *i;
            }
            ServerOp::Ok => {}
            ServerOp::Msg { .. } => {
                return Err(Error::Protocol("MSG before the handshake ended".into()));
            }
        }
    }
    sock.set_read_timeout(None)?;
    sock.set_write_timeout(None)?;

    let (lost_tx, lost_rx) = crossbeam_channel::bounded(1);
    let conn = Arc::new(Conn {
        state: Mutex::new(WState {
            buf: Vec::new(),
            pongs: VecDeque::new(),
            dead: None,
        }),
        data_cv: Condvar::new(),
        space_cv: Condvar::new(),
        sock,
        lost_tx,
        server: addr.clone(),
    });
    let c = conn.clone();
    let spawned = std::thread::Builder::new()
        .name("nats-flusher".into())
        .spawn(move || flush_loop(c, wr));
    if let Err(e) = spawned {
        conn.close("thread spawn failed");
        return Err(Error::Io(e));
    }
    let c = conn.clone();
    let spawned = std::thread::Builder::new()
        .name("nats-reader".into())
        .spawn(move || read_loop(c, rd, data, limits, sink));
    if let Err(e) = spawned {
        conn.close("thread spawn failed");
        return Err(Error::Io(e));
    }
    Ok((conn, info, lost_rx))
}

fn connect_json(addr: &ServerAddr, name: &str, tls: bool) -> serde_json::Value {
    let mut j = serde_json::json!({
        "verbose": false,
        "pedantic": false,
        "tls_required": tls,
        "name": name,
        "lang": "rust-caf-worker",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": 1,
        "headers": true,
        "no_responders": true,
    });
    match &addr.auth {
        Auth::None => {}
        Auth::UserPass(u, p) => {
            j["user"] = u.as_str().into();
            j["pass"] = p.as_str().into();
        }
        Auth::Token(t) => j["auth_token"] = t.as_str().into(),
    }
    j
}

fn tcp_connect(addr: &ServerAddr, timeout: Duration) -> Result<TcpStream, Error> {
    let addrs = (addr.host.as_str(), addr.port)
        .to_socket_addrs()
        .map_err(|e| Error::Io(io_err(format!("resolve {}: {e}", addr.host))))?;
    let mut last = io_err(format!("{} resolves to no address", addr.host));
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(Error::Io(last))
}

fn op_name(op: &ServerOp) -> &'static str {
    match op {
        ServerOp::Info(_) => "INFO",
        ServerOp::Msg { .. } => "MSG",
        ServerOp::Ping => "PING",
        ServerOp::Pong => "PONG",
        ServerOp::Ok => "+OK",
        ServerOp::Err(_) => "-ERR",
    }
}

/// Reads until one operation is complete (handshake only; socket timeouts apply).
fn next_op(
    rd: &mut ReadHalf,
    data: &mut Vec<u8>,
    limits: &Limits,
    deadline: Instant,
) -> Result<ServerOp, Error> {
    loop {
        if let Some((op, used)) =
            proto::parse_with(data, limits).map_err(|e| Error::Protocol(e.to_string()))?
        {
            data.drain(..used);
            return Ok(op);
        }
        // Each read waits only for what is left, so a server that dribbles
        // bytes cannot stretch the handshake past the connect timeout.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout);
        }
        rd.set_read_timeout(Some(left))?;
        match rd.read_into(data) {
            Ok(0) => return Err(Error::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Error::Timeout);
            }
            Err(e) => return Err(Error::Io(e)),
        }
    }
}

fn read_loop(conn: Arc<Conn>, mut rd: ReadHalf, mut data: Vec<u8>, mut limits: Limits, sink: Sink) {
    let reason = loop {
        // Parse everything buffered, then read more.
        let mut used_total = 0;
        let err = loop {
            match proto::parse_with(&data[used_total..], &limits) {
                Ok(Some((op, used))) => {
                    used_total += used;
                    match op {
                        ServerOp::Msg { sid, message } => sink(Inbound::Msg { sid, message }),
                        ServerOp::Ping => {
                            let _ = conn.write(|b| b.extend_from_slice(proto::PONG));
                        }
                        ServerOp::Pong => conn.pong(),
                        ServerOp::Ok => {}
                        ServerOp::Err(e) => sink(Inbound::Err(e)),
                        ServerOp::Info(info) => {
                            limits.max_payload = info.max_payload();
                            sink(Inbound::Info(info));
                        }
                    }
                }
                Ok(None) => break None,
                Err(e) => break Some(format!("protocol error: {e}")),
            }
        };
        data.drain(..used_total);
        if let Some(e) = err {
            break e;
        }
        if data.capacity() > KEEP_CAPACITY.max(limits.max_payload * 2) && data.len() < KEEP_CAPACITY
        {
            data.shrink_to(KEEP_CAPACITY);
        }
        match rd.read_into(&mut data) {
            Ok(0) => break "connection closed by server".to_string(),
            Ok(_) => {}
            Err(e) => break format!("read error: {e}"),
        }
    };
    conn.close(&reason);
}

fn flush_loop(conn: Arc<Conn>, mut wr: WriteHalf) {
    let mut out = Vec::new();
    loop {
        {
            let mut st = lock(&conn.state);
            while st.buf.is_empty() && st.dead.is_none() {
                st = conn.data_cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.dead.is_some() {
                return;
            }
            std::mem::swap(&mut st.buf, &mut out);
        }
        conn.space_cv.notify_all();
        if let Err(e) = wr.write_all(&out) {
            conn.close(&format!("write error: {e}"));
            return;
        }
        out.clear();
        if out.capacity() > KEEP_CAPACITY {
            out.shrink_to(KEEP_CAPACITY);
        }
    }
}
