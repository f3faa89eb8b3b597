//! The lab cluster the traffic tests share: a namespace lab with `kxp run`
//! on chosen nodes from manifests the test writes, and the probes the
//! tests read (nstat counters, kxp's metrics, greetings, iperf3).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lab::kxp::{write_manifests, Kxp, Svc};
use lab::probe::connect;
use lab::{Host, Lab};

pub const PORT: u16 = 5201;
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 100);

pub fn vip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, last)
}

pub fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// A lab with kxp on some nodes, from `services`.
pub struct Cluster {
    // Field order is drop order: kxp first, then the lab.
    pub kxps: Vec<Kxp>,
    pub lab: Lab,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn new(nodes: u8, pods: u8, kxp_on: &[u8], services: &[Svc]) -> Cluster {
        Cluster::new_with(nodes, pods, kxp_on, services, "")
    }

    pub fn new_with(nodes: u8, pods: u8, kxp_on: &[u8], services: &[Svc], extra: &str) -> Cluster {
        Cluster::with(Lab::build(nodes, pods).expect("lab builds"), kxp_on, services, extra)
    }

    /// kxp on the nodes `kxp_on` of `lab`, with `extra` lines for each
    /// config's `kxp:` section.
    pub fn with(lab: Lab, kxp_on: &[u8], services: &[Svc], extra: &str) -> Cluster {
        Cluster::with_config(lab, kxp_on, services, "", extra)
    }

    /// `with`, plus `top` lines for the KubeProxyConfiguration itself.
    pub fn with_config(lab: Lab, kxp_on: &[u8], services: &[Svc], top: &str, extra: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        write_manifests(&dir.path().join("manifests"), &lab, services).unwrap();
        let bin = Path::new(env!("CARGO_BIN_EXE_kxp"));
        let kxps = kxp_on
            .iter()
            .map(|n| {
                let node = &lab.nodes[usize::from(*n) - 1];
                Kxp::start_configured(bin, node, &dir.path().join("manifests"), dir.path(), top, extra)
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        Cluster { kxps, lab, dir }
    }

    pub fn pod(&self, n: u8, i: u8) -> &Host {
        &self.lab.nodes[usize::from(n) - 1].pods[usize::from(i)]
    }

    /// Rewrites the manifests and waits until every kxp has applied them.
    pub fn update(&self, services: &[Svc]) {
        let before: Vec<f64> = self.kxps.iter().map(changes).collect();
        write_manifests(&self.dir.path().join("manifests"), &self.lab, services).unwrap();
        wait_for("kxp applied the new manifests", || {
            self.kxps.iter().zip(&before).all(|(k, b)| changes(k) > *b)
        });
    }

    pub fn assert_no_checksum_errors(&self) {
        let mut hosts = vec![self.lab.client.clone()];
        for n in &self.lab.nodes {
            hosts.push(n.host.clone());
            hosts.extend(n.pods.iter().cloned());
        }
        for h in hosts {
            assert_eq!(h.csum_errors().unwrap(), 0, "{} counted checksum errors", h.ns);
        }
    }

    /// Every kxp's non-zero drop and event counters, for failure messages.
    pub fn counters(&self) -> String {
        self.kxps
            .iter()
            .flat_map(|k| {
                k.metrics()
                    .lines()
                    .filter(|l| {
                        l.starts_with("kxp_worker_drops")
                            || l.starts_with("kxp_worker_events")
                            || l.starts_with("kxp_steering_packets")
                            || l.starts_with("kxp_worker_packets")
                    })
                    .filter(|l| !l.ends_with(" 0") && !l.contains("queue=\"all\""))
                    .map(|l| format!("{}: {l}", k.ns))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn dropped(&self, reason: &str) -> f64 {
        let label = format!("reason=\"{reason}\"");
        self.kxps
            .iter()
            .map(|k| k.metric_sum("kxp_worker_drops", &[&label]))
            .sum()
    }
}

/// Connections this host's stack has accepted (TCP passive opens).
pub fn passive_opens(h: &Host) -> u64 {
    nstat(h, "TcpPassiveOpens")
}

/// TCP segments this host's stack has received (a lone SYN counts).
pub fn tcp_segments_in(h: &Host) -> u64 {
    nstat(h, "TcpInSegs")
}

pub fn nstat(h: &Host, counter: &str) -> u64 {
    let out = h.exec(&["nstat", "-asz", counter]).unwrap();
    out.lines()
        .find(|l| l.starts_with(counter))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

pub fn changes(k: &Kxp) -> f64 {
    k.metric_sum("kubeproxy_sync_proxy_rules_service_changes_total", &[])
}

pub fn wait_for(what: &str, f: impl FnMut() -> bool) {
    wait_for_within(what, Duration::from_secs(20), f);
}

/// Polls `f` every 100 ms until it holds; fails after `limit`.
pub fn wait_for_within(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn greet(from: &Host, to: SocketAddr) -> String {
    connect(&from.ns, to, Duration::from_secs(3)).unwrap_or_else(|e| panic!("{} -> {to}: {e}", from.ns))
}

/// iperf3 servers on the given hosts, killed on drop.
pub struct Iperf(Vec<std::process::Child>);

impl Iperf {
    pub fn serve(hosts: &[&Host]) -> Iperf {
        let children = hosts
            .iter()
            .map(|h| {
                Command::new("ip")
                    .args(["netns", "exec", &h.ns, "iperf3", "-s", "-p", &PORT.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("iperf3 runs (deploy/setup.sh installs it)")
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        Iperf(children)
    }
}

impl Drop for Iperf {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A bounded iperf3 run: `bytes` of TCP, or of UDP at 50 Mbit/s. Returns
/// the bytes the server received.
pub fn iperf(from: &Host, to: Ipv4Addr, port: u16, bytes: &str, udp: bool) -> f64 {
    let port = port.to_string();
    let to = to.to_string();
    let mut args = vec![
        "iperf3",
        "-c",
        &to,
        "-p",
        &port,
        "-n",
        bytes,
        "-J",
        "--connect-timeout",
        "3000",
    ];
    if udp {
        args.extend(["-u", "-b", "50M", "-l", "1200"]);
    }
    let out = from
        .exec(&args)
        .unwrap_or_else(|e| panic!("iperf3 from {} to {to}:{port}: {e}", from.ns));
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    assert!(
        v.get("error").is_none(),
        "iperf3 {} -> {to}:{port}: {}",
        from.ns,
        v["error"]
    );
    let end = &v["end"];
    if udp {
        let sum = &end["sum"];
        let lost = sum["lost_percent"].as_f64().unwrap_or(100.0);
        assert!(lost < 5.0, "UDP {} -> {to}:{port} lost {lost}%", from.ns);
        sum["bytes"].as_f64().unwrap_or(0.0) * (1.0 - lost / 100.0)
    } else {
        // TCP is reliable and iperf3 reported no error: what was sent
        // arrived (the receiver's byte count is sampled before the end).
        end["sum_sent"]["bytes"].as_f64().unwrap_or(0.0)
    }
}
