//! kxp on the lab's nodes: the manifests that describe the lab cluster
//! (Nodes, Services, EndpointSlices) and a running `kxp run` per node,
//! killed on drop. Shared by the demo and the integration tests.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{node_ip, vtep_mac, Lab, LabError, Node};

/// The lab's Node objects: InternalIP, pod CIDR and Flannel's VtepMAC.
pub fn nodes_yaml(lab: &Lab) -> String {
    let mut s = String::new();
    for n in &lab.nodes {
        let i = n.index;
        let _ = write!(
            s,
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: n{i}\n  annotations:\n    \
             flannel.alpha.coreos.com/backend-data: '{{\"VNI\":1,\"VtepMAC\":\"{mac}\"}}'\n\
             spec: {{podCIDR: 10.77.{i}.0/24}}\n\
             status: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n---\n",
            mac = vtep_mac(i),
            ip = node_ip(i),
        );
    }
    s
}

/// One Service with one port (TCP and/or UDP) and its EndpointSlice.
#[derive(Clone, Debug)]
pub struct Svc {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub protocols: Vec<&'static str>,
    pub node_port: Option<u16>,
    pub external_ips: Vec<Ipv4Addr>,
    pub etp_local: bool,
    pub affinity: bool,
    /// (pod address, node number)
    pub endpoints: Vec<(Ipv4Addr, u8)>,
}

impl Svc {
    pub fn new(name: &str, cluster_ip: Ipv4Addr, port: u16, endpoints: &[(Ipv4Addr, u8)]) -> Svc {
        Svc {
            name: name.into(),
            cluster_ip,
            port,
            target_port: port,
            protocols: vec!["TCP", "UDP"],
            node_port: None,
            external_ips: Vec::new(),
            etp_local: false,
            affinity: false,
            endpoints: endpoints.to_vec(),
        }
    }

    /// `new`, TCP only.
    pub fn tcp(name: &str, cluster_ip: Ipv4Addr, port: u16, endpoints: &[(Ipv4Addr, u8)]) -> Svc {
        Svc {
            protocols: vec!["TCP"],
            ..Svc::new(name, cluster_ip, port, endpoints)
        }
    }

    pub fn yaml(&self) -> String {
        let mut s = String::new();
        let ty = if self.node_port.is_some() {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let _ = write!(
            s,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {n}, namespace: lab}}\nspec:\n  type: {ty}\n  clusterIP: {ip}\n",
            n = self.name,
            ip = self.cluster_ip
        );
        if self.etp_local {
            s.push_str("  externalTrafficPolicy: Local\n");
        }
        if self.affinity {
            s.push_str("  sessionAffinity: ClientIP\n");
        }
        if !self.external_ips.is_empty() {
            let ips: Vec<String> = self.external_ips.iter().map(|i| i.to_string()).collect();
            let _ = writeln!(s, "  externalIPs: [{}]", ips.join(", "));
        }
        s.push_str("  ports:\n");
        for p in &self.protocols {
            let _ = write!(
                s,
                "  - {{name: {l}, port: {port}, targetPort: {t}, protocol: {p}",
                l = p.to_lowercase(),
                port = self.port,
                t = self.target_port
            );
            if let Some(np) = self.node_port {
                let _ = write!(s, ", nodePort: {np}");
            }
            s.push_str("}\n");
        }
        let _ = write!(
            s,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {n}-1\n  namespace: lab\n  \
             labels: {{kubernetes.io/service-name: {n}}}\naddressType: IPv4\nports:\n",
            n = self.name
        );
        for p in &self.protocols {
            let _ = writeln!(
                s,
                "- {{name: {l}, port: {t}, protocol: {p}}}",
                l = p.to_lowercase(),
                t = self.target_port
            );
        }
        s.push_str("endpoints:\n");
        if self.endpoints.is_empty() {
            s.truncate(s.len() - "endpoints:\n".len());
            s.push_str("endpoints: []\n");
        }
        for (ip, node) in &self.endpoints {
            let _ = writeln!(
                s,
                "- {{addresses: [{ip}], nodeName: n{node}, conditions: {{ready: true}}}}"
            );
        }
        s.push_str("---\n");
        s
    }
}

/// Writes the lab's Nodes and `services` as the manifest directory `dir`
/// (one file, replaced atomically so kxp never reads half of it).
pub fn write_manifests(dir: &Path, lab: &Lab, services: &[Svc]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut text = nodes_yaml(lab);
    for s in services {
        text.push_str(&s.yaml());
    }
    let tmp = dir.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join("cluster.yaml"))
}

/// `kxp run` in one node's namespace; killed on drop.
pub struct Kxp {
    child: Child,
    pub ns: String,
    pub metrics: String,
}

impl Kxp {
    /// Starts kxp on `node` with its uplink and every pod interface, from
    /// the manifest directory `manifests`; returns once it is healthy (has
    /// synced) or fails with its log.
    pub fn start(bin: &Path, node: &Node, manifests: &Path, work: &Path) -> Result<Kxp, LabError> {
        Kxp::start_with(bin, node, manifests, work, "")
    }

    /// `start` with extra lines for the config's `kxp:` section (each
    /// indented by two spaces, e.g. `"  queues: 2\n"`).
    pub fn start_with(
        bin: &Path,
        node: &Node,
        manifests: &Path,
        work: &Path,
        kxp_extra: &str,
    ) -> Result<Kxp, LabError> {
        Kxp::start_configured(bin, node, manifests, work, "", kxp_extra)
    }

    /// `start_with` plus `top` lines for the KubeProxyConfiguration itself
    /// (e.g. `"conntrack: {maxPerCore: 1024, min: 2048}\n"`).
    pub fn start_configured(
        bin: &Path,
        node: &Node,
        manifests: &Path,
        work: &Path,
        top: &str,
        kxp_extra: &str,
    ) -> Result<Kxp, LabError> {
        let n = node.index;
        let pods: Vec<String> = (0..node.pods.len()).map(|i| format!("vp{n}_{i}")).collect();
        let healthz = format!("127.0.0.1:{}", 10256);
        let metrics = format!("127.0.0.1:{}", 10249);
        let cfg = work.join(format!("kxp-n{n}.yaml"));
        let text = format!(
            "kind: KubeProxyConfiguration\nclusterCIDR: 10.77.0.0/16\nhealthzBindAddress: {healthz}\n\
             metricsBindAddress: {metrics}\nminSyncPeriod: 100ms\n{top}kxp:\n  interfaces: [eth0]\n  podInterfaces: [{}]\n{kxp_extra}",
            pods.join(", ")
        );
        let io = |e: std::io::Error| LabError::Spawn {
            cmd: format!("write {}", cfg.display()),
            source: e,
        };
        std::fs::write(&cfg, text).map_err(io)?;
        let log = work.join(format!("kxp-n{n}.log"));
        let log_file = std::fs::File::create(&log).map_err(io)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &node.host.ns])
            .arg(bin)
            .args(["run", "--node-name", &format!("n{n}"), "--manifests"])
            .arg(manifests)
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|source| LabError::Spawn {
                cmd: format!("{} run", bin.display()),
                source,
            })?;
        let mut kxp = Kxp {
            child,
            ns: node.host.ns.clone(),
            metrics,
        };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = kxp.child.try_wait() {
                return Err(LabError::Failed {
                    cmd: format!("kxp run on n{n} ({status})"),
                    stderr: std::fs::read_to_string(&log).unwrap_or_default(),
                });
            }
            if kxp.get(&healthz, "/healthz").is_some_and(|(code, _)| code == 200) {
                return Ok(kxp);
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(LabError::Failed {
                    cmd: format!("kxp run on n{n}: not healthy within 30 s"),
                    stderr: std::fs::read_to_string(&log).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A plain HTTP GET inside the node's namespace: (status, body).
    pub fn get(&self, addr: &str, path: &str) -> Option<(u16, String)> {
        let (addr, path) = (addr.to_string(), path.to_string());
        crate::in_namespace(&self.ns, move || -> Option<(u16, String)> {
            let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
            let mut body = String::new();
            s.read_to_string(&mut body).ok()?;
            let code = body.split_whitespace().nth(1)?.parse().ok()?;
            let body = body
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            Some((code, body))
        })
        .ok()
        .flatten()
    }

    /// The Prometheus text from this kxp's metrics endpoint.
    pub fn metrics(&self) -> String {
        self.get(&self.metrics, "/metrics").map(|(_, b)| b).unwrap_or_default()
    }

    /// Sum of a metric's samples whose label set contains `labels`.
    pub fn metric_sum(&self, name: &str, labels: &[&str]) -> f64 {
        metric_sum(&self.metrics(), name, labels)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kxp's resident memory, in bytes (VmRSS).
    pub fn rss_bytes(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map_or(0, |kb| kb * 1024)
    }

    /// Sends SIGKILL and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Kxp {
    fn drop(&mut self) {
        // SIGTERM first so the workers drain; SIGKILL if it lingers.
        let _ = crate::run(&["kill", "-TERM", &self.child.id().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }
}

/// Sum of the samples of `name` whose labels include every `k="v"` in
/// `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' ')))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The kxp binary next to the running executable (target/<profile>/kxp).
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(name), dir.parent()?.join(name)]
        .into_iter()
        .find(|p| p.exists())
}
