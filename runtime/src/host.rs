//! What the kernel knows that the engine needs: each port's MAC, the
//! uplink's subnet and gateway, which pods sit behind which pod interface,
//! and neighbours' MAC addresses. ARP stays the kernel's job: kxp reads the
//! results and asks the kernel to keep the next hops it needs resolved
//! ("managed" neighbour entries, Linux 5.16+), never answering ARP itself.
//!
//! Read over rtnetlink (`netlink`), in the calling thread's network
//! namespace. A failed read is an error: the caller keeps what it knew.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use dataplane::addr::{Cidr, Mac, PortId};
use dataplane::tables::{LocalPod, PortInfo, PortRole, Tables};

pub use crate::netlink::LinkInfo;
use crate::netlink::{NetlinkError, Rtnl};
use crate::ports::PortTable;

/// An interface kxp is asked to serve (the port table resolves it to the
/// interface it is).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub name: String,
    pub role: PortRole,
}

/// A snapshot of the kernel's view, as the engine's tables want it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFacts {
    /// Indexed by `PortId`, like `NodeConfig::ports`.
    pub ports: Vec<PortInfo>,
    pub uplink: PortId,
    pub uplink_mtu: u16,
    /// The node's TUN port, if there is one.
    pub host_port: Option<PortId>,
    /// The uplink's first IPv4 address and directly attached subnet.
    pub uplink_ip: Option<Ipv4Addr>,
    pub uplink_subnet: Option<Cidr>,
    pub gateway: Option<Ipv4Addr>,
    /// Every IPv4 address of this host (all interfaces).
    pub host_addrs: Vec<Ipv4Addr>,
    /// MAC of the local VXLAN device (e.g. Flannel's `flannel.1`), which
    /// other nodes know as this node's VTEP MAC.
    pub vtep_mac: Option<Mac>,
    /// Pods routed (/32) through a pod port, with their MACs.
    pub local_pods: BTreeMap<Ipv4Addr, LocalPod>,
    /// Resolved neighbours on the uplink.
    pub neighbors: BTreeMap<Ipv4Addr, Mac>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("interface {0} does not exist in this network namespace; check kxp.interfaces / kxp.podInterfaces")]
    NoInterface(String),
    #[error("cannot read the kernel's interfaces, routes or neighbours: {0}")]
    Netlink(#[from] NetlinkError),
    #[error("exactly one uplink interface is needed, found {0}")]
    Uplinks(usize),
}

pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut m = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(Mac(m))
}

/// Every interface in the calling thread's network namespace, by name.
pub fn links() -> Result<HashMap<String, LinkInfo>, HostError> {
    Ok(Rtnl::open()?.links()?)
}

/// One interface, or `None` when it does not exist in this namespace (or
/// the kernel cannot be asked).
pub fn link_info(name: &str) -> Option<LinkInfo> {
    links().ok()?.get(name).copied()
}

/// The first IPv4 address of `iface`.
pub fn first_ipv4(iface: &str) -> Option<Ipv4Addr> {
    let mut rtnl = Rtnl::open().ok()?;
    let index = rtnl.links().ok()?.get(iface)?.ifindex;
    rtnl.addresses()
        .ok()?
        .into_iter()
        .find(|a| a.ifindex == index)
        .map(|a| a.ip)
}

/// One read of the kernel: the facts, and the local pods whose MAC the
/// kernel has not resolved yet (by address and interface index).
struct Reading {
    facts: HostFacts,
    unresolved_pods: Vec<(Ipv4Addr, u32)>,
    uplink_index: u32,
}

/// Reads the kernel's view for `ports` (exactly one uplink), given its
/// interfaces (`links`, read by the caller, who picks the ports from
/// them). Ports are matched by interface index: a pod port whose interface
/// has just vanished or was re-created reads as a hole; a missing uplink
/// is an error.
fn read(
    rtnl: &mut Rtnl,
    links: &HashMap<String, LinkInfo>,
    ports: &PortTable,
    vxlan_device: &str,
) -> Result<Reading, HostError> {
    let uplinks: Vec<PortId> = ports
        .iter()
        .filter(|(_, p)| p.role == PortRole::Uplink)
        .map(|(id, _)| id)
        .collect();
    if uplinks.len() != 1 {
        return Err(HostError::Uplinks(uplinks.len()));
    }
    let uplink = uplinks[0];
    let by_index: HashMap<u32, &LinkInfo> = links.values().map(|l| (l.ifindex, l)).collect();
    let hole = PortInfo {
        name: String::new(),
        mac: Mac::default(),
        vlan: None,
        role: PortRole::Pod,
    };
    let mut infos = vec![hole; ports.len()];
    let mut uplink_mtu = 1500;
    // Pod ports by interface index.
    let mut pod_port_of = HashMap::new();
    for (id, p) in ports.iter() {
        let Some(link) = by_index.get(&p.ifindex) else {
            if p.role == PortRole::Uplink {
                return Err(HostError::NoInterface(p.name.clone()));
            }
            continue;
        };
        match p.role {
            PortRole::Uplink => uplink_mtu = link.mtu,
            PortRole::Pod => {
                pod_port_of.insert(link.ifindex, id);
            }
            PortRole::Host => {}
        }
        infos[usize::from(id.0)] = PortInfo {
            name: p.name.clone(),
            mac: link.mac,
            vlan: None,
            role: p.role,
        };
    }
    let uplink_index = ports[uplink].ifindex;
    let addrs = rtnl.addresses()?;
    let routes = rtnl.routes()?;
    let neigh = rtnl.neighbours()?;
    let (uplink_ip, uplink_subnet) = match addrs.iter().find(|a| a.ifindex == uplink_index) {
        Some(a) => (Some(a.ip), Some(Cidr::of(a.ip, a.prefix_len))),
        None => (None, None),
    };
    let mut host_addrs: Vec<Ipv4Addr> = addrs.iter().map(|a| a.ip).collect();
    host_addrs.sort();
    host_addrs.dedup();
    let gateway = routes
        .iter()
        .find(|r| r.prefix_len == 0 && r.oif == uplink_index && !r.gateway.is_unspecified())
        .map(|r| r.gateway);
    let mac_on = |ip: Ipv4Addr, dev: u32| neigh.iter().find(|n| n.ip == ip && n.ifindex == dev).map(|n| n.mac);
    let mut local_pods = BTreeMap::new();
    let mut unresolved_pods = Vec::new();
    for r in routes
        .iter()
        .filter(|r| r.prefix_len == 32 && r.gateway.is_unspecified())
    {
        let Some(&port) = pod_port_of.get(&r.oif) else { continue };
        match mac_on(r.dst, r.oif) {
            Some(mac) => {
                local_pods.insert(r.dst, LocalPod { port, mac });
            }
            None => unresolved_pods.push((r.dst, r.oif)),
        }
    }
    let neighbors = neigh
        .iter()
        .filter(|n| n.ifindex == uplink_index)
        .map(|n| (n.ip, n.mac))
        .collect();
    let facts = HostFacts {
        ports: infos,
        uplink,
        uplink_mtu,
        host_port: ports.with_role(PortRole::Host),
        uplink_ip,
        uplink_subnet,
        gateway,
        host_addrs,
        vtep_mac: links.get(vxlan_device).map(|l| l.mac),
        local_pods,
        neighbors,
    };
    Ok(Reading {
        facts,
        unresolved_pods,
        uplink_index,
    })
}

/// Reads the kernel's view for `ports` given its interfaces (`links()`,
/// which the caller read to pick its ports; see `read`), then asks the kernel to resolve what the tables need and it
/// has not resolved yet: the uplink next hop of every remote node, the
/// gateway, and every local pod. It does not wait: the kernel's neighbour
/// notification (see `netlink::watch`) brings the answer. Failed requests
/// are logged and asked again on the next call.
pub fn observe_for(
    links: &HashMap<String, LinkInfo>,
    ports: &PortTable,
    vxlan_device: &str,
    t: &Tables,
) -> Result<HostFacts, HostError> {
    let mut rtnl = Rtnl::open()?;
    let reading = read(&mut rtnl, links, ports, vxlan_device)?;
    request_missing(&mut rtnl, &reading, t);
    Ok(reading.facts)
}

/// Asks for what `observe_for` wants resolved; true if anything was asked.
fn request_missing(rtnl: &mut Rtnl, reading: &Reading, t: &Tables) -> bool {
    let facts = &reading.facts;
    let next_hop = |ip: Ipv4Addr| match facts.uplink_subnet {
        Some(s) if s.contains(ip) => Some(ip),
        _ => facts.gateway,
    };
    let mut wanted: Vec<Ipv4Addr> = t.pod_routes().filter_map(|(_, n)| next_hop(n.node_ip)).collect();
    wanted.extend(facts.gateway);
    wanted.sort();
    wanted.dedup();
    let mut asks: Vec<(Ipv4Addr, u32)> = wanted
        .into_iter()
        .filter(|ip| !facts.neighbors.contains_key(ip))
        .map(|ip| (ip, reading.uplink_index))
        .collect();
    asks.extend(reading.unresolved_pods.iter().copied());
    for &(ip, dev) in &asks {
        if let Err(e) = rtnl.keep_resolved(ip, dev) {
            tracing::warn!(%ip, ifindex = dev, error = %e, "cannot ask the kernel to resolve a neighbour");
        }
    }
    !asks.is_empty()
}

/// Names of the interfaces in this network namespace that start with one of
/// `prefixes` (e.g. a CNI's pod veths: `cali`, `veth`).
pub fn interfaces_with_prefixes(links: &HashMap<String, LinkInfo>, prefixes: &[String]) -> Vec<String> {
    links
        .keys()
        .filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str())))
        .cloned()
        .collect()
}

/// Writes `new` into the tables, changing only what differs from `old`
/// (the facts applied last; `None` at first). Node addresses from Node
/// objects win: the uplink's address is used only when there are none
/// (manifests without Node objects).
pub fn apply(t: &mut Tables, old: Option<&HostFacts>, new: &HostFacts) {
    let mut node = t.node().clone();
    node.ports = new.ports.clone();
    node.uplink = new.uplink;
    node.uplink_mtu = new.uplink_mtu;
    node.host_port = new.host_port;
    node.host_snat_ip = new.host_port.map(|_| crate::tun::HOST_SNAT_IP);
    if let Some(subnet) = new.uplink_subnet {
        node.uplink_subnet = subnet;
    }
    node.gateway = new.gateway;
    node.host_addrs = new.host_addrs.clone();
    if let Some(mac) = new.vtep_mac {
        node.vxlan.vtep_mac = mac;
    }
    if node.node_ips.is_empty() {
        if let Some(ip) = new.uplink_ip {
            node.node_ips = vec![ip];
            node.snat_ip = ip;
        }
    }
    t.set_node(node);
    let empty = BTreeMap::new();
    let old_pods = old.map_or(&empty, |o| &o.local_pods);
    for ip in old_pods.keys().filter(|ip| !new.local_pods.contains_key(ip)) {
        t.remove_local_pod(*ip);
    }
    for (ip, pod) in &new.local_pods {
        if old_pods.get(ip) != Some(pod) {
            t.set_local_pod(*ip, *pod);
        }
    }
    let empty = BTreeMap::new();
    let old_neigh = old.map_or(&empty, |o| &o.neighbors);
    for ip in old_neigh.keys().filter(|ip| !new.neighbors.contains_key(ip)) {
        t.remove_neighbor(*ip);
    }
    for (ip, mac) in &new.neighbors {
        if old_neigh.get(ip) != Some(mac) {
            t.set_neighbor(*ip, *mac);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing_rejects_garbage() {
        assert_eq!(parse_mac("0e:77:00:00:00:01\n"), Some(Mac([0x0e, 0x77, 0, 0, 0, 1])));
        assert_eq!(parse_mac("0e:77:00:00:00"), None);
        assert_eq!(parse_mac("0e:77:00:00:00:01:02"), None);
        assert_eq!(parse_mac("zz:77:00:00:00:01"), None);
    }
}
