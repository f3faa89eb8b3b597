//! Session affinity (`sessionAffinity: ClientIP`): the backend a client IP
//! was last sent to, per service, until `timeoutSeconds` pass without a new
//! connection. Like kube-proxy's `recent` match, each new connection
//! refreshes the timer; packets of existing connections do not need to,
//! since conntrack already pins them.

use std::net::Ipv4Addr;
use std::time::Duration;

use hashbrown::HashTable;
use parking_lot::Mutex;

use crate::addr::{BackendAddr, SvcId};
use crate::time::Time;

type Key = (SvcId, Ipv4Addr);

struct Shard {
    map: HashTable<(Key, BackendAddr, Time)>,
}

pub struct Affinity {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    hasher: ahash::RandomState,
}

const SHARDS: usize = 64;

impl Affinity {
    pub fn new(capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS).max(1);
        Affinity {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard { map: HashTable::new() }))
                .collect(),
            per_shard,
            hasher: ahash::RandomState::new(),
        }
    }

    fn shard(&self, h: u64) -> &Mutex<Shard> {
        &self.shards[(h >> 40) as usize % SHARDS]
    }

    /// The remembered backend if it was used less than `timeout` ago.
    pub fn get(&self, now: Time, svc: SvcId, client: Ipv4Addr, timeout: Duration) -> Option<BackendAddr> {
        let k = (svc, client);
        let h = self.hasher.hash_one(k);
        let s = self.shard(h).lock();
        let &(_, b, last) = s.map.find(h, |(kk, _, _)| *kk == k)?;
        (now.since(last) < timeout).then_some(b)
    }

    /// Records that `client` was just sent to `backend`. When the shard is
    /// full, stale records (older than `timeout`) are dropped first; if none
    /// is stale the record is not kept and the client is balanced by Maglev
    /// alone (reported as `false`).
    pub fn set(&self, now: Time, svc: SvcId, client: Ipv4Addr, backend: BackendAddr, timeout: Duration) -> bool {
        let k = (svc, client);
        let h = self.hasher.hash_one(k);
        let mut s = self.shard(h).lock();
        if let Some(v) = s.map.find_mut(h, |(kk, _, _)| *kk == k) {
            *v = (k, backend, now);
            return true;
        }
        if s.map.len() >= self.per_shard {
            s.map.retain(|(_, _, last)| now.since(*last) < timeout);
            if s.map.len() >= self.per_shard {
                return false;
            }
        }
        let hasher = &self.hasher;
        s.map
            .insert_unique(h, (k, backend, now), |(kk, _, _)| hasher.hash_one(kk));
        true
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::Endpoint;

    #[test]
    fn remembers_until_timeout() {
        let a = Affinity::new(100);
        let c = Ipv4Addr::new(1, 2, 3, 4);
        let b = BackendAddr(Endpoint::new(Ipv4Addr::new(10, 244, 0, 5), 80));
        let t = Duration::from_secs(10);
        assert!(a.set(Time::ZERO, SvcId(1), c, b, t));
        assert_eq!(a.get(Time::from_secs(9), SvcId(1), c, t), Some(b));
        assert_eq!(a.get(Time::from_secs(10), SvcId(1), c, t), None);
        assert_eq!(a.get(Time::from_secs(1), SvcId(2), c, t), None);
    }

    #[test]
    fn full_table_drops_stale_records_first() {
        let a = Affinity::new(SHARDS); // one record per shard
        let t = Duration::from_secs(10);
        let b = BackendAddr(Endpoint::new(Ipv4Addr::new(10, 244, 0, 5), 80));
        for i in 0..1000u32 {
            a.set(Time::ZERO, SvcId(1), Ipv4Addr::from(i), b, t);
        }
        assert!(a.len() <= SHARDS);
        let fresh = (0..1000u32)
            .filter(|i| a.set(Time::from_secs(20), SvcId(1), Ipv4Addr::from(*i), b, t))
            .count();
        assert!(fresh >= 1, "stale records must make room");
    }
}
