//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! Sums are carried in a `u64` accumulator and folded at the end, so callers
//! can chain a pseudo-header sum and a payload sum before finishing.

use std::net::Ipv4Addr;

/// Ones-complement sum of `data` as big-endian 16-bit words (odd trailing byte
/// padded with zero), not folded and not complemented.
#[inline]
pub fn sum(data: &[u8]) -> u64 {
    // Summing 32-bit big-endian words and folding gives the same result as
    // summing 16-bit words, because 2^16 is congruent to 1 modulo 0xffff.
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut i = 0;
    while i + 1 < rest.len() {
        acc += u64::from(u16::from_be_bytes([rest[i], rest[i + 1]]));
        i += 2;
    }
    if i < rest.len() {
        acc += u64::from(rest[i]) << 8;
    }
    acc
}

/// Folds an accumulator to 16 bits (end-around carry), not complemented.
#[inline]
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum field value for an accumulated sum.
#[inline]
pub fn finish(acc: u64) -> u16 {
    !fold(acc)
}

/// Sum of the TCP/UDP pseudo-header (RFC 793 / RFC 768).
#[inline]
pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: u16) -> u64 {
    u64::from(u32::from(src)) + u64::from(u32::from(dst)) + u64::from(proto) + u64::from(l4_len)
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')` for one changed 16-bit word.
#[inline]
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    let acc = u64::from(!check) + u64::from(!old) + u64::from(new);
    !fold(acc)
}

/// Incremental update for one changed 32-bit field (an IPv4 address).
#[inline]
pub fn update32(check: u16, old: u32, new: u32) -> u16 {
    let acc = u64::from(!check)
        + u64::from(!(old >> 16) as u16)
        + u64::from(!(old as u16))
        + u64::from((new >> 16) as u16)
        + u64::from(new as u16);
    !fold(acc)
}

/// Accumulated changes to 16-bit words of a checksummed region, applied to
/// a checksum in one step (RFC 1624 eqn. 3 summed over all changed words).
/// Cheaper than one update per field on the per-packet path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta(u64);

impl Delta {
    #[inline]
    pub fn word(self, old: u16, new: u16) -> Self {
        Delta(self.0 + u64::from(!old) + u64::from(new))
    }

    #[inline]
    pub fn dword(self, old: u32, new: u32) -> Self {
        self.word((old >> 16) as u16, (new >> 16) as u16)
            .word(old as u16, new as u16)
    }

    #[inline]
    pub fn apply(self, check: u16) -> u16 {
        !fold(u64::from(!check) + self.0)
    }
}

/// True when `data` (a header that includes its own checksum field) sums to
/// all-ones, i.e. its checksum is valid.
#[inline]
pub fn verify(data: &[u8]) -> bool {
    fold(sum(data)) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;

    // The IPv4 header from RFC 1071's companion example (Wikipedia's worked
    // example): checksum 0xb861.
    const HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
        0x00, 0xc7,
    ];

    #[test]
    fn full_sum_matches_known_header() {
        let mut h = HDR;
        h[10] = 0;
        h[11] = 0;
        assert_eq!(finish(sum(&h)), 0xb861);
        assert!(verify(&HDR));
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(sum(&[0x12]), 0x1200);
        assert_eq!(sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }

    #[test]
    fn incremental_equals_recompute() {
        let mut h = HDR;
        let old = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        let new = u32::from(Ipv4Addr::new(10, 96, 0, 10));
        h[16..20].copy_from_slice(&new.to_be_bytes());
        let inc = update32(0xb861, old, new);
        h[10] = 0;
        h[11] = 0;
        assert_eq!(inc, finish(sum(&h)));
    }

    #[test]
    fn delta_equals_chained_updates() {
        let d = Delta::default()
            .dword(0x0a000001, 0xc0a80001)
            .word(0x4011, 0x3f11)
            .word(80, 8080);
        let chained = update16(
            update16(update32(0x1234, 0x0a000001, 0xc0a80001), 0x4011, 0x3f11),
            80,
            8080,
        );
        assert_eq!(d.apply(0x1234), chained);
    }

    #[test]
    fn update16_handles_ttl_change() {
        let mut h = HDR;
        let old = u16::from_be_bytes([h[8], h[9]]);
        h[8] -= 1;
        let new = u16::from_be_bytes([h[8], h[9]]);
        let inc = update16(0xb861, old, new);
        h[10] = 0;
        h[11] = 0;
        assert_eq!(inc, finish(sum(&h)));
    }
}
