//! The fast path of assignment intake (SPEC §12.18).
//!
//! [`super::parse_assignment`] first reads the bytes straight into the
//! envelope's typed fields with a small lexer: keys are compared as they
//! stand in the input, the version is compared in place, the ids and the
//! job type are read without building a JSON tree around them. The
//! payload and the less common fields (`options`, `correlation`,
//! `executor`, unknown keys) are read by the same lexer straight into
//! [`Value`]s, refusing a duplicate key at any depth as the general path's
//! `Checked` parse does; only a number that is not a plain non-negative
//! integer is handed to serde_json on its own. The checks of those fields
//! are the general path's own functions.
//!
//! This path only ever accepts: any input it does not take as it is (a
//! missing or invalid field, a duplicate key at any depth, a value of an
//! unexpected type, deep nesting, not an object) makes it give up, and the
//! general path parses the bytes again and names the problem. So for every
//! input it accepts, the result equals the general path's; the tests hold
//! it to that.

use super::assignment::{self, Assignment, IntakeRules, JobType, MAX_ID_BYTES, Options};
use serde_json::map::Entry;
use serde_json::{Map, Value};
use std::borrow::Cow;

/// The assignment in `bytes`, or `None` if the general path must decide.
pub(super) fn parse(bytes: &[u8], rules: &IntakeRules) -> Option<Assignment> {
    // One UTF-8 check of the whole input (serde_json checks each string);
    // from here on every cut is at an ASCII byte, so on a char boundary.
    let text = std::str::from_utf8(bytes).ok()?;
    let mut lexer = Lexer { text, i: 0 };
    let envelope = lexer.envelope()?;
    lexer.skip_ws();
    if lexer.i != text.len() {
        return None;
    }
    envelope.into_assignment(rules)
}

/// The top-level object: the hot fields typed, everything else kept.
#[derive(Default)]
struct Envelope {
    version: bool,
    assignment_id: Option<String>,
    request_id: Option<String>,
    tenant_id: Option<String>,
    job: Option<Job>,
    /// Every other key (`options`, `correlation`, `executor`, …).
    rest: Map<String, Value>,
}

#[derive(Default)]
struct Job {
    job_type: Option<JobType>,
    /// `Some(None)`: `"payload": null`.
    payload: Option<Option<Map<String, Value>>>,
    /// Every other key of `job` (`resources`, `payload_ref`, …).
    rest: Map<String, Value>,
}

impl Envelope {
    fn into_assignment(self, rules: &IntakeRules) -> Option<Assignment> {
        let id = |s: Option<String>| s.filter(|s| !s.is_empty() && s.len() <= MAX_ID_BYTES);
        if !self.version {
            return None;
        }
        let assignment_id = id(self.assignment_id)?;
        let request_id = id(self.request_id)?;
        let tenant_id = id(self.tenant_id)?;
        let job = self.job?;
        let job_type = job.job_type?;
        let provider_id = assignment::provider_id(&self.rest).ok()?;
        assignment::no_payload_ref(&job.rest).ok()?;
        let pool = assignment::pool(job_type, &job.rest).ok()?;
        // Only top-level keys kept in `rest` can carry options or
        // correlation ids. With none (a minimal assignment) both are their
        // defaults, and their checks, each finding nothing, cost ~500
        // instructions.
        let (correlation, options) = if self.rest.is_empty() {
            (None, Options::default())
        } else {
            (
                assignment::correlation(&self.rest, rules.strict_ids)
                    .ok()?
                    .boxed(),
                assignment::options(&self.rest, rules).ok()?,
            )
        };
        Some(Assignment {
            assignment_id,
            request_id,
            tenant_id,
            provider_id,
            job_type,
            payload: job.payload.flatten().unwrap_or_default(),
            pool,
            deadline_ms: options.deadline_ms,
            attempt_timeout_ms: options.attempt_timeout_ms,
            retry: options.retry,
            correlation,
        })
    }
}

/// Sets `slot` once; a second value for it is a duplicate key (give up).
fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    match slot {
        Some(_) => None,
        None => {
            *slot = Some(value);
            Some(())
        }
    }
}

/// A field's value nested deeper than this gives up: with the two levels
/// around it, well inside serde_json's own limit of 128, which the general
/// path applies to the whole input while the lexer here counts within one
/// value of it.
const MAX_DEPTH: usize = 64;

/// Reads JSON text left to right; every method returns `None` to give up.
struct Lexer<'a> {
    text: &'a str,
    /// The next byte to read.
    i: usize,
}

impl<'a> Lexer<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// JSON's whitespace: space, tab, newline, carriage return.
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes().get(self.i) {
            self.i += 1;
        }
    }

    /// Skips whitespace, then `c` if it is next. (Compact input has no
    /// whitespace: the byte is looked at before the whitespace loop.)
    fn eat(&mut self, c: u8) -> Option<()> {
        if self.bytes().get(self.i) != Some(&c) {
            self.skip_ws();
            if self.bytes().get(self.i) != Some(&c) {
                return None;
            }
        }
        self.i += 1;
        Some(())
    }

    /// A string (after whitespace): borrowed as it stands when it has no
    /// escapes, which is the common case; else decoded by serde_json.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        self.eat(b'"')?;
        let start = self.i - 1;
        let body = self.i;
        let len = super::scan::find_string_stop(&self.bytes()[body..])?;
        if self.bytes()[body + len] == b'"' {
            self.i = body + len + 1;
            return Some(Cow::Borrowed(&self.text[body..body + len]));
        }
        self.i = start;
        let quoted = self.value_text()?;
        serde_json::from_str::<String>(quoted).ok().map(Cow::Owned)
    }

    /// Moves past the string that starts at `i` (a `"`), escapes and all.
    fn skip_string(&mut self) -> Option<()> {
        let b = self.bytes();
        let mut i = self.i + 1;
        loop {
            i += super::scan::find_string_stop(b.get(i..)?)?;
            match b[i] {
                b'"' => {
                    self.i = i + 1;
                    return Some(());
                }
                b'\\' => i += 2,
                // A control character: left for the full parse to refuse.
                _ => i += 1,
            }
        }
    }

    /// The text of the string or scalar that starts here (after
    /// whitespace), for serde_json to read on its own: a string is followed
    /// to its closing quote, anything else ends at the next delimiter.
    /// Objects and arrays never come here ([`Lexer::value`] reads them);
    /// invalid text is left for serde_json to refuse.
    fn value_text(&mut self) -> Option<&'a str> {
        self.skip_ws();
        let start = self.i;
        if self.bytes().get(self.i) == Some(&b'"') {
            self.skip_string()?;
        } else {
            while let Some(c) = self.bytes().get(self.i) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                self.i += 1;
            }
        }
        (self.i > start).then(|| &self.text[start..self.i])
    }

    /// The next value (after whitespace), built as serde_json builds it and
    /// refusing duplicate keys: objects, arrays, strings, literals and plain
    /// non-negative integers are read here, straight into the [`Value`];
    /// any other number (a sign, a fraction, an exponent, 20 digits or
    /// more) is handed to serde_json on its own. `depth` counts the brackets
    /// around this value within the field.
    fn value(&mut self, depth: usize) -> Option<Value> {
        self.skip_ws();
        match *self.bytes().get(self.i)? {
            b'{' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                let mut map = Map::new();
                self.object(|lx, key| {
                    let value = lx.value(depth + 1)?;
                    match map.entry(key.into_owned()) {
                        Entry::Vacant(slot) => {
                            slot.insert(value);
                            Some(())
                        }
                        Entry::Occupied(_) => None, // a duplicate key
                    }
                })?;
                Some(Value::Object(map))
            }
            b'[' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.i += 1;
                let mut items = Vec::new();
                if self.eat(b']').is_none() {
                    loop {
                        items.push(self.value(depth + 1)?);
                        if self.eat(b',').is_none() {
                            self.eat(b']')?;
                            break;
                        }
                    }
                }
                Some(Value::Array(items))
            }
            b'"' => Some(Value::String(self.string()?.into_owned())),
            b't' => self.literal("true", Value::Bool(true)),
            b'f' => self.literal("false", Value::Bool(false)),
            b'n' => self.literal("null", Value::Null),
            b'0'..=b'9' => self.integer(),
            _ => serde_json::from_str(self.value_text()?).ok(),
        }
    }

    /// `word` if it is next; what follows it is the caller's to check.
    fn literal(&mut self, word: &str, value: Value) -> Option<Value> {
        self.bytes()[self.i..]
            .starts_with(word.as_bytes())
            .then(|| {
                self.i += word.len();
                value
            })
    }

    /// A non-negative integer of at most 19 digits (it fits a `u64`), as
    /// serde_json makes it; anything longer or with a fraction or exponent
    /// goes to serde_json, which also refuses a leading zero.
    fn integer(&mut self) -> Option<Value> {
        let rest = &self.bytes()[self.i..];
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let plain = digits <= 19
            && (digits == 1 || rest[0] != b'0')
            && !matches!(rest.get(digits), Some(b'.' | b'e' | b'E'));
        if !plain {
            return serde_json::from_str(self.value_text()?).ok();
        }
        let n = rest[..digits]
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        self.i += digits;
        Some(Value::Number(n.into()))
    }

    /// Keeps a key the typed path does not read.
    fn keep(&mut self, rest: &mut Map<String, Value>, key: Cow<'a, str>) -> Option<()> {
        let value = self.value(0)?;
        if rest.contains_key(&*key) {
            return None;
        }
        rest.insert(key.into_owned(), value);
        Some(())
    }

    /// Calls `field` for each key of the object that starts here, with the
    /// lexer on its value; checks the commas and the closing brace.
    fn object(
        &mut self,
        mut field: impl FnMut(&mut Self, Cow<'a, str>) -> Option<()>,
    ) -> Option<()> {
        self.eat(b'{')?;
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.eat(b':')?;
            field(self, key)?;
            if self.eat(b',').is_none() {
                return self.eat(b'}');
            }
        }
    }

    fn envelope(&mut self) -> Option<Envelope> {
        let mut env = Envelope::default();
        self.object(|lx, key| match &*key {
            "version" => {
                let one = lx.string()? == "1";
                (one && !std::mem::replace(&mut env.version, true)).then_some(())
            }
            "assignment_id" => once(&mut env.assignment_id, lx.string()?.into_owned()),
            "request_id" => once(&mut env.request_id, lx.string()?.into_owned()),
            "tenant_id" => once(&mut env.tenant_id, lx.string()?.into_owned()),
            "job" => {
                let job = lx.job()?;
                once(&mut env.job, job)
            }
            _ => lx.keep(&mut env.rest, key),
        })?;
        Some(env)
    }

    fn job(&mut self) -> Option<Job> {
        let mut job = Job::default();
        self.object(|lx, key| match &*key {
            "type" => {
                let t = JobType::parse(&lx.string()?)?;
                once(&mut job.job_type, t)
            }
            "payload" => {
                let payload = match lx.value(0)? {
                    Value::Object(p) => Some(p),
                    Value::Null => None,
                    _ => return None,
                };
                once(&mut job.payload, payload)
            }
            _ => lx.keep(&mut job.rest, key),
        })?;
        Some(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::assignment::parse_general;
    use crate::contract::parse_assignment;

    fn rules(strict_ids: bool) -> IntakeRules {
        IntakeRules {
            max_body_bytes: 1 << 20,
            strict_ids,
            default_deadline_ms: 30_000,
        }
    }

    /// Intake says of `text` what the general path alone says, and the fast
    /// path either agrees or leaves it; returns whether the fast path took it
    /// with strict ids (as the vectors expect).
    fn agrees(text: &str) -> bool {
        let mut accepted = false;
        for strict in [false, true] {
            let rules = rules(strict);
            let general = format!("{:?}", parse_general(text.as_bytes(), &rules));
            let whole = format!("{:?}", parse_assignment(text.as_bytes(), &rules));
            assert_eq!(whole, general, "{text}");
            if let Some(fast) = parse(text.as_bytes(), &rules) {
                accepted = strict;
                assert_eq!(format!("Ok({fast:?})"), general, "{text}");
            }
        }
        accepted
    }

    const BASE: &str = r#""version":"1","assignment_id":"a-1","request_id":"r-1","tenant_id":"t""#;

    #[test]
    fn valid_vectors_take_the_fast_path_with_the_same_result() {
        let valid = include_str!("../../tests/vectors/assignments_valid.jsonl");
        for line in valid.lines().filter(|l| !l.trim().is_empty()) {
            assert!(agrees(line), "valid vector left the fast path: {line}");
        }
    }

    #[test]
    fn invalid_vectors_are_left_to_the_general_path() {
        let invalid = include_str!("../../tests/vectors/assignments_invalid.jsonl");
        for line in invalid.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).expect("vector line is JSON");
            let text = match (&v["raw"], &v["assignment"]) {
                (Value::String(raw), _) => raw.clone(),
                (_, a) => a.to_string(),
            };
            let expect_valid = v["expect_reason"].is_null();
            assert_eq!(agrees(&text), expect_valid, "{text}");
        }
    }

    #[test]
    fn payload_values_are_read_as_serde_json_reads_them() {
        // Every kind of value, inside the payload and in a kept field: the
        // fast path takes it exactly when the duplicate-refusing parse
        // does, with the same value (`agrees` compares them).
        let values = [
            "0",
            "7",
            "42",
            "1234567890123456789",
            "9999999999999999999",
            "18446744073709551615",
            "18446744073709551616",
            "123456789012345678901234",
            "-0",
            "-1",
            "-9223372036854775808",
            "-9223372036854775809",
            "1.0",
            "0.5",
            "1e2",
            "1E-2",
            "2.5e+3",
            "true",
            "false",
            "null",
            "\"\"",
            "\"a\\u0000b\"",
            "\"\\ud83d\\ude00\"",
            "[]",
            "[ ]",
            "[1, [2, [3]], {}]",
            "{\"\\u0061\":1,\"b\":[{\"a\":2}]}",
            "[true,false,null,\"x\",-1.5]",
            "{ \"k\" : { \"k\" : { } } }",
            // Refused by both.
            "01",
            "00",
            "-",
            "1.",
            ".5",
            "+1",
            "1e",
            "nul",
            "truex",
            "[1,]",
            "[,1]",
            "{,}",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{\"a\":1,\"a\":1}",
            "[{\"b\":{},\"b\":{}}]",
            "\"x",
            "[1 2]",
            "{\"a\"}",
            "NaN",
            "Infinity",
            "0x10",
        ];
        for v in values {
            let whole = crate::contract::json::from_slice_unique(v.as_bytes());
            for text in [
                format!(r#"{{{BASE},"job":{{"type":"debug.echo","payload":{{"v":{v}}}}}}}"#),
                format!(r#"{{{BASE},"job":{{"type":"debug.echo","x":{v}}}}}"#),
                format!(r#"{{{BASE},"job":{{"type":"debug.echo"}},"x":{v}}}"#),
            ] {
                let taken = parse(text.as_bytes(), &rules(true)).is_some();
                assert_eq!(taken, whole.is_ok(), "{text}");
                agrees(&text);
            }
        }
    }

    #[test]
    fn boundaries_agree() {
        let nest = |n: usize| "[".repeat(n) + &"]".repeat(n);
        let texts = [
            // 64 brackets in a field are read here, 65 are left (the
            // payload's own brace is one of them).
            format!(
                r#"{{{BASE},"job":{{"type":"debug.echo","payload":{{"d":{}}}}}}}"#,
                nest(63)
            ),
            format!(
                r#"{{{BASE},"job":{{"type":"debug.echo","payload":{{"d":{}}}}}}}"#,
                nest(64)
            ),
            format!(
                r#"{{{BASE},"job":{{"type":"debug.echo"}},"x":{}}}"#,
                nest(64)
            ),
            format!(
                r#"{{{BASE},"job":{{"type":"debug.echo"}},"x":{}}}"#,
                nest(65)
            ),
            // Numbers the options check reads (19 digits here, 20 by serde_json).
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}},"options":{{"deadline_ms":-0}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}},"options":{{"deadline_ms":1E+2}}}}"#),
            format!(
                r#"{{{BASE},"job":{{"type":"debug.echo"}},"options":{{"priority":1000000000000000000}}}}"#
            ),
            format!(
                r#"{{{BASE},"job":{{"type":"debug.echo"}},"options":{{"priority":10000000000000000000}}}}"#
            ),
            // Whitespace after a literal or an integer, and form feed (not JSON whitespace).
            format!(
                r#"{{{BASE},"job":{{"type":"debug.echo","payload":{{"a":[true{}}}}}}}"#,
                "\t,1\r\n],\"b\":null \n"
            ),
            format!(
                r#"{{{BASE},"job":{{"type":"debug.echo","payload":{{"a":1{}}}}}}}"#,
                "\x0c"
            ),
            // A typed key and its escaped spelling.
            format!(
                r#"{{{BASE},"job":{{"type":"debug.echo","payload":{{}},"p\u0061yload":{{}}}}}}"#
            ),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo","typ\u0065":"debug.echo"}}}}"#),
        ];
        let taken: Vec<bool> = texts.iter().map(|t| agrees(t)).collect();
        assert_eq!(
            taken,
            [
                true, false, true, false, false, false, true, true, true, false, false, false
            ],
            "{texts:#?}"
        );
    }

    #[test]
    fn mutated_inputs_agree_with_the_general_path() {
        // Deterministic mutations (insert, delete, replace with bytes that
        // matter to JSON) of accepted inputs: wherever the fast path takes
        // one, `agrees` checks the general path takes it the same way.
        let seeds = [
            format!(
                r#"{{{BASE},"job":{{"type":"debug.echo","payload":{{"n":12,"s":"a\"b","l":[1,-2.5e3,true,null,{{}}],"o":{{"k":[]}}}}}}}}"#
            ),
            format!(
                r#"{{{BASE},"job":{{"type":"http.request","resources":{{"class":"io"}}}},"options":{{"deadline_ms":500,"retry":{{"max_attempts":2}}}},"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}}"#
            ),
        ];
        let alphabet = b"{}[]\",:0123456789-+.eEtrufalsn \t\r\n\x0c\\ua";
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let mut taken = 0;
        for round in 0..20_000 {
            let mut bytes = seeds[round % seeds.len()].as_bytes().to_vec();
            for _ in 0..1 + next(3) {
                let at = next(bytes.len());
                let b = alphabet[next(alphabet.len())];
                match next(3) {
                    0 => bytes.insert(at, b),
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes[at] = b,
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            taken += usize::from(agrees(&text));
        }
        // Some mutants are still valid (a digit for a digit, a space added).
        assert!(taken > 100, "only {taken} mutants were taken");
    }

    #[test]
    fn every_field_form_agrees() {
        let accepted = [
            format!(
                r#"{{{BASE},"job":{{"type":"debug.echo","payload":{{"n":1,"s":"\u00e9\n"}}}}}}"#
            ),
            format!(r#"{{"job":{{"payload":null,"type":"debug.sleep"}},{BASE}}}"#),
            format!(
                r#"{{{BASE},"job":{{"type":"http.request","resources":{{"class":"GPU"}},"payload_ref":null,"x":[1,{{}}]}}}}"#
            ),
            format!(
                r#"{{{BASE},"job":{{"type":"debug.echo"}},"executor":{{"provider_id":"p"}},"options":{{"deadline_ms":500,"attempt_timeout_ms":100,"priority":3,"retry":{{"max_attempts":3,"backoff_ms":10,"max_backoff_ms":20}}}}}}"#
            ),
            format!(
                r#"{{{BASE},"job":{{"type":"debug.echo"}},"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","correlation":{{"run_id":"0b9e6a3c-1f7d-4c2e-9a41-5d2f8c7e6b10","flow_id":"6f1d2c3b-8a9e-4f7d-b2c1-0e9d8c7b6a54","step_id":"01ARZ3NDEKTSV4RRFFQ69G5FAV"}},"extra":{{"a":[{{"b":1}}]}}}}"#
            ),
            r#"{"version":"1","assignment_id":"\u0061-1","request_id":"r","tenant_id":"t","job":{"type":"debug.echo"},"options":null,"correlation":null,"executor":null}"#.to_owned(),
            // Whitespace everywhere JSON allows it, escapes in keys and
            // values, and brackets, quotes and numbers inside the payload.
            format!(
                " \r\n{{ {} ,\t\"job\" :\n{{ \"payload\" : {{ \"s\" : \"}}]\\\"\\\\\" , \"a\":[ 1.5e3 ,-0, {{}} ,[] ,true,null] }} , \"type\":\"debug.echo\" }} }}\n ",
                BASE.replace(',', " , ")
            ),
            r#"{"ver\u0073ion":"\u0031","assignment_id":"a\"b","request_id":"r","tenant_id":"t","job":{"t\u0079pe":"debug.\u0065cho","payload":{}}}"#.to_owned(),
            format!(
                r#"{{{BASE},"job":{{"type":"debug.echo","payload":{{"d":{}}}}}}}"#,
                "[".repeat(60) + &"]".repeat(60)
            ),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}},"x":"é ü 日本","y":{{"z":"\ud83d\ude00"}}}}"#),
        ];
        for text in &accepted {
            assert!(agrees(text), "left the fast path: {text}");
        }
        let left = [
            "{not json".to_owned(),
            "[1]".to_owned(),
            "\"x\"".to_owned(),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}},"version":"1"}}"#),
            format!(r#"{{{BASE},"assignment_id":"b","job":{{"type":"debug.echo"}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo","type":"debug.echo"}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo","payload":{{}},"payload":{{}}}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo","payload":{{"k":1,"k":2}}}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo","x":{{"k":1,"k":2}}}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}},"o":1,"o":2}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}},"o":{{"k":[{{"z":1,"z":1}}]}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo","payload":[1]}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"nope"}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":7}}}}"#),
            format!(r#"{{{BASE},"job":{{"payload":{{}}}}}}"#),
            format!(r#"{{{BASE},"job":[]}}"#),
            format!(r#"{{{BASE}}}"#),
            r#"{"version":1,"assignment_id":"a","request_id":"r","tenant_id":"t","job":{"type":"debug.echo"}}"#.to_owned(),
            r#"{"version":"2","assignment_id":"a","request_id":"r","tenant_id":"t","job":{"type":"debug.echo"}}"#.to_owned(),
            r#"{"assignment_id":"a","request_id":"r","tenant_id":"t","job":{"type":"debug.echo"}}"#.to_owned(),
            r#"{"version":"1","assignment_id":"","request_id":"r","tenant_id":"t","job":{"type":"debug.echo"}}"#.to_owned(),
            format!(r#"{{"version":"1","assignment_id":"{}","request_id":"r","tenant_id":"t","job":{{"type":"debug.echo"}}}}"#, "a".repeat(257)),
            r#"{"version":"1","assignment_id":"a","request_id":["r"],"tenant_id":"t","job":{"type":"debug.echo"}}"#.to_owned(),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo","payload_ref":"s3://x"}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo","resources":{{"class":"tpu"}}}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}},"executor":{{"provider_id":""}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}},"options":{{"deadline_ms":0}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}},"options":{{"retry":{{"max_attempts":11}}}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}},"run_id":"0b9e6a3c-1f7d-4c2e-9a41-5d2f8c7e6b10"}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}},"trace_id":"not-hex"}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}}}} x"#),
            // Trailing commas, missing colons, control characters, bad
            // literals and numbers, unclosed values, nesting past the limit.
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}},}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo",}}}}"#),
            format!(r#"{{{BASE},"job" {{"type":"debug.echo"}}}}"#),
            format!("{{{BASE},\"job\":{{\"type\":\"debug.echo\",\"payload\":{{\"s\":\"a\tb\"}}}}}}"),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo","payload":{{"t":tru}}}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo","payload":{{"n":01}}}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo","payload":{{"n":1 2}}}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo","payload":{{"a":[1,2}}}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo","payload":{{"s":"x}}}}}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}},"x":1"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}},"x":{}}}"#, "[".repeat(130) + &"]".repeat(130)),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}},"x":{}}}"#, "[".repeat(70) + &"]".repeat(70)),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}}}}{{}}"#),
            format!(r#"{{{BASE},"job":{{"type":"debug.echo"}},"version":"\u0031"}}"#),
            r#"{"version":"1 ","assignment_id":"a","request_id":"r","tenant_id":"t","job":{"type":"debug.echo"}}"#.to_owned(),
        ];
        for text in &left {
            assert!(!agrees(text), "the fast path accepted: {text}");
        }
    }
}
