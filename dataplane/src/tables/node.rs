//! Facts about this node that change rarely: its addresses, interfaces,
//! NAT ranges and overlay settings.

use std::net::Ipv4Addr;

use crate::addr::{Cidr, Mac, PortId};

/// What an interface connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortRole {
    /// The node's underlay: external clients, other nodes, VXLAN.
    Uplink,
    /// The node side of a local pod's veth.
    Pod,
    /// The node's own stack (a TUN device): its packets to ClusterIPs, and
    /// the way back to it.
    Host,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    pub name: String,
    pub mac: Mac,
    /// 802.1Q tag frames on this port carry, if any.
    pub vlan: Option<u16>,
    pub role: PortRole,
}

/// How L4 checksums are written after NAT (see DESIGN.md section 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChecksumPolicy {
    /// RFC 1624 incremental update. Correct whenever the input checksum is
    /// complete, which holds for frames from real NICs and from veths whose
    /// peer has tx checksum offload off (the lab and the deploy scripts turn
    /// it off on pod veths, as Calico and Flannel do on their devices).
    Incremental,
    /// Recompute over the whole segment. Also repairs frames that arrive
    /// with a CHECKSUM_PARTIAL pseudo-header sum, at O(payload) cost — and
    /// would equally "repair" a corrupted segment, which is why it is not the
    /// default.
    Full,
}

/// Overlay settings; defaults match Flannel's VXLAN backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    pub port: u16,
    /// Inner source MAC of frames this node encapsulates (its VTEP MAC).
    pub vtep_mac: Mac,
}

impl Default for VxlanConfig {
    fn default() -> Self {
        VxlanConfig {
            vni: 1,
            port: 8472,
            vtep_mac: Mac::default(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: String,
    /// Addresses NodePorts answer on (kube-proxy's `nodePortAddresses`,
    /// default all node addresses). The first is the VXLAN endpoint.
    pub node_ips: Vec<Ipv4Addr>,
    /// Every address of this host's own stack (all interfaces, e.g. the
    /// gateway address on pod veths a kubelet probe comes from). Packets to
    /// them are the kernel's, never routed by kxp.
    pub host_addrs: Vec<Ipv4Addr>,
    /// `clusterCIDR`: sources outside it are masqueraded when they reach a
    /// ClusterIP, sources inside it are "pods".
    pub cluster_cidr: Option<Cidr>,
    /// Source address for SNAT (masquerade, hairpin, eTP=Cluster).
    pub snat_ip: Ipv4Addr,
    /// Source ports SNAT may use. Keep it out of the kernel's ephemeral range
    /// (`ip_local_port_range`) and the NodePort range so SNATed flows never
    /// collide with the node's own connections.
    pub snat_ports: (u16, u16),
    pub node_port_range: (u16, u16),
    /// Indexed by `PortId`.
    pub ports: Vec<PortInfo>,
    pub uplink: PortId,
    /// The port into this node's own stack, if there is one: replies to the
    /// node's connections to services leave through it.
    pub host_port: Option<PortId>,
    /// Source address for flows delivered to a backend on this node's own
    /// address (a host-network pod here): routed into the host port, so the
    /// node's replies come back through kxp to be un-NATed.
    pub host_snat_ip: Option<Ipv4Addr>,
    /// The uplink's MTU: a packet that would exceed it once VXLAN-wrapped
    /// gets ICMP "fragmentation needed" (path-MTU discovery) if it says DF.
    pub uplink_mtu: u16,
    /// The uplink's directly attached subnet; other destinations go via
    /// `gateway`.
    pub uplink_subnet: Cidr,
    pub gateway: Option<Ipv4Addr>,
    pub vxlan: VxlanConfig,
    pub checksum: ChecksumPolicy,
    /// Rejections (ICMP port unreachable) per second per worker, and burst.
    pub reject_rate: (u32, u32),
}

impl NodeConfig {
    pub fn is_node_ip(&self, ip: Ipv4Addr) -> bool {
        self.node_ips.contains(&ip)
    }

    /// Whether `ip` belongs to this host's own stack.
    pub fn is_host_addr(&self, ip: Ipv4Addr) -> bool {
        self.is_node_ip(ip) || self.host_addrs.contains(&ip)
    }

    pub fn in_cluster(&self, ip: Ipv4Addr) -> bool {
        self.cluster_cidr.is_some_and(|c| c.contains(ip))
    }

    pub fn port(&self, id: PortId) -> Option<&PortInfo> {
        self.ports.get(usize::from(id.0))
    }

    pub fn is_node_port(&self, port: u16) -> bool {
        (self.node_port_range.0..=self.node_port_range.1).contains(&port)
    }

    /// The VXLAN tunnel endpoint address (the first node address).
    pub fn vtep_ip(&self) -> Option<Ipv4Addr> {
        self.node_ips.first().copied()
    }

    /// A minimal config for tests and benches: one uplink (port 0).
    pub fn single_uplink(name: &str, node_ip: Ipv4Addr, subnet: Cidr, mac: Mac) -> Self {
        NodeConfig {
            name: name.to_string(),
            node_ips: vec![node_ip],
            host_addrs: Vec::new(),
            cluster_cidr: None,
            snat_ip: node_ip,
            snat_ports: (1024, 29999),
            node_port_range: (30000, 32767),
            ports: vec![PortInfo {
                name: "uplink".into(),
                mac,
                vlan: None,
                role: PortRole::Uplink,
            }],
            uplink: PortId(0),
            uplink_mtu: 1500,
            host_port: None,
            host_snat_ip: None,
            uplink_subnet: subnet,
            gateway: None,
            vxlan: VxlanConfig::default(),
            checksum: ChecksumPolicy::Incremental,
            reject_rate: (1000, 50),
        }
    }
}
