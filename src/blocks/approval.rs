//! `human.approval` (SPEC §14.2): payload validation. The step itself never
//! runs on a pool thread: the engine parks it until a decision or its
//! timeout. Only a step that cannot park reaches [`refuse`]: a bad payload,
//! or `run`, which has no channel for decisions.

use super::BlockError;
use super::payload::{optional_str, optional_u64, required_str, wrong_type};
use crate::contract::ErrorCode;
use serde_json::{Map, Value};
use std::time::Duration;

/// Most approvers one step may name.
pub const MAX_APPROVERS: usize = 100;
/// Longest approver name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// What the engine needs to park an approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRequest {
    /// Who may decide; empty = anyone.
    pub approvers: Vec<String>,
    /// `timeout_ms`, if given (the engine caps it at the step deadline).
    pub timeout: Option<Duration>,
}

/// Validates the payload: `title` required, `description` a string,
/// `approvers` a list of names, `timeout_ms` ≥ 1.
pub fn parse(p: &Map<String, Value>) -> Result<ApprovalRequest, BlockError> {
    if required_str(p, "title")?.trim().is_empty() {
        return Err(BlockError::input(
            ErrorCode::InvalidInput,
            "payload.title must not be empty",
        ));
    }
    optional_str(p, "description")?;
    let approvers = match p.get("approvers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => {
            if list.len() > MAX_APPROVERS {
                return Err(BlockError::input(
                    ErrorCode::InvalidInput,
                    format!("payload.approvers may name at most {MAX_APPROVERS} approvers"),
                ));
            }
            let mut names = Vec::with_capacity(list.len());
            for v in list {
                match v.as_str() {
                    Some(n) if !n.is_empty() && n.len() <= MAX_NAME_BYTES => {
                        names.push(n.to_owned());
                    }
                    _ => {
                        return Err(BlockError::input(
                            ErrorCode::InvalidInput,
                            format!(
                                "payload.approvers must hold names of 1..={MAX_NAME_BYTES} bytes"
                            ),
                        ));
                    }
                }
            }
            names
        }
        Some(other) => return Err(wrong_type("approvers", "a list of names", other)),
    };
    let timeout = match optional_u64(p, "timeout_ms")? {
        Some(0) => {
            return Err(BlockError::input(
                ErrorCode::InvalidInput,
                "payload.timeout_ms must be at least 1",
            ));
        }
        t => t.map(Duration::from_millis),
    };
    Ok(ApprovalRequest { approvers, timeout })
}

/// The answer for an approval that reached a pool thread: its payload error,
/// or (a valid payload) that this mode has no decision channel.
pub fn refuse(p: &Map<String, Value>) -> Result<Value, BlockError> {
    parse(p)?;
    Err(BlockError::input(
        ErrorCode::InvalidInput,
        "human.approval needs `caf-worker serve`: `run` has no channel for decisions",
    ))
}
