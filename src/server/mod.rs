//! The HTTP ports (SPEC §8), served by tiny_http on threads separate from the
//! pools, so health, rejections and lookups keep answering while every pool
//! thread is busy.

mod health;
mod ingress;
mod metrics;

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
use tiny_http::{Header, Request, Response, Server};

/// A response as our handlers build it.
pub type Reply = Response<Cursor<Vec<u8>>>;

/// How long a client may stall (sending its request or reading our answer)
/// before its connection is dropped.
pub const CLIENT_IO_TIMEOUT: Duration = Duration::from_secs(10);

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
}

/// A listening port with its handler threads.
pub struct HttpPort {
    server: Arc<Server>,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl HttpPort {
    /// Binds `addr` and starts `threads` handler threads.
    pub fn start(
        setting: &'static str,
        addr: SocketAddr,
        threads: usize,
        handler: Arc<dyn Handler>,
    ) -> Result<HttpPort, BindError> {
        let err = |error| BindError {
            setting,
            addr,
            error,
        };
        let listener = listen(addr).map_err(err)?;
        let bound = listener.local_addr().map_err(err)?;
        let server = Server::from_listener(listener, None)
            .map_err(|e| err(std::io::Error::other(e.to_string())))?;
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

/// Binds with SO_REUSEADDR and read/write timeouts that accepted sockets
/// inherit on Linux: a client that stalls mid-request or stops reading its
/// response is dropped after [`CLIENT_IO_TIMEOUT`], and an idle keep-alive
/// connection gives its tiny_http thread back after that long.
///
/// On Linux the read timeout also bounds `accept()` on the listener; our
/// vendored tiny_http (vendor/tiny_http, see VENDORED.md) keeps accepting
/// after such a timeout, where upstream stopped for good.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_read_timeout(Some(CLIENT_IO_TIMEOUT))?;
    socket.set_write_timeout(Some(CLIENT_IO_TIMEOUT))?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn serve_loop(server: &Server, stop: &AtomicBool, handler: &Arc<dyn Handler>) {
    while !stop.load(Ordering::Acquire) {
        match server.recv_timeout(Duration::from_millis(200)) {
            // tiny_http hands an upgrade request the raw socket as its "body",
            // unbounded and unframed; this worker never upgrades.
            Ok(Some(request)) if wants_upgrade(&request) => respond(
                request,
                json(
                    400,
                    &error_body(
                        "upgrade_not_supported",
                        "connection upgrades are not supported",
                    ),
                ),
            ),
            Ok(Some(request)) if body_on_socket(&request) => {
                // The body is read from the socket while the handler runs, and
                // tiny_http drains what is left when the request is dropped: a
                // client stalling mid-body must not pin one of the port's few
                // threads. tiny_http serves one request per connection at a
                // time, so these threads are bounded by the open connections.
                let handler = handler.clone();
                let spawned = std::thread::Builder::new()
                    .name("caf-http-body".into())
                    .spawn(move || dispatch(handler.as_ref(), request));
                if let Err(e) = spawned {
                    // The request was dropped with the closure: tiny_http answered 500.
                    log::error!(error = e.to_string(); "cannot spawn a request body thread");
                }
            }
            Ok(Some(request)) => dispatch(handler.as_ref(), request),
            Ok(None) => {}
            Err(e) => {
                log::warn!(error = e.to_string(); "http server receive failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn dispatch(handler: &dyn Handler, request: Request) {
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

/// True when tiny_http has not buffered the body: chunked, over 1 KiB, or
/// sent only after `100 Continue`. Smaller bodies are read before the
/// request is handed over, on tiny_http's own per-connection thread.
fn body_on_socket(request: &Request) -> bool {
    let has = |name: &'static str| request.headers().iter().any(|h| h.field.equiv(name));
    has("Transfer-Encoding")
        || request
            .body_length()
            .is_some_and(|n| n > 1024 || (n > 0 && has("Expect")))
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
