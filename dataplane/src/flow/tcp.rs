//! Connection states and their timeouts.
//!
//! A deliberately small TCP tracker: enough to expire dead and half-open
//! flows quickly and to keep established ones for a day, not a full window
//! tracker. Timeout defaults are the kernel's nf_conntrack values with
//! kube-proxy's overrides (`tcpEstablishedTimeout` 24h, `tcpCloseWaitTimeout`
//! 1h).

use std::time::Duration;

use crate::wire::l4::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CtState {
    /// Client SYN seen, nothing back yet.
    SynSent,
    /// Server SYN-ACK seen.
    SynRecv,
    Established,
    /// One side sent FIN (half-closed).
    Closing,
    /// Both sides sent FIN.
    TimeWait,
    /// Reset.
    Close,
    /// UDP, before any reply.
    UdpUnreplied,
    /// UDP, after a reply.
    UdpReplied,
}

impl CtState {
    /// A new SYN on a flow in these states starts a new connection.
    pub fn is_finished(self) -> bool {
        matches!(self, CtState::TimeWait | CtState::Close)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn_sent: Duration,
    pub tcp_syn_recv: Duration,
    pub tcp_established: Duration,
    pub tcp_close_wait: Duration,
    pub tcp_time_wait: Duration,
    pub tcp_close: Duration,
    pub udp: Duration,
    pub udp_stream: Duration,
    /// The longest any flow not yet *assured* (traffic seen both ways; see
    /// `conntrack`) is kept, whatever its state: mid-stream pickups and
    /// half-open flows cost an attacker one spoofed packet each, so they
    /// must not hold a slot for the established timeout of a day.
    pub unassured: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn_sent: Duration::from_secs(120),
            tcp_syn_recv: Duration::from_secs(60),
            tcp_established: Duration::from_secs(86400),
            tcp_close_wait: Duration::from_secs(3600),
            tcp_time_wait: Duration::from_secs(120),
            tcp_close: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_secs(120),
            unassured: Duration::from_secs(30),
        }
    }
}

impl Timeouts {
    pub fn for_state(&self, s: CtState) -> Duration {
        match s {
            CtState::SynSent => self.tcp_syn_sent,
            CtState::SynRecv => self.tcp_syn_recv,
            CtState::Established => self.tcp_established,
            CtState::Closing => self.tcp_close_wait,
            CtState::TimeWait => self.tcp_time_wait,
            CtState::Close => self.tcp_close,
            CtState::UdpUnreplied => self.udp,
            CtState::UdpReplied => self.udp_stream,
        }
    }
}

/// Flags remembered beside the state.
pub const FIN_FORWARD: u8 = 0x01;
pub const FIN_REPLY: u8 = 0x02;

/// Whether a TCP flag combination is one a real stack sends, as
/// netfilter's `tcp_valid_flags` table has it (ECE/CWR ignored). Anything
/// else (no flags, SYN+FIN, SYN+RST, FIN without ACK, ...) is a scan or a
/// forgery: netfilter marks it INVALID and kube-proxy drops INVALID.
pub fn tcp_flags_valid(flags: u8) -> bool {
    const URG: u8 = 0x20;
    const PSH: u8 = 0x08;
    use crate::wire::l4::{TCP_ACK as A, TCP_FIN as F, TCP_RST as R, TCP_SYN as S};
    matches!(
        flags & 0x3f,
        S | 0x22 // SYN, SYN|URG
            | 0x12 // SYN|ACK
            | R
            | 0x14 // RST|ACK
            | 0x1c // RST|ACK|PSH
            | 0x11 // FIN|ACK
            | 0x31 // FIN|ACK|URG
            | A
            | 0x30 // ACK|URG
            | 0x19 // FIN|ACK|PSH
            | 0x39 // FIN|ACK|PSH|URG
            | 0x18 // ACK|PSH
            | 0x38 // ACK|PSH|URG
    ) && (flags & (S | F | R | A | URG | PSH)) != 0
}

/// The state of a new TCP flow created by a packet with `flags`. A non-SYN
/// packet (kxp restarted, or the entry was evicted) is picked up as
/// established, like the kernel's `nf_conntrack_tcp_loose`; Maglev makes it
/// land on the backend it had.
pub fn tcp_initial(flags: u8) -> CtState {
    if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
        CtState::SynSent
    } else {
        CtState::Established
    }
}

/// Advances a TCP flow on a packet with `flags` travelling forward (client
/// to service) or in reply. `fins` holds FIN_FORWARD / FIN_REPLY.
pub fn tcp_advance(state: CtState, fins: &mut u8, flags: u8, forward: bool) -> CtState {
    if flags & TCP_RST != 0 {
        return CtState::Close;
    }
    if flags & TCP_FIN != 0 {
        *fins |= if forward { FIN_FORWARD } else { FIN_REPLY };
    }
    if *fins == FIN_FORWARD | FIN_REPLY {
        return CtState::TimeWait;
    }
    if *fins != 0 {
        return CtState::Closing;
    }
    match state {
        CtState::SynSent if !forward && flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK => CtState::SynRecv,
        CtState::SynRecv if forward && flags & TCP_ACK != 0 => CtState::Established,
        s => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_data_and_close() {
        let mut fins = 0;
        let s = tcp_initial(TCP_SYN);
        assert_eq!(s, CtState::SynSent);
        let s = tcp_advance(s, &mut fins, TCP_SYN | TCP_ACK, false);
        assert_eq!(s, CtState::SynRecv);
        let s = tcp_advance(s, &mut fins, TCP_ACK, true);
        assert_eq!(s, CtState::Established);
        let s = tcp_advance(s, &mut fins, TCP_ACK | TCP_FIN, true);
        assert_eq!(s, CtState::Closing);
        let s = tcp_advance(s, &mut fins, TCP_ACK, false);
        assert_eq!(s, CtState::Closing);
        let s = tcp_advance(s, &mut fins, TCP_ACK | TCP_FIN, false);
        assert_eq!(s, CtState::TimeWait);
        assert!(s.is_finished());
    }

    #[test]
    fn rst_closes_and_loose_pickup_is_established() {
        let mut fins = 0;
        assert_eq!(
            tcp_advance(CtState::Established, &mut fins, TCP_RST, false),
            CtState::Close
        );
        assert_eq!(tcp_initial(TCP_ACK), CtState::Established);
        assert_eq!(tcp_initial(TCP_SYN | TCP_ACK), CtState::Established);
    }

    #[test]
    fn only_a_reply_syn_ack_advances_syn_sent() {
        let mut fins = 0;
        assert_eq!(
            tcp_advance(CtState::SynSent, &mut fins, TCP_SYN, true),
            CtState::SynSent
        );
        assert_eq!(
            tcp_advance(CtState::SynSent, &mut fins, TCP_SYN | TCP_ACK, true),
            CtState::SynSent
        );
    }

    #[test]
    fn flag_combinations_real_stacks_never_send_are_invalid() {
        for ok in [
            TCP_SYN,
            TCP_SYN | TCP_ACK,
            TCP_ACK,
            TCP_ACK | 0x08,
            TCP_FIN | TCP_ACK,
            TCP_RST,
            TCP_RST | TCP_ACK,
            TCP_SYN | 0x40 | 0x80, // ECN-setup SYN
        ] {
            assert!(tcp_flags_valid(ok), "{ok:#x}");
        }
        for bad in [
            0,
            TCP_FIN,
            TCP_SYN | TCP_FIN,
            TCP_SYN | TCP_RST,
            0x29, /* xmas */
            0x08,
        ] {
            assert!(!tcp_flags_valid(bad), "{bad:#x}");
        }
    }

    #[test]
    fn timeouts_follow_kube_proxy_defaults() {
        let t = Timeouts::default();
        assert_eq!(t.for_state(CtState::Established), Duration::from_secs(86400));
        assert_eq!(t.for_state(CtState::Closing), Duration::from_secs(3600));
        assert!(t.for_state(CtState::SynSent) < t.for_state(CtState::Established));
    }
}
