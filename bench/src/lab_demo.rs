//! The lab demo, kxp's main job end to end: a two-node namespace cluster,
//! and iperf3 TCP and UDP through a ClusterIP (same-node and cross-node
//! backend) and a NodePort, every way in one run:
//!
//! - **kxp**: `kxp run` on both nodes from a manifest directory (veth
//!   offloads off, which kxp needs);
//! - **kube-proxy, nftables and iptables**: the same service addresses
//!   served by rules of the shapes kube-proxy programs in its two modes, the
//!   anchors; offloads off (as kxp runs) and with the veths' defaults on
//!   (TSO, GSO, checksum offload: what a kube-proxy node has);
//! - **kernel, no NAT**: straight to the pod IP (kernel routing and VXLAN),
//!   the ceiling of the kernel path, offloads off and on.
//!
//! Prints throughput, kxp's ratios to each anchor, CPU time per gigabyte
//! delivered (all cores, from /proc/stat: on veths the forwarding work runs
//! in the sender's CPU time, so throughput alone hides cost), and each kxp
//! worker's RX->TX latency percentiles. Tears the lab down on exit, failure
//! or Ctrl-C.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{cpu, kube_proxy, lab_run};
use lab::kxp::{metric_sum, write_manifests, Kxp, Svc};
use lab::{node_ip, pod_ip, Host, Lab};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 3)]
    pub seconds: u32,
    /// UDP offered load, iperf3 syntax; 0 = as fast as the sender can
    /// (throughput is then what arrives, net of loss).
    #[arg(long, default_value = "0")]
    pub udp_rate: String,
    /// Keep the lab and kxp running this many seconds after the runs, to
    /// look around (`ip netns list`).
    #[arg(long, default_value_t = 0)]
    pub hold: u64,
    /// Path of the kxp binary (default: next to this one).
    #[arg(long)]
    pub kxp: Option<PathBuf>,
    /// Extra lines for kxp's `kxp:` config section (each indented two
    /// spaces), e.g. "  workerPriority: 50\n".
    #[arg(long, default_value = "")]
    pub kxp_config: String,
    /// Also run kxp with pods in a UMEM of their own (`kxp.umemLayout:
    /// split`, the layout beside a zero-copy uplink, here in copy mode):
    /// what the copy between the two UMEMs costs.
    #[arg(long)]
    pub split_umem: bool,
}

const PREFIX: &str = "kxpdemo";
const IPERF_PORT: u16 = 5201;
const NODE_PORT: u16 = 30201;
const POD_CIDR: &str = "10.77.0.0/16";

/// iperf3 servers, killed on drop.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn iperf_server(h: &Host) -> std::io::Result<Child> {
    Command::new("ip")
        .args(["netns", "exec", &h.ns, "iperf3", "-s", "-p", &IPERF_PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// One iperf3 run's outcome.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    gbps: f64,
    lost_pct: Option<f64>,
    /// CPU seconds (all cores) per gigabyte delivered.
    cpu_s_per_gb: f64,
}

/// One iperf3 client run from `from` to `to:port`; TCP unless `udp_rate`.
fn iperf(from: &Host, to: Ipv4Addr, port: u16, secs: u32, udp_rate: Option<&str>) -> Result<Run, String> {
    let mut args = vec![
        "iperf3".to_string(),
        "-c".into(),
        to.to_string(),
        "-p".into(),
        port.to_string(),
        "-t".into(),
        secs.to_string(),
        "-J".into(),
        "--connect-timeout".into(),
        "3000".into(),
    ];
    if let Some(rate) = udp_rate {
        args.extend(["-u", "-b", rate, "-l", "1400"].map(String::from));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let busy0 = cpu::busy_seconds();
    let out = from.exec(&argv).map_err(|e| e.to_string())?;
    let busy1 = cpu::busy_seconds();
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("iperf3 output: {e}"))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(format!("iperf3: {err}"));
    }
    let end = &v["end"];
    let (gbps, lost_pct, bytes) = if udp_rate.is_some() {
        let lost = end["sum"]["lost_percent"].as_f64();
        let sent = end["sum"]["bytes"].as_f64().unwrap_or(0.0);
        (
            end["sum"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9 * (1.0 - lost.unwrap_or(0.0) / 100.0),
            lost,
            sent * (1.0 - lost.unwrap_or(0.0) / 100.0),
        )
    } else {
        (
            end["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9,
            None,
            end["sum_received"]["bytes"].as_f64().unwrap_or(0.0),
        )
    };
    let cpu_s = busy1 - busy0;
    Ok(Run {
        gbps,
        lost_pct,
        cpu_s_per_gb: if bytes > 0.0 { cpu_s / (bytes / 1e9) } else { 0.0 },
    })
}

/// One measured path: the client, the service address it uses (kube-proxy
/// and kxp), and the backend's own address (kernel, no NAT).
struct Path {
    name: &'static str,
    client: Host,
    service: (Ipv4Addr, u16),
    backend: Ipv4Addr,
    udp: bool,
}

impl Path {
    fn proto(&self) -> &'static str {
        if self.udp {
            "UDP"
        } else {
            "TCP"
        }
    }
}

pub fn run(args: &Args) {
    if let Err(e) = demo(args) {
        eprintln!("lab demo failed: {e}");
        std::process::exit(1);
    }
}

fn demo(args: &Args) -> Result<(), String> {
    let bin = lab_run::prepare(PREFIX, args.kxp.clone())?;
    println!("building the lab: 2 nodes x 2 pods, a client, Flannel-style VXLAN");
    let lab = Lab::build_named(PREFIX, 2, 2).map_err(|e| e.to_string())?;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let manifests = work.path().join("manifests");
    let mut np = Svc::tcp(
        "iperf-nodeport",
        Ipv4Addr::new(10, 96, 0, 12),
        IPERF_PORT,
        &[(pod_ip(2, 1), 2)],
    );
    np.node_port = Some(NODE_PORT);
    let services = [
        Svc::new(
            "iperf-local",
            Ipv4Addr::new(10, 96, 0, 10),
            IPERF_PORT,
            &[(pod_ip(1, 0), 1)],
        ),
        Svc::new(
            "iperf-remote",
            Ipv4Addr::new(10, 96, 0, 11),
            IPERF_PORT,
            &[(pod_ip(2, 0), 2)],
        ),
        np,
    ];
    write_manifests(&manifests, &lab, &services).map_err(|e| e.to_string())?;
    let servers = Servers(
        [&lab.nodes[0].pods[0], &lab.nodes[1].pods[0], &lab.nodes[1].pods[1]]
            .iter()
            .map(|h| iperf_server(h))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("cannot start iperf3 (deploy/setup.sh installs it): {e}"))?,
    );
    std::thread::sleep(Duration::from_millis(300));
    let pod_client = lab.nodes[0].pods[1].clone();
    let mut paths = Vec::new();
    for udp in [false, true] {
        paths.push(Path {
            name: "ClusterIP, same-node backend",
            client: pod_client.clone(),
            service: (services[0].cluster_ip, IPERF_PORT),
            backend: pod_ip(1, 0),
            udp,
        });
        paths.push(Path {
            name: "ClusterIP, cross-node backend",
            client: pod_client.clone(),
            service: (services[1].cluster_ip, IPERF_PORT),
            backend: pod_ip(2, 0),
            udp,
        });
    }
    paths.push(Path {
        name: "NodePort from client, cross-node",
        client: lab.client.clone(),
        service: (node_ip(1), NODE_PORT),
        backend: pod_ip(2, 1),
        udp: false,
    });
    let rate = args.udp_rate.as_str();
    let secs = args.seconds;
    let run_all = |to_service: bool| -> Vec<Result<Run, String>> {
        paths
            .iter()
            .map(|p| {
                let udp = p.udp.then_some(rate);
                if to_service {
                    iperf(&p.client, p.service.0, p.service.1, secs, udp)
                } else if p.client.ns == lab.client.ns {
                    // The client has no route to pod IPs: the node it would
                    // reach forwards to the pod instead.
                    iperf(&lab.nodes[0].host, p.backend, IPERF_PORT, secs, udp)
                } else {
                    iperf(&p.client, p.backend, IPERF_PORT, secs, udp)
                }
            })
            .collect()
    };
    // kxp first (offloads off, which it needs), then kube-proxy's two
    // modes and the kernel's own path, offloads off and then with the
    // veths' defaults on (TSO, GSO, checksum offload: what a node without
    // kxp has). On this VM a run right after a heavy one loses 10-20 %, so
    // the comparison that matters most, kxp against nftables with the same
    // offloads, runs first and back to back.
    lab.set_tx_offloads(false).map_err(|e| e.to_string())?;
    println!("kxp: `kxp run` on both nodes, offloads off ...");
    let kxps: Vec<Kxp> = lab
        .nodes
        .iter()
        .map(|n| Kxp::start_with(&bin, n, &manifests, work.path(), &args.kxp_config.replace("\\n", "\n")))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let through = run_all(true);
    let worker_metrics: Vec<String> = kxps.iter().map(Kxp::metrics).collect();
    if args.hold > 0 {
        println!(
            "holding the lab for {} s (kxp logs in {})",
            args.hold,
            work.path().display()
        );
        std::thread::sleep(Duration::from_secs(args.hold));
    }
    drop(kxps);
    let mut columns: Vec<(&str, Vec<Result<Run, String>>)> = vec![("kxp", through.clone())];
    for offloads in [false, true] {
        lab.set_tx_offloads(offloads).map_err(|e| e.to_string())?;
        let tag = if offloads { "on" } else { "off" };
        println!("kube-proxy nftables, offloads {tag} ...");
        for n in &lab.nodes {
            kube_proxy::nftables_rules(&n.host, &services, POD_CIDR, work.path())?;
        }
        columns.push((if offloads { "nft/on" } else { "nft/off" }, run_all(true)));
        for n in &lab.nodes {
            kube_proxy::flush_nftables(&n.host);
        }
        println!("kube-proxy iptables, offloads {tag} ...");
        for n in &lab.nodes {
            kube_proxy::iptables_rules(&n.host, &services, POD_CIDR)?;
        }
        columns.push((if offloads { "ipt/on" } else { "ipt/off" }, run_all(true)));
        for n in &lab.nodes {
            kube_proxy::flush_iptables(&n.host);
        }
        println!("kernel, no NAT, offloads {tag}: straight to the pod IPs ...");
        columns.push((if offloads { "kernel/on" } else { "kernel/off" }, run_all(false)));
    }
    print_throughput(&paths, &columns);
    print_workers(&lab, &worker_metrics);
    if args.split_umem {
        lab.set_tx_offloads(false).map_err(|e| e.to_string())?;
        println!();
        println!("and kxp with pods in a UMEM of their own (umemLayout: split) ...");
        let split: Vec<Kxp> = lab
            .nodes
            .iter()
            .map(|n| Kxp::start_with(&bin, n, &manifests, work.path(), "  umemLayout: split\n"))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let apart = run_all(true);
        print_split(&paths, &through, &apart, &split);
        drop(split);
        if apart.iter().any(Result::is_err) {
            return Err("some paths failed through kxp with split UMEMs (see above)".into());
        }
    }
    drop(servers);
    drop(lab);
    println!();
    println!("lab torn down");
    if through.iter().any(Result::is_err) {
        return Err("some paths failed through kxp (see above)".into());
    }
    Ok(())
}

/// One table per measure: a row per path, a column per way, then kxp
/// against each kube-proxy mode with the same (off) offloads, and against
/// nftables with the kernel's default offloads.
fn print_throughput(paths: &[Path], columns: &[(&str, Vec<Result<Run, String>>)]) {
    let gbps = |r: &Run| match r.lost_pct {
        Some(l) if l >= 0.05 => format!("{:.2} ({l:.0}%)", r.gbps),
        _ => format!("{:.2}", r.gbps),
    };
    let cpu = |r: &Run| format!("{:.2}", r.cpu_s_per_gb);
    let col = |name: &str| columns.iter().position(|(n, _)| *n == name);
    let ratios = [("/nft", "nft/off"), ("/ipt", "ipt/off"), ("/nft-on", "nft/on")];
    let table = |title: &str, cell: &dyn Fn(&Run) -> String, value: fn(&Run) -> f64| {
        println!();
        println!("{title}");
        print!("{:<34} {:>5}", "path", "proto");
        for (name, _) in columns {
            print!(" {name:>11}");
        }
        for (name, _) in ratios {
            print!(" {:>7}", format!("kxp{name}"));
        }
        println!();
        let kxp = col("kxp");
        for (i, p) in paths.iter().enumerate() {
            print!("{:<34} {:>5}", p.name, p.proto());
            for (_, runs) in columns {
                print!(" {:>11}", runs[i].as_ref().map_or_else(|_| "failed".into(), cell));
            }
            for (_, against) in ratios {
                let ratio = match (kxp.map(|k| &columns[k].1[i]), col(against).map(|c| &columns[c].1[i])) {
                    (Some(Ok(a)), Some(Ok(b))) if value(b) > 0.0 => format!("{:.2}", value(a) / value(b)),
                    _ => "-".into(),
                };
                print!(" {ratio:>7}");
            }
            println!();
        }
    };
    table(
        "throughput, Gbit/s delivered (UDP: % lost); columns: way/offloads",
        &gbps,
        |r| r.gbps,
    );
    table(
        "CPU seconds (all cores) per GB delivered (lower is better)",
        &cpu,
        |r| r.cpu_s_per_gb,
    );
    for (i, p) in paths.iter().enumerate() {
        for (how, runs) in columns {
            if let Err(e) = &runs[i] {
                println!("  {} ({}) via {how}: {e}", p.name, p.proto());
            }
        }
    }
}

/// kxp with one UMEM per worker against kxp with pods apart.
fn print_split(paths: &[Path], shared: &[Result<Run, String>], apart: &[Result<Run, String>], kxps: &[Kxp]) {
    println!();
    println!("kxp, one UMEM vs pods in their own UMEM: Gbit/s and CPU s/GB (ratio: split / one)");
    println!(
        "{:<34} {:>5} {:>16} {:>16} {:>6} {:>6}",
        "path", "proto", "one UMEM", "split", "Gbit/s", "CPU"
    );
    for (i, p) in paths.iter().enumerate() {
        let cell = |r: &Result<Run, String>| {
            r.as_ref().map_or_else(
                |e| format!("failed: {e}"),
                |r| format!("{:.2} / {:.2}", r.gbps, r.cpu_s_per_gb),
            )
        };
        let ratio = |f: fn(&Run) -> f64| match (&apart[i], &shared[i]) {
            (Ok(a), Ok(b)) if f(b) > 0.0 => format!("{:.2}", f(a) / f(b)),
            _ => "-".into(),
        };
        println!(
            "{:<34} {:>5} {:>16} {:>16} {:>6} {:>6}",
            p.name,
            p.proto(),
            cell(&shared[i]),
            cell(&apart[i]),
            ratio(|r| r.gbps),
            ratio(|r| r.cpu_s_per_gb)
        );
    }
    let copies: f64 = kxps
        .iter()
        .map(|k| k.metric_sum("kxp_worker_events", &["event=\"umem_copies\""]))
        .sum();
    let no_frame: f64 = kxps
        .iter()
        .map(|k| k.metric_sum("kxp_worker_drops", &["reason=\"umem_copy_no_frame\""]))
        .sum();
    println!("frames copied between the UMEMs: {copies}; dropped for want of a frame: {no_frame}");
}

/// Each node's kxp workers, from the metrics scraped right after kxp's runs.
fn print_workers(lab: &Lab, metrics: &[String]) {
    println!();
    println!("kxp workers: RX->TX-submit latency per packet (measured per batch), packets, drops");
    println!(
        "{:<5} {:>5} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8} {:>12}",
        "node", "queue", "p50 ns", "p90 ns", "p99 ns", "max ns", "rx", "tx", "dropped", "sendto/1k tx"
    );
    for (n, m) in lab.nodes.iter().zip(metrics) {
        let q = |name: &str, l: &str| metric_sum(m, name, &["queue=\"0\"", l]);
        let lat = |quantile: &str| q("kxp_worker_latency_nanoseconds", &format!("quantile=\"{quantile}\""));
        println!(
            "n{:<4} {:>5} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8} {:>12.1}",
            n.index,
            0,
            lat("0.5"),
            lat("0.9"),
            lat("0.99"),
            lat("1"),
            q("kxp_worker_packets", "direction=\"rx\""),
            q("kxp_worker_packets", "direction=\"tx\""),
            // xsk_rx_ring_full and xsk_fill_ring_empty are causes of
            // drops xsk_rx_dropped already counts.
            q("kxp_worker_drops", "")
                - q("kxp_worker_drops", "xsk_rx_ring_full")
                - q("kxp_worker_drops", "xsk_fill_ring_empty"),
            1000.0 * q("kxp_worker_events", "event=\"tx_wakeups\"")
                / q("kxp_worker_packets", "direction=\"tx\"").max(1.0),
        );
        let part = |p: &str, quantile: &str| {
            q(
                "kxp_worker_time_nanoseconds",
                &format!("part=\"{p}\",quantile=\"{quantile}\""),
            )
        };
        println!(
            "      of which: engine p50 {} ns, p99 {} ns (1 packet in 64 timed); each sendto (the kernel delivering) p50 {} ns, p99 {} ns; idle sleeps p50 {} us",
            part("engine", "0.5"),
            part("engine", "0.99"),
            part("tx_wakeup", "0.5"),
            part("tx_wakeup", "0.99"),
            part("sleep", "0.5") / 1000.0,
        );
        let reasons: Vec<String> = m
            .lines()
            .filter(|l| l.starts_with("kxp_worker_drops{") && !l.ends_with(" 0"))
            .map(|l| l.to_string())
            .collect();
        for r in reasons {
            println!("      {r}");
        }
    }
}
