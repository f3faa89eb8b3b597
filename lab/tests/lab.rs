//! Root-only: the namespace lab builds, routes (kernel baseline: pods on
//! different nodes talk over Flannel-style VXLAN), and leaves nothing behind.
//! Under CI=true (CI runs as root) this test must run; elsewhere, without
//! root, it says so and returns.

use lab::{node_ip, pod_ip, Lab};

fn ping(host: &lab::Host, to: std::net::Ipv4Addr) -> Result<String, lab::LabError> {
    host.exec(&["ping", "-c", "1", "-W", "2", &to.to_string()])
}

#[test]
fn the_lab_builds_routes_and_cleans_up() {
    if !lab::root_or_skip() {
        return;
    }
    let names;
    {
        let lab = Lab::build(2, 2).expect("lab builds");
        names = lab.namespaces().to_vec();
        assert_eq!(names.len(), 1 + 1 + 2 + 4, "underlay, client, 2 nodes, 4 pods");
        ping(&lab.client, node_ip(1)).expect("client reaches node 1");
        ping(&lab.nodes[0].pods[0], pod_ip(1, 1)).expect("pods on one node reach each other");
        ping(&lab.nodes[0].pods[0], pod_ip(2, 1)).expect("pods reach pods on the other node over VXLAN");
        ping(&lab.nodes[1].pods[1], node_ip(1)).expect("pods reach other nodes' addresses");
    }
    let left = lab::run(&["ip", "netns", "list"]).unwrap();
    for n in names {
        assert!(
            !left.lines().any(|l| l.split_whitespace().next() == Some(n.as_str())),
            "{n} left behind"
        );
    }
}

#[test]
fn a_failed_build_cleans_up_too() {
    if !lab::root_or_skip() {
        return;
    }
    // A second lab with the same names fails at once and must leave the
    // first one alone.
    let prefix = format!("kxpdup{}", std::process::id());
    let first = Lab::build_named(&prefix, 1, 1).expect("lab builds");
    let err = Lab::build_named(&prefix, 1, 1)
        .err()
        .expect("a second lab with the same names fails");
    assert!(err.to_string().contains("ip netns add"), "{err}");
    assert!(ping(&first.client, node_ip(1)).is_ok(), "the first lab is untouched");
}
