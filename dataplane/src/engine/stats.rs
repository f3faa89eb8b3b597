//! Per-worker counters. Each worker owns its `Stats` (no sharing on the hot
//! path); the runtime sums them for metrics.

use crate::wire::WireError;

macro_rules! drop_reasons {
    ($($variant:ident => $label:literal, $doc:literal;)*) => {
        /// Why a frame was dropped. Small and `Copy`: counted, never allocated.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum DropReason {
            $(#[doc = $doc] $variant,)*
        }

        impl DropReason {
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];
            pub const COUNT: usize = Self::ALL.len();

            /// Stable label for metrics.
            pub fn label(self) -> &'static str {
                match self {
                    $(DropReason::$variant => $label,)*
                }
            }
        }
    };
}

drop_reasons! {
    TruncatedEthernet => "truncated_ethernet", "Shorter than its Ethernet/VLAN header.";
    TruncatedIpv4 => "truncated_ipv4", "Shorter than its IPv4 header or total length.";
    BadIpv4Header => "bad_ipv4_header", "IPv4 version or header length invalid.";
    BadIpv4Checksum => "bad_ipv4_checksum", "IPv4 header checksum does not verify.";
    TruncatedL4 => "truncated_l4", "TCP/UDP/ICMP header missing or inconsistent with the IP length.";
    BadVxlan => "bad_vxlan", "VXLAN header without the I flag or cut short.";
    WrongVni => "wrong_vni", "VXLAN for another VNI.";
    OverlayNotIpv4 => "overlay_not_ipv4", "Decapsulated frame is not IPv4 (or is an inner fragment for no local pod).";
    TtlExceeded => "ttl_exceeded", "A forwarded packet arrived with TTL <= 1.";
    TooBig => "too_big", "Too big for the uplink once VXLAN-wrapped, and DF not set (or the ICMP answer was rate limited).";
    NoRoute => "no_route", "Nowhere to send it: an overlay packet for no local pod, or a packet for this node's stack without a host port.";
    NoNeighbor => "no_neighbor", "Next hop's MAC unknown (the runtime fills it from the kernel's neighbour table).";
    NoHeadroom => "no_headroom", "Frame buffer has no room for the headers to add.";
    NoLocalEndpoint => "no_local_endpoint", "Traffic policy Local and no local endpoint (kube-proxy drops these).";
    RejectRateLimited => "reject_rate_limited", "Service has no endpoints; the ICMP/RST answer was rate limited.";
    SnatExhausted => "snat_exhausted", "No free SNAT port toward this backend.";
    ConntrackFull => "conntrack_full", "Conntrack shard full of flows still being created.";
    ReplyIndexFull => "reply_index_full", "No room in the steering program's reply index for the flow's reply tuple (its replies could not reach kxp).";
    StrayTcp => "stray_tcp", "RST, FIN or SYN-ACK for a flow kxp does not track (netfilter: INVALID).";
    StrayIcmpError => "stray_icmp_error", "ICMP error from the uplink quoting a flow kxp does not track (netfilter: INVALID).";
    InvalidTcpFlags => "invalid_tcp_flags", "A TCP flag combination no real stack sends (no flags, SYN+FIN, ...; netfilter: INVALID).";
    BadL4Checksum => "bad_l4_checksum", "TCP/UDP checksum wrong on a packet that would create or change a flow.";
    UnknownPort => "unknown_port", "Frame from a port the tables do not describe.";
    SpoofedSource => "spoofed_source", "Source address not one this port may send from (a pod's other than its own; a local pod's from the uplink).";
    OverlayUnknownPeer => "overlay_unknown_peer", "VXLAN from an address that is not a known node's.";
    OverlaySpoofedSource => "overlay_spoofed_source", "Decapsulated packet whose source is outside the sending node's pod CIDR and addresses.";
    SourceRangeDenied => "source_range_denied", "Source outside the service's loadBalancerSourceRanges.";
}

impl From<WireError> for DropReason {
    fn from(e: WireError) -> Self {
        match e {
            WireError::TruncatedEthernet => DropReason::TruncatedEthernet,
            WireError::TruncatedIpv4 => DropReason::TruncatedIpv4,
            WireError::BadIpv4Header => DropReason::BadIpv4Header,
            WireError::BadIpv4Checksum => DropReason::BadIpv4Checksum,
            WireError::TruncatedL4 => DropReason::TruncatedL4,
            WireError::BadVxlan => DropReason::BadVxlan,
        }
    }
}

impl From<crate::frame::NoRoom> for DropReason {
    fn from(_: crate::frame::NoRoom) -> Self {
        DropReason::NoHeadroom
    }
}

/// Counters one worker keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Handed to the kernel untouched.
    pub passed: u64,
    pub drops: [u64; DropReason::COUNT],
    /// Flows created (first packet to a service).
    pub new_flows: u64,
    /// Unassured or finished flows evicted to make room.
    pub ct_evictions: u64,
    /// UDP flows moved off a backend that left the endpoint set.
    pub flows_rebalanced: u64,
    /// TCP flows reset because their backend left the endpoint set.
    pub flows_reset: u64,
    /// ICMP port unreachable sent for services without endpoints.
    pub rejects: u64,
    /// ICMP errors translated through NAT.
    pub icmp_translated: u64,
    /// ICMP "fragmentation needed" sent for packets too big for the overlay.
    pub frag_needed: u64,
    pub encapsulated: u64,
    pub decapsulated: u64,
    /// Later fragments given their first fragment's translation.
    pub fragments_translated: u64,
    /// Live fragment translations pushed out of the full table (a flood of
    /// first fragments, if it climbs).
    pub fragments_evicted: u64,
}

impl Stats {
    pub fn drop_count(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Adds another worker's counters (for metrics).
    pub fn merge(&mut self, o: &Stats) {
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.tx_packets += o.tx_packets;
        self.tx_bytes += o.tx_bytes;
        self.passed += o.passed;
        for (a, b) in self.drops.iter_mut().zip(o.drops.iter()) {
            *a += b;
        }
        self.new_flows += o.new_flows;
        self.ct_evictions += o.ct_evictions;
        self.flows_rebalanced += o.flows_rebalanced;
        self.flows_reset += o.flows_reset;
        self.rejects += o.rejects;
        self.icmp_translated += o.icmp_translated;
        self.frag_needed += o.frag_needed;
        self.encapsulated += o.encapsulated;
        self.decapsulated += o.decapsulated;
        self.fragments_translated += o.fragments_translated;
        self.fragments_evicted += o.fragments_evicted;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_unique() {
        let mut l: Vec<_> = DropReason::ALL.iter().map(|r| r.label()).collect();
        l.sort_unstable();
        l.dedup();
        assert_eq!(l.len(), DropReason::COUNT);
    }
}
