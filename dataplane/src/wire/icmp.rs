//! ICMPv4 (RFC 792): the 8-byte header and error-message constants.
//!
//! ```text
//! 0 type | 1 code | 2..4 checksum | 4..8 rest of header (unused / MTU / id+seq)
//! errors: the offending datagram's IP header + at least 8 bytes follow
//! ```

use super::ipv4::Ipv4;
use super::{checksum, put16, put32, WireError};

pub const HEADER_LEN: usize = 8;
pub const TYPE_DEST_UNREACHABLE: u8 = 3;
pub const TYPE_TIME_EXCEEDED: u8 = 11;
pub const TYPE_PARAMETER_PROBLEM: u8 = 12;
pub const CODE_PORT_UNREACHABLE: u8 = 3;
pub const CODE_FRAGMENTATION_NEEDED: u8 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Icmp {
    pub off: usize,
    pub kind: u8,
    pub code: u8,
}

impl Icmp {
    /// Error messages quote the datagram that caused them; only those are
    /// translated through NAT.
    #[inline]
    pub fn is_error(&self) -> bool {
        matches!(
            self.kind,
            TYPE_DEST_UNREACHABLE | TYPE_TIME_EXCEEDED | TYPE_PARAMETER_PROBLEM
        )
    }

    /// Offset of the quoted IP header of an error message.
    #[inline]
    pub fn quoted_off(&self) -> usize {
        self.off + HEADER_LEN
    }
}

#[inline]
pub fn parse(frame: &[u8], ip: &Ipv4) -> Result<Icmp, WireError> {
    if ip.l4_len() < HEADER_LEN {
        return Err(WireError::TruncatedL4);
    }
    let off = ip.l4_off();
    Ok(Icmp {
        off,
        kind: frame[off],
        code: frame[off + 1],
    })
}

/// Recomputes the checksum over the whole ICMP message of `ip`.
#[inline]
pub fn fill_checksum(frame: &mut [u8], ip: &Ipv4) {
    let off = ip.l4_off();
    put16(frame, off + 2, 0);
    let c = checksum::finish(checksum::sum(&frame[off..ip.end()]));
    put16(frame, off + 2, c);
}

/// Writes an 8-byte header (checksum zero; fill it once the body is in place).
#[inline]
pub fn write_header(frame: &mut [u8], off: usize, kind: u8, code: u8, rest: u32) {
    frame[off] = kind;
    frame[off + 1] = code;
    put16(frame, off + 2, 0);
    put32(frame, off + 4, rest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ipv4::{self, NewHeader, PROTO_ICMP};
    use std::net::Ipv4Addr;

    #[test]
    fn builds_a_valid_message() {
        let mut b = vec![0u8; 20 + 8 + 4];
        let ip = ipv4::write(
            &mut b,
            0,
            NewHeader {
                total_len: 32,
                id: 0,
                dont_fragment: false,
                ttl: 64,
                proto: PROTO_ICMP,
                src: Ipv4Addr::new(1, 1, 1, 1),
                dst: Ipv4Addr::new(2, 2, 2, 2),
            },
        );
        write_header(&mut b, 20, TYPE_DEST_UNREACHABLE, CODE_PORT_UNREACHABLE, 0);
        b[28..32].copy_from_slice(&[1, 2, 3, 4]);
        fill_checksum(&mut b, &ip);
        assert!(checksum::verify(&b[20..]));
        let m = parse(&b, &ip).unwrap();
        assert!(m.is_error());
        assert_eq!(m.quoted_off(), 28);
    }

    #[test]
    fn short_message_is_an_error() {
        let mut b = vec![0u8; 24];
        let ip = ipv4::write(
            &mut b,
            0,
            NewHeader {
                total_len: 24,
                id: 0,
                dont_fragment: false,
                ttl: 64,
                proto: PROTO_ICMP,
                src: Ipv4Addr::new(1, 1, 1, 1),
                dst: Ipv4Addr::new(2, 2, 2, 2),
            },
        );
        assert_eq!(parse(&b, &ip), Err(WireError::TruncatedL4));
    }
}
