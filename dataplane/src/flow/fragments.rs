//! Fragments of NATed datagrams.
//!
//! Only a datagram's first fragment carries ports, so only it can be
//! matched to a flow; the others carry the datagram's key (source,
//! destination, protocol, IP identification) and nothing else. When kxp
//! translates a first fragment it records the key and the addresses it
//! wrote; later fragments with that key get the same addresses (the L4
//! checksum, in the first fragment, already covers the whole datagram's
//! new pseudo-header). A later fragment that arrives before its first one
//! is not translated (see the engine).
//!
//! Bounded, with the kernel's reassembly timeout (`ipfrag_time`, 30 s),
//! sharded like conntrack because fragments of one datagram may reach
//! different workers. Rejected: reassembling in kxp (buffers a whole
//! datagram per flow, and the receiver reassembles anyway).

use std::collections::HashMap;
use std::net::Ipv4Addr;

use parking_lot::Mutex;

use crate::time::Time;

/// Names one datagram's fragments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub id: u16,
}

impl FragKey {
    /// The key of the datagram `ip` is (a fragment of).
    pub fn of(ip: &crate::wire::ipv4::Ipv4) -> Self {
        FragKey {
            src: ip.src,
            dst: ip.dst,
            proto: ip.proto,
            id: ip.id,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Translation {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    expires: Time,
}

const SHARDS: usize = 16;
/// The kernel's `ipfrag_time`.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub struct Fragments {
    shards: Box<[Mutex<HashMap<FragKey, Translation, ahash::RandomState>>]>,
    per_shard: usize,
}

impl Fragments {
    pub fn new(capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS).max(1);
        Fragments {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_capacity_and_hasher(per_shard, ahash::RandomState::new())))
                .collect(),
            per_shard,
        }
    }

    fn shard(&self, k: &FragKey) -> &Mutex<HashMap<FragKey, Translation, ahash::RandomState>> {
        let h = u32::from(k.src) ^ u32::from(k.dst).rotate_left(16) ^ u32::from(k.id);
        &self.shards[h as usize % SHARDS]
    }

    /// Records that the datagram `k` is translated to `src` -> `dst`.
    /// A full shard drops its expired entries, then, if still full, any one
    /// entry: a translation is needed only for the milliseconds until its
    /// datagram's last fragment, so a flood of first fragments (one forged
    /// packet each) may push out old entries but never locks new datagrams
    /// out. Returns true when a live entry was evicted.
    pub fn record(&self, now: Time, k: FragKey, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        let mut m = self.shard(&k).lock();
        let mut evicted = false;
        if m.len() >= self.per_shard && !m.contains_key(&k) {
            m.retain(|_, t| t.expires > now);
            if m.len() >= self.per_shard {
                if let Some(old) = m.keys().next().copied() {
                    m.remove(&old);
                    evicted = true;
                }
            }
        }
        m.insert(
            k,
            Translation {
                src,
                dst,
                expires: now + TIMEOUT,
            },
        );
        evicted
    }

    /// The addresses a later fragment of `k` gets, if its first fragment
    /// was translated less than 30 s ago.
    pub fn lookup(&self, now: Time, k: &FragKey) -> Option<(Ipv4Addr, Ipv4Addr)> {
        let m = self.shard(k).lock();
        m.get(k).filter(|t| t.expires > now).map(|t| (t.src, t.dst))
    }

    /// Live entries (for metrics and tests).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u16) -> FragKey {
        FragKey {
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 96, 0, 1),
            proto: 17,
            id,
        }
    }

    #[test]
    fn translations_are_found_bounded_and_expire() {
        let f = Fragments::new(32);
        let (a, b) = (Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(2, 2, 2, 2));
        let t0 = Time::from_secs(100);
        f.record(t0, key(1), a, b);
        assert_eq!(f.lookup(t0, &key(1)), Some((a, b)));
        assert_eq!(f.lookup(t0, &key(2)), None);
        assert_eq!(f.lookup(t0 + TIMEOUT, &key(1)), None, "expired");
        // Bounded, and a flood cannot lock a new datagram out: it is recorded
        // (evicting another) and found.
        let evictions = (0..1000u16).filter(|i| f.record(t0, key(*i), a, b)).count();
        assert!(evictions > 0 && f.len() <= 32 + SHARDS);
        f.record(t0, key(5000), b, a);
        assert_eq!(f.lookup(t0, &key(5000)), Some((b, a)));
    }
}
