//! `caf-worker validate FILE|-`: intake checks only, nothing executes.

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, input};
use crate::config::Settings;
use std::collections::HashMap;
use std::io::Write;

pub(super) fn intake_rules(s: &Settings) -> crate::contract::IntakeRules {
    crate::contract::IntakeRules {
        max_body_bytes: s.max_body_bytes,
        strict_ids: s.strict_ids,
        default_deadline_ms: s.default_deadline.as_millis() as u64,
    }
}

/// Prints `line N: ok <id>`, `line N: <reason>: <message>`,
/// `line N: invalid payload: <field>: <what>` or
/// `line N: duplicate assignment_id: …` per assignment.
pub fn validate(settings: &Settings, path: &str) -> i32 {
    let items = match input::open(path, intake_rules(settings)) {
        Ok(items) => items,
        Err(e) => {
            eprintln!("caf-worker: {}", e.0);
            return EXIT_USAGE;
        }
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let (mut ok, mut bad) = (0usize, 0usize);
    // First line of every id seen, to report repeats (bounded by the input).
    let mut seen: HashMap<String, usize> = HashMap::new();
    for item in items {
        let item = match item {
            Ok(i) => i,
            Err(e) => {
                eprintln!("caf-worker: {}", e.0);
                return EXIT_USAGE;
            }
        };
        let n = item.number;
        let line = match &item.parsed {
            Ok(a) => match (
                seen.get(&a.assignment_id),
                crate::blocks::check_payload(a.job_type, &a.payload),
            ) {
                (Some(first), _) => {
                    bad += 1;
                    format!(
                        "line {n}: duplicate assignment_id: {:?} is already on line {first}",
                        a.assignment_id
                    )
                }
                (None, Err(e)) => {
                    bad += 1;
                    seen.insert(a.assignment_id.clone(), n);
                    let (field, what) = payload_field(&e.message);
                    format!("line {n}: invalid payload: {field}: {what} ({})", e.code)
                }
                (None, Ok(())) => {
                    ok += 1;
                    seen.insert(a.assignment_id.clone(), n);
                    format!("line {n}: ok {}", a.assignment_id)
                }
            },
            Err(r) => {
                bad += 1;
                format!("line {n}: {}: {}", r.reason, r.message)
            }
        };
        if writeln!(out, "{line}").is_err() {
            break; // stdout closed (e.g. piped into `head`): stop quietly
        }
    }
    let _ = out.flush();
    log::info!(valid = ok, invalid = bad; "validated {} assignment(s)", ok + bad);
    if bad == 0 { EXIT_OK } else { EXIT_FAILED }
}

/// Splits a block's message (`payload.url is required`) into the field
/// (`url`) and what is wrong with it (`is required`). A message that does
/// not start with the field keeps its whole text.
fn payload_field(message: &str) -> (&str, &str) {
    let Some(at) = message.find("payload.") else {
        return ("payload", message);
    };
    let rest = &message[at + "payload.".len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    let field = &rest[..end];
    if at > 0 {
        return (field, message);
    }
    let what = rest[end..].trim_start_matches(':').trim_start();
    // "payload.content or payload.content_base64 is required" reads best whole.
    let whole = what.is_empty() || what.contains("payload.");
    (field, if whole { message } else { what })
}

#[cfg(test)]
mod tests {
    use super::payload_field;

    #[test]
    fn payload_messages_split_into_field_and_what() {
        assert_eq!(
            payload_field("payload.url is required"),
            ("url", "is required")
        );
        assert_eq!(
            payload_field("payload.headers: \"a b\" is not a valid header name"),
            ("headers", "\"a b\" is not a valid header name")
        );
        assert_eq!(
            payload_field("give payload.content or payload.content_base64, not both"),
            (
                "content",
                "give payload.content or payload.content_base64, not both"
            )
        );
        assert_eq!(payload_field("odd"), ("payload", "odd"));
        let both = "payload.content or payload.content_base64 is required";
        assert_eq!(payload_field(both), ("content", both));
    }
}
