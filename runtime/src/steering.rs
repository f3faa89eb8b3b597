//! The XDP steering program and its maps.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, XskMap};
use aya::programs::{Xdp, XdpFlags};
use aya::{Ebpf, Pod};
use dataplane::addr::{Frontend, Proto};
use dataplane::tables::{PortRole, Tables};

/// The compiled program (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("cannot load kxp's XDP program: {0}; kxp needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON) and a kernel with BPF")]
    Load(#[source] aya::EbpfError),
    #[error("cannot attach XDP to {iface}: {source}; check the interface exists in this network namespace and has no XDP program already (`ip link set dev {iface} xdp off` removes one)")]
    Attach {
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("interface {iface} not found in this network namespace: {reason}")]
    Interface { iface: String, reason: String },
    #[error("the XDP program has no map or program named {0}: the object and this build disagree")]
    Missing(&'static str),
    #[error("cannot update XDP map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Mirrors `struct l4_key` in steer.bpf.c.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct L4Key {
    ip: u32,
    port: u16,
    proto: u8,
    pad: u8,
}

/// Mirrors `struct config` in steer.bpf.c.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Config {
    snat_ip: u32,
    snat_port_lo: u16,
    snat_port_hi: u16,
    node_port_lo: u16,
    node_port_hi: u16,
    vxlan_port: u16,
    pad: u16,
}

// SAFETY: `Pod` promises the type is plain old data that any bit pattern
// may fill: L4Key is repr(C), integers only, with its padding as an explicit
// field, so it has no uninitialised bytes and no invalid values.
unsafe impl Pod for L4Key {}
// SAFETY: as above: repr(C), integers only, padding explicit.
unsafe impl Pod for Config {}

/// Counters the program keeps (summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteeringStats {
    pub seen: u64,
    /// Sent toward an AF_XDP socket (XDP_PASS when none is bound).
    pub redirected: u64,
    pub passed: u64,
}

pub struct Steering {
    ebpf: Ebpf,
    iface: Option<String>,
}

fn be_ip(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn key(ip: Ipv4Addr, port: u16, proto: Proto) -> L4Key {
    L4Key {
        ip: be_ip(ip),
        port: port.to_be(),
        proto: proto as u8,
        pad: 0,
    }
}

impl Steering {
    pub fn load() -> Result<Self, SteeringError> {
        let ebpf = Ebpf::load(OBJECT).map_err(SteeringError::Load)?;
        Ok(Steering { ebpf, iface: None })
    }

    /// Attaches in native (driver) mode through a BPF link: the program goes
    /// away with this process, however it ends. `role` says whether the
    /// interface faces local pods (their traffic to other nodes' pods is
    /// kxp's) or the underlay.
    pub fn attach(&mut self, iface: &str, role: PortRole) -> Result<(), SteeringError> {
        if role == PortRole::Pod {
            let ifindex = nix::net::if_::if_nametoindex(iface).map_err(|e| SteeringError::Interface {
                iface: iface.to_string(),
                reason: e.to_string(),
            })?;
            let mut pods: HashMap<&mut MapData, u32, u8> = self.map("pod_ifaces")?;
            pods.insert(ifindex, 1, 0).map_err(|source| SteeringError::Map {
                map: "pod_ifaces",
                source,
            })?;
        }
        let prog: &mut Xdp = self
            .ebpf
            .program_mut("kxp_steer")
            .ok_or(SteeringError::Missing("kxp_steer"))?
            .try_into()
            .map_err(|source| SteeringError::Attach {
                iface: iface.into(),
                source,
            })?;
        prog.load().map_err(|source| SteeringError::Attach {
            iface: iface.into(),
            source,
        })?;
        prog.attach(iface, XdpFlags::DRV_MODE)
            .map_err(|source| SteeringError::Attach {
                iface: iface.into(),
                source,
            })?;
        self.iface = Some(iface.to_string());
        Ok(())
    }

    /// Fills the maps from the tables: frontends, backends, node addresses,
    /// NodePorts, remote pod CIDRs and settings.
    pub fn sync_from(&mut self, t: &Tables) -> Result<(), SteeringError> {
        let node = t.node();
        let cfg = Config {
            snat_ip: be_ip(node.snat_ip),
            snat_port_lo: node.snat_ports.0,
            snat_port_hi: node.snat_ports.1,
            node_port_lo: node.node_port_range.0,
            node_port_hi: node.node_port_range.1,
            vxlan_port: node.vxlan.port,
            pad: 0,
        };
        let mut settings: Array<&mut MapData, Config> = self.map("settings")?;
        settings.set(0, cfg, 0).map_err(|source| SteeringError::Map {
            map: "settings",
            source,
        })?;
        let mut fe = HashSet::new();
        let mut fe_ips = HashSet::new();
        let mut be = HashSet::new();
        let mut nps = HashSet::new();
        for svc in t.services() {
            for (Frontend { ip, port, proto }, _) in svc.frontends() {
                fe.insert(key(*ip, *port, *proto));
                fe_ips.insert(be_ip(*ip));
            }
            for ep in svc.endpoints() {
                be.insert(key(ep.addr.0.ip, ep.addr.0.port, svc.proto));
            }
            if let Some(np) = svc.node_port {
                nps.insert(key(Ipv4Addr::UNSPECIFIED, np, svc.proto));
            }
        }
        let ips: HashSet<u32> = node.node_ips.iter().map(|ip| be_ip(*ip)).collect();
        self.replace("frontends", fe)?;
        self.replace("frontend_ips", fe_ips)?;
        self.replace("backends", be)?;
        self.replace("node_ports", nps)?;
        self.replace("node_ips", ips)?;
        let host: HashSet<u32> = node.host_addrs.iter().map(|ip| be_ip(*ip)).collect();
        self.replace("host_addrs", host)?;
        let mut pods: LpmTrie<&mut MapData, u32, u8> = self.map("remote_pods")?;
        let want: HashSet<(u32, u32)> = t
            .pod_routes()
            .map(|(c, _)| (u32::from(c.prefix_len()), be_ip(c.addr())))
            .collect();
        let have: Vec<LpmKey<u32>> = pods.keys().filter_map(Result::ok).collect();
        for k in have {
            if !want.contains(&(k.prefix_len(), k.data())) {
                let _ = pods.remove(&k);
            }
        }
        for (len, ip) in want {
            pods.insert(&LpmKey::new(len, ip), 1, 0)
                .map_err(|source| SteeringError::Map {
                    map: "remote_pods",
                    source,
                })?;
        }
        Ok(())
    }

    /// Makes hash map `name` hold exactly `want` (removes the rest).
    fn replace<K: Pod + Eq + std::hash::Hash>(
        &mut self,
        name: &'static str,
        want: HashSet<K>,
    ) -> Result<(), SteeringError> {
        let mut m: HashMap<&mut MapData, K, u8> = self.map(name)?;
        let stale: Vec<K> = m.keys().filter_map(Result::ok).filter(|k| !want.contains(k)).collect();
        for k in stale {
            let _ = m.remove(&k);
        }
        for k in want {
            m.insert(k, 1, 0)
                .map_err(|source| SteeringError::Map { map: name, source })?;
        }
        Ok(())
    }

    fn map<'a, T>(&'a mut self, name: &'static str) -> Result<T, SteeringError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let m = self.ebpf.map_mut(name).ok_or(SteeringError::Missing(name))?;
        T::try_from(m).map_err(|source| SteeringError::Map { map: name, source })
    }

    /// Steers this interface's receive queue `queue` to the AF_XDP socket
    /// `fd`. Until it is set, that queue's frames take XDP_PASS.
    pub fn bind_socket(&mut self, queue: u32, fd: std::os::fd::RawFd) -> Result<(), SteeringError> {
        let mut xsks: XskMap<&mut MapData> = self.map("xsks")?;
        xsks.set(queue, fd, 0)
            .map_err(|source| SteeringError::Map { map: "xsks", source })
    }

    pub fn stats(&mut self) -> Result<SteeringStats, SteeringError> {
        let s: PerCpuArray<&mut MapData, u64> = self.map("stats")?;
        let sum = |i: u32| -> Result<u64, SteeringError> {
            Ok(s.get(&i, 0)
                .map_err(|source| SteeringError::Map { map: "stats", source })?
                .iter()
                .sum())
        };
        Ok(SteeringStats {
            seen: sum(0)?,
            redirected: sum(1)?,
            passed: sum(2)?,
        })
    }

    pub fn interface(&self) -> Option<&str> {
        self.iface.as_deref()
    }
}
