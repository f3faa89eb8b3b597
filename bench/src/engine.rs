//! `bench engine`: the packet engine alone, on one pinned core.
//!
//! For each table size it builds N ClusterIP services (10 endpoints each),
//! opens `--flows` TCP flows through the engine, then times each packet path
//! over pre-built frames: every iteration copies the frame into a receive
//! buffer (as a NIC would have written it) and calls `Worker::process`, with
//! the table snapshot loaded once per 64-frame batch like the runtime does.
//! The copy is included in the figures.
//!
//! Established and reply paths are timed twice: over a hot set (1,024 flows
//! cycling, as a few busy connections would) and over all live flows in
//! random order (every packet a cache miss in a 100+ MB conntrack).

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::addr::{BackendAddr, Endpoint, Mac, PortId, Proto, SvcId};
use dataplane::craft::{self, Spec, HEADROOM};
use dataplane::flow::reply_index::{ReplyIndex, WORDS_PER_BUCKET};
use dataplane::flow::{CtConfig, FlowKey, FlowState};
use dataplane::tables::{EndpointInfo, LocalPod, NodeConfig, PortInfo, PortRole, RemoteNode, ServiceSpec, Tables};
use dataplane::wire::l4::{TCP_ACK, TCP_SYN};
use dataplane::{Frame, Publisher, Reader, Time, Verdict, Worker};
use hdrhistogram::Histogram;
use runtime::latency::Sampler;
use serde_json::{json, Value};

use crate::memory;

#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Table sizes (services) to measure.
    #[arg(long, value_delimiter = ',', default_value = "10,10000,100000")]
    services: Vec<usize>,
    /// Live flows to open before timing.
    #[arg(long, default_value_t = 1_000_000)]
    flows: usize,
    /// Timed packets per path (hot paths; cold paths use one pass over all flows).
    #[arg(long, default_value_t = 4_000_000)]
    packets: usize,
    /// Skip the update-latency runs (they keep a second core busy), e.g. for
    /// profiling the packet paths under callgrind.
    #[arg(long)]
    no_updates: bool,
}

const BATCH: usize = 64;
static CORES: std::sync::OnceLock<Vec<core_affinity::CoreId>> = std::sync::OnceLock::new();
const HOT: usize = 1024;
const ENDPOINTS: u8 = 10;
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
const GW_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 254);
const UPLINK_MAC: Mac = Mac([2, 0, 0, 0, 0, 1]);
const GW_MAC: Mac = Mac([2, 0, 0, 0, 0, 0xfe]);
const REMOTE_NODES: u8 = 100;

fn pod_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, 10 + i)
}

fn pod_mac(i: u8) -> Mac {
    Mac([0x0a, 0, 0, 1, 0, i])
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i as u32)
}

fn node() -> NodeConfig {
    let mut n = NodeConfig::single_uplink("bench", NODE_IP, "192.168.0.0/24".parse().expect("cidr"), UPLINK_MAC);
    n.gateway = Some(GW_IP);
    n.vxlan.vtep_mac = Mac([0x0e, 0, 0, 0, 0, 1]);
    for i in 0..ENDPOINTS {
        n.ports.push(PortInfo {
            name: format!("veth{i}"),
            mac: Mac([2, 0, 0, 1, 0, i]),
            vlan: None,
            role: PortRole::Pod,
        });
    }
    n
}

fn service(i: usize, endpoints: u8) -> ServiceSpec {
    let mut s = ServiceSpec::cluster_ip(SvcId(i as u32), &format!("bench/svc-{i}:http"), vip(i), 80, Proto::Tcp);
    s.endpoints = (0..endpoints)
        .map(|e| EndpointInfo {
            addr: BackendAddr(Endpoint::new(pod_ip(e), 8080)),
            ready: true,
            serving: true,
            terminating: false,
            local: true,
        })
        .collect();
    if i == 0 {
        s.node_port = Some(30080);
    }
    s
}

fn tables(services: usize) -> Tables {
    let mut t = Tables::new(node());
    for i in 0..ENDPOINTS {
        t.set_local_pod(
            pod_ip(i),
            LocalPod {
                port: PortId(1 + u16::from(i)),
                mac: pod_mac(i),
            },
        );
    }
    for r in 0..REMOTE_NODES {
        let ip = Ipv4Addr::new(192, 168, 0, 2 + r);
        t.set_pod_route(
            format!("10.244.{}.0/24", 2 + u16::from(r)).parse().expect("cidr"),
            RemoteNode {
                node_ip: ip,
                vtep_mac: Mac([0x0e, 0, 0, 0, 1, r]),
            },
        );
        t.set_neighbor(ip, Mac([2, 0, 0, 0, 1, r]));
    }
    t.set_neighbor(GW_IP, GW_MAC);
    for i in 0..services {
        t.upsert_service(&service(i, ENDPOINTS)).expect("valid bench service");
    }
    t
}

/// Fixed-size frames stored back to back, each with the port it arrives on
/// (kxp checks that a pod sends from its own port).
struct Frames {
    bytes: Vec<u8>,
    size: usize,
    ports: Vec<PortId>,
    /// Every timed frame must be transmitted (false: the pass-through floor).
    forwarded: bool,
}

impl Frames {
    fn new(port: PortId, frames: impl Iterator<Item = Vec<u8>>) -> Self {
        Frames::on_ports(frames.map(|f| (port, f)))
    }

    fn on_ports(frames: impl Iterator<Item = (PortId, Vec<u8>)>) -> Self {
        let mut bytes = Vec::new();
        let mut ports = Vec::new();
        let mut size = 0;
        for (p, f) in frames {
            size = f.len();
            bytes.extend_from_slice(&f);
            ports.push(p);
        }
        Frames {
            bytes,
            size,
            ports,
            forwarded: true,
        }
    }

    fn len(&self) -> usize {
        self.bytes.len() / self.size
    }

    fn get(&self, i: usize) -> &[u8] {
        &self.bytes[i * self.size..(i + 1) * self.size]
    }
}

fn client(k: usize) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + (k / 16) as u32),
        10000 + (k % 16) as u16,
    )
}

/// Runs `count` frames chosen by `order` through the worker; returns ns/packet.
fn run_frames(
    w: &mut Worker,
    reader: &Reader,
    frames: &Frames,
    count: usize,
    order: impl FnMut(usize) -> usize,
    now: &mut Time,
) -> f64 {
    run_frames_with(w, reader, frames, count, order, now, None)
}

/// `run_frames`, with the workers' sampled engine timing when `timing` is
/// given.
fn run_frames_with(
    w: &mut Worker,
    reader: &Reader,
    frames: &Frames,
    count: usize,
    mut order: impl FnMut(usize) -> usize,
    now: &mut Time,
    mut timing: Option<&mut (Sampler, Histogram<u64>)>,
) -> f64 {
    let mut buf = vec![0u8; HEADROOM + 2048];
    let start = Instant::now();
    let mut done = 0;
    let mut not_sent = None;
    while done < count {
        let t = reader.load();
        now.0 += 1_000;
        for _ in 0..BATCH.min(count - done) {
            let i = order(done);
            let f = frames.get(i);
            buf[HEADROOM..HEADROOM + f.len()].copy_from_slice(f);
            let mut frame = Frame::new(&mut buf, HEADROOM, f.len());
            let port = frames.ports[i];
            let v = match timing.as_deref_mut() {
                // As kxp's workers run it: one packet in 64 timed.
                Some((sampler, hist)) => sampler.time(hist, || w.process(*now, &t, port, &mut frame)),
                None => w.process(*now, &t, port, &mut frame),
            };
            let v = black_box(v);
            if matches!(v, Verdict::Tx(_)) != frames.forwarded {
                not_sent = Some(v);
            }
            done += 1;
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / count as f64;
    // A path that drops is not the path it claims to time.
    if let Some(v) = not_sent {
        panic!("bench setup: a timed frame got {v:?}");
    }
    ns
}

fn path(ns: f64) -> Value {
    json!({ "ns_per_packet": round(ns, 1), "mpps": round(1000.0 / ns, 2) })
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// A permutation of 0..n (fixed seed, so runs compare).
fn shuffled(n: usize) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

fn expect_tx(v: Verdict, what: &str) -> PortId {
    match v {
        Verdict::Tx(p) => p,
        other => panic!("bench setup: {what} was not forwarded: {other:?}"),
    }
}

/// Median and max of how long a worker takes to see a published change.
fn update_latency(
    publisher: &Publisher,
    worker: Worker,
    hot: &Frames,
    change: impl Fn(&mut Tables, usize),
) -> (Value, Worker) {
    let reader = publisher.reader();
    let seen_gen = Arc::new(AtomicU64::new(0));
    let seen_at = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let base = Instant::now();
    let hot_bytes: Vec<Vec<u8>> = (0..hot.len()).map(|i| hot.get(i).to_vec()).collect();
    let ports = hot.ports.clone();
    let (g2, a2, s2) = (seen_gen.clone(), seen_at.clone(), stop.clone());
    let handle = std::thread::spawn(move || {
        let mut w = worker;
        if let Some(core) = CORES.get().and_then(|c| c.get(1).copied()) {
            core_affinity::set_for_current(core);
        }
        let mut buf = vec![0u8; HEADROOM + 2048];
        let mut now = Time::from_secs(2000);
        let mut i = 0;
        while !s2.load(Ordering::Relaxed) {
            let t = reader.load();
            if t.generation() != g2.load(Ordering::Relaxed) {
                a2.store(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
                g2.store(t.generation(), Ordering::Release);
            }
            now.0 += 1_000;
            for _ in 0..BATCH {
                let k = i % hot_bytes.len();
                let f = &hot_bytes[k];
                i += 1;
                buf[HEADROOM..HEADROOM + f.len()].copy_from_slice(f);
                let mut frame = Frame::new(&mut buf, HEADROOM, f.len());
                black_box(w.process(now, &t, ports[k], &mut frame));
            }
        }
        w
    });
    let mut samples = Vec::new();
    for r in 0..21 {
        std::thread::sleep(Duration::from_millis(2));
        let t0 = base.elapsed().as_nanos() as u64;
        let mut draft = publisher.draft();
        change(&mut draft, r);
        let g = publisher.publish(draft);
        while seen_gen.load(Ordering::Acquire) < g {
            std::hint::spin_loop();
        }
        samples.push((seen_at.load(Ordering::Relaxed).saturating_sub(t0)) as f64 / 1000.0);
    }
    stop.store(true, Ordering::Relaxed);
    let worker = handle.join().expect("bench worker thread");
    samples.sort_by(|a, b| a.total_cmp(b));
    (
        json!({ "median": round(samples[samples.len() / 2], 1), "max": round(samples[samples.len() - 1], 1) }),
        worker,
    )
}

fn measure_size(args: &Args, services: usize) -> Value {
    eprintln!("engine bench: {services} services, {} flows", args.flows);
    let before_tables = memory::live_bytes();
    let t0 = Instant::now();
    let t = tables(services);
    let build_s = t0.elapsed().as_secs_f64();
    let table_bytes = memory::live_bytes() - before_tables;
    let publisher = Publisher::new(t);
    let reader = publisher.reader();

    // Frames, built before the memory baseline so they do not count.
    let flows = args.flows;
    let syn = Frames::new(
        PortId(0),
        (0..flows).map(|k| {
            Spec::tcp(client(k), (vip(k % services), 80), TCP_SYN)
                .macs(GW_MAC, UPLINK_MAC)
                .build()
        }),
    );
    let ack = Frames::new(
        PortId(0),
        (0..flows).map(|k| {
            Spec::tcp(client(k), (vip(k % services), 80), TCP_ACK)
                .macs(GW_MAC, UPLINK_MAC)
                .build()
        }),
    );
    let cold_order = shuffled(flows);

    let before_ct = memory::live_bytes();
    let capacity = flows + flows / 7; // ~87% full at `flows`: shards fill unevenly
    let state = Arc::new(FlowState::new(CtConfig {
        capacity,
        ..CtConfig::default()
    }));
    let mut w = Worker::new(state.clone());
    let mut now = Time::from_secs(1000);

    let new_flow = run_frames(&mut w, &reader, &syn, flows, |i| i, &mut now);
    let live = state.conntrack.len();
    let ct_bytes = memory::live_bytes() - before_ct;
    assert_eq!(
        live, flows,
        "bench setup: conntrack lost flows (evictions: {})",
        w.stats.ct_evictions
    );

    // Learn each flow's backend to build its replies.
    let tables_now = reader.load();
    let mut buf = vec![0u8; HEADROOM + 2048];
    let reply = Frames::on_ports((0..flows).map(|k| {
        let f = ack.get(k);
        buf[HEADROOM..HEADROOM + f.len()].copy_from_slice(f);
        let mut frame = Frame::new(&mut buf, HEADROOM, f.len());
        let port = expect_tx(w.process(now, &tables_now, PortId(0), &mut frame), "established packet");
        let out = craft::inspect(frame.data()).expect("engine output parses");
        let i = (port.0 - 1) as u8;
        let reply = Spec::tcp((out.dst, out.ports.1), (out.src, out.ports.0), TCP_ACK)
            .macs(pod_mac(i), Mac([2, 0, 0, 1, 0, i]))
            .build();
        (port, reply)
    }));
    drop(tables_now);

    let allocs_before = memory::allocation_calls();
    let est_hot = run_frames(&mut w, &reader, &ack, args.packets, |i| i % HOT.min(flows), &mut now);
    let allocs = memory::allocation_calls() - allocs_before;
    // The same path with the workers' per-core engine timing on,
    // alternating with it off, three times each: the minimum of each is
    // what the overhead is read from (one run after another is warmer).
    let mut timing = (Sampler::default(), runtime::latency::new_histogram());
    let (mut plain, mut timed) = (est_hot, f64::INFINITY);
    for _ in 0..3 {
        let hot = |i| i % HOT.min(flows);
        timed = timed.min(run_frames_with(
            &mut w,
            &reader,
            &ack,
            args.packets,
            hot,
            &mut now,
            Some(&mut timing),
        ));
        plain = plain.min(run_frames(&mut w, &reader, &ack, args.packets, hot, &mut now));
    }
    let est_timed = timed;
    let est_cold = run_frames(&mut w, &reader, &ack, flows, |i| cold_order[i] as usize, &mut now);
    let rep_hot = run_frames(&mut w, &reader, &reply, args.packets, |i| i % HOT.min(flows), &mut now);
    let rep_cold = run_frames(&mut w, &reader, &reply, flows, |i| cold_order[i] as usize, &mut now);

    // NodePort with SNAT (eTP=Cluster): 10,000 clients, then the hot set.
    let np_client = |k: usize| {
        (
            Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + k as u32),
            40000,
        )
    };
    let np_frames = |flags: u8| {
        Frames::new(
            PortId(0),
            (0..10_000).map(move |k| {
                Spec::tcp(np_client(k), (NODE_IP, 30080), flags)
                    .macs(GW_MAC, UPLINK_MAC)
                    .build()
            }),
        )
    };
    let np_syn = np_frames(TCP_SYN);
    let np_new = run_frames(&mut w, &reader, &np_syn, np_syn.len(), |i| i, &mut now);
    // Established: the flows' later segments (a SYN again would be a
    // retransmission, which kxp verifies like any state change).
    let np_ack = np_frames(TCP_ACK);
    let np_est = run_frames(&mut w, &reader, &np_ack, args.packets, |i| i % HOT, &mut now);

    // Overlay: pod to remote pods (encap) and back (decap).
    let encap = Frames::new(
        PortId(1),
        (0..HOT).map(|k| {
            let dst = Ipv4Addr::new(10, 244, 2 + (k % REMOTE_NODES as usize) as u8, 5);
            Spec::tcp((pod_ip(0), 20000 + k as u16), (dst, 9000), TCP_ACK)
                .macs(pod_mac(0), Mac([2, 0, 0, 1, 0, 0]))
                .build()
        }),
    );
    let decap = Frames::new(
        PortId(0),
        (0..HOT).map(|k| {
            let r = (k % REMOTE_NODES as usize) as u8;
            let inner = Spec::tcp(
                (Ipv4Addr::new(10, 244, 2 + r, 5), 9000),
                (pod_ip(0), 20000 + k as u16),
                TCP_ACK,
            )
            .macs(Mac([0x0e, 0, 0, 0, 1, r]), Mac([0x0e, 0, 0, 0, 0, 1]))
            .build();
            craft::vxlan(
                (Mac([2, 0, 0, 0, 1, r]), UPLINK_MAC),
                Ipv4Addr::new(192, 168, 0, 2 + r),
                NODE_IP,
                8472,
                1,
                &inner,
            )
        }),
    );
    // The harness floor: an ARP frame is copied in and passed at once.
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&GW_MAC.0);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.resize(60, 0);
    let mut arp = Frames::new(PortId(0), std::iter::once(arp));
    arp.forwarded = false;
    let floor = run_frames(&mut w, &reader, &arp, args.packets, |_| 0, &mut now);
    let enc = run_frames(&mut w, &reader, &encap, args.packets, |i| i % HOT.min(flows), &mut now);
    let dec = run_frames(&mut w, &reader, &decap, args.packets, |i| i % HOT.min(flows), &mut now);
    let dropped = w.stats.total_drops();
    let (index_insert, index_remove) = reply_index_cost(capacity, flows);
    let index_bytes = state.conntrack.reply_index().buckets() * WORDS_PER_BUCKET * 8;

    // Control-plane updates while a worker on the other core forwards.
    let (add, remove) = if args.no_updates {
        (Value::Null, Value::Null)
    } else {
        let (add, w) = update_latency(&publisher, w, &ack, |t, r| {
            t.upsert_service(&service(services + 1000 + r, ENDPOINTS))
                .expect("new service");
        });
        let (remove, _) = update_latency(&publisher, w, &ack, |t, r| {
            t.upsert_service(&service(r % services, ENDPOINTS - 1))
                .expect("shrunk service");
        });
        (add, remove)
    };

    json!({
        "services": services,
        "endpoints_per_service": ENDPOINTS,
        "live_flows": live,
        "table_build_s": round(build_s, 2),
        "table_bytes": table_bytes,
        "clusterip_new_flow": path(new_flow),
        "clusterip_established": path(est_hot),
        "clusterip_established_with_engine_timing": path(est_timed),
        "engine_timing_overhead_pct": round(100.0 * (est_timed - plain) / plain, 1),
        "engine_timing_p50_ns": timing.1.value_at_quantile(0.5),
        "clusterip_established_all_flows_random": path(est_cold),
        "reply_reverse_nat": path(rep_hot),
        "reply_reverse_nat_all_flows_random": path(rep_cold),
        "nodeport_snat": path(np_est),
        "nodeport_snat_new_flow": path(np_new),
        "vxlan_encap": path(enc),
        "vxlan_decap": path(dec),
        "harness_floor_pass": path(floor),
        "allocations_per_established_packet": round(allocs as f64 / args.packets as f64, 3),
        "drops_during_timing": dropped,
        "add_one_service_us": add,
        "remove_one_endpoint_us": remove,
        "conntrack_capacity": state.conntrack.capacity(),
        "conntrack_bytes_per_entry": round(ct_bytes as f64 / live as f64, 1),
        "reply_index_bytes_per_entry": round(index_bytes as f64 / live as f64, 1),
        "reply_index_insert_ns": round(index_insert, 1),
        "reply_index_remove_ns": round(index_remove, 1),
    })
}

/// What exact-match steering adds to each flow: one reply-index insert when
/// it starts and one remove when it ends (both already inside the new-flow
/// and expiry figures; timed alone here, `flows` keys into an index sized
/// for `capacity`, in random order).
fn reply_index_cost(capacity: usize, flows: usize) -> (f64, f64) {
    let idx = ReplyIndex::in_memory(capacity);
    let keys: Vec<FlowKey> = shuffled(flows)
        .into_iter()
        .map(|k| {
            let (ip, port) = client(k as usize);
            FlowKey::new(Endpoint::new(pod_ip(k as u8), 80), Endpoint::new(ip, port), Proto::Tcp)
        })
        .collect();
    let start = Instant::now();
    for k in &keys {
        assert!(idx.insert(black_box(k)), "bench setup: the reply index refused a key");
    }
    let insert = start.elapsed().as_nanos() as f64 / flows as f64;
    let start = Instant::now();
    for k in &keys {
        idx.remove(black_box(k));
    }
    let remove = start.elapsed().as_nanos() as f64 / flows as f64;
    (insert, remove)
}

pub fn run(args: &Args) {
    let machine = machine();
    // Read the core list before pinning: afterwards it shows only our core.
    let cores = CORES.get_or_init(|| core_affinity::get_core_ids().unwrap_or_default());
    if let Some(core) = cores.first().copied() {
        core_affinity::set_for_current(core);
    }
    let sizes: Vec<Value> = args.services.iter().map(|&n| measure_size(args, n.max(1))).collect();
    let est = |v: &Value| v["clusterip_established"]["ns_per_packet"].as_f64().unwrap_or(f64::NAN);
    let flat = match (sizes.first(), sizes.last()) {
        (Some(a), Some(b)) => round(est(b) / est(a), 2),
        _ => f64::NAN,
    };
    let report = json!({
        "benchmark": "engine",
        "machine": machine,
        "method": "one pinned core; frames copied into an RX buffer then Worker::process; snapshot loaded per 64-frame batch",
        "sizes": sizes,
        "established_cost_ratio_largest_to_smallest": flat,
        "peak_rss_bytes": memory::peak_rss(),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    } else {
        print_table(&report);
    }
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    json!({ "cpu": cpu, "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "kernel": kernel })
}

fn print_table(r: &Value) {
    println!(
        "kxp engine benchmark — {} ({} cores)",
        r["machine"]["cpu"].as_str().unwrap_or("?"),
        r["machine"]["cores"]
    );
    println!("{}\n", r["method"].as_str().unwrap_or(""));
    let sizes = r["sizes"].as_array().cloned().unwrap_or_default();
    print!("{:<42}", "path (ns/packet)");
    for s in &sizes {
        print!("{:>14}", format!("{} svcs", s["services"]));
    }
    println!();
    for key in [
        "clusterip_new_flow",
        "clusterip_established",
        "clusterip_established_with_engine_timing",
        "clusterip_established_all_flows_random",
        "reply_reverse_nat",
        "reply_reverse_nat_all_flows_random",
        "nodeport_snat",
        "nodeport_snat_new_flow",
        "vxlan_encap",
        "vxlan_decap",
        "harness_floor_pass",
    ] {
        print!("{key:<42}");
        for s in &sizes {
            print!("{:>14}", s[key]["ns_per_packet"].to_string());
        }
        println!();
    }
    for (key, field) in [
        ("add_one_service_us (median)", ("add_one_service_us", "median")),
        ("add_one_service_us (max)", ("add_one_service_us", "max")),
        ("remove_one_endpoint_us (median)", ("remove_one_endpoint_us", "median")),
        ("remove_one_endpoint_us (max)", ("remove_one_endpoint_us", "max")),
    ] {
        print!("{key:<42}");
        for s in &sizes {
            print!("{:>14}", s[field.0][field.1].to_string());
        }
        println!();
    }
    for key in [
        "conntrack_bytes_per_entry",
        "reply_index_bytes_per_entry",
        "reply_index_insert_ns",
        "reply_index_remove_ns",
        "engine_timing_overhead_pct",
        "engine_timing_p50_ns",
        "live_flows",
        "table_build_s",
        "allocations_per_established_packet",
    ] {
        print!("{key:<42}");
        for s in &sizes {
            print!("{:>14}", s[key].to_string());
        }
        println!();
    }
    println!(
        "\nestablished cost, largest / smallest table: {}",
        r["established_cost_ratio_largest_to_smallest"]
    );
}
