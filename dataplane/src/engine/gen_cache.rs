//! A per-worker cache of decisions by IPv4 address (where a destination's
//! packets go; what an overlay peer may speak for), so a packet costs one
//! array probe instead of several table lookups. Direct-mapped, and each
//! entry is tagged with the table generation it was computed from: any
//! publish invalidates them all, so the cache can never disagree with the
//! tables.

use std::net::Ipv4Addr;

pub(super) struct GenCache<V: Copy> {
    slots: Box<[Option<(u64, Ipv4Addr, V)>]>,
}

impl<V: Copy> GenCache<V> {
    /// `slots` is rounded up to a power of two: the index is a mask, not
    /// a division, on every packet.
    pub(super) fn new(slots: usize) -> Self {
        GenCache {
            slots: vec![None; slots.max(1).next_power_of_two()].into_boxed_slice(),
        }
    }

    #[inline]
    fn index(&self, key: Ipv4Addr) -> usize {
        (crate::hash::mix64(u64::from(u32::from(key))) as usize) & (self.slots.len() - 1)
    }

    #[inline]
    pub(super) fn get(&self, generation: u64, key: Ipv4Addr) -> Option<V> {
        match self.slots[self.index(key)] {
            Some((g, k, v)) if g == generation && k == key => Some(v),
            _ => None,
        }
    }

    pub(super) fn put(&mut self, generation: u64, key: Ipv4Addr, value: V) {
        let i = self.index(key);
        self.slots[i] = Some((generation, key, value));
    }
}
