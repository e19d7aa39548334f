//! The fast path of assignment intake (SPEC §12.18).
//!
//! [`super::parse_assignment`] first reads the bytes straight into the
//! envelope's typed fields: the version is compared in place, the ids and
//! the job type are read without building a JSON tree around them, and only
//! the payload and the less common fields (`options`, `correlation`,
//! `executor`, unknown keys) become [`Value`]s, through the same
//! duplicate-refusing [`Checked`] parse as the general path. The checks of
//! those fields are the general path's own functions.
//!
//! This path only ever accepts: any input it does not take as it is (a
//! missing or invalid field, a duplicate key at any depth, a value of an
//! unexpected type, not an object) makes it give up, and the general path
//! parses the bytes again and names the problem. So for every input it
//! accepts, the result equals the general path's; the tests hold it to that.

use super::assignment::{self, Assignment, IntakeRules, JobType, MAX_ID_BYTES};
use super::json::Checked;
use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

/// The assignment in `bytes`, or `None` if the general path must decide.
pub(super) fn parse(bytes: &[u8], rules: &IntakeRules) -> Option<Assignment> {
    serde_json::from_slice::<Envelope>(bytes)
        .ok()?
        .into_assignment(rules)
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
    payload: Option<Map<String, Value>>,
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
        let correlation = assignment::correlation(&self.rest, rules.strict_ids).ok()?;
        let options = assignment::options(&self.rest, rules).ok()?;
        Some(Assignment {
            assignment_id,
            request_id,
            tenant_id,
            provider_id,
            job_type,
            payload: job.payload.unwrap_or_default(),
            pool,
            deadline_ms: options.deadline_ms,
            attempt_timeout_ms: options.attempt_timeout_ms,
            retry: options.retry,
            correlation,
        })
    }
}

/// Gives up on the fast path (the message is never shown).
fn give_up<E: de::Error>() -> E {
    E::custom("not on the fast path")
}

/// Sets `slot` once; a second value for it is a duplicate key.
fn once<T, E: de::Error>(slot: &mut Option<T>, value: T) -> Result<(), E> {
    match slot {
        Some(_) => Err(give_up()),
        None => {
            *slot = Some(value);
            Ok(())
        }
    }
}

/// Keeps a key the typed path does not read, refusing duplicates at any depth.
fn keep<'de, A: MapAccess<'de>>(
    rest: &mut Map<String, Value>,
    key: String,
    map: &mut A,
) -> Result<(), A::Error> {
    let c: Checked = map.next_value()?;
    if c.duplicate.is_some() || rest.contains_key(&key) {
        return Err(give_up());
    }
    rest.insert(key, c.value);
    Ok(())
}

/// A key of the top-level object.
enum TopKey {
    Version,
    AssignmentId,
    RequestId,
    TenantId,
    Job,
    Other(String),
}

/// A key of `job`.
enum JobKey {
    Type,
    Payload,
    Other(String),
}

/// Reads a key (or a string value) through `f` without allocating when
/// serde_json can lend the text.
struct StrVisitor<F>(F);

impl<'de, T, F: FnOnce(&str) -> Option<T>> Visitor<'de> for StrVisitor<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(v).ok_or_else(give_up)
    }
}

impl<'de> Deserialize<'de> for TopKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TopKey, D::Error> {
        d.deserialize_str(StrVisitor(|k: &str| {
            Some(match k {
                "version" => TopKey::Version,
                "assignment_id" => TopKey::AssignmentId,
                "request_id" => TopKey::RequestId,
                "tenant_id" => TopKey::TenantId,
                "job" => TopKey::Job,
                other => TopKey::Other(other.to_owned()),
            })
        }))
    }
}

impl<'de> Deserialize<'de> for JobKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<JobKey, D::Error> {
        d.deserialize_str(StrVisitor(|k: &str| {
            Some(match k {
                "type" => JobKey::Type,
                "payload" => JobKey::Payload,
                other => JobKey::Other(other.to_owned()),
            })
        }))
    }
}

/// `"version": "1"`, compared without a copy.
struct VersionOne;

impl<'de> Deserialize<'de> for VersionOne {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<VersionOne, D::Error> {
        d.deserialize_str(StrVisitor(|v: &str| (v == "1").then_some(VersionOne)))
    }
}

/// A known `job.type`.
struct KnownJobType(JobType);

impl<'de> Deserialize<'de> for KnownJobType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<KnownJobType, D::Error> {
        d.deserialize_str(StrVisitor(|v: &str| JobType::parse(v).map(KnownJobType)))
    }
}

/// Visits the top-level object (anything else gives up).
struct EnvelopeVisitor;

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Envelope;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an assignment object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
        let mut env = Envelope::default();
        let mut version = None;
        while let Some(key) = map.next_key::<TopKey>()? {
            match key {
                TopKey::Version => once(&mut version, map.next_value::<VersionOne>()?)?,
                TopKey::AssignmentId => once(&mut env.assignment_id, map.next_value()?)?,
                TopKey::RequestId => once(&mut env.request_id, map.next_value()?)?,
                TopKey::TenantId => once(&mut env.tenant_id, map.next_value()?)?,
                TopKey::Job => once(&mut env.job, map.next_value()?)?,
                TopKey::Other(k) => keep(&mut env.rest, k, &mut map)?,
            }
        }
        env.version = version.is_some();
        Ok(env)
    }
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Envelope, D::Error> {
        d.deserialize_map(EnvelopeVisitor)
    }
}

/// Visits `job` (anything but an object gives up).
struct JobVisitor;

impl<'de> Visitor<'de> for JobVisitor {
    type Value = Job;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a job object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Job, A::Error> {
        let mut job = Job::default();
        let mut payload_seen = false;
        while let Some(key) = map.next_key::<JobKey>()? {
            match key {
                JobKey::Type => {
                    let KnownJobType(t) = map.next_value()?;
                    once(&mut job.job_type, t)?;
                }
                JobKey::Payload => {
                    if std::mem::replace(&mut payload_seen, true) {
                        return Err(give_up());
                    }
                    let c: Checked = map.next_value()?;
                    job.payload = match c {
                        Checked {
                            duplicate: None,
                            value: Value::Object(p),
                        } => Some(p),
                        Checked {
                            duplicate: None,
                            value: Value::Null,
                        } => None,
                        _ => return Err(give_up()),
                    };
                }
                JobKey::Other(k) => keep(&mut job.rest, k, &mut map)?,
            }
        }
        Ok(job)
    }
}

impl<'de> Deserialize<'de> for Job {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Job, D::Error> {
        d.deserialize_map(JobVisitor)
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
        ];
        for text in &left {
            assert!(!agrees(text), "the fast path accepted: {text}");
        }
    }
}
