//! The node's own way into kxp: a TUN device (`kxp0`) that the node routes
//! service addresses to. kube-proxy serves the node's own connections to
//! ClusterIPs in netfilter's OUTPUT hook; those packets never pass an XDP
//! hook, so kxp has the kernel route them to this device instead, reads them
//! like frames from any port, and writes the replies back into it.
//!
//! Layer 3 (no Ethernet, no ARP): the worker adds and strips a 14-byte
//! Ethernet header so the engine sees frames as from every other port.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use dataplane::addr::Cidr;

use crate::netlink::Rtnl;

/// Length of the Ethernet header the worker adds in front of TUN packets.
pub const L2_LEN: usize = 14;

/// The source kxp gives flows it delivers to a backend on the node's own
/// address; routed into the TUN device so the node's replies come back to
/// kxp (link-local: never seen off the node).
pub const HOST_SNAT_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 1);

#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("cannot create the TUN device {name} ({reason}); kxp needs CAP_NET_ADMIN and /dev/net/tun (modprobe tun)")]
    Create { name: String, reason: String },
    #[error("cannot route {what} into {name}: {reason}")]
    Route { name: String, what: String, reason: String },
}

pub struct HostTun {
    file: File,
    pub name: String,
    pub ifindex: u32,
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the
/// rest of the kernel's union is padding here).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    pad: [u8; 22],
}

impl HostTun {
    /// Creates (or takes over) TUN device `name`, brings it up, and routes
    /// `cidrs` into it with source `src` (the node address replies go to).
    pub fn open(name: &str, cidrs: &[Cidr], src: Ipv4Addr) -> Result<HostTun, TunError> {
        let err = |reason: String| TunError::Create {
            name: name.to_string(),
            reason,
        };
        if name.is_empty() || name.len() > 15 {
            return Err(err("the name must be 1 to 15 bytes".into()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| err(e.to_string()))?;
        let mut req = IfReq {
            name: [0; 16],
            flags: (nix::libc::IFF_TUN | nix::libc::IFF_NO_PI) as i16,
            pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads a `struct ifreq` (40 bytes on Linux) at the
        // pointer: `IfReq` is repr(C) with the same layout and size, lives
        // for the call, and the fd is an open /dev/net/tun.
        let rc = unsafe { nix::libc::ioctl(file.as_raw_fd(), nix::libc::TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(err(std::io::Error::last_os_error().to_string()));
        }
        let route_err = |what: String| {
            let name = name.to_string();
            move |e: crate::netlink::NetlinkError| TunError::Route {
                name,
                what,
                reason: e.to_string(),
            }
        };
        // IPv4 only: no IPv6 link-local chatter into kxp.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        let mut rtnl = Rtnl::open().map_err(route_err("(netlink)".into()))?;
        let links = rtnl.links().map_err(route_err("(link)".into()))?;
        let index = links.get(name).map(|l| l.ifindex).ok_or_else(|| TunError::Route {
            name: name.to_string(),
            what: "(link)".into(),
            reason: "the device vanished as it was created".into(),
        })?;
        rtnl.set_up(index).map_err(route_err("(link up)".into()))?;
        for c in cidrs {
            rtnl.replace_route(*c, index, Some(src))
                .map_err(route_err(c.to_string()))?;
        }
        let back = Cidr::of(HOST_SNAT_IP, 32);
        rtnl.replace_route(back, index, None)
            .map_err(route_err(back.to_string()))?;
        Ok(HostTun {
            file,
            name: name.to_string(),
            ifindex: index,
        })
    }

    /// One packet from the node into `buf`, or `None` when there is none.
    pub fn read(&self, buf: &mut [u8]) -> Option<usize> {
        (&self.file).read(buf).ok().filter(|n| *n > 0)
    }

    /// One packet to the node; a full queue drops it (counted by the
    /// caller), as a NIC would.
    pub fn write(&self, packet: &[u8]) -> bool {
        (&self.file).write(packet).is_ok()
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
