//! The packet engine: one received frame in, one verdict out, no I/O.
//!
//! **Contract.** [`Worker::process`] takes the time, the live [`Tables`]
//! snapshot, the ingress port and the frame, rewrites the frame in place and
//! returns [`Verdict::Tx`] (send the frame on that port), [`Verdict::Pass`]
//! (give the original, untouched frame to the kernel) or [`Verdict::Drop`]
//! with a counted reason. It never panics on frame contents, never reads a
//! clock, never makes a syscall and never allocates.
//!
//! Pipeline:
//! ```text
//! Ethernet/VLAN -> IPv4 -> VXLAN to us? decap, recurse on inner
//!   later fragments: the addresses their first fragment got (or plain routing)
//!   TCP/UDP: conntrack hit  -> (stale backend? UDP rebalance / TCP RST) -> NAT -> TTL -> egress
//!            service match  -> backend (affinity, Maglev) -> SNAT? -> conntrack insert -> NAT -> egress
//!            otherwise      -> overlay routing or Pass
//!   ICMP error: quoted flow in conntrack -> translate outer + quoted headers -> egress
//! egress: local pod (pod port) | remote pod CIDR (VXLAN over uplink) | uplink neighbour/gateway
//! ```

mod egress;
mod gen_cache;
mod icmp_error;
mod nat;
mod reply;
mod stats;

use std::sync::Arc;

use crate::addr::PortId;
use crate::flow::fragments::FragKey;
use crate::flow::FlowState;
use crate::frame::Frame;
use crate::tables::{PortRole, Tables};
use crate::time::Time;
use crate::wire::ethernet::{self, ETHERTYPE_IPV4, L2};
use crate::wire::ipv4::{self, Ipv4, PROTO_ICMP, PROTO_UDP};
use crate::wire::{icmp, l4};

pub use reply::{AnswerLimits, TokenBucket};
pub use stats::{DropReason, Stats};

/// What to do with a frame after [`Worker::process`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit the (rewritten) frame on this port.
    Tx(PortId),
    /// Not kxp's: hand the original frame to the kernel unchanged.
    Pass,
    Drop(DropReason),
}

/// Where a packet entered, which decides what plain routing it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Uplink,
    Pod,
    /// Decapsulated from VXLAN.
    Overlay,
    /// From this node's own stack (its TUN device).
    Host,
}

/// One worker's engine state. Flow state is shared with the other workers;
/// counters and the answers' rate limits are the worker's own.
pub struct Worker {
    flows: Arc<FlowState>,
    pub stats: Stats,
    limits: AnswerLimits,
    ip_id: u16,
    /// Egress decisions by destination.
    routes: gen_cache::GenCache<egress::Egress>,
    /// Overlay peers' pod CIDRs by peer address (only known peers).
    peers: gen_cache::GenCache<crate::addr::Cidr>,
    sweep_scratch: Vec<(crate::flow::FlowKey, usize)>,
    /// The time of the frame being processed (for answers generated deep
    /// in the egress path).
    now: Time,
}

/// A parsed packet being processed: its L2 header, IPv4 header and ingress.
#[derive(Clone, Copy, Debug)]
struct Pkt {
    l2: L2,
    ip: Ipv4,
    ingress: PortId,
    origin: Origin,
}

impl Worker {
    pub fn new(flows: Arc<FlowState>) -> Self {
        Worker {
            flows,
            stats: Stats::default(),
            limits: AnswerLimits::default(),
            ip_id: 0,
            routes: gen_cache::GenCache::new(1024),
            peers: gen_cache::GenCache::new(256),
            sweep_scratch: Vec::with_capacity(4096),
            now: Time::ZERO,
        }
    }

    pub fn flows(&self) -> &Arc<FlowState> {
        &self.flows
    }

    /// Processes one frame. See the module docs for the contract. `t` must
    /// be a published snapshot (or one that is not edited between calls):
    /// the worker caches egress decisions per table generation.
    pub fn process(&mut self, now: Time, t: &Tables, ingress: PortId, frame: &mut Frame) -> Verdict {
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += frame.len() as u64;
        self.now = now;
        let v = self.dispatch(now, t, ingress, frame).unwrap_or_else(Verdict::Drop);
        match v {
            Verdict::Tx(_) => {
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += frame.len() as u64;
            }
            Verdict::Pass => self.stats.passed += 1,
            Verdict::Drop(r) => self.stats.drops[r as usize] += 1,
        }
        v
    }

    /// Between batches: expires one conntrack shard. Returns flows removed.
    pub fn housekeeping(&mut self, now: Time) -> usize {
        self.flows.conntrack.sweep(now, &mut self.sweep_scratch)
    }

    fn dispatch(&mut self, now: Time, t: &Tables, ingress: PortId, frame: &mut Frame) -> Result<Verdict, DropReason> {
        let origin = match t.node().port(ingress) {
            Some(p) if p.role == PortRole::Uplink => Origin::Uplink,
            Some(p) if p.role == PortRole::Host => Origin::Host,
            Some(_) => Origin::Pod,
            None => return Err(DropReason::UnknownPort),
        };
        let l2 = ethernet::parse(frame.data())?;
        if l2.ethertype != ETHERTYPE_IPV4 {
            return Ok(Verdict::Pass);
        }
        let ip = ipv4::parse(frame.data(), l2.len)?;
        // Source validation (what rp_filter and a CNI's anti-spoofing rules
        // did before kxp took the traffic): a pod may only send from the
        // addresses routed to its own port.
        if origin == Origin::Pod && !t.pod_may_send_from(ingress, ip.src) {
            return Err(DropReason::SpoofedSource);
        }

        // Pass must hand over the original frame, so strip Ethernet padding
        // only once the frame is surely ours.
        let pkt = Pkt {
            l2,
            ip,
            ingress,
            origin,
        };
        // UDP from the uplink to a node address is VXLAN or a NodePort: its
        // header is parsed once, here, and handed on.
        let mut udp = None;
        if ip.proto == PROTO_UDP && origin == Origin::Uplink && !ip.is_later_fragment() && t.node().is_node_ip(ip.dst) {
            udp = l4::parse(frame.data(), &ip)?;
            if let Some(u) = udp.filter(|u| u.dst_port == t.node().vxlan.port) {
                frame.truncate(ip.end());
                return self.decap(now, t, frame, pkt, u);
            }
        }
        // Nobody on the uplink may claim a local pod's address (VXLAN is
        // checked against its peer instead, above).
        if origin == Origin::Uplink && t.is_local_pod(ip.src) {
            return Err(DropReason::SpoofedSource);
        }
        match udp {
            Some(u) => self.handle_l4(now, t, frame, pkt, u),
            None => self.handle_ip(now, t, frame, pkt),
        }
    }

    fn handle_ip(&mut self, now: Time, t: &Tables, frame: &mut Frame, pkt: Pkt) -> Result<Verdict, DropReason> {
        if pkt.ip.is_later_fragment() {
            return self.later_fragment(now, t, frame, pkt);
        }
        if let Some(l4) = l4::parse(frame.data(), &pkt.ip)? {
            return self.handle_l4(now, t, frame, pkt, l4);
        }
        if pkt.ip.proto == PROTO_ICMP {
            let m = icmp::parse(frame.data(), &pkt.ip)?;
            if m.is_error() {
                if let Some(v) = self.icmp_error(now, t, frame, pkt, m)? {
                    return Ok(v);
                }
                // The steering program takes an error from the uplink only
                // when it quotes a flow of kxp's; one that no longer does
                // (or was forged to look so) is netfilter's INVALID.
                if pkt.origin == Origin::Uplink {
                    return Err(DropReason::StrayIcmpError);
                }
            }
        }
        self.forward_plain(t, frame, pkt)
    }

    /// Traffic that is not for a service: overlay routing for pods, else the
    /// kernel's.
    fn forward_plain(&mut self, t: &Tables, frame: &mut Frame, mut pkt: Pkt) -> Result<Verdict, DropReason> {
        let routed = match pkt.origin {
            // A pod's packet that is not a service's reaches kxp when it is
            // for another node's pod (kxp is the overlay) or was a reply of a
            // flow that ended since the steering program looked: kxp routes
            // it as the kernel would, except to this node, whose stack only
            // the kernel can reach.
            Origin::Pod => !t.node().is_host_addr(pkt.ip.dst),
            Origin::Overlay => {
                if t.local_pod(pkt.ip.dst).is_none() {
                    return Err(DropReason::NoRoute);
                }
                true
            }
            Origin::Uplink => false,
            // The node only sends kxp what it routes to kxp's TUN device
            // (service addresses): anything else there has nowhere to go.
            Origin::Host => return Err(DropReason::NoRoute),
        };
        if !routed {
            return Ok(Verdict::Pass);
        }
        frame.truncate(pkt.ip.end());
        if !ipv4::decrement_ttl(frame.data_mut(), &mut pkt.ip) {
            return Err(DropReason::TtlExceeded);
        }
        self.send(t, frame, &pkt)
    }

    /// A fragment after the first: it gets the addresses its datagram's
    /// first fragment was translated to (see `flow::fragments`); one whose
    /// first fragment kxp did not translate is routed as plain traffic.
    fn later_fragment(
        &mut self,
        now: Time,
        t: &Tables,
        frame: &mut Frame,
        mut pkt: Pkt,
    ) -> Result<Verdict, DropReason> {
        let key = FragKey::of(&pkt.ip);
        let Some((src, dst)) = self.flows.fragments.lookup(now, &key) else {
            return self.forward_plain(t, frame, pkt);
        };
        if pkt.ip.ttl <= 1 {
            return Err(DropReason::TtlExceeded);
        }
        frame.truncate(pkt.ip.end());
        ipv4::nat_forward(frame.data_mut(), &mut pkt.ip, src, dst);
        self.stats.fragments_translated += 1;
        self.send(t, frame, &pkt)
    }

    fn next_ip_id(&mut self) -> u16 {
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ip_id
    }
}
