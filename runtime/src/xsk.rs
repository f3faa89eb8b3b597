//! One UMEM and the AF_XDP sockets on it: queue `q` of each port of the
//! set, so a frame received on one port is transmitted on another without
//! a copy. A worker has one or two of these (see `sockets`). Ports come and
//! go (pods do): sockets are kept by `PortId`, with holes for removed ports
//! and for ports of the worker's other set.
//!
//! **Frames are owned, and the types say so.** A frame the worker holds is
//! an [`OwnedFrame`]: not `Copy`, not `Clone`, made only here (by `receive`
//! and `take_free`), and given back only by `transmit` or `release`, which
//! consume it. So safe code cannot hold a frame twice, keep one after
//! handing it to the kernel, or invent one, and the preconditions of
//! xsk-rs's unsafe ring and frame access hold by construction. A frame
//! also carries the id of its set, so one worker's frame is refused by
//! another's (a panic, never a write into a UMEM it does not belong to).
//!
//! **Accounting is per frame.** The set keeps where each frame is: free,
//! lent to a port's fill ring, lent to a port's TX ring, or held by the
//! worker. `account()` is read off that table. When a port goes, its
//! socket is closed first, which ends the kernel's use of its rings; then
//! every frame the table places on that port's fill or TX ring comes back
//! to the pool. No frame is ever written off.
//!
//! Unsafe code: xsk-rs makes ring and frame access `unsafe` because only
//! the caller can know that a descriptor belongs to this UMEM and is not
//! also held by the kernel. Each block below says why that holds.

use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use dataplane::addr::PortId;
use dataplane::tables::PortRole;
use hdrhistogram::Histogram;
use xsk_rs::config::{BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

use crate::latency::timed;
use crate::ports::Port;

/// UMEM frame size: one page, room for a 1500-byte packet, 256 bytes of
/// headroom (VXLAN encap grows frames at the front) and more.
pub const FRAME_SIZE: u32 = 4096;

/// Frames the kernel sends per TX wakeup in copy mode by default
/// (TX_BATCH_SIZE in net/xdp/xsk.c).
const COPY_MODE_TX_BUDGET: usize = 32;

/// `SOL_XDP` socket option (Linux 6.17+, `include/uapi/linux/if_xdp.h`):
/// how many frames one copy-mode `sendto` may send, 32 up to the TX ring's
/// size.
const XDP_MAX_TX_SKB_BUDGET: nix::libc::c_int = 9;

/// Lets one copy-mode wakeup send up to `budget` frames; returns the budget
/// in force (the kernel's default where the option is absent).
fn raise_tx_budget(fd: RawFd, budget: u32) -> usize {
    let value: nix::libc::c_uint = budget;
    // SAFETY: setsockopt reads `size_of::<c_uint>()` bytes at the pointer,
    // which points at `value`, alive for the call; `fd` is an open AF_XDP
    // socket this set owns.
    let rc = unsafe {
        nix::libc::setsockopt(
            fd,
            nix::libc::SOL_XDP,
            XDP_MAX_TX_SKB_BUDGET,
            (&value as *const nix::libc::c_uint).cast(),
            std::mem::size_of::<nix::libc::c_uint>() as nix::libc::socklen_t,
        )
    };
    if rc == 0 {
        budget as usize
    } else {
        COPY_MODE_TX_BUDGET
    }
}

#[derive(Clone, Copy, Debug)]
pub struct RingSizes {
    pub rx: u32,
    pub tx: u32,
    pub fill: u32,
    pub comp: u32,
}

impl Default for RingSizes {
    fn default() -> Self {
        RingSizes {
            rx: 2048,
            tx: 2048,
            fill: 2048,
            comp: 2048,
        }
    }
}

/// A pod's veth carries one pod's traffic: its rings and its share of the
/// fill frames are half the uplink's (a multi-gigabit TCP stream from one
/// pod starves with 256: measured in the lab demo).
pub const POD_RING: u32 = 1024;
/// Pod ports the pool has frames for beyond those present at start; more
/// pods share the pool more thinly.
pub const SPARE_POD_PORTS: usize = 8;

/// How a set's sockets bind: all alike, since sockets sharing a UMEM
/// inherit the first one's mode (libxdp binds them with XDP_SHARED_UMEM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindMode {
    ZeroCopy,
    Copy,
}

/// Frames a port of `role` needs in its set: its fill and TX rings full at
/// once.
pub fn frames_for(role: PortRole, sizes: RingSizes) -> usize {
    match role {
        PortRole::Pod => 2 * POD_RING.min(sizes.fill) as usize,
        PortRole::Uplink => (sizes.fill + sizes.tx) as usize,
        // Frames read from the node's TUN device, a batch at a time.
        PortRole::Host => sizes.rx.min(256) as usize,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum XskError {
    #[error("invalid AF_XDP ring or frame size: {0}")]
    Config(String),
    #[error(
        "cannot create the UMEM ({0}); kxp needs root (CAP_NET_RAW, CAP_IPC_LOCK) and locked-memory room (ulimit -l)"
    )]
    Umem(String),
    #[error("cannot open an AF_XDP socket on {iface} queue {queue}: {reason}; check the interface has that queue (ethtool -l) and the kernel has CONFIG_XDP_SOCKETS")]
    Socket { iface: String, queue: u32, reason: String },
}

/// Where a worker's frames are (see the module comment).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameAccount {
    pub total: usize,
    pub free: usize,
    pub in_fill: usize,
    pub in_tx: usize,
    /// Held by the worker (a batch in hand; 0 between batches).
    pub held: usize,
}

/// Two sets' accounts together (a worker with two UMEMs).
impl std::ops::Add for FrameAccount {
    type Output = FrameAccount;

    fn add(self, b: FrameAccount) -> FrameAccount {
        FrameAccount {
            total: self.total + b.total,
            free: self.free + b.free,
            in_fill: self.in_fill + b.in_fill,
            in_tx: self.in_tx + b.in_tx,
            held: self.held + b.held,
        }
    }
}

impl FrameAccount {
    /// True when no frame is lost or counted twice.
    pub fn balanced(&self) -> bool {
        self.free + self.in_fill + self.in_tx + self.held == self.total
    }
}

/// A UMEM frame the worker holds (see the module comment): received from
/// a port or taken from the pool, until `transmit` or `release` takes it.
#[derive(Debug)]
pub struct OwnedFrame {
    desc: FrameDesc,
    set: u32,
}

/// Where one frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Free,
    Fill(u16),
    Tx(u16),
    Held,
}

/// Frames the kernel could not hand to kxp (or take from it), by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelDrops {
    /// Dropped on receive (the socket's `rx_dropped`).
    pub rx_dropped: u64,
    /// The RX ring was full: kxp fell behind.
    pub rx_ring_full: u64,
    /// A frame arrived with no buffer on the fill ring.
    pub fill_ring_empty: u64,
    /// Descriptors the kernel rejected: a bug in kxp if ever non-zero.
    pub invalid_descs: u64,
}

impl std::ops::Add for KernelDrops {
    type Output = KernelDrops;

    fn add(self, b: KernelDrops) -> KernelDrops {
        KernelDrops {
            rx_dropped: self.rx_dropped + b.rx_dropped,
            rx_ring_full: self.rx_ring_full + b.rx_ring_full,
            fill_ring_empty: self.fill_ring_empty + b.fill_ring_empty,
            invalid_descs: self.invalid_descs + b.invalid_descs,
        }
    }
}

/// One port's socket and its rings.
struct PortSocket {
    tx: TxQueue,
    rx: RxQueue,
    fill: FillQueue,
    comp: CompQueue,
    /// Frames on the fill ring.
    in_fill: usize,
    /// Most frames this port's fill ring is given.
    fill_target: usize,
    /// Frames on the TX ring, until their completion.
    in_tx: usize,
    /// Frames one copy-mode wakeup sends.
    tx_budget: usize,
    /// The TX ring's size.
    tx_ring: u32,
    copy_mode: bool,
}

impl PortSocket {
    fn fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }
}

pub struct XskSet {
    umem: Umem,
    /// Tells this set's frames from another's.
    id: u32,
    /// By `PortId`; `None` where a port was removed or is another set's.
    ports: Vec<Option<PortSocket>>,
    free: Vec<FrameDesc>,
    /// Where each frame is, by frame index (address / FRAME_SIZE).
    place: Vec<Place>,
    /// Each frame's descriptor as the UMEM handed it out, to give a
    /// removed port's frames back to the pool.
    pristine: Vec<FrameDesc>,
    /// Ring reads (RX, completions).
    scratch: Vec<FrameDesc>,
    /// Descriptors of a TX batch.
    tx_descs: Vec<FrameDesc>,
    queue: u32,
    sizes: RingSizes,
    mode: BindFlags,
    /// TX wakeups (`sendto`) made so far.
    pub tx_wakeups: u64,
    /// How long each TX wakeup took, since the worker last took them.
    pub wakeup_time: Histogram<u64>,
}

impl XskSet {
    /// Makes a UMEM of `frames` frames and opens an AF_XDP socket on queue
    /// `queue` of each of `ports` on it, in `mode`, filling every fill
    /// ring. kxp's own XDP program steers to them (libxdp loads none).
    pub fn open(
        ports: &[(PortId, &Port)],
        queue: u32,
        sizes: RingSizes,
        mode: BindMode,
        frames: usize,
    ) -> Result<XskSet, XskError> {
        let q = |n: u32| QueueSize::new(n).map_err(|e| XskError::Config(e.to_string()));
        let umem_cfg = UmemConfig::builder()
            .frame_size(FrameSize::new(FRAME_SIZE).map_err(|e| XskError::Config(e.to_string()))?)
            .fill_queue_size(q(sizes.fill)?)
            .comp_queue_size(q(sizes.comp)?)
            .frame_headroom(0)
            .build()
            .map_err(|e| XskError::Config(e.to_string()))?;
        let count = NonZeroU32::new(frames as u32).ok_or_else(|| XskError::Config("no frames".into()))?;
        let (umem, free) = Umem::new(umem_cfg, count, false).map_err(|e| XskError::Umem(e.to_string()))?;
        static NEXT_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let mut pristine = free.clone();
        pristine.sort_by_key(FrameDesc::addr);
        if pristine.iter().enumerate().any(|(i, d)| Self::index(d) != i) {
            return Err(XskError::Umem("frames are not laid out one per FRAME_SIZE".into()));
        }
        let mut set = XskSet {
            umem,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ports: Vec::with_capacity(ports.len()),
            free,
            place: vec![Place::Free; frames],
            pristine,
            tx_descs: Vec::with_capacity(sizes.tx as usize),
            scratch: vec![FrameDesc::default(); sizes.comp.max(sizes.rx) as usize],
            queue,
            sizes,
            mode: match mode {
                BindMode::ZeroCopy => BindFlags::XDP_ZEROCOPY,
                BindMode::Copy => BindFlags::XDP_COPY,
            },
            tx_wakeups: 0,
            wakeup_time: crate::latency::new_histogram(),
        };
        for &(id, p) in ports {
            if p.role != PortRole::Host {
                set.add_port(id, p)?;
            }
        }
        Ok(set)
    }

    /// Whether `f` is one of this set's frames.
    pub fn owns(&self, f: &OwnedFrame) -> bool {
        f.set == self.id
    }

    /// Whether port index `port` has a socket in this set.
    pub fn has_socket(&self, port: usize) -> bool {
        self.ports.get(port).is_some_and(Option::is_some)
    }

    /// One past the highest `PortId` this set has held a socket for.
    pub fn port_slots(&self) -> usize {
        self.ports.len()
    }

    fn socket(&self, id: PortId) -> Option<&PortSocket> {
        self.ports.get(usize::from(id.0)).and_then(Option::as_ref)
    }

    /// Port `id`'s socket fd, if it has one here.
    pub fn fd(&self, id: PortId) -> Option<RawFd> {
        self.socket(id).map(PortSocket::fd)
    }

    /// Whether port `id`'s socket is bound in copy mode.
    pub fn copy_mode(&self, id: PortId) -> bool {
        self.socket(id).is_some_and(|p| p.copy_mode)
    }

    /// The sockets' fds, for poll(2).
    pub fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.ports.iter().flatten().map(PortSocket::fd)
    }

    /// Per socket: bound in copy mode (else zero-copy).
    pub fn copy_modes(&self) -> impl Iterator<Item = bool> + '_ {
        self.ports.iter().flatten().map(|p| p.copy_mode)
    }

    /// Opens a socket on `port`'s queue as port `id` and gives it fill
    /// frames. Returns its fd for the XSKMAP.
    pub fn add_port(&mut self, id: PortId, port: &Port) -> Result<RawFd, XskError> {
        let err = |reason: String| XskError::Socket {
            iface: port.name.clone(),
            queue: self.queue,
            reason,
        };
        let q = |n: u32| QueueSize::new(n).map_err(|e| XskError::Config(e.to_string()));
        let pod = port.role == PortRole::Pod;
        let ring = if pod {
            POD_RING.min(self.sizes.rx)
        } else {
            self.sizes.rx
        };
        let cfg = SocketConfig::builder()
            .rx_queue_size(q(ring)?)
            .tx_queue_size(q(ring)?)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(BindFlags::XDP_USE_NEED_WAKEUP | self.mode)
            .build();
        let name: Interface = port.name.parse().map_err(|e| err(format!("{e:?}")))?;
        // SAFETY: INHIBIT_PROG_LOAD is set, which is what `Socket::new`
        // requires when a UMEM is shared across (interface, queue) pairs;
        // each pair here is bound once (a removed port's socket is closed
        // before its interface could come back).
        let (tx, rx, rings) =
            unsafe { Socket::new(cfg, &self.umem, &name, self.queue) }.map_err(|e| err(e.to_string()))?;
        let (fill, comp) = rings.ok_or_else(|| err("the queue is already bound by this UMEM".into()))?;
        let new = PortSocket {
            tx,
            rx,
            fill,
            comp,
            in_fill: 0,
            fill_target: if pod {
                POD_RING.min(self.sizes.fill) as usize
            } else {
                self.sizes.fill as usize
            },
            in_tx: 0,
            copy_mode: self.mode.contains(BindFlags::XDP_COPY),
            tx_budget: COPY_MODE_TX_BUDGET,
            tx_ring: ring,
        };
        let fd = new.fd();
        let mut new = new;
        if new.copy_mode {
            // One `sendto` for a whole TX ring where the kernel allows it.
            new.tx_budget = raise_tx_budget(fd, ring);
        }
        let index = usize::from(id.0);
        if index >= self.ports.len() {
            self.ports.resize_with(index + 1, || None);
        }
        self.ports[index] = Some(new);
        self.refill();
        Ok(fd)
    }

    /// Closes port `index` and takes back every frame lent to its rings.
    /// Transmissions under way get a moment to complete first (bounded), so
    /// their packets go out; closing the socket then ends the kernel's use
    /// of its fill and TX rings (in copy mode a sent frame's bytes were
    /// copied at send time; a zero-copy driver stops the queue's DMA when
    /// the socket unbinds), and the frames still placed there return to
    /// the pool. Returns how many frames came back.
    pub fn remove_port(&mut self, id: PortId) -> usize {
        let index = usize::from(id.0);
        let Some(mut p) = self.ports.get_mut(index).and_then(Option::take) else {
            return 0;
        };
        let deadline = Instant::now() + Duration::from_millis(100);
        while p.in_tx > 0 && Instant::now() < deadline {
            let n = Self::completions(&mut p, &mut self.scratch);
            self.settle_completed(n);
            if n == 0 {
                let _ = p.tx.wakeup();
                std::thread::yield_now();
            }
        }
        drop(p);
        let mut returned = 0;
        for (i, place) in self.place.iter_mut().enumerate() {
            if matches!(*place, Place::Fill(q) | Place::Tx(q) if usize::from(q) == index) {
                *place = Place::Free;
                self.free.push(self.pristine[i]);
                returned += 1;
            }
        }
        returned
    }

    pub fn account(&self) -> FrameAccount {
        let mut a = FrameAccount {
            total: self.place.len(),
            ..FrameAccount::default()
        };
        for p in &self.place {
            match p {
                Place::Free => a.free += 1,
                Place::Fill(_) => a.in_fill += 1,
                Place::Tx(_) => a.in_tx += 1,
                Place::Held => a.held += 1,
            }
        }
        a
    }

    /// The index of the frame `desc` points into.
    fn index(desc: &FrameDesc) -> usize {
        desc.addr() / FRAME_SIZE as usize
    }

    fn set_place(&mut self, desc: &FrameDesc, to: Place) {
        if let Some(p) = self.place.get_mut(Self::index(desc)) {
            *p = to;
        }
    }

    /// Gives free frames to every fill ring below its share; wakes the
    /// kernel only if the ring asks for it.
    pub fn refill(&mut self) {
        for (index, p) in self.ports.iter_mut().enumerate() {
            let Some(p) = p else { continue };
            let want = p.fill_target.saturating_sub(p.in_fill).min(self.free.len());
            let n = p.fill.nb_free(want as u32) as usize;
            let n = n.min(want);
            if n == 0 {
                continue;
            }
            let from = self.free.len() - n;
            // SAFETY: frames on the free list belong to this UMEM and are
            // held by no ring and no one else; after this call they belong
            // to the kernel until they come back through an RX ring.
            let done = unsafe { p.fill.produce(&self.free[from..]) };
            if done > 0 {
                p.in_fill += done;
                for d in self.free.drain(from..from + done) {
                    if let Some(place) = self.place.get_mut(Self::index(&d)) {
                        *place = Place::Fill(index as u16);
                    }
                }
            }
            if p.fill.needs_wakeup() {
                let _ = p.fill.wakeup(p.rx.fd_mut(), 0);
            }
        }
    }

    /// Takes up to `max` received frames from `port` (no syscall) into
    /// `out`; returns how many.
    pub fn receive(&mut self, port: usize, out: &mut Vec<OwnedFrame>, max: usize) -> usize {
        let Some(p) = self.ports.get_mut(port).and_then(Option::as_mut) else {
            return 0;
        };
        let max = max.min(self.scratch.len());
        // SAFETY: the descriptors the RX ring returns are frames of this
        // UMEM the kernel has finished writing; from now on only the
        // `OwnedFrame` made for each holds them.
        let n = unsafe { p.rx.consume(&mut self.scratch[..max]) };
        p.in_fill = p.in_fill.saturating_sub(n);
        for i in 0..n {
            let desc = self.scratch[i];
            if let Some(place) = self.place.get_mut(Self::index(&desc)) {
                *place = Place::Held;
            }
            out.push(OwnedFrame { desc, set: self.id });
        }
        n
    }

    /// Panics on a frame of another set: writing through it would touch a
    /// UMEM it does not belong to.
    fn check(&self, f: &OwnedFrame) {
        assert_eq!(f.set, self.id, "a frame of another worker's UMEM");
    }

    /// The frame as one buffer: the XDP headroom in front of the packet,
    /// the packet, and the rest of the frame. Returns the buffer and the
    /// packet's offset and length in it.
    pub fn frame_mut<'a>(&'a mut self, f: &'a mut OwnedFrame) -> (&'a mut [u8], usize, usize) {
        self.check(f);
        let desc = &mut f.desc;
        let headroom = desc.addr() % FRAME_SIZE as usize;
        // SAFETY: `f` is an `OwnedFrame` of this set, so its descriptor is a
        // frame of this UMEM that neither the kernel nor any other
        // `OwnedFrame` refers to.
        let mut data = unsafe { self.umem.data_mut(desc) };
        let len = data.contents().len();
        let cap = data.cursor().buf_len();
        let start = data.contents_mut().as_mut_ptr();
        // SAFETY: with a zero user headroom xsk-rs lays each frame out as
        // [XDP headroom][data], frame-aligned, so the `headroom` bytes before
        // the data and the `cap` bytes from it are exactly this frame's
        // FRAME_SIZE bytes: in bounds of the UMEM and owned through `f` as
        // above. `data` (the only other view) is no longer used.
        let buf = unsafe { std::slice::from_raw_parts_mut(start.sub(headroom), headroom + cap) };
        (buf, headroom, len)
    }

    /// Makes the frame's packet the `len` bytes at `offset` of its buffer.
    /// The descriptor's start is fixed by xsk-rs, so a packet that grew or
    /// shrank at the front (VXLAN encap/decap) is moved back to it. False
    /// (nothing changed) if it would not fit there: the caller drops it.
    pub fn set_packet(&mut self, f: &mut OwnedFrame, offset: usize, len: usize) -> bool {
        let headroom = f.desc.addr() % FRAME_SIZE as usize;
        if offset != headroom {
            let (buf, _, _) = self.frame_mut(f);
            if offset + len > buf.len() || headroom + len > buf.len() {
                return false;
            }
            buf.copy_within(offset..offset + len, headroom);
        }
        self.check(f);
        // SAFETY: as in `frame_mut`.
        let mut data = unsafe { self.umem.data_mut(&mut f.desc) };
        data.cursor().set_pos(len);
        true
    }

    /// A free frame for a packet that does not arrive through a socket (from
    /// the node's TUN device). Only while the fill rings have what they
    /// need, so the TUN device never starves a port.
    pub fn take_free(&mut self) -> Option<OwnedFrame> {
        let wanted: usize = self
            .ports
            .iter()
            .flatten()
            .map(|p| p.fill_target.saturating_sub(p.in_fill))
            .sum();
        if self.free.len() <= wanted {
            return None;
        }
        let desc = self.free.pop()?;
        self.set_place(&desc, Place::Held);
        Some(OwnedFrame { desc, set: self.id })
    }

    /// Any free frame, for a packet copied in from the worker's other set
    /// on its way to one of this set's TX rings. Unlike `take_free` it does
    /// not wait for the fill rings: the frame comes back when its send
    /// completes, as the frame it stands in for would have.
    pub fn take_for_tx(&mut self) -> Option<OwnedFrame> {
        let desc = self.free.pop()?;
        self.set_place(&desc, Place::Held);
        Some(OwnedFrame { desc, set: self.id })
    }

    /// Gives back a frame that will not be sent.
    pub fn release(&mut self, f: OwnedFrame) {
        self.check(&f);
        self.set_place(&f.desc, Place::Free);
        self.free.push(f.desc);
    }

    /// Queues `frames` (all of them taken) for transmission on `port` as
    /// far as its TX ring has room; returns how many did not fit (those
    /// are released and should be counted as drops). Wakes the kernel,
    /// which copy mode needs for every batch.
    pub fn transmit(&mut self, port: usize, frames: &mut Vec<OwnedFrame>) -> usize {
        if frames.is_empty() {
            return 0;
        }
        for f in frames.iter() {
            self.check(f);
        }
        let mut descs = std::mem::take(&mut self.tx_descs);
        descs.clear();
        descs.extend(frames.drain(..).map(|f| f.desc));
        let sent = match self.ports.get_mut(port).and_then(Option::as_mut) {
            None => 0,
            Some(p) => {
                let room = p.tx.nb_free(descs.len() as u32) as usize;
                let n = room.min(descs.len());
                // SAFETY: the frames came from `OwnedFrame`s of this set,
                // which `drain` consumed: nothing else refers to them, and
                // from now on the kernel owns them until the completion ring
                // returns them.
                let sent = unsafe { p.tx.produce(&descs[..n]) };
                p.in_tx += sent;
                if p.copy_mode {
                    // One wakeup sends at most `tx_budget` frames.
                    for _ in 0..sent.div_ceil(p.tx_budget) {
                        let _ = timed(&mut self.wakeup_time, || p.tx.wakeup());
                        self.tx_wakeups += 1;
                    }
                } else if sent > 0 && p.tx.needs_wakeup() {
                    let _ = timed(&mut self.wakeup_time, || p.tx.wakeup());
                    self.tx_wakeups += 1;
                }
                sent
            }
        };
        for (k, d) in descs.iter().enumerate() {
            if let Some(place) = self.place.get_mut(Self::index(d)) {
                *place = if k < sent { Place::Tx(port as u16) } else { Place::Free };
            }
        }
        self.free.extend_from_slice(&descs[sent..]);
        let unsent = descs.len() - sent;
        self.tx_descs = descs;
        unsent
    }

    /// Reads `p`'s completion ring into `scratch`; returns how many.
    fn completions(p: &mut PortSocket, scratch: &mut [FrameDesc]) -> usize {
        // SAFETY: the completion ring returns frames of this UMEM the
        // kernel has finished sending; nothing else refers to them.
        let n = unsafe { p.comp.consume(scratch) };
        p.in_tx = p.in_tx.saturating_sub(n);
        n
    }

    /// The first `n` frames of `scratch` completed: free again.
    fn settle_completed(&mut self, n: usize) {
        for i in 0..n {
            let d = self.scratch[i];
            if let Some(place) = self.place.get_mut(Self::index(&d)) {
                *place = Place::Free;
            }
            self.free.push(d);
        }
    }

    /// Moves completed TX frames of every port back to the free list;
    /// returns how many.
    pub fn complete(&mut self) -> usize {
        let mut total = 0;
        for index in 0..self.ports.len() {
            let Some(p) = self.ports[index].as_mut().filter(|p| p.in_tx > 0) else {
                continue;
            };
            let n = Self::completions(p, &mut self.scratch);
            // Frames sent but not completed need no wakeup: only those the
            // kernel has not taken off the TX ring yet (a wakeup that hit
            // its budget or found the device busy).
            if p.in_tx > 0 && p.tx.needs_wakeup() && p.tx.nb_free_exact() < p.tx_ring {
                let _ = timed(&mut self.wakeup_time, || p.tx.wakeup());
                self.tx_wakeups += 1;
            }
            self.settle_completed(n);
            total += n;
        }
        total
    }

    /// The kernel's drop counters for these sockets, summed (one
    /// getsockopt per port: call it at report time, not per batch).
    pub fn kernel_drops(&self) -> KernelDrops {
        let mut d = KernelDrops::default();
        for p in self.ports.iter().flatten() {
            if let Ok(s) = p.rx.fd().xdp_statistics() {
                d.rx_dropped += s.rx_dropped();
                d.rx_ring_full += s.rx_ring_full();
                d.fill_ring_empty += s.rx_fill_ring_empty_descs();
                d.invalid_descs += s.rx_invalid_descs() + s.tx_invalid_descs();
            }
        }
        d
    }

    /// Frames still lent to the kernel for transmission.
    pub fn in_flight(&self) -> usize {
        self.ports.iter().flatten().map(|p| p.in_tx).sum()
    }
}
