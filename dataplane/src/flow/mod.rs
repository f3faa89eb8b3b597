//! Per-flow mutable state shared by all workers: connection tracking and
//! session affinity.
//!
//! Both are sharded hash tables behind short per-shard mutexes. A reply can
//! arrive on any worker (RSS hashes the NATed reply tuple independently of
//! the request's), so per-worker tables would miss it; a shared table with
//! many shards keeps contention negligible (two workers collide on a shard
//! with probability 1/shards per packet) and needs no steering tricks.
//! Rejected alternatives: per-worker tables plus reply steering in XDP
//! (needs the SNAT port to encode the worker, and breaks for DNAT-only
//! flows); a fully lock-free open-addressing table (harder to make evict
//! correctly, for little gain at these core counts).

pub mod affinity;
pub mod conntrack;
pub mod fragments;
pub mod key;
pub mod reply_index;
pub mod tcp;

pub use affinity::Affinity;
pub use conntrack::{Conntrack, CtConfig, Dir, Entry};
pub use key::FlowKey;
pub use tcp::{CtState, Timeouts};

/// Datagrams whose later fragments kxp translates at once (30 s each).
const FRAGMENT_CAPACITY: usize = 16384;

/// The shared flow state one node's workers use.
pub struct FlowState {
    pub conntrack: Conntrack,
    pub affinity: Affinity,
    pub fragments: fragments::Fragments,
}

impl FlowState {
    pub fn new(config: CtConfig) -> Self {
        Self::with_reply_index(config, reply_index::ReplyIndex::in_memory(config.capacity.max(1)))
    }

    /// Flow state whose conntrack keeps `replies` (e.g. memory the XDP
    /// steering program reads) holding its flows' reply tuples.
    pub fn with_reply_index(config: CtConfig, replies: reply_index::ReplyIndex) -> Self {
        FlowState {
            conntrack: Conntrack::with_reply_index(config, replies),
            affinity: Affinity::new(config.affinity_capacity),
            fragments: fragments::Fragments::new(FRAGMENT_CAPACITY),
        }
    }
}
