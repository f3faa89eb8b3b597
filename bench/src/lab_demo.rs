//! The lab demo, kxp's main job end to end: a two-node namespace cluster,
//! iperf3 TCP and UDP through a ClusterIP (same-node and cross-node
//! backend) and a NodePort, first over the kernel path (pod IPs, kernel
//! routing and VXLAN: the baseline), then through kxp; prints throughput,
//! the ratio, and each worker's RX->TX latency percentiles. Tears the lab
//! down on exit, failure or Ctrl-C.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lab::kxp::{sibling_binary, write_manifests, Kxp, Svc};
use lab::{node_ip, pod_ip, Host, Lab};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 3)]
    pub seconds: u32,
    /// UDP offered load, iperf3 syntax.
    #[arg(long, default_value = "300M")]
    pub udp_rate: String,
    /// Keep the lab and kxp running this many seconds after the runs, to
    /// look around (`ip netns list`).
    #[arg(long, default_value_t = 0)]
    pub hold: u64,
    /// Path of the kxp binary (default: next to this one).
    #[arg(long)]
    pub kxp: Option<PathBuf>,
}

const PREFIX: &str = "kxpdemo";
const IPERF_PORT: u16 = 5201;
const NODE_PORT: u16 = 30201;

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

#[derive(Clone, Copy, Debug, Default)]
struct Result3 {
    gbps: f64,
    lost_pct: Option<f64>,
}

/// One iperf3 client run from `from` to `to:port`; TCP unless `udp_rate`.
fn iperf(from: &Host, to: Ipv4Addr, port: u16, secs: u32, udp_rate: Option<&str>) -> Result<Result3, String> {
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
    let out = from.exec(&argv).map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("iperf3 output: {e}"))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(format!("iperf3: {err}"));
    }
    let end = &v["end"];
    Ok(if udp_rate.is_some() {
        Result3 {
            gbps: end["sum"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9,
            lost_pct: end["sum"]["lost_percent"].as_f64(),
        }
    } else {
        Result3 {
            gbps: end["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9,
            lost_pct: None,
        }
    })
}

/// One measured path: how the client reaches the backend through kxp, and
/// the same backend over the kernel path.
struct Path {
    name: &'static str,
    client: Host,
    via_kxp: Ipv4Addr,
    via_kxp_port: u16,
    kernel: Ipv4Addr,
    udp: bool,
}

pub fn run(args: &Args) {
    if let Err(e) = demo(args) {
        eprintln!("lab demo failed: {e}");
        std::process::exit(1);
    }
}

fn demo(args: &Args) -> Result<(), String> {
    let bin =
        args.kxp.clone().or_else(|| sibling_binary("kxp")).ok_or(
            "cannot find the kxp binary next to bench; build the workspace (cargo build --release) or pass --kxp",
        )?;
    // Ctrl-C: delete the lab's namespaces (their links go with them); the
    // children get the same SIGINT from the terminal.
    ctrlc::set_handler(|| {
        lab::remove_namespaces_with_prefix(PREFIX);
        std::process::exit(130);
    })
    .map_err(|e| e.to_string())?;
    lab::remove_namespaces_with_prefix(PREFIX); // leftovers of a killed run
    println!("building the lab: 2 nodes x 2 pods, a client, Flannel-style VXLAN");
    let lab = Lab::build_named(PREFIX, 2, 2).map_err(|e| e.to_string())?;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let manifests = work.path().join("manifests");
    let backend_local = pod_ip(1, 0);
    let backend_remote = pod_ip(2, 0);
    let backend_np = pod_ip(2, 1);
    let mut np = Svc::new(
        "iperf-nodeport",
        Ipv4Addr::new(10, 96, 0, 12),
        IPERF_PORT,
        &[(backend_np, 2)],
    );
    np.node_port = Some(NODE_PORT);
    let services = [
        Svc::new(
            "iperf-local",
            Ipv4Addr::new(10, 96, 0, 10),
            IPERF_PORT,
            &[(backend_local, 1)],
        ),
        Svc::new(
            "iperf-remote",
            Ipv4Addr::new(10, 96, 0, 11),
            IPERF_PORT,
            &[(backend_remote, 2)],
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
            via_kxp: services[0].cluster_ip,
            via_kxp_port: IPERF_PORT,
            kernel: backend_local,
            udp,
        });
        paths.push(Path {
            name: "ClusterIP, cross-node backend",
            client: pod_client.clone(),
            via_kxp: services[1].cluster_ip,
            via_kxp_port: IPERF_PORT,
            kernel: backend_remote,
            udp,
        });
    }
    paths.push(Path {
        name: "NodePort from client, cross-node",
        client: lab.client.clone(),
        via_kxp: node_ip(1),
        via_kxp_port: NODE_PORT,
        kernel: backend_np,
        udp: false,
    });
    let udp_rate = Some(args.udp_rate.as_str());
    let secs = args.seconds;
    println!("kernel baseline (pod IPs, kernel routing and VXLAN, no NAT) ...");
    let mut baseline = Vec::new();
    for p in &paths {
        // The client has no route to pod IPs: its baseline is the node's
        // own forwarding to the pod, measured from node n1.
        let from = if p.client.ns == lab.client.ns {
            lab.nodes[0].host.clone()
        } else {
            p.client.clone()
        };
        baseline.push(iperf(
            &from,
            p.kernel,
            IPERF_PORT,
            secs,
            p.udp.then_some(udp_rate).flatten(),
        ));
    }
    println!("starting kxp on both nodes ...");
    let kxps: Vec<Kxp> = lab
        .nodes
        .iter()
        .map(|n| Kxp::start(&bin, n, &manifests, work.path()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    println!("through kxp ...");
    let mut through = Vec::new();
    for p in &paths {
        through.push(iperf(
            &p.client,
            p.via_kxp,
            p.via_kxp_port,
            secs,
            p.udp.then_some(udp_rate).flatten(),
        ));
    }
    println!();
    println!(
        "{:<34} {:>5} {:>14} {:>14} {:>7}",
        "path", "proto", "kernel Gbit/s", "kxp Gbit/s", "ratio"
    );
    for ((p, b), k) in paths.iter().zip(&baseline).zip(&through) {
        let show = |r: &Result<Result3, String>| match r {
            Ok(r) => match r.lost_pct {
                Some(l) => format!("{:.2} ({l:.1}% lost)", r.gbps),
                None => format!("{:.2}", r.gbps),
            },
            Err(_) => "failed".into(),
        };
        let ratio = match (b, k) {
            (Ok(b), Ok(k)) if b.gbps > 0.0 => format!("{:.2}", k.gbps / b.gbps),
            _ => "-".into(),
        };
        println!(
            "{:<34} {:>5} {:>14} {:>14} {:>7}",
            p.name,
            if p.udp { "UDP" } else { "TCP" },
            show(b),
            show(k),
            ratio
        );
    }
    for (p, r) in paths.iter().zip(&through) {
        if let Err(e) = r {
            println!("  {} ({}): {e}", p.name, if p.udp { "UDP" } else { "TCP" });
        }
    }
    println!();
    println!("kxp workers: RX->TX-submit latency per packet (measured per batch), packets and drops");
    println!(
        "{:<5} {:>5} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8}",
        "node", "queue", "p50 ns", "p90 ns", "p99 ns", "max ns", "rx", "tx", "dropped"
    );
    for (n, k) in lab.nodes.iter().zip(&kxps) {
        let m = k.metrics();
        let q = |name: &str, l: &str| lab::kxp::metric_sum(&m, name, &["queue=\"0\"", l]);
        println!(
            "n{:<4} {:>5} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8}",
            n.index,
            0,
            q("kxp_worker_latency_nanoseconds", "quantile=\"0.5\""),
            q("kxp_worker_latency_nanoseconds", "quantile=\"0.9\""),
            q("kxp_worker_latency_nanoseconds", "quantile=\"0.99\""),
            q("kxp_worker_latency_nanoseconds", "quantile=\"1\""),
            q("kxp_worker_packets", "direction=\"rx\""),
            q("kxp_worker_packets", "direction=\"tx\""),
            q("kxp_worker_drops", ""),
        );
    }
    if args.hold > 0 {
        println!(
            "holding the lab for {} s (kxp logs in {})",
            args.hold,
            work.path().display()
        );
        std::thread::sleep(Duration::from_secs(args.hold));
    }
    drop(kxps);
    drop(servers);
    drop(lab);
    println!();
    println!("lab torn down");
    if through.iter().any(Result::is_err) {
        return Err("some paths failed through kxp (see above)".into());
    }
    Ok(())
}
