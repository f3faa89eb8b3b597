//! The lab: a small cluster built from network namespaces on one machine,
//! shared by the runtime and control tests, the benchmarks and (next) the
//! lab demo.
//!
//! ```text
//!   client (192.168.77.100) ─┐
//!                            ├─ bridge br0 in the "underlay" namespace
//!   node n1 eth0 .1 ─────────┤
//!   node n2 eth0 .2 ─────────┘
//!   node nN: pods 10.77.N.2, 10.77.N.3, ... each a /32 on a veth whose
//!            node side (vpN_I) holds the gateway 10.77.N.1/32, Calico-style
//!            (every pod packet goes through the node); a Flannel-style
//!            kernel VXLAN device (VNI 1, UDP 8472, VTEP 10.77.N.0) carries
//!            pod traffic between nodes.
//! ```
//!
//! Every name carries a per-run prefix, nothing is created in the caller's
//! namespace, and `Drop` deletes every namespace the lab made (which deletes
//! their links too), also on panic. Every veth has tx checksum offload off:
//! pod veths as CNIs set them up for userspace dataplanes, underlay veths
//! because a real wire carries complete checksums (see DESIGN.md section 4).
//! Pod MTU is 1450, leaving room for VXLAN as Flannel does.

pub mod flood;
pub mod kxp;
pub mod probe;

use std::net::Ipv4Addr;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("cannot run `{cmd}`: {source}; install iproute2 and ethtool (deploy/setup.sh does)")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("`{cmd}` failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("the lab needs root (network namespaces, veths, VXLAN): run as root")]
    NotRoot,
    #[error("cannot enter network namespace {ns}: {reason}")]
    Enter { ns: String, reason: String },
}

/// Runs a command, returning stdout or an error that names it.
pub fn run(args: &[&str]) -> Result<String, LabError> {
    let cmd = args.join(" ");
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|source| LabError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::Failed {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// For root-only tests: true when running as root. Otherwise the test must
/// return early — except under CI=true, where CI runs as root and a skip
/// would hide a failure, so this panics instead.
pub fn root_or_skip() -> bool {
    if is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI must run the lab tests as root");
    eprintln!("skipping: the lab needs root");
    false
}

/// Runs `f` on a new thread inside network namespace `ns` (setns changes
/// only the calling thread), for work that needs the namespace's interfaces
/// in-process, such as attaching XDP programs.
pub fn in_namespace<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T, LabError> {
    let enter = |reason: String| LabError::Enter {
        ns: ns.to_string(),
        reason,
    };
    let file = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|e| enter(e.to_string()))?;
    let handle = std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
        Ok::<T, String>(f())
    });
    handle
        .join()
        .map_err(|_| enter("the thread panicked".into()))?
        .map_err(enter)
}

/// One namespace of the lab.
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    pub ip: Ipv4Addr,
}

impl Host {
    /// Whether an XDP program is attached to this host's `eth0`.
    pub fn xdp_attached(&self) -> bool {
        self.exec(&["ip", "link", "show", "eth0"])
            .map(|s| s.contains("xdp"))
            .unwrap_or(false)
    }

    /// Checksum errors this host's stack has counted on receive (the sum of
    /// nstat's `*InCsumErrors`: IP, TCP, UDP, ICMP).
    pub fn csum_errors(&self) -> Result<u64, LabError> {
        let out = self.exec(&["nstat", "-asz"])?;
        Ok(out
            .lines()
            .filter(|l| l.contains("InCsumErrors"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum())
    }

    /// Runs a command inside this host's namespace.
    pub fn exec(&self, args: &[&str]) -> Result<String, LabError> {
        let mut full = vec!["ip", "netns", "exec", &self.ns];
        full.extend_from_slice(args);
        run(&full)
    }
}

pub struct Node {
    pub host: Host,
    /// 1-based node number (pod CIDR 10.77.N.0/24).
    pub index: u8,
    pub pods: Vec<Host>,
}

pub struct Lab {
    prefix: String,
    /// Queues per veth, as `ip link` wants it.
    queues: String,
    namespaces: Vec<String>,
    pub underlay: String,
    pub client: Host,
    pub nodes: Vec<Node>,
}

pub const VXLAN_VNI: u32 = 1;
pub const VXLAN_PORT: u16 = 8472;

pub fn node_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, n)
}

pub fn pod_ip(n: u8, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, n, 2 + i)
}

pub fn vtep_mac(n: u8) -> String {
    format!("0e:77:00:00:00:{n:02x}")
}

impl Lab {
    /// Builds `nodes` nodes with `pods_per_node` pods each, routed by the
    /// kernel (VXLAN between nodes): the baseline kxp replaces.
    pub fn build(nodes: u8, pods_per_node: u8) -> Result<Lab, LabError> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Lab::build_named(&format!("kxp{}x{n}", std::process::id()), nodes, pods_per_node)
    }

    /// Same, with `queues` receive and transmit queues on every veth (for
    /// multi-queue datapaths).
    pub fn build_with_queues(nodes: u8, pods_per_node: u8, queues: u8) -> Result<Lab, LabError> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Lab::build_inner(&format!("kxp{}q{n}", std::process::id()), nodes, pods_per_node, queues)
    }

    /// Same, with an explicit name prefix for every namespace.
    pub fn build_named(prefix: &str, nodes: u8, pods_per_node: u8) -> Result<Lab, LabError> {
        Lab::build_inner(prefix, nodes, pods_per_node, 1)
    }

    fn build_inner(prefix: &str, nodes: u8, pods_per_node: u8, queues: u8) -> Result<Lab, LabError> {
        if !is_root() {
            return Err(LabError::NotRoot);
        }
        let prefix = prefix.to_string();
        let mut lab = Lab {
            underlay: format!("{prefix}-ul"),
            client: Host {
                ns: format!("{prefix}-client"),
                ip: Ipv4Addr::new(192, 168, 77, 100),
            },
            nodes: Vec::new(),
            namespaces: Vec::new(),
            prefix,
            queues: queues.max(1).to_string(),
        };
        // From here on, Drop cleans up whatever was made, even on error.
        lab.make_ns(&lab.underlay.clone())?;
        run(&["ip", "-n", &lab.underlay, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &lab.underlay, "link", "set", "br0", "up"])?;
        let client = lab.client.clone();
        lab.make_ns(&client.ns)?;
        lab.attach(&client, "c")?;
        for n in 1..=nodes {
            let host = Host {
                ns: format!("{}-n{n}", lab.prefix),
                ip: node_ip(n),
            };
            lab.make_ns(&host.ns)?;
            lab.attach(&host, &format!("n{n}"))?;
            host.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            lab.nodes.push(Node {
                host,
                index: n,
                pods: Vec::new(),
            });
            for _ in 0..pods_per_node {
                lab.add_pod(n)?;
            }
        }
        lab.kernel_overlay()?;
        Ok(lab)
    }

    /// Adds a pod to node `n` (1-based): a namespace with the next pod
    /// address, behind a new veth `vpN_I` on the node. Also while kxp runs,
    /// as a CNI would.
    pub fn add_pod(&mut self, n: u8) -> Result<Host, LabError> {
        let node = &self.nodes[usize::from(n) - 1];
        let host = node.host.clone();
        let i = node.pods.len() as u8;
        let pod = Host {
            ns: format!("{}-n{n}p{i}", self.prefix),
            ip: pod_ip(n, i),
        };
        self.make_ns(&pod.ns)?;
        let node_side = format!("vp{n}_{i}");
        self.veth(&host.ns, &node_side, &pod.ns)?;
        let gw = format!("10.77.{n}.1");
        host.exec(&["ip", "addr", "add", &format!("{gw}/32"), "dev", &node_side])?;
        host.exec(&["ip", "link", "set", &node_side, "up"])?;
        host.exec(&["ip", "route", "add", &format!("{}/32", pod.ip), "dev", &node_side])?;
        pod.exec(&["ip", "addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"])?;
        // Room for the VXLAN header, as Flannel sets pod MTUs.
        pod.exec(&["ip", "link", "set", "eth0", "mtu", "1450", "up"])?;
        pod.exec(&["ip", "route", "add", &format!("{gw}/32"), "dev", "eth0"])?;
        pod.exec(&["ip", "route", "replace", "default", "via", &gw, "dev", "eth0"])?;
        // Complete checksums on frames that leave the pod (see module docs).
        pod.exec(&["ethtool", "-K", "eth0", "tx", "off"])?;
        host.exec(&["ethtool", "-K", &node_side, "tx", "off"])?;
        self.nodes[usize::from(n) - 1].pods.push(pod.clone());
        Ok(pod)
    }

    /// Deletes the last pod of node `n` (its namespace, and with it the
    /// veth), as a CNI does when a pod ends.
    pub fn remove_last_pod(&mut self, n: u8) -> Result<(), LabError> {
        let node = &mut self.nodes[usize::from(n) - 1];
        let Some(pod) = node.pods.pop() else {
            return Ok(());
        };
        // The veth first, synchronously: a namespace's links go with it only
        // when the kernel gets round to it, and the next pod may want the name.
        let node_side = format!("vp{n}_{}", node.pods.len());
        run(&["ip", "-n", &node.host.ns, "link", "del", &node_side])?;
        run(&["ip", "netns", "del", &pod.ns])?;
        self.namespaces.retain(|ns| *ns != pod.ns);
        Ok(())
    }

    /// Turns transmit checksum offload (and with it TSO and GSO, which
    /// depend on it) back on, or off again, on every veth end the lab turned
    /// it off on: what a node without kxp has by default, for the kernel
    /// baselines. kxp needs it off (see the module docs).
    pub fn set_tx_offloads(&self, on: bool) -> Result<(), LabError> {
        let state = if on { "on" } else { "off" };
        self.client.exec(&["ethtool", "-K", "eth0", "tx", state])?;
        for node in &self.nodes {
            node.host.exec(&["ethtool", "-K", "eth0", "tx", state])?;
            for (i, pod) in node.pods.iter().enumerate() {
                pod.exec(&["ethtool", "-K", "eth0", "tx", state])?;
                let node_side = format!("vp{}_{i}", node.index);
                node.host.exec(&["ethtool", "-K", &node_side, "tx", state])?;
            }
        }
        Ok(())
    }

    fn make_ns(&mut self, ns: &str) -> Result<(), LabError> {
        run(&["ip", "netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A veth `name` in namespace `ns` whose peer is `eth0` in `peer_ns`,
    /// both with the lab's queue count.
    fn veth(&self, ns: &str, name: &str, peer_ns: &str) -> Result<(), LabError> {
        let q = self.queues.as_str();
        run(&[
            "ip",
            "-n",
            ns,
            "link",
            "add",
            name,
            "numtxqueues",
            q,
            "numrxqueues",
            q,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "numtxqueues",
            q,
            "numrxqueues",
            q,
            "netns",
            peer_ns,
        ])
        .map(|_| ())
    }

    /// A veth from `host` (eth0) to the underlay bridge.
    fn attach(&self, host: &Host, tag: &str) -> Result<(), LabError> {
        let br_side = format!("u-{tag}");
        self.veth(&self.underlay, &br_side, &host.ns)?;
        run(&[
            "ip",
            "-n",
            &self.underlay,
            "link",
            "set",
            &br_side,
            "master",
            "br0",
            "up",
        ])?;
        host.exec(&["ip", "addr", "add", &format!("{}/24", host.ip), "dev", "eth0"])?;
        host.exec(&["ip", "link", "set", "eth0", "up"])?;
        // A wire delivers complete checksums; a veth with tx offload on
        // would hand on CHECKSUM_PARTIAL frames (see module docs).
        host.exec(&["ethtool", "-K", "eth0", "tx", "off"])?;
        Ok(())
    }

    /// Flannel-style VXLAN between every pair of nodes, kernel only.
    fn kernel_overlay(&self) -> Result<(), LabError> {
        for node in &self.nodes {
            let h = &node.host;
            h.exec(&[
                "ip",
                "link",
                "add",
                "flannel.1",
                "type",
                "vxlan",
                "id",
                &VXLAN_VNI.to_string(),
                "dstport",
                &VXLAN_PORT.to_string(),
                "local",
                &h.ip.to_string(),
                "dev",
                "eth0",
                "nolearning",
            ])?;
            h.exec(&["ip", "link", "set", "flannel.1", "address", &vtep_mac(node.index), "up"])?;
            h.exec(&[
                "ip",
                "addr",
                "add",
                &format!("10.77.{}.0/32", node.index),
                "dev",
                "flannel.1",
            ])?;
            for other in self.nodes.iter().filter(|o| o.index != node.index) {
                let vtep = format!("10.77.{}.0", other.index);
                h.exec(&[
                    "ip",
                    "route",
                    "add",
                    &format!("10.77.{}.0/24", other.index),
                    "via",
                    &vtep,
                    "dev",
                    "flannel.1",
                    "onlink",
                ])?;
                h.exec(&[
                    "ip",
                    "neigh",
                    "add",
                    &vtep,
                    "lladdr",
                    &vtep_mac(other.index),
                    "dev",
                    "flannel.1",
                    "nud",
                    "permanent",
                ])?;
                h.exec(&[
                    "bridge",
                    "fdb",
                    "append",
                    &vtep_mac(other.index),
                    "dev",
                    "flannel.1",
                    "dst",
                    &other.host.ip.to_string(),
                ])?;
            }
        }
        Ok(())
    }

    /// Namespaces this lab created (for tests that check cleanup).
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// Deletes every namespace whose name starts with `prefix-` (a lab left by
/// a killed run, or the lab of a run being interrupted).
pub fn remove_namespaces_with_prefix(prefix: &str) {
    let Ok(list) = run(&["ip", "netns", "list"]) else {
        return;
    };
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        if ns.starts_with(&format!("{prefix}-")) {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}
