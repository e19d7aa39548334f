//! The secret key names of SPEC §10: values under these keys are never
//! logged (telemetry redacts them) and headers so named never follow a
//! redirect to another origin (the HTTP block strips them).

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
