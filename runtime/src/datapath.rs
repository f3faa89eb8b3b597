//! Everything that moves packets on this node, started in the right order:
//! start-up checks, the steering program on every port, one AF_XDP socket
//! set (one UMEM) and one pinned worker per queue. Dropping it stops the
//! workers and detaches the programs.

use std::collections::HashMap;
use std::sync::Arc;

use dataplane::addr::Cidr;
use dataplane::flow::{CtConfig, FlowState};
use dataplane::tables::{PortRole, Tables};
use dataplane::Reader;
use hdrhistogram::Histogram;

use crate::host::{self, PortSpec};
use crate::steering::{Steering, SteeringError, SteeringStats};
use crate::tun::{HostTun, TunError};
use crate::worker::{self, HostPort, WorkerHandle, WorkerReport, WorkerSpec};
use crate::xsk::{PortName, RingSizes, XskError, XskSet};

#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// In `PortId` order; exactly one uplink.
    pub ports: Vec<PortSpec>,
    /// Queues per port; one worker per queue.
    pub queues: u32,
    /// Cores to pin workers to, round-robin; empty: unpinned.
    pub cores: Vec<usize>,
    pub rings: RingSizes,
    pub batch: usize,
    /// Try zero-copy on each socket first (copy mode where unsupported).
    pub zero_copy: bool,
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
    #[error("cannot start a worker thread: {0}")]
    Thread(#[from] std::io::Error),
}

pub struct Datapath {
    // Workers first: they stop before the programs that feed them go.
    workers: Vec<WorkerHandle>,
    steering: Steering,
    /// By `PortId`; `None` where a port was removed (the next new port
    /// takes the hole).
    ports: Vec<Option<PortSpec>>,
    /// The interface index each port had when it was attached: a pod veth
    /// re-created under the same name is a new port.
    ifindexes: Vec<u32>,
    queues: u32,
}

fn port_name(p: &PortSpec) -> PortName {
    PortName {
        name: p.name.clone(),
        role: p.role,
    }
}

/// One clear sentence for each thing that would otherwise fail obscurely.
pub fn preflight(cfg: &DatapathConfig) -> Result<(), DatapathError> {
    let uplinks = cfg.ports.iter().filter(|p| p.role == PortRole::Uplink).count();
    if uplinks != 1 {
        return Err(DatapathError::Uplinks(uplinks));
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(DatapathError::NotRoot);
    }
    for p in &cfg.ports {
        let link = host::link_info(&p.name).ok_or_else(|| DatapathError::NoInterface(p.name.clone()))?;
        if link.xdp_attached {
            return Err(DatapathError::XdpBusy(p.name.clone()));
        }
        if cfg.queues > crate::steering::MAX_QUEUES {
            return Err(DatapathError::Queues {
                iface: p.name.clone(),
                have: crate::steering::MAX_QUEUES,
                want: cfg.queues,
            });
        }
        if link.rx_queues < cfg.queues {
            return Err(DatapathError::Queues {
                iface: p.name.clone(),
                have: link.rx_queues,
                want: cfg.queues,
            });
        }
    }
    Ok(())
}

impl Datapath {
    /// Starts the datapath on `cfg`'s ports. Its flow state (conntrack
    /// sized by `conntrack`) keeps the steering program's reply index.
    pub fn start(cfg: &DatapathConfig, reader: Reader, conntrack: CtConfig) -> Result<Datapath, DatapathError> {
        preflight(cfg)?;
        let (mut steering, replies) = Steering::load(conntrack.capacity)?;
        let flows = Arc::new(FlowState::with_reply_index(conntrack, replies));
        for p in &cfg.ports {
            steering.attach(&p.name, p.role)?;
        }
        steering.sync_from(&reader.load())?;
        let mut ports = cfg.ports.clone();
        let host = match &cfg.host {
            Some(h) => {
                let uplink = ports
                    .iter()
                    .find(|p| p.role == PortRole::Uplink)
                    .map(|p| p.name.as_str());
                let src = uplink.and_then(host::first_ipv4).ok_or_else(|| TunError::Route {
                    name: h.name.clone(),
                    what: "service addresses".into(),
                    reason: "the uplink has no IPv4 address to use as their source".into(),
                })?;
                let tun = HostTun::open(&h.name, &h.cidrs, src)?;
                ports.push(PortSpec {
                    name: h.name.clone(),
                    role: PortRole::Host,
                });
                Some(Arc::new(tun))
            }
            None => None,
        };
        let names: Vec<PortName> = ports.iter().map(port_name).collect();
        let mut workers = Vec::with_capacity(cfg.queues as usize);
        for queue in 0..cfg.queues {
            let set = XskSet::open(&names, queue, cfg.rings, cfg.zero_copy)?;
            for (name, port) in names.iter().zip(&set.ports) {
                let Some(port) = port else {
                    continue; // the TUN device: no socket
                };
                steering.bind_socket(&name.name, queue, port.fd())?;
                let mode = if port.copy_mode { "copy" } else { "zero-copy" };
                tracing::info!(iface = %name.name, queue, mode, "AF_XDP socket bound");
            }
            let core = (!cfg.cores.is_empty()).then(|| cfg.cores[queue as usize % cfg.cores.len()]);
            let spec = WorkerSpec {
                queue,
                core,
                batch: cfg.batch,
                // Every worker reads the TUN device (each read takes one
                // packet) and writes the replies it routes to the node.
                host: host.clone().map(|tun| HostPort {
                    tun,
                    index: ports.len() - 1,
                }),
            };
            workers.push(worker::spawn(spec, set, reader.clone(), flows.clone())?);
        }
        Ok(Datapath {
            workers,
            steering,
            ifindexes: ports
                .iter()
                .map(|p| host::link_info(&p.name).map_or(0, |l| l.ifindex))
                .collect(),
            ports: ports.into_iter().map(Some).collect(),
            queues: cfg.queues,
        })
    }

    /// The ports by `PortId` (holes where ports were removed).
    pub fn ports(&self) -> &[Option<PortSpec>] {
        &self.ports
    }

    /// Whether port `name` is still the interface it was attached to (not
    /// deleted, not deleted and re-created under the same name), given the
    /// namespace's `links`.
    pub fn port_alive(&self, name: &str, links: &HashMap<String, host::LinkInfo>) -> bool {
        let Some(i) = self
            .ports
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.name == name))
        else {
            return false;
        };
        links.get(name).is_some_and(|l| l.ifindex == self.ifindexes[i])
    }

    /// Serves a new interface (a pod's veth that appeared): attaches the
    /// program, opens a socket on every worker's queue, steers them.
    /// Returns its `PortId` index. Publish tables that know the port (host
    /// facts) before traffic needs it; until then its frames are dropped as
    /// `unknown_port`.
    pub fn add_port(&mut self, spec: PortSpec) -> Result<usize, DatapathError> {
        let link = host::link_info(&spec.name).ok_or_else(|| DatapathError::NoInterface(spec.name.clone()))?;
        if link.xdp_attached {
            return Err(DatapathError::XdpBusy(spec.name.clone()));
        }
        if link.rx_queues < self.queues {
            return Err(DatapathError::Queues {
                iface: spec.name.clone(),
                have: link.rx_queues,
                want: self.queues,
            });
        }
        let index = self.ports.iter().position(Option::is_none).unwrap_or(self.ports.len());
        self.steering.attach(&spec.name, spec.role)?;
        for (queue, w) in (0..self.queues).zip(&self.workers) {
            let fd = match w.add_port(index, port_name(&spec)) {
                Ok(fd) => fd,
                Err(e) => {
                    for w in &self.workers {
                        w.remove_port(index);
                    }
                    let _ = self.steering.detach(&spec.name);
                    return Err(e.into());
                }
            };
            self.steering.bind_socket(&spec.name, queue, fd)?;
        }
        if index == self.ports.len() {
            self.ports.push(Some(spec));
            self.ifindexes.push(link.ifindex);
        } else {
            self.ports[index] = Some(spec);
            self.ifindexes[index] = link.ifindex;
        }
        Ok(index)
    }

    /// Stops serving `name` (its pod went away): detaches the program and
    /// closes its sockets, taking their frames back.
    pub fn remove_port(&mut self, name: &str) -> Result<(), SteeringError> {
        let Some(index) = self
            .ports
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.name == name))
        else {
            return Ok(());
        };
        self.steering.detach(name)?;
        for w in &self.workers {
            let returned = w.remove_port(index);
            tracing::debug!(iface = %name, returned, "port's frames back in the pool");
        }
        self.ports[index] = None;
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
