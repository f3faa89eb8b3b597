//! Connection tracking: a bounded, sharded table of NATed flows.
//!
//! Every flow has two keys: `fwd`, the tuple the client sends (client ->
//! frontend), and `rep`, the tuple the backend replies with (backend ->
//! client, or -> the SNAT address). The entry lives in the shard of its
//! `fwd` key; the shard of its `rep` key holds a *link* that names the
//! entry's slot. A reply lookup therefore takes two short lock sections, one
//! per shard, and never holds two locks at once, so there is no lock order
//! to get wrong.
//!
//! Memory: one 48-byte slab slot per flow plus two 20-byte index elements
//! (entry and link) in hashbrown tables sized to stay under 7/8 load at
//! capacity; `cargo run -p bench -- engine` measures the real figure.
//!
//! Expiry is driven by the `now` callers pass: lookups treat expired entries
//! as absent and remove them; [`Conntrack::sweep`] walks one shard per call.
//! **Trust (netfilter's ASSURED).** A flow is *assured* once traffic has
//! been seen both ways (TCP: the handshake completed, or a picked-up flow
//! answered; UDP: a reply). Until then it costs an attacker one spoofed
//! packet, so it lives at most `Timeouts::unassured` and is the first to go.
//! When a shard is full, insertion evicts a victim among 16 sampled slots
//! (up to 512 when those hold nothing expendable): expired first, then
//! unassured flows nobody answered, then unassured flows that were answered
//! (a handshake in progress: a flood of unanswered packets, such as UDP to a
//! closed port, must not evict it before its last ACK arrives), then assured
//! flows that have finished (TIME_WAIT, CLOSE), each time the one nearest
//! expiry. A
//! live assured flow is never evicted: when none of those is found the new
//! flow is refused (`InsertError::Full`), as netfilter's early drop does,
//! so no flood of any kind (SYN, pickup ACKs, UDP) can displace a real
//! connection.

use std::sync::atomic::{AtomicUsize, Ordering};

use hashbrown::HashTable;
use parking_lot::Mutex;

use super::key::FlowKey;
use super::reply_index::ReplyIndex;
use super::tcp::{CtState, Timeouts};
use crate::addr::SvcId;
use crate::time::Time;

/// Sizing and timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtConfig {
    /// Most flows tracked at once (kube-proxy's `conntrack.min` analogue).
    pub capacity: usize,
    pub timeouts: Timeouts,
    /// Most (service, client IP) session-affinity records.
    pub affinity_capacity: usize,
}

impl Default for CtConfig {
    fn default() -> Self {
        CtConfig {
            capacity: 1 << 20,
            timeouts: Timeouts::default(),
            affinity_capacity: 1 << 16,
        }
    }
}

/// One tracked flow. 48 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// As the client sends it: client -> frontend (VIP, LB IP, node:NodePort).
    pub fwd: FlowKey,
    /// As the backend replies: backend -> client (or the SNAT address:port).
    pub rep: FlowKey,
    pub svc: SvcId,
    /// Low 32 bits of the table generation the backend was last checked
    /// against; see the engine's stale-backend handling.
    pub checked_gen: u32,
    /// Expiry, in whole seconds of engine time.
    expires: u32,
    pub state: CtState,
    /// FIN bits (see `tcp`), trust bits and the internal pending bit.
    pub flags: u8,
}

/// A packet was seen in the reply direction.
const SEEN_REPLY: u8 = 0x04;
/// Traffic was seen both ways and the flow reached a live state.
const ASSURED: u8 = 0x08;
const PENDING: u8 = 0x80;

impl Entry {
    pub fn new(fwd: FlowKey, rep: FlowKey, svc: SvcId, checked_gen: u32, state: CtState) -> Self {
        Entry {
            fwd,
            rep,
            svc,
            checked_gen,
            expires: 0,
            state,
            flags: 0,
        }
    }

    /// Sets the state and restarts its timer from `now`. An unassured flow
    /// gets at most `timeouts.unassured`.
    pub fn refresh(&mut self, now: Time, state: CtState, timeouts: &Timeouts) {
        self.state = state;
        let mut d = timeouts.for_state(state);
        if !self.assured() {
            d = d.min(timeouts.unassured);
        }
        self.expires = secs(now).saturating_add(d.as_secs().min(u64::from(u32::MAX)) as u32);
    }

    /// Whether traffic has been seen both ways (see the module docs).
    pub fn assured(&self) -> bool {
        self.flags & ASSURED != 0
    }

    /// The trust bits after a packet in direction `reply` that moves the
    /// flow to `state`: a reply is remembered, and a flow that has one and
    /// is established (TCP) or replied (UDP) becomes assured for good.
    pub fn trust_after(&self, reply: bool, state: CtState) -> u8 {
        let mut f = self.flags;
        if reply {
            f |= SEEN_REPLY;
        }
        if f & SEEN_REPLY != 0 && matches!(state, CtState::Established | CtState::UdpReplied) {
            f |= ASSURED;
        }
        f & (SEEN_REPLY | ASSURED)
    }

    /// Sets the trust bits computed by [`Entry::trust_after`].
    pub fn set_trust(&mut self, bits: u8) {
        self.flags = (self.flags & !(SEEN_REPLY | ASSURED)) | (bits & (SEEN_REPLY | ASSURED));
    }

    fn expired(&self, now: u32) -> bool {
        self.expires <= now
    }

    fn pending(&self) -> bool {
        self.flags & PENDING != 0
    }
}

fn secs(t: Time) -> u32 {
    // Rounds up so an entry never expires early; u32 seconds last 136 years.
    (t.0.div_ceil(1_000_000_000)).min(u64::from(u32::MAX)) as u32
}

/// What a lookup found.
enum Found<R> {
    Ran(R),
    Absent,
    /// Claimed by a flow another worker is inserting.
    Pending,
}

/// Which key a packet matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Forward,
    Reply,
}

/// Why a flow could not be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertError {
    /// Another worker added the same flow first; use that one.
    Exists,
    /// No reply tuple was free (SNAT ports exhausted for this backend).
    NoReplyTuple,
    /// The shard is full of live assured flows (none may be evicted).
    Full,
    /// The reply index had no room for the reply tuple, so its replies
    /// could not be steered to kxp.
    IndexFull,
}

/// What an insertion did besides inserting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inserted {
    pub rep: FlowKey,
    pub evicted: bool,
}

/// Index value: a slab slot in this shard, or (high bit) a link to a global
/// slot `shard * per_shard + slot`.
const LINK: u32 = 1 << 31;

struct Shard {
    slab: Vec<Option<Entry>>,
    free: Vec<u32>,
    index: HashTable<(FlowKey, u32)>,
    live: usize,
    hand: usize,
}

pub struct Conntrack {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    hasher: ahash::RandomState,
    timeouts: Timeouts,
    sweep_cursor: AtomicUsize,
    /// Every reply tuple with a link, for the steering program.
    replies: ReplyIndex,
}

/// What claiming a reply tuple did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Claim {
    Claimed,
    InUse,
    /// Held by a finished flow, which a second pass may replace.
    Finished,
    IndexFull,
}

/// Flows per shard at capacity: with two index elements per flow spread over
/// the shards, 3276 flows keep each 8192-bucket index near 80% load.
const FLOWS_PER_SHARD: usize = 3276;
const EVICTION_SAMPLE: usize = 16;
/// The most slots one insertion looks at before refusing: assured flows
/// sit together (slots are handed out in order, so the connections opened
/// before a flood fill a run of them), and a sample of 16 or 64 inside such
/// a run would refuse a new flow while expendable ones lie just beyond.
const EVICTION_SCAN: usize = 512;

impl Conntrack {
    /// A table whose reply index nobody else reads.
    pub fn new(config: CtConfig) -> Self {
        Self::with_reply_index(config, ReplyIndex::in_memory(config.capacity.max(1)))
    }

    /// A table that keeps `replies` holding exactly its flows' reply
    /// tuples (see `reply_index`).
    pub fn with_reply_index(config: CtConfig, replies: ReplyIndex) -> Self {
        let capacity = config.capacity.max(1);
        let n = capacity.div_ceil(FLOWS_PER_SHARD).clamp(1, 4096);
        let per_shard = capacity.div_ceil(n);
        let shards = (0..n)
            .map(|_| {
                Mutex::new(Shard {
                    slab: Vec::with_capacity(per_shard),
                    free: Vec::new(),
                    index: HashTable::with_capacity(per_shard * 2),
                    live: 0,
                    hand: 0,
                })
            })
            .collect();
        Conntrack {
            shards,
            per_shard,
            hasher: ahash::RandomState::new(),
            timeouts: config.timeouts,
            sweep_cursor: AtomicUsize::new(0),
            replies,
        }
    }

    pub fn reply_index(&self) -> &ReplyIndex {
        &self.replies
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    pub fn capacity(&self) -> usize {
        self.per_shard * self.shards.len()
    }

    #[inline]
    fn hash(&self, k: &FlowKey) -> u64 {
        self.hasher.hash_one(k)
    }

    #[inline]
    fn shard_index(&self, h: u64) -> usize {
        // Multiply-shift over the high half: no power-of-two shard count needed,
        // and independent of the low bits hashbrown uses for buckets.
        (((h >> 32) * self.shards.len() as u64) >> 32) as usize
    }

    /// Runs `f` on the flow `key` belongs to, in whichever direction it
    /// matches, under that entry's shard lock. Expired entries count as
    /// absent (and are removed).
    pub fn with_flow<R>(&self, now: Time, key: &FlowKey, f: impl FnOnce(Dir, &mut Entry) -> R) -> Option<R> {
        match self.lookup(now, key, f) {
            Found::Ran(r) => Some(r),
            Found::Absent | Found::Pending => None,
        }
    }

    /// `with_flow`, telling an absent key from one held by a flow another
    /// worker is still inserting (its reply tuple is taken, but the flow is
    /// not visible yet). Nothing here trusts an index enough to panic on it.
    fn lookup<R>(&self, now: Time, key: &FlowKey, f: impl FnOnce(Dir, &mut Entry) -> R) -> Found<R> {
        let now_s = secs(now);
        let h = self.hash(key);
        let si = self.shard_index(h);
        let target = {
            let mut s = self.shards[si].lock();
            let Some(v) = s.index.find(h, |(k, _)| k == key).map(|&(_, v)| v) else {
                return Found::Absent;
            };
            if v & LINK == 0 {
                let slot = v as usize;
                let Some(e) = s.slab.get_mut(slot).and_then(Option::as_mut) else {
                    return Found::Absent;
                };
                if e.expired(now_s) {
                    let dead = s.remove_slot(slot, h);
                    drop(s);
                    self.unlink(&dead.rep, si, slot);
                    return Found::Absent;
                }
                return Found::Ran(f(Dir::Forward, e));
            }
            (v & !LINK) as usize
        };
        let (ti, slot) = (target / self.per_shard, target % self.per_shard);
        let Some(shard) = self.shards.get(ti) else {
            return Found::Absent;
        };
        let mut s = shard.lock();
        match s.slab.get_mut(slot) {
            // Being inserted: its link is a claim, not a leftover.
            Some(Some(e)) if e.pending() => Found::Pending,
            Some(Some(e)) if e.rep == *key && !e.expired(now_s) => Found::Ran(f(Dir::Reply, e)),
            Some(Some(e)) if e.rep == *key => {
                let fwd = e.fwd;
                let dead = s.remove_slot(slot, self.hash(&fwd));
                drop(s);
                self.unlink(&dead.rep, ti, slot);
                Found::Absent
            }
            // A leftover of a flow that is gone.
            _ => {
                drop(s);
                self.unlink(key, ti, slot);
                Found::Absent
            }
        }
    }

    /// Removes the link `rep` if it still points at `shard`/`slot`.
    fn unlink(&self, rep: &FlowKey, shard: usize, slot: usize) {
        let h = self.hash(rep);
        let want = LINK | (shard * self.per_shard + slot) as u32;
        let mut s = self.shards[self.shard_index(h)].lock();
        if let Ok(occ) = s.index.find_entry(h, |(k, v)| k == rep && *v == want) {
            occ.remove();
            self.replies.remove(rep);
        }
    }

    /// Adds a flow. `entry.rep` is ignored: `candidates(i)` proposes reply
    /// tuples in order (the first that no other flow uses is taken), which
    /// is how SNAT port allocation guarantees it never collides with a live
    /// flow. On success the entry's timer starts at `now`.
    pub fn insert(
        &self,
        now: Time,
        entry: Entry,
        candidates: impl FnMut(u32) -> Option<FlowKey>,
    ) -> Result<Inserted, InsertError> {
        self.insert_between(now, entry, candidates, || {})
    }

    /// `insert`, running `between` after the reply tuple is claimed and
    /// before the flow is published: where another worker's lookups and
    /// insertions may interleave. Tests use it to force that interleaving.
    fn insert_between(
        &self,
        now: Time,
        mut entry: Entry,
        mut candidates: impl FnMut(u32) -> Option<FlowKey>,
        between: impl FnOnce(),
    ) -> Result<Inserted, InsertError> {
        let now_s = secs(now);
        let fh = self.hash(&entry.fwd);
        let fi = self.shard_index(fh);
        entry.refresh(now, entry.state, &self.timeouts);
        entry.flags |= PENDING;
        let mut evicted = None;
        // 1. Reserve a slot (not yet findable by its key).
        let slot = {
            let mut s = self.shards[fi].lock();
            if let Some(&(_, v)) = s.index.find(fh, |(k, _)| *k == entry.fwd) {
                let e = s.slab[v as usize].expect("index points at a live slot");
                if !e.expired(now_s) {
                    return Err(InsertError::Exists);
                }
                let dead = s.remove_slot(v as usize, fh);
                evicted = Some((dead.rep, v as usize, false));
            }
            if s.live >= self.per_shard {
                match s.victim(now_s) {
                    Some(v) => {
                        let fwd = s.slab[v].expect("victim is live").fwd;
                        let dead = s.remove_slot(v, self.hash(&fwd));
                        evicted = Some((dead.rep, v, true));
                    }
                    None => return Err(InsertError::Full),
                }
            }
            s.alloc(entry)
        };
        let was_evicted = evicted.is_some_and(|(_, _, e)| e);
        if let Some((rep, vslot, _)) = evicted {
            self.unlink(&rep, fi, vslot);
        }
        // 2. Claim a reply tuple by inserting its link.
        let link = LINK | (fi * self.per_shard + slot) as u32;
        // A free tuple first; only when there is none does a finished flow
        // (TIME_WAIT, CLOSE) give its tuple up. The far end may still hold
        // state for a finished flow (a lost last ACK leaves the backend in
        // LAST_ACK), so a SNAT port that reused it would be reset; but a
        // client that reuses its own port has no other tuple.
        let mut claimed = None;
        let mut index_full = false;
        let mut finished_seen = false;
        'passes: for replace_finished in [false, true] {
            if replace_finished && !finished_seen {
                break;
            }
            for i in 0.. {
                let Some(rep) = candidates(i) else { break };
                match self.claim(now, rep, link, replace_finished) {
                    Claim::Claimed => {
                        claimed = Some(rep);
                        break 'passes;
                    }
                    Claim::InUse => {}
                    Claim::Finished => finished_seen = true,
                    Claim::IndexFull => index_full = true,
                }
            }
        }
        between();
        // 3. Publish the entry under its forward key.
        let mut s = self.shards[fi].lock();
        let Some(rep) = claimed else {
            s.free_slot(slot);
            return Err(if index_full {
                InsertError::IndexFull
            } else {
                InsertError::NoReplyTuple
            });
        };
        if s.index.find(fh, |(k, _)| *k == entry.fwd).is_some() {
            s.free_slot(slot);
            drop(s);
            self.unlink(&rep, fi, slot);
            return Err(InsertError::Exists);
        }
        let e = s.slab[slot].as_mut().expect("reserved slot");
        e.rep = rep;
        e.flags &= !PENDING;
        let hasher = &self.hasher;
        s.index
            .insert_unique(fh, (entry.fwd, slot as u32), |(k, _)| hasher.hash_one(k));
        Ok(Inserted {
            rep,
            evicted: was_evicted,
        })
    }

    /// Inserts link `rep -> link` (and `rep` into the reply index) unless
    /// `rep` is in use by a live flow or by one being inserted. A flow that
    /// has finished (TIME_WAIT, CLOSE) gives its tuple up to the new one, as
    /// netfilter replaces it, when `replace_finished`.
    fn claim(&self, now: Time, rep: FlowKey, link: u32, replace_finished: bool) -> Claim {
        for attempt in 0..3 {
            let h = self.hash(&rep);
            {
                let mut s = self.shards[self.shard_index(h)].lock();
                match s.index.find(h, |(k, _)| *k == rep) {
                    None => {
                        // Under the lock of `rep`'s shard, like its unlink:
                        // the index sees one key's adds and removes in order.
                        if !self.replies.insert(&rep) {
                            return Claim::IndexFull;
                        }
                        let hasher = &self.hasher;
                        s.index.insert_unique(h, (rep, link), |(k, _)| hasher.hash_one(k));
                        return Claim::Claimed;
                    }
                    Some(&(_, v)) if v & LINK == 0 => return Claim::InUse,
                    Some(_) => {}
                }
            }
            if attempt == 2 {
                return Claim::InUse;
            }
            // A link: a dead flow's leftover (the lookup removes it), a
            // finished flow (replaced), or in use.
            match self.lookup(now, &rep, |_, e| e.state.is_finished().then_some(e.fwd)) {
                Found::Absent => {}
                Found::Ran(Some(fwd)) if replace_finished => {
                    self.remove(&fwd);
                }
                Found::Ran(Some(_)) => return Claim::Finished,
                Found::Ran(None) | Found::Pending => return Claim::InUse,
            }
        }
        Claim::InUse
    }

    /// Removes the flow whose forward key is `fwd`.
    pub fn remove(&self, fwd: &FlowKey) -> Option<Entry> {
        let h = self.hash(fwd);
        let si = self.shard_index(h);
        let mut s = self.shards[si].lock();
        let slot = s
            .index
            .find(h, |(k, v)| k == fwd && v & LINK == 0)
            .map(|&(_, v)| v as usize)?;
        let dead = s.remove_slot(slot, h);
        drop(s);
        self.unlink(&dead.rep, si, slot);
        Some(dead)
    }

    /// Removes expired flows from the next shard in turn; returns how many.
    /// `scratch` is reused between calls so the sweep does not allocate.
    pub fn sweep(&self, now: Time, scratch: &mut Vec<(FlowKey, usize)>) -> usize {
        let now_s = secs(now);
        let si = self.sweep_cursor.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        scratch.clear();
        {
            let mut s = self.shards[si].lock();
            for slot in 0..s.slab.len() {
                let Some(e) = s.slab[slot] else { continue };
                if e.expired(now_s) && !e.pending() {
                    let dead = s.remove_slot(slot, self.hash(&e.fwd));
                    scratch.push((dead.rep, slot));
                }
            }
        }
        for (rep, slot) in scratch.iter() {
            self.unlink(rep, si, *slot);
        }
        scratch.len()
    }

    /// Live flows (locks every shard briefly; for metrics, not the hot path).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().live).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Shard {
    fn alloc(&mut self, e: Entry) -> usize {
        self.live += 1;
        match self.free.pop() {
            Some(i) => {
                self.slab[i as usize] = Some(e);
                i as usize
            }
            None => {
                self.slab.push(Some(e));
                self.slab.len() - 1
            }
        }
    }

    fn free_slot(&mut self, slot: usize) {
        self.slab[slot] = None;
        self.free.push(slot as u32);
        self.live -= 1;
    }

    /// Removes the entry in `slot` (whose forward key hashes to `h`) from the
    /// slab and the index; the caller unlinks its reply key.
    fn remove_slot(&mut self, slot: usize, h: u64) -> Entry {
        let e = self.slab[slot].expect("removing a live slot");
        if let Ok(occ) = self.index.find_entry(h, |(k, v)| *k == e.fwd && *v == slot as u32) {
            occ.remove();
        }
        self.free_slot(slot);
        e
    }

    fn victim(&mut self, now_s: u32) -> Option<usize> {
        let n = self.slab.len();
        if n == 0 {
            return None;
        }
        let mut best: Option<(u8, u32, usize)> = None;
        let mut looked = 0;
        // Look at EVICTION_SAMPLE slots; if none of them is expendable, keep
        // looking (up to EVICTION_SCAN) before refusing the new flow.
        for k in 0..EVICTION_SCAN.min(n) {
            if k >= EVICTION_SAMPLE && best.is_some() {
                break;
            }
            looked = k + 1;
            let i = (self.hand + k) % n;
            let Some(e) = &self.slab[i] else { continue };
            if e.pending() {
                continue;
            }
            let rank = if e.expired(now_s) {
                0
            } else if !e.assured() && e.flags & SEEN_REPLY == 0 {
                1 // nobody answered: a spoofed packet costs nothing more
            } else if !e.assured() {
                2 // answered, not established yet: a handshake in progress
            } else if e.state.is_finished() {
                3
            } else {
                continue; // live and assured: never a victim
            };
            let cand = (rank, e.expires, i);
            if best.is_none_or(|b| (cand.0, cand.1) < (b.0, b.1)) {
                best = Some(cand);
            }
            if rank == 0 {
                break;
            }
        }
        self.hand = (self.hand + looked) % n;
        best.map(|b| b.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{Endpoint, Proto};
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn key(a: u8, ap: u16, b: u8, bp: u16) -> FlowKey {
        FlowKey::new(
            Endpoint::new(Ipv4Addr::new(10, 0, 0, a), ap),
            Endpoint::new(Ipv4Addr::new(10, 0, 1, b), bp),
            Proto::Tcp,
        )
    }

    fn ct(capacity: usize) -> Conntrack {
        Conntrack::new(CtConfig {
            capacity,
            ..CtConfig::default()
        })
    }

    fn add(c: &Conntrack, now: Time, fwd: FlowKey, rep: FlowKey, state: CtState) -> Result<Inserted, InsertError> {
        c.insert(now, Entry::new(fwd, rep, SvcId(1), 0, state), |i| {
            (i == 0).then_some(rep)
        })
    }

    #[test]
    fn finds_both_directions() {
        let c = ct(1000);
        let (f, r) = (key(1, 1000, 1, 80), key(9, 8080, 1, 1000));
        add(&c, Time::ZERO, f, r, CtState::Established).unwrap();
        assert_eq!(c.with_flow(Time::ZERO, &f, |d, e| (d, e.rep)), Some((Dir::Forward, r)));
        assert_eq!(c.with_flow(Time::ZERO, &r, |d, e| (d, e.fwd)), Some((Dir::Reply, f)));
        assert_eq!(c.with_flow(Time::ZERO, &key(2, 1, 1, 80), |_, _| ()), None);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn duplicate_forward_and_reply_keys_are_refused() {
        let c = ct(1000);
        let (f, r) = (key(1, 1000, 1, 80), key(9, 8080, 1, 1000));
        add(&c, Time::ZERO, f, r, CtState::Established).unwrap();
        assert_eq!(
            add(&c, Time::ZERO, f, key(8, 1, 1, 1), CtState::Established),
            Err(InsertError::Exists)
        );
        // A second flow that would produce the same reply tuple takes the next candidate.
        let f2 = key(1, 1000, 2, 80);
        let r2 = key(9, 8080, 1, 1001);
        let got = c
            .insert(
                Time::ZERO,
                Entry::new(f2, r, SvcId(2), 0, CtState::Established),
                |i| match i {
                    0 => Some(r),
                    1 => Some(r2),
                    _ => None,
                },
            )
            .unwrap();
        assert_eq!(got.rep, r2);
        assert_eq!(c.len(), 2);
        // No candidate at all: refused, nothing left behind.
        let f3 = key(1, 1000, 3, 80);
        assert_eq!(
            c.insert(Time::ZERO, Entry::new(f3, r, SvcId(2), 0, CtState::Established), |i| (i
                == 0)
                .then_some(r)),
            Err(InsertError::NoReplyTuple)
        );
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn the_reply_index_holds_exactly_the_live_reply_tuples() {
        let c = ct(64);
        let idx = c.reply_index();
        let flow = |i: u8| (key(i, 1000, 1, 80), key(9, 8080, i, 1000));
        for i in 1..=3 {
            let (f, r) = flow(i);
            add(&c, Time::ZERO, f, r, CtState::SynSent).unwrap();
            assert!(idx.contains(&r) && !idx.contains(&f), "only the reply tuple is steered");
        }
        // Removed by hand, by expiry on lookup, by the sweep: gone from the index.
        c.remove(&flow(1).0);
        assert!(!idx.contains(&flow(1).1));
        let later = Time::ZERO + c.timeouts().unassured;
        assert!(c.with_flow(later, &flow(2).1, |_, _| ()).is_none());
        assert!(!idx.contains(&flow(2).1));
        let mut scratch = Vec::new();
        for _ in 0..c.shards.len() {
            c.sweep(later, &mut scratch);
        }
        assert_eq!((c.len(), idx.len()), (0, 0));
        // A finished flow whose tuple a new one claims: the tuple stays, now the new flow's.
        let (f, r) = flow(4);
        add(&c, later, f, r, CtState::TimeWait).unwrap();
        add(&c, later, key(5, 1, 1, 80), r, CtState::SynSent).unwrap();
        assert_eq!(c.with_flow(later, &r, |_, e| e.fwd), Some(key(5, 1, 1, 80)));
        assert_eq!(idx.len(), 1);
        // A full shard evicting an unassured flow takes its tuple out too.
        let c = ct(1);
        add(&c, Time::ZERO, flow(6).0, flow(6).1, CtState::SynSent).unwrap();
        assert!(
            add(&c, Time::ZERO, flow(7).0, flow(7).1, CtState::SynSent)
                .unwrap()
                .evicted
        );
        let idx = c.reply_index();
        assert!(!idx.contains(&flow(6).1) && idx.contains(&flow(7).1));
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn a_reply_tuple_the_index_cannot_hold_refuses_the_flow() {
        let one_bucket: Box<[std::sync::atomic::AtomicU64]> = (0..super::super::reply_index::WORDS_PER_BUCKET)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect();
        let c = Conntrack::with_reply_index(
            CtConfig {
                capacity: 1000,
                ..CtConfig::default()
            },
            ReplyIndex::over(Box::new(one_bucket), 1).unwrap(),
        );
        for i in 1..=8 {
            add(&c, Time::ZERO, key(i, 1, 1, 80), key(9, 80, i, 1), CtState::SynSent).unwrap();
        }
        assert_eq!(
            add(&c, Time::ZERO, key(20, 1, 1, 80), key(9, 80, 20, 1), CtState::SynSent),
            Err(InsertError::IndexFull)
        );
        assert_eq!(c.len(), 8, "the refused flow left nothing behind");
        assert!(c.with_flow(Time::ZERO, &key(9, 80, 20, 1), |_, _| ()).is_none());
    }

    #[test]
    fn entries_expire_by_the_time_passed_in() {
        let c = ct(1000);
        let (f, r) = (key(1, 1000, 1, 80), key(9, 8080, 1, 1000));
        add(&c, Time::ZERO, f, r, CtState::SynSent).unwrap();
        // Half-open: unassured, so the shorter of the two timeouts.
        let syn = c.timeouts().tcp_syn_sent.min(c.timeouts().unassured);
        assert!(c
            .with_flow(Time::ZERO + (syn - Duration::from_secs(1)), &r, |_, _| ())
            .is_some());
        assert!(c.with_flow(Time::ZERO + syn, &r, |_, _| ()).is_none());
        assert_eq!(c.len(), 0);
        // Its reply tuple is free again.
        add(&c, Time::ZERO + syn, key(2, 1, 1, 80), r, CtState::SynSent).unwrap();
    }

    #[test]
    fn sweep_removes_expired_entries_and_links() {
        let c = ct(100);
        for i in 0..50u16 {
            add(
                &c,
                Time::ZERO,
                key(1, 1000 + i, 1, 80),
                key(9, 8080, 1, 1000 + i),
                CtState::UdpUnreplied,
            )
            .unwrap();
        }
        let later = Time::ZERO + c.timeouts().udp;
        let mut scratch = Vec::new();
        let mut removed = 0;
        for _ in 0..c.shards.len() {
            removed += c.sweep(later, &mut scratch);
        }
        assert_eq!(removed, 50);
        assert!(c.is_empty());
        for s in c.shards.iter() {
            assert_eq!(s.lock().index.len(), 0, "links were left behind");
        }
    }

    /// Marks a flow as having seen traffic both ways.
    fn assure(c: &Conntrack, now: Time, f: &FlowKey) {
        c.with_flow(now, f, |_, e| {
            e.set_trust(e.trust_after(true, CtState::Established));
            let state = e.state;
            e.refresh(now, state, &Timeouts::default());
        })
        .unwrap();
    }

    #[test]
    fn eviction_prefers_half_open_flows() {
        let c = ct(64);
        let per = c.per_shard;
        // Fill with established flows, then flood with SYNs.
        let mut established = Vec::new();
        for i in 0..(per as u16 / 2) {
            let f = key(1, 2000 + i, 1, 80);
            add(&c, Time::ZERO, f, key(9, 80, 1, 2000 + i), CtState::Established).unwrap();
            assure(&c, Time::ZERO, &f);
            established.push(f);
        }
        let mut evictions = 0;
        for i in 0..(per as u16 * 4) {
            let f = key(2, 3000 + i, 1, 80);
            if add(&c, Time::ZERO, f, key(9, 80, 2, 3000 + i), CtState::SynSent)
                .unwrap()
                .evicted
            {
                evictions += 1;
            }
        }
        assert!(evictions > 0);
        assert!(c.len() <= c.capacity());
        let survivors = established
            .iter()
            .filter(|f| c.with_flow(Time::ZERO, f, |_, _| ()).is_some())
            .count();
        assert_eq!(survivors, established.len(), "a SYN flood evicted established flows");
    }

    #[test]
    fn a_free_snat_tuple_is_preferred_to_a_finished_flows() {
        let c = ct(64);
        let (r1, r2) = (key(9, 80, 1, 1000), key(9, 80, 1, 1001));
        let a = key(1, 5000, 1, 80);
        add(&c, Time::ZERO, a, r1, CtState::TimeWait).unwrap();
        // SNAT: two ports to choose from; the finished flow's is left alone
        // (the backend may still be in LAST_ACK on it).
        let b = key(2, 5000, 1, 80);
        let got = c
            .insert(Time::ZERO, Entry::new(b, b, SvcId(1), 0, CtState::SynSent), |i| {
                [r1, r2].get(i as usize).copied()
            })
            .unwrap();
        assert_eq!(got.rep, r2);
        assert!(c.with_flow(Time::ZERO, &a, |_, _| ()).is_some());
        // The only tuple there is: the finished flow gives it up.
        let d = key(3, 5000, 1, 80);
        assert_eq!(add(&c, Time::ZERO, d, r1, CtState::SynSent).unwrap().rep, r1);
        assert!(c.with_flow(Time::ZERO, &a, |_, _| ()).is_none());
    }

    #[test]
    fn an_unanswered_flood_evicts_its_own_flows_before_an_answered_handshake() {
        let c = ct(64);
        let per = c.per_shard;
        // A handshake in progress: the backend's SYN-ACK was seen.
        let f = key(1, 1000, 1, 80);
        add(&c, Time::ZERO, f, key(9, 80, 1, 1000), CtState::SynSent).unwrap();
        c.with_flow(Time::ZERO, &key(9, 80, 1, 1000), |_, e| {
            let bits = e.trust_after(true, CtState::SynRecv);
            e.set_trust(bits);
        });
        // Many times the table's size in UDP nobody answers, each newer
        // (later expiry) than the handshake.
        for i in 0..(per as u16 * 8) {
            let t = Time::from_secs(u64::from(i) / 64);
            add(
                &c,
                t,
                key(2, 3000 + i, 1, 53),
                key(9, 53, 2, 3000 + i),
                CtState::UdpUnreplied,
            )
            .unwrap();
        }
        assert!(
            c.with_flow(Time::from_secs(1), &f, |_, _| ()).is_some(),
            "the flood evicted an answered handshake"
        );
    }

    #[test]
    fn a_full_table_of_assured_flows_refuses_new_ones_instead_of_evicting() {
        let c = ct(64);
        let per = c.per_shard as u16;
        let mut real = Vec::new();
        for i in 0..per {
            let f = key(1, 2000 + i, 1, 80);
            add(&c, Time::ZERO, f, key(9, 80, 1, 2000 + i), CtState::Established).unwrap();
            assure(&c, Time::ZERO, &f);
            real.push(f);
        }
        // Pickups (established but unassured), SYNs and UDP: none gets in.
        for (i, state) in [CtState::Established, CtState::SynSent, CtState::UdpUnreplied]
            .into_iter()
            .enumerate()
        {
            let f = key(2, 3000 + i as u16, 1, 80);
            assert_eq!(
                add(&c, Time::ZERO, f, key(9, 80, 2, 3000 + i as u16), state),
                Err(InsertError::Full)
            );
        }
        assert!(real.iter().all(|f| c.with_flow(Time::ZERO, f, |_, _| ()).is_some()));
        // Assured flows in a run longer than one sample do not hide the
        // expendable ones behind them.
        let c2 = ct(1024);
        let per2 = c2.per_shard as u16;
        for i in 0..per2 {
            let f = key(3, 2000 + i, 1, 80);
            add(&c2, Time::ZERO, f, key(9, 80, 3, 2000 + i), CtState::Established).unwrap();
            if i < 300 {
                assure(&c2, Time::ZERO, &f);
            }
        }
        for i in 0..50 {
            add(
                &c2,
                Time::ZERO,
                key(4, 5000 + i, 1, 80),
                key(9, 80, 4, 5000 + i),
                CtState::SynSent,
            )
            .unwrap();
        }
        // A finished assured flow makes room.
        c.with_flow(Time::ZERO, &real[0], |_, e| e.state = CtState::TimeWait)
            .unwrap();
        add(
            &c,
            Time::ZERO,
            key(2, 4000, 1, 80),
            key(9, 80, 2, 4000),
            CtState::SynSent,
        )
        .unwrap();
        assert!(c.with_flow(Time::ZERO, &real[0], |_, _| ()).is_none());
        assert!(real[1..]
            .iter()
            .all(|f| c.with_flow(Time::ZERO, f, |_, _| ()).is_some()));
    }

    #[test]
    fn unassured_flows_live_short_and_assured_ones_get_their_states_timeout() {
        let c = ct(1000);
        let t = *c.timeouts();
        let (f, r) = (key(1, 1000, 1, 80), key(9, 8080, 1, 1000));
        // A mid-stream pickup: established, but nothing seen back yet.
        add(&c, Time::ZERO, f, r, CtState::Established).unwrap();
        assert!(c.with_flow(Time::ZERO + t.unassured, &f, |_, _| ()).is_none());
        add(&c, Time::ZERO, f, r, CtState::Established).unwrap();
        assure(&c, Time::ZERO, &f);
        assert!(c
            .with_flow(Time::ZERO + t.unassured * 100, &f, |_, e| e.assured())
            .unwrap());
        // Trust needs a reply: forward packets alone never assure.
        let e = Entry::new(f, r, SvcId(1), 0, CtState::Established);
        assert_eq!(e.trust_after(false, CtState::Established) & ASSURED, 0);
        assert_ne!(e.trust_after(true, CtState::Established) & ASSURED, 0);
        assert_eq!(e.trust_after(true, CtState::SynRecv) & ASSURED, 0);
    }

    #[test]
    fn a_reply_tuple_being_claimed_is_never_handed_out_twice() {
        let c = ct(1000);
        let now = Time::ZERO;
        let r = key(9, 8080, 1, 1000);
        let r2 = key(9, 8080, 1, 1001);
        let (fa, fb) = (key(1, 1000, 1, 80), key(2, 1000, 1, 80));
        let a = c
            .insert_between(
                now,
                Entry::new(fa, fa, SvcId(1), 0, CtState::SynSent),
                |i| (i == 0).then_some(r),
                || {
                    // Worker B, while A's flow is claimed but not yet published:
                    // a reply for the tuple finds nothing to translate ...
                    assert!(c.with_flow(now, &r, |_, _| ()).is_none());
                    // ... and B's own flow wanting the same tuple gets another.
                    let b = c.insert(now, Entry::new(fb, fb, SvcId(2), 0, CtState::SynSent), |i| match i {
                        0 => Some(r),
                        1 => Some(r2),
                        _ => None,
                    });
                    assert_eq!(b.map(|b| b.rep), Ok(r2));
                },
            )
            .unwrap();
        assert_eq!(a.rep, r);
        assert_eq!(c.with_flow(now, &r, |_, e| e.fwd), Some(fa));
        assert_eq!(c.with_flow(now, &r2, |_, e| e.fwd), Some(fb));
    }

    #[test]
    fn a_finished_flow_gives_its_reply_tuple_to_a_new_one() {
        let c = ct(1000);
        let r = key(9, 8080, 1, 1000);
        let old = key(1, 1000, 1, 80);
        add(&c, Time::ZERO, old, r, CtState::Established).unwrap();
        // Live: the tuple stays its own.
        assert_eq!(
            add(&c, Time::ZERO, key(2, 1000, 1, 80), r, CtState::SynSent),
            Err(InsertError::NoReplyTuple)
        );
        c.with_flow(Time::ZERO, &old, |_, e| e.state = CtState::TimeWait)
            .unwrap();
        let new = key(3, 1000, 1, 80);
        assert_eq!(add(&c, Time::ZERO, new, r, CtState::SynSent).map(|i| i.rep), Ok(r));
        assert_eq!(c.with_flow(Time::ZERO, &r, |_, e| e.fwd), Some(new));
        assert!(
            c.with_flow(Time::ZERO, &old, |_, _| ()).is_none(),
            "the finished flow is gone"
        );
    }

    #[test]
    fn remove_drops_both_keys() {
        let c = ct(1000);
        let (f, r) = (key(1, 1000, 1, 80), key(9, 8080, 1, 1000));
        add(&c, Time::ZERO, f, r, CtState::Established).unwrap();
        assert!(c.remove(&f).is_some());
        assert!(c.with_flow(Time::ZERO, &r, |_, _| ()).is_none());
        assert!(c.remove(&f).is_none());
        add(&c, Time::ZERO, key(3, 1, 1, 80), r, CtState::Established).unwrap();
    }

    #[test]
    fn entry_is_48_bytes() {
        assert_eq!(std::mem::size_of::<Option<Entry>>(), 48);
    }
}
