//! `kxp run`: wires a source, the sync loop, the datapath (steering program,
//! AF_XDP workers, kernel facts), and the health and metrics servers
//! together. The workers read the tables the sync loop publishes.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dataplane::addr::Mac;
use dataplane::tables::{NodeConfig, PortRole, Tables};
use dataplane::{Publisher, Reader};
use runtime::datapath::HostConfig;
use runtime::host::{self, PortSpec};
use runtime::xsk::RingSizes;
use runtime::{Datapath, DatapathConfig};
use tokio::sync::Notify;

use crate::compile::NodeContext;
use crate::config::Config;
use crate::health::{self, BindError, HealthCheckServers};
use crate::kube_source::KubeSource;
use crate::metrics::Metrics;
use crate::runner::{HostObserver, KernelFacts, PublishHook, SyncLoop, SyncPolicy, SyncStatus};
use crate::source::{ManifestSource, Source};
use crate::sync::Syncer;

pub enum SourceSpec {
    Manifests(PathBuf),
    Kube(kube::Client),
}

/// A running control process.
pub struct Daemon {
    pub reader: Reader,
    pub status: Arc<SyncStatus>,
    pub metrics: Arc<Metrics>,
    pub healthz_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The steering programs and workers, when interfaces are configured.
    pub datapath: Option<Arc<Mutex<Datapath>>>,
}

/// The tables' node facts from configuration; addresses and pod routes
/// arrive from Node objects, interfaces from the runtime.
pub fn node_config(cfg: &Config) -> NodeConfig {
    let nowhere = dataplane::addr::Cidr::new(Ipv4Addr::UNSPECIFIED, 32);
    let mut n = NodeConfig::single_uplink(&cfg.node_name, Ipv4Addr::UNSPECIFIED, nowhere, Mac::default());
    n.node_ips.clear();
    n.ports.clear();
    n.cluster_cidr = cfg.cluster_cidr;
    n.snat_ports = cfg.snat_ports;
    n.node_port_range = cfg.node_port_range;
    n.vxlan.vni = cfg.vxlan_vni;
    n.vxlan.port = cfg.vxlan_port;
    n.checksum = cfg.checksum;
    n
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Datapath(#[from] runtime::DatapathError),
    #[error("cannot follow the kernel's interface and neighbour changes: {0}")]
    Netlink(#[from] runtime::netlink::NetlinkError),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The datapath's ports from `kxp.interfaces` (the uplink) and
/// `kxp.podInterfaces`; `None` when no interface is configured (control
/// only, e.g. `kxp run` to watch what would be programmed).
pub fn datapath_config(cfg: &Config) -> Option<DatapathConfig> {
    if cfg.interfaces.is_empty() {
        return None;
    }
    let port = |name: &String, role| PortSpec {
        name: name.clone(),
        role,
    };
    let ports = (cfg.interfaces.iter().map(|n| port(n, PortRole::Uplink)))
        .chain(cfg.pod_interfaces.iter().map(|n| port(n, PortRole::Pod)))
        .collect();
    Some(DatapathConfig {
        ports,
        queues: cfg.queues,
        cores: cfg.worker_cores.clone(),
        priority: cfg.worker_priority,
        rings: RingSizes::default(),
        batch: 64,
        // Pods, now or later, never join a zero-copy UMEM: with a
        // zero-copy uplink they get one of their own (runtime::sockets).
        zero_copy: cfg.zero_copy,
        umem_layout: cfg.umem_layout,
        // Always: a host-network backend on this node is reached through it
        // too; the node's own connections to services need serviceCIDRs.
        host: Some(HostConfig {
            name: cfg.host_device.clone(),
            cidrs: cfg.service_cidrs.clone(),
        }),
    })
}

/// Each time it is called: serves pod interfaces that appeared (the
/// configured ones and those matching `kxp.podInterfacePrefixes`), releases
/// those that vanished, then reads the kernel's facts for the current ports
/// (and asks the kernel to resolve the next hops the tables need).
fn host_observer(dp: Arc<Mutex<Datapath>>, cfg: &Config) -> HostObserver {
    let (fixed, prefixes, vxlan_device) = (
        cfg.pod_interfaces.clone(),
        cfg.pod_interface_prefixes.clone(),
        cfg.vxlan_device.clone(),
    );
    Box::new(move |t: &Tables| {
        let (ports, links) = {
            let mut dp = lock(&dp);
            let mut wanted = fixed.clone();
            let links = match host::links() {
                Ok(links) => links,
                Err(e) => {
                    // Never read as "every pod is gone": keep what runs.
                    tracing::warn!(error = %e, "cannot list interfaces; pod ports unchanged");
                    return None;
                }
            };
            wanted.extend(host::interfaces_with_prefixes(&links, &prefixes));
            wanted.sort();
            wanted.dedup();
            // A pod port whose interface went (or was re-created under its
            // name) is released first; a re-created one is served anew below.
            for id in dp.ports().stale(&links) {
                let name = dp.ports()[id].name.clone();
                match dp.remove_port(id) {
                    Ok(()) => tracing::info!(iface = %name, "pod interface gone; released"),
                    Err(e) => tracing::warn!(iface = %name, error = %e, "cannot release a pod interface"),
                }
            }
            wanted.retain(|n| dp.ports().find(n).is_none());
            for new in &wanted {
                let spec = PortSpec {
                    name: new.clone(),
                    role: PortRole::Pod,
                };
                match dp.add_port(&spec, &links) {
                    Ok(id) => tracing::info!(iface = %new, port = id.0, "pod interface served"),
                    Err(e) => tracing::warn!(iface = %new, error = %e, "cannot serve a pod interface; retrying"),
                }
            }
            (dp.ports().clone(), links)
        };
        match host::observe_for(&links, &ports, &vxlan_device, t) {
            Ok(facts) => Some(facts),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the kernel's interfaces and neighbours");
                None
            }
        }
    })
}

pub async fn start(cfg: &Config, source: SourceSpec) -> Result<Daemon, DaemonError> {
    let healthz = health::listen(cfg.healthz_bind_address, "/healthz", "healthzBindAddress").await?;
    let metrics_l = health::listen(cfg.metrics_bind_address, "/metrics", "metricsBindAddress").await?;
    let healthz_addr = healthz.local_addr().unwrap_or(cfg.healthz_bind_address);
    let metrics_addr = metrics_l.local_addr().unwrap_or(cfg.metrics_bind_address);
    let changed = Arc::new(Notify::new());
    let source: Arc<dyn Source> = match source {
        SourceSpec::Manifests(dir) => ManifestSource::spawn(dir, changed.clone(), Duration::from_secs(1)),
        SourceSpec::Kube(client) => KubeSource::spawn(client, changed.clone()),
    };
    let publisher = Publisher::new(Tables::new(node_config(cfg)));
    let reader = publisher.reader();
    let metrics = Arc::new(Metrics::new());
    let mut datapath = None;
    let (on_publish, host) = match datapath_config(cfg) {
        Some(dp_cfg) => {
            let dp = Arc::new(Mutex::new(Datapath::start(&dp_cfg, reader.clone(), cfg.conntrack)?));
            tracing::info!(ports = ?dp_cfg.ports, queues = dp_cfg.queues, "datapath running");
            let reports = dp.clone();
            metrics.set_worker_source(Box::new(move || {
                let mut dp = lock(&reports);
                (dp.reports(), dp.steering_stats())
            }));
            let publish_dp = dp.clone();
            let hook: PublishHook =
                Box::new(move |t: &Tables| lock(&publish_dp).on_publish(t).map_err(|e| e.to_string()));
            let changed = Arc::new(Notify::new());
            let poke = changed.clone();
            runtime::netlink::watch(move || {
                poke.notify_one();
                true
            })?;
            let observer = KernelFacts {
                observe: host_observer(dp.clone(), cfg),
                changed,
            };
            datapath = Some(dp);
            (Some(hook), Some(observer))
        }
        None => (None, None),
    };
    let status = Arc::new(SyncStatus::default());
    let policy = SyncPolicy {
        min_interval: cfg.min_sync_period,
        full_every: cfg.sync_period,
    };
    let sync = SyncLoop {
        source,
        syncer: Syncer::new(publisher),
        ctx: NodeContext {
            node_name: cfg.node_name.clone(),
            node_port_range: cfg.node_port_range,
            cluster_cidr: cfg.cluster_cidr,
        },
        policy,
        changed: changed.clone(),
        status: status.clone(),
        metrics: metrics.clone(),
        health_checks: Some(HealthCheckServers::default()),
        on_publish,
        host,
    };
    tokio::spawn(sync.run());
    changed.notify_one(); // first sync as soon as the source is ready

    // Unhealthy once syncs have stopped for two sync periods (kube-proxy
    // uses the same kind of bound), never less than a minute.
    let stale_after = (cfg.sync_period * 2).max(Duration::from_secs(60));
    health::serve_healthz(healthz, status.clone(), stale_after);
    health::serve_metrics(metrics_l, metrics.clone());
    Ok(Daemon {
        reader,
        status,
        metrics,
        healthz_addr,
        metrics_addr,
        datapath,
    })
}
