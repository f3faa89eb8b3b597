//! One worker's sockets, in one UMEM or two.
//!
//! Sockets that share a UMEM share its bind mode, and pod veths have no
//! zero-copy (no kernel offers it on veth). So when the uplink's NIC binds
//! zero-copy, the uplink (and the node's TUN device, which has no socket
//! but takes its frames from a set) get a zero-copy UMEM of their own and
//! every pod socket joins a second, copy-mode UMEM, now or whenever the pod
//! appears. A frame crossing from one UMEM to the other is copied into a
//! frame of its egress set (`carry`); a frame staying in its set moves
//! without a copy. When the uplink binds in copy mode anyway, all sockets
//! share one UMEM and nothing is ever copied in userspace.
//!
//! `UmemLayout::Split` forces the two UMEMs in copy mode: the lab (veths
//! only) exercises and measures the two-UMEM path with it.

use std::os::fd::RawFd;

use dataplane::addr::PortId;
use dataplane::tables::PortRole;

use crate::ports::{Port, PortTable};
use crate::xsk::{
    frames_for, BindMode, FrameAccount, KernelDrops, OwnedFrame, RingSizes, XskError, XskSet, SPARE_POD_PORTS,
};

/// How a worker's sockets share UMEMs (see the module comment).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UmemLayout {
    /// One UMEM, unless the uplink binds zero-copy: then pods get a
    /// copy-mode UMEM of their own.
    #[default]
    Auto,
    /// Pods in a UMEM of their own whatever the uplink's mode.
    Split,
}

/// Which of a worker's sets a socket joins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    /// The uplink's set (and the TUN device's frames).
    Uplink,
    /// The pods' own copy-mode set, when there is one.
    Pods,
}

/// What the sets of a worker are to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub uplink_mode: BindMode,
    /// Whether pods get their own copy-mode set.
    pub pods_apart: bool,
    /// Frames for the uplink's set and for the pods' set (0 when none).
    pub frames: [usize; 2],
}

impl Plan {
    /// The grouping decision: a pod socket never joins a zero-copy UMEM.
    pub fn new(ports: &PortTable, sizes: RingSizes, layout: UmemLayout, uplink_mode: BindMode) -> Plan {
        let pods_apart = uplink_mode == BindMode::ZeroCopy || layout == UmemLayout::Split;
        let mut plan = Plan {
            uplink_mode,
            pods_apart,
            frames: [0, 0],
        };
        // The pods' set has room for pods that arrive later.
        let spare = SPARE_POD_PORTS * frames_for(PortRole::Pod, sizes);
        plan.frames[plan.index(Group::Pods)] += spare;
        for (_, p) in ports.iter() {
            plan.frames[plan.index(plan.group(p.role))] += frames_for(p.role, sizes);
        }
        plan
    }

    pub fn group(&self, role: PortRole) -> Group {
        match role {
            PortRole::Pod if self.pods_apart => Group::Pods,
            _ => Group::Uplink,
        }
    }

    /// The index of `group`'s set (the pods share the uplink's set unless
    /// apart).
    fn index(&self, group: Group) -> usize {
        usize::from(group == Group::Pods && self.pods_apart)
    }

    /// The mode of `group`'s set.
    pub fn mode(&self, group: Group) -> BindMode {
        self.set_mode(self.index(group))
    }

    /// The mode of set `index`: the pods' own set is always copy mode.
    fn set_mode(&self, index: usize) -> BindMode {
        match index {
            0 => self.uplink_mode,
            _ => BindMode::Copy,
        }
    }
}

/// A worker's sets: `[uplink's]` or `[uplink's, pods']`.
pub struct WorkerSockets {
    sets: Vec<XskSet>,
    plan: Plan,
    /// Frames copied from one set into the other.
    pub carried: u64,
    /// Frames dropped because the egress set had no free frame to copy
    /// into.
    pub carry_no_frame: u64,
}

impl WorkerSockets {
    /// Opens queue `queue` of every port in `ports` (the TUN device has no
    /// socket). With `zero_copy` the uplink's set is tried in zero-copy
    /// mode first, and falls back to copy mode where the driver has none
    /// (veth: EOPNOTSUPP).
    pub fn open(
        ports: &PortTable,
        queue: u32,
        sizes: RingSizes,
        zero_copy: bool,
        layout: UmemLayout,
    ) -> Result<WorkerSockets, XskError> {
        if zero_copy {
            let plan = Plan::new(ports, sizes, layout, BindMode::ZeroCopy);
            match Self::open_as(ports, queue, sizes, plan) {
                Ok(s) => return Ok(s),
                Err(e) => tracing::debug!(queue, error = %e, "no zero-copy on the uplink; using copy mode"),
            }
        }
        Self::open_as(ports, queue, sizes, Plan::new(ports, sizes, layout, BindMode::Copy))
    }

    fn open_as(ports: &PortTable, queue: u32, sizes: RingSizes, plan: Plan) -> Result<WorkerSockets, XskError> {
        let mut sets = Vec::with_capacity(2);
        for index in 0..=usize::from(plan.pods_apart) {
            let members: Vec<(PortId, &Port)> = ports
                .iter()
                .filter(|(_, p)| plan.index(plan.group(p.role)) == index)
                .collect();
            sets.push(XskSet::open(
                &members,
                queue,
                sizes,
                plan.set_mode(index),
                plan.frames[index],
            )?);
        }
        Ok(WorkerSockets {
            sets,
            plan,
            carried: 0,
            carry_no_frame: 0,
        })
    }

    /// The set holding port `port`'s socket (at most two to look at).
    fn set_of_port(&self, port: usize) -> Option<usize> {
        self.sets.iter().position(|s| s.has_socket(port))
    }

    /// The index of the set frame `f` is in: look it up once per frame and
    /// hand it to `set` and `carry`.
    pub fn set_index(&self, f: &OwnedFrame) -> usize {
        self.sets.iter().position(|s| s.owns(f)).unwrap_or(0)
    }

    /// Set `index` (from `set_index`); `frame_mut`, `set_packet` and
    /// `release` go through it.
    pub fn set(&mut self, index: usize) -> &mut XskSet {
        &mut self.sets[index]
    }

    /// Opens a socket for `port` as port `id` in the set its role joins.
    pub fn add_port(&mut self, id: PortId, port: &Port) -> Result<RawFd, XskError> {
        let set = self.plan.index(self.plan.group(port.role));
        self.sets[set].add_port(id, port)
    }

    /// Closes port `id`'s socket; returns the frames that came back.
    pub fn remove_port(&mut self, id: PortId) -> usize {
        match self.set_of_port(usize::from(id.0)) {
            Some(set) => self.sets[set].remove_port(id),
            None => 0,
        }
    }

    /// Port `id`'s socket fd, for the XSKMAP; `None` for a port without a
    /// socket (the TUN device).
    pub fn fd(&self, id: PortId) -> Option<RawFd> {
        self.sets[self.set_of_port(usize::from(id.0))?].fd(id)
    }

    /// Whether port `id`'s socket is bound in copy mode.
    pub fn copy_mode(&self, id: PortId) -> bool {
        self.set_of_port(usize::from(id.0))
            .is_some_and(|s| self.sets[s].copy_mode(id))
    }

    /// One past the highest `PortId` with a socket so far.
    pub fn port_slots(&self) -> usize {
        self.sets.iter().map(XskSet::port_slots).max().unwrap_or(0)
    }

    /// Takes up to `max` received frames from `port` into `out`.
    pub fn receive(&mut self, port: usize, out: &mut Vec<OwnedFrame>, max: usize) -> usize {
        match self.set_of_port(port) {
            Some(s) => self.sets[s].receive(port, out, max),
            None => 0,
        }
    }

    /// A free frame for a packet from the node's TUN device (the uplink's
    /// set: see `XskSet::take_free`).
    pub fn take_free(&mut self) -> Option<OwnedFrame> {
        self.sets[0].take_free()
    }

    /// Makes `f` (a frame of set `from`) a frame `port` can transmit:
    /// itself if `port` is in the same set, else a copy in a frame of
    /// `port`'s set (`f` is released). `None` (and `f` released) when the
    /// port is gone or its set has no free frame.
    pub fn carry(&mut self, from: usize, port: usize, mut f: OwnedFrame) -> Option<OwnedFrame> {
        let Some(to) = self.set_of_port(port) else {
            self.sets[from].release(f);
            return None;
        };
        if from == to {
            return Some(f);
        }
        let (src, dst) = if from < to {
            let (a, b) = self.sets.split_at_mut(to);
            (&mut a[from], &mut b[0])
        } else {
            let (a, b) = self.sets.split_at_mut(from);
            (&mut b[0], &mut a[to])
        };
        let Some(mut g) = dst.take_for_tx() else {
            self.carry_no_frame += 1;
            src.release(f);
            return None;
        };
        let (sbuf, soff, slen) = src.frame_mut(&mut f);
        let (dbuf, doff, _) = dst.frame_mut(&mut g);
        // Same frame size and headroom on both sides: the packet fits.
        dbuf[doff..doff + slen].copy_from_slice(&sbuf[soff..soff + slen]);
        dst.set_packet(&mut g, doff, slen);
        src.release(f);
        self.carried += 1;
        Some(g)
    }

    /// Queues `frames` (all of `port`'s set, see `carry`) on `port`'s TX
    /// ring; returns how many did not fit (released).
    pub fn transmit(&mut self, port: usize, frames: &mut Vec<OwnedFrame>) -> usize {
        if frames.is_empty() {
            return 0;
        }
        let set = self.set_of_port(port).unwrap_or(0);
        self.sets[set].transmit(port, frames)
    }

    pub fn complete(&mut self) {
        for s in &mut self.sets {
            s.complete();
        }
    }

    pub fn refill(&mut self) {
        for s in &mut self.sets {
            s.refill();
        }
    }

    /// Moves every set's TX wakeup times into `into`.
    pub fn take_wakeup_times(&mut self, into: &mut hdrhistogram::Histogram<u64>) {
        for s in &mut self.sets {
            let _ = into.add(&s.wakeup_time);
            s.wakeup_time.reset();
        }
    }

    /// TX wakeups (`sendto`) made so far, all sets.
    pub fn tx_wakeups(&self) -> u64 {
        self.sets.iter().map(|s| s.tx_wakeups).sum()
    }

    pub fn in_flight(&self) -> usize {
        self.sets.iter().map(XskSet::in_flight).sum()
    }

    /// All sets' frames, summed.
    pub fn account(&self) -> FrameAccount {
        self.sets
            .iter()
            .map(XskSet::account)
            .fold(FrameAccount::default(), |a, b| a + b)
    }

    pub fn kernel_drops(&self) -> KernelDrops {
        self.sets
            .iter()
            .map(XskSet::kernel_drops)
            .fold(KernelDrops::default(), |a, b| a + b)
    }

    pub fn fds(&self) -> Vec<RawFd> {
        self.sets.iter().flat_map(XskSet::fds).collect()
    }

    /// Per socket: bound in copy mode (else zero-copy).
    pub fn copy_modes(&self) -> Vec<bool> {
        self.sets.iter().flat_map(XskSet::copy_modes).collect()
    }

    /// How many UMEMs the worker has (1 or 2).
    pub fn umems(&self) -> usize {
        self.sets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pods: usize) -> PortTable {
        let mut t = PortTable::default();
        let mut add = |name: &str, role| {
            t.insert(Port {
                name: name.into(),
                role,
                ifindex: 1,
            })
            .unwrap();
        };
        add("eth0", PortRole::Uplink);
        for i in 0..pods {
            add(&format!("vp{i}"), PortRole::Pod);
        }
        add("kxp0", PortRole::Host);
        t
    }

    #[test]
    fn a_pod_socket_never_joins_a_zero_copy_umem() {
        let sizes = RingSizes::default();
        for pods in [0, 3] {
            for layout in [UmemLayout::Auto, UmemLayout::Split] {
                for mode in [BindMode::ZeroCopy, BindMode::Copy] {
                    let plan = Plan::new(&table(pods), sizes, layout, mode);
                    let pod_group = plan.group(PortRole::Pod);
                    assert_eq!(plan.mode(pod_group), BindMode::Copy, "{layout:?} {mode:?}");
                    assert_eq!(plan.mode(plan.group(PortRole::Uplink)), mode);
                    // Room for the pods that come later, wherever they go.
                    let pod_frames = plan.frames[plan.index(pod_group)];
                    let want = (pods + SPARE_POD_PORTS) * frames_for(PortRole::Pod, sizes);
                    assert!(pod_frames >= want, "{layout:?} {mode:?}: {pod_frames} < {want}");
                }
            }
        }
    }

    #[test]
    fn one_umem_unless_the_uplink_is_zero_copy_or_the_layout_splits() {
        let sizes = RingSizes::default();
        let t = table(2);
        let shared = Plan::new(&t, sizes, UmemLayout::Auto, BindMode::Copy);
        assert!(!shared.pods_apart);
        assert_eq!(shared.group(PortRole::Pod), Group::Uplink);
        assert_eq!(shared.frames[1], 0, "no second UMEM");
        let total = |p: &Plan| p.frames[0] + p.frames[1];
        for (layout, mode) in [
            (UmemLayout::Auto, BindMode::ZeroCopy),
            (UmemLayout::Split, BindMode::Copy),
            (UmemLayout::Split, BindMode::ZeroCopy),
        ] {
            let apart = Plan::new(&t, sizes, layout, mode);
            assert!(apart.pods_apart, "{layout:?} {mode:?}");
            assert_eq!(apart.group(PortRole::Pod), Group::Pods);
            assert_eq!(
                apart.group(PortRole::Host),
                Group::Uplink,
                "the TUN device reads into the uplink's set"
            );
            assert_eq!(
                apart.frames[0],
                frames_for(PortRole::Uplink, sizes) + frames_for(PortRole::Host, sizes)
            );
            assert_eq!(total(&apart), total(&shared), "the same frames, split");
        }
    }
}
