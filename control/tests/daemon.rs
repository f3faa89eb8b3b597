//! `kxp run` in manifest mode: reload on change, /healthz, /metrics with
//! kube-proxy's names, and healthCheckNodePort servers.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use control::config::{Config, FileConfig};
use control::daemon::{self, SourceSpec};
use dataplane::addr::Proto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: kxp\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free port inside the NodePort range (healthCheckNodePorts must be).
fn free_port() -> u16 {
    (31000..32767)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port in the NodePort range")
}

fn manifest(hc_port: u16, local_node: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalTrafficPolicy: Local
  healthCheckNodePort: {hc_port}
  ports: [{{name: http, port: 80, nodePort: 30080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}},
  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: "2020-01-01T00:00:00Z"}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.244.1.2], nodeName: {local_node}}}]
"#
    )
}

fn test_config() -> Config {
    let mut c = Config::resolve(FileConfig::default()).unwrap();
    c.node_name = "n1".into();
    c.healthz_bind_address = "127.0.0.1:0".parse().unwrap();
    c.metrics_bind_address = "127.0.0.1:0".parse().unwrap();
    c.min_sync_period = Duration::from_millis(50);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_mode_serves_health_metrics_and_health_check_node_ports() {
    let dir = tempfile::tempdir().unwrap();
    let hc = free_port();
    std::fs::write(dir.path().join("web.yaml"), manifest(hc, "n1")).unwrap();
    let d = daemon::start(&test_config(), SourceSpec::Manifests(dir.path().to_path_buf()))
        .await
        .unwrap();
    wait_until("first sync", || async {
        d.reader
            .load()
            .service_for(Ipv4Addr::new(10, 96, 0, 10), 80, Proto::Tcp)
            .is_some()
    })
    .await;
    wait_until("healthz 200", || async {
        get(d.healthz_addr, "/healthz").await.is_some_and(|(c, _)| c == 200)
    })
    .await;
    let (code, body) = get(d.healthz_addr, "/livez").await.unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("lastUpdated"), "{body}");

    let (code, m) = get(d.metrics_addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_network_programming_duration_seconds_count 1",
        "kubeproxy_sync_proxy_rules_service_changes_total 1",
        "kxp_service_ports 1",
        "kubeproxy_sync_proxy_rules_no_local_endpoints{traffic_policy=\"external\"} 0",
    ] {
        assert!(m.contains(name), "missing {name} in\n{m}");
    }

    // healthCheckNodePort: one local endpoint -> 200.
    let hc_addr: SocketAddr = format!("127.0.0.1:{hc}").parse().unwrap();
    wait_until("health check 200", || async {
        get(hc_addr, "/healthz").await.is_some_and(|(c, _)| c == 200)
    })
    .await;
    let (_, body) = get(hc_addr, "/").await.unwrap();
    assert!(
        body.contains("\"localEndpoints\":1") && body.contains("\"name\":\"web\""),
        "{body}"
    );

    // The endpoint moves to another node: reloaded, and the check says 503.
    tokio::time::sleep(Duration::from_millis(1100)).await; // a new mtime second
    std::fs::write(dir.path().join("web.yaml"), manifest(hc, "n2")).unwrap();
    wait_until("health check 503", || async {
        get(hc_addr, "/").await.is_some_and(|(c, _)| c == 503)
    })
    .await;
    let (_, m) = get(d.metrics_addr, "/metrics").await.unwrap();
    assert!(
        m.contains("kubeproxy_sync_proxy_rules_no_local_endpoints{traffic_policy=\"external\"} 1"),
        "{m}"
    );
    assert!(m.contains("kubeproxy_sync_proxy_rules_service_changes_total 2"), "{m}");

    // A malformed manifest: the tables stay, the failure is counted.
    std::fs::write(dir.path().join("broken.yaml"), "kind: [\n").unwrap();
    wait_until("sync failure counted", || async {
        get(d.metrics_addr, "/metrics")
            .await
            .is_some_and(|(_, m)| m.contains("kxp_sync_failures_total 1"))
    })
    .await;
    assert!(d
        .reader
        .load()
        .service_for(Ipv4Addr::new(10, 96, 0, 10), 80, Proto::Tcp)
        .is_some());
}

#[test]
fn kxp_run_explains_bad_configuration_and_busy_ports() {
    let kxp = env!("CARGO_BIN_EXE_kxp");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("kxp.yaml");
    std::fs::write(&cfg, "kind: KubeProxyConfiguration\nsyncPeriod: often\n").unwrap();
    let out = Command::new(kxp)
        .args(["run", "--manifests"])
        .arg(dir.path())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("syncPeriod") && err.contains("kxp.yaml"), "{err}");

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let out = Command::new(kxp)
        .args(["run", "--manifests"])
        .arg(dir.path())
        .args(["--healthz-bind-address", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port} for /healthz")) && err.contains("healthzBindAddress"),
        "{err}"
    );
}

/// Issue #9: when the dataplane does not take a publish (a steering map
/// write failed), `/healthz` fails, the failure is counted, and the publish
/// is retried until it goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_dataplane_refused_fails_healthz_until_a_retry_succeeds() {
    use control::compile::NodeContext;
    use control::runner::{PublishHook, SyncLoop, SyncPolicy, SyncStatus};
    use control::source::ManifestSource;
    use control::sync::Syncer;
    use dataplane::addr::Mac;
    use dataplane::tables::{NodeConfig, Tables};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), manifest(31234, "n1")).unwrap();
    let changed = Arc::new(tokio::sync::Notify::new());
    let source = ManifestSource::spawn(dir.path().to_path_buf(), changed.clone(), Duration::from_millis(100));
    let node = NodeConfig::single_uplink(
        "n1",
        Ipv4Addr::new(192, 168, 0, 1),
        "192.168.0.0/24".parse().unwrap(),
        Mac([2; 6]),
    );
    let status = Arc::new(SyncStatus::default());
    let metrics = Arc::new(control::metrics::Metrics::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    // The first two attempts fail, as a full steering map would.
    let hook: PublishHook = Box::new(move |_t: &dataplane::Tables| {
        if c.fetch_add(1, Ordering::SeqCst) < 2 {
            Err("cannot update XDP map frontends: map full".into())
        } else {
            Ok(())
        }
    });
    let sync = SyncLoop {
        source,
        syncer: Syncer::new(dataplane::Publisher::new(Tables::new(node))),
        ctx: NodeContext {
            node_name: "n1".into(),
            node_port_range: (30000, 32767),
            cluster_cidr: None,
        },
        policy: SyncPolicy {
            min_interval: Duration::from_millis(50),
            full_every: Duration::from_secs(30),
        },
        changed: changed.clone(),
        status: status.clone(),
        metrics: metrics.clone(),
        health_checks: None,
        on_publish: Some(hook),
        host: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let healthz = listener.local_addr().unwrap();
    control::health::serve_healthz(listener, status.clone(), Duration::from_secs(60));
    tokio::spawn(sync.run());
    changed.notify_one();
    wait_until("the first publish was refused", || async {
        status.dataplane_behind.load(Ordering::SeqCst)
    })
    .await;
    let (code, body) = get(healthz, "/healthz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"dataplaneInSync\":false"), "{body}");
    wait_until("a retry went through", || async { calls.load(Ordering::SeqCst) >= 3 }).await;
    wait_until("healthz 200 again", || async {
        get(healthz, "/healthz").await.is_some_and(|(c, _)| c == 200)
    })
    .await;
    assert!(metrics.render().contains("kxp_dataplane_sync_failures_total 2"));
}
