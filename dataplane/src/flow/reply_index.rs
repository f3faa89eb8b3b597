//! The reply index: the reply tuples of every flow kxp tracks, kept where
//! the XDP steering program can read them, so it takes a reply (or an ICMP
//! error about a flow) by exact match instead of by rules of thumb such as
//! "from a backend" or "to the SNAT port range". Everything else, the
//! node's own connections included, stays the kernel's.
//!
//! **Layout** (shared with `steer.bpf.c`, which must agree bit for bit): an
//! array of buckets, a power of two of them, each 8 entries of two 64-bit
//! words, 128 bytes. The runtime places it in a `BPF_F_MMAPABLE` array map
//! mapped into kxp's memory; tests and benchmarks use plain memory.
//!
//! ```text
//! word 0: src_ip << 32 | dst_ip                      (host order)
//! word 1: src_port << 48 | dst_port << 32 | proto << 8 | 1
//! ```
//! Word 1 is never 0 for a key (bit 0), so `word1 == 0` marks a free entry
//! or one being written or removed.
//!
//! **Placement.** A key may live in either of two buckets (two-choice
//! hashing, the emptier one is taken): sized at twice the conntrack's
//! capacity, a full pair of buckets is vanishingly rare (the seed is
//! random per run, so an attacker cannot aim tuples at one bucket); when it
//! happens the flow is refused, since its replies could not be steered.
//!
//! **Concurrency.** Writers (workers, under the conntrack shard lock of the
//! key) claim an entry by compare-and-swap of word 0 from 0, then store
//! word 1; removal stores word 1 = 0, then word 0 = 0. The program reads
//! word 1, then word 0. It can see a key only after both are written, and
//! at worst, while an entry is being reused, a word 0 of the new key with
//! the word 1 of the old one: one packet steered to kxp that should not
//! have been, counted, never a reply lost.

use std::sync::atomic::{AtomicU64, Ordering};

use super::key::FlowKey;

pub const ENTRIES_PER_BUCKET: usize = 8;
/// Two words per entry.
pub const WORDS_PER_BUCKET: usize = 2 * ENTRIES_PER_BUCKET;

const K1: u64 = 0x9E37_79B9_7F4A_7C15;

/// The two words of `k` (see the module docs).
#[inline]
pub fn key_words(k: &FlowKey) -> (u64, u64) {
    let (s, d) = (k.src(), k.dst());
    let w0 = (u64::from(u32::from(s.ip)) << 32) | u64::from(u32::from(d.ip));
    let w1 = (u64::from(s.port) << 48) | (u64::from(d.port) << 32) | (u64::from(k.proto as u8) << 8) | 1;
    (w0, w1)
}

/// The key's hash; its low and high halves pick the two buckets. The
/// steering program computes the same: the seeded first word, folded with
/// the second, through MurmurHash3's 64-bit finaliser (every input bit
/// reaches every output bit, so keys that differ only in a port spread).
#[inline]
pub fn key_hash(seed: u64, w0: u64, w1: u64) -> u64 {
    let mut h = (w0 ^ seed).wrapping_mul(K1) ^ w1;
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^ (h >> 33)
}

/// Memory the index lives in: whole buckets of words.
pub trait IndexMemory: Send + Sync {
    fn words(&self) -> &[AtomicU64];
}

impl IndexMemory for Box<[AtomicU64]> {
    fn words(&self) -> &[AtomicU64] {
        self
    }
}

pub struct ReplyIndex {
    mem: Box<dyn IndexMemory>,
    mask: u64,
    seed: u64,
}

/// Why memory cannot hold an index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("reply index memory of {words} words is not a power of two of {WORDS_PER_BUCKET}-word buckets")]
pub struct BadIndexMemory {
    pub words: usize,
}

impl ReplyIndex {
    /// Buckets for `capacity` flows: two entries per flow, a power of two.
    pub fn buckets_for(capacity: usize) -> usize {
        (capacity * 2).div_ceil(ENTRIES_PER_BUCKET).next_power_of_two()
    }

    /// An index in plain memory (nobody else reads it), with a random seed.
    pub fn in_memory(capacity: usize) -> Self {
        let words = Self::buckets_for(capacity) * WORDS_PER_BUCKET;
        let mem: Box<[AtomicU64]> = (0..words).map(|_| AtomicU64::new(0)).collect();
        Self::over(Box::new(mem), Self::random_seed()).expect("sized in whole buckets")
    }

    /// An index in `mem` (zeroed: no entries), hashed with `seed`.
    pub fn over(mem: Box<dyn IndexMemory>, seed: u64) -> Result<Self, BadIndexMemory> {
        let words = mem.words().len();
        let buckets = words / WORDS_PER_BUCKET;
        if words % WORDS_PER_BUCKET != 0 || !buckets.is_power_of_two() {
            return Err(BadIndexMemory { words });
        }
        Ok(ReplyIndex {
            mem,
            mask: buckets as u64 - 1,
            seed,
        })
    }

    /// A seed nobody outside this process can predict.
    pub fn random_seed() -> u64 {
        ahash::RandomState::new().hash_one(0u64)
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn buckets(&self) -> usize {
        self.mask as usize + 1
    }

    #[inline]
    fn bucket_pair(&self, w0: u64, w1: u64) -> [usize; 2] {
        let h = key_hash(self.seed, w0, w1);
        [(h & self.mask) as usize, ((h >> 32) & self.mask) as usize]
    }

    #[inline]
    fn bucket(&self, b: usize) -> &[AtomicU64] {
        &self.mem.words()[b * WORDS_PER_BUCKET..(b + 1) * WORDS_PER_BUCKET]
    }

    /// Adds `k`; false when both of its buckets are full. The caller makes
    /// sure a key is added at most once (conntrack holds one link per reply
    /// tuple) and serialises the adds and removes of one key.
    pub fn insert(&self, k: &FlowKey) -> bool {
        let (w0, w1) = key_words(k);
        if w0 == 0 {
            return false; // 0.0.0.0 -> 0.0.0.0 is no flow's, and 0 marks a free entry
        }
        let [a, b] = self.bucket_pair(w0, w1);
        let used = |b: usize| {
            self.bucket(b)
                .chunks(2)
                .filter(|e| e[0].load(Ordering::Relaxed) != 0)
                .count()
        };
        let order = if used(b) < used(a) { [b, a] } else { [a, b] };
        for bi in order {
            for e in self.bucket(bi).chunks(2) {
                if e[0]
                    .compare_exchange(0, w0, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    e[1].store(w1, Ordering::Release);
                    return true;
                }
            }
        }
        false
    }

    /// Removes `k` (nothing when it is absent).
    pub fn remove(&self, k: &FlowKey) {
        let (w0, w1) = key_words(k);
        for bi in self.bucket_pair(w0, w1) {
            for e in self.bucket(bi).chunks(2) {
                if e[1].load(Ordering::Acquire) == w1 && e[0].load(Ordering::Acquire) == w0 {
                    e[1].store(0, Ordering::Release);
                    e[0].store(0, Ordering::Release);
                    return;
                }
            }
        }
    }

    /// What the steering program asks: is `k` a reply kxp owns?
    pub fn contains(&self, k: &FlowKey) -> bool {
        let (w0, w1) = key_words(k);
        self.bucket_pair(w0, w1).into_iter().any(|bi| {
            self.bucket(bi)
                .chunks(2)
                .any(|e| e[1].load(Ordering::Acquire) == w1 && e[0].load(Ordering::Acquire) == w0)
        })
    }

    /// Keys held (a scan of the whole index: for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.mem
            .words()
            .chunks(2)
            .filter(|e| e[1].load(Ordering::Relaxed) != 0)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{Endpoint, Proto};
    use std::net::Ipv4Addr;

    fn key(i: u32) -> FlowKey {
        FlowKey::new(
            Endpoint::new(Ipv4Addr::from(0x0a00_0000 | (i >> 16)), 8080),
            Endpoint::new(Ipv4Addr::new(10, 1, 0, 1), i as u16),
            Proto::Tcp,
        )
    }

    #[test]
    fn holds_what_conntrack_would_at_capacity_and_forgets_what_is_removed() {
        let capacity = 100_000;
        let idx = ReplyIndex::in_memory(capacity);
        for i in 0..capacity as u32 {
            assert!(
                idx.insert(&key(i)),
                "key {i} found no room at {} buckets",
                idx.buckets()
            );
        }
        assert_eq!(idx.len(), capacity);
        assert!((0..capacity as u32).all(|i| idx.contains(&key(i))));
        assert!(!idx.contains(&key(capacity as u32)));
        // Same addresses and ports, other protocol or direction: not held.
        let mut udp = key(1);
        udp.proto = Proto::Udp;
        assert!(!idx.contains(&udp));
        assert!(!idx.contains(&key(1).reversed()));
        for i in (0..capacity as u32).step_by(2) {
            idx.remove(&key(i));
        }
        assert_eq!(idx.len(), capacity / 2);
        assert!(!idx.contains(&key(0)) && idx.contains(&key(1)));
        // Removed entries are reused.
        for i in (0..capacity as u32).step_by(2) {
            assert!(idx.insert(&key(i)));
        }
        assert_eq!(idx.len(), capacity);
    }

    #[test]
    fn a_full_pair_of_buckets_refuses_instead_of_overwriting() {
        // One bucket: every key's pair is that bucket.
        let mem: Box<[AtomicU64]> = (0..WORDS_PER_BUCKET).map(|_| AtomicU64::new(0)).collect();
        let idx = ReplyIndex::over(Box::new(mem), 7).unwrap();
        for i in 0..ENTRIES_PER_BUCKET as u32 {
            assert!(idx.insert(&key(i)));
        }
        assert!(!idx.insert(&key(99)));
        assert!((0..ENTRIES_PER_BUCKET as u32).all(|i| idx.contains(&key(i))));
    }

    #[test]
    fn memory_must_be_whole_buckets_a_power_of_two() {
        let mem =
            |n: usize| -> Box<dyn IndexMemory> { Box::new((0..n).map(|_| AtomicU64::new(0)).collect::<Box<[_]>>()) };
        assert!(ReplyIndex::over(mem(3 * WORDS_PER_BUCKET), 1).is_err());
        assert!(ReplyIndex::over(mem(WORDS_PER_BUCKET + 1), 1).is_err());
        assert!(ReplyIndex::over(mem(4 * WORDS_PER_BUCKET), 1).is_ok());
    }

    #[test]
    fn the_words_are_the_documented_layout() {
        let k = FlowKey::new(
            Endpoint::new(Ipv4Addr::new(10, 0, 0, 1), 0x1234),
            Endpoint::new(Ipv4Addr::new(192, 168, 0, 2), 0x5678),
            Proto::Udp,
        );
        assert_eq!(key_words(&k), (0x0a00_0001_c0a8_0002, 0x1234_5678_0000_1101));
    }
}
