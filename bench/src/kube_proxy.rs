//! The anchors: kube-proxy's iptables and nftables shapes of the lab's
//! services, written into a node's namespace with `iptables` and `nft`
//! (what kube-proxy itself runs in each mode).

use lab::kxp::Svc;
use lab::Host;

/// DNAT in PREROUTING for each ClusterIP and NodePort, MASQUERADE
/// (`--random-fully`) for DNATed traffic from outside `pod_cidr`
/// (eTP=Cluster), and kube-proxy's
/// KUBE-FORWARD rule that drops what conntrack calls INVALID.
pub fn iptables_rules(node: &Host, services: &[Svc], pod_cidr: &str) -> Result<(), String> {
    let ipt = |table: &str, rule: &[&str]| -> Result<(), String> {
        let mut argv = vec!["iptables", "-w", "-t", table, "-A"];
        argv.extend_from_slice(rule);
        node.exec(&argv)
            .map(|_| ())
            .map_err(|e| format!("{e} (deploy/setup.sh installs iptables)"))
    };
    for s in services {
        let (ep, _) = s.endpoints[0];
        let to = format!("{ep}:{}", s.target_port);
        for proto in &s.protocols {
            let proto = proto.to_lowercase();
            let mut dests = vec![(s.cluster_ip.to_string(), s.port)];
            if let Some(np) = s.node_port {
                dests.push((node.ip.to_string(), np));
            }
            for (dst, port) in dests {
                let port = port.to_string();
                let rule = [
                    "PREROUTING",
                    "-d",
                    &dst,
                    "-p",
                    &proto,
                    "--dport",
                    &port,
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &to,
                ];
                ipt("nat", &rule)?;
            }
        }
    }
    let masquerade = [
        "POSTROUTING",
        "-m",
        "conntrack",
        "--ctstate",
        "DNAT",
        "!",
        "-s",
        pod_cidr,
        "-j",
        "MASQUERADE",
        // kube-proxy adds it wherever iptables supports it (all current
        // ones): a random port instead of a walk from the client's.
        "--random-fully",
    ];
    ipt("nat", &masquerade)?;
    ipt(
        "filter",
        &["FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"],
    )
}

pub fn flush_iptables(node: &Host) {
    let _ = node.exec(&["iptables", "-w", "-t", "nat", "-F"]);
    let _ = node.exec(&["iptables", "-w", "-t", "filter", "-F"]);
}

/// The ruleset kube-proxy's nftables mode writes for `services` (its
/// `kube-proxy` table, trimmed to what the lab uses): a verdict map from
/// (address, protocol, port) to a per-service chain, which picks an
/// endpoint with `numgen random` and jumps to its DNAT chain; NodePorts
/// through a second map for the node's local addresses; masquerading by
/// mark, `fully-random`, for traffic from outside `pod_cidr`; and the drop
/// of conntrack's INVALID in forward.
pub fn nftables_ruleset(node_ip: std::net::Ipv4Addr, services: &[Svc], pod_cidr: &str) -> String {
    let mut chains = String::new();
    let mut service_ips = Vec::new();
    let mut node_ports = Vec::new();
    for s in services {
        for proto in &s.protocols {
            let proto = proto.to_lowercase();
            let chain = format!("service-{}-{proto}", s.name);
            service_ips.push(format!("{} . {proto} . {} : goto {chain}", s.cluster_ip, s.port));
            if let Some(np) = s.node_port {
                let ext = format!("external-{}-{proto}", s.name);
                node_ports.push(format!("{proto} . {np} : goto {ext}"));
                // eTP=Cluster: every NodePort connection is masqueraded.
                chains.push_str(&format!(
                    "  chain {ext} {{\n    jump mark-for-masquerade\n    goto {chain}\n  }}\n"
                ));
            }
            let endpoints: Vec<String> = (0..s.endpoints.len())
                .map(|i| format!("{i} : goto endpoint-{}-{proto}-{i}", s.name))
                .collect();
            chains.push_str(&format!(
                "  chain {chain} {{\n    ip daddr {} {proto} dport {} ip saddr != {pod_cidr} jump mark-for-masquerade\n    numgen random mod {} vmap {{ {} }}\n  }}\n",
                s.cluster_ip,
                s.port,
                s.endpoints.len(),
                endpoints.join(", ")
            ));
            for (i, (ep, _)) in s.endpoints.iter().enumerate() {
                chains.push_str(&format!(
                    "  chain endpoint-{}-{proto}-{i} {{\n    ip saddr {ep} jump mark-for-masquerade\n    meta l4proto {proto} dnat to {ep}:{}\n  }}\n",
                    s.name, s.target_port
                ));
            }
        }
    }
    let elements = |v: &[String]| {
        if v.is_empty() {
            String::new()
        } else {
            format!("    elements = {{ {} }}\n", v.join(", "))
        }
    };
    format!(
        "table ip kube-proxy {{
  map service-ips {{
    type ipv4_addr . inet_proto . inet_service : verdict
{}  }}
  map service-nodeports {{
    type inet_proto . inet_service : verdict
{}  }}
  chain mark-for-masquerade {{
    meta mark set meta mark | 0x4000
  }}
  chain masquerading {{
    meta mark & 0x4000 == 0 return
    meta mark set meta mark ^ 0x4000
    masquerade fully-random
  }}
  chain services {{
    ip daddr . meta l4proto . th dport vmap @service-ips
    ip daddr {node_ip} meta l4proto . th dport vmap @service-nodeports
  }}
  chain nat-prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    jump services
  }}
  chain nat-output {{
    type nat hook output priority -100; policy accept;
    jump services
  }}
  chain nat-postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    jump masquerading
  }}
  chain filter-forward {{
    type filter hook forward priority -110; policy accept;
    ct state invalid drop
  }}
{chains}}}
",
        elements(&service_ips),
        elements(&node_ports),
    )
}

/// Writes kube-proxy's nftables shape of `services` into `node`'s
/// namespace with `nft` (what kube-proxy's nftables mode runs, through
/// knftables).
pub fn nftables_rules(node: &Host, services: &[Svc], pod_cidr: &str, work: &std::path::Path) -> Result<(), String> {
    let file = work.join(format!("kube-proxy-{}.nft", node.ns));
    std::fs::write(&file, nftables_ruleset(node.ip, services, pod_cidr)).map_err(|e| e.to_string())?;
    node.exec(&["nft", "-f", &file.to_string_lossy()])
        .map(|_| ())
        .map_err(|e| format!("{e} (deploy/setup.sh installs nftables)"))
}

pub fn flush_nftables(node: &Host) {
    let _ = node.exec(&["nft", "delete", "table", "ip", "kube-proxy"]);
}
