//! `caf-worker validate FILE|-`: intake checks only, nothing executes.

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, input};
use crate::config::Settings;
use std::io::Write;

pub(super) fn intake_rules(s: &Settings) -> crate::contract::IntakeRules {
    crate::contract::IntakeRules {
        max_body_bytes: s.max_body_bytes,
        strict_ids: s.strict_ids,
        default_deadline_ms: s.default_deadline.as_millis() as u64,
    }
}

/// Prints `line N: ok <id>` or `line N: <reason>: <message>` per assignment.
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
    for item in items {
        let item = match item {
            Ok(i) => i,
            Err(e) => {
                eprintln!("caf-worker: {}", e.0);
                return EXIT_USAGE;
            }
        };
        let line = match &item.parsed {
            Ok(a) => {
                ok += 1;
                format!("line {}: ok {}", item.number, a.assignment_id)
            }
            Err(r) => {
                bad += 1;
                format!("line {}: {}: {}", item.number, r.reason, r.message)
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
