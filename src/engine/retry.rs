//! Retry policy (SPEC §6): the CP1 linear delays, the CP2 exponential backoff
//! with optional full jitter, and the one classification table every block's
//! errors go through.

use crate::blocks::{BlockError, TimeoutPhase};
use crate::config::Jitter;
use crate::contract::ErrorCode;
use std::cell::Cell;
use std::time::Duration;

/// CP1: the delay before retry `n` (1-based) is `100·n` ms.
pub fn cp1_delay(n: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(u64::from(n)))
}

/// CP2: `min(base·2^(n−1), max)` for retry `n` (1-based), without overflow for any `n`.
pub fn backoff(base: Duration, max: Duration, n: u32) -> Duration {
    let exp = n.saturating_sub(1);
    let factor = 1u64
        .checked_shl(exp)
        .filter(|_| exp < 64)
        .unwrap_or(u64::MAX);
    let base_ms = base.as_millis().min(u128::from(u64::MAX)) as u64;
    Duration::from_millis(base_ms.saturating_mul(factor)).min(max)
}

/// Applies the jitter mode: `full` draws uniformly from `[0, d]`.
pub fn jittered(d: Duration, jitter: Jitter) -> Duration {
    match jitter {
        Jitter::None => d,
        Jitter::Full => {
            let ms = d.as_millis().min(u128::from(u64::MAX)) as u64;
            Duration::from_millis(next_random() % (ms + 1))
        }
    }
}

/// Whether an error is worth retrying (SPEC §6.2). One table, used for every
/// block; CP1 ignores it when deciding to retry but still reports it as the
/// result's `retryable`.
pub fn is_retryable(e: &BlockError) -> bool {
    if e.permanent {
        return false;
    }
    match e.code {
        ErrorCode::NetworkError
        | ErrorCode::ConnectionTimeout
        | ErrorCode::InternalError
        | ErrorCode::SystemOverload
        | ErrorCode::ResourceUnavailable => true,
        // Attempt and FS timeouts are transient; a deadline or a simulated
        // CANCELLED_BY_TIMEOUT without a phase is not.
        ErrorCode::CancelledByTimeout => matches!(
            e.timeout,
            Some(TimeoutPhase::Attempt | TimeoutPhase::Fs | TimeoutPhase::Connect)
        ),
        ErrorCode::HttpError => matches!(e.http_status, Some(408 | 429 | 500 | 502 | 503 | 504)),
        // INVALID_*, MISSING_REQUIRED_FIELD, PERMISSION_DENIED, CANCELLED_BY_USER,
        // and (our choice, docs/SPEC.md) EXECUTION_FAILED and QUOTA_EXCEEDED.
        _ => false,
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let local = 0u8;
    (t ^ (&local as *const u8 as u64).rotate_left(32)) | 1
}

/// xorshift64*: plenty for jitter, no crate needed.
fn next_random() -> u64 {
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn cp1_is_linear() {
        assert_eq!(
            [cp1_delay(1), cp1_delay(2), cp1_delay(3)],
            [MS(100), MS(200), MS(300)]
        );
    }

    #[test]
    fn backoff_doubles_caps_and_never_overflows() {
        let (b, m) = (MS(100), MS(5000));
        let got: Vec<_> = (1..=7).map(|n| backoff(b, m, n)).collect();
        assert_eq!(
            got,
            [
                MS(100),
                MS(200),
                MS(400),
                MS(800),
                MS(1600),
                MS(3200),
                MS(5000)
            ]
        );
        assert_eq!(backoff(b, m, 64), m);
        assert_eq!(backoff(b, m, 65), m);
        assert_eq!(backoff(b, m, 1000), m);
        assert_eq!(backoff(b, m, u32::MAX), m);
        assert_eq!(backoff(Duration::ZERO, m, 1000), Duration::ZERO);
        assert_eq!(
            backoff(Duration::MAX, Duration::MAX, 64),
            Duration::from_millis(u64::MAX)
        );
    }

    #[test]
    fn full_jitter_stays_in_range() {
        for _ in 0..1000 {
            assert!(jittered(MS(100), Jitter::Full) <= MS(100));
        }
        assert_eq!(jittered(MS(100), Jitter::None), MS(100));
        assert_eq!(jittered(Duration::ZERO, Jitter::Full), Duration::ZERO);
    }

    #[test]
    fn classification_table() {
        let http = |s: u16| BlockError {
            http_status: Some(s),
            ..BlockError::new(ErrorCode::HttpError, "")
        };
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(is_retryable(&http(s)), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 422, 501, 505] {
            assert!(!is_retryable(&http(s)), "{s}");
        }
        for c in [
            ErrorCode::NetworkError,
            ErrorCode::ConnectionTimeout,
            ErrorCode::InternalError,
            ErrorCode::SystemOverload,
            ErrorCode::ResourceUnavailable,
        ] {
            assert!(is_retryable(&BlockError::new(c, "")), "{c}");
            assert!(!is_retryable(&BlockError::new(c, "").permanent()), "{c}");
        }
        for c in [
            ErrorCode::InvalidInput,
            ErrorCode::InvalidFormat,
            ErrorCode::MissingRequiredField,
            ErrorCode::PermissionDenied,
            ErrorCode::CancelledByUser,
            ErrorCode::CancelledByTimeout,
            ErrorCode::ExecutionFailed,
        ] {
            assert!(!is_retryable(&BlockError::new(c, "")), "{c}");
        }
        assert!(is_retryable(&BlockError::timeout(
            TimeoutPhase::Attempt,
            ""
        )));
        assert!(is_retryable(&BlockError::timeout(TimeoutPhase::Fs, "")));
        assert!(!is_retryable(&BlockError::timeout(
            TimeoutPhase::Deadline,
            ""
        )));
    }
}
