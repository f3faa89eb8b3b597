//! Building and inspecting whole frames, for tests, benchmarks, fuzz seeds
//! and load generators. Not used on the hot path.

use std::net::Ipv4Addr;

use crate::addr::{Mac, Proto};
use crate::wire::ethernet::{self, ETHERTYPE_IPV4};
use crate::wire::ipv4::{self, NewHeader, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use crate::wire::{icmp, l4, put16, put32, WireError};

/// Headroom the engine may need in front of a frame (VXLAN, ICMP errors).
pub const HEADROOM: usize = 256;

/// Description of a TCP or UDP packet to build.
#[derive(Clone, Debug)]
pub struct Spec {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub vlan: Option<u16>,
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub proto: Proto,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub ttl: u8,
    pub payload: Vec<u8>,
}

impl Spec {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        Spec {
            src_mac: Mac([0x02, 0, 0, 0, 0, 0xaa]),
            dst_mac: Mac([0x02, 0, 0, 0, 0, 0xbb]),
            vlan: None,
            src,
            dst,
            proto: Proto::Tcp,
            tcp_flags: flags,
            seq: 1000,
            ack: 0,
            ttl: 64,
            payload: Vec::new(),
        }
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Self {
        Spec {
            proto: Proto::Udp,
            tcp_flags: 0,
            payload: payload.to_vec(),
            ..Spec::tcp(src, dst, 0)
        }
    }

    pub fn macs(mut self, src: Mac, dst: Mac) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    /// The frame bytes, checksums complete.
    pub fn build(&self) -> Vec<u8> {
        let l2 = ethernet::header_len(self.vlan);
        let l4_len = match self.proto {
            Proto::Tcp => l4::TCP_MIN_HEADER_LEN,
            Proto::Udp => l4::UDP_HEADER_LEN,
        } + self.payload.len();
        let total = ipv4::MIN_HEADER_LEN + l4_len;
        let mut b = vec![0u8; l2 + total];
        ethernet::write(&mut b, self.dst_mac, self.src_mac, self.vlan, ETHERTYPE_IPV4);
        let proto = match self.proto {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        };
        let ip = ipv4::write(
            &mut b,
            l2,
            NewHeader {
                total_len: total as u16,
                id: 1,
                dont_fragment: true,
                ttl: self.ttl,
                proto,
                src: self.src.0,
                dst: self.dst.0,
            },
        );
        let o = ip.l4_off();
        put16(&mut b, o, self.src.1);
        put16(&mut b, o + 2, self.dst.1);
        match self.proto {
            Proto::Tcp => {
                put32(&mut b, o + 4, self.seq);
                put32(&mut b, o + 8, self.ack);
                b[o + 12] = 0x50;
                b[o + 13] = self.tcp_flags;
                put16(&mut b, o + 14, 65535);
                b[o + 20..].copy_from_slice(&self.payload);
            }
            Proto::Udp => {
                put16(&mut b, o + 4, l4_len as u16);
                b[o + 8..].copy_from_slice(&self.payload);
            }
        }
        let seg = l4::parse(&b, &ip).expect("built segment parses").expect("tcp or udp");
        l4::fill_checksum(&mut b, &ip, &seg, true);
        b
    }
}

/// An ICMP error from `from` to `to` quoting `quoted` (an IP datagram).
pub fn icmp_error(
    macs: (Mac, Mac),
    from: Ipv4Addr,
    to: Ipv4Addr,
    kind: u8,
    code: u8,
    rest: u32,
    quoted: &[u8],
) -> Vec<u8> {
    let total = ipv4::MIN_HEADER_LEN + icmp::HEADER_LEN + quoted.len();
    let mut b = vec![0u8; ethernet::HEADER_LEN + total];
    ethernet::write(&mut b, macs.1, macs.0, None, ETHERTYPE_IPV4);
    let ip = ipv4::write(
        &mut b,
        ethernet::HEADER_LEN,
        NewHeader {
            total_len: total as u16,
            id: 9,
            dont_fragment: false,
            ttl: 64,
            proto: PROTO_ICMP,
            src: from,
            dst: to,
        },
    );
    icmp::write_header(&mut b, ip.l4_off(), kind, code, rest);
    b[ip.l4_off() + icmp::HEADER_LEN..].copy_from_slice(quoted);
    icmp::fill_checksum(&mut b, &ip);
    b
}

/// A frame in a buffer with [`HEADROOM`] in front, as the runtime hands it
/// to the engine.
pub struct Buffer {
    pub buf: Vec<u8>,
    pub start: usize,
    pub len: usize,
}

impl Buffer {
    pub fn new(frame: &[u8]) -> Self {
        let mut buf = vec![0u8; HEADROOM + frame.len().max(2048)];
        buf[HEADROOM..HEADROOM + frame.len()].copy_from_slice(frame);
        Buffer {
            buf,
            start: HEADROOM,
            len: frame.len(),
        }
    }

    pub fn frame(&mut self) -> crate::Frame<'_> {
        crate::Frame::new(&mut self.buf, self.start, self.len)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// What a transmitted frame looks like, decoded for assertions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub vlan: Option<u16>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub proto: u8,
    /// Ports for TCP/UDP, (type, code) for ICMP.
    pub ports: (u16, u16),
    pub tcp_flags: u8,
    /// IP header and L4 checksums both verify.
    pub checksums_ok: bool,
    /// Offset of the IP header.
    pub ip_off: usize,
}

/// Decodes a frame the engine emitted; errors on anything malformed.
pub fn inspect(frame: &[u8]) -> Result<Seen, WireError> {
    let l2 = ethernet::parse(frame)?;
    let ip = ipv4::parse(frame, l2.len)?;
    let (ports, tcp_flags, l4_ok) = match ip.proto {
        // Fragments carry no complete L4 segment to check.
        _ if ip.is_fragment() => ((0, 0), 0, true),
        PROTO_ICMP => {
            let m = icmp::parse(frame, &ip)?;
            let ok = crate::wire::checksum::verify(&frame[ip.l4_off()..ip.end()]);
            ((u16::from(m.kind), u16::from(m.code)), 0, ok)
        }
        _ => match l4::parse(frame, &ip)? {
            Some(s) => (
                (s.src_port, s.dst_port),
                s.tcp_flags,
                l4::checksum_valid(frame, &ip, &s),
            ),
            None => ((0, 0), 0, true),
        },
    };
    Ok(Seen {
        src_mac: ethernet::src(frame),
        dst_mac: ethernet::dst(frame),
        vlan: l2.vlan,
        src: ip.src,
        dst: ip.dst,
        ttl: ip.ttl,
        proto: ip.proto,
        ports,
        tcp_flags,
        checksums_ok: l4_ok, // the IP header checksum was verified by parse
        ip_off: l2.len,
    })
}

/// Wraps an inner Ethernet frame in outer Ethernet/IPv4/UDP/VXLAN, the way a
/// Linux VXLAN device (or kxp) on another node sends it.
pub fn vxlan(macs: (Mac, Mac), src: Ipv4Addr, dst: Ipv4Addr, port: u16, vni: u32, inner: &[u8]) -> Vec<u8> {
    use crate::wire::vxlan as vx;
    let udp_len = l4::UDP_HEADER_LEN + vx::HEADER_LEN + inner.len();
    let total = ipv4::MIN_HEADER_LEN + udp_len;
    let mut b = vec![0u8; ethernet::HEADER_LEN + total];
    ethernet::write(&mut b, macs.1, macs.0, None, ETHERTYPE_IPV4);
    let ip = ipv4::write(
        &mut b,
        ethernet::HEADER_LEN,
        NewHeader {
            total_len: total as u16,
            id: 3,
            dont_fragment: false,
            ttl: 64,
            proto: PROTO_UDP,
            src,
            dst,
        },
    );
    let u = ip.l4_off();
    put16(&mut b, u, 50000);
    put16(&mut b, u + 2, port);
    put16(&mut b, u + 4, udp_len as u16);
    vx::write(&mut b, u + l4::UDP_HEADER_LEN, vni);
    b[u + l4::UDP_HEADER_LEN + vx::HEADER_LEN..].copy_from_slice(inner);
    b
}

/// Splits an encapsulated frame into (outer, VNI, inner frame).
pub fn unwrap_vxlan(frame: &[u8]) -> Result<(Seen, u32, &[u8]), WireError> {
    let outer = inspect(frame)?;
    let u = outer.ip_off + ipv4::MIN_HEADER_LEN;
    let vni = crate::wire::vxlan::parse(frame, u + l4::UDP_HEADER_LEN)?;
    Ok((
        outer,
        vni,
        &frame[u + l4::UDP_HEADER_LEN + crate::wire::vxlan::HEADER_LEN..],
    ))
}
