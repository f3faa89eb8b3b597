//! Everything that moves packets on this node, started in the right order:
//! start-up checks, the port table, the steering program on every port,
//! each queue's AF_XDP sockets (one UMEM, or two: see `sockets`) and one
//! pinned worker per queue. Dropping it stops the
//! workers and detaches the programs.

use std::collections::HashMap;
use std::sync::Arc;

use dataplane::addr::{Cidr, PortId};
use dataplane::flow::{CtConfig, FlowState};
use dataplane::tables::{PortRole, Tables};
use dataplane::Reader;
use hdrhistogram::Histogram;

use crate::host::{self, HostError, LinkInfo, PortSpec};
use crate::ports::{Port, PortTable, PortTableFull};
use crate::sockets::{UmemLayout, WorkerSockets};
use crate::steering::{Steering, SteeringError, SteeringStats};
use crate::tun::{HostTun, TunError};
use crate::worker::{self, HostPort, WorkerHandle, WorkerReport, WorkerSpec};
use crate::xsk::{RingSizes, XskError};

#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// In `PortId` order; exactly one uplink.
    pub ports: Vec<PortSpec>,
    /// Queues per port; one worker per queue.
    pub queues: u32,
    /// Cores to pin workers to, round-robin; empty: unpinned.
    pub cores: Vec<usize>,
    /// SCHED_FIFO priority for the workers; `None`: the normal scheduler.
    pub priority: Option<u8>,
    pub rings: RingSizes,
    pub batch: usize,
    /// Try zero-copy on the uplink first (copy mode where unsupported).
    pub zero_copy: bool,
    /// How each worker's sockets share UMEMs.
    pub umem_layout: UmemLayout,
    /// The node's own way to services (a TUN device routed to kxp).
    pub host: Option<HostConfig>,
}

/// The TUN device the node routes service addresses into.
#[derive(Clone, Debug)]
pub struct HostConfig {
    pub name: String,
    /// Service address ranges (kube-apiserver's --service-cluster-ip-range).
    pub cidrs: Vec<Cidr>,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("kxp's datapath needs root (CAP_NET_ADMIN, CAP_BPF, CAP_NET_RAW): run it as root")]
    NotRoot,
    #[error("interface {0} does not exist in this network namespace; fix kxp.interfaces / kxp.podInterfaces or create it first")]
    NoInterface(String),
    #[error(
        "interface {0} already has an XDP program; remove it (`ip link set dev {0} xdp off`) or stop the other kxp"
    )]
    XdpBusy(String),
    #[error("interface {iface} has {have} receive queue(s), kxp.queues asks for {want}; lower kxp.queues or raise the queue count (ethtool -L)")]
    Queues { iface: String, have: u32, want: u32 },
    #[error("exactly one uplink interface is needed (kxp.interfaces), found {0}")]
    Uplinks(usize),
    #[error(transparent)]
    Steering(#[from] SteeringError),
    #[error(transparent)]
    Xsk(#[from] XskError),
    #[error(transparent)]
    Tun(#[from] TunError),
    #[error(transparent)]
    Ports(#[from] PortTableFull),
    #[error(transparent)]
    Kernel(#[from] HostError),
    #[error("cannot start a worker thread: {0}")]
    Thread(#[from] std::io::Error),
}

pub struct Datapath {
    // Workers first: they stop before the programs that feed them go.
    workers: Vec<WorkerHandle>,
    steering: Steering,
    ports: PortTable,
    queues: u32,
}

/// One clear sentence for each thing that would otherwise fail obscurely,
/// given the namespace's interfaces.
pub fn preflight(cfg: &DatapathConfig, links: &HashMap<String, LinkInfo>) -> Result<(), DatapathError> {
    let uplinks = cfg.ports.iter().filter(|p| p.role == PortRole::Uplink).count();
    if uplinks != 1 {
        return Err(DatapathError::Uplinks(uplinks));
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(DatapathError::NotRoot);
    }
    if cfg.queues > crate::steering::MAX_QUEUES {
        return Err(DatapathError::Queues {
            iface: cfg.ports[0].name.clone(),
            have: crate::steering::MAX_QUEUES,
            want: cfg.queues,
        });
    }
    for p in &cfg.ports {
        usable(&p.name, links, cfg.queues)?;
    }
    Ok(())
}

/// Interface `name` exists, has no XDP program and has `queues` queues.
fn usable(name: &str, links: &HashMap<String, LinkInfo>, queues: u32) -> Result<LinkInfo, DatapathError> {
    let link = *links
        .get(name)
        .ok_or_else(|| DatapathError::NoInterface(name.to_string()))?;
    if link.xdp_attached {
        return Err(DatapathError::XdpBusy(name.to_string()));
    }
    if link.rx_queues < queues {
        return Err(DatapathError::Queues {
            iface: name.to_string(),
            have: link.rx_queues,
            want: queues,
        });
    }
    Ok(link)
}

impl Datapath {
    /// Starts the datapath on `cfg`'s ports. Its flow state (conntrack
    /// sized by `conntrack`) keeps the steering program's reply index.
    pub fn start(cfg: &DatapathConfig, reader: Reader, conntrack: CtConfig) -> Result<Datapath, DatapathError> {
        let links = host::links()?;
        preflight(cfg, &links)?;
        let (mut steering, replies) = Steering::load(conntrack.capacity)?;
        let flows = Arc::new(FlowState::with_reply_index(conntrack, replies));
        let mut ports = PortTable::default();
        for p in &cfg.ports {
            let port = Port {
                name: p.name.clone(),
                role: p.role,
                ifindex: links[&p.name].ifindex,
            };
            let id = ports.insert(port)?;
            steering.attach(id, &ports[id])?;
        }
        steering.sync_from(&reader.load())?;
        let host = match &cfg.host {
            Some(h) => {
                let uplink = &ports[ports.with_role(PortRole::Uplink).ok_or(DatapathError::Uplinks(0))?];
                let src = host::first_ipv4(&uplink.name).ok_or_else(|| TunError::Route {
                    name: h.name.clone(),
                    what: "service addresses".into(),
                    reason: "the uplink has no IPv4 address to use as their source".into(),
                })?;
                let tun = HostTun::open(&h.name, &h.cidrs, src)?;
                let id = ports.insert(Port {
                    name: h.name.clone(),
                    role: PortRole::Host,
                    ifindex: tun.ifindex,
                })?;
                Some(HostPort { tun: Arc::new(tun), id })
            }
            None => None,
        };
        let mut workers = Vec::with_capacity(cfg.queues as usize);
        for queue in 0..cfg.queues {
            let sockets = WorkerSockets::open(&ports, queue, cfg.rings, cfg.zero_copy, cfg.umem_layout)?;
            for (id, port) in ports.iter() {
                let Some(fd) = sockets.fd(id) else {
                    continue; // the TUN device: no socket
                };
                steering.bind_socket(id, queue, fd)?;
                let mode = if sockets.copy_mode(id) { "copy" } else { "zero-copy" };
                tracing::info!(iface = %port.name, queue, mode, umems = sockets.umems(), "AF_XDP socket bound");
            }
            let core = (!cfg.cores.is_empty()).then(|| cfg.cores[queue as usize % cfg.cores.len()]);
            let spec = WorkerSpec {
                queue,
                core,
                priority: cfg.priority,
                batch: cfg.batch,
                // Every worker reads the TUN device (each read takes one
                // packet) and writes the replies it routes to the node.
                host: host.as_ref().map(|h| HostPort {
                    tun: h.tun.clone(),
                    id: h.id,
                }),
            };
            workers.push(worker::spawn(spec, sockets, reader.clone(), flows.clone())?);
        }
        Ok(Datapath {
            workers,
            steering,
            ports,
            queues: cfg.queues,
        })
    }

    /// The ports kxp serves.
    pub fn ports(&self) -> &PortTable {
        &self.ports
    }

    /// Serves a new interface (a pod's veth that appeared), given the
    /// namespace's `links`: attaches the program, opens a socket on every
    /// worker's queue, steers them. Returns its `PortId`. Publish tables
    /// that know the port (host facts) before traffic needs it; until then
    /// its frames are dropped as `unknown_port`.
    pub fn add_port(&mut self, spec: &PortSpec, links: &HashMap<String, LinkInfo>) -> Result<PortId, DatapathError> {
        let link = usable(&spec.name, links, self.queues)?;
        let port = Port {
            name: spec.name.clone(),
            role: spec.role,
            ifindex: link.ifindex,
        };
        let id = self.ports.insert(port.clone())?;
        let served = self.serve(id, &port);
        if served.is_err() {
            for w in &self.workers {
                w.remove_port(id);
            }
            let _ = self.steering.detach(id, &port);
            self.ports.remove(id);
        }
        served.map(|()| id)
    }

    fn serve(&mut self, id: PortId, port: &Port) -> Result<(), DatapathError> {
        self.steering.attach(id, port)?;
        for (queue, w) in (0..self.queues).zip(&self.workers) {
            let fd = w.add_port(id, port.clone())?;
            self.steering.bind_socket(id, queue, fd)?;
        }
        Ok(())
    }

    /// Stops serving port `id` (its pod went away): detaches the program
    /// and closes its sockets, taking their frames back.
    pub fn remove_port(&mut self, id: PortId) -> Result<(), SteeringError> {
        let Some(port) = self.ports.get(id).cloned() else {
            return Ok(());
        };
        self.steering.detach(id, &port)?;
        for w in &self.workers {
            let returned = w.remove_port(id);
            tracing::debug!(iface = %port.name, returned, "port's frames back in the pool");
        }
        self.ports.remove(id);
        Ok(())
    }

    /// Brings the steering maps up to freshly published tables.
    pub fn on_publish(&mut self, t: &Tables) -> Result<(), SteeringError> {
        self.steering.sync_from(t)
    }

    pub fn reports(&self) -> Vec<WorkerReport> {
        self.workers.iter().map(WorkerHandle::snapshot).collect()
    }

    /// The steering program's counters (all ports).
    pub fn steering_stats(&mut self) -> SteeringStats {
        self.steering.stats().unwrap_or_default()
    }

    /// Stops the workers (draining their TX rings) and returns their final
    /// reports; the programs detach when `self` is dropped.
    pub fn stop(mut self) -> Vec<WorkerReport> {
        self.shutdown()
    }

    /// `stop` for a datapath behind a shared handle: afterwards no worker
    /// runs and frames that reach the programs take XDP_PASS fallback.
    pub fn shutdown(&mut self) -> Vec<WorkerReport> {
        self.workers.drain(..).map(WorkerHandle::stop).collect()
    }
}

/// All workers' latency histograms merged.
pub fn merged_latency(reports: &[WorkerReport]) -> Histogram<u64> {
    let mut h = worker::new_histogram();
    for r in reports {
        let _ = h.add(&r.latency);
    }
    h
}
