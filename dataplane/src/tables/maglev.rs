//! Maglev consistent hashing (Eisenbud et al., NSDI '16, section 3.4).
//!
//! Each backend gets a permutation of the table's slots from two hashes of
//! its address; backends take turns claiming their next free preferred slot
//! until the table is full. A flow hash then indexes the table. Removing one
//! of N backends re-maps only about 1/N of the slots, and every node builds
//! the same table for the same backends, so flows survive node changes too.
//!
//! The table size M is a prime near 100 times the backend count (the paper's
//! rule of thumb for near-uniform load), capped at 65521 (fits the u16 slot
//! entries). M must not change when one backend comes or goes — a new M
//! reshuffles every flow — so a rebuilt table keeps the previous M while it
//! stays within 20x..400x the backend count (hysteresis), and only a change of
//! scale (the backend count halving or doubling several times) picks a new
//! one. Rejected alternative: one fixed M (Cilium's 16381) for every service
//! costs 32 KiB per service even with one backend; at 100,000 services that
//! is 3 GiB.

use crate::addr::BackendAddr;
use crate::hash;

const PRIMES: [u32; 9] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];
const EMPTY: u16 = u16::MAX;
/// Most backends one service port can have (slot entries are u16).
pub const MAX_BACKENDS: usize = (u16::MAX - 1) as usize;

/// A built lookup table over a fixed, ordered backend list.
#[derive(Clone, Debug)]
pub struct Maglev {
    slots: Box<[u16]>,
}

impl Maglev {
    /// Table size for `n` backends when the previous table had `prev` slots.
    pub fn size_for(n: usize, prev: Option<usize>) -> usize {
        if let Some(m) = prev {
            let n = n as u64;
            if PRIMES.contains(&(m as u32)) && m as u64 >= 20 * n && m as u64 <= 400 * n.max(1) {
                return m;
            }
        }
        Self::ideal_size(n)
    }

    fn ideal_size(n: usize) -> usize {
        let want = (n as u64).saturating_mul(100);
        PRIMES
            .iter()
            .copied()
            .find(|&p| u64::from(p) >= want)
            .unwrap_or(PRIMES[PRIMES.len() - 1]) as usize
    }

    /// Builds the table. `backends` must be distinct and at most
    /// [`MAX_BACKENDS`] long (control enforces both); `prev_size` is the
    /// size of the table this one replaces, if any.
    pub fn new(backends: &[BackendAddr], prev_size: Option<usize>) -> Self {
        let n = backends.len().min(MAX_BACKENDS);
        if n == 0 {
            return Maglev { slots: Box::new([]) };
        }
        if n == 1 {
            return Maglev { slots: Box::new([0]) };
        }
        let m = Self::size_for(n, prev_size);
        let perms: Vec<(usize, usize)> = backends[..n]
            .iter()
            .map(|b| {
                let mut key = [0u8; 6];
                key[..4].copy_from_slice(&b.0.ip.octets());
                key[4..].copy_from_slice(&b.0.port.to_be_bytes());
                let (h1, h2) = hash::bytes2(&key);
                ((h1 % m as u64) as usize, (h2 % (m as u64 - 1) + 1) as usize)
            })
            .collect();
        let mut next = vec![0usize; n];
        let mut slots = vec![EMPTY; m];
        let mut filled = 0;
        'fill: loop {
            for (i, &(offset, skip)) in perms.iter().enumerate() {
                let mut c = (offset + next[i] * skip) % m;
                while slots[c] != EMPTY {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                slots[c] = i as u16;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Maglev {
            slots: slots.into_boxed_slice(),
        }
    }

    /// Index of the backend for a flow hash; `None` when there are no backends.
    #[inline]
    pub fn pick(&self, flow_hash: u64) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let i = (flow_hash % self.slots.len() as u64) as usize;
        Some(usize::from(self.slots[i]))
    }

    /// Table size in slots (0 without backends).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::Endpoint;
    use std::net::Ipv4Addr;

    fn backends(n: usize) -> Vec<BackendAddr> {
        (0..n)
            .map(|i| {
                BackendAddr(Endpoint::new(
                    Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250) as u8 + 1),
                    8080,
                ))
            })
            .collect()
    }

    fn assignment(bs: &[BackendAddr], prev: Option<usize>, flows: u64) -> (Vec<BackendAddr>, usize) {
        let t = Maglev::new(bs, prev);
        let m = t.len();
        ((0..flows).map(|f| bs[t.pick(hash::mix64(f)).unwrap()]).collect(), m)
    }

    fn moved(a: &[BackendAddr], b: &[BackendAddr]) -> f64 {
        a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
    }

    #[test]
    fn sizes_are_prime_and_scaled() {
        assert_eq!(Maglev::size_for(1, None), 251);
        assert_eq!(Maglev::size_for(10, None), 1021);
        assert_eq!(Maglev::size_for(100, None), 16381);
        assert_eq!(Maglev::size_for(10_000, None), 65521);
        // Hysteresis: one backend more or less keeps the size.
        assert_eq!(Maglev::size_for(11, Some(1021)), 1021);
        assert_eq!(Maglev::size_for(9, Some(1021)), 1021);
        assert_eq!(Maglev::size_for(3, Some(1021)), 1021);
        assert_eq!(Maglev::size_for(60, Some(1021)), 8191);
        assert_eq!(Maglev::size_for(2, Some(1021)), 251);
    }

    #[test]
    fn load_is_near_uniform() {
        let bs = backends(10);
        let t = Maglev::new(&bs, None);
        let mut per = [0usize; 10];
        for s in t.slots.iter() {
            per[usize::from(*s)] += 1;
        }
        let ideal = t.len() / 10;
        for c in per {
            assert!(c.abs_diff(ideal) <= ideal / 10, "slot share {c} vs ideal {ideal}");
        }
    }

    #[test]
    fn removing_one_backend_moves_about_one_nth() {
        // A flow whose backend stays must (almost always) keep it: only the
        // removed backend's 1/N share moves, plus Maglev's small reshuffle.
        for n in [3usize, 10, 50] {
            let bs = backends(n);
            let (before, m) = assignment(&bs, None, 100_000);
            let removed = bs[n / 2];
            let fewer: Vec<_> = bs.iter().copied().filter(|b| *b != removed).collect();
            let (after, _) = assignment(&fewer, Some(m), 100_000);
            let moved = moved(&before, &after);
            let bound = 1.0 / n as f64 + 0.03;
            assert!(moved <= bound, "n={n}: moved {moved:.4} > {bound:.4}");
        }
    }

    #[test]
    fn adding_one_backend_moves_about_one_over_n_plus_one() {
        for n in [3usize, 10, 50] {
            let bs = backends(n + 1);
            let (before, m) = assignment(&bs[..n], None, 100_000);
            let (after, _) = assignment(&bs, Some(m), 100_000);
            let moved = moved(&before, &after);
            let bound = 1.0 / (n + 1) as f64 + 0.03;
            assert!(moved <= bound, "n={n}: moved {moved:.4} > {bound:.4}");
        }
    }

    #[test]
    fn empty_and_single() {
        assert_eq!(Maglev::new(&[], None).pick(7), None);
        assert_eq!(Maglev::new(&backends(1), None).pick(7), Some(0));
    }
}
