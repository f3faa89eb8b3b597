//! Ethernet II with at most one IEEE 802.1Q tag.
//!
//! ```text
//!  0                   6                  12        14        16        18
//! +-------------------+-------------------+---------+---------+---------+
//! | destination MAC   | source MAC        | 0x8100  |   TCI   |  type   |  (tagged)
//! +-------------------+-------------------+---------+---------+---------+
//! | destination MAC   | source MAC        |  type   |                      (untagged)
//! ```

use super::{be16, put16, WireError};
use crate::addr::Mac;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const HEADER_LEN: usize = 14;
pub const VLAN_TAG_LEN: usize = 4;

/// A parsed L2 header: its length and what it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2 {
    /// 14, or 18 with a VLAN tag.
    pub len: usize,
    /// The VLAN TCI when tagged.
    pub vlan: Option<u16>,
    /// The ethertype after the (optional) tag.
    pub ethertype: u16,
}

#[inline]
pub fn parse(frame: &[u8]) -> Result<L2, WireError> {
    if frame.len() < HEADER_LEN {
        return Err(WireError::TruncatedEthernet);
    }
    let outer = be16(frame, 12);
    if outer != ETHERTYPE_VLAN {
        return Ok(L2 {
            len: HEADER_LEN,
            vlan: None,
            ethertype: outer,
        });
    }
    if frame.len() < HEADER_LEN + VLAN_TAG_LEN {
        return Err(WireError::TruncatedEthernet);
    }
    Ok(L2 {
        len: HEADER_LEN + VLAN_TAG_LEN,
        vlan: Some(be16(frame, 14)),
        ethertype: be16(frame, 16),
    })
}

#[inline]
pub fn dst(frame: &[u8]) -> Mac {
    Mac(frame[0..6].try_into().expect("6 bytes"))
}

#[inline]
pub fn src(frame: &[u8]) -> Mac {
    Mac(frame[6..12].try_into().expect("6 bytes"))
}

/// Header length for an optional tag.
#[inline]
pub fn header_len(vlan: Option<u16>) -> usize {
    if vlan.is_some() {
        HEADER_LEN + VLAN_TAG_LEN
    } else {
        HEADER_LEN
    }
}

/// Writes a header at the start of `frame`, which must hold
/// `header_len(vlan)` bytes.
#[inline]
pub fn write(frame: &mut [u8], dst: Mac, src: Mac, vlan: Option<u16>, ethertype: u16) {
    frame[0..6].copy_from_slice(&dst.0);
    frame[6..12].copy_from_slice(&src.0);
    match vlan {
        Some(tci) => {
            put16(frame, 12, ETHERTYPE_VLAN);
            put16(frame, 14, tci);
            put16(frame, 16, ethertype);
        }
        None => put16(frame, 12, ethertype),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untagged_ipv4() {
        let mut f = [0u8; 14];
        f[12] = 0x08;
        assert_eq!(
            parse(&f),
            Ok(L2 {
                len: 14,
                vlan: None,
                ethertype: ETHERTYPE_IPV4
            })
        );
    }

    #[test]
    fn tagged_ipv4() {
        let f = [
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0x81, 0x00, 0x00, 0x64, 0x08, 0x00,
        ];
        assert_eq!(
            parse(&f),
            Ok(L2 {
                len: 18,
                vlan: Some(100),
                ethertype: ETHERTYPE_IPV4
            })
        );
        assert_eq!(dst(&f), Mac([1, 2, 3, 4, 5, 6]));
        assert_eq!(src(&f), Mac([7, 8, 9, 10, 11, 12]));
    }

    #[test]
    fn truncated_tag_is_an_error() {
        let f = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x81, 0x00, 0x00];
        assert_eq!(parse(&f), Err(WireError::TruncatedEthernet));
        assert_eq!(parse(&f[..13]), Err(WireError::TruncatedEthernet));
    }

    #[test]
    fn write_round_trips() {
        let mut f = [0u8; 18];
        write(&mut f, Mac([1; 6]), Mac([2; 6]), Some(7), ETHERTYPE_IPV4);
        assert_eq!(
            parse(&f),
            Ok(L2 {
                len: 18,
                vlan: Some(7),
                ethertype: ETHERTYPE_IPV4
            })
        );
        assert_eq!(dst(&f), Mac([1; 6]));
    }
}
