//! Finding where a JSON string's plain run of bytes ends, eight bytes at a
//! time (SWAR: "SIMD within a register", in safe code). Input lines are
//! mostly string bytes, and the reading thread and the intake lexer both
//! walk them; a byte-at-a-time loop was the largest cost of both.

/// `0x01` in every byte.
const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
/// `0x80` in every byte.
const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);

/// The high bit set in each byte of `word` that is below `n` (`n` ≤ 0x80).
/// Bytes above a flagged one may be flagged falsely (a borrow), never the
/// lowest, so only the lowest flag is used.
#[inline]
fn below(word: u64, n: u8) -> u64 {
    word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS
}

/// The high bit set in each byte of `word` equal to `b` (same caveat).
#[inline]
fn equal(word: u64, b: u8) -> u64 {
    below(word ^ (ONES * u64::from(b)), 1)
}

/// Index of the first `"`, `\` or control character (below 0x20) in
/// `bytes`: where a JSON string's plain run ends.
#[inline]
pub(crate) fn find_string_stop(bytes: &[u8]) -> Option<usize> {
    let stop = |b: &u8| *b == b'"' || *b == b'\\' || *b < 0x20;
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for chunk in words.by_ref() {
        let Ok(word) = <[u8; 8]>::try_from(chunk) else {
            // Never (the chunks are exact), but stay right if it were.
            return bytes[at..].iter().position(stop).map(|i| at + i);
        };
        // Little-endian: byte 0 is the lowest, so the lowest flag is first.
        let word = u64::from_le_bytes(word);
        let hits = equal(word, b'"') | equal(word, b'\\') | below(word, 0x20);
        if hits != 0 {
            return Some(at + (hits.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    words.remainder().iter().position(stop).map(|i| at + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(bytes: &[u8]) -> Option<usize> {
        bytes
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
    }

    #[test]
    fn agrees_with_a_byte_at_a_time_search() {
        // Every stop byte (and near misses) at every position of inputs of
        // every length up to three words, after every kind of byte.
        let specials = [
            b'"', b'\\', 0x00, 0x1f, 0x20, 0x21, b'!', b'#', b'[', b']', 0x7f, 0x80, 0xff, b'a',
        ];
        for len in 0..=24 {
            for fill in [b'a', 0x21, 0x7f, 0x80, 0xff, 0x20] {
                for pos in 0..len {
                    for &s in &specials {
                        let mut v = vec![fill; len];
                        v[pos] = s;
                        assert_eq!(find_string_stop(&v), naive(&v), "{v:?}");
                        // A second stop after the first must not win.
                        if pos + 1 < len {
                            v[pos + 1] = b'"';
                            assert_eq!(find_string_stop(&v), naive(&v), "{v:?}");
                        }
                    }
                }
            }
        }
        assert_eq!(find_string_stop(b""), None);
        assert_eq!(find_string_stop("échappé\"".as_bytes()), Some(9));
    }
}
