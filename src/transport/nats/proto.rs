//! The NATS client protocol without I/O: a push parser for what a server
//! sends (`INFO`, `MSG`, `HMSG`, `PING`, `PONG`, `+OK`, `-ERR`) and encoders
//! for what a client sends (`CONNECT`, `PUB`, `HPUB`, `SUB`, `UNSUB`, `PING`,
//! `PONG`), plus the `NATS/1.0` header block.
//!
//! [`parse_with`] works like httparse: it looks at the bytes received so far
//! and returns either a complete operation and how many bytes it used, or
//! `None` when more bytes are needed. It never buffers by itself, so the
//! caller bounds memory; the parser bounds what it will ever ask for (a
//! control line longer than [`Limits::max_control_line`] or a message larger
//! than [`Limits::max_payload`] is an error before the bytes arrive).

use serde::Deserialize;
use std::fmt;
use std::io::Write;

/// Longest control line accepted from a server. INFO lines of large clusters
/// list many URLs, so this is well above the server's own 4 KiB default.
pub const DEFAULT_MAX_CONTROL_LINE: usize = 64 * 1024;
/// The server's default `max_payload`, used until INFO says otherwise.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
/// The largest `max_payload` a server may announce (nats-server caps it at 64 MiB).
pub const MAX_PAYLOAD_CAP: usize = 64 * 1024 * 1024;
/// Version line that opens every header block.
pub const HEADER_VERSION: &str = "NATS/1.0";

/// The client's `PING` operation.
pub const PING: &[u8] = b"PING\r\n";
/// The client's `PONG` operation.
pub const PONG: &[u8] = b"PONG\r\n";

/// Bounds the parser enforces on server input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest control line (without CRLF).
    pub max_control_line: usize,
    /// Largest message (headers plus payload).
    pub max_payload: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_control_line: DEFAULT_MAX_CONTROL_LINE,
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }
}

/// Why server input was refused. Any of these ends the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// No CRLF within the control-line limit.
    ControlLineTooLong {
        /// The limit.
        max: usize,
    },
    /// A MSG/HMSG announced more bytes than the limit.
    PayloadTooLarge {
        /// Announced size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// An operation name this client does not know (garbage).
    UnknownOp(String),
    /// A known operation with malformed arguments or framing.
    Invalid(String),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::ControlLineTooLong { max } => {
                write!(f, "control line longer than {max} bytes")
            }
            ProtoError::PayloadTooLarge { size, max } => {
                write!(f, "message of {size} bytes exceeds the limit of {max}")
            }
            ProtoError::UnknownOp(s) => write!(f, "unknown operation {s:?}"),
            ProtoError::Invalid(s) => write!(f, "invalid protocol: {s}"),
        }
    }
}

impl std::error::Error for ProtoError {}

/// What a server announces in INFO (the fields this client uses).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ServerInfo {
    /// Unique server id.
    pub server_id: String,
    /// Server name.
    pub server_name: String,
    /// Server version.
    pub version: String,
    /// Protocol level (1 = dynamic reconfiguration aware).
    pub proto: i64,
    /// Whether HPUB/HMSG are supported.
    pub headers: bool,
    /// Largest message the server accepts (headers plus payload).
    pub max_payload: i64,
    /// Whether the client must upgrade to TLS.
    pub tls_required: bool,
    /// Whether the server requires authentication.
    pub auth_required: bool,
    /// Other servers of the cluster ("host:port").
    pub connect_urls: Option<Vec<String>>,
    /// Lame duck mode: the server is about to shut down.
    pub ldm: bool,
    /// JetStream enabled.
    pub jetstream: bool,
}

impl ServerInfo {
    /// `max_payload` as a size clamped to what any server may announce.
    pub fn max_payload(&self) -> usize {
        if self.max_payload <= 0 {
            DEFAULT_MAX_PAYLOAD
        } else {
            usize::try_from(self.max_payload)
                .unwrap_or(MAX_PAYLOAD_CAP)
                .min(MAX_PAYLOAD_CAP)
        }
    }
}

/// Message headers: ordered (name, value) pairs plus the optional status
/// line of the `NATS/1.0` version line (e.g. `503`, `100 Idle Heartbeat`).
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct Headers {
    pairs: Vec<(String, String)>,
    status: Option<u16>,
    description: Option<String>,
}

impl Headers {
    /// Empty headers.
    pub fn new() -> Self {
        Headers::default()
    }

    /// Sets `name` to `value`, replacing earlier values of the same
    /// (case-sensitive) name.
    pub fn insert(&mut self, name: &str, value: &str) {
        self.pairs.retain(|(n, _)| n != name);
        self.pairs.push((name.to_string(), value.to_string()));
    }

    /// Adds a value for `name`, keeping earlier ones (NATS headers are multi-valued).
    pub fn append(&mut self, name: &str, value: &str) {
        self.pairs.push((name.to_string(), value.to_string()));
    }

    /// Removes every value of `name`.
    pub fn remove(&mut self, name: &str) {
        self.pairs.retain(|(n, _)| n != name);
    }

    /// The first value of `name` (case-sensitive, as NATS compares names).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of `name` compared without ASCII case.
    pub fn get_ignore_case(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.pairs
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// All pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// No pairs (a status line may still be present).
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Status code of the version line (`NATS/1.0 503`), if any.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// Description after the status code (`Idle Heartbeat`), if any.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// Sets the status line (servers send these; clients rarely need to).
    pub fn set_status(&mut self, status: u16, description: Option<&str>) {
        self.status = Some(status);
        self.description = description.map(str::to_string);
    }

    /// Whether every name and value can go on the wire unchanged.
    pub fn is_valid(&self) -> bool {
        self.pairs.iter().all(|(n, v)| {
            !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_graphic() && b != b':')
                && !v.bytes().any(|b| b == b'\r' || b == b'\n')
        }) && self
            .description
            .as_deref()
            .is_none_or(|d| !d.bytes().any(|b| b == b'\r' || b == b'\n'))
    }

    /// Appends the header block (version line, pairs, blank line) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(HEADER_VERSION.as_bytes());
        if let Some(s) = self.status {
            let _ = write!(out, " {s}");
            if let Some(d) = &self.description {
                out.push(b' ');
                out.extend_from_slice(d.as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
        for (n, v) in &self.pairs {
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }

    /// Parses a header block as carried by HMSG.
    pub fn parse(block: &[u8]) -> Result<Headers, ProtoError> {
        let text = std::str::from_utf8(block)
            .map_err(|_| ProtoError::Invalid("header block is not UTF-8".into()))?;
        let mut lines = text.split("\r\n");
        let first = lines.next().unwrap_or_default();
        let rest = first
            .strip_prefix(HEADER_VERSION)
            .ok_or_else(|| ProtoError::Invalid(format!("bad header version line {first:?}")))?;
        let mut h = Headers::new();
        let rest = rest.trim();
        if !rest.is_empty() {
            let (code, desc) = match rest.split_once(char::is_whitespace) {
                Some((c, d)) => (c, Some(d.trim())),
                None => (rest, None),
            };
            let code: u16 = code
                .parse()
                .map_err(|_| ProtoError::Invalid(format!("bad status {code:?}")))?;
            h.status = Some(code);
            h.description = desc.filter(|d| !d.is_empty()).map(str::to_string);
        }
        for line in lines {
            if line.is_empty() {
                continue;
            }
            let (n, v) = line
                .split_once(':')
                .ok_or_else(|| ProtoError::Invalid(format!("bad header line {line:?}")))?;
            h.pairs.push((n.trim().to_string(), v.trim().to_string()));
        }
        Ok(h)
    }
}

/// A message as delivered to a subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Subject it was published to.
    pub subject: String,
    /// Reply subject, if the publisher set one.
    pub reply: Option<String>,
    /// Headers (HMSG), including status messages.
    pub headers: Option<Headers>,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

impl Message {
    /// The status code of a status message (e.g. 503 no responders, 100 heartbeat).
    pub fn status(&self) -> Option<u16> {
        self.headers.as_ref().and_then(Headers::status)
    }
}

/// One operation sent by a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOp {
    /// INFO with its JSON.
    Info(Box<ServerInfo>),
    /// MSG or HMSG for subscription `sid`.
    Msg {
        /// Subscription id.
        sid: u64,
        /// The message.
        message: Message,
    },
    /// Keep-alive request; answer PONG.
    Ping,
    /// Answer to our PING.
    Pong,
    /// Verbose acknowledgement (not requested, but tolerated).
    Ok,
    /// Error text without the quotes.
    Err(String),
}

/// [`parse_with`] under [`Limits::default`].
pub fn parse(buf: &[u8]) -> Result<Option<(ServerOp, usize)>, ProtoError> {
    parse_with(buf, &Limits::default())
}

/// Parses one operation from the start of `buf`: `Ok(Some((op, used)))`,
/// `Ok(None)` when more bytes are needed, or an error for input that can
/// never become valid.
pub fn parse_with(buf: &[u8], limits: &Limits) -> Result<Option<(ServerOp, usize)>, ProtoError> {
    // The line may be max_control_line bytes plus CRLF.
    let window = &buf[..buf.len().min(limits.max_control_line + 2)];
    let Some(nl) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() >= limits.max_control_line + 2 {
            return Err(ProtoError::ControlLineTooLong {
                max: limits.max_control_line,
            });
        }
        return Ok(None);
    };
    let line = window[..nl].strip_suffix(b"\r").unwrap_or(&window[..nl]);
    if line.len() > limits.max_control_line {
        return Err(ProtoError::ControlLineTooLong {
            max: limits.max_control_line,
        });
    }
    let body = nl + 1;
    let (name, rest) = match line.iter().position(|b| *b == b' ' || *b == b'\t') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &line[line.len()..]),
    };
    let is = |op: &str| name.eq_ignore_ascii_case(op.as_bytes());
    if is("MSG") || is("HMSG") {
        return parse_msg(buf, rest, body, is("HMSG"), limits);
    }
    let op = if is("PING") {
        ServerOp::Ping
    } else if is("PONG") {
        ServerOp::Pong
    } else if is("+OK") {
        ServerOp::Ok
    } else if is("-ERR") {
        let text = String::from_utf8_lossy(rest);
        let text = text.trim();
        let text = text
            .strip_prefix('\'')
            .and_then(|t| t.strip_suffix('\''))
            .unwrap_or(text);
        ServerOp::Err(text.to_string())
    } else if is("INFO") {
        let info: ServerInfo = serde_json::from_slice(rest)
            .map_err(|e| ProtoError::Invalid(format!("INFO is not valid JSON: {e}")))?;
        ServerOp::Info(Box::new(info))
    } else {
        let shown: String = String::from_utf8_lossy(&name[..name.len().min(32)]).into_owned();
        return Err(ProtoError::UnknownOp(shown));
    };
    Ok(Some((op, body)))
}

fn parse_msg(
    buf: &[u8],
    args: &[u8],
    body: usize,
    with_headers: bool,
    limits: &Limits,
) -> Result<Option<(ServerOp, usize)>, ProtoError> {
    let args = std::str::from_utf8(args)
        .map_err(|_| ProtoError::Invalid("MSG arguments are not UTF-8".into()))?;
    let mut parts = [""; 5];
    let mut n = 0;
    for p in args.split([' ', '\t']).filter(|p| !p.is_empty()) {
        if n == parts.len() {
            return Err(ProtoError::Invalid("too many MSG arguments".into()));
        }
        parts[n] = p;
        n += 1;
    }
    // MSG subject sid [reply] size / HMSG subject sid [reply] hsize size
    let sizes = if with_headers { 2 } else { 1 };
    if n != 2 + sizes && n != 3 + sizes {
        return Err(ProtoError::Invalid(format!("MSG with {n} arguments")));
    }
    let num = |s: &str| -> Result<usize, ProtoError> {
        s.parse()
            .map_err(|_| ProtoError::Invalid(format!("bad number {s:?}")))
    };
    let sid: u64 = parts[1]
        .parse()
        .map_err(|_| ProtoError::Invalid(format!("bad sid {:?}", parts[1])))?;
    let reply = (n == 3 + sizes).then(|| parts[2].to_string());
    let total = num(parts[n - 1])?;
    let hsize = if with_headers { num(parts[n - 2])? } else { 0 };
    if total > limits.max_payload {
        return Err(ProtoError::PayloadTooLarge {
            size: total,
            max: limits.max_payload,
        });
    }
    if hsize > total {
        return Err(ProtoError::Invalid("header size above total size".into()));
    }
    let end = body + total;
    if buf.len() < end + 2 {
        return Ok(None);
    }
    if &buf[end..end + 2] != b"\r\n" {
        return Err(ProtoError::Invalid("message not followed by CRLF".into()));
    }
    let headers = if with_headers {
        Some(Headers::parse(&buf[body..body + hsize])?)
    } else {
        None
    };
    let message = Message {
        subject: parts[0].to_string(),
        reply,
        headers,
        payload: buf[body + hsize..end].to_vec(),
    };
    Ok(Some((ServerOp::Msg { sid, message }, end + 2)))
}

/// Whether `s` can be used as a subject, reply subject or queue name on the
/// wire: non-empty, no whitespace or control characters (which would let a
/// caller inject protocol).
pub fn valid_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b > b' ' && b != 0x7f)
}

/// Appends `CONNECT <json>`.
pub fn encode_connect(out: &mut Vec<u8>, json: &serde_json::Value) {
    out.extend_from_slice(b"CONNECT ");
    out.extend_from_slice(json.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `PUB` (no headers) or `HPUB` (headers). The caller validates
/// subjects and headers first.
pub fn encode_pub(
    out: &mut Vec<u8>,
    subject: &str,
    reply: Option<&str>,
    headers: Option<&Headers>,
    payload: &[u8],
) {
    let _ = match headers {
        None => write!(out, "PUB {subject} "),
        Some(_) => write!(out, "HPUB {subject} "),
    };
    if let Some(r) = reply {
        out.extend_from_slice(r.as_bytes());
        out.push(b' ');
    }
    match headers {
        None => {
            let _ = write!(out, "{}\r\n", payload.len());
        }
        Some(h) => {
            let mut block = Vec::with_capacity(64);
            h.encode(&mut block);
            let _ = write!(out, "{} {}\r\n", block.len(), block.len() + payload.len());
            out.extend_from_slice(&block);
        }
    }
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// Size on the wire that counts against `max_payload` (headers plus payload).
pub fn message_size(headers: Option<&Headers>, payload: &[u8]) -> usize {
    headers.map_or(0, |h| {
        let mut block = Vec::new();
        h.encode(&mut block);
        block.len()
    }) + payload.len()
}

/// Appends `SUB subject [queue] sid`.
pub fn encode_sub(out: &mut Vec<u8>, subject: &str, queue: Option<&str>, sid: u64) {
    let _ = match queue {
        Some(q) => write!(out, "SUB {subject} {q} {sid}\r\n"),
        None => write!(out, "SUB {subject} {sid}\r\n"),
    };
}

/// Appends `UNSUB sid [max]`.
pub fn encode_unsub(out: &mut Vec<u8>, sid: u64, max: Option<u64>) {
    let _ = match max {
        Some(m) => write!(out, "UNSUB {sid} {m}\r\n"),
        None => write!(out, "UNSUB {sid}\r\n"),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(
        subject: &str,
        reply: Option<&str>,
        headers: Option<Headers>,
        payload: &[u8],
    ) -> Message {
        Message {
            subject: subject.into(),
            reply: reply.map(str::to_string),
            headers,
            payload: payload.to_vec(),
        }
    }

    /// Feeds `chunks` one after another the way the reader does and returns
    /// every operation parsed (or the first error).
    fn feed(chunks: &[&[u8]], limits: &Limits) -> Result<Vec<ServerOp>, ProtoError> {
        let mut buf = Vec::new();
        let mut ops = Vec::new();
        for c in chunks {
            buf.extend_from_slice(c);
            while let Some((op, used)) = parse_with(&buf, limits)? {
                assert!(used <= buf.len());
                ops.push(op);
                buf.drain(..used);
            }
        }
        assert!(
            buf.is_empty(),
            "bytes left over: {:?}",
            String::from_utf8_lossy(&buf)
        );
        Ok(ops)
    }

    /// An HMSG as a server frames it, sizes computed.
    fn hmsg(args: &str, block: &str, payload: &[u8]) -> Vec<u8> {
        let mut w = format!(
            "HMSG {args} {} {}\r\n{block}",
            block.len(),
            block.len() + payload.len()
        )
        .into_bytes();
        w.extend_from_slice(payload);
        w.extend_from_slice(b"\r\n");
        w
    }

    fn hb() -> Headers {
        let mut h = Headers::new();
        h.set_status(100, Some("Idle Heartbeat"));
        h
    }

    /// Every server operation kind, with what it must parse to.
    fn corpus() -> Vec<(Vec<u8>, ServerOp)> {
        let mut h = Headers::new();
        h.insert("Nats-Msg-Id", "abc");
        h.append("X-Multi", "1");
        h.append("X-Multi", "2");
        let mut nr = Headers::new();
        nr.set_status(503, None);
        vec![
            (
                b"INFO {\"server_id\":\"S1\",\"max_payload\":1048576,\"headers\":true,\"connect_urls\":[\"10.0.0.2:4222\"],\"unknown\":{\"x\":1}}\r\n".to_vec(),
                ServerOp::Info(Box::new(ServerInfo {
                    server_id: "S1".into(),
                    max_payload: 1048576,
                    headers: true,
                    connect_urls: Some(vec!["10.0.0.2:4222".into()]),
                    ..ServerInfo::default()
                })),
            ),
            (
                b"MSG foo.bar 9 5\r\nhello\r\n".to_vec(),
                ServerOp::Msg { sid: 9, message: msg("foo.bar", None, None, b"hello") },
            ),
            (
                b"MSG foo 1 _INBOX.x.1 0\r\n\r\n".to_vec(),
                ServerOp::Msg { sid: 1, message: msg("foo", Some("_INBOX.x.1"), None, b"") },
            ),
            (
                b"MSG bin 2 4\r\n\r\n\0\xff\r\n".to_vec(),
                ServerOp::Msg { sid: 2, message: msg("bin", None, None, b"\r\n\0\xff") },
            ),
            (
                hmsg("a.b 3 r.1", "NATS/1.0\r\nNats-Msg-Id: abc\r\nX-Multi: 1\r\nX-Multi: 2\r\n\r\n", b"hi"),
                ServerOp::Msg { sid: 3, message: msg("a.b", Some("r.1"), Some(h), b"hi") },
            ),
            (
                hmsg("_INBOX.x.2 4", "NATS/1.0 503\r\n\r\n", b""),
                ServerOp::Msg { sid: 4, message: msg("_INBOX.x.2", None, Some(nr), b"") },
            ),
            (
                hmsg("in 5", "NATS/1.0 100 Idle Heartbeat\r\n\r\n", b""),
                ServerOp::Msg { sid: 5, message: msg("in", None, Some(hb()), b"") },
            ),
            (b"PING\r\n".to_vec(), ServerOp::Ping),
            (b"PONG\r\n".to_vec(), ServerOp::Pong),
            (b"+OK\r\n".to_vec(), ServerOp::Ok),
            (
                b"-ERR 'Authorization Violation'\r\n".to_vec(),
                ServerOp::Err("Authorization Violation".into()),
            ),
            (b"ping\r\n".to_vec(), ServerOp::Ping),
        ]
    }

    #[test]
    fn every_op_split_at_every_byte_boundary() {
        let limits = Limits::default();
        for (wire, want) in corpus() {
            for cut in 0..=wire.len() {
                // A prefix alone never yields an operation.
                if cut < wire.len() {
                    assert_eq!(
                        parse_with(&wire[..cut], &limits),
                        Ok(None),
                        "cut {cut} of {wire:?}"
                    );
                }
                let ops = feed(&[&wire[..cut], &wire[cut..]], &limits).unwrap();
                assert_eq!(ops, vec![want.clone()], "cut {cut}");
            }
        }
    }

    #[test]
    fn whole_stream_split_everywhere_and_byte_by_byte() {
        let limits = Limits::default();
        let corpus = corpus();
        let wire: Vec<u8> = corpus.iter().flat_map(|(w, _)| w.clone()).collect();
        let want: Vec<ServerOp> = corpus.into_iter().map(|(_, o)| o).collect();
        for cut in 0..=wire.len() {
            assert_eq!(feed(&[&wire[..cut], &wire[cut..]], &limits).unwrap(), want);
        }
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(feed(&bytes, &limits).unwrap(), want);
    }

    #[test]
    fn err_in_the_middle_of_msgs() {
        let wire = b"MSG a 1 1\r\nx\r\n-ERR 'Permissions Violation for Subscription to \"b\"'\r\nMSG a 1 1\r\ny\r\n";
        for cut in 0..=wire.len() {
            let ops = feed(&[&wire[..cut], &wire[cut..]], &Limits::default()).unwrap();
            assert_eq!(
                ops,
                vec![
                    ServerOp::Msg {
                        sid: 1,
                        message: msg("a", None, None, b"x")
                    },
                    ServerOp::Err("Permissions Violation for Subscription to \"b\"".into()),
                    ServerOp::Msg {
                        sid: 1,
                        message: msg("a", None, None, b"y")
                    },
                ]
            );
        }
    }

    #[test]
    fn oversized_payload_rejected_before_it_arrives() {
        let limits = Limits {
            max_control_line: 128,
            max_payload: 10,
        };
        assert_eq!(
            parse_with(b"MSG a 1 11\r\n", &limits),
            Err(ProtoError::PayloadTooLarge { size: 11, max: 10 })
        );
        assert_eq!(
            parse_with(b"HMSG a 1 4 11\r\n", &limits),
            Err(ProtoError::PayloadTooLarge { size: 11, max: 10 })
        );
        // Exactly at the limit is fine.
        assert!(
            parse_with(b"MSG a 1 10\r\n0123456789\r\n", &limits)
                .unwrap()
                .is_some()
        );
        // A size that does not even fit a usize is garbage, not a panic.
        assert!(parse_with(b"MSG a 1 99999999999999999999999\r\n", &limits).is_err());
    }

    #[test]
    fn oversized_control_line_rejected() {
        let limits = Limits {
            max_control_line: 16,
            max_payload: 10,
        };
        let long = b"MSG abcdefghijklmnopqrstuvwxyz 1 1";
        // Without CRLF: refused once the window is full, not before.
        assert_eq!(parse_with(&long[..17], &limits), Ok(None));
        assert_eq!(
            parse_with(&long[..18], &limits),
            Err(ProtoError::ControlLineTooLong { max: 16 })
        );
        let mut with_crlf = long.to_vec();
        with_crlf.extend_from_slice(b"\r\n");
        assert_eq!(
            parse_with(&with_crlf, &limits),
            Err(ProtoError::ControlLineTooLong { max: 16 })
        );
        // A line exactly at the limit passes.
        assert_eq!(
            parse_with(b"-ERR 'abcdefghi'\r\n", &limits)
                .unwrap()
                .unwrap()
                .1,
            18
        );
    }

    #[test]
    fn garbage_is_a_typed_error() {
        let limits = Limits::default();
        for junk in [
            &b"HELLO\r\n"[..],
            b"\0\xff\xfe\r\n",
            b"MSG a\r\n",
            b"MSG a x 1\r\nx\r\n",
            b"MSG a 1 1\r\nxyz\r\n",
            b"HMSG a 1 5 3\r\n",
            b"HMSG a 1 3 3\r\nabc\r\n",
            b"HMSG a 1 14 14\r\nNATS/1.0 abc\r\n\r\n",
            b"INFO {not json\r\n",
            b"MSG a 1 2 3 4 5 6\r\n",
        ] {
            assert!(parse_with(junk, &limits).is_err(), "{junk:?} accepted");
        }
    }

    #[test]
    fn encoders_round_trip() {
        let mut h = Headers::new();
        h.insert("Nats-Msg-Id", "id-1");
        h.insert("Content-Type", "application/json");
        h.insert("Nats-Msg-Id", "id-2");
        assert_eq!(h.get("Nats-Msg-Id"), Some("id-2"));
        assert_eq!(h.get("nats-msg-id"), None);
        assert_eq!(h.get_ignore_case("nats-msg-id"), Some("id-2"));

        let mut out = Vec::new();
        encode_pub(&mut out, "a.b", Some("r"), Some(&h), b"{}");
        let text = String::from_utf8(out.clone()).unwrap();
        // A server would deliver the same bytes as HMSG with a sid: parse that back.
        let delivered = text.replacen("HPUB a.b r", "HMSG a.b 7 r", 1);
        let (op, used) = parse(delivered.as_bytes()).unwrap().unwrap();
        assert_eq!(used, delivered.len());
        assert_eq!(
            op,
            ServerOp::Msg {
                sid: 7,
                message: msg("a.b", Some("r"), Some(h.clone()), b"{}")
            }
        );
        let mut block = Vec::new();
        h.encode(&mut block);
        assert_eq!(message_size(Some(&h), b"{}"), block.len() + 2);
        assert!(text.starts_with(&format!(
            "HPUB a.b r {} {}\r\n",
            block.len(),
            block.len() + 2
        )));

        let mut out = Vec::new();
        encode_pub(&mut out, "x", None, None, b"hello");
        assert_eq!(out, b"PUB x 5\r\nhello\r\n");
        let (op, _) = parse(&[b"MSG x 1 5\r\nhello\r\n".as_slice()].concat())
            .unwrap()
            .unwrap();
        assert_eq!(
            op,
            ServerOp::Msg {
                sid: 1,
                message: msg("x", None, None, b"hello")
            }
        );

        let mut st = hb();
        st.append("Nats-Last-Consumer", "4");
        let mut block = Vec::new();
        st.encode(&mut block);
        assert_eq!(
            block,
            b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 4\r\n\r\n"
        );
        assert_eq!(Headers::parse(&block).unwrap(), st);

        let mut out = Vec::new();
        encode_sub(&mut out, "s.>", Some("q"), 3);
        encode_sub(&mut out, "s.*", None, 4);
        encode_unsub(&mut out, 3, None);
        encode_unsub(&mut out, 4, Some(1));
        out.extend_from_slice(PING);
        encode_connect(&mut out, &serde_json::json!({"verbose": false}));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "SUB s.> q 3\r\nSUB s.* 4\r\nUNSUB 3\r\nUNSUB 4 1\r\nPING\r\nCONNECT {\"verbose\":false}\r\n"
        );
    }

    #[test]
    fn tokens_and_headers_validated() {
        assert!(valid_token("a.b.>"));
        for bad in ["", "a b", "a\r\nPUB x 1", "a\tb", "\u{7f}"] {
            assert!(!valid_token(bad), "{bad:?}");
        }
        let mut h = Headers::new();
        h.insert("Ok", "v");
        assert!(h.is_valid());
        h.insert("Bad: name", "v");
        assert!(!h.is_valid());
        let mut h = Headers::new();
        h.insert("X", "line\r\nPUB injected 0");
        assert!(!h.is_valid());
    }
}
