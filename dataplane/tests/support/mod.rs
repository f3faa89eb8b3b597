//! A one-node test topology for engine scenario tests.
//!
//! ```text
//!   client 203.0.113.7 --- gw 192.168.0.254 ---+
//!   ext    192.168.0.100 ----------------------+-- eth0 (port 0) 192.168.0.1  node n1
//!   node n2 192.168.0.2 (pods 10.244.2.0/24) --+   pod A 10.244.1.2 on port 1
//!                                                  pod B 10.244.1.3 on port 2
//! cluster CIDR 10.244.0.0/16
//! ```
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use dataplane::addr::{BackendAddr, Endpoint, Mac, PortId, Proto, SvcId};
use dataplane::craft::{self, Buffer, Seen, Spec};
use dataplane::flow::{CtConfig, FlowState};
use dataplane::tables::{EndpointInfo, LocalPod, NodeConfig, PortInfo, PortRole, RemoteNode, ServiceSpec, Tables};
use dataplane::{Publisher, Time, Verdict, Worker};

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
pub const N2_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
pub const GW_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 254);
pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 100);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
pub const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
pub const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);

pub const UPLINK: PortId = PortId(0);
pub const PORT_A: PortId = PortId(1);
pub const PORT_B: PortId = PortId(2);
/// The node's own stack (its TUN device).
pub const HOST: PortId = PortId(3);
/// Routed into the host port: the source of flows to host-network backends.
pub const HOST_SNAT_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 1);

pub const UPLINK_MAC: Mac = Mac([0x02, 0, 0, 0, 0, 0x01]);
pub const PORT_A_MAC: Mac = Mac([0x02, 0, 0, 0, 1, 0x01]);
pub const PORT_B_MAC: Mac = Mac([0x02, 0, 0, 0, 2, 0x01]);
pub const POD_A_MAC: Mac = Mac([0x0a, 0, 0, 0, 1, 0x02]);
pub const POD_B_MAC: Mac = Mac([0x0a, 0, 0, 0, 1, 0x03]);
pub const N2_MAC: Mac = Mac([0x02, 0, 0, 0, 0, 0x02]);
pub const GW_MAC: Mac = Mac([0x02, 0, 0, 0, 0, 0xfe]);
pub const EXT_MAC: Mac = Mac([0x02, 0, 0, 0, 0, 0x64]);
pub const VTEP_MAC: Mac = Mac([0x0e, 0, 0, 0, 0, 0x01]);
pub const N2_VTEP_MAC: Mac = Mac([0x0e, 0, 0, 0, 0, 0x02]);

pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);

pub fn node_config() -> NodeConfig {
    let mut n = NodeConfig::single_uplink("n1", NODE_IP, "192.168.0.0/24".parse().unwrap(), UPLINK_MAC);
    n.cluster_cidr = Some("10.244.0.0/16".parse().unwrap());
    n.gateway = Some(GW_IP);
    n.vxlan.vtep_mac = VTEP_MAC;
    n.ports.push(PortInfo {
        name: "vethA".into(),
        mac: PORT_A_MAC,
        vlan: None,
        role: PortRole::Pod,
    });
    n.ports.push(PortInfo {
        name: "vethB".into(),
        mac: PORT_B_MAC,
        vlan: None,
        role: PortRole::Pod,
    });
    n.ports.push(PortInfo {
        name: "kxp0".into(),
        mac: Mac::default(),
        vlan: None,
        role: PortRole::Host,
    });
    n.host_port = Some(HOST);
    n.host_snat_ip = Some(HOST_SNAT_IP);
    n
}

pub fn base_tables() -> Tables {
    let mut t = Tables::new(node_config());
    t.set_local_pod(
        POD_A,
        LocalPod {
            port: PORT_A,
            mac: POD_A_MAC,
        },
    );
    t.set_local_pod(
        POD_B,
        LocalPod {
            port: PORT_B,
            mac: POD_B_MAC,
        },
    );
    t.set_pod_route(
        "10.244.2.0/24".parse().unwrap(),
        RemoteNode {
            node_ip: N2_IP,
            vtep_mac: N2_VTEP_MAC,
        },
    );
    t.set_neighbor(N2_IP, N2_MAC);
    t.set_neighbor(GW_IP, GW_MAC);
    t.set_neighbor(EXT_IP, EXT_MAC);
    t
}

pub fn ep(ip: Ipv4Addr, port: u16, local: bool) -> EndpointInfo {
    EndpointInfo {
        addr: BackendAddr(Endpoint::new(ip, port)),
        ready: true,
        serving: true,
        terminating: false,
        local,
    }
}

/// `ns/web:http`: ClusterIP 10.96.0.10:80/TCP, NodePort 30080, LB and
/// external IPs, backends pod A (local) and the remote pod, port 8080.
pub fn web(proto: Proto) -> ServiceSpec {
    let mut s = ServiceSpec::cluster_ip(SvcId(1), "ns/web:http", CLUSTER_IP, 80, proto);
    s.node_port = Some(30080);
    s.load_balancer_ips = vec![LB_IP];
    s.external_ips = vec![EXTERNAL_IP];
    s.endpoints = vec![ep(POD_A, 8080, true), ep(REMOTE_POD, 8080, false)];
    s
}

pub struct Lab {
    pub publisher: Publisher,
    pub worker: Worker,
    pub now: Time,
}

/// What happened to one frame.
pub struct Out {
    pub verdict: Verdict,
    pub bytes: Vec<u8>,
}

impl Out {
    pub fn seen(&self) -> Seen {
        craft::inspect(&self.bytes).expect("engine emitted a malformed frame")
    }

    pub fn tx_port(&self) -> PortId {
        match self.verdict {
            Verdict::Tx(p) => p,
            v => panic!("expected Tx, got {v:?}"),
        }
    }
}

impl Lab {
    pub fn new(services: &[ServiceSpec]) -> Self {
        Self::with_config(
            services,
            CtConfig {
                capacity: 4096,
                ..CtConfig::default()
            },
        )
    }

    pub fn with_config(services: &[ServiceSpec], ct: CtConfig) -> Self {
        let mut t = base_tables();
        for s in services {
            t.upsert_service(s).unwrap();
        }
        let publisher = Publisher::new(t);
        let worker = Worker::new(Arc::new(FlowState::new(ct)));
        Lab {
            publisher,
            worker,
            now: Time::from_secs(1000),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut Tables)) {
        self.publisher
            .update(|t| {
                f(t);
                Ok::<(), ()>(())
            })
            .unwrap();
    }

    pub fn advance(&mut self, d: Duration) {
        self.now = self.now + d;
    }

    /// Runs one frame through the engine. Every transmitted frame must parse
    /// and carry valid checksums (issue point 11, checked everywhere).
    pub fn send(&mut self, port: PortId, frame: &[u8]) -> Out {
        let out = self.send_raw(port, frame);
        if let Verdict::Tx(_) = out.verdict {
            let s = craft::inspect(&out.bytes).expect("engine emitted a malformed frame");
            assert!(s.checksums_ok, "bad L4 checksum on {s:?}");
        }
        out
    }

    /// Runs one frame through the engine without judging the result.
    pub fn send_raw(&mut self, port: PortId, frame: &[u8]) -> Out {
        let tables = self.publisher.reader().load();
        let mut b = Buffer::new(frame);
        let mut f = b.frame();
        let verdict = self.worker.process(self.now, &tables, port, &mut f);
        let (start, len) = (f.headroom(), f.len());
        b.start = start;
        b.len = len;
        let bytes = match verdict {
            Verdict::Pass => frame.to_vec(),
            _ => b.bytes().to_vec(),
        };
        Out { verdict, bytes }
    }

    /// A TCP/UDP packet from the external client via the gateway.
    pub fn send_from_client(&mut self, spec: Spec) -> Out {
        self.send(UPLINK, &spec.macs(GW_MAC, UPLINK_MAC).build())
    }
}

pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Spec {
    Spec::tcp(src, dst, flags)
}

pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Spec {
    Spec::udp(src, dst, b"payload")
}

/// Frames that reach every branch of the engine: service TCP/UDP both ways,
/// NodePort, VXLAN, ICMP errors, tagged frames. Seeds for fuzzing.
pub fn seed_frames() -> Vec<(PortId, Vec<u8>)> {
    use dataplane::wire::l4::{TCP_ACK, TCP_SYN};
    let mut v = vec![
        (
            PORT_B,
            tcp((POD_B, 40000), (CLUSTER_IP, 80), TCP_SYN)
                .macs(POD_B_MAC, PORT_B_MAC)
                .build(),
        ),
        (
            PORT_A,
            tcp((POD_A, 8080), (POD_B, 40000), TCP_SYN | TCP_ACK)
                .macs(POD_A_MAC, PORT_A_MAC)
                .build(),
        ),
        (
            PORT_B,
            udp((POD_B, 5353), (CLUSTER_IP, 80)).macs(POD_B_MAC, PORT_B_MAC).build(),
        ),
        (
            UPLINK,
            tcp((CLIENT_IP, 5000), (NODE_IP, 30080), TCP_SYN)
                .macs(GW_MAC, UPLINK_MAC)
                .build(),
        ),
        (
            UPLINK,
            udp((CLIENT_IP, 5000), (LB_IP, 80)).macs(GW_MAC, UPLINK_MAC).build(),
        ),
        (
            PORT_B,
            tcp((POD_B, 4444), (REMOTE_POD, 9000), TCP_SYN)
                .macs(POD_B_MAC, PORT_B_MAC)
                .build(),
        ),
    ];
    let inner = tcp((REMOTE_POD, 8080), (POD_B, 4545), TCP_SYN | TCP_ACK)
        .macs(N2_VTEP_MAC, VTEP_MAC)
        .build();
    v.push((
        UPLINK,
        craft::vxlan((N2_MAC, UPLINK_MAC), N2_IP, NODE_IP, 8472, 1, &inner),
    ));
    let quoted = tcp((NODE_IP, 30080), (CLIENT_IP, 5000), TCP_ACK).build();
    v.push((
        UPLINK,
        craft::icmp_error((GW_MAC, UPLINK_MAC), GW_IP, NODE_IP, 3, 4, 1400, &quoted[14..42]),
    ));
    let mut tagged = tcp((CLIENT_IP, 5000), (NODE_IP, 30080), TCP_SYN).macs(GW_MAC, UPLINK_MAC);
    tagged.vlan = Some(100);
    v.push((UPLINK, tagged.build()));
    v
}

/// The fuzz harness: the first byte picks the ingress port, the rest is the
/// frame. Whatever the bytes, the engine must not panic, and whatever it
/// transmits must be a well-formed IPv4 frame.
pub fn exercise(lab: &mut Lab, data: &[u8]) {
    let Some((&sel, frame)) = data.split_first() else {
        return;
    };
    let port = PortId(u16::from(sel % 4)); // 3 is not a configured port
    let out = lab.send_raw(port, frame);
    if let Verdict::Tx(_) = out.verdict {
        craft::inspect(&out.bytes).expect("engine transmitted a malformed frame");
    }
}

/// Services for fuzzing: one of each kind, one without endpoints.
pub fn fuzz_lab() -> Lab {
    let mut empty = web(Proto::Udp);
    empty.id = SvcId(7);
    empty.cluster_ips = vec![Ipv4Addr::new(10, 96, 0, 99)];
    empty.load_balancer_ips.clear();
    empty.external_ips.clear();
    empty.node_port = None;
    empty.endpoints.clear();
    let mut tcp_web = web(Proto::Tcp);
    tcp_web.affinity = Some(Duration::from_secs(10));
    Lab::new(&[tcp_web, web(Proto::Udp), empty])
}
