//! Service NAT: conntrack lookups, new flows (backend choice, SNAT), and the
//! rewrite itself.

use super::{DropReason, Frame, Origin, Pkt, Verdict, Worker};
use crate::addr::{BackendAddr, Endpoint, Proto};
use crate::flow::conntrack::{Entry, InsertError};
use crate::flow::fragments::FragKey;
use crate::flow::tcp::{self, CtState, FIN_FORWARD, FIN_REPLY};
use crate::flow::{Dir, FlowKey};
use crate::tables::{ChecksumPolicy, Reach, ServiceMatch, Tables};
use crate::time::Time;
use crate::wire::ipv4;
use crate::wire::l4::{self, L4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// What conntrack said about a packet.
enum Tracked {
    /// Translate with this flow's tuples.
    Hit {
        dir: Dir,
        fwd: FlowKey,
        rep: FlowKey,
    },
    /// The flow's backend left the endpoint set.
    Stale {
        fwd: FlowKey,
    },
    /// A new connection on a finished flow's tuple: forget it and start over.
    Restart {
        fwd: FlowKey,
    },
    /// The packet would change the flow's state and its L4 checksum is
    /// wrong: the flow is left as it was.
    BadChecksum,
    Miss,
}

/// Whether a packet's L4 checksum is trustworthy, computed at most once
/// and only when a packet would create or change a flow (it costs a pass
/// over the payload). Under `ChecksumPolicy::Full` checksums may be
/// CHECKSUM_PARTIAL sums from veths with offload on, which cannot be
/// verified, so they are taken as they are (docs/SECURITY.md).
struct Segment<'a> {
    bytes: &'a [u8],
    ip: &'a ipv4::Ipv4,
    l4: &'a L4,
    verify: bool,
}

impl<'a> Segment<'a> {
    fn new(bytes: &'a [u8], pkt: &'a Pkt, l4: &'a L4, t: &Tables) -> Self {
        Segment {
            bytes,
            ip: &pkt.ip,
            l4,
            // A first fragment holds only part of what its checksum covers.
            verify: t.node().checksum == ChecksumPolicy::Incremental && !pkt.ip.is_fragment(),
        }
    }

    fn checksum_ok(&self) -> bool {
        !self.verify || l4::checksum_valid(self.bytes, self.ip, self.l4)
    }
}

impl Worker {
    pub(super) fn handle_l4(
        &mut self,
        now: Time,
        t: &Tables,
        frame: &mut Frame,
        pkt: Pkt,
        l4: L4,
    ) -> Result<Verdict, DropReason> {
        if l4.proto == Proto::Tcp && !tcp::tcp_flags_valid(l4.tcp_flags) {
            return Err(DropReason::InvalidTcpFlags);
        }
        let key = FlowKey::new(
            Endpoint::new(pkt.ip.src, l4.src_port),
            Endpoint::new(pkt.ip.dst, l4.dst_port),
            l4.proto,
        );
        // Two rounds at most: a stale or restarted flow is removed, then the
        // packet is handled as the first of a new flow.
        for _ in 0..2 {
            let seg = Segment::new(frame.data(), &pkt, &l4, t);
            match self.track(now, t, &key, &seg) {
                Tracked::Hit { dir, fwd, rep } => {
                    let (src, dst) = match dir {
                        Dir::Forward => (rep.dst(), rep.src()),
                        Dir::Reply => (fwd.dst(), fwd.src()),
                    };
                    return self.translate(t, frame, pkt, l4, src, dst);
                }
                Tracked::Stale { fwd } => {
                    self.flows.conntrack.remove(&fwd);
                    if l4.proto == Proto::Tcp {
                        // The backend is gone: tell the client now instead of
                        // letting it retransmit into a black hole.
                        self.stats.flows_reset += 1;
                        return self.reset(now, t, frame, pkt, l4);
                    }
                    // UDP: re-balance at once (no stale-conntrack DNS outage).
                    self.stats.flows_rebalanced += 1;
                }
                Tracked::Restart { fwd } => {
                    self.flows.conntrack.remove(&fwd);
                }
                Tracked::BadChecksum => return Err(DropReason::BadL4Checksum),
                Tracked::Miss => break,
            }
        }
        match t.service_for(pkt.ip.dst, l4.dst_port, l4.proto) {
            Some(m) => self.new_flow(now, t, frame, pkt, l4, key, m),
            None => self.forward_plain(t, frame, pkt),
        }
    }

    fn track(&self, now: Time, t: &Tables, key: &FlowKey, seg: &Segment<'_>) -> Tracked {
        let generation = t.generation() as u32;
        let ct = &self.flows.conntrack;
        let timeouts = ct.timeouts();
        let l4 = seg.l4;
        ct.with_flow(now, key, |dir, e| {
            let forward = dir == Dir::Forward;
            // A SYN on a finished flow starts a new connection: from the
            // client (a new one to the service), or as a SYN-ACK from the
            // backend (the client reused its port for a direct connection
            // to the backend; netfilter replaces the old entry the same way).
            let syn = l4.proto == Proto::Tcp && l4.has(TCP_SYN) && l4.has(TCP_ACK) != forward;
            let restart = syn && e.state.is_finished();
            let stale = !restart && forward && e.checked_gen != generation && !backend_still_valid(t, e);
            let mut fins = e.flags & (FIN_FORWARD | FIN_REPLY);
            let state = match l4.proto {
                Proto::Tcp => tcp::tcp_advance(e.state, &mut fins, l4.tcp_flags, forward),
                Proto::Udp if !forward => CtState::UdpReplied,
                Proto::Udp => e.state,
            };
            let trust = e.trust_after(!forward, state);
            // Only packets that would change the flow are verified: a data
            // packet of an established flow is forwarded with its checksum
            // updated incrementally, so a bad one stays bad for the receiver.
            let changes = restart
                || stale
                || state != e.state
                || fins != e.flags & (FIN_FORWARD | FIN_REPLY)
                || trust != e.trust_after(false, e.state)
                || l4.has(TCP_SYN | TCP_FIN | TCP_RST);
            if changes && !seg.checksum_ok() {
                return Tracked::BadChecksum;
            }
            if restart {
                return Tracked::Restart { fwd: e.fwd };
            }
            if stale {
                return Tracked::Stale { fwd: e.fwd };
            }
            if forward {
                e.checked_gen = generation;
            }
            e.flags = (e.flags & !(FIN_FORWARD | FIN_REPLY)) | fins;
            e.set_trust(trust);
            e.refresh(now, state, timeouts);
            Tracked::Hit {
                dir,
                fwd: e.fwd,
                rep: e.rep,
            }
        })
        .unwrap_or(Tracked::Miss)
    }

    #[allow(clippy::too_many_arguments)]
    fn new_flow(
        &mut self,
        now: Time,
        t: &Tables,
        frame: &mut Frame,
        pkt: Pkt,
        l4: L4,
        key: FlowKey,
        m: ServiceMatch<'_>,
    ) -> Result<Verdict, DropReason> {
        // A TCP flow starts with a SYN, or is picked up mid-stream from a
        // plain ACK (kxp restarted; netfilter's `tcp_loose`). RST, FIN and
        // SYN-ACK for no known flow start nothing (netfilter: INVALID).
        if l4.proto == Proto::Tcp && (l4.has(TCP_RST | TCP_FIN) || l4.has(TCP_SYN) && l4.has(TCP_ACK)) {
            return Err(DropReason::StrayTcp);
        }
        if !Segment::new(frame.data(), &pkt, &l4, t).checksum_ok() {
            return Err(DropReason::BadL4Checksum);
        }
        let svc = m.svc;
        let node = t.node();
        if !svc.source_allowed(pkt.ip.src, pkt.ip.dst, &node.node_ips) {
            return Err(DropReason::SourceRangeDenied);
        }
        if svc.has_no_endpoints() {
            // kube-proxy: REJECT (ICMP port unreachable), so clients fail fast.
            return self.reject(now, t, frame, pkt);
        }
        let from_cluster = node.in_cluster(pkt.ip.src);
        let set = svc.backends_for(m.reach, from_cluster);
        let hash = key.stable_hash();
        let backend = match svc.affinity {
            Some(timeout) => {
                let remembered = self
                    .flows
                    .affinity
                    .get(now, svc.id, pkt.ip.src, timeout)
                    .filter(|b| set.contains(*b));
                let b = remembered.or_else(|| set.pick(hash));
                if let Some(b) = b {
                    self.flows.affinity.set(now, svc.id, pkt.ip.src, b, timeout);
                }
                b
            }
            None => set.pick(hash),
        };
        // Policy Local with no local endpoint: kube-proxy drops.
        let Some(BackendAddr(backend)) = backend else {
            return Err(DropReason::NoLocalEndpoint);
        };

        let masquerade = match m.reach {
            // Sources outside the cluster CIDR reaching a ClusterIP.
            Reach::Internal => node.cluster_cidr.is_some() && !from_cluster,
            // eTP=Cluster: SNAT so replies come back through this node.
            // eTP=Local keeps the client address (the backend is local).
            Reach::External => !svc.external_local,
        };
        // Hairpin: a pod sent to its own service and got itself. The node's
        // own connections are masqueraded too, so their replies (to the SNAT
        // port range) come back through kxp, which hands them to the node.
        let snat = masquerade || backend.ip == pkt.ip.src || pkt.origin == Origin::Host;
        // A backend on this node's own address answers through the node's
        // stack, which would reply straight to the client: SNAT to the
        // address routed into the host port brings the replies back here.
        let to_host = node.is_host_addr(backend.ip);
        let nat_ip = match (to_host, node.host_snat_ip) {
            (true, Some(ip)) => ip,
            (true, None) => return Err(DropReason::NoRoute),
            (false, _) if snat => node.snat_ip,
            (false, _) => pkt.ip.src,
        };
        let snat = snat || to_host;
        let (lo, hi) = node.snat_ports;
        let span = u32::from(hi.saturating_sub(lo)) + 1;
        let start = (hash >> 16) as u32 % span;
        let first = if !snat || (lo..=hi).contains(&l4.src_port) {
            l4.src_port
        } else {
            lo + start as u16
        };
        // The client's own port first (like Linux NAT); on a clash, walk the
        // range from a hashed start. The client keeps its IP without SNAT.
        let candidates = |i: u32| -> Option<FlowKey> {
            let port = match i {
                0 => first,
                i if i <= 64 => lo + ((start + i * 7919) % span) as u16,
                _ => return None,
            };
            Some(FlowKey::new(backend, Endpoint::new(nat_ip, port), l4.proto))
        };
        let state = match l4.proto {
            Proto::Tcp => tcp::tcp_initial(l4.tcp_flags),
            Proto::Udp => CtState::UdpUnreplied,
        };
        let entry = Entry::new(key, key, svc.id, t.generation() as u32, state);
        let rep = match self.flows.conntrack.insert(now, entry, candidates) {
            Ok(ins) => {
                self.stats.new_flows += 1;
                self.stats.ct_evictions += u64::from(ins.evicted);
                ins.rep
            }
            Err(InsertError::Exists) => {
                // Another worker created it a moment ago: use that one.
                let mut seg = Segment::new(frame.data(), &pkt, &l4, t);
                seg.verify = false; // verified above
                return match self.track(now, t, &key, &seg) {
                    Tracked::Hit { rep, .. } => self.translate(t, frame, pkt, l4, rep.dst(), rep.src()),
                    _ => Err(DropReason::ConntrackFull),
                };
            }
            Err(InsertError::NoReplyTuple) => return Err(DropReason::SnatExhausted),
            Err(InsertError::Full) => return Err(DropReason::ConntrackFull),
            Err(InsertError::IndexFull) => return Err(DropReason::ReplyIndexFull),
        };
        self.translate(t, frame, pkt, l4, rep.dst(), rep.src())
    }

    /// Rewrites addresses and ports to `src` -> `dst`, decrements TTL and
    /// sends the packet on its way.
    pub(super) fn translate(
        &mut self,
        t: &Tables,
        frame: &mut Frame,
        mut pkt: Pkt,
        mut l4: L4,
        src: Endpoint,
        dst: Endpoint,
    ) -> Result<Verdict, DropReason> {
        if pkt.ip.ttl <= 1 {
            return Err(DropReason::TtlExceeded);
        }
        frame.truncate(pkt.ip.end());
        if pkt.ip.is_first_fragment() {
            // Its later fragments get the same addresses (flow::fragments).
            let key = FragKey::of(&pkt.ip);
            if self.flows.fragments.record(self.now, key, src.ip, dst.ip) {
                self.stats.fragments_evicted += 1;
            }
        }
        let b = frame.data_mut();
        let addrs = ipv4::nat_forward(b, &mut pkt.ip, src.ip, dst.ip);
        l4::rewrite_ports(b, &mut l4, addrs, src.port, dst.port);
        // A fragment holds part of what its checksum covers: only the
        // incremental update is right for it.
        if t.node().checksum == ChecksumPolicy::Full && !pkt.ip.is_fragment() {
            l4::fill_checksum(b, &pkt.ip, &l4, false);
        }
        self.send(t, frame, &pkt)
    }
}

/// An established flow may keep its backend while the endpoint slices list
/// it: TCP through termination (graceful shutdown, KEP-1669), UDP only while
/// it is serving — a UDP "flow" has no end, so it must move as soon as the
/// backend stops serving.
fn backend_still_valid(t: &Tables, e: &Entry) -> bool {
    let Some(svc) = t.service(e.svc) else {
        return false;
    };
    match svc.endpoint(BackendAddr(e.rep.src())) {
        None => false,
        Some(ep) => e.fwd.proto == Proto::Tcp || ep.ready || ep.serving,
    }
}
