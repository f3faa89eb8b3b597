//! A per-worker cache of overlay peers (node address -> its pod CIDR), so
//! validating a decapsulated packet costs one array probe instead of a
//! hash lookup. Tagged with the table generation like the route cache:
//! any publish invalidates every entry. Only known peers are cached; VXLAN
//! from anyone else always takes the table's answer.

use std::net::Ipv4Addr;

use crate::addr::Cidr;

const SLOTS: usize = 256;

pub(super) struct PeerCache {
    slots: Box<[Option<(u64, Ipv4Addr, Cidr)>]>,
}

impl Default for PeerCache {
    fn default() -> Self {
        PeerCache {
            slots: vec![None; SLOTS].into_boxed_slice(),
        }
    }
}

impl PeerCache {
    fn index(peer: Ipv4Addr) -> usize {
        (crate::hash::mix64(u64::from(u32::from(peer))) as usize) % SLOTS
    }

    #[inline]
    pub(super) fn get(&self, generation: u64, peer: Ipv4Addr) -> Option<Cidr> {
        match self.slots[Self::index(peer)] {
            Some((g, p, c)) if g == generation && p == peer => Some(c),
            _ => None,
        }
    }

    pub(super) fn put(&mut self, generation: u64, peer: Ipv4Addr, pod_cidr: Cidr) {
        self.slots[Self::index(peer)] = Some((generation, peer, pod_cidr));
    }
}
