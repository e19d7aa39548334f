//! Formats of the router's identifiers (SPEC §3.1, strict IDs).

/// True for `8-4-4-4-12` hexadecimal UUIDs of any version.
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// True for 26-character ULIDs in Crockford base32 (upper case, as the router emits).
pub fn is_ulid(s: &str) -> bool {
    s.len() == 26
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (c.is_ascii_uppercase() && !b"ILOU".contains(&c)))
}

/// True for a W3C trace id (32 hex digits) or a UUID.
pub fn is_trace_id(s: &str) -> bool {
    (s.len() == 32 && s.bytes().all(|c| c.is_ascii_hexdigit())) || is_uuid(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert!(is_uuid("0b9e6a3c-1f7d-4c2e-9a41-5d2f8c7e6b10"));
        assert!(!is_uuid("0b9e6a3c-1f7d-4c2e-9a41-5d2f8c7e6b1"));
        assert!(!is_uuid("0b9e6a3cx1f7d-4c2e-9a41-5d2f8c7e6b10"));
        assert!(is_ulid("01HZX3K9Q4V7T2M8N5P6R0S1W2"));
        assert!(!is_ulid("01HZX3K9Q4V7T2M8N5P6R0S1WI"));
        assert!(!is_ulid("run-1"));
        assert!(is_trace_id("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert!(!is_trace_id("4bf92f3577b34da6a3ce929d0e0e473"));
        assert!(!is_trace_id("not-a-trace"));
    }
}
