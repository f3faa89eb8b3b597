//! One service port as the engine sees it: its frontends, policies, and the
//! backend sets (with Maglev tables) each class of traffic may use.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use super::maglev::{Maglev, MAX_BACKENDS};
use crate::addr::{BackendAddr, Cidr, Frontend, Proto, SvcId};

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10800);

/// One endpoint of an EndpointSlice with its conditions (KEP-1669).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub addr: BackendAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The endpoint's `nodeName` is this node.
    pub local: bool,
}

/// What control hands to the tables for one service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub id: SvcId,
    /// `namespace/name:portname`, for logs and errors.
    pub name: String,
    pub proto: Proto,
    /// The service port (on ClusterIP, externalIPs and LB IPs).
    pub port: u16,
    pub cluster_ips: Vec<Ipv4Addr>,
    pub external_ips: Vec<Ipv4Addr>,
    pub load_balancer_ips: Vec<Ipv4Addr>,
    pub node_port: Option<u16>,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `sessionAffinity: ClientIP` with its timeout.
    pub affinity: Option<Duration>,
    /// `loadBalancerSourceRanges`: when not empty, only these sources may
    /// open flows through the LoadBalancer IPs (kube-proxy's firewall).
    pub source_ranges: Vec<Cidr>,
    pub endpoints: Vec<EndpointInfo>,
}

impl ServiceSpec {
    /// A ClusterIP service with no endpoints; fill in the rest field by field.
    pub fn cluster_ip(id: SvcId, name: &str, ip: Ipv4Addr, port: u16, proto: Proto) -> Self {
        ServiceSpec {
            id,
            name: name.to_string(),
            proto,
            port,
            cluster_ips: vec![ip],
            external_ips: vec![],
            load_balancer_ips: vec![],
            node_port: None,
            external_local: false,
            internal_local: false,
            affinity: None,
            source_ranges: vec![],
            endpoints: vec![],
        }
    }
}

/// Backends one class of traffic may use, and their Maglev table.
#[derive(Debug)]
pub struct BackendSet {
    backends: Box<[BackendAddr]>,
    maglev: Maglev,
}

impl BackendSet {
    /// The usable endpoints among `eps` that pass `filter`: the ready ones,
    /// or, when none is ready, the serving-and-terminating ones (KEP-1669),
    /// so a rolling update that leaves only terminating pods still serves.
    fn usable(eps: &[EndpointInfo], prev: Option<&BackendSet>, filter: impl Fn(&EndpointInfo) -> bool) -> Self {
        let mut picked: Vec<BackendAddr> = eps.iter().filter(|e| filter(e) && e.ready).map(|e| e.addr).collect();
        if picked.is_empty() {
            picked = eps
                .iter()
                .filter(|e| filter(e) && e.serving && e.terminating)
                .map(|e| e.addr)
                .collect();
        }
        picked.sort();
        picked.dedup();
        picked.truncate(MAX_BACKENDS);
        let maglev = Maglev::new(&picked, prev.map(|p| p.maglev.len()).filter(|&m| m > 1));
        BackendSet {
            backends: picked.into_boxed_slice(),
            maglev,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn contains(&self, b: BackendAddr) -> bool {
        self.backends.binary_search(&b).is_ok()
    }

    pub fn pick(&self, flow_hash: u64) -> Option<BackendAddr> {
        self.maglev.pick(flow_hash).map(|i| self.backends[i])
    }

    pub fn backends(&self) -> &[BackendAddr] {
        &self.backends
    }
}

/// Whether traffic reached the service through its ClusterIP (internal) or
/// through a NodePort, LoadBalancer IP or externalIP (external).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    Internal,
    External,
}

/// A compiled service port, shared (`Arc`) by every frontend that leads to it.
#[derive(Debug)]
pub struct ServicePort {
    pub id: SvcId,
    pub name: Arc<str>,
    pub proto: Proto,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_local: bool,
    pub internal_local: bool,
    pub affinity: Option<Duration>,
    /// Every endpoint in the slices, sorted by address, whatever its state:
    /// established TCP flows keep their backend while it is listed here.
    endpoints: Box<[EndpointInfo]>,
    cluster: BackendSet,
    /// Local endpoints only; built when a traffic policy is Local.
    local: Option<BackendSet>,
    frontends: Box<[(Frontend, Reach)]>,
    /// LoadBalancer IPs behind `loadBalancerSourceRanges` (empty: open).
    firewalled: Box<[Ipv4Addr]>,
    source_ranges: Box<[Cidr]>,
}

impl ServicePort {
    /// Compiles `spec`; `prev` is the version it replaces, whose Maglev
    /// table sizes are kept when they still fit (see `maglev`).
    pub fn compile(spec: &ServiceSpec, prev: Option<&ServicePort>) -> Self {
        let mut endpoints = spec.endpoints.clone();
        endpoints.sort_by_key(|e| e.addr);
        endpoints.dedup_by_key(|e| e.addr);
        let cluster = BackendSet::usable(&endpoints, prev.map(|p| &p.cluster), |_| true);
        let local = (spec.external_local || spec.internal_local)
            .then(|| BackendSet::usable(&endpoints, prev.and_then(|p| p.local.as_ref()), |e| e.local));
        let fe = |ip: &Ipv4Addr| Frontend {
            ip: *ip,
            port: spec.port,
            proto: spec.proto,
        };
        let frontends = spec
            .cluster_ips
            .iter()
            .map(|ip| (fe(ip), Reach::Internal))
            .chain(spec.external_ips.iter().map(|ip| (fe(ip), Reach::External)))
            .chain(spec.load_balancer_ips.iter().map(|ip| (fe(ip), Reach::External)))
            .collect();
        ServicePort {
            id: spec.id,
            name: spec.name.as_str().into(),
            proto: spec.proto,
            port: spec.port,
            node_port: spec.node_port,
            external_local: spec.external_local,
            internal_local: spec.internal_local,
            affinity: spec.affinity,
            endpoints: endpoints.into_boxed_slice(),
            cluster,
            local,
            frontends,
            firewalled: if spec.source_ranges.is_empty() {
                Box::default()
            } else {
                spec.load_balancer_ips.clone().into_boxed_slice()
            },
            source_ranges: spec.source_ranges.clone().into_boxed_slice(),
        }
    }

    /// Whether `src` may open a flow to `dst`, kube-proxy's firewall for
    /// LoadBalancer IPs: open unless `dst` is an LB IP of a service with
    /// `loadBalancerSourceRanges`; then the ranges may, and so may the LB
    /// IPs themselves when a range holds a node address (a node that routes
    /// its VIP locally reaches it from the VIP). Everything else is denied.
    pub fn source_allowed(&self, src: Ipv4Addr, dst: Ipv4Addr, node_ips: &[Ipv4Addr]) -> bool {
        if !self.firewalled.contains(&dst) {
            return true;
        }
        let in_ranges = |ip: Ipv4Addr| self.source_ranges.iter().any(|r| r.contains(ip));
        in_ranges(src) || (self.firewalled.contains(&src) && node_ips.iter().any(|n| in_ranges(*n)))
    }

    /// The backends this traffic may use. `from_cluster` is true when the
    /// source is inside the cluster CIDR: kube-proxy sends such traffic to
    /// all endpoints even under `externalTrafficPolicy: Local`.
    pub fn backends_for(&self, reach: Reach, from_cluster: bool) -> &BackendSet {
        let local = match reach {
            Reach::Internal => self.internal_local,
            Reach::External => self.external_local && !from_cluster,
        };
        match (&self.local, local) {
            (Some(l), true) => l,
            _ => &self.cluster,
        }
    }

    /// No usable endpoint at all: kube-proxy rejects such traffic.
    pub fn has_no_endpoints(&self) -> bool {
        self.cluster.is_empty()
    }

    /// The endpoint's entry, if the slices still list it.
    pub fn endpoint(&self, b: BackendAddr) -> Option<&EndpointInfo> {
        self.endpoints
            .binary_search_by_key(&b, |e| e.addr)
            .ok()
            .map(|i| &self.endpoints[i])
    }

    pub fn endpoints(&self) -> &[EndpointInfo] {
        &self.endpoints
    }

    pub fn frontends(&self) -> &[(Frontend, Reach)] {
        &self.frontends
    }

    /// Number of local endpoints that are usable, for `healthCheckNodePort`.
    pub fn local_usable(&self) -> usize {
        self.local.as_ref().map_or(0, BackendSet::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::Endpoint;

    fn ep(last: u8, ready: bool, serving: bool, terminating: bool, local: bool) -> EndpointInfo {
        EndpointInfo {
            addr: BackendAddr(Endpoint::new(Ipv4Addr::new(10, 244, 0, last), 80)),
            ready,
            serving,
            terminating,
            local,
        }
    }

    fn spec(eps: Vec<EndpointInfo>) -> ServiceSpec {
        let mut s = ServiceSpec::cluster_ip(SvcId(1), "ns/web:http", Ipv4Addr::new(10, 96, 0, 1), 80, Proto::Tcp);
        s.endpoints = eps;
        s
    }

    #[test]
    fn ready_endpoints_are_preferred() {
        let s = ServicePort::compile(
            &spec(vec![ep(1, true, true, false, false), ep(2, false, true, true, false)]),
            None,
        );
        let set = s.backends_for(Reach::Internal, true);
        assert_eq!(set.len(), 1);
        assert_eq!(set.backends()[0].0.ip, Ipv4Addr::new(10, 244, 0, 1));
    }

    #[test]
    fn falls_back_to_serving_terminating() {
        let s = ServicePort::compile(
            &spec(vec![
                ep(1, false, false, true, false), // terminating, not serving: never used
                ep(2, false, true, true, false),
                ep(3, false, false, false, false), // not ready: never used
            ]),
            None,
        );
        let set = s.backends_for(Reach::Internal, true);
        assert_eq!(set.backends().len(), 1);
        assert_eq!(set.backends()[0].0.ip, Ipv4Addr::new(10, 244, 0, 2));
        assert!(!s.has_no_endpoints());
        // Still listed, so an established TCP flow to .1 keeps it.
        assert!(s
            .endpoint(BackendAddr(Endpoint::new(Ipv4Addr::new(10, 244, 0, 1), 80)))
            .is_some());
    }

    #[test]
    fn source_ranges_guard_only_load_balancer_ips() {
        let lb = Ipv4Addr::new(198, 51, 100, 10);
        let node = [Ipv4Addr::new(192, 168, 0, 1)];
        let mut sp = spec(vec![ep(1, true, true, false, false)]);
        sp.load_balancer_ips = vec![lb];
        sp.external_ips = vec![Ipv4Addr::new(198, 51, 100, 20)];
        let open = ServicePort::compile(&sp, None);
        assert!(open.source_allowed(Ipv4Addr::new(203, 0, 113, 7), lb, &node));
        sp.source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
        let s = ServicePort::compile(&sp, None);
        assert!(s.source_allowed(Ipv4Addr::new(203, 0, 113, 7), lb, &node));
        assert!(!s.source_allowed(Ipv4Addr::new(8, 8, 8, 8), lb, &node));
        assert!(!s.source_allowed(lb, lb, &node), "no range holds the node");
        // ClusterIP and externalIPs are not behind the LB firewall.
        assert!(s.source_allowed(Ipv4Addr::new(8, 8, 8, 8), Ipv4Addr::new(10, 96, 0, 1), &node));
        assert!(s.source_allowed(Ipv4Addr::new(8, 8, 8, 8), Ipv4Addr::new(198, 51, 100, 20), &node));
        sp.source_ranges.push("192.168.0.0/24".parse().unwrap());
        let s = ServicePort::compile(&sp, None);
        assert!(
            s.source_allowed(lb, lb, &node),
            "the VIP itself, from a node the ranges hold"
        );
    }

    #[test]
    fn traffic_policies_pick_local_sets() {
        let mut sp = spec(vec![ep(1, true, true, false, true), ep(2, true, true, false, false)]);
        sp.external_local = true;
        let s = ServicePort::compile(&sp, None);
        assert_eq!(s.backends_for(Reach::External, false).len(), 1);
        assert_eq!(s.backends_for(Reach::External, true).len(), 2, "pods use all endpoints");
        assert_eq!(s.backends_for(Reach::Internal, false).len(), 2);
        assert_eq!(s.local_usable(), 1);
        sp.external_local = false;
        sp.internal_local = true;
        let s = ServicePort::compile(&sp, None);
        assert_eq!(s.backends_for(Reach::Internal, true).len(), 1);
        assert_eq!(s.backends_for(Reach::External, false).len(), 2);
    }
}
