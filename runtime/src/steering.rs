//! The XDP steering program and its maps.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::sync::atomic::AtomicU64;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, XskMap};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{Xdp, XdpFlags};
use aya::{Ebpf, EbpfLoader, Pod};
use dataplane::addr::{Frontend, PortId, Proto};
use dataplane::flow::reply_index::{IndexMemory, ReplyIndex, WORDS_PER_BUCKET};
use dataplane::tables::{PortRole, Tables};

use crate::ports::Port;

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
    #[error("port {port} queue {queue} has no slot in the steering maps (kxp serves {MAX_PORTS} ports of {MAX_QUEUES} queues)")]
    Slot { port: u16, queue: u32 },
    #[error("the XDP program has no map or program named {0}: the object and this build disagree")]
    Missing(&'static str),
    #[error(
        "a conntrack of {0} flows needs a reply index larger than a BPF array holds; lower conntrack.min / maxPerCore"
    )]
    IndexTooLarge(usize),
    #[error("cannot map the reply index into memory: {0}; kxp needs Linux 5.5 or later (mmapable BPF arrays)")]
    MapIndex(#[source] nix::Error),
    #[error("cannot update XDP map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Mirrors `struct l4_key` in steer.bpf.c.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
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
    index_seed: u64,
    index_mask: u32,
    node_port_lo: u16,
    node_port_hi: u16,
    vxlan_port: u16,
    pad: [u16; 3],
}

// SAFETY: `Pod` promises the type is plain old data that any bit pattern
// may fill: L4Key is repr(C), integers only, with its padding as an explicit
// field, so it has no uninitialised bytes and no invalid values.
unsafe impl Pod for L4Key {}
// SAFETY: as above: repr(C), integers only (24 bytes, the u64 first), padding explicit.
unsafe impl Pod for Config {}

/// Counters the program keeps (summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteeringStats {
    pub seen: u64,
    /// Sent toward an AF_XDP socket (XDP_PASS when none is bound).
    pub redirected: u64,
    pub passed: u64,
}

/// Mirrors `struct port` in steer.bpf.c.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct PortEntry {
    slot: u32,
    is_pod: u32,
}

// SAFETY: repr(C), two u32s, no padding, any bit pattern valid.
unsafe impl Pod for PortEntry {}

/// Must match MAX_PORTS / MAX_QUEUES in steer.bpf.c.
pub const MAX_PORTS: u32 = 1024;
pub const MAX_QUEUES: u32 = 16;

/// What the maps hold, as last written, so a publish writes only the
/// difference (reading keys back from the kernel costs a syscall each).
#[derive(Default)]
struct Synced {
    frontends: HashSet<L4Key>,
    node_ports: HashSet<L4Key>,
    node_ips: HashSet<u32>,
    host_addrs: HashSet<u32>,
    overlay_peers: HashSet<u32>,
    remote_pods: HashSet<(u32, u32)>,
}

/// One loaded program, attached to every port kxp serves, with one set of
/// maps: a publish is written once, whatever the number of ports.
pub struct Steering {
    ebpf: Ebpf,
    /// The program's attachment to each port.
    links: std::collections::BTreeMap<PortId, XdpLinkId>,
    synced: Synced,
    index_seed: u64,
    index_mask: u32,
}

/// The `reply_index` map's values, mapped shared into kxp's memory: the
/// workers write the reply index there and the program reads it.
struct MappedIndex {
    words: std::ptr::NonNull<AtomicU64>,
    len_words: usize,
    mapped: std::num::NonZeroUsize,
}

// SAFETY: the mapping is plain shared memory, accessed only through
// `AtomicU64`s (from any thread); the pointer is owned by this value.
unsafe impl Send for MappedIndex {}
// SAFETY: as above: all access is atomic.
unsafe impl Sync for MappedIndex {}

impl MappedIndex {
    fn map(fd: std::os::fd::BorrowedFd<'_>, buckets: usize) -> Result<Self, SteeringError> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let len_words = buckets * WORDS_PER_BUCKET;
        let bytes = len_words * 8;
        let page = 4096;
        let mapped = std::num::NonZeroUsize::new(bytes.div_ceil(page) * page).expect("at least one bucket");
        // SAFETY: maps `bytes` (rounded up to a page) of an mmapable BPF
        // array whose values are `buckets` 128-byte buckets laid end to end
        // from offset 0; the kernel refuses a longer mapping. The memory
        // stays valid until `munmap` in Drop (the mapping holds the map),
        // is page-aligned (so 8-aligned for AtomicU64) and zero-filled.
        let ptr = unsafe {
            mmap(
                None,
                mapped,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
        .map_err(SteeringError::MapIndex)?;
        Ok(MappedIndex {
            words: ptr.cast(),
            len_words,
            mapped,
        })
    }
}

impl IndexMemory for MappedIndex {
    fn words(&self) -> &[AtomicU64] {
        // SAFETY: `words` points at `len_words` u64s of live, aligned,
        // shared memory (see `map`); AtomicU64 has u64's layout and every
        // access through it is atomic, so sharing it with the program and
        // other threads is sound.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr(), self.len_words) }
    }
}

impl Drop for MappedIndex {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped; no reference into it
        // outlives `self` (they borrow from `words(&self)`).
        let _ = unsafe { nix::sys::mman::munmap(self.words.cast(), self.mapped.get()) };
    }
}

fn map_of<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, SteeringError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf.map_mut(name).ok_or(SteeringError::Missing(name))?;
    T::try_from(m).map_err(|source| SteeringError::Map { map: name, source })
}

/// Brings the set map `name` from `have` to `want`; see [`apply_diff`].
fn set_update<K: Pod + Eq + std::hash::Hash>(
    ebpf: &mut Ebpf,
    name: &'static str,
    have: &mut HashSet<K>,
    want: &HashSet<K>,
) -> Result<(), SteeringError> {
    let mut m: HashMap<&mut MapData, K, u8> = map_of(ebpf, name)?;
    apply_diff(have, want, |op, k| match op {
        Write::Remove => m.remove(k),
        Write::Insert => m.insert(*k, 1, 0),
    })
    .map_err(|source| SteeringError::Map { map: name, source })
}

/// One write to a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Write {
    Remove,
    Insert,
}

/// Removes from a map what `have` holds and `want` does not, then adds what
/// `want` holds and `have` does not, one key at a time through `write`.
/// `have` records every write that succeeded, so on an error it is still
/// exactly the map's content. A key that is already gone counts as removed.
fn apply_diff<K: Clone + Eq + std::hash::Hash>(
    have: &mut HashSet<K>,
    want: &HashSet<K>,
    mut write: impl FnMut(Write, &K) -> Result<(), aya::maps::MapError>,
) -> Result<(), aya::maps::MapError> {
    let gone: Vec<K> = have.difference(want).cloned().collect();
    for k in gone {
        match write(Write::Remove, &k) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {
                have.remove(&k);
            }
            Err(e) => return Err(e),
        }
    }
    let new: Vec<K> = want.difference(have).cloned().collect();
    for k in new {
        write(Write::Insert, &k)?;
        have.insert(k);
    }
    Ok(())
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
    /// Loads the program with a reply index sized for `flow_capacity`
    /// conntrack entries, and returns the index for the conntrack to keep
    /// (`FlowState::with_reply_index`).
    pub fn load(flow_capacity: usize) -> Result<(Self, ReplyIndex), SteeringError> {
        let buckets = ReplyIndex::buckets_for(flow_capacity.max(1));
        let bucket_count = u32::try_from(buckets).map_err(|_| SteeringError::IndexTooLarge(flow_capacity))?;
        let ebpf = EbpfLoader::new()
            .set_max_entries("reply_index", bucket_count)
            .load(OBJECT)
            .map_err(SteeringError::Load)?;
        let map = ebpf.map("reply_index").ok_or(SteeringError::Missing("reply_index"))?;
        let aya::maps::Map::Array(data) = map else {
            return Err(SteeringError::Missing("reply_index"));
        };
        let memory = MappedIndex::map(data.fd().as_fd(), buckets)?;
        let index =
            ReplyIndex::over(Box::new(memory), ReplyIndex::random_seed()).expect("whole buckets, a power of two");
        let mut s = Steering {
            ebpf,
            links: Default::default(),
            synced: Synced::default(),
            index_seed: index.seed(),
            index_mask: bucket_count - 1,
        };
        s.program()?.load().map_err(|source| SteeringError::Attach {
            iface: "(program)".into(),
            source,
        })?;
        Ok((s, index))
    }

    /// Attaches to `port` in native (driver) mode through a BPF link: the
    /// program goes away with this process, however it ends. Its slot in
    /// the maps is its `PortId`; its role says whether the interface faces
    /// local pods (their traffic to other nodes' pods is kxp's) or the
    /// underlay.
    pub fn attach(&mut self, id: PortId, port: &Port) -> Result<(), SteeringError> {
        let entry = PortEntry {
            slot: u32::from(id.0),
            is_pod: u32::from(port.role == PortRole::Pod),
        };
        let mut ports: HashMap<&mut MapData, u32, PortEntry> = self.map("ports")?;
        ports
            .insert(port.ifindex, entry, 0)
            .map_err(|source| SteeringError::Map { map: "ports", source })?;
        let link = self
            .program()?
            .attach_to_if_index(port.ifindex, XdpFlags::DRV_MODE)
            .map_err(|source| SteeringError::Attach {
                iface: port.name.clone(),
                source,
            })?;
        self.links.insert(id, link);
        Ok(())
    }

    /// Detaches from `port` (e.g. a pod's veth that is going away); its
    /// frames take XDP_PASS from now on.
    pub fn detach(&mut self, id: PortId, port: &Port) -> Result<(), SteeringError> {
        let Some(link) = self.links.remove(&id) else {
            return Ok(());
        };
        let mut ports: HashMap<&mut MapData, u32, PortEntry> = self.map("ports")?;
        let _ = ports.remove(&port.ifindex);
        // Its sockets' XSKMAP entries go when the sockets close.
        // The link may already be gone with the interface.
        let _ = self.program()?.detach(link);
        Ok(())
    }

    fn program(&mut self) -> Result<&mut Xdp, SteeringError> {
        self.ebpf
            .program_mut("kxp_steer")
            .ok_or(SteeringError::Missing("kxp_steer"))?
            .try_into()
            .map_err(|source| SteeringError::Attach {
                iface: "(program)".into(),
                source,
            })
    }

    /// Steers port `id`'s receive queue `queue` to the AF_XDP socket `fd`.
    /// Until it is set, that queue's frames take XDP_PASS.
    pub fn bind_socket(&mut self, id: PortId, queue: u32, fd: std::os::fd::RawFd) -> Result<(), SteeringError> {
        if queue >= MAX_QUEUES || u32::from(id.0) >= MAX_PORTS {
            return Err(SteeringError::Slot { port: id.0, queue });
        }
        let mut xsks: XskMap<&mut MapData> = self.map("xsks")?;
        xsks.set(u32::from(id.0) * MAX_QUEUES + queue, fd, 0)
            .map_err(|source| SteeringError::Map { map: "xsks", source })
    }

    /// Makes the maps hold the tables' frontends, node addresses,
    /// NodePorts, remote pod CIDRs and settings, writing only what changed
    /// since the last call.
    pub fn sync_from(&mut self, t: &Tables) -> Result<(), SteeringError> {
        let node = t.node();
        let cfg = Config {
            index_seed: self.index_seed,
            index_mask: self.index_mask,
            node_port_lo: node.node_port_range.0,
            node_port_hi: node.node_port_range.1,
            vxlan_port: node.vxlan.port,
            pad: [0; 3],
        };
        let mut settings: Array<&mut MapData, Config> = self.map("settings")?;
        settings.set(0, cfg, 0).map_err(|source| SteeringError::Map {
            map: "settings",
            source,
        })?;
        let mut want = Synced::default();
        for svc in t.services() {
            for (Frontend { ip, port, proto }, _) in svc.frontends() {
                want.frontends.insert(key(*ip, *port, *proto));
            }
            if let Some(np) = svc.node_port {
                want.node_ports.insert(key(Ipv4Addr::UNSPECIFIED, np, svc.proto));
            }
        }
        want.node_ips = node.node_ips.iter().map(|ip| be_ip(*ip)).collect();
        want.host_addrs = node.host_addrs.iter().map(|ip| be_ip(*ip)).collect();
        want.overlay_peers = t.pod_routes().map(|(_, r)| be_ip(r.node_ip)).collect();
        want.remote_pods = t
            .pod_routes()
            .map(|(c, _)| (u32::from(c.prefix_len()), be_ip(c.addr())))
            .collect();
        // Each map is brought to `want` one key at a time, and `synced`
        // follows every write that succeeded: if one fails (a full map),
        // `synced` still says exactly what the maps hold, and the next call
        // retries only what is missing.
        let (ebpf, have) = (&mut self.ebpf, &mut self.synced);
        set_update(ebpf, "frontends", &mut have.frontends, &want.frontends)?;
        set_update(ebpf, "node_ports", &mut have.node_ports, &want.node_ports)?;
        set_update(ebpf, "node_ips", &mut have.node_ips, &want.node_ips)?;
        set_update(ebpf, "host_addrs", &mut have.host_addrs, &want.host_addrs)?;
        set_update(ebpf, "overlay_peers", &mut have.overlay_peers, &want.overlay_peers)?;
        let mut pods: LpmTrie<&mut MapData, u32, u8> = map_of(ebpf, "remote_pods")?;
        apply_diff(&mut have.remote_pods, &want.remote_pods, |op, (len, ip)| match op {
            Write::Remove => pods.remove(&LpmKey::new(*len, *ip)),
            Write::Insert => pods.insert(&LpmKey::new(*len, *ip), 1, 0),
        })
        .map_err(|source| SteeringError::Map {
            map: "remote_pods",
            source,
        })
    }

    fn map<'a, T>(&'a mut self, name: &'static str) -> Result<T, SteeringError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        map_of(&mut self.ebpf, name)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map that refuses inserts once it holds `cap` keys.
    struct FakeMap {
        keys: HashSet<u32>,
        cap: usize,
    }

    impl FakeMap {
        fn sync(&mut self, have: &mut HashSet<u32>, want: &HashSet<u32>) -> Result<(), aya::maps::MapError> {
            apply_diff(have, want, |op, k| {
                match op {
                    Write::Remove => {
                        self.keys.remove(k);
                    }
                    Write::Insert if self.keys.len() >= self.cap => {
                        return Err(aya::maps::MapError::OutOfBounds {
                            index: self.keys.len() as u32,
                            max_entries: self.cap as u32,
                        })
                    }
                    Write::Insert => {
                        self.keys.insert(*k);
                    }
                }
                Ok(())
            })
        }
    }

    #[test]
    fn a_failed_write_leaves_the_baseline_true_and_the_retry_finishes() {
        let mut map = FakeMap {
            keys: HashSet::new(),
            cap: 3,
        };
        let mut have = HashSet::new();
        let want: HashSet<u32> = (0..5).collect();
        assert!(map.sync(&mut have, &want).is_err(), "the map is full");
        assert_eq!(have, map.keys, "the baseline is what the map holds");
        assert_eq!(have.len(), 3);
        // Room again: the retry writes only what is missing.
        map.cap = 10;
        map.sync(&mut have, &want).unwrap();
        assert_eq!((&have, &map.keys), (&want, &want));
        // Removals too.
        let fewer: HashSet<u32> = (0..2).collect();
        map.sync(&mut have, &fewer).unwrap();
        assert_eq!(map.keys, fewer);
    }
}
