//! The real kube-rs watch path (watcher + reflector, unmodified) against a
//! fake API server that speaks the list/watch protocol, through the sync
//! loop into published tables.

mod support;

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::compile::NodeContext;
use control::kube_source::KubeSource;
use control::runner::{SyncLoop, SyncPolicy, SyncStatus};
use control::sync::Syncer;
use dataplane::addr::{Mac, Proto};
use dataplane::tables::{NodeConfig, Tables};
use dataplane::{Publisher, Reader};
use serde_json::{json, Value};
use support::fake_apiserver::{FakeApiServer, Res};
use tokio::sync::Notify;

fn service(ns: &str, name: &str, ip: &str, labels: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": ns, "labels": labels},
           "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
}

fn slice(ns: &str, svc: &str, addrs: &[&str]) -> Value {
    let eps: Vec<Value> = addrs
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
        .collect();
    json!({"metadata": {"name": format!("{svc}-1"), "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps})
}

struct Harness {
    server: FakeApiServer,
    reader: Reader,
    status: Arc<SyncStatus>,
    source: Arc<KubeSource>,
}

async fn start(policy: SyncPolicy) -> Harness {
    let server = FakeApiServer::start().await;
    let config = kube::Config::new(server.url().parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let changed = Arc::new(Notify::new());
    let source = KubeSource::spawn(client, changed.clone());
    let node = NodeConfig::single_uplink(
        "n1",
        Ipv4Addr::new(192, 168, 0, 1),
        "192.168.0.0/24".parse().unwrap(),
        Mac([2; 6]),
    );
    let publisher = Publisher::new(Tables::new(node));
    let reader = publisher.reader();
    let status = Arc::new(SyncStatus::default());
    let sync = SyncLoop {
        source: source.clone(),
        syncer: Syncer::new(publisher),
        ctx: NodeContext {
            node_name: "n1".into(),
            node_port_range: (30000, 32767),
            cluster_cidr: None,
        },
        policy,
        changed,
        status: status.clone(),
        metrics: Arc::new(control::metrics::Metrics::new()),
        health_checks: None,
        on_publish: None,
        host: None,
    };
    tokio::spawn(sync.run());
    Harness {
        server,
        reader,
        status,
        source,
    }
}

fn fast() -> SyncPolicy {
    SyncPolicy {
        min_interval: Duration::from_millis(50),
        full_every: Duration::from_secs(2),
    }
}

/// Endpoints of the service at `ip:80/TCP`, or None when it is absent.
fn endpoints(r: &Reader, ip: [u8; 4]) -> Option<usize> {
    r.load()
        .service_for(Ipv4Addr::from(ip), 80, Proto::Tcp)
        .map(|m| m.svc.endpoints().len())
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_update_delete_reach_the_tables() {
    let h = start(fast()).await;
    h.server
        .apply(Res::Services, service("shop", "web", "10.96.0.10", json!({})));
    h.server
        .apply(Res::EndpointSlices, slice("shop", "web", &["10.244.1.2"]));
    wait_until("service with one endpoint", || {
        endpoints(&h.reader, [10, 96, 0, 10]) == Some(1)
    })
    .await;
    h.server
        .apply(Res::EndpointSlices, slice("shop", "web", &["10.244.1.2", "10.244.1.3"]));
    wait_until("second endpoint", || endpoints(&h.reader, [10, 96, 0, 10]) == Some(2)).await;
    h.server.delete(Res::EndpointSlices, "shop", "web-1");
    wait_until("slice removed", || endpoints(&h.reader, [10, 96, 0, 10]) == Some(0)).await;
    h.server.delete(Res::Services, "shop", "web");
    wait_until("service removed", || endpoints(&h.reader, [10, 96, 0, 10]).is_none()).await;
    assert!(
        h.status.partial_syncs.load(Ordering::Relaxed) > 0,
        "changes after the first sync are incremental"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_for_other_proxies_and_headless_ones_are_ignored() {
    let h = start(fast()).await;
    h.server.apply(
        Res::Services,
        service(
            "a",
            "theirs",
            "10.96.0.11",
            json!({"service.kubernetes.io/service-proxy-name": "other"}),
        ),
    );
    h.server.apply(
        Res::Services,
        service("a", "hl", "10.96.0.12", json!({"service.kubernetes.io/headless": ""})),
    );
    h.server
        .apply(Res::Services, service("a", "ours", "10.96.0.13", json!({})));
    wait_until("our service", || endpoints(&h.reader, [10, 96, 0, 13]).is_some()).await;
    assert!(endpoints(&h.reader, [10, 96, 0, 11]).is_none());
    assert!(endpoints(&h.reader, [10, 96, 0, 12]).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_forces_a_relist_that_converges_without_dropping_tables() {
    let h = start(fast()).await;
    h.server
        .apply(Res::Services, service("shop", "web", "10.96.0.10", json!({})));
    h.server
        .apply(Res::EndpointSlices, slice("shop", "web", &["10.244.1.2"]));
    wait_until("initial sync", || endpoints(&h.reader, [10, 96, 0, 10]) == Some(1)).await;
    // Watch the tables closely while the watchers relist.
    let reader = h.reader.clone();
    let gap = tokio::spawn(async move {
        let until = Instant::now() + Duration::from_secs(3);
        let mut missing = 0;
        while Instant::now() < until {
            if endpoints(&reader, [10, 96, 0, 10]).is_none() {
                missing += 1;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        missing
    });
    let requests = h.server.requests();
    h.server.compact();
    h.server
        .apply(Res::Services, service("shop", "new", "10.96.0.20", json!({})));
    wait_until("service added after compaction", || {
        endpoints(&h.reader, [10, 96, 0, 20]).is_some()
    })
    .await;
    // Each of the three watchers: a re-watch answered 410, a list, a watch.
    wait_until("every watcher relisted", || h.server.requests() >= requests + 9).await;
    assert_eq!(gap.await.unwrap(), 0, "the live service vanished during the relist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_server_keeps_the_last_tables_and_recovery_follows() {
    let mut h = start(fast()).await;
    h.server
        .apply(Res::Services, service("shop", "web", "10.96.0.10", json!({})));
    wait_until("initial sync", || endpoints(&h.reader, [10, 96, 0, 10]).is_some()).await;
    h.server.stop().await;
    // Changes made while kxp cannot see the API server...
    h.server.delete(Res::Services, "shop", "web");
    h.server
        .apply(Res::Services, service("shop", "api", "10.96.0.30", json!({})));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        endpoints(&h.reader, [10, 96, 0, 10]).is_some(),
        "last tables stay live while the API is away"
    );
    wait_until("watch errors counted", || {
        h.source.status.errors.load(Ordering::Relaxed) > 0
    })
    .await;
    // ...arrive once it is back.
    h.server.restart().await;
    wait_until("recovered", || {
        endpoints(&h.reader, [10, 96, 0, 30]).is_some() && endpoints(&h.reader, [10, 96, 0, 10]).is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_1000_changes_yields_few_exact_syncs() {
    let h = start(SyncPolicy {
        min_interval: Duration::from_millis(300),
        full_every: Duration::from_secs(30),
    })
    .await;
    h.server
        .apply(Res::Services, service("b", "first", "10.96.9.9", json!({})));
    wait_until("initial sync", || endpoints(&h.reader, [10, 96, 9, 9]).is_some()).await;
    let before = h.status.syncs.load(Ordering::Relaxed);
    for i in 0..1000u32 {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + i).to_string();
        h.server
            .apply(Res::Services, service("b", &format!("s{i}"), &ip, json!({})));
    }
    wait_until("all 1000 services", || h.reader.load().service_count() == 1001).await;
    let syncs = h.status.syncs.load(Ordering::Relaxed) - before;
    assert!(syncs <= 15, "{syncs} syncs for one burst");
    assert!(
        h.status.partial_syncs.load(Ordering::Relaxed) > 0,
        "the burst was applied incrementally"
    );
    let t = h.reader.load();
    for i in 0..1000u32 {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + i);
        let m = t
            .service_for(ip, 80, Proto::Tcp)
            .expect("every service of the burst is live");
        assert_eq!(&*m.svc.name, format!("b/s{i}:http"));
    }
}
