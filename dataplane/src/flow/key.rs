//! The 5-tuple that identifies one direction of a flow.

use std::net::Ipv4Addr;

use crate::addr::{Endpoint, Proto};

/// One direction of a TCP/UDP flow, as it appears on the wire. 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey {
    src_ip: u32,
    dst_ip: u32,
    src_port: u16,
    dst_port: u16,
    pub proto: Proto,
}

impl FlowKey {
    pub fn new(src: Endpoint, dst: Endpoint, proto: Proto) -> Self {
        FlowKey {
            src_ip: u32::from(src.ip),
            dst_ip: u32::from(dst.ip),
            src_port: src.port,
            dst_port: dst.port,
            proto,
        }
    }

    pub fn src(&self) -> Endpoint {
        Endpoint::new(Ipv4Addr::from(self.src_ip), self.src_port)
    }

    pub fn dst(&self) -> Endpoint {
        Endpoint::new(Ipv4Addr::from(self.dst_ip), self.dst_port)
    }

    /// The same flow seen from the other end.
    pub fn reversed(&self) -> Self {
        FlowKey {
            src_ip: self.dst_ip,
            dst_ip: self.src_ip,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
        }
    }

    /// Deterministic hash (same on every node) for Maglev.
    #[inline]
    pub fn stable_hash(&self) -> u64 {
        crate::hash::flow(self.src_ip, self.dst_ip, self.src_port, self.dst_port, self.proto as u8)
    }
}

impl std::hash::Hash for FlowKey {
    // Two words instead of five field writes: the conntrack hash is on the
    // per-packet path.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64((u64::from(self.src_ip) << 32) | u64::from(self.dst_ip));
        state.write_u64(
            (u64::from(self.src_port) << 32) | (u64::from(self.dst_port) << 16) | u64::from(self.proto as u8),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_sixteen_bytes_and_reverses() {
        assert_eq!(std::mem::size_of::<FlowKey>(), 16);
        let k = FlowKey::new(
            Endpoint::new(Ipv4Addr::new(1, 2, 3, 4), 5),
            Endpoint::new(Ipv4Addr::new(6, 7, 8, 9), 10),
            Proto::Udp,
        );
        assert_eq!(k.reversed().src(), k.dst());
        assert_eq!(k.reversed().reversed(), k);
    }
}
