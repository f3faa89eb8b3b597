//! Root-only: real TCP and UDP through `kxp run` (XDP steering, AF_XDP
//! workers) in the namespace lab. Each test builds its own lab, bounds its
//! traffic in bytes and time, and tears everything down on drop, also on
//! failure. Every test ends by checking that no namespace's stack counted a
//! checksum error.

mod support;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use lab::kxp::{Kxp, Svc};
use lab::probe::{connect, Listener};
use lab::{node_ip, pod_ip, Lab};
use support::cluster::*;

#[test]
fn clusterip_tcp_and_udp_reach_same_node_and_cross_node_backends() {
    if !lab::root_or_skip() {
        return;
    }
    let services = [
        Svc::new("local", vip(10), PORT, &[(pod_ip(1, 0), 1)]),
        Svc::new("remote", vip(11), PORT, &[(pod_ip(2, 0), 2)]),
    ];
    let c = Cluster::new(2, 2, &[1, 2], &services);
    let _servers = Iperf::serve(&[c.pod(1, 0), c.pod(2, 0)]);
    let client = c.pod(1, 1);
    for (svc, what) in [(vip(10), "same-node"), (vip(11), "cross-node")] {
        let tcp = iperf(client, svc, PORT, "2M", false);
        assert!(tcp >= 2e6, "TCP to the {what} backend: {tcp} bytes");
        let udp = iperf(client, svc, PORT, "1M", true);
        assert!(udp > 0.9e6, "UDP to the {what} backend: {udp} bytes");
    }
    // The other node's pod reaches both through its own kxp.
    assert!(iperf(c.pod(2, 1), vip(10), PORT, "1M", false) >= 1e6);
    assert_eq!(c.dropped("kernel_return"), 0.0, "nothing steered to kxp was lost");
    let steered = c.kxps[0].metric_sum("kxp_steering_packets", &["verdict=\"redirected\""]);
    let rx = c.kxps[0].metric_sum("kxp_worker_packets", &["direction=\"rx\""]);
    assert!(steered > 0.0 && rx > 0.0, "steered {steered}, received {rx}");
    assert_eq!(c.dropped("tx_ring_full"), 0.0);
    c.assert_no_checksum_errors();
}

#[test]
fn nodeport_cluster_policy_snats_local_policy_keeps_the_client_ip() {
    if !lab::root_or_skip() {
        return;
    }
    let mut cluster_policy = Svc::tcp("np-cluster", vip(20), 8080, &[(pod_ip(2, 0), 2)]);
    cluster_policy.node_port = Some(30080);
    let mut local_policy = Svc::tcp("np-local", vip(21), 8081, &[(pod_ip(1, 0), 1)]);
    local_policy.node_port = Some(30081);
    local_policy.etp_local = true;
    let mut external = Svc::tcp("ext", vip(22), 8082, &[(pod_ip(1, 1), 1)]);
    external.external_ips = vec![Ipv4Addr::new(192, 168, 77, 50)];
    let c = Cluster::new(2, 2, &[1, 2], &[cluster_policy, local_policy, external]);
    let cross = Listener::start(&c.pod(2, 0).ns, 8080, "n2p0").unwrap();
    let local = Listener::start(&c.pod(1, 0).ns, 8081, "n1p0").unwrap();
    let ext = Listener::start(&c.pod(1, 1).ns, 8082, "n1p1").unwrap();
    let client = &c.lab.client;

    assert_eq!(greet(client, sa(node_ip(1), 30080)), "n2p0");
    let seen = cross.peers()[0].ip();
    assert_ne!(seen, CLIENT, "eTP=Cluster: the backend sees the node, not the client");
    assert_eq!(seen, node_ip(1), "SNAT to the node that received it");

    assert_eq!(greet(client, sa(node_ip(1), 30081)), "n1p0");
    assert_eq!(local.peers()[0].ip(), CLIENT, "eTP=Local: the backend sees the client");
    // Node 2 has no local endpoint: kube-proxy drops, so the client times out.
    let err = connect(&client.ns, sa(node_ip(2), 30081), Duration::from_millis(1500)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");

    // An externalIP, routed to node 1 by the client.
    client
        .exec(&["ip", "route", "add", "192.168.77.50/32", "via", &node_ip(1).to_string()])
        .unwrap();
    assert_eq!(greet(client, sa(Ipv4Addr::new(192, 168, 77, 50), 8082)), "n1p1");
    assert_eq!(ext.peers().len(), 1);
    c.assert_no_checksum_errors();
}

#[test]
fn session_affinity_pins_a_client_and_without_it_connections_spread() {
    if !lab::root_or_skip() {
        return;
    }
    let backends = [(pod_ip(1, 0), 1), (pod_ip(2, 0), 2)];
    let mut sticky = Svc::tcp("sticky", vip(30), 9000, &backends);
    sticky.affinity = true;
    let spread = Svc::tcp("spread", vip(31), 9000, &backends);
    let c = Cluster::new(2, 2, &[1, 2], &[sticky, spread]);
    let _a = Listener::start(&c.pod(1, 0).ns, 9000, "n1p0").unwrap();
    let _b = Listener::start(&c.pod(2, 0).ns, 9000, "n2p0").unwrap();
    let client = c.pod(1, 1);
    let pinned: std::collections::BTreeSet<String> = (0..16).map(|_| greet(client, sa(vip(30), 9000))).collect();
    assert_eq!(pinned.len(), 1, "ClientIP affinity: one backend, got {pinned:?}");
    let spread: std::collections::BTreeSet<String> = (0..32).map(|_| greet(client, sa(vip(31), 9000))).collect();
    assert_eq!(spread.len(), 2, "no affinity: connections spread over both backends");
    c.assert_no_checksum_errors();
}

#[test]
fn hairpin_reaches_itself_and_a_service_without_endpoints_is_refused_at_once() {
    if !lab::root_or_skip() {
        return;
    }
    let hairpin = Svc::tcp("hairpin", vip(40), 7000, &[(pod_ip(1, 0), 1)]);
    let empty = Svc::tcp("empty", vip(41), 7001, &[]);
    let c = Cluster::new(1, 2, &[1], &[hairpin, empty]);
    let me = Listener::start(&c.pod(1, 0).ns, 7000, "n1p0").unwrap();
    assert_eq!(
        greet(c.pod(1, 0), sa(vip(40), 7000)),
        "n1p0",
        "a pod reaches itself via its service"
    );
    assert_ne!(me.peers()[0].ip(), pod_ip(1, 0), "hairpin is masqueraded");
    let started = Instant::now();
    let err = connect(&c.pod(1, 1).ns, sa(vip(41), 7001), Duration::from_secs(3)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once, not timed out"
    );
    c.assert_no_checksum_errors();
}

#[test]
fn the_nodes_own_traffic_is_untouched_while_kxp_runs() {
    if !lab::root_or_skip() {
        return;
    }
    let svc = Svc::new("web", vip(50), PORT, &[(pod_ip(1, 0), 1)]);
    let c = Cluster::new(1, 1, &[1], &[svc]);
    let node = &c.lab.nodes[0].host;
    let client = &c.lab.client;
    client
        .exec(&["ping", "-c", "2", "-W", "2", &node_ip(1).to_string()])
        .expect("ping the node");
    // A server on the node in the SNAT port range stays the kernel's.
    let _own = Listener::start(&node.ns, 5201, "node").unwrap();
    assert_eq!(greet(client, sa(node_ip(1), 5201)), "node");
    // ARP: the client resolved the node, the node resolved the client.
    let neigh = client.exec(&["ip", "neigh", "show", &node_ip(1).to_string()]).unwrap();
    assert!(neigh.contains("lladdr"), "client resolved the node: {neigh}");
    // And the node's own connection to a backend pod (kubelet probes).
    let _probe = Listener::start(&c.pod(1, 0).ns, PORT, "n1p0").unwrap();
    assert_eq!(greet(node, sa(pod_ip(1, 0), PORT)), "n1p0");
    assert_eq!(c.dropped("kernel_return"), 0.0);
    c.assert_no_checksum_errors();
}

#[test]
fn removing_a_backend_under_load_spares_other_streams_and_gets_no_new_connections() {
    if !lab::root_or_skip() {
        return;
    }
    let backends = [(pod_ip(1, 0), 1), (pod_ip(2, 0), 2)];
    let mut svc = Svc::tcp("churn", vip(60), PORT, &backends);
    svc.affinity = true; // iperf3's control and data connections on one backend
    let c = Cluster::new(2, 2, &[1, 2], std::slice::from_ref(&svc));
    let _servers = Iperf::serve(&[c.pod(1, 0), c.pod(2, 0)]);
    let client = c.pod(1, 1).clone();
    let stream = std::thread::spawn(move || {
        let out = client.exec(&["iperf3", "-c", &vip(60).to_string(), "-p", "5201", "-t", "4", "-J"]);
        out.map(|o| serde_json::from_str::<serde_json::Value>(&o).unwrap())
    });
    // Find the backend carrying the stream; remove the other one.
    let mut carrying = None;
    wait_for("the stream's backend", || {
        carrying = [(1u8, 0u8), (2, 0)].into_iter().find(|(n, i)| {
            c.pod(*n, *i)
                .exec(&["ss", "-Htn", "state", "established", "( sport = :5201 )"])
                .is_ok_and(|o| o.lines().count() >= 2)
        });
        carrying.is_some()
    });
    let (keep_node, _) = carrying.unwrap();
    let removed = if keep_node == 1 { pod_ip(2, 0) } else { pod_ip(1, 0) };
    let mut smaller = svc.clone();
    smaller.endpoints.retain(|(ip, _)| *ip != removed);
    c.update(&[smaller]);
    let result = stream.join().unwrap().expect("iperf3 ran");
    assert!(result.get("error").is_none(), "stream disturbed: {}", result["error"]);
    assert!(result["end"]["sum_sent"]["bytes"].as_f64().unwrap() > 1e6);
    // New connections, from clients on both nodes, never reach it.
    let gone = c.pod(if removed == pod_ip(1, 0) { 1 } else { 2 }, 0);
    let opens_before = passive_opens(gone);
    for from in [c.pod(1, 1), c.pod(2, 1)] {
        for _ in 0..10 {
            // iperf3 does not greet; the handshake is what counts.
            let _ = connect(&from.ns, sa(vip(60), PORT), Duration::from_millis(300));
        }
    }
    assert_eq!(
        passive_opens(gone),
        opens_before,
        "a removed backend got new connections"
    );
    c.assert_no_checksum_errors();
}

#[test]
fn a_kernel_vxlan_node_and_a_kxp_node_exchange_pod_traffic_both_ways() {
    if !lab::root_or_skip() {
        return;
    }
    // kxp on node 1 only; node 2's overlay is Linux's own VXLAN device.
    let svc = Svc::new("on-kernel-node", vip(70), 7200, &[(pod_ip(2, 0), 2)]);
    let c = Cluster::new(2, 2, &[1], &[svc]);
    let (a, b) = (c.pod(1, 0), c.pod(2, 0));
    let _la = Listener::start(&a.ns, 7300, "n1p0").unwrap();
    let _lb = Listener::start(&b.ns, 7300, "n2p0").unwrap();
    assert_eq!(greet(a, sa(b.ip, 7300)), "n2p0", "kxp encap -> kernel decap");
    assert_eq!(greet(b, sa(a.ip, 7300)), "n1p0", "kernel encap -> kxp decap");
    a.exec(&["ping", "-c", "2", "-W", "2", &b.ip.to_string()])
        .expect("ping kxp -> kernel");
    b.exec(&["ping", "-c", "2", "-W", "2", &a.ip.to_string()])
        .expect("ping kernel -> kxp");
    let _svc = Listener::start(&b.ns, 7200, "n2p0-svc").unwrap();
    assert_eq!(
        greet(c.pod(1, 1), sa(vip(70), 7200)),
        "n2p0-svc",
        "ClusterIP to a kernel node's pod"
    );
    let stats = c.kxps[0].metric_sum("kxp_worker_packets", &["direction=\"tx\""]);
    assert!(stats > 0.0, "the traffic went through kxp");
    c.assert_no_checksum_errors();
}

#[test]
fn two_queues_run_two_workers_and_both_carry_traffic() {
    if !lab::root_or_skip() {
        return;
    }
    let svc = Svc::tcp("mq", vip(80), 7400, &[(pod_ip(1, 0), 1)]);
    let lab = Lab::build_with_queues(1, 2, 2).expect("lab builds");
    let c = Cluster::with(lab, &[1], &[svc], "  queues: 2\n  workerCores: [0, 1]\n");
    let kxp = &c.kxps[0];
    let _server = Listener::start(&c.pod(1, 0).ns, 7400, "n1p0").unwrap();
    let client = c.pod(1, 1);
    // Each connection's flow hash picks the veth queue, so 40 of them use
    // both queues (the chance that all land on one is 2^-39).
    for _ in 0..40 {
        assert_eq!(greet(client, sa(vip(80), 7400)), "n1p0");
    }
    std::thread::sleep(Duration::from_millis(300)); // one report period
    for q in ["0", "1"] {
        let label = format!("queue=\"{q}\"");
        let rx = kxp.metric_sum("kxp_worker_packets", &[&label, "direction=\"rx\""]);
        assert!(rx > 0.0, "worker {q} received nothing");
        let total = kxp.metric_sum("kxp_worker_frames", &[&label, "place=\"total\""]);
        let parts: f64 = ["free", "fill", "tx"]
            .iter()
            .map(|p| kxp.metric_sum("kxp_worker_frames", &[&label, &format!("place=\"{p}\"")]))
            .sum();
        assert_eq!(parts, total, "worker {q}: every frame accounted for");
    }
}

#[test]
fn pods_that_come_and_go_are_served_and_released() {
    if !lab::root_or_skip() {
        return;
    }
    let svc = Svc::new("late", vip(90), 7500, &[(pod_ip(1, 1), 1)]);
    let lab = Lab::build(1, 1).expect("lab builds");
    let mut c = Cluster::with(lab, &[1], &[svc], "  podInterfacePrefixes: [vp]\n");
    let client = c.pod(1, 0).clone();
    let frames = |k: &Kxp, place: &str| k.metric_sum("kxp_worker_frames", &[&format!("place=\"{place}\"")]);
    std::thread::sleep(Duration::from_millis(300)); // a report with the fill rings full
    let (pool, free_at_start) = (frames(&c.kxps[0], "total"), frames(&c.kxps[0], "free"));
    // Under traffic: UDP to the service, whose one endpoint is the pod that
    // comes and goes, so its port has frames on its TX ring when it goes.
    let traffic = UdpStream::start(&client.ns, sa(vip(90), 7500));
    // 100 times: a pod appears (a new veth, as a CNI makes it), is served,
    // and goes away; each reuses the previous one's name and address.
    // What a user sees: from the CNI creating the veth to a client's
    // connection through the service answering (printed, not asserted).
    let mut served_after = Vec::with_capacity(100);
    let mut lab_setup = Vec::with_capacity(100);
    for round in 0..100 {
        let created = Instant::now();
        let late = c.lab.add_pod(1).unwrap();
        let server = Listener::start(&late.ns, 7500, "late").unwrap();
        lab_setup.push(created.elapsed());
        while !connect(&client.ns, sa(vip(90), 7500), Duration::from_millis(100)).is_ok_and(|g| g == "late") {
            assert!(
                created.elapsed() < Duration::from_secs(20),
                "round {round}: the new pod is never served"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        served_after.push(created.elapsed());
        drop(server);
        c.lab.remove_last_pod(1).unwrap();
        if round % 25 == 24 {
            // One scrape: the parts and the total of the same report.
            let text = c.kxps[0].metrics();
            let frames =
                |place: &str| lab::kxp::metric_sum(&text, "kxp_worker_frames", &[&format!("place=\"{place}\"")]);
            let parts: f64 = ["free", "fill", "tx", "held"].iter().map(|p| frames(p)).sum();
            assert_eq!(parts, frames("total"), "round {round}: every frame is somewhere");
            assert_eq!(frames("total"), pool, "round {round}: no frame written off");
        }
    }
    let sent = traffic.stop();
    assert!(sent > 1000, "the traffic ran ({sent} datagrams)");
    served_after.sort();
    lab_setup.sort();
    eprintln!(
        "veth created -> first connection through the service: median {:?}, p90 {:?}, max {:?} (100 pods; \
         the lab's own pod setup, namespace to listener, takes a median {:?} of it)",
        served_after[50], served_after[90], served_after[99], lab_setup[50]
    );
    std::thread::sleep(Duration::from_millis(2500)); // the last pod released, a report
    let k = &c.kxps[0];
    assert_eq!(frames(k, "total"), pool, "no frame written off");
    assert_eq!(
        frames(k, "free"),
        free_at_start,
        "the free pool is back at its start size"
    );
    assert_eq!(k.metric_sum("kxp_worker_drops", &["reason=\"xsk_invalid_descs\""]), 0.0);
}

/// The two-UMEM layout (pods apart from the uplink, as beside a
/// zero-copy NIC), forced in copy mode since veths have no zero-copy:
/// traffic between the uplink and pods crosses the UMEMs both ways, a pod
/// that appears later joins the pods' UMEM, and every frame stays
/// accounted for.
#[test]
fn pods_in_a_umem_of_their_own_are_served_across_both_umems() {
    if !lab::root_or_skip() {
        return;
    }
    let late_svc = Svc::new("late-split", vip(91), 7600, &[(pod_ip(1, 1), 1)]);
    let remote_svc = Svc::new("remote-split", vip(92), PORT, &[(pod_ip(2, 0), 2)]);
    let lab = Lab::build(2, 1).expect("lab builds");
    let mut c = Cluster::with(
        lab,
        &[1],
        &[late_svc, remote_svc],
        "  podInterfacePrefixes: [vp]\n  umemLayout: split\n",
    );
    wait_for("the worker reports two UMEMs", || {
        c.kxps[0].metric_sum("kxp_worker_umems", &[]) == 2.0
    });
    let late = c.lab.add_pod(1).expect("a pod appears after kxp started");
    let _late = Listener::start(&late.ns, 7600, "late").unwrap();
    let (local, remote) = (c.pod(1, 0).clone(), c.pod(2, 0).clone());
    // From a pod on another node (no kxp there: to the pod's address, over
    // the overlay): uplink -> the pods' UMEM, and the reply back.
    let started = Instant::now();
    while !connect(&remote.ns, sa(late.ip, 7600), Duration::from_millis(200)).is_ok_and(|g| g == "late") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the late pod is never served"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // From a pod on this node, through the service: within the pods' UMEM.
    assert_eq!(greet(&local, sa(vip(91), 7600)), "late");
    // From a pod on this node to another node's backend: pods' UMEM ->
    // uplink, and bulk TCP both ways through the copies.
    let _servers = Iperf::serve(&[&remote]);
    let sent = iperf(&local, vip(92), PORT, "20M", false);
    assert!(sent >= 20e6, "TCP through both UMEMs: {sent} bytes");
    let k = &c.kxps[0];
    let copies = k.metric_sum("kxp_worker_events", &["event=\"umem_copies\""]);
    assert!(copies > 1000.0, "frames crossed between the UMEMs: {copies}");
    assert_eq!(
        k.metric_sum("kxp_worker_drops", &["reason=\"umem_copy_no_frame\""]),
        0.0
    );
    let text = k.metrics();
    let frames = |place: &str| lab::kxp::metric_sum(&text, "kxp_worker_frames", &[&format!("place=\"{place}\"")]);
    let parts: f64 = ["free", "fill", "tx", "held"].iter().map(|p| frames(p)).sum();
    assert_eq!(parts, frames("total"), "every frame of both UMEMs is somewhere");
    c.assert_no_checksum_errors();
}

/// UDP datagrams from a namespace to one address, paced, until stopped.
struct UdpStream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl UdpStream {
    fn start(ns: &str, to: SocketAddr) -> UdpStream {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (s, ns) = (stop.clone(), ns.to_string());
        let thread = std::thread::spawn(move || {
            lab::in_namespace(&ns, move || {
                let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                let mut sent = 0u64;
                while !s.load(Ordering::Relaxed) {
                    // Bursts of 64, ~20k datagrams/s at most: bounded load.
                    for _ in 0..64 {
                        sent += u64::from(sock.send_to(&[0u8; 512], to).is_ok());
                    }
                    std::thread::sleep(Duration::from_millis(3));
                }
                sent
            })
            .unwrap_or(0)
        });
        UdpStream { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

#[test]
fn the_node_itself_reaches_cluster_ips_through_kxp() {
    if !lab::root_or_skip() {
        return;
    }
    let local = Svc::tcp("for-node-local", vip(100), 7600, &[(pod_ip(1, 0), 1)]);
    let remote = Svc::tcp("for-node-remote", vip(101), 7601, &[(pod_ip(2, 0), 2)]);
    let empty = Svc::tcp("for-node-empty", vip(102), 7602, &[]);
    let c = Cluster::new_with(
        2,
        1,
        &[1, 2],
        &[local, remote, empty],
        "  serviceCIDRs: [10.96.0.0/16]\n",
    );
    let (lab, kxps) = (&c.lab, &c.kxps);
    let _a = Listener::start(&lab.nodes[0].pods[0].ns, 7600, "n1p0").unwrap();
    let _b = Listener::start(&lab.nodes[1].pods[0].ns, 7601, "n2p0").unwrap();
    let node = &lab.nodes[0].host;
    // kube-proxy serves these in OUTPUT; kxp through its TUN device.
    assert_eq!(
        greet(node, sa(vip(100), 7600)),
        "n1p0",
        "node -> ClusterIP -> local pod"
    );
    assert_eq!(
        greet(node, sa(vip(101), 7601)),
        "n2p0",
        "node -> ClusterIP -> pod on another node"
    );
    let err = connect(&node.ns, sa(vip(102), 7602), Duration::from_secs(2)).unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "no endpoints: refused, {err}"
    );
    let dropped: f64 = kxps
        .iter()
        .map(|k| k.metric_sum("kxp_worker_drops", &["reason=\"host_dropped\""]))
        .sum();
    assert_eq!(dropped, 0.0);
}

#[test]
fn a_host_network_backend_is_reached_from_pods_on_its_node_and_on_others() {
    if !lab::root_or_skip() {
        return;
    }
    // Like the `kubernetes` service on a control-plane node: the endpoint is
    // the node's own address.
    let mut api = Svc::tcp("api", vip(110), 443, &[(node_ip(1), 1)]);
    api.target_port = 7700;
    // No serviceCIDRs: the way into the node's stack exists regardless.
    let c = Cluster::new(2, 1, &[1, 2], &[api]);
    let lab = &c.lab;
    let server = Listener::start(&lab.nodes[0].host.ns, 7700, "node1").unwrap();
    assert_eq!(
        greet(&lab.nodes[0].pods[0], sa(vip(110), 443)),
        "node1",
        "from a pod on the same node"
    );
    assert_eq!(
        greet(&lab.nodes[1].pods[0], sa(vip(110), 443)),
        "node1",
        "from a pod on another node"
    );
    assert_eq!(server.peers().len(), 2);
}

#[test]
fn a_packet_too_big_for_the_overlay_teaches_its_sender_the_path_mtu() {
    if !lab::root_or_skip() {
        return;
    }
    let c = Cluster::new(2, 1, &[1], &[]);
    let (a, b) = (c.pod(1, 0), c.pod(2, 0));
    // A pod whose MTU ignores the overlay's 50 bytes (unlike Flannel's).
    a.exec(&["ip", "link", "set", "eth0", "mtu", "1500"]).unwrap();
    let ping = |size: &str| {
        let cmd = format!("ping -M do -s {size} -c 1 -W 2 {} 2>&1; true", b.ip);
        a.exec(&["sh", "-c", &cmd]).unwrap()
    };
    let big = ping("1472");
    assert!(
        big.contains("mtu = 1450"),
        "kxp answers frag-needed with the overlay's MTU: {big}"
    );
    // Its stack took the lesson: the same size is now refused locally, and
    // a datagram that fits goes through.
    let fits = ping("1422");
    assert!(fits.contains("1 received"), "{fits}");
    std::thread::sleep(Duration::from_millis(300)); // one report period
    assert_eq!(c.kxps[0].metric_sum("kxp_worker_drops", &["reason=\"too_big\""]), 0.0);
    let sent = c.kxps[0].metric_sum("kxp_worker_events", &["event=\"frag_needed\""]);
    assert!(sent >= 1.0, "kxp, not the kernel's flannel.1, answered: {sent}");
}

/// Issue #8: 200 established connections through a NodePort and a
/// ClusterIP, then a million spoofed-source packets of each kind (SYN, ACK,
/// no flags, FIN, RST, UDP) at the NodePort with a conntrack table far too
/// small for them: the connections still carry data, new connections get
/// through during the flood, and kxp's memory stays put.
#[test]
fn spoofed_floods_leave_established_and_new_connections_alone() {
    if !lab::root_or_skip() {
        return;
    }
    use lab::flood::{flood, Kind};
    use lab::probe::{echoes, open, Echo};
    const ECHO: u16 = 7007;
    const NODE_PORT: u16 = 30707;
    const FLOOD: u64 = 1_000_000;
    let mut svc = Svc::new("echo", vip(77), ECHO, &[(pod_ip(1, 0), 1)]);
    svc.node_port = Some(NODE_PORT);
    // 2048 flows in all: the flood overfills it hundreds of times.
    let c = Cluster::with_config(
        Lab::build(1, 2).expect("lab builds"),
        &[1],
        &[svc],
        "conntrack: {maxPerCore: 1024, min: 2048}\n",
        "",
    );
    let _echo = Echo::start(&c.pod(1, 0).ns, ECHO).unwrap();
    let node_port = sa(node_ip(1), NODE_PORT);
    let cluster_ip = sa(vip(77), ECHO);
    let mut conns = Vec::new();
    for i in 0..200 {
        let (ns, to) = if i % 2 == 0 {
            (&c.lab.client.ns, node_port)
        } else {
            (&c.pod(1, 1).ns, cluster_ip)
        };
        let mut s = open(ns, to, Duration::from_secs(3)).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert!(echoes(&mut s), "connection {i} carries no data before the flood");
        conns.push(s);
    }
    let rss_before = c.kxps[0].rss_bytes();
    let target = SocketAddrV4::new(node_ip(1), NODE_PORT);
    for kind in Kind::ALL {
        let client_ns = c.lab.client.ns.clone();
        let attack = std::thread::spawn(move || flood(&client_ns, kind, target, FLOOD, 2));
        // New connections keep getting through while it runs. The flood is
        // beyond what one copy-mode worker takes in on this machine, so the
        // kernel drops some of everything at the AF_XDP ring, a real SYN
        // included: allow TCP its retransmissions (1, 3, 7 s).
        let mut fresh = 0;
        let mut reset = 0;
        while !attack.is_finished() {
            // A client retries a connection that is reset, up to twice; a
            // retry must work, and resets must stay rare. (During the UDP
            // flood a few new connections are sometimes reset by the
            // backend; the cause is open, see issue #9's note. The count is
            // printed.)
            let attempt = || {
                let mut s = open(&c.lab.client.ns, node_port, Duration::from_secs(12))
                    .unwrap_or_else(|e| panic!("a new connection failed during the {} flood: {e}", kind.name()));
                echoes(&mut s)
            };
            let mut tries = 1;
            while !attempt() {
                reset += 1;
                tries += 1;
                assert!(
                    tries <= 3,
                    "a new connection carried no data during the {} flood, three times\n{}",
                    kind.name(),
                    c.counters()
                );
            }
            fresh += 1;
        }
        let sent = attack.join().unwrap().unwrap();
        assert!(
            reset <= 2 + fresh / 5,
            "{reset} resets in {fresh} new connections during the {} flood",
            kind.name()
        );
        eprintln!(
            "{} flood: {} packets in {:.1} s ({:.0} pps), {fresh} new connections meanwhile ({reset} reset, retried)",
            kind.name(),
            sent.packets,
            sent.elapsed.as_secs_f64(),
            sent.pps()
        );
    }
    let alive = conns.iter_mut().map(echoes).filter(|ok| *ok).count();
    assert!(alive >= 199, "only {alive} of 200 connections survived the floods");
    let rss_after = c.kxps[0].rss_bytes();
    assert!(
        rss_after < rss_before + 32 * 1024 * 1024,
        "kxp grew from {rss_before} to {rss_after} bytes"
    );
    // Every kind was seen and refused for what it was.
    for reason in ["invalid_tcp_flags", "stray_tcp"] {
        assert!(c.dropped(reason) > 0.0, "no {reason} drops");
    }
    // The floods' flows churned through the reply index without filling it.
    assert_eq!(c.dropped("reply_index_full"), 0.0);
    c.assert_no_checksum_errors();
}

/// Issue #8: VXLAN is taken only from known nodes. An off-cluster host
/// wrapping a SYN to a ClusterIP in VXLAN to a node reaches nothing: the
/// steering program leaves it to the kernel, kxp never decapsulates it,
/// and the backend sees no SYN. (Before, kxp decapsulated it and DNATed
/// it to the backend, which answered.)
#[test]
fn vxlan_from_an_off_cluster_host_reaches_no_service() {
    if !lab::root_or_skip() {
        return;
    }
    use dataplane::craft::{self, Spec};
    use dataplane::wire::l4::TCP_SYN;
    let c = Cluster::new(2, 1, &[1, 2], &[Svc::tcp("web", vip(40), PORT, &[(pod_ip(1, 0), 1)])]);
    let _l = Listener::start(&c.pod(1, 0).ns, PORT, "web").unwrap();
    let backend = c.pod(1, 0).clone();
    let before = tcp_segments_in(&backend);
    // What a real node's SYN from its pod would look like, sent by the client.
    let inner = Spec::tcp((pod_ip(2, 0), 40000), (vip(40), PORT), TCP_SYN).build();
    let wrapped = craft::vxlan(
        (Default::default(), Default::default()),
        CLIENT,
        node_ip(1),
        lab::VXLAN_PORT,
        lab::VXLAN_VNI,
        &inner,
    );
    lab::flood::send_raw(&c.lab.client.ns, vec![wrapped[14..].to_vec(); 20]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(tcp_segments_in(&backend), before, "the backend got the off-cluster SYN");
    assert_eq!(c.dropped("overlay_unknown_peer"), 0.0, "the steering program took it");
    // The same wrapped SYN from node 2's address does get through (so the
    // check above would have seen it).
    let from_node = craft::vxlan(
        (Default::default(), Default::default()),
        node_ip(2),
        node_ip(1),
        lab::VXLAN_PORT,
        lab::VXLAN_VNI,
        &inner,
    );
    lab::flood::send_raw(&c.lab.client.ns, vec![from_node[14..].to_vec()]).unwrap();
    wait_for("the backend saw the node's wrapped SYN", || {
        tcp_segments_in(&backend) > before
    });
    // A real node's pods still reach the service over the overlay.
    assert_eq!(greet(c.pod(2, 0), sa(vip(40), PORT)), "web");
    c.assert_no_checksum_errors();
}

/// Issue #8: a pod cannot send with another pod's (or a node's) address.
/// Its forged SYNs to a ClusterIP and to a pod on another node never
/// reach a backend; kxp counts them.
#[test]
fn a_pod_cannot_forge_its_source_address() {
    if !lab::root_or_skip() {
        return;
    }
    use dataplane::craft::Spec;
    use dataplane::wire::l4::TCP_SYN;
    let c = Cluster::new(2, 2, &[1, 2], &[Svc::tcp("web", vip(41), PORT, &[(pod_ip(1, 0), 1)])]);
    let _a = Listener::start(&c.pod(1, 0).ns, PORT, "a").unwrap();
    let _b = Listener::start(&c.pod(2, 0).ns, PORT, "b").unwrap();
    let (a, b) = (c.pod(1, 0).clone(), c.pod(2, 0).clone());
    let before = (tcp_segments_in(&a), tcp_segments_in(&b));
    let mut forged = Vec::new();
    for src in [pod_ip(2, 1), node_ip(2), Ipv4Addr::new(10, 77, 9, 9)] {
        for (port, dst) in [(1u16, vip(41)), (2, pod_ip(2, 0))] {
            forged.push(Spec::tcp((src, 40000 + port), (dst, PORT), TCP_SYN).build()[14..].to_vec());
        }
    }
    lab::flood::send_raw(&c.pod(1, 1).ns, forged).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        (tcp_segments_in(&a), tcp_segments_in(&b)),
        before,
        "a forged SYN reached a backend"
    );
    assert!(c.dropped("spoofed_source") >= 6.0, "{}", c.dropped("spoofed_source"));
    // The same SYN from its own address gets there (so the count above
    // would have seen a forged one).
    let own = Spec::tcp((pod_ip(1, 1), 40009), (vip(41), PORT), TCP_SYN).build()[14..].to_vec();
    lab::flood::send_raw(&c.pod(1, 1).ns, vec![own]).unwrap();
    wait_for("the backend saw the pod's own SYN", || tcp_segments_in(&a) > before.0);
    assert_eq!(greet(c.pod(1, 1), sa(vip(41), PORT)), "a");
    c.assert_no_checksum_errors();
}

/// Issue #9: a pod reaches a backend through its ClusterIP from port P,
/// the connection closes, and the pod connects to the same backend directly
/// from the same P right away. The backend's answer must not be rewritten
/// by the finished service flow (it was: the client reset it). With
/// iptables it works, and so it must with kxp.
#[test]
fn a_direct_connection_right_after_a_clusterip_one_from_the_same_port_works() {
    if !lab::root_or_skip() {
        return;
    }
    use lab::probe::connect_from;
    let c = Cluster::new(1, 2, &[1], &[Svc::tcp("web", vip(42), PORT, &[(pod_ip(1, 0), 1)])]);
    let _l = Listener::start(&c.pod(1, 0).ns, PORT, "web").unwrap();
    let client = &c.pod(1, 1).ns;
    for p in [41000u16, 41001, 41002] {
        let via_service = connect_from(client, p, sa(vip(42), PORT), Duration::from_secs(3));
        assert_eq!(via_service.unwrap(), "web");
        let direct = connect_from(client, p, sa(pod_ip(1, 0), PORT), Duration::from_secs(3));
        assert_eq!(direct.unwrap_or_else(|e| panic!("direct from port {p}: {e}")), "web");
    }
    assert_eq!(c.dropped("kernel_return"), 0.0);
    c.assert_no_checksum_errors();
}

/// Issue #9: 4 and 8 KB UDP datagrams (a large DNS answer, say) through a
/// ClusterIP from a pod and through a NodePort from outside: sent and
/// echoed in fragments, each fragment NATed like its datagram's first,
/// arriving whole both ways. (Before, fragments went to the kernel, which
/// has no NAT state: nothing arrived.)
#[test]
fn a_fragmented_udp_datagram_crosses_a_service_whole() {
    if !lab::root_or_skip() {
        return;
    }
    use lab::probe::{udp_roundtrip, UdpEcho};
    // From a pod, through the ClusterIP to a backend on the other node; from
    // outside, through the NodePort to a backend on the node it reached.
    // kxp does not fragment: a 1500-byte packet from the uplink fits
    // neither the overlay nor a pod's 1450-byte MTU, where the kernel would
    // fragment it again. The client here sends 1450-byte fragments.
    let cross = Svc::new("dns", vip(53), 5353, &[(pod_ip(2, 0), 2)]);
    let mut local = Svc::new("dns-np", vip(54), 5353, &[(pod_ip(1, 1), 1)]);
    local.node_port = Some(30053);
    let c = Cluster::new(2, 2, &[1, 2], &[cross, local]);
    let _echo = UdpEcho::start(&c.pod(2, 0).ns, 5353).unwrap();
    let _local_echo = UdpEcho::start(&c.pod(1, 1).ns, 5353).unwrap();
    c.lab
        .client
        .exec(&["ip", "link", "set", "eth0", "mtu", "1450"])
        .unwrap();
    // kxp learns the client's MAC from the kernel's neighbour table (as the
    // kernel announces it): the very first answer may race it.
    wait_for("the NodePort answers UDP", || {
        udp_roundtrip(&c.lab.client.ns, sa(node_ip(1), 30053), 100, Duration::from_millis(500)).is_ok()
    });
    for size in [1000, 4000, 8000] {
        let got = udp_roundtrip(&c.pod(1, 0).ns, sa(vip(53), 5353), size, Duration::from_secs(3));
        let got = got.unwrap_or_else(|e| panic!("{size} B via the ClusterIP: {e}\n{}", c.counters()));
        assert_eq!(got, size);
        let got = udp_roundtrip(&c.lab.client.ns, sa(node_ip(1), 30053), size, Duration::from_secs(3));
        let got = got.unwrap_or_else(|e| panic!("{size} B via the NodePort: {e}\n{}", c.counters()));
        assert_eq!(got, size);
    }
    std::thread::sleep(Duration::from_millis(300)); // the workers' next report
    let translated: f64 = c
        .kxps
        .iter()
        .map(|k| k.metric_sum("kxp_worker_events", &["event=\"fragments_translated\""]))
        .sum();
    assert!(translated > 0.0, "later fragments went through kxp\n{}", c.counters());
    assert_eq!(c.dropped("kernel_return"), 0.0);
    c.assert_no_checksum_errors();
}

/// `kxp dump latency` against a running kxp: every part of the worker's
/// time, and kxp's own per-packet work a small fraction of the batch
/// figure (which holds the kernel's delivery work); the raw histograms
/// written as an interval log that reads back.
#[test]
fn kxp_dump_latency_splits_a_workers_time_into_its_parts() {
    if !lab::root_or_skip() {
        return;
    }
    let c = Cluster::new(1, 2, &[1], &[Svc::new("local", vip(12), PORT, &[(pod_ip(1, 0), 1)])]);
    let _servers = Iperf::serve(&[c.pod(1, 0)]);
    assert!(iperf(c.pod(1, 1), vip(12), PORT, "4M", false) >= 4e6);
    std::thread::sleep(Duration::from_millis(300)); // a report
    let dir = tempfile::tempdir().unwrap();
    let hlog = dir.path().join("latency.hlog");
    let bin = env!("CARGO_BIN_EXE_kxp");
    let k = &c.kxps[0];
    let out = c.lab.nodes[0]
        .host
        .exec(&[
            bin,
            "dump",
            "latency",
            "--metrics",
            &k.metrics,
            "--hlog",
            &hlog.to_string_lossy(),
        ])
        .expect("kxp dump latency runs");
    let row = |tag: &str| -> Vec<f64> {
        let line = out
            .lines()
            .find(|l| l.starts_with(tag))
            .unwrap_or_else(|| panic!("{tag} in\n{out}"));
        line.split_whitespace().skip(1).map(|v| v.parse().unwrap()).collect()
    };
    let (batch, engine) = (row("q0.batch"), row("q0.engine"));
    assert!(engine[0] > 10.0, "engine samples: {out}");
    assert!(row("q0.tx_wakeup")[0] > 0.0, "{out}");
    assert!(
        engine[1] < batch[1],
        "kxp's own work (engine p50 {} us) is a part of the batch (p50 {} us)\n{out}",
        engine[1],
        batch[1]
    );
    let hists = control::latency_log::decode(&std::fs::read(&hlog).unwrap()).unwrap();
    assert_eq!(hists.len(), 4, "one histogram per part");
    eprintln!("{out}");
}

/// `kxp.workerPriority` puts the worker threads, and only them, under
/// SCHED_FIFO, and traffic still flows.
#[test]
fn worker_priority_makes_the_workers_real_time() {
    if !lab::root_or_skip() {
        return;
    }
    let lab = Lab::build(1, 2).expect("lab builds");
    let svc = Svc::new("rt", vip(13), 7700, &[(pod_ip(1, 0), 1)]);
    let c = Cluster::with(lab, &[1], &[svc], "  workerPriority: 10\n");
    let _server = Listener::start(&c.pod(1, 0).ns, 7700, "rt").unwrap();
    assert_eq!(greet(c.pod(1, 1), sa(vip(13), 7700)), "rt");
    let policies: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{}/task", c.kxps[0].pid()))
        .unwrap()
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?.trim().to_string();
            // Field 41 of stat is the scheduling policy (1: SCHED_FIFO);
            // split after the command's closing parenthesis.
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            let rest = stat.rsplit_once(')')?.1;
            let policy = rest.split_whitespace().nth(41 - 3)?.to_string();
            Some((comm, policy))
        })
        .collect();
    let workers: Vec<_> = policies.iter().filter(|(c, _)| c.starts_with("kxp-worker")).collect();
    assert!(!workers.is_empty(), "{policies:?}");
    assert!(
        workers.iter().all(|(_, p)| p == "1"),
        "workers SCHED_FIFO: {policies:?}"
    );
    assert!(
        policies
            .iter()
            .filter(|(c, _)| !c.starts_with("kxp-worker"))
            .all(|(_, p)| p == "0"),
        "the rest of kxp runs normally: {policies:?}"
    );
}

/// With pods in a UMEM of their own, a spoofed UDP flood from off the
/// cluster at a NodePort (every packet copied from the uplink's UMEM into
/// the pods') must not starve the other pods: a pod keeps reaching another
/// through a ClusterIP meanwhile, and every frame of both UMEMs stays
/// accounted for.
#[test]
fn a_flood_copied_into_the_pods_umem_does_not_starve_other_pods() {
    if !lab::root_or_skip() {
        return;
    }
    use lab::flood::{flood, Kind};
    const NODE_PORT: u16 = 30708;
    let mut target = Svc::new("flooded", vip(95), 7800, &[(pod_ip(1, 0), 1)]);
    target.node_port = Some(NODE_PORT);
    let other = Svc::tcp("other", vip(96), 7801, &[(pod_ip(1, 2), 1)]);
    let c = Cluster::with(
        Lab::build(1, 3).expect("lab builds"),
        &[1],
        &[target, other],
        "  umemLayout: split\n",
    );
    let _other = Listener::start(&c.pod(1, 2).ns, 7801, "other").unwrap();
    let k = &c.kxps[0];
    wait_for("two UMEMs", || k.metric_sum("kxp_worker_umems", &[]) == 2.0);
    let pool = k.metric_sum("kxp_worker_frames", &["place=\"total\""]);
    let client_ns = c.lab.client.ns.clone();
    let attack = std::thread::spawn(move || {
        flood(
            &client_ns,
            Kind::Udp,
            SocketAddrV4::new(node_ip(1), NODE_PORT),
            500_000,
            2,
        )
    });
    let mut greeted = 0;
    while !attack.is_finished() {
        let got = connect(&c.pod(1, 1).ns, sa(vip(96), 7801), Duration::from_secs(12))
            .unwrap_or_else(|e| panic!("a pod could not reach another during the flood: {e}"));
        assert_eq!(got, "other");
        greeted += 1;
    }
    let sent = attack.join().unwrap().unwrap();
    assert_eq!(greet(c.pod(1, 1), sa(vip(96), 7801)), "other", "right after the flood");
    std::thread::sleep(Duration::from_millis(300)); // a report
    let text = k.metrics();
    let frames = |place: &str| lab::kxp::metric_sum(&text, "kxp_worker_frames", &[&format!("place=\"{place}\"")]);
    let parts: f64 = ["free", "fill", "tx", "held"].iter().map(|p| frames(p)).sum();
    assert_eq!(parts, frames("total"), "every frame of both UMEMs is somewhere");
    assert_eq!(frames("total"), pool, "no frame written off");
    assert_eq!(
        lab::kxp::metric_sum(&text, "kxp_worker_drops", &["reason=\"xsk_invalid_descs\""]),
        0.0
    );
    let copies = lab::kxp::metric_sum(&text, "kxp_worker_events", &["event=\"umem_copies\""]);
    let no_frame = lab::kxp::metric_sum(&text, "kxp_worker_drops", &["reason=\"umem_copy_no_frame\""]);
    assert!(copies > 1000.0, "the flood crossed into the pods' UMEM: {copies}");
    eprintln!(
        "UDP flood: {} packets at {:.0} pps; {greeted} connections between pods meanwhile; {copies} copies, {no_frame} dropped for want of a frame",
        sent.packets,
        sent.pps()
    );
}
