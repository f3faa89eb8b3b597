//! kxp's configuration: a YAML file that follows kube-proxy's
//! `KubeProxyConfiguration` where a field means the same thing, plus a
//! `kxp:` section for what only kxp has. Command-line flags override it.
//! Fields of KubeProxyConfiguration that do not apply to kxp (mode,
//! iptables, ipvs, ...) are accepted and ignored, so an existing file works.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use dataplane::addr::Cidr;
use dataplane::flow::{CtConfig, Timeouts};
use dataplane::tables::ChecksumPolicy;
use runtime::sockets::UmemLayout;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// The file as written (all optional).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileConfig {
    pub kind: Option<String>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub hostname_override: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub conntrack: Option<FileConntrack>,
    pub min_sync_period: Option<String>,
    pub sync_period: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub kxp: Option<FileKxp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileConntrack {
    pub max_per_core: Option<u32>,
    pub min: Option<u32>,
    pub tcp_established_timeout: Option<String>,
    pub tcp_close_wait_timeout: Option<String>,
    pub udp_timeout: Option<String>,
    pub udp_stream_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileKxp {
    /// The uplink (exactly one today); empty: no datapath, control only.
    pub interfaces: Option<Vec<String>>,
    /// Node-side interfaces of local pods' veths.
    pub pod_interfaces: Option<Vec<String>>,
    /// Interface name prefixes of pod veths (e.g. `cali`, `veth`): served
    /// as they appear, released as they go.
    pub pod_interface_prefixes: Option<Vec<String>>,
    /// The local VXLAN device whose MAC is this node's VTEP MAC (Flannel's
    /// `flannel.1` by default), for interop with kernel VXLAN peers.
    pub vxlan_device: Option<String>,
    /// Service address ranges (the API server's service-cluster-ip-range):
    /// routed into kxp's TUN device so the node itself reaches services.
    #[serde(rename = "serviceCIDRs")]
    pub service_cidrs: Option<Vec<String>>,
    /// That TUN device's name (default `kxp0`).
    pub host_device: Option<String>,
    pub queues: Option<u32>,
    pub worker_cores: Option<Vec<usize>>,
    /// SCHED_FIFO priority (1-99) for the workers; absent: normal.
    pub worker_priority: Option<u8>,
    pub vxlan_vni: Option<u32>,
    pub vxlan_port: Option<u16>,
    /// `incremental` (default) or `full`.
    pub checksum: Option<String>,
    /// `LOW-HIGH`, default `1024-29999`.
    pub snat_ports: Option<String>,
    /// `LOW-HIGH`, default `30000-32767`.
    pub node_port_range: Option<String>,
    /// Try zero-copy AF_XDP on the uplink (default true; copy mode where
    /// the driver has none).
    pub zero_copy: Option<bool>,
    /// `auto` (default): pods share the uplink's UMEM unless the uplink
    /// binds zero-copy; `split`: pods always in a UMEM of their own.
    pub umem_layout: Option<String>,
}

/// The resolved configuration kxp runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    pub cluster_cidr: Option<Cidr>,
    /// Empty: NodePorts answer on every node address (kube-proxy's default).
    pub node_port_addresses: Vec<Cidr>,
    pub conntrack: CtConfig,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    pub healthz_bind_address: SocketAddr,
    pub metrics_bind_address: SocketAddr,
    pub interfaces: Vec<String>,
    pub pod_interfaces: Vec<String>,
    pub pod_interface_prefixes: Vec<String>,
    pub vxlan_device: String,
    /// Empty: the node's own connections to services are not served.
    pub service_cidrs: Vec<Cidr>,
    pub host_device: String,
    pub queues: u32,
    pub worker_cores: Vec<usize>,
    pub worker_priority: Option<u8>,
    pub vxlan_vni: u32,
    pub vxlan_port: u16,
    pub checksum: ChecksumPolicy,
    pub snat_ports: (u16, u16),
    pub node_port_range: (u16, u16),
    pub zero_copy: bool,
    pub umem_layout: UmemLayout,
}

impl Config {
    /// Defaults, then the file (if any); flags are applied by the caller.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let file = match path {
            None => FileConfig::default(),
            Some(p) => {
                let name = p.display().to_string();
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: name.clone(),
                    source,
                })?;
                serde_yaml::from_str(&text).map_err(|e| ConfigError::Invalid {
                    path: name,
                    reason: e.to_string(),
                })?
            }
        };
        let name = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<defaults>".into());
        Config::resolve(file).map_err(|reason| ConfigError::Invalid { path: name, reason })
    }

    pub fn resolve(f: FileConfig) -> Result<Config, String> {
        if let Some(k) = f.kind.as_deref().filter(|k| *k != "KubeProxyConfiguration") {
            return Err(format!("kind is {k:?}, expected KubeProxyConfiguration"));
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let ct = f.conntrack.unwrap_or_default();
        let d = Timeouts::default();
        let timeouts = Timeouts {
            tcp_established: opt_duration("conntrack.tcpEstablishedTimeout", ct.tcp_established_timeout)?
                .unwrap_or(d.tcp_established),
            tcp_close_wait: opt_duration("conntrack.tcpCloseWaitTimeout", ct.tcp_close_wait_timeout)?
                .unwrap_or(d.tcp_close_wait),
            udp: opt_duration("conntrack.udpTimeout", ct.udp_timeout)?.unwrap_or(d.udp),
            udp_stream: opt_duration("conntrack.udpStreamTimeout", ct.udp_stream_timeout)?.unwrap_or(d.udp_stream),
            ..d
        };
        // kube-proxy: max(maxPerCore * cores, min), defaults 32768 and 131072.
        let capacity = (ct.max_per_core.unwrap_or(32768) * cores).max(ct.min.unwrap_or(131072)) as usize;
        let kxp = f.kxp.unwrap_or_default();
        let cluster_cidr = match f.cluster_cidr.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            // A dual-stack list: kxp uses the IPv4 entry.
            Some(s) => Some(
                s.split(',')
                    .map(str::trim)
                    .find(|c| !c.contains(':'))
                    .ok_or_else(|| format!("clusterCIDR {s:?} has no IPv4 CIDR"))?
                    .parse::<Cidr>()
                    .map_err(|e| format!("clusterCIDR: {e}"))?,
            ),
            None => None,
        };
        let node_port_addresses = f
            .node_port_addresses
            .unwrap_or_default()
            .iter()
            .filter(|s| !s.contains(':') && s.as_str() != "primary")
            .map(|s| s.parse::<Cidr>().map_err(|e| format!("nodePortAddresses: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Config {
            node_name: f
                .hostname_override
                .filter(|s| !s.is_empty())
                .or_else(|| std::env::var("NODE_NAME").ok())
                .unwrap_or_else(hostname),
            cluster_cidr,
            node_port_addresses,
            conntrack: CtConfig {
                capacity,
                timeouts,
                ..CtConfig::default()
            },
            min_sync_period: opt_duration("minSyncPeriod", f.min_sync_period)?.unwrap_or(Duration::from_secs(1)),
            sync_period: opt_duration("syncPeriod", f.sync_period)?.unwrap_or(Duration::from_secs(30)),
            healthz_bind_address: bind("healthzBindAddress", f.healthz_bind_address, "0.0.0.0:10256")?,
            metrics_bind_address: bind("metricsBindAddress", f.metrics_bind_address, "127.0.0.1:10249")?,
            interfaces: kxp.interfaces.unwrap_or_default(),
            pod_interfaces: kxp.pod_interfaces.unwrap_or_default(),
            pod_interface_prefixes: kxp.pod_interface_prefixes.unwrap_or_default(),
            vxlan_device: kxp.vxlan_device.unwrap_or_else(|| "flannel.1".into()),
            service_cidrs: kxp
                .service_cidrs
                .unwrap_or_default()
                .iter()
                .filter(|s| !s.contains(':'))
                .map(|s| s.parse::<Cidr>().map_err(|e| format!("kxp.serviceCIDRs: {e}")))
                .collect::<Result<_, _>>()?,
            host_device: kxp.host_device.unwrap_or_else(|| "kxp0".into()),
            queues: kxp.queues.unwrap_or(1),
            worker_cores: kxp.worker_cores.unwrap_or_default(),
            worker_priority: match kxp.worker_priority {
                Some(p @ 1..=99) => Some(p),
                Some(p) => return Err(format!("kxp.workerPriority {p}: expected 1 to 99 (SCHED_FIFO)")),
                None => None,
            },
            vxlan_vni: kxp.vxlan_vni.unwrap_or(1),
            vxlan_port: kxp.vxlan_port.unwrap_or(8472),
            zero_copy: kxp.zero_copy.unwrap_or(true),
            umem_layout: match kxp.umem_layout.as_deref().unwrap_or("auto") {
                "auto" => UmemLayout::Auto,
                "split" => UmemLayout::Split,
                other => return Err(format!("kxp.umemLayout {other:?}: expected auto or split")),
            },
            checksum: match kxp.checksum.as_deref().unwrap_or("incremental") {
                "incremental" => ChecksumPolicy::Incremental,
                "full" => ChecksumPolicy::Full,
                other => return Err(format!("kxp.checksum {other:?}: expected incremental or full")),
            },
            snat_ports: range("kxp.snatPorts", kxp.snat_ports.as_deref().unwrap_or("1024-29999"))?,
            node_port_range: range(
                "kxp.nodePortRange",
                kxp.node_port_range.as_deref().unwrap_or("30000-32767"),
            )?,
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn opt_duration(field: &str, v: Option<String>) -> Result<Option<Duration>, String> {
    v.map(|s| parse_go_duration(&s).map_err(|e| format!("{field}: {e}")))
        .transpose()
}

fn bind(field: &str, v: Option<String>, default: &str) -> Result<SocketAddr, String> {
    let s = v.filter(|s| !s.is_empty()).unwrap_or_else(|| default.to_string());
    s.parse().map_err(|_| format!("{field}: {s:?} is not an address:port"))
}

/// Parses `LOW-HIGH` port ranges.
pub fn range(field: &str, s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{field}: {s:?} is not a port range LOW-HIGH");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let lo: u16 = a.trim().parse().map_err(|_| bad())?;
    let hi: u16 = b.trim().parse().map_err(|_| bad())?;
    if lo == 0 || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// Go's `time.Duration` text form as Kubernetes writes it: `24h0m0s`, `1s`,
/// `500ms`, `1m30s`, `1.5h`.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (e.g. 1s, 500ms, 24h0m0s)");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let n: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        total += n * secs;
        rest = &rest[unit_end..];
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("24h0m0s").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_go_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_go_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_go_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert!(parse_go_duration("10").is_err());
        assert!(parse_go_duration("5d").is_err());
    }

    #[test]
    fn a_kube_proxy_configuration_file_resolves() {
        let f: FileConfig = serde_yaml::from_str(
            r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: 10.244.0.0/16,fd00::/48
hostnameOverride: n1
conntrack: {maxPerCore: 1000, min: 5000, tcpEstablishedTimeout: 2h0m0s, udpTimeout: 10s}
minSyncPeriod: 200ms
syncPeriod: 1m
metricsBindAddress: 0.0.0.0:9999
iptables: {masqueradeAll: false}
kxp: {checksum: full, vxlanVni: 7, snatPorts: 2000-2999, zeroCopy: false, umemLayout: split}
"#,
        )
        .unwrap();
        let c = Config::resolve(f).unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.cluster_cidr, Some("10.244.0.0/16".parse().unwrap()));
        assert_eq!(c.conntrack.timeouts.tcp_established, Duration::from_secs(7200));
        assert_eq!(c.conntrack.timeouts.udp, Duration::from_secs(10));
        assert!(c.conntrack.capacity >= 5000);
        assert_eq!(
            (c.min_sync_period, c.sync_period),
            (Duration::from_millis(200), Duration::from_secs(60))
        );
        assert_eq!(c.metrics_bind_address, "0.0.0.0:9999".parse().unwrap());
        assert_eq!(c.healthz_bind_address, "0.0.0.0:10256".parse().unwrap());
        assert_eq!(
            (c.checksum, c.vxlan_vni, c.vxlan_port, c.snat_ports),
            (ChecksumPolicy::Full, 7, 8472, (2000, 2999))
        );
        assert_eq!((c.zero_copy, c.umem_layout), (false, UmemLayout::Split));
    }

    #[test]
    fn bad_values_are_named() {
        let f: FileConfig = serde_yaml::from_str("minSyncPeriod: soon\n").unwrap();
        assert!(Config::resolve(f).unwrap_err().contains("minSyncPeriod"));
        let f: FileConfig = serde_yaml::from_str("kxp: {checksum: maybe}\n").unwrap();
        assert!(Config::resolve(f).unwrap_err().contains("kxp.checksum"));
        let f: FileConfig = serde_yaml::from_str("kxp: {umemLayout: three}\n").unwrap();
        assert!(Config::resolve(f).unwrap_err().contains("kxp.umemLayout"));
        let f: FileConfig = serde_yaml::from_str("kxp: {workerPriority: 0}\n").unwrap();
        assert!(Config::resolve(f).unwrap_err().contains("kxp.workerPriority"));
        let f: FileConfig = serde_yaml::from_str("kind: Pod\n").unwrap();
        assert!(Config::resolve(f).is_err());
    }
}
