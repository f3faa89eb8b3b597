//! Root-only: the datapath on a lab node with deliberately tiny rings, so
//! a UDP flood through a ClusterIP overflows them. Every UMEM frame must
//! still be accounted for while it runs and after shutdown, and packets
//! must actually have gone through the workers.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

use dataplane::addr::{BackendAddr, Endpoint, Mac, Proto, SvcId};
use dataplane::flow::CtConfig;
use dataplane::tables::{EndpointInfo, NodeConfig, PortRole, ServiceSpec, Tables};
use dataplane::Publisher;
use lab::{node_ip, pod_ip, Lab};
use runtime::host::{self, PortSpec};
use runtime::ports::PortTable;
use runtime::sockets::UmemLayout;
use runtime::xsk::RingSizes;
use runtime::{Datapath, DatapathConfig};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn ports() -> Vec<PortSpec> {
    let p = |name: &str, role| PortSpec {
        name: name.into(),
        role,
    };
    vec![
        p("eth0", PortRole::Uplink),
        p("vp1_0", PortRole::Pod),
        p("vp1_1", PortRole::Pod),
    ]
}

/// The node's facts for the datapath's ports, written into `t`.
fn with_facts(mut t: Tables, ports: &PortTable) -> Tables {
    // The first read asks the kernel to resolve the pods (managed
    // neighbour entries) without waiting; a later read finds them.
    let started = std::time::Instant::now();
    let facts = loop {
        let links = host::links().expect("interfaces");
        let facts = host::observe_for(&links, ports, "flannel.1", &t).expect("kernel facts");
        if facts.local_pods.len() == 2 || started.elapsed() > std::time::Duration::from_secs(5) {
            break facts;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(facts.local_pods.len(), 2, "both pods resolved: {facts:?}");
    host::apply(&mut t, None, &facts);
    t
}

fn service_tables() -> Tables {
    let mut t = Tables::new(NodeConfig::single_uplink(
        "n1",
        node_ip(1),
        "192.168.77.0/24".parse().unwrap(),
        Mac::default(),
    ));
    // iperf3 needs TCP for its control connection, UDP for the flood.
    for (id, proto) in [(1, Proto::Tcp), (2, Proto::Udp)] {
        let mut s = ServiceSpec::cluster_ip(SvcId(id), "lab/flood", VIP, 5201, proto);
        s.endpoints.push(EndpointInfo {
            addr: BackendAddr(Endpoint::new(pod_ip(1, 0), 5201)),
            ready: true,
            serving: true,
            terminating: false,
            local: true,
        });
        t.upsert_service(&s).unwrap();
    }
    t
}

fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

#[test]
fn every_frame_is_accounted_for_through_full_rings_and_shutdown() {
    if !lab::root_or_skip() {
        return;
    }
    let lab = Lab::build(1, 2).expect("lab builds");
    let (server_ns, client_ns) = (lab.nodes[0].pods[0].ns.clone(), lab.nodes[0].pods[1].ns.clone());
    let mut server = in_ns(&server_ns, &["iperf3", "-s", "-p", "5201", "-1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 runs");
    std::thread::sleep(Duration::from_millis(300));
    let node = lab.nodes[0].host.ns.clone();
    let (during, after) = lab::in_namespace(&node, move || {
        let publisher = Publisher::new(service_tables());
        let cfg = DatapathConfig {
            ports: ports(),
            queues: 1,
            cores: vec![0],
            priority: None,
            // Tiny rings: a flood overflows them.
            rings: RingSizes {
                rx: 64,
                tx: 64,
                fill: 64,
                comp: 64,
            },
            batch: 64,
            // veth has no zero-copy: every socket falls back to copy mode.
            zero_copy: true,
            umem_layout: UmemLayout::Auto,
            host: None,
        };
        let mut dp = Datapath::start(&cfg, publisher.reader(), CtConfig::default()).expect("datapath starts");
        let t = with_facts(publisher.draft(), dp.ports());
        dp.on_publish(&t).expect("steering follows");
        publisher.publish(t);
        let flood = in_ns(
            &client_ns,
            &[
                "iperf3",
                "-c",
                &VIP.to_string(),
                "-p",
                "5201",
                "-u",
                "-b",
                "2G",
                "-l",
                "1200",
                "-t",
                "2",
            ],
        )
        .output()
        .expect("iperf3 client runs");
        assert!(flood.status.success(), "{}", String::from_utf8_lossy(&flood.stderr));
        std::thread::sleep(Duration::from_millis(200)); // one report period
        let during = dp.reports();
        (during, dp.stop())
    })
    .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let w = &during[0];
    assert!(
        w.stats.tx_packets > 1000,
        "the flood went through the worker: {:?}",
        w.stats
    );
    assert!(w.frames.balanced(), "while running: {:?}", w.frames);
    let last = &after[0];
    assert!(!last.running);
    assert!(last.frames.balanced(), "after shutdown: {:?}", last.frames);
    assert_eq!(last.frames.in_tx, 0, "TX rings drained on shutdown");
    assert_eq!(last.runtime.kernel_return_dropped, 0);
    assert!(
        w.copy_mode.iter().all(|c| *c),
        "veth has no zero-copy: fell back to copy mode: {:?}",
        w.copy_mode
    );
    assert!(!last.latency.is_empty(), "latency recorded per packet");
    let k = last.kernel;
    assert!(
        k.rx_ring_full + k.fill_ring_empty + k.rx_dropped > 0,
        "the flood overflowed the tiny rings: {k:?}"
    );
    assert_eq!(k.invalid_descs, 0, "kxp never gave the kernel a bad descriptor");
    eprintln!(
        "flood: {} rx, {} tx, {} dropped on full TX rings; kernel {:?}; frames {:?}",
        last.stats.rx_packets, last.stats.tx_packets, last.runtime.tx_ring_full, last.kernel, last.frames
    );
}
