//! Manifests -> compile -> sync -> published tables, including every kind of
//! bad input issue #3 names: each is reported by name and skipped, and the
//! rest still applies.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use control::compile::{compile, Desired, NodeContext, ServiceIds};
use control::manifests::{self, ManifestError};
use control::sync::Syncer;
use dataplane::addr::{Mac, Proto};
use dataplane::tables::{NodeConfig, Reach, Tables};
use dataplane::Publisher;

const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  externalIPs: [198.51.100.20]
  externalTrafficPolicy: Local
  healthCheckNodePort: 31000
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, nodePort: 30053, protocol: UDP}
status:
  loadBalancer: {ingress: [{ip: 198.51.100.10}, {hostname: lb.example}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.244.1.2], nodeName: n1, conditions: {ready: true}}
- {addresses: [10.244.2.5], nodeName: n2}
- {addresses: [10.244.1.3], nodeName: n1, conditions: {ready: false, serving: true, terminating: true}}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  internalTrafficPolicy: Local
  ports: [{port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: shop, labels: {service.kubernetes.io/service-proxy-name: cilium}}
spec: {clusterIP: 10.96.0.30, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec: {type: ExternalName, externalName: example.com}
"#;

fn ctx() -> NodeContext {
    NodeContext {
        node_name: "n1".into(),
        node_port_range: (30000, 32767),
        cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
    }
}

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    d
}

fn compile_dir(dir: &Path) -> Desired {
    compile(&manifests::load_dir(dir).unwrap(), &ctx(), &mut ServiceIds::default())
}

fn tables() -> Tables {
    Tables::new(NodeConfig::single_uplink(
        "n1",
        Ipv4Addr::new(192, 168, 0, 1),
        "192.168.0.0/24".parse().unwrap(),
        Mac([2; 6]),
    ))
}

#[test]
fn a_good_directory_compiles_with_kube_proxy_semantics() {
    let d = dir_with(&[("app.yaml", GOOD)]);
    let out = compile_dir(d.path());
    assert_eq!(out.problems, vec![]);
    assert_eq!(out.ignored, 3, "headless, other proxy, ExternalName");
    let http = &out.services["shop/web:http"];
    assert_eq!(http.proto, Proto::Tcp);
    assert_eq!(http.cluster_ips, vec![Ipv4Addr::new(10, 96, 0, 10)]);
    assert_eq!(http.external_ips, vec![Ipv4Addr::new(198, 51, 100, 20)]);
    assert_eq!(http.load_balancer_ips, vec![Ipv4Addr::new(198, 51, 100, 10)]);
    assert_eq!(http.node_port, Some(30080));
    assert!(http.external_local && !http.internal_local);
    assert_eq!(http.affinity, Some(std::time::Duration::from_secs(60)));
    assert_eq!(http.endpoints.len(), 3);
    let t = &http.endpoints[2];
    assert_eq!(
        (t.addr.0.port, t.ready, t.serving, t.terminating, t.local),
        (8080, false, true, true, true)
    );
    assert!(
        !http.endpoints[1].local && http.endpoints[1].ready,
        "unset conditions mean ready"
    );
    let dns = &out.services["shop/web:dns"];
    assert_eq!(
        (dns.proto, dns.port, dns.endpoints[0].addr.0.port),
        (Proto::Udp, 53, 5353)
    );
    assert_eq!(out.health_check_node_ports["shop/web:http"], 31000);
    let db = &out.services["shop/db:"];
    assert!(db.internal_local && db.endpoints.is_empty());
    let summary = control::compile::summary(&out);
    assert!(summary.contains("service ports:        3"), "{summary}");
}

#[test]
fn unusable_objects_are_named_and_skipped_while_the_rest_applies() {
    let bad = r#"
apiVersion: v1
kind: Service
metadata: {name: badip, namespace: x}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: badport, namespace: x}
spec: {clusterIP: 10.96.1.1, ports: [{name: a, port: 70000}, {name: b, port: 81}]}
---
apiVersion: v1
kind: Service
metadata: {name: badproto, namespace: x}
spec: {clusterIP: 10.96.1.2, ports: [{name: i, port: 80, protocol: ICMP}, {name: s, port: 81, protocol: SCTP}]}
---
apiVersion: v1
kind: Service
metadata: {name: badnp, namespace: x}
spec: {type: NodePort, clusterIP: 10.96.1.3, ports: [{port: 80, nodePort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: a-first, namespace: x}
spec: {clusterIP: 10.96.1.4, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b-dup, namespace: x}
spec: {clusterIP: 10.96.1.4, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: badaff, namespace: x}
spec: {clusterIP: 10.96.1.5, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: a-first-1, namespace: x, labels: {kubernetes.io/service-name: a-first}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [not-an-ip]}, {addresses: [10.244.1.9]}]
"#;
    let d = dir_with(&[("good.yaml", GOOD), ("bad.yaml", bad)]);
    let out = compile_dir(d.path());
    let text: Vec<String> = out.problems.iter().map(|p| p.to_string()).collect();
    let has = |needle: &str| {
        assert!(
            text.iter().any(|t| t.contains(needle)),
            "no problem mentioning {needle:?} in {text:#?}"
        )
    };
    has("Service x/badip: invalid clusterIP");
    has("Service x/badport port a: port 70000 outside 1-65535");
    has("Service x/badproto port i: unknown protocol \"ICMP\"");
    has("Service x/badproto port s: protocol SCTP is not supported");
    has("Service x/badnp port 80: nodePort 8080 outside the node port range 30000-32767");
    has("Service x/b-dup port 80: 10.96.1.4:80/TCP is already used by service x/a-first:");
    has("Service x/badaff: sessionAffinityConfig timeoutSeconds 0");
    has("EndpointSlice x/a-first-1: endpoint address \"not-an-ip\"");
    assert_eq!(out.problems.len(), 8, "{text:#?}");
    // The usable parts still compile.
    assert!(out.services.contains_key("shop/web:http"));
    assert!(
        out.services.contains_key("x/badport:b"),
        "the valid port of a service with a bad one"
    );
    assert_eq!(out.services["x/a-first:"].endpoints.len(), 1);
    assert!(!out.services.contains_key("x/b-dup:"));
    // And they sync.
    let mut s = Syncer::new(Publisher::new(tables()));
    let r = s.apply(out);
    assert_eq!(r.problems.len(), 8);
    let t = s.publisher().reader().load();
    assert!(t.service_for(Ipv4Addr::new(10, 96, 0, 10), 80, Proto::Tcp).is_some());
    assert!(t.service_for(Ipv4Addr::new(10, 96, 1, 1), 81, Proto::Tcp).is_some());
}

#[test]
fn a_malformed_file_is_named_and_the_previous_tables_stay() {
    let d = dir_with(&[("a.yaml", GOOD)]);
    let mut s = Syncer::new(Publisher::new(tables()));
    s.apply(compile_dir(d.path()));
    let before = s.publisher().reader().load().generation();
    std::fs::write(d.path().join("b.yaml"), "apiVersion: v1\nkind: Service\nmetadata: {name: ok}\n---\nkind: Service\napiVersion: v1\nmetadata: {name: broken}\nspec: {ports: {port: 80}}\n").unwrap();
    let err = manifests::load_dir(d.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ManifestError::Document { doc: 2, .. }), "{msg}");
    assert!(
        msg.contains("b.yaml") && msg.contains("document 2") && msg.contains("Service broken"),
        "{msg}"
    );
    // The caller does not apply anything: tables unchanged.
    let t = s.publisher().reader().load();
    assert_eq!(t.generation(), before);
    assert!(t.service_for(Ipv4Addr::new(10, 96, 0, 10), 80, Proto::Tcp).is_some());
}

#[test]
fn sync_publishes_only_changes_and_keeps_service_ids() {
    let d = dir_with(&[("a.yaml", GOOD)]);
    let objs = manifests::load_dir(d.path()).unwrap();
    let mut ids = ServiceIds::default();
    let mut s = Syncer::new(Publisher::new(tables()));
    let r = s.apply(compile(&objs, &ctx(), &mut ids));
    assert_eq!((r.added, r.updated, r.removed, r.published), (3, 0, 0, Some(1)));
    let id = s.live()["shop/web:http"].id;
    // Same objects again: nothing to publish.
    let r = s.apply(compile(&objs, &ctx(), &mut ids));
    assert_eq!((r.changes(), r.published), (0, None));
    // One endpoint gone: one service port updated, same id.
    let fewer = GOOD.replace("- {addresses: [10.244.2.5], nodeName: n2}\n", "");
    std::fs::write(d.path().join("a.yaml"), fewer).unwrap();
    let r = s.apply(compile(&manifests::load_dir(d.path()).unwrap(), &ctx(), &mut ids));
    assert_eq!(
        (r.added, r.updated, r.removed),
        (0, 2, 0),
        "both ports of web share the slice"
    );
    assert_eq!(s.live()["shop/web:http"].id, id);
    let t = s.publisher().reader().load();
    let m = t.service_for(Ipv4Addr::new(198, 51, 100, 10), 80, Proto::Tcp).unwrap();
    assert_eq!((m.svc.endpoints().len(), m.reach), (2, Reach::External));
    drop(t);
    // Service deleted: its frontends leave the tables.
    std::fs::write(d.path().join("a.yaml"), "").unwrap();
    let r = s.apply(compile(&manifests::load_dir(d.path()).unwrap(), &ctx(), &mut ids));
    assert_eq!(r.removed, 3);
    assert!(s
        .publisher()
        .reader()
        .load()
        .service_for(Ipv4Addr::new(10, 96, 0, 10), 80, Proto::Tcp)
        .is_none());
}

#[test]
fn kxp_check_reports_and_exits_non_zero_on_problems() {
    let kxp = env!("CARGO_BIN_EXE_kxp");
    let good = dir_with(&[("a.yaml", GOOD)]);
    let out = Command::new(kxp)
        .args(["check", "--manifests"])
        .arg(good.path())
        .args(["--node-name", "n1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("shop/web:http TCP [10.96.0.10:80, 198.51.100.20:80, 198.51.100.10:80] nodePort 30080"),
        "{stdout}"
    );

    let bad = dir_with(&[("a.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: w, namespace: n}\nspec: {clusterIP: 1.2.3, ports: [{port: 80}]}\n")]);
    let out = Command::new(kxp)
        .args(["check", "--manifests"])
        .arg(bad.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Service n/w: invalid clusterIP"));

    let broken = dir_with(&[("z.yaml", "kind: [\n")]);
    let out = Command::new(kxp)
        .args(["check", "--manifests"])
        .arg(broken.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("z.yaml, document 1"));

    let out = Command::new(kxp)
        .args(["check", "--manifests", "/nonexistent-kxp-dir"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read manifest directory /nonexistent-kxp-dir"));
}

#[test]
fn nodes_give_this_nodes_addresses_and_routes_to_other_nodes_pods() {
    let nodes = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: Hostname, address: n1}, {type: InternalIP, address: 192.168.0.1}]}
---
apiVersion: v1
kind: Node
metadata:
  name: n2
  annotations: {flannel.alpha.coreos.com/backend-data: '{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"}'}
spec: {podCIDR: 10.244.2.0/24, podCIDRs: [10.244.2.0/24, "fd00:2::/64"]}
status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
---
apiVersion: v1
kind: Node
metadata: {name: n3}
spec: {podCIDR: 10.244.3.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.0.3}]}
"#;
    let d = dir_with(&[("nodes.yaml", nodes)]);
    let out = compile_dir(d.path());
    assert_eq!(out.nodes.node_ips, vec![Ipv4Addr::new(192, 168, 0, 1)]);
    assert_eq!(out.nodes.pod_cidr, Some("10.244.1.0/24".parse().unwrap()));
    assert_eq!(out.nodes.remote.len(), 1);
    assert_eq!(out.problems.len(), 1);
    assert!(
        out.problems[0]
            .to_string()
            .starts_with("Node n3: no VTEP MAC annotation"),
        "{}",
        out.problems[0]
    );
    let mut s = Syncer::new(Publisher::new(tables()));
    let r = s.apply(out);
    assert!(r.published.is_some());
    let t = s.publisher().reader().load();
    let n2 = t.remote_node(Ipv4Addr::new(10, 244, 2, 7)).unwrap();
    assert_eq!(
        (n2.node_ip, n2.vtep_mac),
        (Ipv4Addr::new(192, 168, 0, 2), Mac([0x0e, 0, 0, 0, 0, 2]))
    );
    assert!(t.remote_node(Ipv4Addr::new(10, 244, 3, 7)).is_none());
    assert_eq!(t.node().node_ips, vec![Ipv4Addr::new(192, 168, 0, 1)]);
}

#[test]
fn unchanged_services_are_not_compiled_again() {
    let with_rv = GOOD
        .replace(
            "metadata: {name: web, namespace: shop}",
            "metadata: {name: web, namespace: shop, resourceVersion: '5'}",
        )
        .replace(
            "metadata: {name: db, namespace: shop}",
            "metadata: {name: db, namespace: shop, resourceVersion: '6'}",
        )
        .replace(
            "metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}",
            "metadata: {name: web-1, namespace: shop, resourceVersion: '7', labels: {kubernetes.io/service-name: web}}",
        );
    let mut objs = control::objects::ClusterObjects::default();
    manifests::load_str(&with_rv, &mut objs).unwrap();
    let mut c = control::compile::Compiler::default();
    let a = c.compile(&objs, &ctx());
    let b = c.compile(&objs, &ctx());
    assert!(
        std::sync::Arc::ptr_eq(&a.services["shop/web:http"], &b.services["shop/web:http"]),
        "cached"
    );
    // A new slice version recompiles that service only.
    let key = objs.endpoint_slices.keys().next().unwrap().clone();
    let s = objs.endpoint_slices.get_mut(&key).unwrap();
    s.metadata.resource_version = Some("8".into());
    s.endpoints.as_mut().unwrap().pop();
    let c2 = c.compile(&objs, &ctx());
    assert!(!std::sync::Arc::ptr_eq(
        &b.services["shop/web:http"],
        &c2.services["shop/web:http"]
    ));
    assert_eq!(c2.services["shop/web:http"].endpoints.len(), 2);
    assert!(std::sync::Arc::ptr_eq(
        &b.services["shop/db:"],
        &c2.services["shop/db:"]
    ));
    assert_eq!(
        b.services["shop/web:http"].id, c2.services["shop/web:http"].id,
        "ids are stable"
    );
}

#[test]
fn the_shipped_example_manifests_check_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let ctx = NodeContext {
        node_name: "node-1".into(),
        ..ctx()
    };
    let out = compile(&manifests::load_dir(&dir).unwrap(), &ctx, &mut ServiceIds::default());
    assert_eq!(out.problems, vec![]);
    assert_eq!(out.services.len(), 2);
    assert_eq!(out.nodes.remote.len(), 1);
}

/// The CVE-2020-8554 class: frontends that would capture someone else's
/// traffic are problems naming the service, and only they are skipped.
#[test]
fn frontends_that_would_hijack_traffic_are_refused_and_named() {
    let nodes = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
status: {addresses: [{type: InternalIP, address: 192.168.0.2}, {type: ExternalIP, address: 203.0.113.2}]}
"#;
    let hijack = r#"
apiVersion: v1
kind: Service
metadata: {name: hijack, namespace: evil}
spec:
  type: LoadBalancer
  clusterIP: 10.96.5.1
  externalIPs: [0.0.0.0, 255.255.255.255, 224.0.0.251, 127.0.0.1, 169.254.169.254, 192.168.0.2, 203.0.113.2, 10.244.1.2, 198.51.100.77]
  externalTrafficPolicy: Local
  healthCheckNodePort: 10250
  ports: [{port: 53, nodePort: 30053, protocol: UDP}]
status:
  loadBalancer: {ingress: [{ip: 192.168.0.1}, {ip: 198.51.100.78}]}
---
apiVersion: v1
kind: Service
metadata: {name: clash, namespace: evil}
spec:
  type: NodePort
  clusterIP: 10.96.5.2
  externalTrafficPolicy: Local
  healthCheckNodePort: 30080
  ports: [{port: 80, nodePort: 30081}]
"#;
    let d = dir_with(&[("app.yaml", GOOD), ("nodes.yaml", nodes), ("evil.yaml", hijack)]);
    let out = compile_dir(d.path());
    let text: Vec<String> = out.problems.iter().map(|p| p.to_string()).collect();
    for needle in [
        "externalIP 0.0.0.0 is unspecified",
        "externalIP 255.255.255.255 is broadcast",
        "externalIP 224.0.0.251 is multicast",
        "externalIP 127.0.0.1 is loopback",
        "externalIP 169.254.169.254 is link-local",
        "externalIP 192.168.0.2 is a node's address",
        "externalIP 203.0.113.2 is a node's address",
        "externalIP 10.244.1.2 is inside the cluster CIDR 10.244.0.0/16",
        "LoadBalancer ingress IP 192.168.0.1 is a node's address",
        "healthCheckNodePort 10250 outside the node port range",
        "healthCheckNodePort 30080 is already the nodePort of service shop/web:http",
    ] {
        assert!(
            text.iter()
                .any(|t| t.starts_with("Service evil/") && t.contains(needle)),
            "no problem {needle:?} in {text:#?}"
        );
    }
    // The rest of the service applies: its good addresses and its NodePort.
    let svc = &out.services["evil/hijack:"];
    assert_eq!(svc.external_ips, vec![Ipv4Addr::new(198, 51, 100, 77)]);
    assert_eq!(svc.load_balancer_ips, vec![Ipv4Addr::new(198, 51, 100, 78)]);
    assert_eq!(svc.node_port, Some(30053));
    assert!(!out.health_check_node_ports.contains_key("evil/hijack:"));
    assert!(!out.health_check_node_ports.contains_key("evil/clash:"));
    assert_eq!(
        out.health_check_node_ports["shop/web:http"], 31000,
        "the first keeps it"
    );
    // `kxp check` reports them all and fails.
    let check = Command::new(env!("CARGO_BIN_EXE_kxp"))
        .args(["check", "--manifests"])
        .arg(d.path())
        .args(["--node-name", "n1", "--cluster-cidr", "10.244.0.0/16"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("externalIP 192.168.0.2 is a node's address"),
        "{stderr}"
    );
}

#[test]
fn load_balancer_source_ranges_reach_the_tables_from_the_field_or_the_annotation() {
    let svcs = r#"
apiVersion: v1
kind: Service
metadata: {name: field, namespace: x}
spec:
  type: LoadBalancer
  clusterIP: 10.96.6.1
  loadBalancerSourceRanges: [203.0.113.0/24, "2001:db8::/32"]
  ports: [{port: 80, nodePort: 30100}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.50}]}}
---
apiVersion: v1
kind: Service
metadata:
  name: annotated
  namespace: x
  annotations: {service.beta.kubernetes.io/load-balancer-source-ranges: "10.0.0.0/8, 172.16.0.0/12"}
spec:
  type: LoadBalancer
  clusterIP: 10.96.6.2
  ports: [{port: 80, nodePort: 30101}]
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: x}
spec:
  type: LoadBalancer
  clusterIP: 10.96.6.3
  loadBalancerSourceRanges: [not-a-cidr]
  ports: [{port: 80, nodePort: 30102}]
"#;
    let d = dir_with(&[("s.yaml", svcs)]);
    let out = compile_dir(d.path());
    let field = &out.services["x/field:"];
    assert_eq!(field.source_ranges, vec!["203.0.113.0/24".parse().unwrap()]);
    let ann = &out.services["x/annotated:"];
    assert_eq!(ann.source_ranges.len(), 2);
    assert!(out
        .problems
        .iter()
        .any(|p| p.object == "Service x/broken" && p.reason.contains("invalid loadBalancerSourceRanges")));
    assert!(
        !out.services.contains_key("x/broken:"),
        "an unreadable firewall is not an open one"
    );
}
