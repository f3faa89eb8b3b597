//! A pinned worker thread: batch RX from queue `q` of every port -> engine
//! -> batch TX, on its sockets (one UMEM, or two: see `sockets`). No syscall per packet on the ports: RX and
//! completion rings are read without one, TX costs a wakeup per port per
//! batch (per 32 frames in copy mode, the kernel's budget per wakeup), and
//! an idle worker sleeps in poll(2) instead of spinning. The node's own
//! traffic through the TUN device (light by nature) costs a read or write
//! per packet. Ports are added and removed between batches, on command.
//!
//! Latency is recorded **per batch**: from the moment the batch's RX ring
//! was read to the moment its last TX ring was submitted, counted once for
//! each packet of the batch (so percentiles are over packets, and each
//! packet's true RX->TX-submit time is at most the recorded value).
//! Counters and the histogram are the worker's own and are folded into a
//! shared report every `REPORT_EVERY`, so the hot path shares nothing.

use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dataplane::addr::PortId;
use dataplane::flow::FlowState;
use dataplane::{Frame, Reader, Stats, Time, Verdict};
use hdrhistogram::Histogram;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::latency::{self, PartTimes, Sampler};
use crate::ports::Port;
use crate::sockets::WorkerSockets;
use crate::tun::{HostTun, L2_LEN};
use crate::xsk::{FrameAccount, KernelDrops, OwnedFrame, XskError};

const REPORT_EVERY: Duration = Duration::from_millis(100);
/// Empty polls of the rings before the worker sleeps in poll(2).
const SPINS_BEFORE_SLEEP: u32 = 256;
const SLEEP_MS: u8 = 10;

/// Counters of the runtime itself (the engine's are in `Stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuntimeCounters {
    pub batches: u64,
    /// Frames dropped because the egress TX ring was full.
    pub tx_ring_full: u64,
    /// Frames the engine handed back to the kernel (`Verdict::Pass`) after
    /// the XDP program had already steered them to kxp: userspace has no way
    /// to re-inject them, so they are dropped and counted. The steering
    /// program is kept precise so that this stays zero.
    pub kernel_return_dropped: u64,
    /// Times the worker went to sleep in poll(2).
    pub sleeps: u64,
    /// Frames that grew past their UMEM frame (encap of a near-jumbo).
    pub oversized: u64,
    /// Packets for the node's own stack its TUN device would not take.
    pub host_dropped: u64,
    /// Frames copied between the worker's two UMEMs (zero-copy uplink,
    /// copy-mode pods).
    pub umem_copies: u64,
    /// Frames dropped because the other UMEM had no free frame to copy
    /// into.
    pub umem_copy_no_frame: u64,
    /// TX wakeups (`sendto` syscalls) made.
    pub tx_wakeups: u64,
}

/// What one worker has done so far.
#[derive(Clone, Debug)]
pub struct WorkerReport {
    pub queue: u32,
    pub core: Option<usize>,
    pub stats: Stats,
    pub runtime: RuntimeCounters,
    /// Nanoseconds from RX to TX submit, one sample per packet.
    pub latency: Histogram<u64>,
    /// That time and the idle time, part by part (see `latency`).
    pub parts: PartTimes,
    pub frames: FrameAccount,
    /// The kernel's side: frames it could not give this worker.
    pub kernel: KernelDrops,
    /// Per socket: bound in copy mode (else zero-copy).
    pub copy_mode: Vec<bool>,
    /// The worker's UMEMs: 1, or 2 with pods apart from the uplink.
    pub umems: usize,
    pub running: bool,
}

impl WorkerReport {
    fn new(queue: u32, core: Option<usize>) -> Self {
        WorkerReport {
            queue,
            core,
            stats: Stats::default(),
            runtime: RuntimeCounters::default(),
            latency: new_histogram(),
            parts: PartTimes::default(),
            frames: FrameAccount::default(),
            kernel: KernelDrops::default(),
            copy_mode: Vec::new(),
            umems: 0,
            running: true,
        }
    }
}

pub use crate::latency::new_histogram;

pub struct WorkerHandle {
    pub report: Arc<Mutex<WorkerReport>>,
    commands: mpsc::Sender<Command>,
    queue: u32,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Has the worker open a socket for `port` as port `id`, between
    /// batches (within REPORT_EVERY); returns the socket's fd for the
    /// XSKMAP.
    pub fn add_port(&self, id: PortId, port: Port) -> Result<RawFd, XskError> {
        let (reply, answer) = mpsc::channel();
        let gone = || XskError::Socket {
            iface: port.name.clone(),
            queue: self.queue,
            reason: "the worker has stopped".into(),
        };
        self.commands
            .send(Command::AddPort {
                id,
                port: port.clone(),
                reply,
            })
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }

    /// Closes port `id` on the worker; returns the frames that came back
    /// from its rings.
    pub fn remove_port(&self, id: PortId) -> usize {
        let (reply, answer) = mpsc::channel();
        if self.commands.send(Command::RemovePort { id, reply }).is_err() {
            return 0;
        }
        answer.recv().unwrap_or(0)
    }

    pub fn snapshot(&self) -> WorkerReport {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the worker, waits until its TX rings are drained (bounded) and
    /// returns its last report.
    pub fn stop(mut self) -> WorkerReport {
        self.halt();
        self.snapshot()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Puts the calling thread under SCHED_FIFO at `priority`: it then runs
/// before every normal task on its core, instead of waiting for the
/// scheduler's turn (it still sleeps when idle, and the kernel's real-time
/// throttling keeps 5 % of each second for others).
fn real_time(priority: u8) -> std::io::Result<()> {
    let param = nix::libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: sched_setscheduler reads the `sched_param` at the pointer,
    // which points at `param`, alive for the call; pid 0 is the calling
    // thread.
    let rc = unsafe { nix::libc::sched_setscheduler(0, nix::libc::SCHED_FIFO, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// CLOCK_MONOTONIC in nanoseconds (vDSO, no syscall): one clock for all
/// workers, since conntrack entries are shared.
pub fn monotonic() -> Time {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => Time(ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64),
        // CLOCK_MONOTONIC cannot fail on Linux; keep the engine's clock still.
        Err(_) => Time::ZERO,
    }
}

pub struct WorkerSpec {
    pub queue: u32,
    pub core: Option<usize>,
    /// SCHED_FIFO priority (1-99); `None`: the normal scheduler.
    pub priority: Option<u8>,
    pub batch: usize,
    /// The node's TUN device, served by one worker.
    pub host: Option<HostPort>,
}

pub fn spawn(
    spec: WorkerSpec,
    set: WorkerSockets,
    reader: Reader,
    flows: Arc<FlowState>,
) -> std::io::Result<WorkerHandle> {
    let report = Arc::new(Mutex::new(WorkerReport::new(spec.queue, spec.core)));
    let stop = Arc::new(AtomicBool::new(false));
    let (commands, inbox) = mpsc::channel();
    let (r, s) = (report.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name(format!("kxp-worker-{}", spec.queue))
        .spawn(move || {
            if let Some(core) = spec.core {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                    tracing::warn!(core, "cannot pin worker to core; running unpinned");
                }
            }
            if let Some(priority) = spec.priority {
                if let Err(e) = real_time(priority) {
                    tracing::warn!(priority, error = %e, "cannot run the worker SCHED_FIFO; running normally");
                }
            }
            let worker = std::panic::AssertUnwindSafe(|| {
                run(
                    spec.batch,
                    set,
                    reader,
                    dataplane::Worker::new(flows),
                    &r,
                    &s,
                    inbox,
                    spec.host,
                )
            });
            if std::panic::catch_unwind(worker).is_err() {
                // A worker that died would leave its queue to XDP_PASS, the
                // services unserved while kxp looks healthy. Better to end
                // the process, so its supervisor restarts it; the programs
                // go with it.
                tracing::error!(queue = spec.queue, "worker panicked; aborting kxp");
                std::process::abort();
            }
        })?;
    Ok(WorkerHandle {
        report,
        commands,
        queue: spec.queue,
        stop,
        thread: Some(thread),
    })
}

/// A change to a running worker's ports, answered on `reply`.
pub enum Command {
    /// Open a socket for `port` as port `id`; replies with its fd for the
    /// XSKMAP.
    AddPort {
        id: PortId,
        port: Port,
        reply: mpsc::Sender<Result<RawFd, XskError>>,
    },
    /// Close port `id`'s socket and take its frames back; replies with how
    /// many came back from its rings.
    RemovePort { id: PortId, reply: mpsc::Sender<usize> },
}

fn apply(set: &mut WorkerSockets, cmd: Command) {
    match cmd {
        Command::AddPort { id, port, reply } => {
            let _ = reply.send(set.add_port(id, &port));
        }
        Command::RemovePort { id, reply } => {
            let _ = reply.send(set.remove_port(id));
        }
    }
}

/// Where a worker sends frames the engine routes to the node's own stack.
pub struct HostPort {
    pub tun: Arc<HostTun>,
    pub id: PortId,
}

/// Runs one received frame through the engine and puts it where the
/// verdict says: a TX batch, the node's TUN device, or back on the free
/// list.
#[allow(clippy::too_many_arguments)]
fn forward(
    set: &mut WorkerSockets,
    engine: &mut dataplane::Worker,
    now: Time,
    tables: &dataplane::Tables,
    ingress: usize,
    mut desc: OwnedFrame,
    out: &mut [Vec<OwnedFrame>],
    host: Option<&HostPort>,
    counters: &mut RuntimeCounters,
    timing: &mut EngineTiming,
) {
    let from = set.set_index(&desc);
    let frames = set.set(from);
    let (buf, off, len) = frames.frame_mut(&mut desc);
    let mut frame = Frame::new(buf, off, len);
    let ingress = PortId(ingress as u16);
    let verdict = timing
        .sampler
        .time(&mut timing.engine, || engine.process(now, tables, ingress, &mut frame));
    match verdict {
        Verdict::Tx(q) if host.is_some_and(|h| h.id == q) => {
            // Into the node's stack: the IP packet, without the Ethernet
            // header the engine wrote.
            let sent = frame.len() > L2_LEN && host.is_some_and(|h| h.tun.write(&frame.data()[L2_LEN..]));
            if !sent {
                counters.host_dropped += 1;
            }
            frames.release(desc);
        }
        Verdict::Tx(PortId(q)) if usize::from(q) < out.len() => {
            let (off, len) = (frame.headroom(), frame.len());
            if !frames.set_packet(&mut desc, off, len) {
                counters.oversized += 1;
                frames.release(desc);
            } else if let Some(desc) = set.carry(from, usize::from(q), desc) {
                out[usize::from(q)].push(desc);
            }
        }
        Verdict::Tx(_) => frames.release(desc),
        Verdict::Pass => {
            counters.kernel_return_dropped += 1;
            frames.release(desc);
        }
        Verdict::Drop(_) => frames.release(desc),
    }
}

/// Reads up to `batch` packets the node routed into kxp's TUN device and
/// forwards them; returns how many.
#[allow(clippy::too_many_arguments)]
fn host_rx(
    set: &mut WorkerSockets,
    engine: &mut dataplane::Worker,
    now: Time,
    tables: &dataplane::Tables,
    host: &HostPort,
    batch: usize,
    out: &mut [Vec<OwnedFrame>],
    counters: &mut RuntimeCounters,
    timing: &mut EngineTiming,
) -> usize {
    let mut got = 0;
    while got < batch {
        let Some(mut desc) = set.take_free() else {
            break;
        };
        let frames = set.set(set.set_index(&desc));
        let (buf, off, _) = frames.frame_mut(&mut desc);
        let Some(n) = host.tun.read(&mut buf[off + L2_LEN..]) else {
            frames.release(desc);
            break;
        };
        if buf[off + L2_LEN] >> 4 != 4 {
            // The node's IPv6 chatter on a new device (router solicitations,
            // MLD): not kxp's, and nowhere to go.
            frames.release(desc);
            continue;
        }
        // An Ethernet header so the engine sees a frame like any port's.
        buf[off..off + 12].fill(0);
        buf[off + 12..off + 14].copy_from_slice(&0x0800u16.to_be_bytes());
        frames.set_packet(&mut desc, off, L2_LEN + n);
        got += 1;
        let ingress = usize::from(host.id.0);
        forward(
            set,
            engine,
            now,
            tables,
            ingress,
            desc,
            out,
            Some(host),
            counters,
            timing,
        );
    }
    got
}

/// Passes between reads of the TUN device (each read is a syscall).
const HOST_EVERY: u32 = 8;

#[allow(clippy::too_many_arguments)]
fn run(
    batch: usize,
    mut set: WorkerSockets,
    reader: Reader,
    mut engine: dataplane::Worker,
    shared: &Mutex<WorkerReport>,
    stop: &AtomicBool,
    commands: mpsc::Receiver<Command>,
    host: Option<HostPort>,
) {
    let mut nports = set.port_slots();
    let mut rx: Vec<OwnedFrame> = Vec::with_capacity(batch);
    let mut out: Vec<Vec<OwnedFrame>> = (0..nports).map(|_| Vec::with_capacity(batch)).collect();
    let mut counters = RuntimeCounters::default();
    let mut latency = new_histogram();
    let mut timing = EngineTiming::default();
    let mut sleep_time = new_histogram();
    let mut last_report = monotonic();
    let mut idle = 0u32;
    let mut pass = 0u32;
    while !stop.load(Ordering::Relaxed) {
        // One clock read per pass (two when packets moved): in a VM the
        // vDSO clock costs tens of nanoseconds.
        let now = monotonic();
        let tables = reader.load();
        let mut got = 0;
        for port in 0..nports {
            got += set.receive(port, &mut rx, batch);
            for frame in rx.drain(..) {
                forward(
                    &mut set,
                    &mut engine,
                    now,
                    &tables,
                    port,
                    frame,
                    &mut out,
                    host.as_ref(),
                    &mut counters,
                    &mut timing,
                );
            }
        }
        pass = pass.wrapping_add(1);
        if let Some(h) = host.as_ref().filter(|_| pass % HOST_EVERY == 0) {
            got += host_rx(
                &mut set,
                &mut engine,
                now,
                &tables,
                h,
                batch,
                &mut out,
                &mut counters,
                &mut timing,
            );
        }
        drop(tables);
        for (port, frames) in out.iter_mut().enumerate() {
            counters.tx_ring_full += set.transmit(port, frames) as u64;
        }
        set.complete();
        set.refill();
        if got > 0 {
            counters.batches += 1;
            let submitted = monotonic();
            latency.saturating_record_n(submitted.since(now).as_nanos() as u64, got as u64);
            idle = 0;
        } else if set.in_flight() == 0 {
            idle += 1;
            if idle >= SPINS_BEFORE_SLEEP {
                counters.sleeps += 1;
                latency::timed(&mut sleep_time, || sleep_until_readable(&set, host.as_ref()));
                idle = 0;
                pass = 0; // read the TUN device right after waking
            }
        }
        if now.since(last_report) >= REPORT_EVERY {
            // Ports come and go between batches, never inside one.
            while let Ok(cmd) = commands.try_recv() {
                apply(&mut set, cmd);
            }
            if set.port_slots() != nports {
                nports = set.port_slots();
                out.resize_with(nports, || Vec::with_capacity(batch));
            }
            engine.housekeeping(now);
            let mut parts = PartTimes {
                engine: std::mem::replace(&mut timing.engine, new_histogram()),
                sleep: std::mem::replace(&mut sleep_time, new_histogram()),
                tx_wakeup: new_histogram(),
            };
            set.take_wakeup_times(&mut parts.tx_wakeup);
            publish(shared, &engine, &counters, &mut latency, &parts, &set, true);
            last_report = now;
        }
    }
    // Shutdown: let the kernel finish what is on the TX rings (bounded), so
    // the final account shows every frame back home.
    let deadline = Instant::now() + Duration::from_secs(1);
    while set.in_flight() > 0 && Instant::now() < deadline {
        set.complete();
        std::thread::yield_now();
    }
    let mut parts = PartTimes {
        engine: timing.engine,
        sleep: sleep_time,
        tx_wakeup: new_histogram(),
    };
    set.take_wakeup_times(&mut parts.tx_wakeup);
    publish(shared, &engine, &counters, &mut latency, &parts, &set, false);
}

/// The engine's sampled timing (see `latency`).
struct EngineTiming {
    sampler: Sampler,
    engine: Histogram<u64>,
}

impl Default for EngineTiming {
    fn default() -> Self {
        EngineTiming {
            sampler: Sampler::default(),
            engine: new_histogram(),
        }
    }
}

fn publish(
    shared: &Mutex<WorkerReport>,
    engine: &dataplane::Worker,
    counters: &RuntimeCounters,
    latency: &mut Histogram<u64>,
    parts: &PartTimes,
    set: &WorkerSockets,
    running: bool,
) {
    let mut r = shared.lock().unwrap_or_else(|e| e.into_inner());
    r.stats = engine.stats.clone();
    r.runtime = RuntimeCounters {
        umem_copies: set.carried,
        umem_copy_no_frame: set.carry_no_frame,
        tx_wakeups: set.tx_wakeups(),
        ..*counters
    };
    let _ = r.latency.add(&*latency);
    latency.reset();
    r.parts.add(parts);
    r.frames = set.account();
    r.kernel = set.kernel_drops();
    r.copy_mode = set.copy_modes();
    r.umems = set.umems();
    r.running = running;
}

/// Sleeps until a port (or the node's TUN device) has frames to receive, or
/// SLEEP_MS.
fn sleep_until_readable(set: &WorkerSockets, host: Option<&HostPort>) {
    let fds = set.fds().into_iter().chain(host.map(|h| h.tun.fd()));
    let mut polled: Vec<PollFd> = fds
        // SAFETY: the fds belong to sockets `set` owns and to the TUN device
        // `host` holds, all of which outlive this call; poll(2) only reads
        // them.
        .map(|fd| PollFd::new(unsafe { BorrowedFd::borrow_raw(fd) }, PollFlags::POLLIN))
        .collect();
    let _ = nix::poll::poll(&mut polled, PollTimeout::from(SLEEP_MS));
}
