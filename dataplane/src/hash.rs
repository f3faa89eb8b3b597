//! Deterministic hashing for backend choice and VXLAN source ports.
//!
//! Maglev needs the same hash on every node (so a flow that ECMP moves to
//! another node still lands on the same backend), hence a fixed function
//! here rather than a per-process random hasher. Hash tables that face
//! untrusted keys (conntrack, affinity) use seeded `ahash` instead.

/// The splitmix64 finaliser: a cheap, well-mixed 64-bit permutation.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hash of a flow's 5-tuple.
#[inline]
pub fn flow(src: u32, dst: u32, src_port: u16, dst_port: u16, proto: u8) -> u64 {
    let a = (u64::from(src) << 32) | u64::from(dst);
    let b = (u64::from(src_port) << 32) | (u64::from(dst_port) << 16) | u64::from(proto);
    mix64(a ^ mix64(b ^ 0x9e37_79b9_7f4a_7c15))
}

/// Two independent hashes of a byte string (FNV-1a, then mixed), for the
/// Maglev permutation of a backend.
pub fn bytes2(data: &[u8]) -> (u64, u64) {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (mix64(h), mix64(h ^ 0x5851_f42d_4c95_7f2d))
}
