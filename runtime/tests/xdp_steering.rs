//! Root-only: kxp's XDP steering program on a lab node's uplink. It must
//! attach in native mode through a BPF link, leave the node's own traffic
//! alone, pick out service traffic, and disappear when dropped.

use std::net::Ipv4Addr;

use dataplane::addr::{BackendAddr, Endpoint, Mac, PortId, Proto, SvcId};
use dataplane::flow::{CtConfig, CtState, Entry, FlowKey, FlowState};
use dataplane::tables::{EndpointInfo, NodeConfig, PortRole, RemoteNode, ServiceSpec, Tables};
use dataplane::time::Time;
use lab::{node_ip, Lab};
use runtime::ports::Port;
use runtime::Steering;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn tables() -> Tables {
    let mut t = Tables::new(NodeConfig::single_uplink(
        "n1",
        node_ip(1),
        "192.168.77.0/24".parse().unwrap(),
        Mac([2; 6]),
    ));
    let mut s = ServiceSpec::cluster_ip(SvcId(1), "lab/web:udp", VIP, 9999, Proto::Udp);
    s.endpoints.push(EndpointInfo {
        addr: BackendAddr(Endpoint::new(lab::pod_ip(1, 0), 9999)),
        ready: true,
        serving: true,
        terminating: false,
        local: true,
    });
    t.upsert_service(&s).unwrap();
    t.set_pod_route(
        "10.77.9.0/24".parse().unwrap(),
        RemoteNode {
            node_ip: node_ip(9),
            vtep_mac: Mac([0x0e; 6]),
        },
    );
    t
}

/// Sends three datagrams from `ns`, port `from_port`, to `to`; returns how
/// many more frames the program redirected meanwhile.
fn redirected_by(s: &mut Steering, ns: &str, from_port: u16, to: (Ipv4Addr, u16)) -> u64 {
    let before = s.stats().unwrap().redirected;
    lab::in_namespace(ns, move || {
        let sock = std::net::UdpSocket::bind(("0.0.0.0", from_port)).unwrap();
        for _ in 0..3 {
            sock.send_to(b"x", to).unwrap();
        }
    })
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    s.stats().unwrap().redirected - before
}

/// Interface `name` of the calling thread's namespace as a port.
fn port(name: &str, role: PortRole) -> Port {
    let links = runtime::host::links().expect("interfaces");
    Port {
        name: name.into(),
        role,
        ifindex: links[name].ifindex,
    }
}

#[test]
fn steering_attaches_passes_node_traffic_and_detaches_on_drop() {
    if !lab::root_or_skip() {
        return;
    }
    let lab = Lab::build(1, 1).expect("lab builds");
    let node = lab.nodes[0].host.clone();
    let (mut steering, replies) = lab::in_namespace(&node.ns, || {
        let (mut s, replies) = Steering::load(1000)?;
        s.attach(PortId(0), &port("eth0", PortRole::Uplink))?;
        s.sync_from(&tables())?;
        Ok::<_, runtime::SteeringError>((s, replies))
    })
    .unwrap()
    .expect("steering attaches");
    let flows = FlowState::with_reply_index(CtConfig::default(), replies);
    assert!(node.xdp_attached(), "program attached to eth0");

    // The node's own traffic (ICMP to its address) goes to the kernel.
    lab.client
        .exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", &node_ip(1).to_string()])
        .expect("ping through XDP");
    let before = steering.stats().unwrap();
    assert!(before.passed >= 3 && before.redirected == 0, "{before:?}");

    // Service traffic is picked out (and, with no AF_XDP socket bound yet,
    // falls back to the kernel).
    lab.client
        .exec(&["ip", "route", "add", "10.96.0.0/16", "via", &node_ip(1).to_string()])
        .unwrap();
    for _ in 0..5 {
        let _ = lab.client.exec(&["bash", "-c", "echo x > /dev/udp/10.96.0.10/9999"]);
    }
    let after = steering.stats().unwrap();
    assert!(after.redirected >= 5, "{after:?}");

    // Replies are kxp's by exact match against the reply index its
    // conntrack keeps: the flow's reply tuple, and nothing next to it.
    let client = Endpoint::new(lab.client.ip, 4000);
    let rep = FlowKey::new(client, Endpoint::new(node_ip(1), 5000), Proto::Udp);
    flows
        .conntrack
        .insert(
            Time::ZERO,
            Entry::new(rep.reversed(), rep, SvcId(1), 0, CtState::UdpUnreplied),
            |i| (i == 0).then_some(rep),
        )
        .expect("flow inserted");
    let client_ns = lab.client.ns.clone();
    let sent =
        |s: &mut Steering, from_port: u16, to_port: u16| redirected_by(s, &client_ns, from_port, (node_ip(1), to_port));
    assert_eq!(sent(&mut steering, 4000, 5000), 3, "the reply tuple is steered");
    assert_eq!(sent(&mut steering, 4001, 5000), 0, "another source port is not");
    assert_eq!(sent(&mut steering, 4000, 5001), 0, "another destination port is not");
    // An ICMP error quoting a packet of that flow is kxp's; the node's own
    // socket's is not. The client's stack answers the node's datagrams to
    // a closed port with port unreachable, quoting them.
    let to_client = (lab.client.ip, 4000);
    assert_eq!(
        redirected_by(&mut steering, &node.ns, 5000, to_client),
        3,
        "errors about kxp's flow are kxp's"
    );
    assert_eq!(
        redirected_by(&mut steering, &node.ns, 5002, to_client),
        0,
        "errors about the node's own socket are the kernel's"
    );
    flows.conntrack.remove(&rep.reversed());
    assert_eq!(
        sent(&mut steering, 4000, 5000),
        0,
        "a removed flow's replies are the kernel's again"
    );

    // Traffic for another node's pods is kxp's only when it comes from a
    // pod interface; from the uplink it stays the kernel's.
    let after = steering.stats().unwrap();
    lab.client
        .exec(&["ip", "route", "add", "10.77.9.0/24", "via", &node_ip(1).to_string()])
        .unwrap();
    for _ in 0..3 {
        let _ = lab.client.exec(&["bash", "-c", "echo x > /dev/udp/10.77.9.5/9999"]);
    }
    let later = steering.stats().unwrap();
    assert_eq!(later.redirected, after.redirected, "{later:?}");
    assert!(later.passed >= after.passed + 3, "{later:?}");

    // On a pod-facing interface the same destination is kxp's: the same
    // program and maps serve a second port.
    let mut steering = lab::in_namespace(&node.ns, move || {
        steering
            .attach(PortId(1), &port("vp1_0", PortRole::Pod))
            .map(|_| steering)
    })
    .unwrap()
    .expect("steering attaches to the pod veth");
    for _ in 0..3 {
        let _ = lab.nodes[0].pods[0].exec(&["bash", "-c", "echo x > /dev/udp/10.77.9.5/9999"]);
    }
    let from_pod = steering.stats().unwrap();
    assert!(from_pod.redirected >= later.redirected + 3, "{from_pod:?}");
    let pod_xdp = || node.exec(&["ip", "link", "show", "vp1_0"]).unwrap().contains("xdp");
    assert!(pod_xdp());
    // A pod going away: its port is detached, the others keep the program.
    let steering = lab::in_namespace(&node.ns, move || {
        steering
            .detach(PortId(1), &port("vp1_0", PortRole::Pod))
            .map(|_| steering)
    })
    .unwrap()
    .unwrap();
    assert!(!pod_xdp(), "detached from the pod veth");
    assert!(node.xdp_attached(), "still on eth0");

    drop(steering);
    assert!(!node.xdp_attached(), "dropping the program detaches it");
}
