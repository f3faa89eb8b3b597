//! TCP (RFC 9293) and UDP (RFC 768) headers: ports, flags, checksum.
//!
//! ```text
//! UDP:  0..2 src port | 2..4 dst port | 4..6 length | 6..8 checksum
//! TCP:  0..2 src port | 2..4 dst port | 4..8 seq | 8..12 ack
//!       12 data offset<<4 | 13 flags | 14..16 window | 16..18 checksum | 18..20 urgent
//! ```

use std::net::Ipv4Addr;

use super::ipv4::{Ipv4, PROTO_TCP, PROTO_UDP};
use super::{be16, be32, checksum, put16, WireError};
use crate::addr::Proto;

pub const UDP_HEADER_LEN: usize = 8;
pub const TCP_MIN_HEADER_LEN: usize = 20;
const UDP_CHECKSUM: usize = 6;
const TCP_CHECKSUM: usize = 16;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A checked TCP or UDP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L4 {
    /// Offset of the header in the frame.
    pub off: usize,
    pub proto: Proto,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags (zero for UDP).
    pub tcp_flags: u8,
    /// Header length: the TCP data offset, or 8 for UDP.
    pub header_len: usize,
    /// Bytes of payload after the header.
    pub payload_len: usize,
}

impl L4 {
    #[inline]
    fn checksum_off(&self) -> usize {
        self.off
            + match self.proto {
                Proto::Tcp => TCP_CHECKSUM,
                Proto::Udp => UDP_CHECKSUM,
            }
    }

    #[inline]
    pub fn has(&self, flag: u8) -> bool {
        self.tcp_flags & flag != 0
    }
}

/// Parses the TCP or UDP header of a complete, unfragmented datagram or of
/// a first fragment (whose UDP length counts the fragments still to come).
/// Returns `Ok(None)` for other protocols.
#[inline]
pub fn parse(frame: &[u8], ip: &Ipv4) -> Result<Option<L4>, WireError> {
    let off = ip.l4_off();
    let len = ip.l4_len();
    match ip.proto {
        PROTO_UDP => {
            if len < UDP_HEADER_LEN {
                return Err(WireError::TruncatedL4);
            }
            let mut udp_len = usize::from(be16(frame, off + 4));
            if udp_len > len && ip.is_first_fragment() {
                udp_len = len; // what this fragment holds of it
            }
            if udp_len < UDP_HEADER_LEN || udp_len > len {
                return Err(WireError::TruncatedL4);
            }
            Ok(Some(L4 {
                off,
                proto: Proto::Udp,
                src_port: be16(frame, off),
                dst_port: be16(frame, off + 2),
                tcp_flags: 0,
                header_len: UDP_HEADER_LEN,
                payload_len: udp_len - UDP_HEADER_LEN,
            }))
        }
        PROTO_TCP => {
            if len < TCP_MIN_HEADER_LEN {
                return Err(WireError::TruncatedL4);
            }
            let header_len = usize::from(frame[off + 12] >> 4) * 4;
            if header_len < TCP_MIN_HEADER_LEN || header_len > len {
                return Err(WireError::TruncatedL4);
            }
            Ok(Some(L4 {
                off,
                proto: Proto::Tcp,
                src_port: be16(frame, off),
                dst_port: be16(frame, off + 2),
                tcp_flags: frame[off + 13],
                header_len,
                payload_len: len - header_len,
            }))
        }
        _ => Ok(None),
    }
}

/// Ports of a TCP/UDP header quoted inside an ICMP error, where only the
/// first 8 bytes are guaranteed. `end` is where the quoted bytes stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quoted {
    pub off: usize,
    pub proto: Proto,
    pub src_port: u16,
    pub dst_port: u16,
    /// Absolute offset of the L4 checksum when it lies inside the quote.
    checksum_off: Option<usize>,
}

#[inline]
pub fn parse_quoted(frame: &[u8], ip: &Ipv4, end: usize) -> Result<Option<Quoted>, WireError> {
    let off = ip.l4_off();
    let proto = match ip.proto {
        PROTO_TCP => Proto::Tcp,
        PROTO_UDP => Proto::Udp,
        _ => return Ok(None),
    };
    if end < off + 8 || frame.len() < end {
        return Err(WireError::TruncatedL4);
    }
    let rel = match proto {
        Proto::Tcp => TCP_CHECKSUM,
        Proto::Udp => UDP_CHECKSUM,
    };
    let checksum_off = (off + rel + 2 <= end).then_some(off + rel);
    Ok(Some(Quoted {
        off,
        proto,
        src_port: be16(frame, off),
        dst_port: be16(frame, off + 2),
        checksum_off,
    }))
}

/// Applies an incremental update to an L4 checksum, honouring UDP's
/// "zero means no checksum" rule (RFC 768): a zero stays zero, and a computed
/// zero is sent as all-ones.
#[inline]
fn update_checksum(frame: &mut [u8], at: usize, proto: Proto, f: impl FnOnce(u16) -> u16) {
    let old = be16(frame, at);
    if proto == Proto::Udp && old == 0 {
        return;
    }
    let mut new = f(old);
    if proto == Proto::Udp && new == 0 {
        new = 0xffff;
    }
    put16(frame, at, new);
}

/// Rewrites both ports and applies `addrs` (the pseudo-header change from
/// [`super::ipv4::nat_forward`]) plus the port change in one update.
#[inline]
pub fn rewrite_ports(frame: &mut [u8], l4: &mut L4, addrs: checksum::Delta, src_port: u16, dst_port: u16) {
    let d = addrs.word(l4.src_port, src_port).word(l4.dst_port, dst_port);
    update_checksum(frame, l4.checksum_off(), l4.proto, |c| d.apply(c));
    put16(frame, l4.off, src_port);
    put16(frame, l4.off + 2, dst_port);
    l4.src_port = src_port;
    l4.dst_port = dst_port;
}

/// Rewrites the ports of a quoted header (inside an ICMP error) and folds
/// the quoted addresses' change (old -> new) into its checksum, when the
/// checksum lies inside the quote.
#[inline]
pub fn rewrite_quoted(
    frame: &mut [u8],
    q: &mut Quoted,
    old_addrs: (Ipv4Addr, Ipv4Addr),
    new_addrs: (Ipv4Addr, Ipv4Addr),
    new_ports: (u16, u16),
) {
    if let Some(at) = q.checksum_off {
        let d = checksum::Delta::default()
            .dword(u32::from(old_addrs.0), u32::from(new_addrs.0))
            .dword(u32::from(old_addrs.1), u32::from(new_addrs.1))
            .word(q.src_port, new_ports.0)
            .word(q.dst_port, new_ports.1);
        update_checksum(frame, at, q.proto, |c| d.apply(c));
    }
    put16(frame, q.off, new_ports.0);
    put16(frame, q.off + 2, new_ports.1);
    q.src_port = new_ports.0;
    q.dst_port = new_ports.1;
}

/// Recomputes the L4 checksum over pseudo-header, header and payload. Used by
/// the `Full` checksum policy and for packets kxp builds itself. A UDP
/// checksum that was zero on input stays zero unless `force` is set.
#[inline]
pub fn fill_checksum(frame: &mut [u8], ip: &Ipv4, l4: &L4, force: bool) {
    let at = l4.checksum_off();
    if l4.proto == Proto::Udp && !force && be16(frame, at) == 0 {
        return;
    }
    let seg_len = ip.l4_len();
    put16(frame, at, 0);
    let acc = checksum::pseudo_header(ip.src, ip.dst, ip.proto, seg_len as u16)
        + checksum::sum(&frame[l4.off..l4.off + seg_len]);
    let mut c = checksum::finish(acc);
    if l4.proto == Proto::Udp && c == 0 {
        c = 0xffff;
    }
    put16(frame, at, c);
}

/// True when the L4 checksum over the whole segment verifies (UDP zero
/// checksums count as valid, as receivers treat them).
#[inline]
pub fn checksum_valid(frame: &[u8], ip: &Ipv4, l4: &L4) -> bool {
    if l4.proto == Proto::Udp && be16(frame, l4.checksum_off()) == 0 {
        return true;
    }
    let seg_len = ip.l4_len();
    let acc = checksum::pseudo_header(ip.src, ip.dst, ip.proto, seg_len as u16)
        + checksum::sum(&frame[l4.off..l4.off + seg_len]);
    checksum::fold(acc) == 0xffff
}

#[inline]
pub fn tcp_seq(frame: &[u8], l4: &L4) -> u32 {
    be32(frame, l4.off + 4)
}

#[inline]
pub fn tcp_ack(frame: &[u8], l4: &L4) -> u32 {
    be32(frame, l4.off + 8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ipv4::{self, NewHeader};

    fn udp_datagram(payload: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + payload.len();
        let mut b = vec![0u8; total];
        let ip = ipv4::write(
            &mut b,
            0,
            NewHeader {
                total_len: total as u16,
                id: 1,
                dont_fragment: false,
                ttl: 64,
                proto: PROTO_UDP,
                src: Ipv4Addr::new(10, 0, 0, 1),
                dst: Ipv4Addr::new(10, 96, 0, 10),
            },
        );
        put16(&mut b, 20, 5353);
        put16(&mut b, 22, 53);
        put16(&mut b, 24, (8 + payload.len()) as u16);
        b[28..].copy_from_slice(payload);
        let l4 = parse(&b, &ip).unwrap().unwrap();
        fill_checksum(&mut b, &ip, &l4, true);
        b
    }

    #[test]
    fn parses_udp() {
        let b = udp_datagram(b"hello");
        let ip = ipv4::parse(&b, 0).unwrap();
        let l4 = parse(&b, &ip).unwrap().unwrap();
        assert_eq!((l4.src_port, l4.dst_port, l4.payload_len), (5353, 53, 5));
        assert!(checksum_valid(&b, &ip, &l4));
    }

    #[test]
    fn udp_length_must_fit() {
        let mut b = udp_datagram(b"hello");
        put16(&mut b, 24, 100);
        let ip = ipv4::parse(&b, 0).unwrap();
        assert_eq!(parse(&b, &ip), Err(WireError::TruncatedL4));
        put16(&mut b, 24, 7);
        assert_eq!(parse(&b, &ip), Err(WireError::TruncatedL4));
    }

    #[test]
    fn tcp_data_offset_must_fit() {
        let mut b = vec![0u8; 40];
        let ip = ipv4::write(
            &mut b,
            0,
            NewHeader {
                total_len: 40,
                id: 1,
                dont_fragment: true,
                ttl: 64,
                proto: PROTO_TCP,
                src: Ipv4Addr::new(10, 0, 0, 1),
                dst: Ipv4Addr::new(10, 0, 0, 2),
            },
        );
        b[32] = 0x50;
        b[33] = TCP_SYN;
        let l4 = parse(&b, &ip).unwrap().unwrap();
        assert!(l4.has(TCP_SYN) && !l4.has(TCP_ACK));
        b[32] = 0x60; // 24-byte header in a 20-byte segment
        assert_eq!(parse(&b, &ip), Err(WireError::TruncatedL4));
        b[32] = 0x40;
        assert_eq!(parse(&b, &ip), Err(WireError::TruncatedL4));
    }

    #[test]
    fn incremental_rewrite_matches_full_recompute() {
        let mut b = udp_datagram(b"some payload bytes");
        let mut ip = ipv4::parse(&b, 0).unwrap();
        let mut l4 = parse(&b, &ip).unwrap().unwrap();
        let addrs = ipv4::nat_forward(
            &mut b,
            &mut ip,
            Ipv4Addr::new(192, 168, 1, 1),
            Ipv4Addr::new(10, 244, 2, 9),
        );
        rewrite_ports(&mut b, &mut l4, addrs, 40000, 5353);
        assert!(ipv4::parse(&b, 0).is_ok(), "IP header checksum still valid");
        assert!(checksum_valid(&b, &ip, &l4));
        let inc = be16(&b, 26);
        fill_checksum(&mut b, &ip, &l4, false);
        assert_eq!(inc, be16(&b, 26));
    }

    #[test]
    fn zero_udp_checksum_stays_zero() {
        let mut b = udp_datagram(b"x");
        put16(&mut b, 26, 0);
        let mut ip = ipv4::parse(&b, 0).unwrap();
        let mut l4 = parse(&b, &ip).unwrap().unwrap();
        let src = ip.src;
        let addrs = ipv4::nat_forward(&mut b, &mut ip, src, Ipv4Addr::new(1, 1, 1, 1));
        rewrite_ports(&mut b, &mut l4, addrs, 1, 2);
        assert_eq!(be16(&b, 26), 0);
    }
}
