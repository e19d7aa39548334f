//! Who may call the assignment API, and for which tenant (SPEC §15, §12.13).
//!
//! This module is the one place that decides. Every route that acts on a
//! tenant's data does two things and nothing else:
//!
//! 1. [`Auth::authenticate`] turns the request's `Authorization: Bearer …`
//!    header into a [`Principal`], or `None` (answer 401);
//! 2. [`Principal::authorize`] says whether that principal may act for the
//!    tenant that owns the data. A submission for another tenant is refused
//!    403 (Ack reason `unauthorized`); a lookup, long-poll wait or cancel of
//!    another tenant's assignment answers 404, exactly as for an unknown id,
//!    so ids of other tenants cannot be probed. Routes added later (the
//!    approvals API: list, decide) must use the same two calls.
//!
//! Tokens: `WORKER_API_TOKEN` is an operator token; `WORKER_API_TOKENS_FILE`
//! holds a TOML table `[tokens]` of `"<token>" = "<tenant_id>"`, or `"*"`
//! for another operator token. With neither set the API is open and every
//! caller is an operator (the CP1 behaviour). Tokens are kept only as
//! SHA-256 digests and a presented token is compared with every one of them
//! without an early exit, so the time taken says nothing about which bytes
//! or which token matched. The file is read once at start-up; a file that
//! group or others may read or write logs a WARN.

use sha2::{Digest, Sha256};
use std::path::Path;

/// The caller, once its token is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Sees and acts for every tenant.
    Operator,
    /// Sees and acts only for this tenant id.
    Tenant(String),
}

impl Principal {
    /// True if this principal may submit for, see or cancel the assignments
    /// of `tenant_id`.
    pub fn authorize(&self, tenant_id: &str) -> bool {
        match self {
            Principal::Operator => true,
            Principal::Tenant(own) => own == tenant_id,
        }
    }
}

/// The token table of one ingress.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// SHA-256 of each token and whom it names.
    tokens: Vec<([u8; 32], Principal)>,
}

/// A tokens file that cannot be used (the worker does not start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokensFileError(pub String);

impl std::fmt::Display for TokensFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid WORKER_API_TOKENS_FILE: {}", self.0)
    }
}

impl std::error::Error for TokensFileError {}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Auth {
    /// An open API: every caller is an operator.
    pub fn open() -> Auth {
        Auth::default()
    }

    /// The operator token `api_token` and the tokens of `file`, if given.
    /// Logs a WARN when the file's mode lets group or others read or write it.
    pub fn load(api_token: Option<&str>, file: Option<&Path>) -> Result<Auth, TokensFileError> {
        let mut auth = Auth::open();
        if let Some(t) = api_token {
            auth.add(t, Principal::Operator);
        }
        if let Some(path) = file {
            warn_if_exposed(path);
            let text = std::fs::read_to_string(path)
                .map_err(|e| TokensFileError(format!("{}: {e}", path.display())))?;
            auth.add_file(&text)
                .map_err(|e| TokensFileError(format!("{}: {e}", path.display())))?;
        }
        Ok(auth)
    }

    fn add(&mut self, token: &str, who: Principal) {
        self.tokens.push((digest(token), who));
    }

    /// Adds the `[tokens]` table of a tokens file's text.
    fn add_file(&mut self, text: &str) -> Result<(), String> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            // toml's message can quote the offending line (a token): keep the first line only.
            e.message().lines().next().unwrap_or("not TOML").to_owned()
        })?;
        let Some(toml::Value::Table(tokens)) = table.get("tokens") else {
            return Err(
                "expected a [tokens] table of \"<token>\" = \"<tenant_id>\" or \"*\"".into(),
            );
        };
        if tokens.is_empty() {
            return Err("the [tokens] table is empty".into());
        }
        for (n, (token, who)) in tokens.iter().enumerate() {
            let entry = n + 1;
            if token.trim().is_empty() || token.trim() != token {
                return Err(format!("token #{entry} is empty or has surrounding spaces"));
            }
            let who = match who {
                toml::Value::String(s) if s == "*" => Principal::Operator,
                toml::Value::String(s) if !s.is_empty() && s.len() <= 256 => {
                    Principal::Tenant(s.clone())
                }
                _ => {
                    return Err(format!(
                        "token #{entry} must map to a tenant_id (1..256 bytes) or \"*\""
                    ));
                }
            };
            self.add(token, who);
        }
        Ok(())
    }

    /// True when no token is configured (every caller is an operator).
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The principal of an `Authorization` header value (`Bearer <token>`,
    /// scheme case-insensitive); `None` when a token is required and this
    /// one is missing or unknown.
    pub fn authenticate(&self, authorization: Option<&str>) -> Option<Principal> {
        if self.is_open() {
            return Some(Principal::Operator);
        }
        let given = authorization
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim());
        let d = digest(given);
        let mut found = None;
        // Every entry is compared, each without an early exit.
        for (known, who) in &self.tokens {
            if constant_time_eq(&d, known) && found.is_none() && !given.is_empty() {
                found = Some(who);
            }
        }
        found.cloned()
    }
}

/// Warns when `path`'s permissions let group or others read or write it.
fn warn_if_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            log::warn!(
                path = path.display().to_string(),
                mode = format!("{mode:o}");
                "WORKER_API_TOKENS_FILE is readable or writable by group or others; chmod 600 it"
            );
        }
    }
}

/// Compares without an early exit, so timing does not reveal the token.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_principals() {
        let mut auth = Auth::load(Some("op-token"), None).unwrap();
        auth.add_file("[tokens]\n\"tok-a\" = \"acme\"\n\"tok-root\" = \"*\"\n")
            .unwrap();
        let bearer = |t: &str| auth.authenticate(Some(&format!("Bearer {t}")));
        assert_eq!(bearer("op-token"), Some(Principal::Operator));
        assert_eq!(bearer("tok-root"), Some(Principal::Operator));
        assert_eq!(bearer("tok-a"), Some(Principal::Tenant("acme".into())));
        assert_eq!(
            auth.authenticate(Some("bearer tok-a")),
            Some(Principal::Tenant("acme".into()))
        );
        assert_eq!(bearer("tok-b"), None);
        assert_eq!(bearer(""), None);
        assert_eq!(auth.authenticate(None), None);
        assert_eq!(auth.authenticate(Some("Basic tok-a")), None);
        assert!(Principal::Tenant("acme".into()).authorize("acme"));
        assert!(!Principal::Tenant("acme".into()).authorize("globex"));
        assert!(Principal::Operator.authorize("globex"));
        assert_eq!(Auth::open().authenticate(None), Some(Principal::Operator));
    }

    #[test]
    fn bad_files_are_refused_without_echoing_tokens() {
        for text in [
            "tokens = 1",
            "[other]\n",
            "[tokens]\n",
            "[tokens]\n\"tok-secret\" = 5\n",
            "[tokens]\n\"tok-secret\" = \"\"\n",
            "[tokens]\n\" tok-secret\" = \"a\"\n",
            "[tokens\n\"tok-secret\" = \"a\"",
        ] {
            let e = Auth::open().add_file(text).unwrap_err();
            assert!(!e.contains("tok-secret"), "{e}");
        }
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
