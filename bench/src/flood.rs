//! `bench flood`: what a spoofed-source flood does to connections, kxp
//! against kube-proxy's iptables shape, in one run on one lab.
//!
//! One node with two pods and an external client. An echo service (pod 0)
//! has a ClusterIP and a NodePort. For each datapath: 200 connections are
//! opened and kept (half from the client through the NodePort, half from
//! pod 1 through the ClusterIP), then the client floods the NodePort with
//! `--packets` spoofed-source packets of each kind (SYN, ACK, no flags,
//! FIN, RST, UDP; lab::flood). While each flood runs, the client keeps
//! opening new connections through the NodePort and times them. Afterwards
//! every kept connection is asked to echo.
//!
//! Reported per kind: packets the flooder got out and their rate, CPU time
//! of the whole machine per flood packet, new connections that succeeded
//! or failed during the flood and their connect time; per datapath: kept
//! connections still carrying data, and the flow state's size (kxp's RSS,
//! the kernel's conntrack entries). kxp runs with a `--conntrack`-flow
//! table (2,048 by default) so the flood overfills it hundreds of times;
//! the kernel keeps its own `nf_conntrack_max`, which is printed.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use lab::flood::{flood, Kind};
use lab::kxp::{write_manifests, Kxp, Svc};
use lab::probe::{echoes, open, Echo};
use lab::{node_ip, pod_ip, Lab};
use serde_json::{json, Value};

use crate::{cpu, kube_proxy, lab_run};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Spoofed packets per kind.
    #[arg(long, default_value_t = 1_000_000)]
    pub packets: u64,
    /// Connections kept open through the floods (half NodePort, half ClusterIP).
    #[arg(long, default_value_t = 200)]
    pub connections: usize,
    /// kxp's conntrack capacity (kube-proxy's conntrack.min).
    #[arg(long, default_value_t = 2048)]
    pub conntrack: u32,
    /// Write the results as JSON to this file too.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Path of the kxp binary (default: next to this one).
    #[arg(long)]
    pub kxp: Option<PathBuf>,
}

const PREFIX: &str = "kxpflood";
const ECHO: u16 = 7007;
const NODE_PORT: u16 = 30707;
const POD_CIDR: &str = "10.77.0.0/16";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

struct KindResult {
    kind: Kind,
    sent: u64,
    secs: f64,
    cpu_ns_per_packet: f64,
    new_ok: usize,
    new_failed: usize,
    connect_ms: Vec<f64>,
}

struct ModeResult {
    name: &'static str,
    kinds: Vec<KindResult>,
    survivors: usize,
    /// What the flow state holds before and after, and its unit.
    state: (u64, u64, &'static str),
}

pub fn run(args: &Args) {
    if let Err(e) = bench(args) {
        eprintln!("flood bench failed: {e}");
        std::process::exit(1);
    }
}

fn bench(args: &Args) -> Result<(), String> {
    let bin = lab_run::prepare(PREFIX, args.kxp.clone())?;
    println!("building the lab: 1 node x 2 pods and a client");
    let lab = Lab::build_named(PREFIX, 1, 2).map_err(|e| e.to_string())?;
    let node = &lab.nodes[0];
    let mut svc = Svc::new("echo", Ipv4Addr::new(10, 96, 0, 77), ECHO, &[(pod_ip(1, 0), 1)]);
    svc.node_port = Some(NODE_PORT);
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let manifests = work.path().join("manifests");
    write_manifests(&manifests, &lab, std::slice::from_ref(&svc)).map_err(|e| e.to_string())?;
    let _echo = Echo::start(&node.pods[0].ns, ECHO).map_err(|e| e.to_string())?;
    let kernel_max = node
        .host
        .exec(&["cat", "/proc/sys/net/netfilter/nf_conntrack_max"])
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());

    println!("1/2 kube-proxy: iptables rules (nf_conntrack_max {kernel_max})");
    kube_proxy::iptables_rules(&node.host, std::slice::from_ref(&svc), POD_CIDR)?;
    let conntrack_entries = || {
        node.host
            .exec(&["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let kube = run_mode(
        "kube-proxy iptables",
        &lab,
        args,
        &svc,
        conntrack_entries,
        "conntrack entries",
    );
    kube_proxy::flush_iptables(&node.host);
    let kube = kube?;

    println!("2/2 kxp: `kxp run`, conntrack capacity {}", args.conntrack);
    let top = format!("conntrack: {{maxPerCore: 1, min: {}}}\n", args.conntrack);
    let kxp = Kxp::start_configured(&bin, node, &manifests, work.path(), &top, "").map_err(|e| e.to_string())?;
    let rss = || kxp.rss_bytes() / (1024 * 1024);
    let ours = run_mode("kxp", &lab, args, &svc, rss, "MiB RSS")?;
    let drops: Vec<(String, f64)> = [
        "invalid_tcp_flags",
        "stray_tcp",
        "bad_l4_checksum",
        "conntrack_full",
        "no_route",
        "no_neighbor",
        // Where a flood beyond the worker's rate is lost: before kxp sees it.
        "xsk_rx_ring_full",
        "xsk_fill_ring_empty",
    ]
    .iter()
    .map(|r| {
        let label = format!("reason=\"{r}\"");
        (r.to_string(), kxp.metric_sum("kxp_worker_drops", &[&label]))
    })
    .collect();
    drop(kxp);
    drop(lab);

    print_results(args, &[&kube, &ours]);
    println!("kxp drops by reason: {drops:?}");
    if let Some(path) = &args.json {
        let v = json!({
            "benchmark": "flood",
            "packets_per_kind": args.packets,
            "connections": args.connections,
            "kxp_conntrack_capacity": args.conntrack,
            "kernel_nf_conntrack_max": kernel_max,
            "results": [to_json(&kube), to_json(&ours)],
            "kxp_drops": drops.iter().map(|(r, n)| (r.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
        });
        let text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    println!("lab torn down");
    Ok(())
}

fn run_mode(
    name: &'static str,
    lab: &Lab,
    args: &Args,
    svc: &Svc,
    state: impl Fn() -> u64,
    unit: &'static str,
) -> Result<ModeResult, String> {
    let node_port = SocketAddr::V4(SocketAddrV4::new(node_ip(1), NODE_PORT));
    let cluster_ip = SocketAddr::V4(SocketAddrV4::new(svc.cluster_ip, ECHO));
    let pod_client = &lab.nodes[0].pods[1];
    let mut kept = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let (ns, to) = if i % 2 == 0 {
            (&lab.client.ns, node_port)
        } else {
            (&pod_client.ns, cluster_ip)
        };
        let mut s = open(ns, to, CONNECT_TIMEOUT).map_err(|e| format!("{name}: connection {i} to {to}: {e}"))?;
        if !echoes(&mut s) {
            return Err(format!("{name}: connection {i} carries no data before the flood"));
        }
        kept.push(s);
    }
    let state_before = state();
    let target = SocketAddrV4::new(node_ip(1), NODE_PORT);
    let mut kinds = Vec::new();
    for kind in Kind::ALL {
        let ns = lab.client.ns.clone();
        let packets = args.packets;
        let cpu0 = cpu::busy_seconds();
        let attack = std::thread::spawn(move || flood(&ns, kind, target, packets, 2));
        let (mut new_ok, mut new_failed, mut connect_ms) = (0, 0, Vec::new());
        let mut first_error: Option<String> = None;
        while !attack.is_finished() {
            let t = Instant::now();
            let outcome = open(&lab.client.ns, node_port, CONNECT_TIMEOUT)
                .map_err(|e| e.to_string())
                .and_then(|mut s| echoes(&mut s).then_some(()).ok_or("connected, but no echo".to_string()));
            match outcome {
                Ok(()) => {
                    new_ok += 1;
                    connect_ms.push(t.elapsed().as_secs_f64() * 1e3);
                }
                Err(e) => {
                    new_failed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        let sent = attack
            .join()
            .map_err(|_| "the flood thread panicked".to_string())?
            .map_err(|e| e.to_string())?;
        let cpu_s = cpu::busy_seconds() - cpu0;
        let r = KindResult {
            kind,
            sent: sent.packets,
            secs: sent.elapsed.as_secs_f64(),
            cpu_ns_per_packet: cpu_s * 1e9 / sent.packets.max(1) as f64,
            new_ok,
            new_failed,
            connect_ms,
        };
        println!(
            "  {name}: {:>8} flood, {:.0} pps, {:.0} CPU ns/packet, new connections {} ok / {} failed",
            kind.name(),
            r.sent as f64 / r.secs,
            r.cpu_ns_per_packet,
            r.new_ok,
            r.new_failed
        );
        if let Some(e) = first_error {
            println!("  {name}: first failed connection: {e}");
        }
        kinds.push(r);
    }
    let survivors = kept.iter_mut().map(echoes).filter(|ok| *ok).count();
    println!(
        "  {name}: {survivors} of {} kept connections still echo",
        args.connections
    );
    Ok(ModeResult {
        name,
        kinds,
        survivors,
        state: (state_before, state(), unit),
    })
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn print_results(args: &Args, modes: &[&ModeResult]) {
    println!();
    println!(
        "{} spoofed packets per kind at the NodePort; {} kept connections",
        args.packets, args.connections
    );
    println!(
        "{:<22} {:>9} {:>10} {:>10} {:>14} {:>12}",
        "datapath / flood", "kpps out", "CPU ns/pkt", "new ok/fail", "connect p50 ms", "max ms"
    );
    for m in modes {
        for k in &m.kinds {
            println!(
                "{:<22} {:>9.0} {:>10.0} {:>10} {:>14.1} {:>12.1}",
                format!("{} / {}", short(m.name), k.kind.name()),
                k.sent as f64 / k.secs / 1e3,
                k.cpu_ns_per_packet,
                format!("{}/{}", k.new_ok, k.new_failed),
                percentile(&k.connect_ms, 0.5),
                percentile(&k.connect_ms, 1.0)
            );
        }
    }
    println!();
    for m in modes {
        println!(
            "{:<22} kept connections alive after all floods: {}/{}; flow state {} -> {} {}",
            m.name, m.survivors, args.connections, m.state.0, m.state.1, m.state.2
        );
    }
}

fn short(name: &str) -> &str {
    if name.starts_with("kube-proxy") {
        "kube-proxy"
    } else {
        name
    }
}

fn to_json(m: &ModeResult) -> Value {
    json!({
        "datapath": m.name,
        "kept_connections_alive": m.survivors,
        "flow_state_before": m.state.0,
        "flow_state_after": m.state.1,
        "flow_state_unit": m.state.2,
        "floods": m.kinds.iter().map(|k| json!({
            "kind": k.kind.name(),
            "packets": k.sent,
            "pps": (k.sent as f64 / k.secs).round(),
            "cpu_ns_per_packet": k.cpu_ns_per_packet.round(),
            "new_connections_ok": k.new_ok,
            "new_connections_failed": k.new_failed,
            "connect_ms_p50": percentile(&k.connect_ms, 0.5),
            "connect_ms_max": percentile(&k.connect_ms, 1.0),
        })).collect::<Vec<_>>(),
    })
}
