//! Batch input for `run` and `validate`: a JSON array of assignments or JSON
//! Lines, from a file or stdin. JSON Lines is streamed (so `run` can apply
//! backpressure); an array is read whole.

use crate::contract::{
    Assignment, Checked, IntakeRules, RejectReason, Rejection, parse_assignment,
    validate_assignment,
};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};

/// One input item: its line (or array position) and what intake made of it.
pub struct Item {
    /// 1-based line number (JSON Lines) or element number (array).
    pub number: usize,
    /// The validated assignment or the rejection.
    pub parsed: Result<Assignment, Rejection>,
}

/// An input that cannot be read at all (exit code 2).
#[derive(Debug)]
pub struct InputError(pub String);

enum Source {
    Lines(Box<dyn BufRead>, usize),
    Array(std::vec::IntoIter<Checked>, usize),
}

/// Iterator over the items of a batch input.
pub struct Items {
    source: Source,
    rules: IntakeRules,
}

/// Opens `FILE` or `-` and detects its shape from the first non-blank byte.
pub fn open(path: &str, rules: IntakeRules) -> Result<Items, InputError> {
    let reader: Box<dyn BufRead> = if path == "-" {
        Box::new(BufReader::new(io::stdin()))
    } else {
        let f = File::open(path).map_err(|e| InputError(format!("cannot read {path}: {e}")))?;
        Box::new(BufReader::with_capacity(256 * 1024, f))
    };
    let mut reader = reader;
    // Skip leading whitespace, however the reads happen to be chunked, to find
    // the shape; line numbers still count the newlines skipped.
    let mut skipped_newlines = 0;
    let first = loop {
        let buf = reader
            .fill_buf()
            .map_err(|e| InputError(format!("cannot read {path}: {e}")))?;
        if buf.is_empty() {
            break None;
        }
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => {
                let first = buf[i];
                skipped_newlines += buf[..i].iter().filter(|b| **b == b'\n').count();
                reader.consume(i);
                break Some(first);
            }
            None => {
                let n = buf.len();
                skipped_newlines += buf.iter().filter(|b| **b == b'\n').count();
                reader.consume(n);
            }
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
        return Ok(Items {
            source: Source::Array(values.into_iter(), 0),
            rules,
        });
    }
    Ok(Items::lines(reader, skipped_newlines, rules))
}

impl Items {
    fn lines(reader: Box<dyn BufRead>, skipped: usize, rules: IntakeRules) -> Items {
        Items {
            source: Source::Lines(reader, skipped),
            rules,
        }
    }
}

impl Iterator for Items {
    type Item = Result<Item, InputError>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.source {
            Source::Array(values, n) => {
                let checked = values.next()?;
                *n += 1;
                let v = match checked.into_result() {
                    Ok(v) => v,
                    Err(e) => {
                        let r = Rejection::new(
                            RejectReason::InvalidJson,
                            format!("the assignment is not valid JSON: {e}"),
                        );
                        return Some(Ok(Item {
                            number: *n,
                            parsed: Err(r),
                        }));
                    }
                };
                let size = v.to_string().len();
                let parsed = if size > self.rules.max_body_bytes {
                    Err(Rejection::new(
                        RejectReason::PayloadTooLarge,
                        format!(
                            "the assignment is {size} bytes, more than WORKER_MAX_BODY_BYTES ({})",
                            self.rules.max_body_bytes
                        ),
                    ))
                } else {
                    validate_assignment(v, &self.rules)
                };
                Some(Ok(Item { number: *n, parsed }))
            }
            Source::Lines(reader, n) => loop {
                let mut line = Vec::new();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(e) => {
                        return Some(Err(InputError(format!("read error after line {n}: {e}"))));
                    }
                }
                *n += 1;
                let trimmed = line.trim_ascii();
                if trimmed.is_empty() {
                    continue;
                }
                let parsed = parse_assignment(trimmed, &self.rules);
                return Some(Ok(Item { number: *n, parsed }));
            },
        }
    }
}
