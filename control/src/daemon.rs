//! `kxp run`: wires a source, the sync loop, the health and metrics servers
//! together. The AF_XDP workers (issue #4) will read the same `Reader`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dataplane::addr::Mac;
use dataplane::tables::{NodeConfig, Tables};
use dataplane::{Publisher, Reader};
use tokio::sync::Notify;

use crate::compile::NodeContext;
use crate::config::Config;
use crate::health::{self, BindError, HealthCheckServers};
use crate::kube_source::KubeSource;
use crate::metrics::Metrics;
use crate::runner::{PublishHook, SyncLoop, SyncPolicy, SyncStatus};
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
    Steering(#[from] runtime::SteeringError),
}

pub async fn start(cfg: &Config, source: SourceSpec) -> Result<Daemon, DaemonError> {
    let healthz = health::listen(cfg.healthz_bind_address, "/healthz", "healthzBindAddress").await?;
    let metrics_l = health::listen(cfg.metrics_bind_address, "/metrics", "metricsBindAddress").await?;
    // The XDP steering program on every configured interface, its maps
    // following each publish.
    let mut steering = Vec::new();
    for iface in &cfg.interfaces {
        let mut s = runtime::Steering::load()?;
        // Which interfaces face pods comes with the AF_XDP workers (issue
        // #4); until then every configured interface is the uplink.
        s.attach(iface, dataplane::tables::PortRole::Uplink)?;
        tracing::info!(%iface, "XDP steering program attached");
        steering.push(s);
    }
    let on_publish: Option<PublishHook> = if steering.is_empty() {
        None
    } else {
        Some(Box::new(move |t: &Tables| {
            for s in &mut steering {
                if let Err(e) = s.sync_from(t) {
                    tracing::error!(iface = ?s.interface(), error = %e, "cannot update the XDP maps");
                }
            }
        }))
    };
    let healthz_addr = healthz.local_addr().unwrap_or(cfg.healthz_bind_address);
    let metrics_addr = metrics_l.local_addr().unwrap_or(cfg.metrics_bind_address);
    let changed = Arc::new(Notify::new());
    let source: Arc<dyn Source> = match source {
        SourceSpec::Manifests(dir) => ManifestSource::spawn(dir, changed.clone(), Duration::from_secs(1)),
        SourceSpec::Kube(client) => KubeSource::spawn(client, changed.clone()),
    };
    let publisher = Publisher::new(Tables::new(node_config(cfg)));
    let reader = publisher.reader();
    let status = Arc::new(SyncStatus::default());
    let metrics = Arc::new(Metrics::new());
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
    })
}
