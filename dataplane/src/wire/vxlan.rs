//! VXLAN (RFC 7348) header.
//!
//! ```text
//! 0 flags (I = 0x08) | 1..4 reserved | 4..7 VNI | 7 reserved
//! ```
//! Encapsulation adds outer Ethernet (14) + IPv4 (20) + UDP (8) + VXLAN (8).

use super::{be32, put32, WireError};

pub const HEADER_LEN: usize = 8;
const FLAG_VNI_VALID: u8 = 0x08;
/// Bytes added in front of the inner Ethernet frame (untagged outer).
pub const OVERHEAD: usize = 14 + 20 + 8 + HEADER_LEN;

/// Returns the VNI of the header at `off`.
#[inline]
pub fn parse(frame: &[u8], off: usize) -> Result<u32, WireError> {
    if frame.len() < off + HEADER_LEN {
        return Err(WireError::BadVxlan);
    }
    if frame[off] & FLAG_VNI_VALID == 0 {
        return Err(WireError::BadVxlan);
    }
    Ok(be32(frame, off + 4) >> 8)
}

#[inline]
pub fn write(frame: &mut [u8], off: usize, vni: u32) {
    put32(frame, off, u32::from(FLAG_VNI_VALID) << 24);
    put32(frame, off + 4, (vni & 0x00ff_ffff) << 8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut b = [0u8; 8];
        write(&mut b, 0, 0x123456);
        assert_eq!(b, [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        assert_eq!(parse(&b, 0), Ok(0x123456));
    }

    #[test]
    fn requires_i_flag_and_length() {
        assert_eq!(parse(&[0u8; 8], 0), Err(WireError::BadVxlan));
        assert_eq!(parse(&[0x08, 0, 0, 0], 0), Err(WireError::BadVxlan));
    }
}
