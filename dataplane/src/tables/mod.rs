//! The published, immutable snapshot of everything control decided, and its
//! atomic publication.
//!
//! **Contract.** Workers `load()` the current [`Tables`] once per batch and
//! never see a half-applied update. Control edits a private clone and
//! [`Publisher::publish`]es it; the swap is one atomic pointer store
//! (arc-swap, RCU style), and the old snapshot is freed when the last worker
//! drops its guard.
//!
//! **O(changed) updates.** The maps are persistent hash array mapped tries
//! (`imbl`): cloning a snapshot is O(1) and an insert copies only the
//! O(log32 n) path to the changed leaf, so adding one service among 100,000
//! touches a handful of small nodes instead of copying the world.
//! Rejected alternatives: a flat `HashMap` behind arc-swap (every update
//! copies all entries: O(n)); a concurrent map mutated in place (workers would
//! see a service's frontends appear one by one, and a batch could see two
//! different worlds).

pub mod maglev;
pub mod node;
pub mod service;

use std::net::Ipv4Addr;
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use imbl::shared_ptr::DefaultSharedPtr;
use imbl::GenericHashMap;

use crate::addr::{Cidr, Frontend, Mac, PortId, Proto, SvcId};
pub use node::{ChecksumPolicy, NodeConfig, PortInfo, PortRole, VxlanConfig};
pub use service::{EndpointInfo, Reach, ServicePort, ServiceSpec};

type Map<K, V> = GenericHashMap<K, V, ahash::RandomState, DefaultSharedPtr>;

fn map<K, V>() -> Map<K, V> {
    // Fixed seeds: keys come from control, not from the network, and a
    // deterministic layout keeps benchmarks repeatable.
    GenericHashMap::with_hasher(ahash::RandomState::with_seeds(1, 2, 3, 4))
}

/// A pod on this node: the port its veth is on and its MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub port: PortId,
    pub mac: Mac,
}

/// The source addresses of one pod port, inline for the common case (a pod
/// has one IPv4 address).
#[derive(Clone, Copy, Debug)]
struct PodSources {
    addrs: [Ipv4Addr; 2],
    /// How many addresses the port has; above `addrs.len()` the map decides.
    count: u8,
}

impl Default for PodSources {
    fn default() -> Self {
        PodSources {
            addrs: [Ipv4Addr::UNSPECIFIED; 2],
            count: 0,
        }
    }
}

/// Another node, reached over VXLAN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteNode {
    /// Its underlay address (outer destination).
    pub node_ip: Ipv4Addr,
    /// Its VTEP MAC (inner destination), e.g. Flannel's `VtepMAC`.
    pub vtep_mac: Mac,
}

/// Why control's change could not be applied; the snapshot is unchanged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error("service {new}: {frontend_ip}:{port}/{proto} is already used by service {owner}")]
    DuplicateFrontend {
        new: String,
        owner: String,
        frontend_ip: Ipv4Addr,
        port: u16,
        proto: Proto,
    },
    #[error("service {new}: NodePort {port}/{proto} is already used by service {owner}")]
    DuplicateNodePort {
        new: String,
        owner: String,
        port: u16,
        proto: Proto,
    },
    #[error("service {name}: NodePort {port} is outside the node port range {lo}-{hi}")]
    NodePortOutOfRange { name: String, port: u16, lo: u16, hi: u16 },
}

/// Where a destination matched a service, and through which frontend kind.
pub struct ServiceMatch<'a> {
    pub svc: &'a Arc<ServicePort>,
    pub reach: Reach,
}

/// One immutable snapshot of the dataplane's configuration.
#[derive(Clone)]
pub struct Tables {
    generation: u64,
    node: Arc<NodeConfig>,
    frontends: Map<Frontend, (Arc<ServicePort>, Reach)>,
    node_ports: Map<(Proto, u16), Arc<ServicePort>>,
    services: Map<SvcId, Arc<ServicePort>>,
    local_pods: Map<Ipv4Addr, LocalPod>,
    /// The addresses each port's pod may send from, by `PortId` (derived
    /// from `local_pods`): the per-packet source check is an index and a
    /// compare, not a map lookup.
    pod_sources: Arc<[PodSources]>,
    /// The lowest and highest local pod address: a cheap first filter for
    /// "is this a local pod's address", asked of every uplink packet.
    local_pod_span: (u32, u32),
    pod_routes: Map<Cidr, RemoteNode>,
    /// Distinct prefix lengths in `pod_routes`, longest first.
    route_lens: Arc<[u8]>,
    /// Node address -> its pod CIDR, for every route: the only sources
    /// VXLAN is accepted from, and what each may speak for. A plain hash
    /// map rebuilt per route change: it is read for every decapsulated
    /// packet, and a binary search's branches cost 30 ns there.
    overlay_peers: Arc<std::collections::HashMap<Ipv4Addr, Cidr, ahash::RandomState>>,
    neighbors: Map<Ipv4Addr, Mac>,
}

impl Tables {
    pub fn new(node: NodeConfig) -> Self {
        Tables {
            generation: 0,
            node: Arc::new(node),
            frontends: map(),
            node_ports: map(),
            services: map(),
            local_pods: map(),
            pod_sources: Arc::from([]),
            local_pod_span: (u32::MAX, 0),
            pod_routes: map(),
            route_lens: Arc::from([]),
            overlay_peers: Arc::default(),
            neighbors: map(),
        }
    }

    /// Increases with every publish; conntrack entries remember the
    /// generation they were last validated against.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn node(&self) -> &NodeConfig {
        &self.node
    }

    pub fn set_node(&mut self, node: NodeConfig) {
        self.node = Arc::new(node);
    }

    // ---- lookups (hot path) ----

    /// The service a packet to `dst:port/proto` is for: a ClusterIP /
    /// externalIP / LoadBalancer frontend, or a NodePort on a node address.
    #[inline]
    pub fn service_for(&self, dst: Ipv4Addr, port: u16, proto: Proto) -> Option<ServiceMatch<'_>> {
        if let Some((svc, reach)) = self.frontends.get(&Frontend { ip: dst, port, proto }) {
            return Some(ServiceMatch { svc, reach: *reach });
        }
        if self.node.is_node_port(port) && self.node.is_node_ip(dst) {
            if let Some(svc) = self.node_ports.get(&(proto, port)) {
                return Some(ServiceMatch {
                    svc,
                    reach: Reach::External,
                });
            }
        }
        None
    }

    pub fn service(&self, id: SvcId) -> Option<&Arc<ServicePort>> {
        self.services.get(&id)
    }

    pub fn local_pod(&self, ip: Ipv4Addr) -> Option<LocalPod> {
        self.local_pods.get(&ip).copied()
    }

    /// The remote node whose pod CIDR holds `ip` (longest prefix wins).
    pub fn remote_node(&self, ip: Ipv4Addr) -> Option<RemoteNode> {
        self.route_lens
            .iter()
            .find_map(|&len| self.pod_routes.get(&Cidr::of(ip, len)).copied())
    }

    /// The pod CIDR of `peer` when it is another node's overlay endpoint
    /// (a node whose pod CIDR kxp routes to); `None` for anyone else.
    #[inline]
    pub fn overlay_peer_cidr(&self, peer: Ipv4Addr) -> Option<Cidr> {
        self.overlay_peers.get(&peer).copied()
    }

    /// Whether overlay peer `peer`, whose pod CIDR is `pod_cidr`, may speak
    /// for `src`: its own address or its pods'. A node has one IPv4 pod
    /// CIDR; a second route to the same node is found by the route lookup
    /// (only on this slow, refusing path).
    #[inline]
    pub fn overlay_peer_may_send(&self, peer: Ipv4Addr, pod_cidr: Cidr, src: Ipv4Addr) -> bool {
        src == peer || pod_cidr.contains(src) || self.remote_node(src).is_some_and(|n| n.node_ip == peer)
    }

    /// Other nodes' pod CIDRs.
    pub fn pod_routes(&self) -> impl Iterator<Item = (Cidr, RemoteNode)> + '_ {
        self.pod_routes.iter().map(|(c, r)| (*c, *r))
    }

    pub fn neighbor(&self, ip: Ipv4Addr) -> Option<Mac> {
        self.neighbors.get(&ip).copied()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<ServicePort>> {
        self.services.values()
    }

    // ---- edits (control side, on a private clone) ----

    /// Adds or replaces one service port. On error nothing changes.
    pub fn upsert_service(&mut self, spec: &ServiceSpec) -> Result<(), TableError> {
        let svc = Arc::new(ServicePort::compile(spec, self.services.get(&spec.id).map(|p| &**p)));
        for (fe, _) in svc.frontends() {
            if let Some((owner, _)) = self.frontends.get(fe) {
                if owner.id != spec.id {
                    return Err(TableError::DuplicateFrontend {
                        new: spec.name.clone(),
                        owner: owner.name.to_string(),
                        frontend_ip: fe.ip,
                        port: fe.port,
                        proto: fe.proto,
                    });
                }
            }
        }
        if let Some(np) = spec.node_port {
            let (lo, hi) = self.node.node_port_range;
            if !(lo..=hi).contains(&np) {
                return Err(TableError::NodePortOutOfRange {
                    name: spec.name.clone(),
                    port: np,
                    lo,
                    hi,
                });
            }
            if let Some(owner) = self.node_ports.get(&(spec.proto, np)) {
                if owner.id != spec.id {
                    return Err(TableError::DuplicateNodePort {
                        new: spec.name.clone(),
                        owner: owner.name.to_string(),
                        port: np,
                        proto: spec.proto,
                    });
                }
            }
        }
        self.remove_service(spec.id);
        for (fe, reach) in svc.frontends() {
            self.frontends.insert(*fe, (svc.clone(), *reach));
        }
        if let Some(np) = spec.node_port {
            self.node_ports.insert((spec.proto, np), svc.clone());
        }
        self.services.insert(spec.id, svc);
        Ok(())
    }

    /// Removes one service port; a no-op when it is absent.
    pub fn remove_service(&mut self, id: SvcId) {
        let Some(old) = self.services.remove(&id) else {
            return;
        };
        for (fe, _) in old.frontends() {
            if self.frontends.get(fe).is_some_and(|(s, _)| s.id == id) {
                self.frontends.remove(fe);
            }
        }
        if let Some(np) = old.node_port {
            if self.node_ports.get(&(old.proto, np)).is_some_and(|s| s.id == id) {
                self.node_ports.remove(&(old.proto, np));
            }
        }
    }

    pub fn set_local_pod(&mut self, ip: Ipv4Addr, pod: LocalPod) {
        self.local_pods.insert(ip, pod);
        self.refresh_pod_sources();
    }

    pub fn remove_local_pod(&mut self, ip: Ipv4Addr) {
        self.local_pods.remove(&ip);
        self.refresh_pod_sources();
    }

    /// Whether the pod behind `port` may send from `src`: `src` is one of
    /// the addresses routed to that port.
    #[inline]
    pub fn pod_may_send_from(&self, port: PortId, src: Ipv4Addr) -> bool {
        match self.pod_sources.get(usize::from(port.0)) {
            Some(s) if s.count as usize <= s.addrs.len() => s.addrs[..s.count as usize].contains(&src),
            // More addresses than fit inline: ask the map.
            Some(_) => self.local_pods.get(&src).is_some_and(|p| p.port == port),
            None => false,
        }
    }

    /// Whether `ip` is a local pod's address (the uplink may not send from
    /// one). Outside the local pods' span this costs two compares.
    #[inline]
    pub fn is_local_pod(&self, ip: Ipv4Addr) -> bool {
        let (lo, hi) = self.local_pod_span;
        let v = u32::from(ip);
        lo <= v && v <= hi && self.local_pods.contains_key(&ip)
    }

    /// Rebuilt per local pod change (a node has a few hundred at most).
    fn refresh_pod_sources(&mut self) {
        self.local_pod_span = self
            .local_pods
            .keys()
            .map(|ip| u32::from(*ip))
            .fold((u32::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let ports = self
            .local_pods
            .values()
            .map(|p| usize::from(p.port.0) + 1)
            .max()
            .unwrap_or(0);
        let mut v = vec![PodSources::default(); ports];
        for (ip, pod) in self.local_pods.iter() {
            let s = &mut v[usize::from(pod.port.0)];
            if let Some(slot) = s.addrs.get_mut(s.count as usize) {
                *slot = *ip;
            }
            s.count = s.count.saturating_add(1);
        }
        self.pod_sources = v.into();
    }

    pub fn set_pod_route(&mut self, cidr: Cidr, node: RemoteNode) {
        self.pod_routes.insert(cidr, node);
        self.refresh_routes();
    }

    pub fn remove_pod_route(&mut self, cidr: Cidr) {
        self.pod_routes.remove(&cidr);
        self.refresh_routes();
    }

    /// Derived lookups, rebuilt per route change (routes: one per node).
    fn refresh_routes(&mut self) {
        let mut lens: Vec<u8> = self.pod_routes.keys().map(Cidr::prefix_len).collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        lens.dedup();
        self.route_lens = lens.into();
        let peers = self.pod_routes.iter().map(|(c, r)| (r.node_ip, *c));
        let mut map = std::collections::HashMap::with_hasher(ahash::RandomState::with_seeds(5, 6, 7, 8));
        map.extend(peers);
        self.overlay_peers = Arc::new(map);
    }

    pub fn set_neighbor(&mut self, ip: Ipv4Addr, mac: Mac) {
        self.neighbors.insert(ip, mac);
    }

    pub fn remove_neighbor(&mut self, ip: Ipv4Addr) {
        self.neighbors.remove(&ip);
    }
}

/// The single writer side of the published tables.
pub struct Publisher {
    current: Arc<ArcSwap<Tables>>,
}

/// A worker's handle: cheap to clone, lock-free to load.
#[derive(Clone)]
pub struct Reader {
    current: Arc<ArcSwap<Tables>>,
}

impl Publisher {
    pub fn new(initial: Tables) -> Self {
        Publisher {
            current: Arc::new(ArcSwap::from_pointee(initial)),
        }
    }

    pub fn reader(&self) -> Reader {
        Reader {
            current: self.current.clone(),
        }
    }

    /// A private copy of the live snapshot to edit (O(1)).
    pub fn draft(&self) -> Tables {
        Tables::clone(&self.current.load())
    }

    /// Makes `next` live with the next generation number.
    pub fn publish(&self, mut next: Tables) -> u64 {
        next.generation = self.current.load().generation + 1;
        let g = next.generation;
        self.current.store(Arc::new(next));
        g
    }

    /// Edits and publishes in one step; on error nothing is published.
    pub fn update<E>(&self, f: impl FnOnce(&mut Tables) -> Result<(), E>) -> Result<u64, E> {
        let mut draft = self.draft();
        f(&mut draft)?;
        Ok(self.publish(draft))
    }
}

impl Reader {
    /// The live snapshot; hold the guard for one batch, not longer.
    #[inline]
    pub fn load(&self) -> Guard<Arc<Tables>> {
        self.current.load()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{BackendAddr, Endpoint};

    fn node() -> NodeConfig {
        NodeConfig::single_uplink(
            "n1",
            Ipv4Addr::new(192, 168, 0, 1),
            "192.168.0.0/24".parse().unwrap(),
            Mac([2; 6]),
        )
    }

    fn svc(id: u32, ip: [u8; 4], port: u16) -> ServiceSpec {
        let mut s = ServiceSpec::cluster_ip(SvcId(id), &format!("ns/s{id}:p"), ip.into(), port, Proto::Tcp);
        s.endpoints.push(EndpointInfo {
            addr: BackendAddr(Endpoint::new(Ipv4Addr::new(10, 244, 0, 2), 8080)),
            ready: true,
            serving: true,
            terminating: false,
            local: true,
        });
        s
    }

    #[test]
    fn publish_swaps_atomically_and_old_readers_keep_their_snapshot() {
        let p = Publisher::new(Tables::new(node()));
        let r = p.reader();
        let before = r.load();
        p.update(|t| t.upsert_service(&svc(1, [10, 96, 0, 1], 80))).unwrap();
        assert!(before
            .service_for(Ipv4Addr::new(10, 96, 0, 1), 80, Proto::Tcp)
            .is_none());
        let after = r.load();
        assert_eq!(after.generation(), 1);
        assert!(after.service_for(Ipv4Addr::new(10, 96, 0, 1), 80, Proto::Tcp).is_some());
    }

    #[test]
    fn duplicate_frontend_is_rejected_and_tables_unchanged() {
        let p = Publisher::new(Tables::new(node()));
        p.update(|t| t.upsert_service(&svc(1, [10, 96, 0, 1], 80))).unwrap();
        let err = p.update(|t| t.upsert_service(&svc(2, [10, 96, 0, 1], 80))).unwrap_err();
        assert!(
            err.to_string().contains("ns/s2:p") && err.to_string().contains("ns/s1:p"),
            "{err}"
        );
        assert_eq!(p.reader().load().generation(), 1);
    }

    #[test]
    fn node_port_range_and_duplicates_are_checked() {
        let mut t = Tables::new(node());
        let mut a = svc(1, [10, 96, 0, 1], 80);
        a.node_port = Some(80);
        assert!(matches!(
            t.upsert_service(&a),
            Err(TableError::NodePortOutOfRange { .. })
        ));
        a.node_port = Some(30080);
        t.upsert_service(&a).unwrap();
        let mut b = svc(2, [10, 96, 0, 2], 80);
        b.node_port = Some(30080);
        assert!(matches!(
            t.upsert_service(&b),
            Err(TableError::DuplicateNodePort { .. })
        ));
        let m = t.service_for(Ipv4Addr::new(192, 168, 0, 1), 30080, Proto::Tcp).unwrap();
        assert_eq!((m.svc.id, m.reach), (SvcId(1), Reach::External));
        assert!(t
            .service_for(Ipv4Addr::new(192, 168, 0, 9), 30080, Proto::Tcp)
            .is_none());
    }

    #[test]
    fn update_replaces_frontends_and_remove_clears_them() {
        let mut t = Tables::new(node());
        t.upsert_service(&svc(1, [10, 96, 0, 1], 80)).unwrap();
        t.upsert_service(&svc(1, [10, 96, 0, 9], 80)).unwrap();
        assert!(t.service_for(Ipv4Addr::new(10, 96, 0, 1), 80, Proto::Tcp).is_none());
        assert!(t.service_for(Ipv4Addr::new(10, 96, 0, 9), 80, Proto::Tcp).is_some());
        t.remove_service(SvcId(1));
        assert!(t.service_for(Ipv4Addr::new(10, 96, 0, 9), 80, Proto::Tcp).is_none());
        assert_eq!(t.service_count(), 0);
    }

    #[test]
    fn pods_may_send_only_from_the_addresses_routed_to_their_port() {
        let mut t = Tables::new(node());
        let pod = |port| LocalPod {
            port: PortId(port),
            mac: Mac([0xa; 6]),
        };
        let ip = |last| Ipv4Addr::new(10, 244, 0, last);
        t.set_local_pod(ip(2), pod(1));
        for last in 10..14 {
            t.set_local_pod(ip(last), pod(2)); // more than fit inline
        }
        assert!(t.pod_may_send_from(PortId(1), ip(2)));
        assert!(!t.pod_may_send_from(PortId(1), ip(10)));
        assert!((10..14).all(|l| t.pod_may_send_from(PortId(2), ip(l))));
        assert!(!t.pod_may_send_from(PortId(2), ip(2)));
        assert!(!t.pod_may_send_from(PortId(7), ip(2)), "a port without pods");
        t.remove_local_pod(ip(2));
        assert!(!t.pod_may_send_from(PortId(1), ip(2)));
    }

    #[test]
    fn pod_routes_use_longest_prefix() {
        let mut t = Tables::new(node());
        let a = RemoteNode {
            node_ip: Ipv4Addr::new(192, 168, 0, 2),
            vtep_mac: Mac([2; 6]),
        };
        let b = RemoteNode {
            node_ip: Ipv4Addr::new(192, 168, 0, 3),
            vtep_mac: Mac([3; 6]),
        };
        t.set_pod_route("10.244.0.0/16".parse().unwrap(), a);
        t.set_pod_route("10.244.2.0/24".parse().unwrap(), b);
        assert_eq!(t.remote_node(Ipv4Addr::new(10, 244, 2, 5)), Some(b));
        assert_eq!(t.remote_node(Ipv4Addr::new(10, 244, 3, 5)), Some(a));
        assert_eq!(t.remote_node(Ipv4Addr::new(10, 245, 0, 1)), None);
    }
}
