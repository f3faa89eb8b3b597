//! Zero-copy views over frame bytes.
//!
//! Each `parse` function checks every length it will later index with and
//! returns a small `Copy` description of the header (offsets and the fields
//! the engine needs). Accessors and setters that take such a description may
//! index the frame without further checks: **panic contract** — they panic
//! only if called with a description that was not produced by `parse` on the
//! same, unshortened bytes. The engine upholds this by re-parsing after any
//! change of layout (push/pull of headers).
//!
//! Rejected alternative: etherparse's slices validate and read well but give
//! no in-place mutation, and NAT is in-place mutation with incremental
//! checksums; a handful of fixed-offset setters is smaller than a copy-out /
//! write-back round trip per packet.

pub mod checksum;
pub mod ethernet;
pub mod icmp;
pub mod ipv4;
pub mod l4;
pub mod vxlan;

/// Why a frame could not be parsed. Every variant becomes a counted drop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than the Ethernet (and VLAN) header.
    TruncatedEthernet,
    /// Shorter than the IPv4 header, its IHL or its total length claim.
    TruncatedIpv4,
    /// Version field is not 4 or IHL is below 5.
    BadIpv4Header,
    /// IPv4 header checksum does not verify.
    BadIpv4Checksum,
    /// The TCP/UDP/ICMP header does not fit, or its length fields disagree
    /// with the IP length.
    TruncatedL4,
    /// A VXLAN header with the I flag clear or a reserved layout.
    BadVxlan,
}

#[inline]
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
pub(crate) fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
