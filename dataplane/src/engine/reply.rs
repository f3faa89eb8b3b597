//! Packets kxp answers itself: ICMP port unreachable for a service without
//! endpoints (kube-proxy's REJECT), TCP RST for a flow whose backend left,
//! ICMP "fragmentation needed" for packets too big for the overlay. Each
//! kind has its own rate limit per worker, like the kernel's
//! `icmp_ratelimit`: a flood at a service without endpoints must not
//! silence the path-MTU answers everyone else needs.

use super::egress::answer_l2;
use super::{DropReason, Frame, Origin, Pkt, Verdict, Worker};
use crate::addr::Proto;
use crate::tables::Tables;
use crate::time::Time;
use crate::wire::icmp::{self, CODE_FRAGMENTATION_NEEDED, CODE_PORT_UNREACHABLE, TYPE_DEST_UNREACHABLE};
use crate::wire::ipv4::{self, NewHeader, PROTO_ICMP, PROTO_TCP};
use crate::wire::l4::{self, L4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::wire::{put16, put32};

/// RFC 1812: an ICMP error quotes as much of the datagram as fits in 576 bytes.
const MAX_QUOTE: usize = 576 - ipv4::MIN_HEADER_LEN - icmp::HEADER_LEN;

/// A token bucket refilled by the time passed in.
#[derive(Clone, Debug, Default)]
pub struct TokenBucket {
    tokens: f64,
    last: Option<Time>,
}

impl TokenBucket {
    /// Takes one token if available at `rate` per second with `burst` depth.
    pub fn take(&mut self, now: Time, (rate, burst): (u32, u32)) -> bool {
        let elapsed = self
            .last
            .map_or(f64::from(burst), |l| now.since(l).as_secs_f64() * f64::from(rate));
        self.tokens = (self.tokens + elapsed).min(f64::from(burst));
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One budget per kind of answer.
#[derive(Clone, Debug, Default)]
pub struct AnswerLimits {
    pub rejects: TokenBucket,
    pub resets: TokenBucket,
    pub frag_needed: TokenBucket,
}

impl Worker {
    /// Answers with ICMP destination unreachable / port unreachable, quoting
    /// the offending datagram, from the address the client tried.
    pub(super) fn reject(&mut self, now: Time, t: &Tables, frame: &mut Frame, pkt: Pkt) -> Result<Verdict, DropReason> {
        if !self.limits.rejects.take(now, t.node().reject_rate) {
            return Err(DropReason::RejectRateLimited);
        }
        let ip = self.icmp_error_about(frame, &pkt, pkt.ip.dst, CODE_PORT_UNREACHABLE, 0)?;
        self.stats.rejects += 1;
        self.answer(t, frame, Pkt { ip, ..pkt })
    }

    /// Answers a packet too big for the overlay with ICMP "fragmentation
    /// needed" (next-hop MTU `mtu`), as a router would. The packet is
    /// already NATed, so the answer quotes it as the network would see it
    /// and goes through the ICMP error translation back to the real sender;
    /// untranslated flows (plain pod routing) get it directly. Without DF
    /// the packet is dropped: kxp does not fragment.
    pub(super) fn frag_needed(
        &mut self,
        t: &Tables,
        frame: &mut Frame,
        pkt: Pkt,
        mtu: u16,
    ) -> Result<Verdict, DropReason> {
        let now = self.now;
        if !pkt.ip.dont_fragment() || !self.limits.frag_needed.take(now, t.node().reject_rate) {
            return Err(DropReason::TooBig);
        }
        let from = t.node().vtep_ip().ok_or(DropReason::NoRoute)?;
        let ip = self.icmp_error_about(frame, &pkt, from, CODE_FRAGMENTATION_NEEDED, u32::from(mtu))?;
        self.stats.frag_needed += 1;
        let answer = Pkt { ip, ..pkt };
        let m = icmp::parse(frame.data(), &ip)?;
        match self.icmp_error(now, t, frame, answer, m)? {
            Some(v) => Ok(v),
            None => self.send(t, frame, &answer),
        }
    }

    /// Turns the frame into an ICMP destination-unreachable (`code`, `rest`
    /// of header) from `from` to the packet's sender, quoting the packet
    /// (RFC 1812 length) behind the frame's own L2 header. Returns the new
    /// IP header.
    fn icmp_error_about(
        &mut self,
        frame: &mut Frame,
        pkt: &Pkt,
        from: std::net::Ipv4Addr,
        code: u8,
        rest: u32,
    ) -> Result<ipv4::Ipv4, DropReason> {
        let l2 = pkt.l2.len;
        let quote = pkt.ip.total_len.min(MAX_QUOTE);
        frame.truncate(l2 + quote);
        let added = ipv4::MIN_HEADER_LEN + icmp::HEADER_LEN;
        frame.push_front(added)?;
        let id = self.next_ip_id();
        let b = frame.data_mut();
        b.copy_within(added..added + l2, 0);
        let ip = ipv4::write(
            b,
            l2,
            NewHeader {
                total_len: (added + quote) as u16,
                id,
                dont_fragment: false,
                ttl: 64,
                proto: PROTO_ICMP,
                src: from,
                dst: pkt.ip.src,
            },
        );
        icmp::write_header(b, ip.l4_off(), TYPE_DEST_UNREACHABLE, code, rest);
        icmp::fill_checksum(b, &ip);
        Ok(ip)
    }

    /// Answers a TCP segment with RST (RFC 9293 section 3.10.7.1 rules for
    /// sequence numbers), from the address the client used.
    pub(super) fn reset(
        &mut self,
        now: Time,
        t: &Tables,
        frame: &mut Frame,
        pkt: Pkt,
        l4: L4,
    ) -> Result<Verdict, DropReason> {
        if !self.limits.resets.take(now, t.node().reject_rate) {
            return Err(DropReason::RejectRateLimited);
        }
        let b = frame.data();
        let (seq, ack) = (l4::tcp_seq(b, &l4), l4::tcp_ack(b, &l4));
        let (rst_seq, rst_ack, flags) = if l4.has(TCP_ACK) {
            (ack, 0, TCP_RST)
        } else {
            let len = l4.payload_len as u32 + u32::from(l4.has(TCP_SYN)) + u32::from(l4.has(TCP_FIN));
            (0, seq.wrapping_add(len), TCP_RST | TCP_ACK)
        };
        let l2 = pkt.l2.len;
        let total = ipv4::MIN_HEADER_LEN + l4::TCP_MIN_HEADER_LEN;
        frame.set_len(l2 + total)?;
        let id = self.next_ip_id();
        let b = frame.data_mut();
        let ip = ipv4::write(
            b,
            l2,
            NewHeader {
                total_len: total as u16,
                id,
                dont_fragment: true,
                ttl: 64,
                proto: PROTO_TCP,
                src: pkt.ip.dst,
                dst: pkt.ip.src,
            },
        );
        let o = ip.l4_off();
        put16(b, o, l4.dst_port);
        put16(b, o + 2, l4.src_port);
        put32(b, o + 4, rst_seq);
        put32(b, o + 8, rst_ack);
        b[o + 12] = (l4::TCP_MIN_HEADER_LEN as u8 / 4) << 4;
        b[o + 13] = flags;
        put16(b, o + 14, 0);
        put16(b, o + 16, 0);
        put16(b, o + 18, 0);
        let rst = L4 {
            off: o,
            proto: Proto::Tcp,
            src_port: l4.dst_port,
            dst_port: l4.src_port,
            tcp_flags: flags,
            header_len: l4::TCP_MIN_HEADER_LEN,
            payload_len: 0,
        };
        l4::fill_checksum(b, &ip, &rst, true);
        self.answer(t, frame, Pkt { ip, ..pkt })
    }

    /// Sends a generated answer: back out of the ingress port with MACs
    /// swapped, or routed when the question came over the overlay.
    fn answer(&mut self, t: &Tables, frame: &mut Frame, pkt: Pkt) -> Result<Verdict, DropReason> {
        if pkt.origin != Origin::Overlay {
            answer_l2(frame, &pkt, t)?;
            Ok(Verdict::Tx(pkt.ingress))
        } else {
            self.send(t, frame, &pkt)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_limits_and_refills() {
        let mut b = TokenBucket::default();
        let rate = (10, 3);
        let now = Time::from_secs(100);
        assert_eq!((0..5).filter(|_| b.take(now, rate)).count(), 3);
        assert!(!b.take(now, rate));
        assert!(b.take(Time(now.0 + 100_000_000), rate)); // +0.1 s = one token
        assert!(!b.take(Time(now.0 + 100_000_000), rate));
    }
}
