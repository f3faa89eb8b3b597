//! A spoofed-source packet flood from inside a lab namespace, as an
//! attacker off the cluster (or a compromised pod) would send it: TCP with
//! any flag combination or UDP, each packet from a random source in
//! 198.18.0.0/15 (RFC 2544's benchmark range, never a lab address) and a
//! random port.
//!
//! Sent through a raw IPv4 socket (`IPPROTO_RAW`: the header is ours, the
//! kernel only routes it), so the namespace's own stack neither checks nor
//! rewrites the forged source. Bounded by count; a few threads share it.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use dataplane::craft::Spec;
use dataplane::wire::l4::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::LabError;

/// What each packet of a flood is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Syn,
    Ack,
    /// A TCP segment with no flags at all (a null scan).
    NoFlags,
    Fin,
    Rst,
    Udp,
}

impl Kind {
    pub const ALL: [Kind; 6] = [Kind::Syn, Kind::Ack, Kind::NoFlags, Kind::Fin, Kind::Rst, Kind::Udp];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Syn => "SYN",
            Kind::Ack => "ACK",
            Kind::NoFlags => "no flags",
            Kind::Fin => "FIN",
            Kind::Rst => "RST",
            Kind::Udp => "UDP",
        }
    }

    fn packet(self, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
        let flags = match self {
            Kind::Syn => TCP_SYN,
            Kind::Ack => TCP_ACK,
            Kind::NoFlags => 0,
            Kind::Fin => TCP_FIN | TCP_ACK,
            Kind::Rst => TCP_RST,
            Kind::Udp => return Spec::udp(src, dst, b"flood").build()[14..].to_vec(),
        };
        Spec::tcp(src, dst, flags).build()[14..].to_vec()
    }
}

/// What one flood did.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub packets: u64,
    pub elapsed: Duration,
}

impl Sent {
    pub fn pps(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Sends `count` spoofed packets of `kind` to `dst` from namespace `ns`,
/// with `threads` senders; returns when all are sent. Packets the kernel
/// refuses (a full queue) are retried, so `count` is what left.
pub fn flood(ns: &str, kind: Kind, dst: SocketAddrV4, count: u64, threads: u64) -> Result<Sent, LabError> {
    let started = Instant::now();
    let threads = threads.max(1);
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let ns = ns.to_string();
            let share = count / threads + u64::from(t < count % threads);
            std::thread::spawn(move || crate::in_namespace(&ns, move || send(kind, dst, share, t)))
        })
        .collect();
    let mut packets = 0;
    for w in workers {
        let sent = w
            .join()
            .map_err(|_| LabError::Enter {
                ns: ns.to_string(),
                reason: "a flood thread panicked".into(),
            })??
            .map_err(|e| LabError::Enter {
                ns: ns.to_string(),
                reason: format!("raw socket: {e}"),
            })?;
        packets += sent;
    }
    Ok(Sent {
        packets,
        elapsed: started.elapsed(),
    })
}

fn send(kind: Kind, dst: SocketAddrV4, count: u64, seed: u64) -> std::io::Result<u64> {
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))?;
    let to = SockAddr::from(SocketAddr::V4(dst));
    // xorshift64*: cheap, and every thread walks its own sequence.
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (seed + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut sent = 0;
    while sent < count {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let src = Ipv4Addr::from(0xc612_0000 | (r as u32 & 0x1_ffff)); // 198.18.0.0/15
        let sport = 1024 + ((r >> 32) as u16 % 64_000);
        let pkt = kind.packet((src, sport), (*dst.ip(), dst.port()));
        match sock.send_to(&pkt, &to) {
            Ok(_) => sent += 1,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => std::thread::yield_now(),
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

/// Sends each IPv4 packet in `packets` (headers included, forged or not)
/// from namespace `ns` through a raw socket, toward its own destination.
pub fn send_raw(ns: &str, packets: Vec<Vec<u8>>) -> Result<(), LabError> {
    let enter = |reason: String| LabError::Enter {
        ns: ns.to_string(),
        reason,
    };
    crate::in_namespace(ns, move || -> std::io::Result<()> {
        let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))?;
        for p in packets {
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            sock.send_to(&p, &SockAddr::from(SocketAddr::V4(SocketAddrV4::new(dst, 0))))?;
        }
        Ok(())
    })?
    .map_err(|e| enter(format!("raw socket: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::craft;

    #[test]
    fn packets_are_what_they_claim_with_valid_checksums() {
        for kind in Kind::ALL {
            let ip = kind.packet(
                (Ipv4Addr::new(198, 18, 0, 1), 4000),
                (Ipv4Addr::new(192, 168, 77, 1), 30080),
            );
            let mut frame = vec![0u8; 12];
            frame.extend_from_slice(&[0x08, 0x00]);
            frame.extend_from_slice(&ip);
            let seen = craft::inspect(&frame).unwrap();
            assert!(seen.checksums_ok, "{kind:?}");
            assert_eq!(seen.src, Ipv4Addr::new(198, 18, 0, 1));
        }
    }
}
