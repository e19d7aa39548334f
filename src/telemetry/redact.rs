//! Redaction of secret-named keys (SPEC §10), at any depth of a JSON value.

pub use crate::contract::is_secret_key;
use serde_json::Value;

/// The replacement text.
pub const REDACTED: &str = "[REDACTED]";

/// Returns `value` with every secret-named key's value replaced by `"[REDACTED]"`.
pub fn redact(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let v = if is_secret_key(&k) {
                        Value::String(REDACTED.into())
                    } else {
                        redact(v)
                    };
                    (k, v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(redact).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_match_whole_or_by_part() {
        for k in [
            "password",
            "PASSWORD",
            "db.password",
            "x-api-key",
            "api_key",
            "user_email",
            "Set-Cookie",
            "Authorization",
            "refresh_token",
            "ssn",
            "my-private_key",
        ] {
            assert!(is_secret_key(k), "{k}");
        }
        for k in [
            "tokenizer",
            "passwords_count",
            "emailer",
            "keyboard",
            "phones",
            "path",
        ] {
            assert!(!is_secret_key(k), "{k}");
        }
    }

    #[test]
    fn redacts_at_any_depth() {
        let v = json!({"a": {"b": [{"token": "t", "ok": 1}]}, "Password": {"x": 1}, "url": "u"});
        let r = redact(v);
        assert_eq!(
            r,
            json!({"a": {"b": [{"token": REDACTED, "ok": 1}]}, "Password": REDACTED, "url": "u"})
        );
    }
}
