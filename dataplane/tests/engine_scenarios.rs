//! One scenario per point of the engine's contract (issue #2), driven
//! through `Worker::process` on the one-node topology in `support`.
//! Every transmitted frame is checked for valid IPv4 and L4 checksums.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use dataplane::addr::{Mac, Proto, SvcId};
use dataplane::craft::{self, Spec};
use dataplane::flow::CtConfig;
use dataplane::tables::{ChecksumPolicy, ServiceSpec};
use dataplane::wire::icmp::{CODE_FRAGMENTATION_NEEDED, TYPE_DEST_UNREACHABLE};
use dataplane::wire::l4::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use dataplane::wire::{ipv4, l4 as wl4};
use dataplane::{DropReason, Verdict};
use support::*;

fn only(s: &mut ServiceSpec, eps: Vec<dataplane::tables::EndpointInfo>) {
    s.endpoints = eps;
}

fn web_on_a(proto: Proto) -> ServiceSpec {
    let mut s = web(proto);
    only(&mut s, vec![ep(POD_A, 8080, true)]);
    s
}

fn from_pod_b(lab: &mut Lab, spec: Spec) -> Out {
    lab.send(PORT_B, &spec.macs(POD_B_MAC, PORT_B_MAC).build())
}

fn from_pod_a(lab: &mut Lab, spec: Spec) -> Out {
    lab.send(PORT_A, &spec.macs(POD_A_MAC, PORT_A_MAC).build())
}

// ---- 1. parsing ----

#[test]
fn non_ipv4_and_node_traffic_pass_to_the_kernel_untouched() {
    let mut lab = Lab::new(&[web(Proto::Tcp)]);
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&GW_MAC.0);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.resize(60, 0);
    assert_eq!(lab.send(UPLINK, &arp).verdict, Verdict::Pass);
    let mut v6 = arp.clone();
    v6[12..14].copy_from_slice(&[0x86, 0xdd]);
    assert_eq!(lab.send(UPLINK, &v6).verdict, Verdict::Pass);
    // A fragment of the node's own traffic from outside is the kernel's.
    let mut frag = udp((CLIENT_IP, 4000), (NODE_IP, 53)).macs(GW_MAC, UPLINK_MAC).build();
    frag[14 + 6] = 0x20; // MF
    let frag = fix_ip_checksum(&frag);
    let out = lab.send(UPLINK, &frag);
    assert_eq!(out.verdict, Verdict::Pass);
    assert_eq!(out.bytes, frag);
    // SSH to the node is not kxp's.
    assert_eq!(
        lab.send_from_client(tcp((CLIENT_IP, 5555), (NODE_IP, 22), TCP_SYN))
            .verdict,
        Verdict::Pass
    );
}

fn fix_ip_checksum(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    let ihl = usize::from(f[14] & 0x0f) * 4;
    f[24] = 0;
    f[25] = 0;
    let c = dataplane::wire::checksum::finish(dataplane::wire::checksum::sum(&f[14..14 + ihl]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn malformed_frames_are_dropped_with_a_reason_never_a_panic() {
    let mut lab = Lab::new(&[web(Proto::Tcp)]);
    let good = tcp((POD_B, 4000), (CLUSTER_IP, 80), TCP_SYN)
        .macs(POD_B_MAC, PORT_B_MAC)
        .build();
    let cases: Vec<(Vec<u8>, DropReason)> = vec![
        (good[..10].to_vec(), DropReason::TruncatedEthernet),
        (good[..30].to_vec(), DropReason::TruncatedIpv4),
        (good[..40].to_vec(), DropReason::TruncatedIpv4),
        (
            {
                let mut b = good.clone();
                b[24] ^= 0xff;
                b
            },
            DropReason::BadIpv4Checksum,
        ),
        (
            {
                let mut b = good.clone();
                b[14] = 0x43;
                b
            },
            DropReason::BadIpv4Header,
        ),
        (
            {
                // TCP data offset beyond the segment.
                let mut b = good.clone();
                b[14 + 20 + 12] = 0xf0;
                b
            },
            DropReason::TruncatedL4,
        ),
    ];
    for (frame, reason) in cases {
        assert_eq!(lab.send(PORT_B, &frame).verdict, Verdict::Drop(reason));
        assert!(lab.worker.stats.drop_count(reason) >= 1);
    }
}

#[test]
fn vlan_tagged_uplink_and_ip_options_are_handled() {
    let mut lab = Lab::new(&[web_on_a(Proto::Tcp)]);
    let mut n = node_config();
    n.ports[0].vlan = Some(100);
    lab.update(|t| t.set_node(n));
    let mut syn = tcp((CLIENT_IP, 5000), (NODE_IP, 30080), TCP_SYN);
    syn.vlan = Some(100);
    let out = lab.send_from_client(syn);
    assert_eq!(out.tx_port(), PORT_A);
    let s = out.seen();
    assert_eq!((s.vlan, s.dst, s.ports.1), (None, POD_A, 8080));
    let back = from_pod_a(&mut lab, tcp((POD_A, 8080), (NODE_IP, s.ports.0), TCP_SYN | TCP_ACK));
    assert_eq!(back.tx_port(), UPLINK);
    let r = back.seen();
    assert_eq!(
        (r.vlan, r.src, r.ports.0, r.dst, r.dst_mac),
        (Some(100), NODE_IP, 30080, CLIENT_IP, GW_MAC)
    );

    // IPv4 options: a 24-byte header still gets NATed.
    let mut lab = Lab::new(&[web_on_a(Proto::Udp)]);
    let plain = udp((POD_B, 4000), (CLUSTER_IP, 80)).macs(POD_B_MAC, PORT_B_MAC).build();
    let mut opt = plain[..34].to_vec();
    opt.extend_from_slice(&[1, 1, 1, 0]);
    opt.extend_from_slice(&plain[34..]);
    opt[14] = 0x46;
    let total = (opt.len() - 14) as u16;
    opt[16..18].copy_from_slice(&total.to_be_bytes());
    let opt = fix_ip_checksum(&opt);
    let out = lab.send(PORT_B, &opt);
    assert_eq!(out.tx_port(), PORT_A);
    assert_eq!(out.seen().dst, POD_A);
}

// ---- 2. services and reverse NAT ----

#[test]
fn clusterip_tcp_dnat_and_reverse_nat() {
    let mut lab = Lab::new(&[web_on_a(Proto::Tcp)]);
    let out = from_pod_b(&mut lab, tcp((POD_B, 40000), (CLUSTER_IP, 80), TCP_SYN));
    assert_eq!(out.tx_port(), PORT_A);
    let s = out.seen();
    assert_eq!(
        (s.src, s.ports.0, s.dst, s.ports.1),
        (POD_B, 40000, POD_A, 8080),
        "pod source kept, DNAT to backend"
    );
    assert_eq!((s.dst_mac, s.src_mac, s.ttl), (POD_A_MAC, PORT_A_MAC, 63));
    let back = from_pod_a(&mut lab, tcp((POD_A, 8080), (POD_B, 40000), TCP_SYN | TCP_ACK));
    assert_eq!(back.tx_port(), PORT_B);
    let r = back.seen();
    assert_eq!((r.src, r.ports.0, r.dst, r.ports.1), (CLUSTER_IP, 80, POD_B, 40000));
    assert_eq!(r.dst_mac, POD_B_MAC);
}

#[test]
fn clusterip_udp_dnat_and_reverse_nat() {
    let mut lab = Lab::new(&[web_on_a(Proto::Udp)]);
    let s = from_pod_b(&mut lab, udp((POD_B, 5353), (CLUSTER_IP, 80))).seen();
    assert_eq!((s.dst, s.ports.1), (POD_A, 8080));
    let r = from_pod_a(&mut lab, udp((POD_A, 8080), (POD_B, 5353))).seen();
    assert_eq!((r.src, r.ports.0, r.dst, r.ports.1), (CLUSTER_IP, 80, POD_B, 5353));
}

#[test]
fn nodeport_loadbalancer_and_external_ips_reach_the_service() {
    for (dst, port) in [(NODE_IP, 30080), (LB_IP, 80), (EXTERNAL_IP, 80)] {
        let mut lab = Lab::new(&[web_on_a(Proto::Tcp)]);
        let out = lab.send_from_client(tcp((CLIENT_IP, 5000), (dst, port), TCP_SYN));
        assert_eq!(out.tx_port(), PORT_A, "{dst}:{port}");
        let s = out.seen();
        assert_eq!((s.dst, s.ports.1), (POD_A, 8080));
        assert_eq!(s.src, NODE_IP, "eTP=Cluster SNATs to the node");
        let r = from_pod_a(&mut lab, tcp((POD_A, 8080), (NODE_IP, s.ports.0), TCP_SYN | TCP_ACK)).seen();
        assert_eq!((r.src, r.ports.0, r.dst, r.ports.1), (dst, port, CLIENT_IP, 5000));
        assert_eq!(r.dst_mac, GW_MAC, "off-subnet client goes via the gateway");
    }
    // A NodePort on an address that is not the node's is not a service.
    let mut lab = Lab::new(&[web_on_a(Proto::Tcp)]);
    assert_eq!(
        lab.send_from_client(tcp((CLIENT_IP, 5000), (EXT_IP, 30080), TCP_SYN))
            .verdict,
        Verdict::Pass
    );
}

// ---- 3. Maglev over ready endpoints, terminating fallback ----

fn four_remote(proto: Proto) -> ServiceSpec {
    let mut s = web(proto);
    only(
        &mut s,
        (10..14)
            .map(|i| ep(Ipv4Addr::new(10, 244, 2, i), 8080, false))
            .collect(),
    );
    s
}

fn backend_of(out: &Out) -> Ipv4Addr {
    let (_, _, inner) = craft::unwrap_vxlan(&out.bytes).unwrap();
    craft::inspect(inner).unwrap().dst
}

#[test]
fn new_flows_spread_over_all_ready_endpoints() {
    let mut lab = Lab::new(&[four_remote(Proto::Tcp)]);
    let mut per: HashMap<Ipv4Addr, usize> = HashMap::new();
    for p in 0..400u16 {
        let out = from_pod_b(&mut lab, tcp((POD_B, 20000 + p), (CLUSTER_IP, 80), TCP_SYN));
        *per.entry(backend_of(&out)).or_default() += 1;
    }
    assert_eq!(per.len(), 4);
    assert!(per.values().all(|&c| c >= 60), "uneven spread {per:?}");
}

#[test]
fn terminating_serving_endpoints_are_used_only_when_none_is_ready() {
    let mut s = four_remote(Proto::Tcp);
    for e in &mut s.endpoints {
        e.ready = false;
        e.serving = false;
    }
    s.endpoints[2].serving = true;
    s.endpoints[2].terminating = true;
    let mut lab = Lab::new(&[s]);
    for p in 0..20u16 {
        let out = from_pod_b(&mut lab, tcp((POD_B, 20000 + p), (CLUSTER_IP, 80), TCP_SYN));
        assert_eq!(backend_of(&out), Ipv4Addr::new(10, 244, 2, 12));
    }
}

// ---- 4. session affinity ----

#[test]
fn client_ip_affinity_holds_until_timeout_then_may_move() {
    let mut s = four_remote(Proto::Tcp);
    s.affinity = Some(Duration::from_secs(10));
    let mut lab = Lab::new(&[s]);
    let mut moved = false;
    let mut port = 10000u16;
    for _round in 0..20 {
        let mut seen = HashSet::new();
        for _ in 0..25 {
            port += 1;
            let out = lab.send_from_client(tcp((CLIENT_IP, port), (CLUSTER_IP, 80), TCP_SYN));
            seen.insert(backend_of(&out));
            lab.advance(Duration::from_millis(300)); // within the timeout
        }
        assert_eq!(seen.len(), 1, "affinity broken within the timeout");
        let before = *seen.iter().next().unwrap();
        lab.advance(Duration::from_secs(11));
        port += 1;
        let after = backend_of(&lab.send_from_client(tcp((CLIENT_IP, port), (CLUSTER_IP, 80), TCP_SYN)));
        moved |= after != before;
    }
    assert!(moved, "after the timeout a client must be free to move");
    // Without affinity the same client spreads.
    let mut lab = Lab::new(&[four_remote(Proto::Tcp)]);
    let spread: HashSet<_> = (0..50u16)
        .map(|p| backend_of(&lab.send_from_client(tcp((CLIENT_IP, 30000 + p), (CLUSTER_IP, 80), TCP_SYN))))
        .collect();
    assert!(spread.len() >= 3);
}

#[test]
fn affinity_default_timeout_is_three_hours() {
    assert_eq!(
        dataplane::tables::service::DEFAULT_AFFINITY_TIMEOUT,
        Duration::from_secs(10800)
    );
}

// ---- 5. traffic policies and SNAT ports ----

#[test]
fn etp_local_preserves_client_ip_and_uses_local_endpoints_only() {
    let mut s = web(Proto::Tcp); // pod A local + remote pod
    s.external_local = true;
    let mut lab = Lab::new(&[s.clone()]);
    for p in 0..30u16 {
        let out = lab.send_from_client(tcp((CLIENT_IP, 7000 + p), (NODE_IP, 30080), TCP_SYN));
        assert_eq!(out.tx_port(), PORT_A);
        let seen = out.seen();
        assert_eq!(
            (seen.src, seen.ports.0),
            (CLIENT_IP, 7000 + p),
            "client source must be preserved"
        );
    }
    // Reply goes straight back to the client with the NodePort as source.
    let r = from_pod_a(&mut lab, tcp((POD_A, 8080), (CLIENT_IP, 7000), TCP_SYN | TCP_ACK)).seen();
    assert_eq!((r.src, r.ports.0, r.dst), (NODE_IP, 30080, CLIENT_IP));
    // No local endpoint: dropped, like kube-proxy.
    only(&mut s, vec![ep(REMOTE_POD, 8080, false)]);
    let mut lab = Lab::new(&[s]);
    let out = lab.send_from_client(tcp((CLIENT_IP, 7000), (NODE_IP, 30080), TCP_SYN));
    assert_eq!(out.verdict, Verdict::Drop(DropReason::NoLocalEndpoint));
    // Pods inside the cluster still reach it through all endpoints.
    let out = from_pod_b(&mut lab, tcp((POD_B, 7000), (LB_IP, 80), TCP_SYN));
    assert_eq!(out.tx_port(), UPLINK);
}

#[test]
fn itp_local_uses_local_endpoints_for_clusterip_traffic() {
    let mut s = web(Proto::Tcp);
    s.internal_local = true;
    let mut lab = Lab::new(&[s.clone()]);
    for p in 0..30u16 {
        assert_eq!(
            from_pod_b(&mut lab, tcp((POD_B, 7000 + p), (CLUSTER_IP, 80), TCP_SYN)).tx_port(),
            PORT_A
        );
    }
    only(&mut s, vec![ep(REMOTE_POD, 8080, false)]);
    let mut lab = Lab::new(&[s]);
    let out = from_pod_b(&mut lab, tcp((POD_B, 7000), (CLUSTER_IP, 80), TCP_SYN));
    assert_eq!(out.verdict, Verdict::Drop(DropReason::NoLocalEndpoint));
}

#[test]
fn snat_ports_never_collide_between_live_flows() {
    let mut lab = Lab::new(&[web_on_a(Proto::Udp)]);
    let mut ports = HashSet::new();
    // 300 clients that all use source port 40000 toward one backend.
    for i in 0..300u32 {
        let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(203, 0, 113, 0)) + i);
        let s = lab.send_from_client(udp((client, 40000), (NODE_IP, 30080))).seen();
        assert_eq!(s.src, NODE_IP);
        assert!(
            (1024..=29999).contains(&s.ports.0),
            "SNAT port {} outside the range",
            s.ports.0
        );
        assert!(ports.insert(s.ports.0), "SNAT port {} reused", s.ports.0);
    }
    // Each reply finds its own client.
    for (i, p) in ports.iter().enumerate().take(20) {
        let r = from_pod_a(&mut lab, udp((POD_A, 8080), (NODE_IP, *p))).seen();
        let idx = u32::from(r.dst).wrapping_sub(u32::from(Ipv4Addr::new(203, 0, 113, 0)));
        assert!(idx < 300 && r.ports.1 == 40000, "reply {i} lost: {r:?}");
    }
}

#[test]
fn same_client_tuple_to_two_services_on_one_backend_gets_distinct_reply_tuples() {
    let a = web_on_a(Proto::Udp);
    let mut b = ServiceSpec::cluster_ip(SvcId(2), "ns/other:dns", Ipv4Addr::new(10, 96, 0, 11), 80, Proto::Udp);
    b.endpoints = vec![ep(POD_A, 8080, true)];
    let mut lab = Lab::new(&[a, b]);
    let x = from_pod_b(&mut lab, udp((POD_B, 5000), (CLUSTER_IP, 80))).seen();
    let y = from_pod_b(&mut lab, udp((POD_B, 5000), (Ipv4Addr::new(10, 96, 0, 11), 80))).seen();
    assert_eq!((x.src, x.ports.0), (POD_B, 5000));
    assert_eq!(y.src, POD_B);
    assert_ne!(y.ports.0, 5000, "second flow needs its own reply tuple");
    let rx = from_pod_a(&mut lab, udp((POD_A, 8080), (POD_B, 5000))).seen();
    let ry = from_pod_a(&mut lab, udp((POD_A, 8080), (POD_B, y.ports.0))).seen();
    assert_eq!((rx.src, rx.ports.1), (CLUSTER_IP, 5000));
    assert_eq!((ry.src, ry.ports.1), (Ipv4Addr::new(10, 96, 0, 11), 5000));
}

// ---- 6. hairpin and masquerade ----

#[test]
fn hairpin_is_snated_so_the_reply_returns_through_kxp() {
    let mut lab = Lab::new(&[web_on_a(Proto::Tcp)]);
    let out = from_pod_a(&mut lab, tcp((POD_A, 33000), (CLUSTER_IP, 80), TCP_SYN));
    assert_eq!(out.tx_port(), PORT_A);
    let s = out.seen();
    assert_eq!((s.src, s.dst, s.ports.1), (NODE_IP, POD_A, 8080));
    let r = from_pod_a(&mut lab, tcp((POD_A, 8080), (NODE_IP, s.ports.0), TCP_SYN | TCP_ACK)).seen();
    assert_eq!((r.src, r.ports.0, r.dst, r.ports.1), (CLUSTER_IP, 80, POD_A, 33000));
}

#[test]
fn sources_outside_the_cluster_cidr_are_masqueraded_to_a_clusterip() {
    let mut lab = Lab::new(&[web_on_a(Proto::Tcp)]);
    let s = lab
        .send(
            UPLINK,
            &tcp((EXT_IP, 6000), (CLUSTER_IP, 80), TCP_SYN)
                .macs(EXT_MAC, UPLINK_MAC)
                .build(),
        )
        .seen();
    assert_eq!(s.src, NODE_IP);
    let r = from_pod_a(&mut lab, tcp((POD_A, 8080), (NODE_IP, s.ports.0), TCP_SYN | TCP_ACK)).seen();
    assert_eq!(
        (r.dst, r.ports.1, r.dst_mac),
        (EXT_IP, 6000, EXT_MAC),
        "on-subnet client reached directly"
    );
}

// ---- 7. no endpoints ----

#[test]
fn service_without_endpoints_answers_port_unreachable_rate_limited() {
    let mut s = web(Proto::Udp);
    s.endpoints.clear();
    let mut t = web(Proto::Tcp);
    t.id = SvcId(2);
    t.node_port = None;
    t.endpoints.clear();
    let mut lab = Lab::new(&[s, t]);
    let probe = udp((POD_B, 5353), (CLUSTER_IP, 80)).macs(POD_B_MAC, PORT_B_MAC).build();
    let out = lab.send(PORT_B, &probe);
    assert_eq!(out.tx_port(), PORT_B, "answered back out of the ingress port");
    let s = out.seen();
    assert_eq!((s.proto, s.ports), (1, (3, 3)), "ICMP port unreachable");
    assert_eq!(
        (s.src, s.dst, s.dst_mac, s.src_mac),
        (CLUSTER_IP, POD_B, POD_B_MAC, PORT_B_MAC)
    );
    let quoted = &out.bytes[14 + 28..];
    assert_eq!(quoted, &probe[14..], "quotes the offending datagram");
    // TCP too (kube-proxy's REJECT uses ICMP for both).
    let t = from_pod_b(&mut lab, tcp((POD_B, 4000), (CLUSTER_IP, 80), TCP_SYN)).seen();
    assert_eq!(t.ports, (3, 3));
    // Rate limited: a flood gets at most the burst.
    let answered = (0..500)
        .filter(|_| matches!(lab.send(PORT_B, &probe).verdict, Verdict::Tx(_)))
        .count();
    assert!(answered <= 50, "{answered} answers");
    assert!(lab.worker.stats.drop_count(DropReason::RejectRateLimited) >= 450);
    lab.advance(Duration::from_secs(1));
    assert!(
        matches!(lab.send(PORT_B, &probe).verdict, Verdict::Tx(_)),
        "limit refills with time"
    );
}

// ---- 8. conntrack ----

#[test]
fn half_open_flows_expire_and_established_ones_persist() {
    let mut lab = Lab::new(&[web_on_a(Proto::Tcp)]);
    from_pod_b(&mut lab, tcp((POD_B, 1111), (CLUSTER_IP, 80), TCP_SYN));
    lab.advance(Duration::from_secs(121));
    // The SYN-ACK arrives too late: no flow, so it is delivered as it is,
    // not translated.
    let late = from_pod_a(&mut lab, tcp((POD_A, 8080), (POD_B, 1111), TCP_SYN | TCP_ACK));
    assert_eq!(late.verdict, Verdict::Tx(PORT_B));
    assert_eq!((late.seen().src, late.seen().ports.0), (POD_A, 8080), "not un-DNATed");

    from_pod_b(&mut lab, tcp((POD_B, 2222), (CLUSTER_IP, 80), TCP_SYN));
    from_pod_a(&mut lab, tcp((POD_A, 8080), (POD_B, 2222), TCP_SYN | TCP_ACK));
    from_pod_b(&mut lab, tcp((POD_B, 2222), (CLUSTER_IP, 80), TCP_ACK));
    lab.advance(Duration::from_secs(6 * 3600));
    let data = from_pod_b(&mut lab, tcp((POD_B, 2222), (CLUSTER_IP, 80), TCP_ACK));
    assert_eq!(data.seen().dst, POD_A, "established flow survives 6 idle hours");
    // After both FINs it lingers only for TIME_WAIT.
    from_pod_b(&mut lab, tcp((POD_B, 2222), (CLUSTER_IP, 80), TCP_ACK | TCP_FIN));
    from_pod_a(&mut lab, tcp((POD_A, 8080), (POD_B, 2222), TCP_ACK | TCP_FIN));
    lab.advance(Duration::from_secs(121));
    let after = from_pod_a(&mut lab, tcp((POD_A, 8080), (POD_B, 2222), TCP_ACK)).seen();
    assert_eq!(after.src, POD_A, "flow gone after TIME_WAIT: not translated");
}

#[test]
fn udp_flows_expire_after_the_udp_timeout() {
    let mut lab = Lab::new(&[web_on_a(Proto::Udp)]);
    from_pod_b(&mut lab, udp((POD_B, 3333), (CLUSTER_IP, 80)));
    lab.advance(Duration::from_secs(31));
    let late = from_pod_a(&mut lab, udp((POD_A, 8080), (POD_B, 3333)));
    assert_eq!(late.seen().src, POD_A, "expired: delivered untranslated");
    assert_eq!(lab.worker.flows().conntrack.len(), 0);
}

fn two_backends(proto: Proto) -> ServiceSpec {
    let mut s = web(proto);
    only(&mut s, vec![ep(POD_A, 8080, true), ep(POD_B, 8080, true)]);
    s
}

/// Finds a client port whose flow lands on pod A.
fn flow_to_a(lab: &mut Lab, proto: Proto) -> u16 {
    (20000..)
        .find(|p| {
            let spec = match proto {
                Proto::Tcp => tcp((CLIENT_IP, *p), (CLUSTER_IP, 80), TCP_SYN),
                Proto::Udp => udp((CLIENT_IP, *p), (CLUSTER_IP, 80)),
            };
            lab.send_from_client(spec).tx_port() == PORT_A
        })
        .unwrap()
}

#[test]
fn udp_flow_moves_at_once_when_its_backend_leaves() {
    let mut lab = Lab::new(&[two_backends(Proto::Udp)]);
    let p = flow_to_a(&mut lab, Proto::Udp);
    let mut s = two_backends(Proto::Udp);
    only(&mut s, vec![ep(POD_B, 8080, true)]);
    lab.update(|t| t.upsert_service(&s).unwrap());
    let out = lab.send_from_client(udp((CLIENT_IP, p), (CLUSTER_IP, 80)));
    assert_eq!(
        out.tx_port(),
        PORT_B,
        "stale UDP conntrack must not black-hole the flow"
    );
    assert_eq!(lab.worker.stats.flows_rebalanced, 1);
    // And the new mapping is stable.
    assert_eq!(
        lab.send_from_client(udp((CLIENT_IP, p), (CLUSTER_IP, 80))).tx_port(),
        PORT_B
    );
    // A backend that stops serving (still listed) also loses its UDP flows.
    let mut lab = Lab::new(&[two_backends(Proto::Udp)]);
    let p = flow_to_a(&mut lab, Proto::Udp);
    let mut s = two_backends(Proto::Udp);
    s.endpoints[0].ready = false;
    s.endpoints[0].serving = false;
    lab.update(|t| t.upsert_service(&s).unwrap());
    assert_eq!(
        lab.send_from_client(udp((CLIENT_IP, p), (CLUSTER_IP, 80))).tx_port(),
        PORT_B
    );
}

#[test]
fn tcp_flow_is_reset_when_its_backend_leaves_and_kept_while_terminating() {
    let mut lab = Lab::new(&[two_backends(Proto::Tcp)]);
    let p = flow_to_a(&mut lab, Proto::Tcp);
    // Terminating but listed: the connection keeps its backend.
    let mut s = two_backends(Proto::Tcp);
    s.endpoints[0].ready = false;
    s.endpoints[0].terminating = true;
    lab.update(|t| t.upsert_service(&s).unwrap());
    let mut ack = tcp((CLIENT_IP, p), (CLUSTER_IP, 80), TCP_ACK);
    ack.ack = 777;
    assert_eq!(lab.send_from_client(ack.clone()).tx_port(), PORT_A);
    // New connections avoid the terminating backend.
    for q in 50000..50020u16 {
        assert_eq!(
            lab.send_from_client(tcp((CLIENT_IP, q), (CLUSTER_IP, 80), TCP_SYN))
                .tx_port(),
            PORT_B
        );
    }
    // Removed: the client gets a RST right away.
    only(&mut s, vec![ep(POD_B, 8080, true)]);
    lab.update(|t| t.upsert_service(&s).unwrap());
    let out = lab.send_from_client(ack);
    assert_eq!(out.tx_port(), UPLINK);
    let r = out.seen();
    assert_eq!(r.tcp_flags, TCP_RST);
    assert_eq!(
        (r.src, r.ports.0, r.dst, r.ports.1, r.dst_mac),
        (CLUSTER_IP, 80, CLIENT_IP, p, GW_MAC)
    );
    let seq = u32::from_be_bytes(out.bytes[r.ip_off + 24..r.ip_off + 28].try_into().unwrap());
    assert_eq!(seq, 777, "RST sequence number is the segment's ACK");
    assert_eq!(lab.worker.stats.flows_reset, 1);
    // Reconnecting from the same port lands on the remaining backend.
    assert_eq!(
        lab.send_from_client(tcp((CLIENT_IP, p), (CLUSTER_IP, 80), TCP_SYN))
            .tx_port(),
        PORT_B
    );
}

#[test]
fn conntrack_is_bounded() {
    let mut lab = Lab::with_config(
        &[web_on_a(Proto::Udp)],
        CtConfig {
            capacity: 256,
            ..CtConfig::default()
        },
    );
    for i in 0..2000u32 {
        let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i);
        lab.send_from_client(udp((client, 999), (CLUSTER_IP, 80)));
    }
    let ct = &lab.worker.flows().conntrack;
    assert!(ct.len() <= ct.capacity(), "{} > {}", ct.len(), ct.capacity());
    assert!(lab.worker.stats.ct_evictions > 0);
}

// ---- 9. ICMP errors through NAT ----

#[test]
fn fragmentation_needed_for_replies_reaches_the_backend() {
    let mut lab = Lab::new(&[web_on_a(Proto::Tcp)]);
    let s = lab
        .send_from_client(tcp((CLIENT_IP, 5000), (NODE_IP, 30080), TCP_SYN))
        .seen();
    let snat_port = s.ports.0;
    // A router toward the client cannot forward our (translated) reply.
    let reply_on_wire = tcp((NODE_IP, 30080), (CLIENT_IP, 5000), TCP_ACK).build();
    let quoted = &reply_on_wire[14..14 + 28];
    let err = craft::icmp_error(
        (GW_MAC, UPLINK_MAC),
        GW_IP,
        NODE_IP,
        TYPE_DEST_UNREACHABLE,
        CODE_FRAGMENTATION_NEEDED,
        1400,
        quoted,
    );
    let out = lab.send(UPLINK, &err);
    assert_eq!(out.tx_port(), PORT_A);
    let o = out.seen();
    assert_eq!((o.dst, o.ports), (POD_A, (3, 4)));
    let q = o.ip_off + 28;
    let qip = ipv4::parse_header(&out.bytes, q).expect("quoted header checksum valid");
    assert_eq!((qip.src, qip.dst), (POD_A, NODE_IP));
    let ports = (
        u16::from_be_bytes([out.bytes[q + 20], out.bytes[q + 21]]),
        u16::from_be_bytes([out.bytes[q + 22], out.bytes[q + 23]]),
    );
    assert_eq!(ports, (8080, snat_port), "quoted packet is what the backend sent");
    let mtu = u16::from_be_bytes([out.bytes[o.ip_off + 26], out.bytes[o.ip_off + 27]]);
    assert_eq!(mtu, 1400);
}

#[test]
fn icmp_errors_about_forwarded_packets_reach_the_client() {
    let mut lab = Lab::new(&[web_on_a(Proto::Udp)]);
    let s = lab.send_from_client(udp((CLIENT_IP, 5000), (NODE_IP, 30080))).seen();
    // The backend's host answers "port unreachable" about our forwarded datagram.
    let fwd_on_wire = udp((NODE_IP, s.ports.0), (POD_A, 8080)).build();
    let err = craft::icmp_error((POD_A_MAC, PORT_A_MAC), POD_A, NODE_IP, 3, 3, 0, &fwd_on_wire[14..]);
    let out = lab.send(PORT_A, &err);
    assert_eq!(out.tx_port(), UPLINK);
    let o = out.seen();
    assert_eq!((o.src, o.dst, o.dst_mac), (POD_A, CLIENT_IP, GW_MAC));
    let q = o.ip_off + 28;
    let qip = ipv4::parse_header(&out.bytes, q).unwrap();
    assert_eq!((qip.src, qip.dst), (CLIENT_IP, NODE_IP));
    let qs = wl4::parse_quoted(&out.bytes, &qip, out.bytes.len()).unwrap().unwrap();
    assert_eq!((qs.src_port, qs.dst_port), (5000, 30080));
    // The quoted UDP checksum was updated too (it is inside the quote).
    let whole = out.bytes[q..].to_vec();
    let qh = ipv4::parse(&whole, 0).unwrap();
    let seg = wl4::parse(&whole, &qh).unwrap().unwrap();
    assert!(wl4::checksum_valid(&whole, &qh, &seg));
    assert_eq!(lab.worker.stats.icmp_translated, 1);
}

// ---- 10. overlay ----

#[test]
fn pod_traffic_to_another_node_is_vxlan_encapsulated() {
    let mut lab = Lab::new(&[]);
    let out = from_pod_b(&mut lab, tcp((POD_B, 4444), (REMOTE_POD, 9000), TCP_SYN));
    assert_eq!(out.tx_port(), UPLINK);
    let (outer, vni, inner) = craft::unwrap_vxlan(&out.bytes).unwrap();
    assert_eq!(
        (outer.src, outer.dst, outer.dst_mac, outer.src_mac),
        (NODE_IP, N2_IP, N2_MAC, UPLINK_MAC)
    );
    assert_eq!(outer.ports.1, 8472);
    assert!(outer.ports.0 >= 49152);
    assert_eq!(vni, 1);
    let i = craft::inspect(inner).unwrap();
    assert_eq!(
        (i.src, i.dst, i.ttl, i.dst_mac, i.src_mac),
        (POD_B, REMOTE_POD, 63, N2_VTEP_MAC, VTEP_MAC)
    );
    assert!(i.checksums_ok);
    // The same flow always uses the same outer source port (ECMP-stable).
    let again = from_pod_b(&mut lab, tcp((POD_B, 4444), (REMOTE_POD, 9000), TCP_ACK));
    assert_eq!(craft::unwrap_vxlan(&again.bytes).unwrap().0.ports.0, outer.ports.0);
    assert_eq!(lab.worker.stats.encapsulated, 2);
}

#[test]
fn vxlan_for_this_node_is_decapsulated_and_delivered() {
    let mut lab = Lab::new(&[]);
    let inner = tcp((REMOTE_POD, 9000), (POD_A, 4444), TCP_SYN)
        .macs(N2_VTEP_MAC, VTEP_MAC)
        .build();
    let frame = craft::vxlan((N2_MAC, UPLINK_MAC), N2_IP, NODE_IP, 8472, 1, &inner);
    let out = lab.send(UPLINK, &frame);
    assert_eq!(out.tx_port(), PORT_A);
    let s = out.seen();
    assert_eq!((s.src, s.dst, s.ttl, s.dst_mac), (REMOTE_POD, POD_A, 63, POD_A_MAC));
    // Wrong VNI, or an inner TTL of 1: dropped and counted.
    let wrong = craft::vxlan((N2_MAC, UPLINK_MAC), N2_IP, NODE_IP, 8472, 2, &inner);
    assert_eq!(lab.send(UPLINK, &wrong).verdict, Verdict::Drop(DropReason::WrongVni));
    let mut dying = tcp((REMOTE_POD, 9000), (POD_A, 4444), TCP_SYN).macs(N2_VTEP_MAC, VTEP_MAC);
    dying.ttl = 1;
    let frame = craft::vxlan((N2_MAC, UPLINK_MAC), N2_IP, NODE_IP, 8472, 1, &dying.build());
    assert_eq!(lab.send(UPLINK, &frame).verdict, Verdict::Drop(DropReason::TtlExceeded));
    assert_eq!(lab.worker.stats.drop_count(DropReason::TtlExceeded), 1);
}

#[test]
fn clusterip_to_a_remote_backend_crosses_the_overlay_both_ways() {
    let mut s = web(Proto::Tcp);
    only(&mut s, vec![ep(REMOTE_POD, 8080, false)]);
    let mut lab = Lab::new(&[s]);
    let out = from_pod_b(&mut lab, tcp((POD_B, 4545), (CLUSTER_IP, 80), TCP_SYN));
    let (_, _, inner) = craft::unwrap_vxlan(&out.bytes).unwrap();
    let i = craft::inspect(inner).unwrap();
    assert_eq!((i.src, i.dst, i.ports), (POD_B, REMOTE_POD, (4545, 8080)));
    // The reply comes back encapsulated by node 2 and is reverse-NATed.
    let reply = tcp((REMOTE_POD, 8080), (POD_B, 4545), TCP_SYN | TCP_ACK)
        .macs(N2_VTEP_MAC, VTEP_MAC)
        .build();
    let frame = craft::vxlan((N2_MAC, UPLINK_MAC), N2_IP, NODE_IP, 8472, 1, &reply);
    let back = lab.send(UPLINK, &frame);
    assert_eq!(back.tx_port(), PORT_B);
    let r = back.seen();
    assert_eq!((r.src, r.ports.0, r.dst, r.ports.1), (CLUSTER_IP, 80, POD_B, 4545));
}

#[test]
fn non_service_traffic_between_local_pods_is_routed_and_from_outside_passes() {
    let mut lab = Lab::new(&[web(Proto::Tcp)]);
    // Only reaches kxp when the steering program cannot tell it from a
    // service reply; kxp then routes it unchanged, as the kernel would.
    let direct = from_pod_b(&mut lab, tcp((POD_B, 1), (POD_A, 2), TCP_SYN));
    assert_eq!(direct.verdict, Verdict::Tx(PORT_A));
    let seen = direct.seen();
    assert_eq!((seen.src, seen.dst, seen.ports), (POD_B, POD_A, (1, 2)));
    assert_eq!(
        lab.send_from_client(tcp((CLIENT_IP, 1), (POD_A, 2), TCP_SYN)).verdict,
        Verdict::Pass
    );
}

// ---- 11. checksum policy ----

/// A frame as a local socket hands it to a veth with tx offload on: the L4
/// checksum field holds only the pseudo-header sum (CHECKSUM_PARTIAL).
fn partial_checksum_udp() -> Vec<u8> {
    let mut b = udp((POD_B, 5353), (CLUSTER_IP, 80)).macs(POD_B_MAC, PORT_B_MAC).build();
    let ip = ipv4::parse(&b, 14).unwrap();
    let pseudo = dataplane::wire::checksum::pseudo_header(ip.src, ip.dst, ip.proto, ip.l4_len() as u16);
    let folded = dataplane::wire::checksum::fold(pseudo);
    b[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&folded.to_be_bytes());
    b
}

#[test]
fn full_checksum_policy_repairs_partial_checksums_incremental_refuses_them() {
    use dataplane::craft::Buffer;
    use dataplane::flow::FlowState;
    use std::sync::Arc;
    // Incremental verifies the checksum of a packet that opens a flow, and
    // a partial sum does not verify: dropped and counted, where it would
    // otherwise reach the backend only to be dropped there.
    for (policy, want) in [
        (ChecksumPolicy::Incremental, Verdict::Drop(DropReason::BadL4Checksum)),
        (ChecksumPolicy::Full, Verdict::Tx(PORT_A)),
    ] {
        let mut t = base_tables();
        let mut n = node_config();
        n.checksum = policy;
        t.set_node(n);
        t.upsert_service(&web_on_a(Proto::Udp)).unwrap();
        let mut w = dataplane::Worker::new(Arc::new(FlowState::new(CtConfig {
            capacity: 64,
            ..CtConfig::default()
        })));
        let mut b = Buffer::new(&partial_checksum_udp());
        let mut f = b.frame();
        assert_eq!(w.process(dataplane::Time::ZERO, &t, PORT_B, &mut f), want, "{policy:?}");
        if want == Verdict::Tx(PORT_A) {
            let (start, len) = (f.headroom(), f.len());
            b.start = start;
            b.len = len;
            assert!(craft::inspect(b.bytes()).unwrap().checksums_ok, "{policy:?}");
        }
    }
}

// ---- 12. the node's own connections ----

#[test]
fn the_nodes_own_connection_to_a_cluster_ip_is_masqueraded_and_answered_through_its_host_port() {
    let mut lab = Lab::new(&[web_on_a(Proto::Tcp)]);
    // The node routes service addresses into kxp's TUN device (no MACs).
    let syn = tcp((NODE_IP, 40000), (CLUSTER_IP, 80), TCP_SYN)
        .macs(Mac::default(), Mac::default())
        .build();
    let out = lab.send(HOST, &syn);
    assert_eq!(out.verdict, Verdict::Tx(PORT_A));
    let fwd = out.seen();
    assert_eq!((fwd.dst, fwd.ports.1), (POD_A, 8080), "DNAT to the backend");
    assert_eq!(fwd.src, NODE_IP, "SNAT to the node address ...");
    let (lo, hi) = node_config().snat_ports;
    assert!(
        (lo..=hi).contains(&fwd.ports.0),
        "... in the SNAT port range, so the reply is steered to kxp"
    );
    let reply = from_pod_a(&mut lab, tcp((POD_A, 8080), (NODE_IP, fwd.ports.0), TCP_SYN | TCP_ACK));
    assert_eq!(reply.verdict, Verdict::Tx(HOST), "back into the node's stack");
    let back = reply.seen();
    assert_eq!((back.src, back.ports.0), (CLUSTER_IP, 80));
    assert_eq!((back.dst, back.ports.1), (NODE_IP, 40000));
}

#[test]
fn a_backend_on_the_nodes_own_address_is_reached_through_the_host_port_and_answers_back() {
    let mut api = ServiceSpec::cluster_ip(SvcId(7), "default/kubernetes:https", CLUSTER_IP, 443, Proto::Tcp);
    api.endpoints = vec![ep(NODE_IP, 6443, true)];
    let mut lab = Lab::new(&[api]);
    let out = from_pod_b(&mut lab, tcp((POD_B, 5555), (CLUSTER_IP, 443), TCP_SYN));
    assert_eq!(out.verdict, Verdict::Tx(HOST), "into the node's stack");
    let fwd = out.seen();
    assert_eq!((fwd.dst, fwd.ports.1), (NODE_IP, 6443));
    assert_eq!(fwd.src, HOST_SNAT_IP, "SNAT to the address routed back into kxp");
    // The node answers to that address, through the host port.
    let reply = tcp((NODE_IP, 6443), (HOST_SNAT_IP, fwd.ports.0), TCP_SYN | TCP_ACK)
        .macs(Mac::default(), Mac::default())
        .build();
    let back = lab.send(HOST, &reply);
    assert_eq!(back.verdict, Verdict::Tx(PORT_B));
    let seen = back.seen();
    assert_eq!((seen.src, seen.ports.0), (CLUSTER_IP, 443));
    assert_eq!((seen.dst, seen.ports.1), (POD_B, 5555));
}

// ---- 13. path MTU over the overlay ----

#[test]
fn a_packet_too_big_for_the_overlay_gets_frag_needed_quoting_what_its_sender_sent() {
    // The remote backend is across VXLAN; the uplink's MTU is 1500.
    let mut svc = ServiceSpec::cluster_ip(SvcId(9), "ns/big:udp", CLUSTER_IP, 80, Proto::Udp);
    svc.endpoints = vec![ep(REMOTE_POD, 8080, false)];
    let mut lab = Lab::new(&[svc]);
    let fits = from_pod_b(&mut lab, craft::Spec::udp((POD_B, 5000), (CLUSTER_IP, 80), &[0; 1400]));
    assert_eq!(fits.verdict, Verdict::Tx(UPLINK), "1428 + 50 <= 1500: encapsulated");
    let big = from_pod_b(&mut lab, craft::Spec::udp((POD_B, 5000), (CLUSTER_IP, 80), &[0; 1440]));
    assert_eq!(big.verdict, Verdict::Tx(PORT_B), "answered to the pod");
    let seen = big.seen();
    assert_eq!(seen.dst, POD_B);
    assert_eq!(
        seen.ports,
        (u16::from(TYPE_DEST_UNREACHABLE), u16::from(CODE_FRAGMENTATION_NEEDED))
    );
    let icmp = &big.bytes[14 + 20..];
    assert_eq!(
        u16::from_be_bytes([icmp[6], icmp[7]]),
        1450,
        "next-hop MTU: uplink minus VXLAN"
    );
    // The quote is what the pod sent (to the ClusterIP), so its stack can
    // match it to the socket and lower the path MTU.
    let quoted = &icmp[8..];
    assert_eq!(&quoted[16..20], &CLUSTER_IP.octets(), "quoted destination un-DNATed");
    assert_eq!(u16::from_be_bytes([quoted[22], quoted[23]]), 80);
    assert_eq!(lab.worker.stats.frag_needed, 1);
}

// ---- 13. trust boundaries (docs/SECURITY.md) ----

#[test]
fn vxlan_is_taken_only_from_known_nodes_speaking_for_their_own_pods() {
    let mut lab = Lab::new(&[web(Proto::Tcp)]);
    let wrap = |src_node: Ipv4Addr, inner_src: Ipv4Addr, dst: (Ipv4Addr, u16)| {
        let inner = tcp((inner_src, 9000), dst, TCP_SYN).macs(N2_VTEP_MAC, VTEP_MAC).build();
        craft::vxlan((N2_MAC, UPLINK_MAC), src_node, NODE_IP, 8472, 1, &inner)
    };
    // An off-cluster host wrapping a SYN to a ClusterIP: refused.
    let out = lab.send(UPLINK, &wrap(EXT_IP, REMOTE_POD, (CLUSTER_IP, 80)));
    assert_eq!(out.verdict, Verdict::Drop(DropReason::OverlayUnknownPeer));
    // A known node claiming addresses that are not its own: refused.
    for forged in [Ipv4Addr::new(10, 244, 3, 5), POD_B, CLIENT_IP] {
        let out = lab.send(UPLINK, &wrap(N2_IP, forged, (CLUSTER_IP, 80)));
        assert_eq!(out.verdict, Verdict::Drop(DropReason::OverlaySpoofedSource), "{forged}");
    }
    // Its own pods and its own address are fine.
    assert_eq!(
        lab.send(UPLINK, &wrap(N2_IP, REMOTE_POD, (CLUSTER_IP, 80))).tx_port(),
        PORT_A
    );
    assert_eq!(lab.send(UPLINK, &wrap(N2_IP, N2_IP, (POD_A, 22))).tx_port(), PORT_A);
    assert_eq!(lab.worker.stats.drop_count(DropReason::OverlaySpoofedSource), 3);
}

#[test]
fn a_pod_may_send_only_from_its_own_address_and_nobody_outside_may_claim_it() {
    let mut lab = Lab::new(&[web_on_a(Proto::Tcp)]);
    for forged in [POD_A, NODE_IP, REMOTE_POD, CLIENT_IP] {
        for dst in [(CLUSTER_IP, 80), (REMOTE_POD, 9000), (POD_A, 22)] {
            let out = from_pod_b(&mut lab, tcp((forged, 1000), dst, TCP_SYN));
            assert_eq!(
                out.verdict,
                Verdict::Drop(DropReason::SpoofedSource),
                "{forged} -> {dst:?}"
            );
        }
    }
    assert_eq!(lab.worker.flows().conntrack.len(), 0, "no flow was created");
    let out = lab.send_from_client(tcp((POD_B, 1000), (NODE_IP, 30080), TCP_SYN));
    assert_eq!(out.verdict, Verdict::Drop(DropReason::SpoofedSource));
    // Its own address works.
    assert_eq!(
        from_pod_b(&mut lab, tcp((POD_B, 1000), (CLUSTER_IP, 80), TCP_SYN)).tx_port(),
        PORT_A
    );
}

/// Flips the L4 checksum of a built TCP or UDP frame (no VLAN, no options).
/// The web service for TCP and for UDP, as two service ports.
fn web_on_a_both() -> [ServiceSpec; 2] {
    let mut u = web_on_a(Proto::Udp);
    u.id = SvcId(2);
    u.name = "ns/web:dns".into();
    [web_on_a(Proto::Tcp), u]
}

fn corrupt_l4_checksum(mut f: Vec<u8>) -> Vec<u8> {
    let at = 14 + 20 + if f[14 + 9] == 6 { 16 } else { 6 };
    f[at] ^= 0x5a;
    f
}

#[test]
fn packets_with_bad_checksums_never_create_or_change_flows() {
    let mut lab = Lab::new(&web_on_a_both());
    let syn = tcp((CLIENT_IP, 5000), (NODE_IP, 30080), TCP_SYN)
        .macs(GW_MAC, UPLINK_MAC)
        .build();
    let bad = lab.send(UPLINK, &corrupt_l4_checksum(syn.clone()));
    assert_eq!(bad.verdict, Verdict::Drop(DropReason::BadL4Checksum));
    let udp_new = udp((CLIENT_IP, 5000), (NODE_IP, 30080))
        .macs(GW_MAC, UPLINK_MAC)
        .build();
    let bad = lab.send(UPLINK, &corrupt_l4_checksum(udp_new));
    assert_eq!(bad.verdict, Verdict::Drop(DropReason::BadL4Checksum));
    assert_eq!(lab.worker.flows().conntrack.len(), 0);

    // An established flow: forged FIN and RST change nothing.
    lab.send(UPLINK, &syn);
    assert_eq!(lab.worker.flows().conntrack.len(), 1);
    let c = (CLIENT_IP, 5000);
    // SNATed to the node; the client's port is inside the SNAT range, so it is kept.
    let snat_port = 5000;
    let synack = from_pod_a(&mut lab, tcp((POD_A, 8080), (NODE_IP, snat_port), TCP_SYN | TCP_ACK));
    assert_eq!(synack.tx_port(), UPLINK);
    lab.send_from_client(tcp(c, (NODE_IP, 30080), TCP_ACK));
    for flags in [TCP_RST, TCP_FIN | TCP_ACK] {
        let f = tcp(c, (NODE_IP, 30080), flags).macs(GW_MAC, UPLINK_MAC).build();
        let out = lab.send(UPLINK, &corrupt_l4_checksum(f));
        assert_eq!(out.verdict, Verdict::Drop(DropReason::BadL4Checksum), "{flags:#x}");
    }
    // Data with a bad checksum is forwarded with the checksum still bad, so
    // the receiving stack drops it as it would without kxp.
    let data = tcp(c, (NODE_IP, 30080), TCP_ACK).macs(GW_MAC, UPLINK_MAC).build();
    let out = lab.send_raw(UPLINK, &corrupt_l4_checksum(data));
    assert_eq!(out.verdict, Verdict::Tx(PORT_A));
    assert!(!out.seen().checksums_ok);
    // The flow is intact and established: it outlives the unassured timeout.
    lab.advance(Duration::from_secs(3600));
    let later = lab.send_from_client(tcp(c, (NODE_IP, 30080), TCP_ACK));
    assert_eq!((later.tx_port(), later.seen().ports.0), (PORT_A, snat_port));
}

#[test]
fn flag_combinations_no_stack_sends_and_strays_are_dropped() {
    let mut lab = Lab::new(&[web_on_a(Proto::Tcp)]);
    for (flags, why) in [
        (0, DropReason::InvalidTcpFlags),
        (TCP_SYN | TCP_FIN, DropReason::InvalidTcpFlags),
        (TCP_SYN | TCP_RST, DropReason::InvalidTcpFlags),
        (TCP_FIN, DropReason::InvalidTcpFlags),
        (TCP_FIN | TCP_ACK, DropReason::StrayTcp),
        (TCP_SYN | TCP_ACK, DropReason::StrayTcp),
        (TCP_RST, DropReason::StrayTcp),
    ] {
        let out = lab.send_from_client(tcp((CLIENT_IP, 5000), (NODE_IP, 30080), flags));
        assert_eq!(out.verdict, Verdict::Drop(why), "{flags:#x}");
    }
    assert_eq!(lab.worker.flows().conntrack.len(), 0);
}

#[test]
fn a_mid_stream_pickup_lives_short_until_the_backend_answers() {
    let mut lab = Lab::new(&[web_on_a(Proto::Tcp)]);
    // kxp restarted: a plain ACK of a running connection is picked up...
    let out = from_pod_b(&mut lab, tcp((POD_B, 4000), (CLUSTER_IP, 80), TCP_ACK));
    assert_eq!(out.tx_port(), PORT_A);
    // ... but, unanswered, it is gone after the unassured timeout.
    lab.advance(Duration::from_secs(31));
    assert_eq!(lab.worker.flows().conntrack.len(), 1);
    let late = from_pod_a(&mut lab, tcp((POD_A, 8080), (POD_B, 4000), TCP_ACK));
    assert_eq!(late.seen().src, POD_A, "expired: not translated");
    // Answered, it is a real connection again and keeps its day.
    from_pod_b(&mut lab, tcp((POD_B, 4001), (CLUSTER_IP, 80), TCP_ACK));
    from_pod_a(&mut lab, tcp((POD_A, 8080), (POD_B, 4001), TCP_ACK));
    lab.advance(Duration::from_secs(6 * 3600));
    let data = from_pod_a(&mut lab, tcp((POD_A, 8080), (POD_B, 4001), TCP_ACK));
    assert_eq!(data.seen().src, CLUSTER_IP, "the answered pickup is established");
}

#[test]
fn spoofed_floods_of_every_kind_never_evict_established_flows() {
    let mut lab = Lab::with_config(
        &web_on_a_both(),
        CtConfig {
            capacity: 512,
            ..CtConfig::default()
        },
    );
    // 100 real connections from pod B (handshake complete).
    let mut real = Vec::new();
    for p in 0..100u16 {
        let port = 10000 + p;
        from_pod_b(&mut lab, tcp((POD_B, port), (CLUSTER_IP, 80), TCP_SYN));
        from_pod_a(&mut lab, tcp((POD_A, 8080), (POD_B, port), TCP_SYN | TCP_ACK));
        from_pod_b(&mut lab, tcp((POD_B, port), (CLUSTER_IP, 80), TCP_ACK));
        real.push(port);
    }
    // 20,000 spoofed packets of each kind from the uplink to the NodePort.
    let kinds: [(Option<u8>, &str); 4] = [
        (Some(TCP_SYN), "SYN"),
        (Some(TCP_ACK), "ACK"),
        (Some(TCP_ACK | 0x08), "PSH-ACK"),
        (None, "UDP"),
    ];
    for (i, (flags, _)) in kinds.iter().enumerate() {
        for n in 0..20_000u32 {
            let src = Ipv4Addr::from(0xc612_0000 + n + (i as u32) * 100_000); // 198.18.0.0/15
            let spec = match flags {
                Some(f) => tcp((src, 1024 + (n % 60000) as u16), (NODE_IP, 30080), *f),
                None => udp((src, 1024 + (n % 60000) as u16), (NODE_IP, 30080)),
            };
            lab.send_from_client(spec);
        }
        // A new real connection during the flood still gets through.
        let port = 20000 + i as u16;
        let syn = from_pod_b(&mut lab, tcp((POD_B, port), (CLUSTER_IP, 80), TCP_SYN));
        assert_eq!(syn.tx_port(), PORT_A, "a new connection was refused during the flood");
    }
    let ct = &lab.worker.flows().conntrack;
    assert!(ct.len() <= ct.capacity());
    for port in real {
        let out = from_pod_a(&mut lab, tcp((POD_A, 8080), (POD_B, port), TCP_ACK));
        assert_eq!(out.seen().src, CLUSTER_IP, "flow {port} was evicted by the flood");
    }
}

#[test]
fn load_balancer_source_ranges_admit_only_their_sources() {
    let mut s = web_on_a(Proto::Tcp);
    s.source_ranges = vec!["203.0.113.0/28".parse().unwrap()];
    let mut lab = Lab::new(&[s]);
    let allowed = lab.send_from_client(tcp((CLIENT_IP, 5000), (LB_IP, 80), TCP_SYN));
    assert_eq!(allowed.tx_port(), PORT_A);
    let denied = lab.send_from_client(tcp((Ipv4Addr::new(203, 0, 113, 99), 5000), (LB_IP, 80), TCP_SYN));
    assert_eq!(denied.verdict, Verdict::Drop(DropReason::SourceRangeDenied));
    // Pods are outside the ranges too (kube-proxy's firewall filters them).
    let pod = from_pod_b(&mut lab, tcp((POD_B, 5000), (LB_IP, 80), TCP_SYN));
    assert_eq!(pod.verdict, Verdict::Drop(DropReason::SourceRangeDenied));
    // The ClusterIP, NodePort and externalIP are not behind the LB's firewall.
    let other = Ipv4Addr::new(203, 0, 113, 99);
    for dst in [(NODE_IP, 30080), (EXTERNAL_IP, 80)] {
        assert_eq!(lab.send_from_client(tcp((other, 5001), dst, TCP_SYN)).tx_port(), PORT_A);
    }
    assert_eq!(
        from_pod_b(&mut lab, tcp((POD_B, 5002), (CLUSTER_IP, 80), TCP_SYN)).tx_port(),
        PORT_A
    );
}

#[test]
fn each_kind_of_answer_has_its_own_budget() {
    let mut big = ServiceSpec::cluster_ip(SvcId(9), "ns/big:udp", CLUSTER_IP, 80, Proto::Udp);
    big.endpoints = vec![ep(REMOTE_POD, 8080, false)];
    let mut empty = ServiceSpec::cluster_ip(SvcId(8), "ns/empty:udp", Ipv4Addr::new(10, 96, 0, 99), 53, Proto::Udp);
    empty.endpoints.clear();
    let mut lab = Lab::new(&[big, empty]);
    // Somebody floods a service without endpoints until rejects run out ...
    let probe = udp((POD_B, 5353), (Ipv4Addr::new(10, 96, 0, 99), 53));
    for _ in 0..500 {
        from_pod_b(&mut lab, probe.clone());
    }
    assert!(lab.worker.stats.drop_count(DropReason::RejectRateLimited) >= 450);
    // ... and path-MTU discovery still gets its answer.
    let too_big = from_pod_b(&mut lab, craft::Spec::udp((POD_B, 5000), (CLUSTER_IP, 80), &[0; 1440]));
    assert_eq!(
        too_big.verdict,
        Verdict::Tx(PORT_B),
        "frag-needed was silenced by the reject flood"
    );
    assert_eq!(lab.worker.stats.frag_needed, 1);
}

/// Issue #9: a pod reaches a backend through the ClusterIP from port P,
/// closes, then connects to the backend directly from the same P. The
/// backend's SYN-ACK must reach it as the backend's, not rewritten to the
/// ClusterIP by the finished service flow.
#[test]
fn a_direct_connection_reusing_a_finished_service_flows_tuple_is_not_translated() {
    let mut lab = Lab::new(&[web_on_a(Proto::Tcp)]);
    let p = 40404;
    from_pod_b(&mut lab, tcp((POD_B, p), (CLUSTER_IP, 80), TCP_SYN));
    from_pod_a(&mut lab, tcp((POD_A, 8080), (POD_B, p), TCP_SYN | TCP_ACK));
    from_pod_b(&mut lab, tcp((POD_B, p), (CLUSTER_IP, 80), TCP_ACK));
    from_pod_b(&mut lab, tcp((POD_B, p), (CLUSTER_IP, 80), TCP_FIN | TCP_ACK));
    from_pod_a(&mut lab, tcp((POD_A, 8080), (POD_B, p), TCP_FIN | TCP_ACK));
    lab.advance(Duration::from_secs(5));
    // The direct SYN goes to the kernel's routing (not kxp's); its answer:
    let synack = from_pod_a(&mut lab, tcp((POD_A, 8080), (POD_B, p), TCP_SYN | TCP_ACK));
    assert_eq!(synack.tx_port(), PORT_B);
    assert_eq!(
        (synack.seen().src, synack.seen().ports.0),
        (POD_A, 8080),
        "rewritten to the ClusterIP"
    );
    // While the service flow was live, the same answer was translated.
    let q = 40405;
    from_pod_b(&mut lab, tcp((POD_B, q), (CLUSTER_IP, 80), TCP_SYN));
    let live = from_pod_a(&mut lab, tcp((POD_A, 8080), (POD_B, q), TCP_SYN | TCP_ACK));
    assert_eq!(live.seen().src, CLUSTER_IP);
}

/// Splits a built frame's IP datagram into fragments of at most `payload`
/// bytes of IP payload each (a multiple of 8), as a sender's stack would.
fn fragments(frame: &[u8], payload: usize) -> Vec<Vec<u8>> {
    let (eth, ip) = frame.split_at(14);
    let body = &ip[20..];
    body.chunks(payload)
        .enumerate()
        .map(|(i, chunk)| {
            let mut f = eth.to_vec();
            let mut h = ip[..20].to_vec();
            h[2..4].copy_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
            h[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
            let more = if (i + 1) * payload < body.len() { 0x2000 } else { 0 };
            h[6..8].copy_from_slice(&(more | (i * payload / 8) as u16).to_be_bytes());
            f.extend_from_slice(&h);
            f.extend_from_slice(chunk);
            fix_ip_checksum(&f)
        })
        .collect()
}

/// Sends each of `frames` in through port `from`; each must leave through
/// `to`. Returns what left, in order.
fn through(
    lab: &mut Lab,
    from: dataplane::addr::PortId,
    to: dataplane::addr::PortId,
    frames: &[Vec<u8>],
) -> Vec<Vec<u8>> {
    frames
        .iter()
        .map(|p| {
            let out = lab.send_raw(from, p);
            assert_eq!(out.verdict, Verdict::Tx(to));
            out.bytes
        })
        .collect()
}

/// Issue #9: a 4 KB UDP answer through a ClusterIP (DNS over UDP) arrives
/// in fragments; each gets the NAT its first fragment got, both ways.
#[test]
fn fragments_of_a_service_datagram_are_translated_like_their_first() {
    let mut lab = Lab::new(&[web_on_a(Proto::Udp)]);
    let query = craft::Spec::udp((POD_B, 5353), (CLUSTER_IP, 80), &[7u8; 4000])
        .macs(POD_B_MAC, PORT_B_MAC)
        .build();
    let parts = fragments(&query, 1400);
    assert_eq!(parts.len(), 3);
    let delivered = through(&mut lab, PORT_B, PORT_A, &parts);
    for d in &delivered {
        assert_eq!(&d[14 + 16..14 + 20], &POD_A.octets(), "every fragment DNATed");
        assert!(ipv4::parse(d, 14).is_ok(), "valid IP header checksum");
    }
    // Reassembled, the datagram carries a valid UDP checksum for its new addresses.
    let whole = reassemble(&delivered);
    let seen = craft::inspect(&whole).unwrap();
    assert!(seen.checksums_ok);
    assert_eq!((seen.dst, seen.ports.1), (POD_A, 8080));
    // The answer, fragmented by the backend, comes back from the ClusterIP.
    let answer = craft::Spec::udp((POD_A, 8080), (POD_B, 5353), &[9u8; 4000])
        .macs(POD_A_MAC, PORT_A_MAC)
        .build();
    let back = through(&mut lab, PORT_A, PORT_B, &fragments(&answer, 1400));
    let seen = craft::inspect(&reassemble(&back)).unwrap();
    assert!(seen.checksums_ok);
    assert_eq!((seen.src, seen.ports.0, seen.dst), (CLUSTER_IP, 80, POD_B));
    assert_eq!(lab.worker.stats.fragments_translated, 4);
    // A later fragment whose first one kxp never saw (another datagram id)
    // is routed as it is, untranslated.
    let mut stray = fragments(&query, 1400)[2].clone();
    stray[14 + 4..14 + 6].copy_from_slice(&0x4343u16.to_be_bytes());
    let out = lab.send_raw(PORT_B, &fix_ip_checksum(&stray));
    assert_eq!(out.verdict, Verdict::Tx(UPLINK));
    assert_eq!(&out.bytes[14 + 16..14 + 20], &CLUSTER_IP.octets());
    assert_eq!(lab.worker.stats.fragments_translated, 4);
}

/// From outside through a NodePort: SNATed and DNATed, every fragment.
#[test]
fn fragments_through_a_node_port_are_translated_like_their_first() {
    let mut lab = Lab::new(&[web_on_a(Proto::Udp)]);
    let seen = fragmented_node_port_query(&mut lab);
    assert!(seen.checksums_ok);
    assert_eq!((seen.src, seen.dst, seen.ports.1), (NODE_IP, POD_A, 8080));
}

/// A client's 4 KB datagram to the NodePort, in 1480-byte fragments from
/// the uplink; what reaches pod A, reassembled.
fn fragmented_node_port_query(lab: &mut Lab) -> craft::Seen {
    let query = craft::Spec::udp((CLIENT_IP, 40000), (NODE_IP, 30080), &[7u8; 4000])
        .macs(GW_MAC, UPLINK_MAC)
        .build();
    let delivered = through(lab, UPLINK, PORT_A, &fragments(&query, 1480));
    craft::inspect(&reassemble(&delivered)).unwrap()
}

/// A flood of forged first fragments (one packet each, from anywhere) fills
/// the fragment table; a real client's fragmented datagram that follows is
/// still translated whole.
#[test]
fn a_first_fragment_flood_does_not_lock_out_real_fragmented_datagrams() {
    let mut lab = Lab::new(&[web_on_a(Proto::Udp)]);
    for n in 0..20_000u32 {
        let src = Ipv4Addr::from(0xc612_0000 + n); // 198.18.0.0/15
        let forged = craft::Spec::udp((src, 1024 + (n % 60000) as u16), (NODE_IP, 30080), &[0u8; 2000])
            .macs(GW_MAC, UPLINK_MAC)
            .build();
        lab.send_raw(UPLINK, &fragments(&forged, 1480)[0]);
    }
    assert!(lab.worker.stats.fragments_evicted > 0, "the flood overfilled the table");
    let seen = fragmented_node_port_query(&mut lab);
    assert!(seen.checksums_ok);
    assert_eq!((seen.src, seen.dst), (NODE_IP, POD_A));
}

/// The fragments' IP payloads, in order, behind the first one's headers,
/// with the total length fixed: the datagram the receiver reassembles.
fn reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
    let mut whole = frags[0][..14 + 20].to_vec();
    for f in frags {
        whole.extend_from_slice(&f[14 + 20..]);
    }
    let total = (whole.len() - 14) as u16;
    whole[14 + 2..14 + 4].copy_from_slice(&total.to_be_bytes());
    whole[14 + 6..14 + 8].copy_from_slice(&[0, 0]);
    fix_ip_checksum(&whole)
}
