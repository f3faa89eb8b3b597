//! The kernel's routing tables over rtnetlink (netlink-packet-route on a
//! blocking netlink-sys socket): the links, addresses, IPv4 routes and
//! neighbours kxp reads, the managed neighbour entries and TUN routes it
//! writes, and a watcher that follows the kernel's notifications.
//!
//! A socket belongs to the network namespace of the thread that opened it,
//! so each `Rtnl` is opened where it is used. Every read is a full dump that
//! either completes or fails: a failure is an error, never an empty answer
//! (an empty link list would read as "every pod is gone").

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use dataplane::addr::{Cidr, Mac};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage, LinkXdp};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}; kxp needs Linux with rtnetlink")]
    Open(#[source] std::io::Error),
    #[error("netlink {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink {what}: the kernel's answer does not parse: {reason}")]
    Decode { what: &'static str, reason: String },
}

/// What kxp needs to know about one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub ifindex: u32,
    pub mac: Mac,
    pub mtu: u16,
    pub rx_queues: u32,
    pub xdp_attached: bool,
}

/// One IPv4 address of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Address {
    pub ifindex: u32,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
}

/// One route of the main IPv4 table (single next hop).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub prefix_len: u8,
    /// Unspecified when the destination is on the link.
    pub gateway: Ipv4Addr,
    pub oif: u32,
}

/// One resolved IPv4 neighbour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: Ipv4Addr,
    pub mac: Mac,
    pub ifindex: u32,
}

/// A request socket in the calling thread's network namespace.
pub struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> Result<Self, NetlinkError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Open)?;
        sock.bind_auto().map_err(NetlinkError::Open)?;
        sock.connect(&SocketAddr::new(0, 0)).map_err(NetlinkError::Open)?;
        Ok(Rtnl { sock, seq: 0 })
    }

    /// Sends `msg` with `flags` and collects the answers up to the end of a
    /// dump (`NLM_F_DUMP`) or the acknowledgement (`NLM_F_ACK`).
    fn request(
        &mut self,
        what: &'static str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let io = |source| NetlinkError::Io { what, source };
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock.send(&buf, 0).map_err(io)?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full().map_err(io)?;
            let mut at = 0;
            while at < data.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[at..]).map_err(|e| {
                    NetlinkError::Decode {
                        what,
                        reason: e.to_string(),
                    }
                })?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                at += len.next_multiple_of(4);
                if msg.header.sequence_number != self.seq {
                    continue; // an answer to an earlier, abandoned request
                }
                match msg.payload {
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(out),
                    NetlinkPayload::Error(e) => return Err(io(e.to_io())),
                    _ => {}
                }
            }
        }
    }

    /// A dump of `req`'s kind, each answer turned into a `T` by `pick`
    /// (`None`: not one kxp uses).
    fn dump<T, C: FromIterator<T>>(
        &mut self,
        what: &'static str,
        req: RouteNetlinkMessage,
        pick: impl FnMut(RouteNetlinkMessage) -> Option<T>,
    ) -> Result<C, NetlinkError> {
        Ok(self
            .request(what, req, NLM_F_DUMP)?
            .into_iter()
            .filter_map(pick)
            .collect())
    }

    /// Every interface, by name.
    pub fn links(&mut self) -> Result<HashMap<String, LinkInfo>, NetlinkError> {
        let req = RouteNetlinkMessage::GetLink(LinkMessage::default());
        self.dump("link dump", req, |m| match m {
            RouteNetlinkMessage::NewLink(l) => link_info(&l),
            _ => None,
        })
    }

    /// Every IPv4 address of every interface.
    pub fn addresses(&mut self) -> Result<Vec<Address>, NetlinkError> {
        let mut req = AddressMessage::default();
        req.header.family = AddressFamily::Inet;
        self.dump("address dump", RouteNetlinkMessage::GetAddress(req), |m| match m {
            RouteNetlinkMessage::NewAddress(a) => address(&a),
            _ => None,
        })
    }

    /// The main IPv4 table's unicast routes with one next hop.
    pub fn routes(&mut self) -> Result<Vec<Route>, NetlinkError> {
        let mut req = RouteMessage::default();
        req.header.address_family = AddressFamily::Inet;
        self.dump("route dump", RouteNetlinkMessage::GetRoute(req), |m| match m {
            RouteNetlinkMessage::NewRoute(r) => route(&r),
            _ => None,
        })
    }

    /// IPv4 neighbours whose link-layer address the kernel knows.
    pub fn neighbours(&mut self) -> Result<Vec<Neighbour>, NetlinkError> {
        let mut req = NeighbourMessage::default();
        req.header.family = AddressFamily::Inet;
        self.dump("neighbour dump", RouteNetlinkMessage::GetNeighbour(req), |m| match m {
            RouteNetlinkMessage::NewNeighbour(n) => neighbour(&n),
            _ => None,
        })
    }

    /// Asks the kernel to resolve `ip` on interface `ifindex` and keep it
    /// resolved: a *managed* neighbour entry (Linux 5.16+). The kernel sends
    /// the ARP requests; kxp only reads the answer.
    pub fn keep_resolved(&mut self, ip: Ipv4Addr, ifindex: u32) -> Result<(), NetlinkError> {
        let mut n = NeighbourMessage::default();
        n.header.family = AddressFamily::Inet;
        n.header.ifindex = ifindex;
        n.header.state = NeighbourState::None;
        n.header.flags = NeighbourFlags::ExtLearned;
        n.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        n.attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        self.request(
            "managed neighbour",
            RouteNetlinkMessage::NewNeighbour(n),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(|_| ())
    }

    /// Sets interface `ifindex` up.
    pub fn set_up(&mut self, ifindex: u32) -> Result<(), NetlinkError> {
        let mut l = LinkMessage::default();
        l.header.index = ifindex;
        l.header.flags = LinkFlags::Up;
        l.header.change_mask = LinkFlags::Up;
        self.request("link up", RouteNetlinkMessage::SetLink(l), NLM_F_ACK)
            .map(|_| ())
    }

    /// Routes `dst` into interface `ifindex` (on-link), with `src` as the
    /// preferred source when given; replaces any route for `dst`.
    pub fn replace_route(&mut self, dst: Cidr, ifindex: u32, src: Option<Ipv4Addr>) -> Result<(), NetlinkError> {
        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet;
        r.header.destination_prefix_length = dst.prefix_len();
        r.header.table = RouteHeader::RT_TABLE_MAIN;
        r.header.protocol = RouteProtocol::Boot;
        r.header.scope = RouteScope::Link;
        r.header.kind = RouteType::Unicast;
        r.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(dst.addr())));
        r.attributes.push(RouteAttribute::Oif(ifindex));
        if let Some(src) = src {
            r.attributes.push(RouteAttribute::PrefSource(RouteAddress::Inet(src)));
        }
        self.request(
            "route",
            RouteNetlinkMessage::NewRoute(r),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(|_| ())
    }
}

fn link_info(l: &LinkMessage) -> Option<(String, LinkInfo)> {
    let mut name = None;
    let mut info = LinkInfo {
        ifindex: l.header.index,
        mac: Mac::default(),
        mtu: 1500,
        rx_queues: 1,
        xdp_attached: false,
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(b) if b.len() == 6 => {
                info.mac = Mac(b.as_slice().try_into().expect("six bytes"));
            }
            LinkAttribute::Mtu(m) => info.mtu = u16::try_from(*m).unwrap_or(u16::MAX),
            LinkAttribute::NumRxQueues(q) => info.rx_queues = *q,
            LinkAttribute::Xdp(x) => {
                info.xdp_attached = x.iter().any(|x| matches!(x, LinkXdp::ProgId(id) if *id != 0));
            }
            _ => {}
        }
    }
    Some((name?, info))
}

/// An IPv4 address: the local one (`IFA_LOCAL`), which on a point-to-point
/// link differs from the peer's (`IFA_ADDRESS`).
fn address(a: &AddressMessage) -> Option<Address> {
    if a.header.family != AddressFamily::Inet {
        return None;
    }
    let v4 = |want_local: bool| {
        a.attributes.iter().find_map(|at| match at {
            AddressAttribute::Local(IpAddr::V4(ip)) if want_local => Some(*ip),
            AddressAttribute::Address(IpAddr::V4(ip)) if !want_local => Some(*ip),
            _ => None,
        })
    };
    Some(Address {
        ifindex: a.header.index,
        ip: v4(true).or_else(|| v4(false))?,
        prefix_len: a.header.prefix_len,
    })
}

fn route(r: &RouteMessage) -> Option<Route> {
    let h = &r.header;
    if h.address_family != AddressFamily::Inet || h.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(h.table);
    let (mut dst, mut gateway, mut oif) = (Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, None);
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = *ip,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    (table == u32::from(RouteHeader::RT_TABLE_MAIN)).then_some(())?;
    Some(Route {
        dst,
        prefix_len: h.destination_prefix_length,
        gateway,
        oif: oif?,
    })
}

fn neighbour(n: &NeighbourMessage) -> Option<Neighbour> {
    use NeighbourState as S;
    if n.header.family != AddressFamily::Inet
        || !matches!(
            n.header.state,
            S::Reachable | S::Stale | S::Delay | S::Probe | S::Permanent | S::Noarp
        )
    {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(*a),
            NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
                mac = Some(Mac(b.as_slice().try_into().expect("six bytes")));
            }
            _ => {}
        }
    }
    Some(Neighbour {
        ip: ip?,
        mac: mac?,
        ifindex: n.header.ifindex,
    })
}

/// Follows the kernel's link, address, route and neighbour notifications
/// on a thread of its own (in the calling thread's network namespace) and
/// calls `changed` after each burst of them. Ends when `changed` returns
/// false. A lost notification (the socket's buffer overran) is reported as a
/// change too: the caller re-reads everything anyway.
pub fn watch(mut changed: impl FnMut() -> bool + Send + 'static) -> Result<std::thread::JoinHandle<()>, NetlinkError> {
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Open)?;
    sock.bind_auto().map_err(NetlinkError::Open)?;
    for group in [
        nix::libc::RTNLGRP_LINK,
        nix::libc::RTNLGRP_NEIGH,
        nix::libc::RTNLGRP_IPV4_IFADDR,
        nix::libc::RTNLGRP_IPV4_ROUTE,
    ] {
        sock.add_membership(group).map_err(NetlinkError::Open)?;
    }
    std::thread::Builder::new()
        .name("kxp-netlink".into())
        .spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                // Block for the first notification, then drain the burst.
                let first = sock.recv(&mut &mut buf[..], 0);
                if let Err(e) = &first {
                    if e.raw_os_error() != Some(nix::libc::ENOBUFS) {
                        tracing::warn!(error = %e, "netlink notifications failed; relying on the periodic read");
                        return;
                    }
                }
                let _ = sock.set_non_blocking(true);
                while sock.recv(&mut &mut buf[..], 0).is_ok() {}
                let _ = sock.set_non_blocking(false);
                if !changed() {
                    return;
                }
            }
        })
        .map_err(|source| NetlinkError::Io {
            what: "watcher thread",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_loopback_and_its_address() {
        let mut rtnl = Rtnl::open().expect("netlink opens");
        let links = rtnl.links().expect("link dump");
        let lo = links.get("lo").expect("every namespace has lo");
        let addrs = rtnl.addresses().expect("address dump");
        if addrs.iter().any(|a| a.ifindex == lo.ifindex) {
            assert!(addrs
                .iter()
                .any(|a| a.ifindex == lo.ifindex && a.ip == Ipv4Addr::LOCALHOST && a.prefix_len == 8));
        }
        rtnl.routes().expect("route dump");
        rtnl.neighbours().expect("neighbour dump");
    }
}
