//! Property test: random flows, replies, endpoint changes and time, driven
//! through the engine and checked against a small reference model of what
//! kube-proxy-style NAT must do.

mod support;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use dataplane::addr::{Mac, PortId, Proto};
use dataplane::craft::Spec;
use dataplane::tables::{LocalPod, PortInfo, PortRole, ServiceSpec};
use dataplane::wire::l4::{TCP_ACK, TCP_RST, TCP_SYN};
use dataplane::{DropReason, Verdict};
use proptest::prelude::*;
use support::*;

const BACKENDS: usize = 4;

fn backend_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, 10 + i as u8)
}

fn backend_port(i: usize) -> PortId {
    PortId(3 + i as u16)
}

fn client_ip(i: u8) -> Ipv4Addr {
    // Even clients are outside the cluster (masqueraded), odd ones inside.
    if i % 2 == 0 {
        Ipv4Addr::new(203, 0, 113, i)
    } else {
        Ipv4Addr::new(10, 244, 9, i)
    }
}

#[derive(Clone, Debug)]
enum Op {
    Packet { client: u8, sport: u8, tcp: bool },
    Reply { pick: usize },
    SetBackends { mask: u8 },
    Advance { secs: u16 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u8..6, 0u8..3, any::<bool>()).prop_map(|(client, sport, tcp)| Op::Packet { client, sport, tcp }),
        4 => any::<usize>().prop_map(|pick| Op::Reply { pick }),
        1 => (0u8..16).prop_map(|mask| Op::SetBackends { mask }),
        2 => prop_oneof![0u16..5, 25u16..35, 55u16..65, 115u16..125].prop_map(|secs| Op::Advance { secs }),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    SynSent,
    SynRecv,
    Established,
    UdpUnreplied,
    UdpReplied,
}

impl St {
    /// The state's timeout; a flow not yet assured (traffic seen both ways
    /// and established) lives at most 30 s (`Timeouts::unassured`).
    fn timeout(self) -> u64 {
        match self {
            St::SynSent | St::SynRecv | St::UdpUnreplied => 30,
            St::Established => 86400,
            St::UdpReplied => 120,
        }
    }
}

#[derive(Clone, Debug)]
struct Flow {
    backend: usize,
    /// Source the backend sees (and replies to).
    nat: (Ipv4Addr, u16),
    state: St,
    last: u64,
}

type ClientKey = (Ipv4Addr, u16, bool);

fn service(mask: u8) -> ServiceSpec {
    let mut s = web(Proto::Udp);
    s.endpoints = (0..BACKENDS)
        .filter(|i| mask & (1 << i) != 0)
        .map(|i| ep(backend_ip(i), 8080, true))
        .collect();
    s
}

fn lab() -> Lab {
    let lab = Lab::new(&[]);
    lab.update(|t| {
        let mut n = node_config();
        for i in 0..BACKENDS {
            n.ports.push(PortInfo {
                name: format!("veth{i}"),
                mac: Mac([2, 0, 0, 9, 0, i as u8]),
                vlan: None,
                role: PortRole::Pod,
            });
        }
        t.set_node(n);
        for i in 0..BACKENDS {
            t.set_local_pod(
                backend_ip(i),
                LocalPod {
                    port: backend_port(i),
                    mac: Mac([0x0a, 0, 0, 9, 0, i as u8]),
                },
            );
        }
        for proto in [Proto::Udp, Proto::Tcp] {
            let mut s = service(0b1111);
            s.proto = proto;
            s.id = dataplane::addr::SvcId(proto as u32);
            s.node_port = None;
            t.upsert_service(&s).unwrap();
        }
    });
    lab
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut lab = lab();
    let mut mask: u8 = 0b1111;
    let mut flows: HashMap<ClientKey, Flow> = HashMap::new();
    let mut clock: u64 = 0;
    for op in ops {
        let now = clock;
        flows.retain(|_, f| now - f.last < f.state.timeout());
        match op {
            Op::Advance { secs } => {
                lab.advance(Duration::from_secs(u64::from(secs)));
                clock += u64::from(secs);
            }
            Op::SetBackends { mask: m } => {
                mask = m;
                lab.update(|t| {
                    for proto in [Proto::Udp, Proto::Tcp] {
                        let mut s = service(m);
                        s.proto = proto;
                        s.id = dataplane::addr::SvcId(proto as u32);
                        s.node_port = None;
                        t.upsert_service(&s).unwrap();
                    }
                });
            }
            Op::Packet { client, sport, tcp } => {
                let c = client_ip(client);
                let sp = 40000 + u16::from(sport);
                let key = (c, sp, tcp);
                let existing = flows.get(&key).cloned();
                let flags = if existing.is_some() { TCP_ACK } else { TCP_SYN };
                let spec = if tcp {
                    Spec::tcp((c, sp), (CLUSTER_IP, 80), flags)
                } else {
                    Spec::udp((c, sp), (CLUSTER_IP, 80), b"q")
                };
                let out = lab.send_from_client(spec);
                let alive = |b: usize| mask & (1 << b) != 0;
                match existing {
                    Some(f) if alive(f.backend) => {
                        let s = out.seen();
                        prop_assert_eq!(
                            out.verdict,
                            Verdict::Tx(backend_port(f.backend)),
                            "flow lost its backend"
                        );
                        prop_assert_eq!((s.src, s.ports.0), f.nat, "flow changed its NAT source");
                        let st = match (tcp, f.state) {
                            (true, St::SynRecv) => St::Established,
                            (_, st) => st,
                        };
                        flows.insert(
                            key,
                            Flow {
                                state: st,
                                last: now,
                                ..f
                            },
                        );
                    }
                    Some(_) if tcp => {
                        // Backend left: the client is reset at once.
                        let s = out.seen();
                        prop_assert_eq!(out.verdict, Verdict::Tx(UPLINK));
                        prop_assert_eq!(s.tcp_flags & TCP_RST, TCP_RST);
                        prop_assert_eq!((s.src, s.dst, s.ports.1), (CLUSTER_IP, c, sp));
                        flows.remove(&key);
                    }
                    _ => {
                        flows.remove(&key);
                        if mask == 0 {
                            // No endpoints: port unreachable (or rate limited).
                            match out.verdict {
                                Verdict::Tx(_) => prop_assert_eq!(out.seen().ports, (3, 3)),
                                v => {
                                    prop_assert_eq!(v, Verdict::Drop(DropReason::RejectRateLimited))
                                }
                            }
                            continue;
                        }
                        let Verdict::Tx(port) = out.verdict else {
                            return Err(TestCaseError::fail(format!(
                                "new flow not forwarded: {:?}",
                                out.verdict
                            )));
                        };
                        let b = (0..BACKENDS)
                            .find(|&b| backend_port(b) == port)
                            .expect("sent to a backend port");
                        prop_assert!(alive(b), "new flow sent to a removed backend");
                        let s = out.seen();
                        prop_assert_eq!((s.dst, s.ports.1), (backend_ip(b), 8080));
                        if client % 2 == 0 {
                            prop_assert_eq!(s.src, NODE_IP, "outside source must be masqueraded");
                        } else {
                            prop_assert_eq!(s.src, c, "pod source must be kept");
                        }
                        let nat = (s.src, s.ports.0);
                        let clash = flows.iter().any(|(k, o)| k.2 == tcp && o.backend == b && o.nat == nat);
                        prop_assert!(!clash, "reply tuple {nat:?} toward backend {b} already in use");
                        let state = if tcp { St::SynSent } else { St::UdpUnreplied };
                        flows.insert(
                            key,
                            Flow {
                                backend: b,
                                nat,
                                state,
                                last: now,
                            },
                        );
                    }
                }
            }
            Op::Reply { pick } => {
                if flows.is_empty() {
                    continue;
                }
                let mut keys: Vec<_> = flows.keys().copied().collect();
                keys.sort();
                let key = keys[pick % keys.len()];
                let f = flows[&key].clone();
                let (c, sp, tcp) = key;
                let src = (backend_ip(f.backend), 8080);
                let spec = if tcp {
                    let flags = if f.state == St::SynSent {
                        TCP_SYN | TCP_ACK
                    } else {
                        TCP_ACK
                    };
                    Spec::tcp(src, f.nat, flags)
                } else {
                    Spec::udp(src, f.nat, b"a")
                };
                let i = f.backend as u8;
                let out = lab.send(
                    backend_port(f.backend),
                    &spec.macs(Mac([0x0a, 0, 0, 9, 0, i]), Mac([2, 0, 0, 9, 0, i])).build(),
                );
                prop_assert_eq!(out.verdict, Verdict::Tx(UPLINK), "reply not translated");
                let s = out.seen();
                prop_assert_eq!((s.src, s.ports.0, s.dst, s.ports.1), (CLUSTER_IP, 80, c, sp));
                let state = match f.state {
                    St::SynSent => St::SynRecv,
                    St::UdpUnreplied | St::UdpReplied => St::UdpReplied,
                    st => st,
                };
                flows.insert(key, Flow { state, last: now, ..f });
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_the_nat_model(ops in prop::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}
