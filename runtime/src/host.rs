//! What the kernel knows that the engine needs: each port's MAC, the
//! uplink's subnet and gateway, which pods sit behind which pod interface,
//! and neighbours' MAC addresses. ARP stays the kernel's job: kxp reads the
//! results and asks the kernel to keep the next hops it needs resolved
//! ("managed" neighbour entries, Linux 5.16+), never answering ARP itself.
//!
//! Read from /proc/thread-self/net and with `ip` (netlink), both of which
//! follow the calling thread's network namespace.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use dataplane::addr::{Cidr, Mac, PortId};
use dataplane::tables::{LocalPod, PortInfo, PortRole, Tables};

/// One interface kxp serves, in `PortId` order.
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
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("exactly one uplink interface is needed, found {0}")]
    Uplinks(usize),
}

fn read(path: &str) -> Result<String, HostError> {
    std::fs::read_to_string(path).map_err(|source| HostError::Read {
        path: path.to_string(),
        source,
    })
}

pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut m = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(Mac(m))
}

/// What kxp needs to know about one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub ifindex: u32,
    pub mac: Mac,
    pub mtu: u16,
    pub rx_queues: u32,
    pub xdp_attached: bool,
}

/// Runs `ip ARGS` (netlink, in the calling thread's network namespace):
/// its output, or its error message.
pub(crate) fn ip(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Every interface in the calling thread's network namespace, by name, from
/// one `ip -d -o link show` (netlink; /sys/class/net would show the
/// namespace sysfs was mounted in).
pub fn links() -> HashMap<String, LinkInfo> {
    ip(&["-d", "-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(parse_link)
        .collect()
}

/// One interface, or `None` when it does not exist in this namespace.
pub fn link_info(name: &str) -> Option<LinkInfo> {
    ip(&["-d", "-o", "link", "show", "dev", name])
        .ok()?
        .lines()
        .find_map(parse_link)
        .map(|(_, l)| l)
}

/// One line of `ip -d -o link show`: "12: vp1_0@if2: <...> mtu 1500 ...".
fn parse_link(line: &str) -> Option<(String, LinkInfo)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1));
    let name = words.get(1)?.trim_end_matches(':').split('@').next()?.to_string();
    let info = LinkInfo {
        ifindex: words.first()?.trim_end_matches(':').parse().ok()?,
        mac: after("link/ether").and_then(|m| parse_mac(m)).unwrap_or_default(),
        mtu: after("mtu").and_then(|n| n.parse().ok()).unwrap_or(1500),
        rx_queues: after("numrxqueues").and_then(|n| n.parse().ok()).unwrap_or(1),
        xdp_attached: words
            .iter()
            .any(|w| w.starts_with("prog/xdp") || *w == "xdp" || *w == "xdpgeneric"),
    };
    Some((name, info))
}

/// One line of /proc/net/route (IPv4 FIB main table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Route<'a> {
    iface: &'a str,
    dst: Ipv4Addr,
    gateway: Ipv4Addr,
    prefix_len: u8,
}

/// /proc/net/route prints addresses as host-order hex of the network-order
/// word, i.e. little-endian on x86: "0100A8C0" is 192.168.0.1.
fn proc_ip(hex: &str) -> Option<Ipv4Addr> {
    let v = u32::from_str_radix(hex, 16).ok()?;
    Some(Ipv4Addr::from(v.to_le_bytes()))
}

fn routes(text: &str) -> Vec<Route<'_>> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let mask = proc_ip(f.get(7)?)?;
            Some(Route {
                iface: f.first()?,
                dst: proc_ip(f.get(1)?)?,
                gateway: proc_ip(f.get(2)?)?,
                prefix_len: u32::from(mask).count_ones() as u8,
            })
        })
        .collect()
}

/// Complete entries of /proc/net/arp: (ip, mac, device).
fn arp(text: &str) -> Vec<(Ipv4Addr, Mac, &str)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(2)?.trim_start_matches("0x"), 16).ok()?;
            // ATF_COM: the entry is resolved.
            if flags & 0x2 == 0 {
                return None;
            }
            Some((f.first()?.parse().ok()?, parse_mac(f.get(3)?)?, *f.get(5)?))
        })
        .collect()
}

/// Every IPv4 address of this host as (interface, address, prefix length),
/// from `ip -4 -o addr show`.
fn addresses() -> Vec<(String, Ipv4Addr, u8)> {
    ip(&["-4", "-o", "addr", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let at = f.iter().position(|w| *w == "inet")?;
            let (ip, len) = f.get(at + 1)?.split_once('/')?;
            Some((f.get(1)?.to_string(), ip.parse().ok()?, len.parse().ok()?))
        })
        .collect()
}

/// The first IPv4 address of `iface`.
pub fn first_ipv4(iface: &str) -> Option<Ipv4Addr> {
    addresses()
        .into_iter()
        .find(|(dev, _, _)| dev == iface)
        .map(|(_, ip, _)| ip)
}

/// Reads the kernel's view for `ports` (by `PortId`, holes where ports
/// were removed; exactly one uplink). A pod port whose interface has just
/// vanished reads as a hole; a missing uplink is an error.
pub fn observe(ports: &[Option<PortSpec>], vxlan_device: &str) -> Result<HostFacts, HostError> {
    let is = |p: &Option<PortSpec>, role| p.as_ref().is_some_and(|p| p.role == role);
    let uplinks: Vec<usize> = (0..ports.len()).filter(|&i| is(&ports[i], PortRole::Uplink)).collect();
    if uplinks.len() != 1 {
        return Err(HostError::Uplinks(uplinks.len()));
    }
    let uplink = PortId(uplinks[0] as u16);
    let hole = PortInfo {
        name: String::new(),
        mac: Mac::default(),
        vlan: None,
        role: PortRole::Pod,
    };
    let links = links();
    let mut infos = Vec::with_capacity(ports.len());
    let mut uplink_mtu = 1500;
    for p in ports {
        let info = match p {
            Some(p) => match links.get(&p.name).copied() {
                Some(link) if p.role == PortRole::Uplink => {
                    uplink_mtu = link.mtu;
                    PortInfo {
                        name: p.name.clone(),
                        mac: link.mac,
                        vlan: None,
                        role: p.role,
                    }
                }
                Some(link) => PortInfo {
                    name: p.name.clone(),
                    mac: link.mac,
                    vlan: None,
                    role: p.role,
                },
                None if p.role == PortRole::Uplink => return Err(HostError::NoInterface(p.name.clone())),
                None => hole.clone(),
            },
            None => hole.clone(),
        };
        infos.push(info);
    }
    let up_name = infos[uplinks[0]].name.clone();
    let up_name = up_name.as_str();
    let route_text = read("/proc/thread-self/net/route")?;
    let arp_text = read("/proc/thread-self/net/arp")?;
    let rt = routes(&route_text);
    let neigh = arp(&arp_text);
    let addrs = addresses();
    let (uplink_ip, uplink_subnet) = match addrs.iter().find(|(dev, _, _)| dev == up_name) {
        Some((_, ip, len)) => (Some(*ip), Some(Cidr::of(*ip, *len))),
        None => (None, None),
    };
    let mut host_addrs: Vec<Ipv4Addr> = addrs.iter().map(|(_, ip, _)| *ip).collect();
    host_addrs.sort();
    host_addrs.dedup();
    let gateway = rt
        .iter()
        .find(|r| r.prefix_len == 0 && r.iface == up_name && !r.gateway.is_unspecified())
        .map(|r| r.gateway);
    let port_of = |name: &str| {
        ports
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.name == name && p.role == PortRole::Pod))
    };
    let mac_on = |ip: Ipv4Addr, dev: &str| neigh.iter().find(|(i, _, d)| *i == ip && *d == dev).map(|(_, m, _)| *m);
    let mut local_pods = BTreeMap::new();
    for r in rt.iter().filter(|r| r.prefix_len == 32 && r.gateway.is_unspecified()) {
        if let (Some(i), Some(mac)) = (port_of(r.iface), mac_on(r.dst, r.iface)) {
            local_pods.insert(
                r.dst,
                LocalPod {
                    port: PortId(i as u16),
                    mac,
                },
            );
        }
    }
    let neighbors = neigh
        .iter()
        .filter(|(_, _, d)| *d == up_name)
        .map(|(ip, mac, _)| (*ip, *mac))
        .collect();
    Ok(HostFacts {
        ports: infos,
        uplink,
        uplink_mtu,
        host_port: ports
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.role == PortRole::Host))
            .map(|i| PortId(i as u16)),
        uplink_ip,
        uplink_subnet,
        gateway,
        host_addrs,
        vtep_mac: links.get(vxlan_device).map(|l| l.mac),
        local_pods,
        neighbors,
    })
}

/// `observe`, then asks the kernel to resolve what the tables need and it
/// has not resolved yet: the uplink next hop of every remote node, the
/// gateway, and every local pod. Such requests are logged and retried on
/// the next call; the facts returned are what the kernel knows now.
pub fn observe_for(ports: &[Option<PortSpec>], vxlan_device: &str, t: &Tables) -> Result<HostFacts, HostError> {
    let facts = observe(ports, vxlan_device)?;
    if request_missing(ports, &facts, t)? {
        // ARP on a LAN answers within milliseconds: look again, so a new
        // pod or next hop is usable now rather than at the next call.
        std::thread::sleep(std::time::Duration::from_millis(50));
        return observe(ports, vxlan_device);
    }
    Ok(facts)
}

/// Asks for what `observe_for` wants resolved; true if anything was asked.
fn request_missing(ports: &[Option<PortSpec>], facts: &HostFacts, t: &Tables) -> Result<bool, HostError> {
    let mut asked = false;
    let uplink = &facts.ports[usize::from(facts.uplink.0)].name;
    let next_hop = |ip: Ipv4Addr| match facts.uplink_subnet {
        Some(s) if s.contains(ip) => Some(ip),
        _ => facts.gateway,
    };
    let mut wanted: Vec<Ipv4Addr> = t.pod_routes().filter_map(|(_, n)| next_hop(n.node_ip)).collect();
    wanted.extend(facts.gateway);
    wanted.sort();
    wanted.dedup();
    for ip in wanted.into_iter().filter(|ip| !facts.neighbors.contains_key(ip)) {
        asked = true;
        if let Err(e) = keep_resolved(ip, uplink) {
            tracing::warn!(%ip, dev = %uplink, error = %e, "cannot ask the kernel to resolve a next hop");
        }
    }
    for (ip, dev) in unresolved_pods(ports)? {
        asked = true;
        if let Err(e) = keep_resolved(ip, &dev) {
            tracing::warn!(%ip, %dev, error = %e, "cannot ask the kernel to resolve a pod");
        }
    }
    Ok(asked)
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

/// Pods routed through pod ports whose MAC the kernel has not resolved yet.
fn unresolved_pods(ports: &[Option<PortSpec>]) -> Result<Vec<(Ipv4Addr, String)>, HostError> {
    let route_text = read("/proc/thread-self/net/route")?;
    let arp_text = read("/proc/thread-self/net/arp")?;
    let neigh = arp(&arp_text);
    Ok(routes(&route_text)
        .into_iter()
        .filter(|r| r.prefix_len == 32 && r.gateway.is_unspecified())
        .filter(|r| {
            ports
                .iter()
                .flatten()
                .any(|p| p.role == PortRole::Pod && p.name == r.iface)
        })
        .filter(|r| !neigh.iter().any(|(ip, _, d)| *ip == r.dst && *d == r.iface))
        .map(|r| (r.dst, r.iface.to_string()))
        .collect())
}

/// Asks the kernel to resolve `ip` on `dev` and keep it resolved (a
/// managed neighbour entry): the kernel sends the ARP requests, kxp only
/// reads the answer. Errors are returned for logging; a failed request is
/// retried on the next observation.
fn keep_resolved(addr: Ipv4Addr, dev: &str) -> Result<(), String> {
    ip(&[
        "-4",
        "neigh",
        "replace",
        &addr.to_string(),
        "dev",
        dev,
        "managed",
        "extern_learn",
    ])
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_route() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t014DA8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t004DA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    vp1_0\t02014D0A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        let r = routes(text);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].gateway, Ipv4Addr::new(192, 168, 77, 1));
        assert_eq!(r[0].prefix_len, 0);
        assert_eq!(r[1].dst, Ipv4Addr::new(192, 168, 77, 0));
        assert_eq!(r[1].prefix_len, 24);
        assert_eq!(
            (r[2].iface, r[2].dst, r[2].prefix_len),
            ("vp1_0", Ipv4Addr::new(10, 77, 1, 2), 32)
        );
    }

    #[test]
    fn parses_only_complete_arp_entries() {
        let text = "IP address       HW type     Flags       HW address            Mask     Device\n\
                    192.168.77.2     0x1         0x2         0e:00:00:00:00:02     *        eth0\n\
                    192.168.77.3     0x1         0x0         00:00:00:00:00:00     *        eth0\n";
        let a = arp(text);
        assert_eq!(
            a,
            vec![(Ipv4Addr::new(192, 168, 77, 2), Mac([0x0e, 0, 0, 0, 0, 2]), "eth0")]
        );
    }

    #[test]
    fn parses_ip_link_lines() {
        let line = "4: vp1_0@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 xdp qdisc noqueue state UP \\    \
                    link/ether 6a:0d:3e:aa:bb:cc brd ff:ff:ff:ff:ff:ff link-netns p0 promiscuity 0 \
                    prog/xdp id 42 numtxqueues 2 numrxqueues 2 gso_max_size 65536";
        let (name, l) = parse_link(line).unwrap();
        assert_eq!(name, "vp1_0");
        assert_eq!((l.ifindex, l.mtu, l.rx_queues, l.xdp_attached), (4, 1500, 2, true));
        assert_eq!(l.mac, Mac([0x6a, 0x0d, 0x3e, 0xaa, 0xbb, 0xcc]));
        let tun =
            "9: kxp0: <POINTOPOINT,NOARP,UP,LOWER_UP> mtu 1500 qdisc fq state UNKNOWN \\    link/none numrxqueues 1";
        let (name, l) = parse_link(tun).unwrap();
        assert_eq!((name.as_str(), l.mac, l.xdp_attached), ("kxp0", Mac::default(), false));
    }

    #[test]
    fn mac_parsing_rejects_garbage() {
        assert_eq!(parse_mac("0e:77:00:00:00:01\n"), Some(Mac([0x0e, 0x77, 0, 0, 0, 1])));
        assert_eq!(parse_mac("0e:77:00:00:00"), None);
        assert_eq!(parse_mac("0e:77:00:00:00:01:02"), None);
        assert_eq!(parse_mac("zz:77:00:00:00:01"), None);
    }
}
