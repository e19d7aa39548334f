//! Typed access to payload fields with the §3.4 input error codes.

use super::BlockError;
use crate::contract::ErrorCode;
use serde_json::{Map, Value};

/// A required string field.
pub fn required_str<'a>(p: &'a Map<String, Value>, key: &str) -> Result<&'a str, BlockError> {
    match p.get(key) {
        None | Some(Value::Null) => Err(BlockError::input(
            ErrorCode::MissingRequiredField,
            format!("payload.{key} is required"),
        )),
        Some(v) => v.as_str().ok_or_else(|| wrong_type(key, "a string", v)),
    }
}

/// An optional string field.
pub fn optional_str<'a>(
    p: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, BlockError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| wrong_type(key, "a string", v)),
    }
}

/// An optional boolean field.
pub fn optional_bool(p: &Map<String, Value>, key: &str) -> Result<Option<bool>, BlockError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| wrong_type(key, "a boolean", v)),
    }
}

/// An optional non-negative integer field.
pub fn optional_u64(p: &Map<String, Value>, key: &str) -> Result<Option<u64>, BlockError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| wrong_type(key, "a non-negative integer", v)),
    }
}

/// `INVALID_FORMAT` for a field of the wrong type.
pub fn wrong_type(key: &str, expected: &str, got: &Value) -> BlockError {
    let kind = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    BlockError::input(
        ErrorCode::InvalidFormat,
        format!("payload.{key} must be {expected}, got {kind}"),
    )
}
