//! ICMP errors about NATed flows, translated so that path-MTU discovery and
//! unreachable notices work through a service (RFC 5508 section 4.2 asks
//! the same of NATs).
//!
//! The error quotes a packet P that its receiver sent. Reversed, P is a
//! packet of a tracked flow in some direction D. kxp translates P as the
//! reverse of how it translates D-packets, and rewrites the outer
//! destination to P's new source: the host that really sent P.

use super::{DropReason, Frame, Pkt, Verdict, Worker};
use crate::addr::Endpoint;
use crate::flow::{Dir, FlowKey};
use crate::tables::Tables;
use crate::time::Time;
use crate::wire::icmp::{self, Icmp};
use crate::wire::{ipv4, l4};

impl Worker {
    /// `Ok(None)` when the error is not about a tracked flow.
    pub(super) fn icmp_error(
        &mut self,
        now: Time,
        t: &Tables,
        frame: &mut Frame,
        mut pkt: Pkt,
        m: Icmp,
    ) -> Result<Option<Verdict>, DropReason> {
        let end = pkt.ip.end();
        let Ok(mut qip) = ipv4::parse_header(&frame.data()[..end], m.quoted_off()) else {
            return Ok(None);
        };
        let Ok(Some(mut q4)) = l4::parse_quoted(frame.data(), &qip, end) else {
            return Ok(None);
        };
        let quoted = FlowKey::new(
            Endpoint::new(qip.src, q4.src_port),
            Endpoint::new(qip.dst, q4.dst_port),
            q4.proto,
        );
        let Some((dir, fwd, rep)) = self
            .flows
            .conntrack
            .with_flow(now, &quoted.reversed(), |d, e| (d, e.fwd, e.rep))
        else {
            return Ok(None);
        };
        // How a packet in direction `dir` is translated: (src, dst) -> (ts, td).
        let (ts, td) = match dir {
            Dir::Forward => (rep.dst(), rep.src()),
            Dir::Reply => (fwd.dst(), fwd.src()),
        };
        if pkt.ip.ttl <= 1 {
            return Err(DropReason::TtlExceeded);
        }
        frame.truncate(end);
        let b = frame.data_mut();
        // Quoted packet: reverse of a translated `dir` packet.
        let old = (qip.src, qip.dst);
        ipv4::set_src(b, &mut qip, td.ip);
        ipv4::set_dst(b, &mut qip, ts.ip);
        l4::rewrite_quoted(b, &mut q4, old, (td.ip, ts.ip), (td.port, ts.port));
        // Outer: to whoever really sent the quoted packet.
        ipv4::set_dst(b, &mut pkt.ip, td.ip);
        ipv4::decrement_ttl(b, &mut pkt.ip);
        icmp::fill_checksum(b, &pkt.ip);
        self.stats.icmp_translated += 1;
        self.send(t, frame, &pkt).map(Some)
    }
}
