//! `http.request` (SPEC §4.1, §12.13): ureq's HTTP/1.1 engine with one
//! connection pool per pool thread (SPEC §12.15), per-attempt timeouts,
//! typed timeout phases, bounded response bodies.
//!
//! Hostile payloads and upstreams (issue 12):
//! - redirects are followed here, one hop at a time, so the egress policy
//!   ([`super::egress`]) sees the resolved address of every hop and a hop to
//!   another origin drops every credential header (the §10 secret names);
//! - payload headers that set framing or routing (`Content-Length`,
//!   `Transfer-Encoding`, `Connection`, `Host`, other hop-by-hop names) are
//!   refused as `INVALID_INPUT`;
//! - a request that fails on a pooled keep-alive connection before any byte
//!   of the response arrived (the upstream closed it while it sat idle) is
//!   sent once more on a fresh connection inside the same attempt.
//!
//! Each exchange runs in `http/call.rs` (ureq's protocol engine, without
//! the agent's per-call layers); connections are made by ureq's connector
//! chain with our own TCP transport (`http/tcp.rs`, SPEC §12.15: fewer
//! system calls per pooled request).

mod call;
mod tcp;

use super::egress::{EgressDenied, EgressPolicy, parse_ipv4_loose};
use super::payload::{optional_bool, required_str, wrong_type};
use super::{AttemptContext, BlockError, BlockSettings, TimeoutPhase};
use crate::contract::{ErrorCode, is_secret_key};
use base64::Engine as _;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use ureq::config::{Config, IpFamily};
use ureq::http::{self, HeaderMap, Method, Uri};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{
    ConnectProxyConnector, ConnectionDetails, Connector, NextTimeout, RustlsConnector, Transport,
};

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
const ERROR_BODY_HEAD: usize = 4096;
const MAX_REDIRECTS: u32 = 5;
/// The most of a redirect's body read (so its connection can be reused).
const REDIRECT_BODY_MAX: u64 = 64 * 1024;

/// Payload header names that would set the request's framing or routing
/// (request smuggling, a second request on the connection, another virtual
/// host than the URL names). ureq sets them from the URL and the body.
const REFUSED_HEADERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// The HTTP block. Each pool thread has its own connection pool: a shared
/// pool's lock was taken twice per request by every io thread, and its
/// contention was most of the futex calls of an HTTP step.
#[derive(Debug)]
pub struct HttpBlock {
    client: call::Client,
    max_response_bytes: usize,
    egress: Arc<EgressPolicy>,
}

pub(super) struct Prepared {
    hop: Hop,
    follow_redirects: bool,
}

/// One hop's request, kept whole so it can be sent again (on a fresh
/// connection) or turned into the next hop of a redirect.
#[derive(Debug, Clone)]
struct Hop {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl HttpBlock {
    pub(super) fn new(s: &BlockSettings) -> HttpBlock {
        // What the connectors read (TLS roots, TCP_NODELAY, buffer sizes)
        // and the response-header size limit: ureq's defaults, except
        // no proxy from HTTP(S)_PROXY / ALL_PROXY: through one, every
        // request would pass the egress rules as the proxy's address.
        let config = ureq::Agent::config_builder().proxy(None).build();
        let egress = Arc::new(EgressPolicy::new(
            s.http_deny_nets.clone(),
            s.http_allow_nets.clone(),
        ));
        // ureq's default chain (CONNECT proxy, TCP, rustls) with our TCP
        // transport (tcp.rs: fewer system calls per pooled request).
        let connector =
            ().chain(ConnectProxyConnector::default())
                .chain(tcp::TcpConnector)
                .chain(RustlsConnector::default());
        let resolver = CachingResolver {
            inner: DefaultResolver::default(),
            cache: Mutex::default(),
            egress: egress.clone(),
        };
        let client =
            call::Client::new(config, Arc::new(Boxed(connector)), resolver, s.pool_threads);
        HttpBlock {
            client,
            max_response_bytes: s.max_response_bytes,
            egress,
        }
    }

    /// The egress policy (the serve command adds the worker's own ports).
    pub(super) fn egress(&self) -> &EgressPolicy {
        &self.egress
    }

    pub(super) fn execute(
        &self,
        p: &Map<String, Value>,
        ctx: &AttemptContext<'_>,
    ) -> Result<Value, BlockError> {
        let Prepared {
            mut hop,
            follow_redirects,
        } = prepare(p)?;
        let limit = self.max_response_bytes as u64;
        // A redirect that will be followed has its (small) body read, so its
        // connection goes back to the pool; any other response's body is
        // read up to the limit.
        let body_limit = |head: &http::response::Parts| match redirect_to(head, follow_redirects) {
            Some(_) => call::BodyLimit::Cut(REDIRECT_BODY_MAX),
            None => call::BodyLimit::Fail(limit),
        };
        let mut redirects = 0;
        let (answer, status) = loop {
            let answer = self.send(&hop, ctx, &body_limit)?;
            let status = answer.head.status.as_u16();
            match redirect_to(&answer.head, follow_redirects) {
                Some(location) => {
                    if redirects == MAX_REDIRECTS {
                        return Err(BlockError::new(
                            ErrorCode::ExecutionFailed,
                            format!("more than {MAX_REDIRECTS} redirects"),
                        )
                        .permanent());
                    }
                    hop = next_hop(hop, status, location)?;
                    redirects += 1;
                }
                None => break (answer, status),
            }
        };
        let call::Answer { head, body: bytes } = answer;
        let headers = response_headers(&head.headers);
        let retry_after = head
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        if (200..300).contains(&status) {
            let mut out = status_and_headers(status, headers);
            put_body(&mut out, bytes);
            return Ok(out);
        }
        let mut out = status_and_headers(status, headers);
        put_body(&mut out, body_head(bytes, ERROR_BODY_HEAD));
        let mut e = BlockError::new(
            ErrorCode::HttpError,
            format!("upstream answered HTTP {status}"),
        )
        .with_outputs(out);
        e.http_status = Some(status);
        if status == 429 || status == 503 {
            e.retry_after = retry_after;
        }
        Err(e)
    }

    /// Sends one hop with the attempt's remaining time and reads its
    /// response. A failure on a reused pooled connection before any
    /// response byte came back is sent once more on a fresh connection: the
    /// upstream closed that connection while it sat idle, which says
    /// nothing about the upstream now. (Any method: the step's own retries
    /// would resend it anyway, and the request never reached an upstream
    /// that was still listening.)
    fn send(
        &self,
        hop: &Hop,
        ctx: &AttemptContext<'_>,
        body_limit: &dyn Fn(&http::response::Parts) -> call::BodyLimit,
    ) -> Result<call::Answer, BlockError> {
        let connect = ctx.connect_timeout;
        let mut fresh = false;
        loop {
            let total = ctx.remaining();
            if total == Some(Duration::ZERO) {
                return Err(BlockError::timeout(
                    TimeoutPhase::Attempt,
                    "no time left for the attempt",
                ));
            }
            let request = call::Request {
                method: &hop.method,
                uri: &hop.uri,
                headers: &hop.headers,
                body: &hop.body,
                total,
                connect,
                fresh,
            };
            match self.client.run(&request, body_limit) {
                Ok(answer) => return Ok(answer),
                Err(f) if !fresh && f.on_idle_connection && is_stale_connection(&f.error) => {
                    log::debug!(error = f.error.to_string(); "pooled connection was closed; sending again on a fresh one");
                    fresh = true;
                }
                Err(f) => return Err(map_error(f.error, total, connect)),
            }
        }
    }
}

/// Where a response sends the next hop, when it is followed: a redirect
/// status with a readable `Location`, and `follow_redirects` set. (Also
/// decides how much of its body is read, so a cut body is never the
/// final answer.)
fn redirect_to(head: &http::response::Parts, follow: bool) -> Option<&str> {
    if !follow || !is_redirect(head.status.as_u16()) {
        return None;
    }
    head.headers.get(http::header::LOCATION)?.to_str().ok()
}

/// Statuses whose `Location` is followed (with `follow_redirects`).
fn is_redirect(status: u16) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308)
}

/// The request for the hop after a `status` redirect to `location`: 301,
/// 302 and 303 turn a method with a body into a GET without one; 307 and
/// 308 keep the method, so a body-carrying or DELETE request is not
/// followed (as ureq did). Another origin (scheme, host or port) gets no
/// credential headers.
fn next_hop(hop: Hop, status: u16, location: &str) -> Result<Hop, BlockError> {
    let failed = |why: &str| {
        BlockError::new(
            ErrorCode::ExecutionFailed,
            format!("redirect failed: {why}"),
        )
        .permanent()
    };
    let uri = join_location(&hop.uri, location)
        .ok_or_else(|| failed("the Location header is not a valid URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none_or(str::is_empty) {
        return Err(failed("the Location is not an http(s) URL with a host"));
    }
    let Hop {
        mut method,
        headers,
        mut body,
        ..
    } = hop;
    let has_body = matches!(method, Method::POST | Method::PUT | Method::PATCH);
    let mut headers = if origin(&uri) == origin(&hop.uri) {
        headers
    } else {
        let mut kept = HeaderMap::new();
        for (name, value) in &headers {
            if !is_secret_key(name.as_str()) {
                kept.append(name.clone(), value.clone());
            }
        }
        kept
    };
    if matches!(status, 307 | 308) {
        if has_body || method == Method::DELETE {
            return Err(failed(&format!(
                "a {status} redirect of a {method} request is not followed"
            )));
        }
    } else if !matches!(method, Method::GET | Method::HEAD) {
        method = Method::GET;
        body.clear();
        headers.remove(http::header::CONTENT_TYPE);
    }
    Ok(Hop {
        method,
        uri,
        headers,
        body,
    })
}

/// Scheme, host and port (default filled in), lower-case.
fn origin(uri: &Uri) -> (String, String, Option<u16>) {
    (
        uri.scheme_str().unwrap_or("").to_ascii_lowercase(),
        uri.host().unwrap_or("").to_ascii_lowercase(),
        default_port(uri),
    )
}

/// `location` resolved against `base` (absolute, `//host/..`, `/path` or a
/// relative path); the fragment is dropped.
fn join_location(base: &Uri, location: &str) -> Option<Uri> {
    let location = location.trim();
    let location = location.split('#').next().unwrap_or("");
    if let Ok(u) = location.parse::<Uri>() {
        if u.scheme().is_some() {
            return Some(u);
        }
    }
    let scheme = base.scheme_str()?;
    if location.starts_with("//") {
        return format!("{scheme}:{location}").parse().ok();
    }
    let authority = base.authority()?.as_str();
    let path = if location.starts_with('/') {
        location.to_owned()
    } else {
        let base_path = base.path();
        let dir = base_path.rfind('/').map_or("/", |i| &base_path[..=i]);
        format!("{dir}{location}")
    };
    format!("{scheme}://{authority}{path}").parse().ok()
}

/// An I/O error that a connection the upstream closed while idle produces
/// when it is used again. Timeouts and egress denials are not among them.
fn is_stale_connection(e: &ureq::Error) -> bool {
    matches!(e, ureq::Error::Io(io) if matches!(
        io.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected
    ))
}

/// A connector chain whose transports are boxed (one type for the pool).
#[derive(Debug)]
struct Boxed<C>(C);

impl<C: Connector<()>> Connector<()> for Boxed<C> {
    type Out = Box<dyn Transport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<()>,
    ) -> Result<Option<Box<dyn Transport>>, ureq::Error> {
        Ok(self
            .0
            .connect(details, chained)?
            .map(|t| Box::new(t) as Box<dyn Transport>))
    }
}

// ------------------------------------------------------------------ resolver

/// ureq's resolver, with an IP-literal host answered in place, host names
/// cached for [`DNS_TTL`], and every resolved address checked against the
/// egress policy.
///
/// It runs for every new connection (`call.rs`; a pooled connection's
/// address was checked when it was made). ureq's default resolver spawns a
/// thread per lookup whenever the request has a timeout (every attempt here
/// has one), even for `127.0.0.1`. Parsing a literal never blocks; a host
/// name is looked up (with ureq's thread and timeout) at most once per
/// [`DNS_TTL`] per host and port, so a DNS change is seen within that time.
/// Failed lookups are not cached. One denied address denies the hop (a name
/// may not mix an allowed address with a denied one).
#[derive(Debug)]
struct CachingResolver {
    inner: DefaultResolver,
    cache: Mutex<HashMap<(String, u16), (ResolvedSocketAddrs, Instant)>>,
    egress: Arc<EgressPolicy>,
}

/// How long a successful host-name lookup is reused.
const DNS_TTL: Duration = Duration::from_secs(5);
/// Host/port pairs cached before the cache starts over.
const DNS_CACHE_MAX: usize = 1024;

impl Resolver for CachingResolver {
    fn resolve(
        &self,
        uri: &http::Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let addrs = self.resolve_unchecked(uri, config, timeout)?;
        for addr in addrs.iter() {
            self.egress.check(*addr).map_err(egress_error)?;
        }
        Ok(addrs)
    }
}

/// An egress denial as the ureq error the resolver returns.
fn egress_error(e: EgressDenied) -> ureq::Error {
    ureq::Error::Io(io::Error::new(io::ErrorKind::PermissionDenied, e))
}

impl CachingResolver {
    fn resolve_unchecked(
        &self,
        uri: &http::Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        if config.ip_family() != IpFamily::Any {
            return self.inner.resolve(uri, config, timeout);
        }
        if let Some(addr) = ip_literal(uri) {
            let mut addrs = self.empty();
            addrs.push(addr);
            return Ok(addrs);
        }
        let key = match (uri.host(), default_port(uri)) {
            (Some(h), Some(p)) => (h.to_ascii_lowercase(), p),
            _ => return self.inner.resolve(uri, config, timeout),
        };
        let now = Instant::now();
        let lock = || self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((addrs, at)) = lock().get(&key) {
            if now.saturating_duration_since(*at) < DNS_TTL {
                return Ok(addrs.clone());
            }
        }
        let addrs = self.inner.resolve(uri, config, timeout)?;
        let mut cache = lock();
        if cache.len() >= DNS_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, (addrs.clone(), now));
        Ok(addrs)
    }
}

/// The URI's port, or its scheme's default.
fn default_port(uri: &http::Uri) -> Option<u16> {
    uri.port_u16().or(match uri.scheme_str()? {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    })
}

/// The socket address of an `http(s)://<ip>[:port]` URI (IPv4 in any
/// `inet_aton` form); `None` for host names.
fn ip_literal(uri: &http::Uri) -> Option<SocketAddr> {
    let port = default_port(uri)?;
    let host = uri.host()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip = match host.parse::<IpAddr>() {
        Ok(ip) => ip,
        // `2130706433`, `127.1`, `0x7f.1`: IPv4 numbers written as a host name.
        Err(_) => IpAddr::V4(parse_ipv4_loose(host)?),
    };
    Some(SocketAddr::new(ip, port))
}

/// Validates the payload and builds the request (no I/O).
pub(super) fn prepare(p: &Map<String, Value>) -> Result<Prepared, BlockError> {
    let url = required_str(p, "url")?;
    let has_prefix = |prefix: &str| {
        url.get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
    };
    if !(has_prefix("http://") || has_prefix("https://")) {
        return Err(BlockError::input(
            ErrorCode::InvalidInput,
            format!(
                "payload.url must use http or https, got {:?}",
                url.split(':').next().unwrap_or("")
            ),
        ));
    }
    let uri: http::Uri = url.parse().map_err(|e| {
        BlockError::input(
            ErrorCode::InvalidInput,
            format!("payload.url is not a valid URL: {e}"),
        )
    })?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(BlockError::input(
            ErrorCode::InvalidInput,
            "payload.url has no host",
        ));
    }
    let method = match p.get("method") {
        None | Some(Value::Null) => Method::GET,
        Some(Value::String(m)) => {
            let upper = m.to_ascii_uppercase();
            if !METHODS.contains(&upper.as_str()) {
                return Err(BlockError::input(
                    ErrorCode::InvalidInput,
                    format!("payload.method {m:?} is not one of {}", METHODS.join(" ")),
                ));
            }
            Method::from_bytes(upper.as_bytes()).map_err(|_| {
                BlockError::input(ErrorCode::InvalidInput, "payload.method is invalid")
            })?
        }
        Some(v) => return Err(wrong_type("method", "a string", v)),
    };
    let follow_redirects = optional_bool(p, "follow_redirects")?.unwrap_or(false);
    let mut headers = HeaderMap::new();
    match p.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(h)) => {
            for (name, value) in h {
                let text = match value {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => return Err(wrong_type(&format!("headers.{name}"), "a string", other)),
                };
                let hn = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    BlockError::input(
                        ErrorCode::InvalidInput,
                        format!("payload.headers: {name:?} is not a valid header name"),
                    )
                })?;
                if REFUSED_HEADERS.contains(&hn.as_str()) {
                    return Err(BlockError::input(
                        ErrorCode::InvalidInput,
                        format!(
                            "payload.headers.{name} is not allowed: the worker sets framing, \
                             connection and host headers from the URL and the body"
                        ),
                    ));
                }
                let hv = http::HeaderValue::from_str(&text).map_err(|_| {
                    BlockError::input(
                        ErrorCode::InvalidInput,
                        format!("payload.headers.{name} is not a valid header value"),
                    )
                })?;
                headers.append(hn, hv);
            }
        }
        Some(v) => return Err(wrong_type("headers", "an object of strings", v)),
    }
    let body = match p.get("body") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s.as_bytes().to_vec(),
        Some(other) => {
            if !headers.contains_key(http::header::CONTENT_TYPE) {
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
            }
            other.to_string().into_bytes()
        }
    };
    Ok(Prepared {
        hop: Hop {
            method,
            uri,
            headers,
            body,
        },
        follow_redirects,
    })
}

/// `{"status_code": .., "headers": ..}`, moving `headers` in (`json!` would
/// serialise the already-built headers value into a copy).
fn status_and_headers(status: u16, headers: Value) -> Value {
    let mut out = Map::new();
    out.insert("status_code".to_owned(), Value::from(status));
    out.insert("headers".to_owned(), headers);
    Value::Object(out)
}

/// The first `max` bytes of a body; a UTF-8 body is cut at a character
/// boundary so its head stays text (and is reported as `body`, not base64).
fn body_head(mut bytes: Vec<u8>, max: usize) -> Vec<u8> {
    if bytes.len() <= max {
        return bytes;
    }
    let cut = match std::str::from_utf8(&bytes) {
        Ok(text) => (0..=max)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0),
        Err(_) => max,
    };
    bytes.truncate(cut);
    bytes
}

fn put_body(out: &mut Value, bytes: Vec<u8>) {
    match String::from_utf8(bytes) {
        Ok(s) => out["body"] = Value::String(s),
        Err(e) => {
            out["body_base64"] =
                Value::String(base64::engine::general_purpose::STANDARD.encode(e.as_bytes()))
        }
    }
}

fn response_headers(h: &http::HeaderMap) -> Value {
    let mut map = Map::new();
    for (name, value) in h {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match map.get_mut(name.as_str()) {
            Some(Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&v);
            }
            _ => {
                map.insert(name.as_str().to_owned(), Value::String(v));
            }
        }
    }
    Value::Object(map)
}

/// `Retry-After` as delta-seconds or an HTTP-date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(86_400)));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Converts ureq's error into a block error at the I/O boundary.
///
/// `total` is the attempt's total timeout and `connect` the connect timeout
/// (CP2 only), both as configured on the request.
fn map_error(e: ureq::Error, total: Option<Duration>, connect: Option<Duration>) -> BlockError {
    use ureq::Timeout;
    let ms = |d: Option<Duration>| d.map_or_else(|| "?".to_owned(), |d| d.as_millis().to_string());
    // ureq names the phase a timeout hit, not the limit that fired: a timeout
    // while connecting is a connect timeout only when a connect timeout shorter
    // than the total was set; otherwise the total (attempt) timeout fired.
    let connect_fired = connect.is_some_and(|c| total.is_none_or(|t| c < t));
    match e {
        ureq::Error::Timeout(Timeout::Connect | Timeout::Resolve) if connect_fired => {
            BlockError::timeout(
                TimeoutPhase::Connect,
                "connect did not finish within the connect timeout",
            )
        }
        ureq::Error::Timeout(_) => BlockError::timeout(
            TimeoutPhase::Attempt,
            format!("attempt timed out after {} ms", ms(total)),
        ),
        ureq::Error::Io(io) if io.get_ref().is_some_and(|e| e.is::<EgressDenied>()) => {
            BlockError::new(ErrorCode::PermissionDenied, format!("egress denied: {io}")).permanent()
        }
        ureq::Error::Io(io) => match io.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => BlockError::timeout(
                TimeoutPhase::Attempt,
                format!("attempt timed out after {} ms", ms(total)),
            ),
            _ => BlockError::new(ErrorCode::NetworkError, format!("network error: {io}")),
        },
        ureq::Error::HostNotFound => BlockError::new(ErrorCode::NetworkError, "host not found"),
        ureq::Error::ConnectionFailed => {
            BlockError::new(ErrorCode::NetworkError, "connection failed")
        }
        ureq::Error::Protocol(p) => {
            BlockError::new(ErrorCode::NetworkError, format!("protocol error: {p}"))
        }
        ureq::Error::Tls(t) => BlockError::new(ErrorCode::NetworkError, format!("TLS error: {t}")),
        ureq::Error::Rustls(t) => {
            BlockError::new(ErrorCode::NetworkError, format!("TLS error: {t}"))
        }
        ureq::Error::BadUri(u) => {
            BlockError::input(ErrorCode::InvalidInput, format!("bad URL: {u}"))
        }
        ureq::Error::Http(h) => {
            BlockError::input(ErrorCode::InvalidInput, format!("bad request: {h}"))
        }
        ureq::Error::TooManyRedirects => BlockError::new(
            ErrorCode::ExecutionFailed,
            format!("more than {MAX_REDIRECTS} redirects"),
        )
        .permanent(),
        ureq::Error::RedirectFailed => {
            BlockError::new(ErrorCode::ExecutionFailed, "redirect failed").permanent()
        }
        ureq::Error::BodyExceedsLimit(limit) => BlockError::new(
            ErrorCode::ExecutionFailed,
            format!("response body exceeds WORKER_MAX_RESPONSE_BYTES ({limit} bytes)"),
        )
        .permanent(),
        other => BlockError::new(
            ErrorCode::ExecutionFailed,
            format!("request failed: {other}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_timeout_while_connecting_is_typed_by_the_limit_that_fired() {
        use ureq::Timeout;
        let ms = |n| Some(Duration::from_millis(n));
        let typed = |total, connect| {
            let e = map_error(ureq::Error::Timeout(Timeout::Connect), total, connect);
            (e.code, e.timeout)
        };
        // CP2: a connect timeout shorter than the total fired.
        let connect = (ErrorCode::ConnectionTimeout, Some(TimeoutPhase::Connect));
        assert_eq!(typed(ms(3000), ms(300)), connect);
        // CP1 (no connect timeout) or a connect timeout capped at the total:
        // the total (attempt) timeout fired while connecting.
        let attempt = (ErrorCode::CancelledByTimeout, Some(TimeoutPhase::Attempt));
        assert_eq!(typed(ms(1200), None), attempt);
        assert_eq!(typed(ms(300), ms(300)), attempt);
    }

    #[test]
    fn ip_literal_hosts_are_resolved_in_place() {
        let addr = |u: &str| ip_literal(&u.parse().unwrap());
        assert_eq!(
            addr("http://127.0.0.1:8080/x"),
            Some(([127, 0, 0, 1], 8080).into())
        );
        assert_eq!(
            addr("http://127.0.0.1/x"),
            Some(([127, 0, 0, 1], 80).into())
        );
        assert_eq!(addr("https://10.1.2.3"), Some(([10, 1, 2, 3], 443).into()));
        assert_eq!(
            addr("http://[::1]:9/"),
            Some(SocketAddr::new(
                IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
                9
            ))
        );
        assert_eq!(
            addr("http://2130706433:8080/"),
            Some(([127, 0, 0, 1], 8080).into())
        );
        assert_eq!(addr("http://127.1/"), Some(([127, 0, 0, 1], 80).into()));
        assert_eq!(addr("http://localhost:8080/"), None);
        assert_eq!(addr("http://example.com/"), None);
    }

    #[test]
    fn redirect_locations_resolve_against_the_hop() {
        let base: Uri = "http://127.0.0.1:8080/a/b?q=1".parse().unwrap();
        let j = |l: &str| join_location(&base, l).map(|u| u.to_string());
        assert_eq!(
            j("http://127.0.0.2/x").as_deref(),
            Some("http://127.0.0.2/x")
        );
        assert_eq!(
            j("//127.0.0.3:9/y").as_deref(),
            Some("http://127.0.0.3:9/y")
        );
        assert_eq!(
            j("/z?k=v#frag").as_deref(),
            Some("http://127.0.0.1:8080/z?k=v")
        );
        assert_eq!(j("c").as_deref(), Some("http://127.0.0.1:8080/a/c"));
        let other = |l: &str| origin(&join_location(&base, l).unwrap()) != origin(&base);
        assert!(!other("/same"));
        assert!(!other("HTTP://127.0.0.1:8080/x"));
        assert!(other("http://127.0.0.1:8081/x"));
        assert!(other("https://127.0.0.1:8080/x"));
        assert!(other("http://localhost:8080/x"));
    }

    #[test]
    fn error_body_head_keeps_utf8_whole() {
        let body = format!("a{}", "é".repeat(3000)).into_bytes();
        let head = body_head(body, ERROR_BODY_HEAD);
        assert_eq!(head.len(), 4095);
        assert!(std::str::from_utf8(&head).is_ok());
        let binary = vec![0xffu8; 5000];
        assert_eq!(body_head(binary, ERROR_BODY_HEAD).len(), ERROR_BODY_HEAD);
        assert_eq!(body_head(b"short".to_vec(), ERROR_BODY_HEAD), b"short");
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        let future = std::time::SystemTime::now() + Duration::from_secs(30);
        let d = parse_retry_after(&httpdate::fmt_http_date(future)).unwrap();
        assert!(
            d > Duration::from_secs(27) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn payload_validation_codes() {
        let p = |v: Value| v.as_object().cloned().unwrap();
        let code = |v: Value| prepare(&p(v)).err().map(|e| e.code);
        assert_eq!(code(json!({})), Some(ErrorCode::MissingRequiredField));
        assert_eq!(code(json!({"url": 5})), Some(ErrorCode::InvalidFormat));
        assert_eq!(
            code(json!({"url": "file:///etc/passwd"})),
            Some(ErrorCode::InvalidInput)
        );
        assert_eq!(
            code(json!({"url": "ftp://x/"})),
            Some(ErrorCode::InvalidInput)
        );
        assert_eq!(
            code(json!({"url": "http://127.0.0.1/", "method": "TRACE"})),
            Some(ErrorCode::InvalidInput)
        );
        assert_eq!(
            code(json!({"url": "http://127.0.0.1/", "headers": []})),
            Some(ErrorCode::InvalidFormat)
        );
        assert_eq!(
            code(json!({"url": "http://127.0.0.1/", "method": "post", "body": {"a": 1}})),
            None
        );
    }
}
