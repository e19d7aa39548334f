//! The HTTP ports (SPEC §8), served by tiny_http on threads separate from the
//! pools, so health, rejections and lookups keep answering while every pool
//! thread is busy. Each port has one poller thread that owns its connections
//! (reads heads and bodies, writes answers, keeps the deadlines and the
//! connection cap) and a fixed set of handler threads that never touch a
//! socket, so no client can hold a handler or grow the thread count. Quick
//! answers that never wait ([`Handler::answers_inline`]) skip the handlers
//! and are answered by the poller itself.

mod approvals;
pub mod auth;
mod health;
mod ingress;
mod metrics;

pub use approvals::{decision_from_value, parse_decision};
pub use auth::{Auth, Principal};
pub use health::{ExtraCheck, Health, HealthCheck};
pub use ingress::Ingress;
pub use metrics::MetricsEndpoint;

use serde_json::Value;
use std::io::Cursor;
use std::net::{SocketAddr, TcpListener};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use tiny_http::{Header, InlineHook, PollConfig, Request, Response, Server};

/// A response as our handlers build it.
pub type Reply = Response<Cursor<Vec<u8>>>;

/// How long a client may take to send a whole request head (from its
/// connection, or the end of its previous answer), and how long a body or an
/// answer may take before [`MIN_TRANSFER_RATE`] applies.
pub const CLIENT_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Minimum average rate, in bytes per second, of a request body or an answer
/// after [`CLIENT_IO_TIMEOUT`]: slower clients are disconnected.
pub const MIN_TRANSFER_RATE: u64 = 16 * 1024;

/// Connections the health and metrics ports accept past their cap when every
/// open connection is busy (idle ones are closed first to make room), so
/// probes still answer while connections fill the port.
pub const PROBE_RESERVE: usize = 16;

/// Unsent answer bytes a port may hold per allowed connection (on average):
/// answers waiting for slow readers are bounded by this × the connection
/// cap; past it, the connection with the most unsent bytes is closed.
pub const PENDING_ANSWER_BYTES_PER_CONNECTION: usize = 256 * 1024;

/// Connection limits of one port.
#[derive(Debug, Clone, Copy)]
pub struct PortLimits {
    /// Open connections (`WORKER_MAX_CONNECTIONS`). A new connection on a
    /// full port replaces the one that has waited longest for a request
    /// head; when none is waiting, it is closed at once.
    pub max_connections: usize,
    /// Extra connections for when every open one is busy ([`PROBE_RESERVE`]
    /// on the health and metrics ports, 0 on the ingress).
    pub reserve: usize,
    /// Largest request body read for a handler; larger bodies are refused by
    /// the handler without being read, and the connection closes.
    pub max_body: usize,
}

/// Why a port could not be opened.
#[derive(Debug)]
pub struct BindError {
    /// The setting naming the address.
    pub setting: &'static str,
    /// The address.
    pub addr: SocketAddr,
    /// The OS error.
    pub error: std::io::Error,
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot listen on {}={}: {}",
            self.setting, self.addr, self.error
        )
    }
}

impl std::error::Error for BindError {}

/// A request handler for one port.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. Must always respond.
    fn handle(&self, request: Request);

    /// True if `request` is answered on the port's poller thread instead of
    /// a handler thread: only for answers that are quick and bounded and
    /// never wait (no long-poll, no blocking send), since every connection
    /// of the port waits meanwhile. Saves two thread hand-overs, which is
    /// most of such an answer's latency on a busy machine.
    fn answers_inline(&self, _request: &Request) -> bool {
        false
    }
}

/// A listening port with its handler threads.
pub struct HttpPort {
    server: Arc<Server>,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl HttpPort {
    /// Binds `addr` and starts its poller thread and `threads` handler threads.
    pub fn start(
        setting: &'static str,
        addr: SocketAddr,
        threads: usize,
        limits: PortLimits,
        handler: Arc<dyn Handler>,
    ) -> Result<HttpPort, BindError> {
        let err = |error| BindError {
            setting,
            addr,
            error,
        };
        let listener = listen(addr).map_err(err)?;
        let bound = listener.local_addr().map_err(err)?;
        let inline = handler.clone();
        let inline = InlineHook(Arc::new(move |request: Request| {
            if inline.answers_inline(&request) {
                serve(inline.as_ref(), request);
                None
            } else {
                Some(request)
            }
        }));
        let config = PollConfig {
            thread_name: format!("caf-http-poll-{}", bound.port()),
            max_connections: limits.max_connections,
            reserve: limits.reserve,
            max_body: limits.max_body,
            head_timeout: CLIENT_IO_TIMEOUT,
            transfer_grace: CLIENT_IO_TIMEOUT,
            min_rate: MIN_TRANSFER_RATE,
            max_pending_bytes: limits
                .max_connections
                .saturating_mul(PENDING_ANSWER_BYTES_PER_CONNECTION),
            inline: Some(inline),
        };
        let server = Server::from_listener_polled(listener, config).map_err(err)?;
        let server = Arc::new(server);
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads.max(1) {
            let (server, stop, handler) = (server.clone(), stop.clone(), handler.clone());
            let h = std::thread::Builder::new()
                .name(format!("caf-http-{}-{i}", bound.port()))
                .spawn(move || serve_loop(&server, &stop, &handler))
                .map_err(err)?;
            handles.push(h);
        }
        Ok(HttpPort {
            server,
            addr: bound,
            stop,
            threads: handles,
        })
    }

    /// The bound address (the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the handler threads after their current request.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for _ in &self.threads {
            self.server.unblock();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Binds with SO_REUSEADDR. Client deadlines are kept by the port's poller
/// (vendored tiny_http, `Server::from_listener_polled`), not socket timeouts.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// How long an idle handler thread sleeps before it looks at `stop` again.
/// `HttpPort::stop` wakes every handler at once (`Server::unblock`; each
/// thread takes at most one marker and markers wait in the queue), so this
/// is only a safety net; a short one woke each idle handler thread five
/// times a second (90 wake-ups a second in an idle worker, each of which
/// can preempt the busy poller on a 2-core host).
const IDLE_RECHECK: Duration = Duration::from_secs(60);

fn serve_loop(server: &Server, stop: &AtomicBool, handler: &Arc<dyn Handler>) {
    while !stop.load(Ordering::Acquire) {
        match server.recv_timeout(IDLE_RECHECK) {
            Ok(Some(request)) => serve(handler.as_ref(), request),
            Ok(None) => {}
            Err(e) => {
                log::warn!(error = e.to_string(); "http server receive failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Answers one request, on a handler thread or inline on the poller.
fn serve(handler: &dyn Handler, request: Request) {
    // tiny_http hands an upgrade request the raw socket as its "body",
    // unbounded and unframed; this worker never upgrades.
    if wants_upgrade(&request) {
        let body = error_body(
            "upgrade_not_supported",
            "connection upgrades are not supported",
        );
        return respond(request, json(400, &body));
    }
    // tiny_http answers 500 from Drop if a handler panics before responding.
    if catch_unwind(AssertUnwindSafe(|| handler.handle(request))).is_err() {
        log::error!("request handler panicked; answered 500");
    }
}

/// True for `Connection: upgrade` requests.
fn wants_upgrade(request: &Request) -> bool {
    request.headers().iter().any(|h| {
        h.field.equiv("Connection") && h.value.as_str().to_ascii_lowercase().contains("upgrade")
    })
}

/// A JSON response with `status`.
pub fn json(status: u16, body: &Value) -> Reply {
    json_text(status, body.to_string())
}

/// A JSON response from already serialised text.
pub fn json_text(status: u16, body: String) -> Reply {
    Response::from_data(body.into_bytes())
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json"))
}

/// A header built from our own constant names and values (never client data).
pub fn header(name: &'static str, value: &'static str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("constant header is valid ASCII")
}

/// Sends `reply`, ignoring clients that went away.
pub fn respond(request: Request, reply: Reply) {
    let _ = request.respond(reply);
}

/// The standard error body: `{"status":"error","error":..,"message":..}`.
pub fn error_body(error: &str, message: &str) -> Value {
    serde_json::json!({"status": "error", "error": error, "message": message})
}

/// `404` for an unknown route.
pub fn not_found(path: &str) -> Reply {
    json(
        404,
        &error_body("not_found", &format!("no route for {path}")),
    )
}

/// `405` with `Allow`.
pub fn method_not_allowed(allow: &'static str) -> Reply {
    json(
        405,
        &error_body("method_not_allowed", &format!("allowed methods: {allow}")),
    )
    .with_header(header("Allow", allow))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::{Mutex, mpsc};

    /// Answers `/inline` on the poller and everything else on a handler
    /// thread, with the name of the thread that answered; `/inline/panic`
    /// panics on the poller; `/inline/block` holds the poller until the
    /// test releases it through `gate`.
    struct Named {
        seen: Mutex<Vec<String>>,
        gate: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
    }

    impl Handler for Named {
        fn handle(&self, request: Request) {
            if request.url() == "/inline/panic" {
                panic!("inline handler panicked on purpose");
            }
            if request.url() == "/inline/block" {
                if let Some((entered, release)) = self.gate.lock().unwrap().take() {
                    let _ = entered.send(());
                    let _ = release.recv_timeout(Duration::from_secs(10));
                }
            }
            let name = std::thread::current().name().unwrap_or("").to_owned();
            self.seen.lock().unwrap().push(name.clone());
            respond(request, json_text(200, name));
        }

        fn answers_inline(&self, request: &Request) -> bool {
            request.url().starts_with("/inline")
        }
    }

    fn start() -> (HttpPort, Arc<Named>) {
        let handler = Arc::new(Named {
            seen: Mutex::new(Vec::new()),
            gate: Mutex::new(None),
        });
        let limits = PortLimits {
            max_connections: 8,
            reserve: 0,
            max_body: 1024,
        };
        let addr = "127.0.0.1:0".parse().unwrap();
        let port = HttpPort::start("TEST_ADDR", addr, 2, limits, handler.clone()).unwrap();
        (port, handler)
    }

    /// Sends `count` pipelined GETs of `path` in one write, reads until
    /// `count` answers have ended, and returns everything read.
    fn pipelined(port: &HttpPort, path: &str, count: usize) -> String {
        let mut s = TcpStream::connect(port.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let one = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        s.write_all(one.repeat(count).as_bytes()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        let answers = |got: &[u8]| String::from_utf8_lossy(got).matches("HTTP/1.1 ").count();
        while answers(&got) < count {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    #[test]
    fn inline_requests_are_answered_on_the_poller_and_others_on_handlers() {
        let (port, handler) = start();
        let poller = format!("caf-http-poll-{}", port.addr().port());
        let answer = pipelined(&port, "/inline", 1);
        assert!(answer.ends_with(&poller), "{answer}");
        let answer = pipelined(&port, "/queued", 1);
        assert!(answer.contains("caf-http-"), "{answer}");
        assert!(!answer.contains(&poller), "{answer}");
        assert_eq!(handler.seen.lock().unwrap().len(), 2);
        port.stop();
    }

    /// Each inline answer lets the next pipelined request in; all are
    /// answered, in order, without one connection holding the poller.
    #[test]
    fn pipelined_inline_requests_are_all_answered() {
        let (port, handler) = start();
        let answer = pipelined(&port, "/inline", 2_000);
        assert_eq!(answer.matches("HTTP/1.1 200").count(), 2_000);
        assert_eq!(handler.seen.lock().unwrap().len(), 2_000);
        port.stop();
    }

    /// Stopping the port is bounded by its final flush (1 s) even while a
    /// client pipelines inline-answered requests and reads every answer:
    /// each answer lets its next request in, so the flush always has work.
    #[test]
    fn a_pipelining_client_does_not_hold_the_shutdown() {
        use std::sync::atomic::AtomicBool;
        let (port, handler) = start();
        let mut flood = TcpStream::connect(port.addr()).unwrap();
        let mut reader = flood.try_clone().unwrap();
        reader
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let _reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
        });
        let flag = done.clone();
        let _writer = std::thread::spawn(move || {
            let batch = "GET /inline HTTP/1.1\r\nHost: t\r\n\r\n".repeat(100);
            while !flag.load(Ordering::Acquire) && flood.write_all(batch.as_bytes()).is_ok() {}
        });
        let started = std::time::Instant::now();
        while handler.seen.lock().unwrap().len() < 500 {
            assert!(started.elapsed() < Duration::from_secs(20), "no flood");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let stopping = std::time::Instant::now();
        std::thread::spawn(move || {
            port.stop();
            let _ = tx.send(());
        });
        let stopped = rx.recv_timeout(Duration::from_secs(10));
        done.store(true, Ordering::Release);
        assert!(stopped.is_ok(), "the port did not stop within 10 s");
        assert!(stopping.elapsed() < Duration::from_secs(5));
    }

    /// A full port makes room by closing the connection that has waited
    /// longest for a request head. A connection accepted before its client
    /// wrote, whose head has since arrived but was not yet read (its
    /// readiness still queued behind the listener's), is busy, not idle: the
    /// connection with a half-sent head is closed instead.
    #[test]
    fn a_full_port_closes_the_idle_head_not_an_unread_busy_one() {
        let (port, handler) = start(); // 8 connections, no reserve
        let connect = |bytes: &[u8]| {
            let mut s = TcpStream::connect(port.addr()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(bytes).unwrap();
            s
        };
        // Each answer is small and written at once: one read shows its start.
        let answer = |s: &mut TcpStream| {
            let mut got = [0u8; 512];
            let n = s.read(&mut got).unwrap_or(0);
            String::from_utf8_lossy(&got[..n]).into_owned()
        };
        let head = b"POST /queued HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{";
        let mut busy: Vec<TcpStream> = (0..5).map(|_| connect(head)).collect();
        let mut late = connect(b"");
        // Accepted in order: once this one is answered, `late` is accepted.
        let mut probe = connect(b"GET /queued HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        assert!(answer(&mut probe).starts_with("HTTP/1.1 200"));
        assert_eq!(probe.read(&mut [0u8; 64]).ok(), Some(0));
        // The poller waits in an inline handler while two more clients
        // connect and `late` sends its head; then it accepts both in a burst.
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        *handler.gate.lock().unwrap() = Some((entered_tx, release_rx));
        // Its next request follows at once, so it stays busy and counted
        // whether the poller took it in the burst or in an earlier turn.
        let block = b"GET /inline/block HTTP/1.1\r\nHost: t\r\n\r\n";
        let mut blocker = connect(&[&block[..], &head[..]].concat());
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        let mut idle = connect(b"GET /que");
        let mut new = connect(b"GET /queued HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        // Last: its readiness queues behind the listener's.
        late.write_all(head).unwrap();
        release.send(()).unwrap();
        assert!(answer(&mut blocker).starts_with("HTTP/1.1 200"));
        let got = answer(&mut new);
        assert!(got.starts_with("HTTP/1.1 200"), "new: {got:?}");
        assert_eq!(idle.read(&mut [0u8; 64]).ok(), Some(0), "idle not closed");
        busy.extend([late, blocker]);
        for (i, s) in busy.iter_mut().enumerate() {
            s.write_all(&[b'x'; 99]).unwrap();
            let got = answer(s);
            assert!(got.starts_with("HTTP/1.1 200"), "busy {i}: {got:?}");
        }
        port.stop();
    }

    #[test]
    fn a_panicking_inline_handler_answers_500_and_the_port_goes_on() {
        let (port, _) = start();
        let answer = pipelined(&port, "/inline/panic", 1);
        assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
        let answer = pipelined(&port, "/inline", 1);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        port.stop();
    }
}
