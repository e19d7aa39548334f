//! `http.request` (SPEC §4.1): one shared ureq agent, per-attempt timeouts,
//! typed timeout phases, bounded response bodies.

use super::payload::{optional_bool, required_str, wrong_type};
use super::{AttemptContext, BlockError, BlockSettings, TimeoutPhase};
use crate::contract::ErrorCode;
use base64::Engine as _;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use ureq::config::{Config, IpFamily};
use ureq::http::{self, Method};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
const ERROR_BODY_HEAD: usize = 4096;
const MAX_REDIRECTS: u32 = 5;

/// The HTTP block. The agent is shared by all io threads (connection reuse).
#[derive(Debug)]
pub struct HttpBlock {
    agent: ureq::Agent,
    max_response_bytes: usize,
}

pub(super) struct Prepared {
    request: http::Request<Vec<u8>>,
    follow_redirects: bool,
}

impl HttpBlock {
    pub(super) fn new(s: &BlockSettings) -> HttpBlock {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_idle_connections(s.http_max_idle_per_host.max(10) * 4)
            .max_idle_connections_per_host(s.http_max_idle_per_host.max(3))
            .user_agent(concat!("caf-worker/", env!("CARGO_PKG_VERSION")))
            .build();
        let agent = ureq::Agent::with_parts(
            config,
            DefaultConnector::default(),
            CachingResolver::default(),
        );
        HttpBlock {
            agent,
            max_response_bytes: s.max_response_bytes,
        }
    }

    pub(super) fn execute(
        &self,
        p: &Map<String, Value>,
        ctx: &AttemptContext<'_>,
    ) -> Result<Value, BlockError> {
        let Prepared {
            request,
            follow_redirects,
        } = prepare(p)?;
        let total = ctx.remaining();
        if total == Some(Duration::ZERO) {
            return Err(BlockError::timeout(
                TimeoutPhase::Attempt,
                "no time left for the attempt",
            ));
        }
        let request = self
            .agent
            .configure_request(request)
            .timeout_global(total)
            .timeout_connect(ctx.connect_timeout)
            .max_redirects(if follow_redirects { MAX_REDIRECTS } else { 0 })
            .max_redirects_will_error(follow_redirects)
            .build();
        let connect = ctx.connect_timeout;
        let mut response = self
            .agent
            .run(request)
            .map_err(|e| map_error(e, total, connect))?;
        let status = response.status().as_u16();
        let headers = response_headers(response.headers());
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let limit = self.max_response_bytes as u64;
        let bytes = response
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => BlockError::new(
                    ErrorCode::ExecutionFailed,
                    format!("response body exceeds WORKER_MAX_RESPONSE_BYTES ({limit} bytes)"),
                )
                .permanent(),
                other => map_error(other, total, connect),
            })?;
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
}

/// ureq's resolver, with an IP-literal host answered in place and host names
/// cached for [`DNS_TTL`].
///
/// ureq resolves before it looks in its connection pool, and its default
/// resolver spawns a thread per lookup whenever the request has a timeout
/// (every attempt here has one) — even for `127.0.0.1` and even when a
/// pooled connection is then reused: one OS thread per step. Parsing a
/// literal never blocks; a host name is looked up (with ureq's thread and
/// timeout) at most once per [`DNS_TTL`] per host and port, so a DNS change
/// is seen within that time. Failed lookups are not cached.
#[derive(Debug, Default)]
struct CachingResolver {
    inner: DefaultResolver,
    cache: Mutex<HashMap<(String, u16), (ResolvedSocketAddrs, Instant)>>,
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

/// The socket address of an `http(s)://<ip>[:port]` URI; `None` for host names.
fn ip_literal(uri: &http::Uri) -> Option<SocketAddr> {
    let port = default_port(uri)?;
    let host = uri.host()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some(SocketAddr::new(host.parse::<IpAddr>().ok()?, port))
}

/// Validates the payload and builds the request (no I/O).
pub(super) fn prepare(p: &Map<String, Value>) -> Result<Prepared, BlockError> {
    let url = required_str(p, "url")?;
    let lower = url.to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
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
    let mut builder = http::Request::builder().method(method).uri(uri);
    let mut has_content_type = false;
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
                let hv = http::HeaderValue::from_str(&text).map_err(|_| {
                    BlockError::input(
                        ErrorCode::InvalidInput,
                        format!("payload.headers.{name} is not a valid header value"),
                    )
                })?;
                has_content_type |= hn == http::header::CONTENT_TYPE;
                builder = builder.header(hn, hv);
            }
        }
        Some(v) => return Err(wrong_type("headers", "an object of strings", v)),
    }
    let body = match p.get("body") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s.as_bytes().to_vec(),
        Some(other) => {
            if !has_content_type {
                builder = builder.header(http::header::CONTENT_TYPE, "application/json");
            }
            other.to_string().into_bytes()
        }
    };
    let request = builder.body(body).map_err(|e| {
        BlockError::input(
            ErrorCode::InvalidInput,
            format!("cannot build the request: {e}"),
        )
    })?;
    Ok(Prepared {
        request,
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
        assert_eq!(addr("http://localhost:8080/"), None);
        assert_eq!(addr("http://example.com/"), None);
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
