//! The anchor: kube-proxy's iptables shape of the lab's services, written
//! into a node's namespace with `iptables` (what kube-proxy itself runs).

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
