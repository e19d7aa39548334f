//! Redaction of secret-named keys (SPEC §10), at any depth of a JSON value.

use serde_json::Value;

/// Key names whose values are never logged.
const SECRET_KEYS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "access_token",
    "refresh_token",
    "authorization",
    "cookie",
    "set-cookie",
    "private_key",
    "credit_card",
    "ssn",
    "email",
    "phone",
];

/// The replacement text.
pub const REDACTED: &str = "[REDACTED]";

fn parts(s: &str) -> Vec<String> {
    s.split(['_', '-', '.'])
        .filter(|p| !p.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

/// True if `key`, case-insensitively, is a secret name or contains one as a
/// run of whole `_`/`-`/`.`-separated parts (`db.password`, `X-Api-Key`).
pub fn is_secret_key(key: &str) -> bool {
    let key_parts = parts(key);
    SECRET_KEYS.iter().any(|secret| {
        let sp = parts(secret);
        key.eq_ignore_ascii_case(secret) || key_parts.windows(sp.len()).any(|w| w == sp.as_slice())
    })
}

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
