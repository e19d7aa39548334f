//! Batch input for `run` and `validate`, as people write it: JSON Lines, a
//! JSON array, or a stream of concatenated (pretty-printed) objects, from a
//! file or stdin. Every item is numbered by the line its value starts on.
//!
//! Anything but an array is streamed (so `run` can apply backpressure): a
//! small scanner tracks nesting and strings to find where each object ends.
//! An array is read whole (it must be valid JSON as a whole, else exit 2).

use crate::contract::{
    Assignment, Checked, IntakeRules, RejectReason, Rejection, find_string_stop, parse_assignment,
    validate_assignment,
};
use rayon::prelude::*;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};

/// The reader under a batch input: a file or stdin, buffered.
type Reader = BufReader<Box<dyn Read + Send>>;

/// Read buffer of the input (file or stdin).
const READ_BUFFER: usize = 256 * 1024;
/// At most this many items are parsed together (in parallel)...
const BATCH_ITEMS: usize = 1024;
/// ...and at most about this many bytes of them, so a batch of large
/// assignments stays small in memory.
const BATCH_BYTES: usize = 4 << 20;
/// Below this many items a batch is parsed on the reading thread: handing a
/// few lines to other threads costs more than it saves.
const PARALLEL_FROM: usize = 32;

/// One input item: its line and what intake made of it.
pub struct Item {
    /// 1-based line on which the item's JSON value starts.
    pub number: usize,
    /// The validated assignment or the rejection.
    pub parsed: Result<Assignment, Rejection>,
}

/// An input that cannot be read at all (exit code 2).
#[derive(Debug)]
pub struct InputError(pub String);

/// Iterator over the items of a batch input.
///
/// A streamed input is cut into values on the reading thread, then parsed and
/// validated in batches: every value already in the read buffer (up to
/// [`BATCH_ITEMS`] / [`BATCH_BYTES`]) is parsed in parallel with rayon and
/// handed out in input order, while the next buffered batch parses (at most
/// one ahead). A batch never waits for more input, so a slow pipe still gets
/// each line answered as it arrives.
pub struct Items {
    source: Source,
    rules: IntakeRules,
    parsed: VecDeque<Result<Item, InputError>>,
    /// The next batch, parsing on the pool while `parsed` is handed out.
    in_flight: Option<InFlight>,
}

/// A batch handed to the parse pool: its items, in input order, arrive on
/// `items`; `failed` (the read error that ended it) follows them.
struct InFlight {
    items: crossbeam_channel::Receiver<Vec<Item>>,
    failed: Option<InputError>,
}

enum Source {
    Stream(Box<Stream>),
    Array(std::vec::IntoIter<(usize, Checked)>),
}

/// Opens `FILE` or `-` and detects its shape from the first non-blank byte.
pub fn open(path: &str, rules: IntakeRules) -> Result<Items, InputError> {
    let inner: Box<dyn Read + Send> = if path == "-" {
        Box::new(io::stdin())
    } else {
        let f = File::open(path).map_err(|e| InputError(format!("cannot read {path}: {e}")))?;
        Box::new(f)
    };
    let mut reader: Reader = BufReader::with_capacity(READ_BUFFER, inner);
    // Skip leading whitespace, however the reads are chunked, to find the
    // shape; line numbers still count the newlines skipped.
    let mut skipped = 0;
    let first = loop {
        let buf = reader
            .fill_buf()
            .map_err(|e| InputError(format!("cannot read {path}: {e}")))?;
        if buf.is_empty() {
            break None;
        }
        let blank = buf
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(buf.len());
        let first = buf.get(blank).copied();
        skipped += buf[..blank].iter().filter(|b| **b == b'\n').count();
        reader.consume(blank);
        if first.is_some() {
            break first;
        }
    };
    if first == Some(b'[') {
        let mut text = Vec::new();
        reader
            .read_to_end(&mut text)
            .map_err(|e| InputError(format!("cannot read {path}: {e}")))?;
        let values: Vec<Checked> = serde_json::from_slice(&text).map_err(|e| {
            InputError(format!(
                "{path} starts with '[' but is not a JSON array: {e}"
            ))
        })?;
        let lines = element_lines(&text).into_iter().map(|n| n + skipped);
        let numbered: Vec<(usize, Checked)> = lines.zip(values).collect();
        return Ok(Items {
            source: Source::Array(numbered.into_iter()),
            rules,
            parsed: VecDeque::new(),
            in_flight: None,
        });
    }
    Ok(Items {
        source: Source::Stream(Box::new(Stream::new(reader, rules.max_body_bytes, skipped))),
        rules,
        parsed: VecDeque::new(),
        in_flight: None,
    })
}

impl Iterator for Items {
    type Item = Result<Item, InputError>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.source {
            Source::Array(values) => {
                let (number, checked) = values.next()?;
                // Duplicate keys inside an element reject that element only.
                let v = match checked.into_result() {
                    Ok(v) => v,
                    Err(e) => {
                        let r = Rejection::new(
                            RejectReason::InvalidJson,
                            format!("the assignment is not valid JSON: {e}"),
                        );
                        return Some(Ok(Item {
                            number,
                            parsed: Err(r),
                        }));
                    }
                };
                let size = v.to_string().len();
                let parsed = if size > self.rules.max_body_bytes {
                    Err(too_large(size, self.rules.max_body_bytes))
                } else {
                    validate_assignment(v, &self.rules)
                };
                Some(Ok(Item { number, parsed }))
            }
            Source::Stream(_) => loop {
                if let Some(item) = self.parsed.pop_front() {
                    return Some(item);
                }
                if let Some(batch) = self.in_flight.take() {
                    let failed = batch.failed.is_some();
                    match batch.items.recv() {
                        Ok(items) => self.parsed.extend(items.into_iter().map(Ok)),
                        Err(_) => {
                            let e = InputError("the input parser stopped unexpectedly".into());
                            return Some(Err(e));
                        }
                    }
                    self.parsed.extend(batch.failed.map(Err));
                    // While these items are handed out (and run), the next
                    // buffered batch parses: reading, parsing and submitting
                    // overlap instead of taking turns.
                    if !failed {
                        self.start_batch(false);
                    }
                    continue;
                }
                // Nothing parsed or parsing: wait for input.
                if !self.start_batch(true) {
                    return None;
                }
            },
        }
    }
}

impl Items {
    /// Cuts the next batch (every value already in the read buffer, up to
    /// [`BATCH_ITEMS`] / [`BATCH_BYTES`]; with `wait`, first waiting for
    /// one value) and starts parsing it: a big batch on the pool
    /// (`in_flight`), a small one here. `false` at the end of the input.
    /// Never waits for input once it has a value: a slow pipe still gets
    /// each line answered as it arrives.
    fn start_batch(&mut self, wait: bool) -> bool {
        let Source::Stream(stream) = &mut self.source else {
            return false;
        };
        let mut batch = Vec::new();
        let mut bytes = 0;
        // A read error ends the batch; it follows the items before it.
        let mut failed = None;
        if wait {
            match stream.next_value() {
                Some(Ok(raw)) => {
                    bytes += raw.bytes.len();
                    batch.push(raw);
                }
                Some(Err(e)) => failed = Some(e),
                None => return false,
            }
        }
        while failed.is_none() && batch.len() < BATCH_ITEMS && bytes < BATCH_BYTES {
            match stream.next_buffered_value() {
                Some(Ok(raw)) => {
                    bytes += raw.bytes.len();
                    batch.push(raw);
                }
                Some(Err(e)) => failed = Some(e),
                None => break,
            }
        }
        let rules = self.rules;
        match parse_pool() {
            Some(pool) if batch.len() >= PARALLEL_FROM => {
                // Bounded by one: at most one batch parses ahead.
                let (tx, rx) = crossbeam_channel::bounded(1);
                pool.spawn(move || {
                    // A panic (a bug) drops `tx` unsent: the reader then
                    // reports the input as unreadable instead of the pool
                    // aborting the process.
                    let parsed = std::panic::catch_unwind(|| {
                        batch
                            .into_par_iter()
                            .map(|raw| parse(raw, &rules))
                            .collect()
                    });
                    let Ok(items) = parsed else { return };
                    let _ = tx.send(items);
                });
                self.in_flight = Some(InFlight { items: rx, failed });
            }
            _ => {
                let items = batch.into_iter().map(|raw| parse(raw, &rules));
                self.parsed.extend(items.map(Ok));
                self.parsed.extend(failed.map(Err));
            }
        }
        true
    }
}

/// Parses and validates one raw value.
fn parse(raw: RawValue, rules: &IntakeRules) -> Item {
    Item {
        number: raw.line,
        parsed: match raw.oversized {
            Some(size) => Err(too_large(size, rules.max_body_bytes)),
            None => parse_assignment(&raw.bytes, rules),
        },
    }
}

/// Most threads that parse input, whatever the host's core count.
const MAX_PARSE_THREADS: usize = 4;

/// The threads that parse batches: a small pool of its own rather than
/// rayon's global one (a thread per core: 64 on a 64-core host). If its
/// threads cannot be started (pid or cgroup limits), batches are parsed on
/// the reading thread instead of failing.
fn parse_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads(cores.clamp(1, MAX_PARSE_THREADS))
            .thread_name(|i| format!("caf-parse-{i}"))
            .build()
            .map_err(|e| log::warn!(error = e.to_string(); "cannot start the input parsing threads; parsing on the reading thread"))
            .ok()
    })
    .as_ref()
}

fn too_large(size: usize, max: usize) -> Rejection {
    Rejection::new(
        RejectReason::PayloadTooLarge,
        format!("the assignment is {size} bytes, more than WORKER_MAX_BODY_BYTES ({max})"),
    )
}

/// The line each top-level element of a (valid) JSON array starts on.
fn element_lines(text: &[u8]) -> Vec<usize> {
    let mut lines = Vec::new();
    let (mut line, mut depth) = (1usize, 0usize);
    let (mut in_string, mut escaped, mut expecting) = (false, false, false);
    for &b in text {
        if b == b'\n' {
            line += 1;
        }
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if depth == 1 && expecting && !b.is_ascii_whitespace() && b != b']' {
            lines.push(line);
            expecting = false;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                expecting = depth == 1;
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => expecting = true,
            _ => {}
        }
    }
    lines
}

/// One value cut out of the stream.
struct RawValue {
    line: usize,
    bytes: Vec<u8>,
    /// Set (to the full size) when the value was larger than the body limit;
    /// only the first bytes are kept.
    oversized: Option<usize>,
}

/// Splits a byte stream into top-level JSON values, line by line.
struct Stream {
    reader: Reader,
    /// The line being scanned (reused).
    text: Vec<u8>,
    line: usize,
    max: usize,
    ready: VecDeque<RawValue>,
    /// The object being read: its start line, bytes, size, nesting, string state.
    open: Option<Open>,
    eof: bool,
}

/// The bytes [`Open::scan`] stops at outside strings: `"` and brackets
/// (inside one, [`find_string_stop`] finds `"` and `\`).
const OUTSIDE: [bool; 256] = byte_set(b"\"{}[]");

/// A lookup table (one load per byte, where a chain of comparisons took
/// several instructions).
const fn byte_set(members: &[u8]) -> [bool; 256] {
    let mut set = [false; 256];
    let mut i = 0;
    while i < members.len() {
        set[members[i] as usize] = true;
        i += 1;
    }
    set
}

struct Open {
    line: usize,
    bytes: Vec<u8>,
    size: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl Open {
    /// Counts `part` and keeps it, up to one byte past `max` in all (enough
    /// to tell the value is too large).
    fn take(&mut self, part: &[u8], max: usize) {
        self.size += part.len();
        let room = (max + 1).saturating_sub(self.bytes.len());
        self.bytes.extend_from_slice(&part[..part.len().min(room)]);
    }

    /// Follows the value through `text[i..]`: the index of the bracket
    /// that closes it, or `None` if it is still open at the end of `text`.
    /// Jumps from one byte that matters to the next (quotes and backslashes
    /// in a string, quotes and brackets outside), which is what keeps the
    /// reading thread ahead of the parsers.
    fn scan(&mut self, text: &[u8], mut i: usize) -> Option<usize> {
        while i < text.len() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    i += 1;
                    continue;
                }
                i += find_string_stop(&text[i..])?;
                match text[i] {
                    b'\\' => self.escaped = true,
                    b'"' => self.in_string = false,
                    // A control character: the parse refuses it later.
                    _ => {}
                }
            } else {
                i += text[i..].iter().position(|&b| OUTSIDE[usize::from(b)])?;
                match text[i] {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    _ => {
                        self.depth = self.depth.saturating_sub(1);
                        if self.depth == 0 {
                            return Some(i);
                        }
                    }
                }
            }
            i += 1;
        }
        None
    }

    fn finish(self, max: usize) -> RawValue {
        RawValue {
            line: self.line,
            oversized: (self.size > max).then_some(self.size),
            bytes: self.bytes,
        }
    }
}

impl Stream {
    /// `line`: lines already consumed before the reader's position.
    fn new(reader: Reader, max: usize, line: usize) -> Stream {
        Stream {
            reader,
            text: Vec::new(),
            line,
            max,
            ready: VecDeque::new(),
            open: None,
            eof: false,
        }
    }

    fn next_value(&mut self) -> Option<Result<RawValue, InputError>> {
        loop {
            if let Some(v) = self.ready.pop_front() {
                return Some(Ok(v));
            }
            if self.eof {
                // An object still open at the end is cut off: its parse error says so.
                return self.open.take().map(|o| Ok(o.finish(self.max)));
            }
            if let Err(e) = self.read_line() {
                return Some(Err(e));
            }
        }
    }

    /// The next value if it can be had without reading (it ends in a line
    /// already in the buffer); `None` when a read would be needed.
    fn next_buffered_value(&mut self) -> Option<Result<RawValue, InputError>> {
        loop {
            if let Some(v) = self.ready.pop_front() {
                return Some(Ok(v));
            }
            if self.eof || !self.reader.buffer().contains(&b'\n') {
                return None;
            }
            // A whole line is buffered: this read does not touch the input.
            if let Err(e) = self.read_line() {
                return Some(Err(e));
            }
        }
    }

    /// Reads and scans one line (at the end of input, sets `eof`).
    fn read_line(&mut self) -> Result<(), InputError> {
        let mut text = std::mem::take(&mut self.text);
        text.clear();
        let read = self.reader.read_until(b'\n', &mut text);
        let outcome = match read {
            Ok(0) => {
                self.eof = true;
                Ok(())
            }
            Ok(_) => {
                self.line += 1;
                self.scan_line(&text);
                Ok(())
            }
            Err(e) => Err(InputError(format!(
                "read error after line {}: {e}",
                self.line
            ))),
        };
        self.text = text;
        outcome
    }

    fn scan_line(&mut self, text: &[u8]) {
        // A line starting with `{` or `[` in column 0 while an object is open: the
        // open one was a cut-off JSON Lines line (pretty-printed objects
        // indent their inner lines). Report it and start afresh.
        if matches!(text.first(), Some(b'{' | b'[')) {
            if let Some(o) = self.open.take() {
                self.ready.push_back(o.finish(self.max));
            }
        }
        // Bytes of the open object on this line start here; they are copied
        // as one slice when the object closes or the line ends.
        let mut from = 0;
        let mut i = 0;
        while i < text.len() {
            let b = text[i];
            let Some(o) = self.open.as_mut() else {
                if b.is_ascii_whitespace() {
                    i += 1;
                    continue;
                }
                if b == b'{' || b == b'[' {
                    self.open = Some(Open {
                        line: self.line,
                        bytes: Vec::new(),
                        size: 0,
                        depth: 0,
                        in_string: false,
                        escaped: false,
                    });
                    from = i;
                    continue;
                }
                // Not an object: the rest of the line is one (bad) item.
                let rest = text[i..].trim_ascii();
                self.ready.push_back(RawValue {
                    line: self.line,
                    oversized: (rest.len() > self.max).then_some(rest.len()),
                    bytes: rest[..rest.len().min(self.max + 1)].to_vec(),
                });
                return;
            };
            match o.scan(text, i) {
                Some(end) => {
                    o.take(&text[from..=end], self.max);
                    if let Some(o) = self.open.take() {
                        self.ready.push_back(o.finish(self.max));
                    }
                    i = end + 1;
                }
                None => break,
            }
        }
        if let Some(o) = self.open.as_mut() {
            o.take(&text[from..], self.max);
        }
        // JSON strings cannot span lines: an open string here means a cut-off value.
        if self.open.as_ref().is_some_and(|o| o.in_string) {
            if let Some(o) = self.open.take() {
                self.ready.push_back(o.finish(self.max));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn items(text: &str) -> Vec<(usize, String)> {
        let cursor: Box<dyn Read + Send> = Box::new(io::Cursor::new(text.as_bytes().to_vec()));
        let mut s = Stream::new(BufReader::new(cursor), 1 << 20, 0);
        std::iter::from_fn(|| s.next_value())
            .map(|v| {
                let v = v.unwrap();
                (v.line, String::from_utf8(v.bytes).unwrap())
            })
            .collect()
    }

    #[test]
    fn json_lines_concatenated_and_pretty_objects() {
        assert_eq!(
            items("{\"a\":1}\n\n{\"b\":\"}\"}{\"c\":[1]}\n"),
            [
                (1, "{\"a\":1}".into()),
                (3, "{\"b\":\"}\"}".into()),
                (3, "{\"c\":[1]}".into())
            ]
        );
        let pretty = "{\n  \"a\": {\n    \"x\": 1\n  }\n}\n{\n  \"b\": 2\n}\n";
        let got = items(pretty);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [1, 6]);
        assert!(serde_json::from_str::<Value>(&got[0].1).is_ok());
        // Escaped quotes and backslashes inside strings, brackets in them.
        let escapes = r#"{"a":"x\"}]\\","b":["\\"]}{"c":"\\\"{"}"#;
        assert_eq!(
            items(escapes),
            [
                (1, r#"{"a":"x\"}]\\","b":["\\"]}"#.into()),
                (1, r#"{"c":"\\\"{"}"#.into())
            ]
        );
    }

    #[test]
    fn a_cut_off_line_does_not_swallow_the_next() {
        let got =
            items("{\"a\":1}\n{broken\n{\"b\":2}\n{\"s\":\"open\n{\"c\":3}\nnot json\n{x\n[1]\n");
        let lines: Vec<usize> = got.iter().map(|g| g.0).collect();
        assert_eq!(lines, [1, 2, 3, 4, 5, 6, 7, 8], "{got:?}");
        assert_eq!(got[5].1, "not json");
        assert_eq!(got[7].1, "[1]");
    }

    #[test]
    fn array_elements_are_numbered_by_their_start_line() {
        let text = b"[\n  {\"a\": \"[,]\"},\n  {\n    \"b\": [1, 2]\n  }, 3\n]";
        assert_eq!(element_lines(text), [2, 3, 5]);
        assert_eq!(element_lines(b"[]"), Vec::<usize>::new());
        assert_eq!(element_lines(b"[{},{}]"), [1, 1]);
    }
}
