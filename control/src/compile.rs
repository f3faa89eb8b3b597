//! Cluster objects -> the service ports the dataplane should serve, with
//! kube-proxy's rules for what counts. Anything unusable is reported with
//! the object's name and skipped; the rest still compiles.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use dataplane::addr::Mac;
use dataplane::addr::{BackendAddr, Cidr, Endpoint, Frontend, Proto, SvcId};
use dataplane::tables::{EndpointInfo, RemoteNode, ServiceSpec};
use k8s_openapi::api::core::v1::{Service, ServicePort as K8sServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::objects::{ClusterObjects, ObjectKey, LABEL_HEADLESS, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME};

/// What compilation needs to know about this node.
#[derive(Clone, Debug)]
pub struct NodeContext {
    /// Endpoints on this node are "local" (traffic policies).
    pub node_name: String,
    pub node_port_range: (u16, u16),
    pub cluster_cidr: Option<Cidr>,
}

/// An object, or part of one, that could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// e.g. `Service shop/web` or `EndpointSlice shop/web-abc`.
    pub object: String,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

/// Stable `SvcId`s for service ports (`ns/name:port`), kept across syncs so
/// conntrack entries keep pointing at the same service.
#[derive(Debug, Default)]
pub struct ServiceIds {
    ids: HashMap<String, SvcId>,
    next: u32,
}

impl ServiceIds {
    pub fn get(&mut self, name: &str) -> SvcId {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        self.next += 1;
        let id = SvcId(self.next);
        self.ids.insert(name.to_string(), id);
        id
    }
}

/// What the Node objects say: this node's addresses and the other nodes'
/// pod CIDRs, reached over VXLAN.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// This node's IPv4 InternalIP/ExternalIP addresses, InternalIP first.
    pub node_ips: Vec<Ipv4Addr>,
    pub pod_cidr: Option<Cidr>,
    /// Other nodes by name: their pod CIDR and how to reach it.
    pub remote: BTreeMap<String, (Cidr, RemoteNode)>,
}

/// Addresses no externalIP or LoadBalancer IP may claim: steering them to a
/// service would hijack traffic meant for something else (the
/// CVE-2020-8554 class). kxp takes these frontends before netfilter, so an
/// admission webhook is not enough: it checks them itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reserved {
    /// Every node's addresses (from Node objects).
    pub node_ips: std::collections::BTreeSet<Ipv4Addr>,
    pub cluster_cidr: Option<Cidr>,
}

impl Reserved {
    /// Why `ip` may not be a service frontend, if it may not.
    pub fn why(&self, ip: Ipv4Addr) -> Option<String> {
        let kind = if ip.is_unspecified() {
            "unspecified"
        } else if ip.is_loopback() {
            "loopback"
        } else if ip.is_link_local() {
            "link-local (kxp's host SNAT address lives there)"
        } else if ip.is_multicast() {
            "multicast"
        } else if ip.is_broadcast() {
            "broadcast"
        } else if self.node_ips.contains(&ip) {
            "a node's address (kxp SNATs from node addresses)"
        } else if let Some(c) = self.cluster_cidr.filter(|c| c.contains(ip)) {
            return Some(format!("{ip} is inside the cluster CIDR {c}"));
        } else {
            return None;
        };
        Some(format!("{ip} is {kind}"))
    }
}

/// Annotations that carry a node's VTEP MAC: Flannel's backend data (JSON
/// with `VtepMAC`), or kxp's own.
pub const ANNOTATION_FLANNEL_BACKEND: &str = "flannel.alpha.coreos.com/backend-data";
pub const ANNOTATION_KXP_VTEP_MAC: &str = "kxp.io/vtep-mac";

/// The compiled result: service ports by `ns/name:port`, and problems.
#[derive(Debug, Default)]
pub struct Desired {
    pub services: BTreeMap<String, Arc<ServiceSpec>>,
    pub nodes: NodeFacts,
    /// `healthCheckNodePort` of eTP=Local services, by service port name.
    pub health_check_node_ports: BTreeMap<String, u16>,
    pub problems: Vec<Problem>,
    /// Services skipped on purpose (headless, ExternalName, other proxies).
    pub ignored: usize,
}

/// Compiles cluster objects, remembering each service's result: a service
/// whose resourceVersion and whose slices' resourceVersions are unchanged is
/// not compiled again, so a sync costs O(changed) compilation plus a cheap
/// pass over the others (fingerprint compare, duplicate check). Objects
/// without resourceVersions (hand-written manifests) are always compiled.
#[derive(Default)]
pub struct Compiler {
    ids: ServiceIds,
    cache: HashMap<ObjectKey, Compiled>,
    /// What frontends were validated against; a change (nodes come and go,
    /// rarely) recompiles every service.
    reserved: Reserved,
}

/// One service's compiled output.
struct Compiled {
    fingerprint: Vec<String>,
    ports: Vec<CompiledPort>,
    problems: Vec<Problem>,
}

struct CompiledPort {
    spec: Arc<ServiceSpec>,
    /// `Service ns/name port p`, for duplicate reports.
    object: String,
    health_check: Option<u16>,
}

/// Compiles once, without a cache (for `kxp check` and tests).
pub fn compile(objs: &ClusterObjects, ctx: &NodeContext, ids: &mut ServiceIds) -> Desired {
    let mut c = Compiler {
        ids: std::mem::take(ids),
        ..Compiler::default()
    };
    let out = c.compile(objs, ctx);
    *ids = c.ids;
    out
}

impl Compiler {
    pub fn compile(&mut self, objs: &ClusterObjects, ctx: &NodeContext) -> Desired {
        let mut out = Desired::default();
        out.nodes = node_facts(objs, ctx, &mut out.problems);
        let reserved = reserved(objs, ctx);
        if reserved != self.reserved {
            self.cache.clear();
            self.reserved = reserved;
        }
        // Slices by owning service.
        let mut slices: HashMap<ObjectKey, Vec<(&ObjectKey, &EndpointSlice)>> = HashMap::new();
        for (k, s) in &objs.endpoint_slices {
            if let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) {
                slices
                    .entry(ObjectKey {
                        namespace: k.namespace.clone(),
                        name: svc.clone(),
                    })
                    .or_default()
                    .push((k, s));
            }
        }
        let mut frontends: HashMap<Frontend, String> = HashMap::new();
        let mut node_ports: HashMap<(Proto, u16), String> = HashMap::new();
        for (key, svc) in &objs.services {
            if ignored(svc) {
                out.ignored += 1;
                continue;
            }
            let mine = slices.get(key).map(Vec::as_slice).unwrap_or(&[]);
            let fingerprint = fingerprint(svc, mine);
            let hit = fingerprint
                .as_ref()
                .is_some_and(|f| self.cache.get(key).is_some_and(|c| &c.fingerprint == f));
            if !hit {
                let compiled = compile_service(
                    key,
                    svc,
                    mine,
                    ctx,
                    &self.reserved,
                    &mut self.ids,
                    fingerprint.unwrap_or_default(),
                );
                self.cache.insert(key.clone(), compiled);
            }
            let compiled = &self.cache[key];
            out.problems.extend(compiled.problems.iter().cloned());
            for port in &compiled.ports {
                let spec = &port.spec;
                // Duplicates: the first service (by name) keeps the address.
                let fes = spec
                    .cluster_ips
                    .iter()
                    .chain(&spec.external_ips)
                    .chain(&spec.load_balancer_ips)
                    .map(|ip| Frontend {
                        ip: *ip,
                        port: spec.port,
                        proto: spec.proto,
                    });
                if let Some((fe, owner)) = fes.clone().find_map(|fe| frontends.get(&fe).map(|o| (fe, o))) {
                    let reason = format!("{}:{}/{} is already used by service {owner}", fe.ip, fe.port, fe.proto);
                    out.problems.push(Problem {
                        object: port.object.clone(),
                        reason,
                    });
                    continue;
                }
                if let Some(owner) = spec.node_port.and_then(|np| node_ports.get(&(spec.proto, np))) {
                    let reason = format!(
                        "nodePort {}/{} is already used by service {owner}",
                        spec.node_port.unwrap_or(0),
                        spec.proto
                    );
                    out.problems.push(Problem {
                        object: port.object.clone(),
                        reason,
                    });
                    continue;
                }
                for fe in fes {
                    frontends.insert(fe, spec.name.clone());
                }
                if let Some(np) = spec.node_port {
                    node_ports.insert((spec.proto, np), spec.name.clone());
                }
                if let Some(h) = port.health_check {
                    out.health_check_node_ports.insert(spec.name.clone(), h);
                }
                out.services.insert(spec.name.clone(), spec.clone());
            }
        }
        self.cache.retain(|k, _| objs.services.contains_key(k));
        health_check_clashes(&mut out, &node_ports);
        out
    }
}

/// A healthCheckNodePort is a TCP port on every node address: it may not be
/// a NodePort too, nor another service's health check port (the first by
/// name keeps it).
fn health_check_clashes(out: &mut Desired, node_ports: &HashMap<(Proto, u16), String>) {
    let mut seen: HashMap<u16, String> = HashMap::new();
    let mut clashes = Vec::new();
    for (name, h) in &out.health_check_node_ports {
        let owner = node_ports
            .get(&(Proto::Tcp, *h))
            .map(|o| format!("the nodePort of service {o}"))
            .or_else(|| {
                seen.get(h)
                    .filter(|o| !same_service(o, name))
                    .map(|o| format!("the healthCheckNodePort of service {o}"))
            });
        match owner {
            Some(owner) => clashes.push((name.clone(), *h, owner)),
            None => {
                seen.entry(*h).or_insert_with(|| name.clone());
            }
        }
    }
    for (name, h, owner) in clashes {
        out.health_check_node_ports.remove(&name);
        out.problems.push(Problem {
            object: format!("Service {}", name.split(':').next().unwrap_or(&name)),
            reason: format!("healthCheckNodePort {h} is already {owner}; no health check is served for it"),
        });
    }
}

/// Whether two service port names (`ns/name:port`) are of one service.
fn same_service(a: &str, b: &str) -> bool {
    a.split(':').next() == b.split(':').next()
}

/// What frontends may not claim: see [`Reserved`].
fn reserved(objs: &ClusterObjects, ctx: &NodeContext) -> Reserved {
    let node_ips = objs
        .nodes
        .values()
        .flat_map(|n| n.status.iter().flat_map(|s| s.addresses.iter().flatten()))
        .filter_map(|a| a.address.parse::<Ipv4Addr>().ok())
        .collect();
    Reserved {
        node_ips,
        cluster_cidr: ctx.cluster_cidr,
    }
}

impl Compiler {
    /// The addresses frontends are checked against now.
    pub fn reserved(&self) -> &Reserved {
        &self.reserved
    }
}

/// One service compiled alone (an incremental sync): its ports, the
/// problems found, and its healthCheckNodePort if any. A deleted or ignored
/// service yields no ports.
pub struct ServiceOutput {
    pub ports: Vec<Arc<ServiceSpec>>,
    pub problems: Vec<Problem>,
    pub health_check: Option<u16>,
}

impl Compiler {
    pub fn compile_one(&mut self, view: &crate::source::ServiceView, ctx: &NodeContext) -> ServiceOutput {
        let empty = ServiceOutput {
            ports: vec![],
            problems: vec![],
            health_check: None,
        };
        let Some(svc) = view.service.as_ref().filter(|s| !ignored(s)) else {
            self.cache.remove(&view.key);
            return empty;
        };
        let slices: Vec<(&ObjectKey, &EndpointSlice)> = view.slices.iter().map(|(k, s)| (k, s)).collect();
        let fp = fingerprint(svc, &slices).unwrap_or_default();
        let compiled = compile_service(&view.key, svc, &slices, ctx, &self.reserved, &mut self.ids, fp);
        let out = ServiceOutput {
            ports: compiled.ports.iter().map(|p| p.spec.clone()).collect(),
            problems: compiled.problems.clone(),
            health_check: compiled.ports.iter().find_map(|p| p.health_check),
        };
        self.cache.insert(view.key.clone(), compiled);
        out
    }
}

/// The resourceVersions a service's compilation depends on, or `None` when
/// some object has none (then it is always recompiled).
fn fingerprint(svc: &Service, slices: &[(&ObjectKey, &EndpointSlice)]) -> Option<Vec<String>> {
    let mut f = vec![svc.metadata.resource_version.clone()?];
    for (k, s) in slices {
        f.push(format!("{}={}", k.name, s.metadata.resource_version.as_deref()?));
    }
    f.sort_unstable();
    Some(f)
}

fn compile_service(
    key: &ObjectKey,
    svc: &Service,
    slices: &[(&ObjectKey, &EndpointSlice)],
    ctx: &NodeContext,
    reserved: &Reserved,
    ids: &mut ServiceIds,
    fingerprint: Vec<String>,
) -> Compiled {
    let mut out = Compiled {
        fingerprint,
        ports: Vec::new(),
        problems: Vec::new(),
    };
    let object = format!("Service {key}");
    let mut problem = |reason: String| {
        out.problems.push(Problem {
            object: object.clone(),
            reason,
        })
    };
    let Some(spec) = svc.spec.as_ref() else {
        problem("has no spec".into());
        return out;
    };
    let cluster_ips = match ipv4_list(spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter())) {
        Ok(v) => v,
        Err(e) => {
            problem(format!("invalid clusterIP: {e}"));
            return out;
        }
    };
    let external_ips = match ipv4_list(spec.external_ips.iter().flatten()) {
        Ok(v) => v,
        Err(e) => {
            problem(format!("invalid externalIPs: {e}"));
            return out;
        }
    };
    let lb_ips = match ipv4_list(
        svc.status
            .iter()
            .flat_map(|s| s.load_balancer.iter())
            .flat_map(|l| l.ingress.iter().flatten())
            .filter_map(|i| i.ip.as_ref()),
    ) {
        Ok(v) => v,
        Err(e) => {
            problem(format!("invalid status.loadBalancer.ingress IP: {e}"));
            return out;
        }
    };
    // Frontends that would hijack someone else's traffic are dropped one
    // by one; the rest of the service still applies.
    let mut valid = |ips: Vec<Ipv4Addr>, what: &str| -> Vec<Ipv4Addr> {
        ips.into_iter()
            .filter(|ip| match reserved.why(*ip) {
                Some(why) => {
                    problem(format!("{what} {why}; ignored"));
                    false
                }
                None => true,
            })
            .collect()
    };
    let external_ips = valid(external_ips, "externalIP");
    let lb_ips = valid(lb_ips, "LoadBalancer ingress IP");
    let source_ranges = match source_ranges(svc) {
        Ok(r) => r,
        Err(e) => {
            problem(format!("invalid loadBalancerSourceRanges: {e}"));
            return out;
        }
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    let wants_node_port = matches!(svc_type, "NodePort" | "LoadBalancer");
    let external_local =
        spec.external_traffic_policy.as_deref() == Some("Local") && (wants_node_port || !external_ips.is_empty());
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let affinity = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(10800);
            if !(1..=86400).contains(&t) {
                problem(format!("sessionAffinityConfig timeoutSeconds {t} outside 1-86400"));
                return out;
            }
            Some(Duration::from_secs(t as u64))
        }
        _ => None,
    };
    for port in spec.ports.iter().flatten() {
        let pname = port.name.clone().unwrap_or_default();
        let name = format!("{key}:{pname}");
        let label = if pname.is_empty() {
            port.port.to_string()
        } else {
            pname.clone()
        };
        let pobject = format!("Service {key} port {label}");
        let mut pproblem = |reason: String| {
            out.problems.push(Problem {
                object: pobject.clone(),
                reason,
            })
        };
        let proto = match protocol(port.protocol.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                pproblem(e);
                continue;
            }
        };
        let Some(svc_port) = u16::try_from(port.port).ok().filter(|p| *p > 0) else {
            pproblem(format!("port {} outside 1-65535", port.port));
            continue;
        };
        let node_port = match (wants_node_port, port.node_port) {
            (true, Some(np)) => {
                let (lo, hi) = ctx.node_port_range;
                match u16::try_from(np).ok().filter(|p| (lo..=hi).contains(p)) {
                    Some(p) => Some(p),
                    None => {
                        pproblem(format!("nodePort {np} outside the node port range {lo}-{hi}"));
                        continue;
                    }
                }
            }
            _ => None,
        };
        let health_check = match spec.health_check_node_port.filter(|_| external_local) {
            None => None,
            Some(h) => {
                let (lo, hi) = ctx.node_port_range;
                let ok = u16::try_from(h).ok().filter(|p| (lo..=hi).contains(p));
                if ok.is_none() {
                    pproblem(format!(
                        "healthCheckNodePort {h} outside the node port range {lo}-{hi}; no health check is served"
                    ));
                }
                ok
            }
        };
        let endpoints = endpoints_for(slices, port, proto, ctx, &mut out.problems);
        let id = ids.get(&name);
        let spec = ServiceSpec {
            id,
            name,
            proto,
            port: svc_port,
            cluster_ips: cluster_ips.clone(),
            external_ips: external_ips.clone(),
            load_balancer_ips: lb_ips.clone(),
            node_port,
            external_local,
            internal_local,
            affinity,
            source_ranges: source_ranges.clone(),
            endpoints,
        };
        out.ports.push(CompiledPort {
            spec: Arc::new(spec),
            object: pobject,
            health_check,
        });
    }
    out
}

/// kube-proxy's source ranges: the field, or when it is empty the legacy
/// annotation; IPv6 ranges are skipped (the dataplane is IPv4-only).
fn source_ranges(svc: &Service) -> Result<Vec<Cidr>, String> {
    const ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
    let field = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.clone())
        .unwrap_or_default();
    let texts: Vec<String> = if field.is_empty() {
        svc.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION))
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default()
    } else {
        field
    };
    texts
        .iter()
        .filter(|t| !t.is_empty() && !t.contains(':'))
        .map(|t| t.parse::<Cidr>().map_err(|e| format!("{t:?}: {e}")))
        .collect()
}

fn node_facts(objs: &ClusterObjects, ctx: &NodeContext, problems: &mut Vec<Problem>) -> NodeFacts {
    let mut facts = NodeFacts::default();
    for (name, node) in &objs.nodes {
        let object = format!("Node {name}");
        let addrs: Vec<(String, Ipv4Addr)> = node
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .filter_map(|a| a.address.parse::<Ipv4Addr>().ok().map(|ip| (a.type_.clone(), ip)))
            .collect();
        let internal = addrs.iter().find(|(t, _)| t == "InternalIP").map(|(_, ip)| *ip);
        let spec = node.spec.as_ref();
        let cidr_text = spec
            .and_then(|s| {
                s.pod_cidrs
                    .iter()
                    .flatten()
                    .find(|c| !c.contains(':'))
                    .cloned()
                    .or(s.pod_cidr.clone())
            })
            .filter(|c| !c.contains(':'));
        let pod_cidr = match cidr_text.map(|c| c.parse::<Cidr>()) {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                problems.push(Problem {
                    object,
                    reason: format!("podCIDR: {e}"),
                });
                continue;
            }
            None => None,
        };
        if *name == ctx.node_name {
            let mut ips: Vec<Ipv4Addr> = internal.into_iter().collect();
            ips.extend(addrs.iter().filter(|(t, _)| t == "ExternalIP").map(|(_, ip)| *ip));
            ips.dedup();
            facts.node_ips = ips;
            facts.pod_cidr = pod_cidr;
            continue;
        }
        let Some(cidr) = pod_cidr else { continue }; // no pods to route to
        let Some(node_ip) = internal else {
            problems.push(Problem {
                object,
                reason: "has a podCIDR but no IPv4 InternalIP; its pods are unreachable".into(),
            });
            continue;
        };
        match vtep_mac(node) {
            Ok(vtep_mac) => {
                facts
                    .remote
                    .insert(name.clone(), (cidr, RemoteNode { node_ip, vtep_mac }));
            }
            Err(reason) => problems.push(Problem {
                object,
                reason: format!("{reason}; its pods are unreachable over the overlay"),
            }),
        }
    }
    facts
}

fn vtep_mac(node: &k8s_openapi::api::core::v1::Node) -> Result<Mac, String> {
    let ann = node.metadata.annotations.as_ref();
    let text = if let Some(m) = ann.and_then(|a| a.get(ANNOTATION_KXP_VTEP_MAC)) {
        m.clone()
    } else if let Some(data) = ann.and_then(|a| a.get(ANNOTATION_FLANNEL_BACKEND)) {
        let v: serde_json::Value =
            serde_json::from_str(data).map_err(|e| format!("{ANNOTATION_FLANNEL_BACKEND}: {e}"))?;
        v.get("VtepMAC")
            .and_then(|m| m.as_str())
            .ok_or_else(|| format!("{ANNOTATION_FLANNEL_BACKEND} has no VtepMAC"))?
            .to_string()
    } else {
        return Err(format!(
            "no VTEP MAC annotation ({ANNOTATION_KXP_VTEP_MAC} or {ANNOTATION_FLANNEL_BACKEND})"
        ));
    };
    parse_mac(&text).ok_or_else(|| format!("VTEP MAC {text:?} is not a MAC address"))
}

fn parse_mac(s: &str) -> Option<Mac> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).ok())
        .collect::<Option<_>>()?;
    Some(Mac(parts.try_into().ok()?))
}

/// kube-proxy skips headless and ExternalName services and those that
/// another proxy claims.
fn ignored(svc: &Service) -> bool {
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS)) {
        return true;
    }
    let Some(spec) = svc.spec.as_ref() else { return false };
    spec.type_.as_deref() == Some("ExternalName") || spec.cluster_ip.as_deref() == Some("None")
}

/// IPv4 addresses from strings; IPv6 ones are skipped (the dataplane is
/// IPv4-only), empty ones ignored, anything else is an error.
fn ipv4_list<'a>(items: impl Iterator<Item = &'a String>) -> Result<Vec<Ipv4Addr>, String> {
    let mut v = Vec::new();
    for s in items {
        if s.is_empty() || s == "None" || s.parse::<std::net::Ipv6Addr>().is_ok() {
            continue;
        }
        let ip: Ipv4Addr = s.parse().map_err(|_| format!("{s:?} is not an IP address"))?;
        if !v.contains(&ip) {
            v.push(ip);
        }
    }
    Ok(v)
}

fn protocol(p: Option<&str>) -> Result<Proto, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Proto::Tcp),
        "UDP" => Ok(Proto::Udp),
        "SCTP" => Err("protocol SCTP is not supported by kxp".into()),
        other => Err(format!("unknown protocol {other:?}")),
    }
}

fn endpoints_for(
    slices: &[(&ObjectKey, &EndpointSlice)],
    port: &K8sServicePort,
    proto: Proto,
    ctx: &NodeContext,
    problems: &mut Vec<Problem>,
) -> Vec<EndpointInfo> {
    let mut out = Vec::new();
    for (key, slice) in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let object = format!("EndpointSlice {key}");
        // The slice port that serves this service port: same name and protocol.
        let Some(sp) = slice.ports.iter().flatten().find(|sp| {
            sp.name.as_deref().unwrap_or("") == port.name.as_deref().unwrap_or("")
                && protocol(sp.protocol.as_deref()).ok() == Some(proto)
        }) else {
            continue;
        };
        let Some(target) = sp.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0) else {
            problems.push(Problem {
                object,
                reason: format!("port {:?} outside 1-65535", sp.port),
            });
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let Some(addr) = ep.addresses.first() else { continue };
            let Ok(ip) = addr.parse::<Ipv4Addr>() else {
                problems.push(Problem {
                    object: object.clone(),
                    reason: format!("endpoint address {addr:?} is not an IPv4 address"),
                });
                continue;
            };
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            out.push(EndpointInfo {
                addr: BackendAddr(Endpoint::new(ip, target)),
                ready,
                serving,
                terminating,
                local: ep.node_name.as_deref() == Some(ctx.node_name.as_str()),
            });
        }
    }
    out
}

/// A human summary of what would be programmed.
pub fn summary(d: &Desired) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let (mut frontends, mut node_ports, mut ready, mut terminating, mut empty) = (0, 0, 0, 0, 0);
    for spec in d.services.values() {
        frontends += spec.cluster_ips.len() + spec.external_ips.len() + spec.load_balancer_ips.len();
        node_ports += usize::from(spec.node_port.is_some());
        ready += spec.endpoints.iter().filter(|e| e.ready).count();
        terminating += spec.endpoints.iter().filter(|e| e.terminating).count();
        empty += usize::from(!spec.endpoints.iter().any(|e| e.ready || (e.serving && e.terminating)));
    }
    let _ = writeln!(s, "service ports:        {}", d.services.len());
    let _ = writeln!(s, "frontends (VIP:port): {frontends}");
    let _ = writeln!(s, "NodePorts:            {node_ports}");
    let _ = writeln!(s, "endpoints ready:      {ready} ({terminating} terminating)");
    let _ = writeln!(s, "ports without usable endpoints (rejected): {empty}");
    let _ = writeln!(
        s,
        "services ignored (headless, ExternalName, other proxy): {}",
        d.ignored
    );
    let _ = writeln!(s, "problems:             {}", d.problems.len());
    for spec in d.services.values() {
        let eps = spec.endpoints.iter().filter(|e| e.ready).count();
        let fe: Vec<String> = spec
            .cluster_ips
            .iter()
            .chain(&spec.external_ips)
            .chain(&spec.load_balancer_ips)
            .map(|ip| format!("{ip}:{}", spec.port))
            .collect();
        let np = spec.node_port.map(|p| format!(" nodePort {p}")).unwrap_or_default();
        let _ = writeln!(
            s,
            "  {} {} [{}]{np} -> {eps} ready",
            spec.name,
            spec.proto,
            fe.join(", ")
        );
    }
    s
}
