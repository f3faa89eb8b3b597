//! Where a packet goes after NAT: a local pod's port, a remote node over
//! VXLAN, or the uplink toward a neighbour or the gateway. Also VXLAN decap.

use std::net::Ipv4Addr;

use super::{DropReason, Frame, Origin, Pkt, Verdict, Worker};
use crate::addr::{Mac, PortId};
use crate::hash;
use crate::tables::{RemoteNode, Tables};
use crate::time::Time;
use crate::wire::ethernet::{self, ETHERTYPE_IPV4, L2};
use crate::wire::ipv4::{self, NewHeader, PROTO_UDP};
use crate::wire::l4::{L4, UDP_HEADER_LEN};
use crate::wire::{be16, put16, vxlan};

/// Where packets for one destination go (cached per worker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Egress {
    /// Out of `port` to `mac` (a local pod, or a host/gateway on the uplink).
    Direct { port: PortId, mac: Mac },
    /// VXLAN to another node, whose underlay next hop is `next_hop`.
    Overlay { node: RemoteNode, next_hop: Mac },
}

/// UDP source ports for VXLAN come from this range (RFC 7348 recommends
/// 49152-65535), chosen by the inner flow hash so ECMP spreads flows.
const VXLAN_SRC_PORT_BASE: u16 = 49152;

/// What VXLAN adds to an IP packet: outer IPv4, UDP, VXLAN, inner Ethernet.
const VXLAN_OVERHEAD: usize = ipv4::MIN_HEADER_LEN + UDP_HEADER_LEN + vxlan::HEADER_LEN + 14;

impl Worker {
    /// Sends the packet (already NATed and TTL-decremented) toward
    /// `pkt.ip.dst`, rewriting its L2 header for the egress port.
    pub(super) fn send(&mut self, t: &Tables, frame: &mut Frame, pkt: &Pkt) -> Result<Verdict, DropReason> {
        let dst = pkt.ip.dst;
        let egress = match self.routes.get(t.generation(), dst) {
            Some(e) => e,
            None => {
                let e = resolve(t, dst)?;
                self.routes.put(t.generation(), dst, e);
                e
            }
        };
        match egress {
            Egress::Direct { port, mac } => {
                let p = t.node().port(port).ok_or(DropReason::UnknownPort)?;
                set_l2(frame, &pkt.l2, mac, p.mac, p.vlan)?;
                Ok(Verdict::Tx(port))
            }
            Egress::Overlay { .. } if pkt.ip.total_len + VXLAN_OVERHEAD > usize::from(t.node().uplink_mtu) => {
                let mtu = t.node().uplink_mtu.saturating_sub(VXLAN_OVERHEAD as u16);
                self.frag_needed(t, frame, *pkt, mtu)
            }
            Egress::Overlay { node, next_hop } => self.encap(t, frame, pkt, node, next_hop),
        }
    }

    /// Wraps the IP packet in Ethernet/IPv4/UDP/VXLAN toward `remote`.
    fn encap(
        &mut self,
        t: &Tables,
        frame: &mut Frame,
        pkt: &Pkt,
        remote: RemoteNode,
        next_hop: Mac,
    ) -> Result<Verdict, DropReason> {
        let node = t.node();
        let up = node.port(node.uplink).ok_or(DropReason::UnknownPort)?;
        let src_ip = node.vtep_ip().ok_or(DropReason::NoRoute)?;
        let flow_hash = inner_flow_hash(frame.data(), &pkt.ip);
        set_l2(frame, &pkt.l2, remote.vtep_mac, node.vxlan.vtep_mac, None)?;
        let inner_len = frame.len();
        let outer_l2 = ethernet::header_len(up.vlan);
        frame.push_front(outer_l2 + ipv4::MIN_HEADER_LEN + UDP_HEADER_LEN + vxlan::HEADER_LEN)?;
        let id = self.next_ip_id();
        let b = frame.data_mut();
        ethernet::write(b, next_hop, up.mac, up.vlan, ETHERTYPE_IPV4);
        let udp_len = UDP_HEADER_LEN + vxlan::HEADER_LEN + inner_len;
        ipv4::write(
            b,
            outer_l2,
            NewHeader {
                total_len: (ipv4::MIN_HEADER_LEN + udp_len) as u16,
                id,
                dont_fragment: false,
                ttl: 64,
                proto: PROTO_UDP,
                src: src_ip,
                dst: remote.node_ip,
            },
        );
        let u = outer_l2 + ipv4::MIN_HEADER_LEN;
        put16(b, u, VXLAN_SRC_PORT_BASE | (flow_hash as u16 & 0x3fff));
        put16(b, u + 2, node.vxlan.port);
        put16(b, u + 4, udp_len as u16);
        // Zero UDP checksum, as Linux VXLAN sends by default (RFC 7348 allows it).
        put16(b, u + 6, 0);
        vxlan::write(b, u + UDP_HEADER_LEN, node.vxlan.vni);
        self.stats.encapsulated += 1;
        Ok(Verdict::Tx(node.uplink))
    }

    /// Strips the outer headers of VXLAN addressed to this node and handles
    /// the inner packet as arriving from the overlay.
    pub(super) fn decap(
        &mut self,
        now: Time,
        t: &Tables,
        frame: &mut Frame,
        outer: Pkt,
        udp: L4,
    ) -> Result<Verdict, DropReason> {
        // Only nodes kxp routes pods to may tunnel to it: anyone else could
        // wrap a packet to a ClusterIP and reach what is cluster-internal.
        let peer = outer.ip.src;
        let generation = t.generation();
        let pod_cidr = match self.peers.get(generation, peer) {
            Some(c) => c,
            None => {
                let c = t.overlay_peer_cidr(peer).ok_or(DropReason::OverlayUnknownPeer)?;
                self.peers.put(generation, peer, c);
                c
            }
        };
        let vx = udp.off + UDP_HEADER_LEN;
        let vni = vxlan::parse(frame.data(), vx)?;
        if vni != t.node().vxlan.vni {
            return Err(DropReason::WrongVni);
        }
        frame.pull_front(vx + vxlan::HEADER_LEN)?;
        let l2 = ethernet::parse(frame.data())?;
        if l2.ethertype != ETHERTYPE_IPV4 {
            return Err(DropReason::OverlayNotIpv4);
        }
        let ip = ipv4::parse(frame.data(), l2.len)?;
        // A peer speaks for its own pods and itself, nobody else.
        if !t.overlay_peer_may_send(peer, pod_cidr, ip.src) {
            return Err(DropReason::OverlaySpoofedSource);
        }
        frame.truncate(ip.end());
        self.stats.decapsulated += 1;
        let pkt = Pkt {
            l2,
            ip,
            ingress: outer.ingress,
            origin: Origin::Overlay,
        };
        self.handle_ip(now, t, frame, pkt)
    }
}

/// The egress decision for `dst` from the tables: local pod, remote pod
/// CIDR (overlay), or the uplink.
fn resolve(t: &Tables, dst: Ipv4Addr) -> Result<Egress, DropReason> {
    if let Some(pod) = t.local_pod(dst) {
        return Ok(Egress::Direct {
            port: pod.port,
            mac: pod.mac,
        });
    }
    if let Some(node) = t.remote_node(dst) {
        return Ok(Egress::Overlay {
            node,
            next_hop: uplink_next_hop(t, node.node_ip)?,
        });
    }
    if t.node().is_host_addr(dst) {
        // Into this node's own stack through its TUN port: a reply to the
        // node's own connection, or a flow to a backend on the node's own
        // address (SNATed to `host_snat_ip`, so its replies come back).
        let port = t.node().host_port.ok_or(DropReason::NoRoute)?;
        let mac = t.node().port(port).ok_or(DropReason::UnknownPort)?.mac;
        return Ok(Egress::Direct { port, mac });
    }
    Ok(Egress::Direct {
        port: t.node().uplink,
        mac: uplink_next_hop(t, dst)?,
    })
}

/// MAC of the next hop on the uplink for `dst`: the host itself when it is on
/// the uplink subnet, the gateway otherwise.
fn uplink_next_hop(t: &Tables, dst: Ipv4Addr) -> Result<Mac, DropReason> {
    let node = t.node();
    let hop = if node.uplink_subnet.contains(dst) {
        dst
    } else {
        node.gateway.ok_or(DropReason::NoRoute)?
    };
    t.neighbor(hop).ok_or(DropReason::NoNeighbor)
}

/// Replaces the L2 header (length `cur.len`) in front of the IP packet with
/// one for the egress port.
fn set_l2(frame: &mut Frame, cur: &L2, dst: Mac, src: Mac, vlan: Option<u16>) -> Result<(), DropReason> {
    let want = ethernet::header_len(vlan);
    if want > cur.len {
        frame.push_front(want - cur.len)?;
    } else if want < cur.len {
        frame.pull_front(cur.len - want)?;
    }
    ethernet::write(frame.data_mut(), dst, src, vlan, ETHERTYPE_IPV4);
    Ok(())
}

/// Hash of the inner 5-tuple (ports when the packet has them).
fn inner_flow_hash(b: &[u8], ip: &ipv4::Ipv4) -> u64 {
    let ports = match ip.proto {
        ipv4::PROTO_TCP | ipv4::PROTO_UDP if !ip.is_fragment() && ip.l4_len() >= 4 => {
            (be16(b, ip.l4_off()), be16(b, ip.l4_off() + 2))
        }
        _ => (0, 0),
    };
    hash::flow(u32::from(ip.src), u32::from(ip.dst), ports.0, ports.1, ip.proto)
}

pub(super) fn answer_l2(frame: &mut Frame, pkt: &Pkt, t: &Tables) -> Result<(), DropReason> {
    let port = t.node().port(pkt.ingress).ok_or(DropReason::UnknownPort)?;
    // The frame's current L2 header is the original one: swap its MACs.
    let client = ethernet::src(frame.data());
    set_l2(frame, &pkt.l2, client, port.mac, pkt.l2.vlan)
}
