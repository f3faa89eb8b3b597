//! A per-worker cache of egress decisions, so an established flow's packet
//! costs one array probe instead of several table lookups (local pods, pod
//! routes, neighbours). Entries are tagged with the table generation they
//! were computed from: any publish invalidates them all, so the cache can
//! never disagree with the tables.

use std::net::Ipv4Addr;

use crate::addr::{Mac, PortId};
use crate::tables::RemoteNode;

/// Where packets for one destination go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Egress {
    /// Out of `port` to `mac` (a local pod, or a host/gateway on the uplink).
    Direct { port: PortId, mac: Mac },
    /// VXLAN to another node, whose underlay next hop is `next_hop`.
    Overlay { node: RemoteNode, next_hop: Mac },
}

const SLOTS: usize = 1024;

#[derive(Clone, Copy)]
struct Slot {
    generation: u64,
    dst: Ipv4Addr,
    egress: Egress,
}

pub(super) struct RouteCache {
    slots: Box<[Option<Slot>]>,
}

impl Default for RouteCache {
    fn default() -> Self {
        RouteCache {
            slots: vec![None; SLOTS].into_boxed_slice(),
        }
    }
}

impl RouteCache {
    fn index(dst: Ipv4Addr) -> usize {
        (crate::hash::mix64(u64::from(u32::from(dst))) as usize) % SLOTS
    }

    #[inline]
    pub(super) fn get(&self, generation: u64, dst: Ipv4Addr) -> Option<Egress> {
        match self.slots[Self::index(dst)] {
            Some(s) if s.generation == generation && s.dst == dst => Some(s.egress),
            _ => None,
        }
    }

    pub(super) fn put(&mut self, generation: u64, dst: Ipv4Addr, egress: Egress) {
        self.slots[Self::index(dst)] = Some(Slot {
            generation,
            dst,
            egress,
        });
    }
}
