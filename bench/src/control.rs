//! `bench control`: the real sync path (cluster objects -> compile -> diff
//! -> publish) at 1,000 / 10,000 / 50,000 services with 10 endpoints each.
//!
//! The initial sync and the periodic full reconcile walk the whole view
//! (recompiling only services whose resourceVersions changed); watch events
//! drive incremental syncs that compile and apply only the changed service.
//! Figures are measured until a reader sees the new snapshot.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Instant;

use control::compile::{Compiler, NodeContext};
use control::objects::{ClusterObjects, ObjectKey, LABEL_SERVICE_NAME};
use control::source::ServiceView;
use control::sync::Syncer;
use dataplane::addr::{Mac, Proto};
use dataplane::tables::{NodeConfig, Tables};
use dataplane::Publisher;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{json, Value};

use crate::memory;

#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Service counts to measure (ascending: peak RSS is cumulative).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000")]
    services: Vec<usize>,
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i as u32)
}

fn key(i: usize) -> ObjectKey {
    ObjectKey {
        namespace: format!("ns{}", i % 100),
        name: format!("svc-{i}"),
    }
}

fn service(i: usize) -> Service {
    let k = key(i);
    Service {
        metadata: ObjectMeta {
            name: Some(k.name.clone()),
            namespace: Some(k.namespace.clone()),
            resource_version: Some("1".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(vip(i).to_string()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A slice; `endpoints` doubles as its resourceVersion (it changes with it).
fn slice(i: usize, endpoints: usize) -> EndpointSlice {
    let k = key(i);
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{}-1", k.name)),
            namespace: Some(k.namespace.clone()),
            resource_version: Some(endpoints.to_string()),
            labels: Some(BTreeMap::from([(LABEL_SERVICE_NAME.to_string(), k.name.clone())])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(
            (0..endpoints)
                .map(|e| Endpoint {
                    addresses: vec![
                        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + (i * 10 + e) as u32).to_string(),
                    ],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        ..Default::default()
                    }),
                    node_name: Some(if e % 2 == 0 { "n1" } else { "n2" }.into()),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

fn slice_key(i: usize) -> ObjectKey {
    let k = key(i);
    ObjectKey {
        namespace: k.namespace,
        name: format!("{}-1", k.name),
    }
}

fn measure(n: usize) -> Value {
    eprintln!("control bench: {n} services");
    let mut objs = ClusterObjects::default();
    for i in 0..n {
        objs.services.insert(key(i), service(i));
        objs.endpoint_slices.insert(slice_key(i), slice(i, 10));
    }
    let ctx = NodeContext {
        node_name: "n1".into(),
        node_port_range: (30000, 32767),
        cluster_cidr: None,
    };
    let node = NodeConfig::single_uplink(
        "n1",
        Ipv4Addr::new(192, 168, 0, 1),
        "192.168.0.0/24".parse().expect("cidr"),
        Mac([2; 6]),
    );
    let publisher = Publisher::new(Tables::new(node));
    let reader = publisher.reader();
    let mut syncer = Syncer::new(publisher);
    let mut compiler = Compiler::default();

    let t0 = Instant::now();
    let report = syncer.apply(compiler.compile(&objs, &ctx));
    let initial = t0.elapsed();
    assert_eq!(report.added, n, "bench setup: every service compiles");
    assert!(reader.load().service_for(vip(n - 1), 80, Proto::Tcp).is_some());

    // A periodic full reconcile with nothing changed.
    let t = Instant::now();
    let r = syncer.apply(compiler.compile(&objs, &ctx));
    let full_resync = t.elapsed();
    assert_eq!(r.changes(), 0);

    // Incremental syncs, as watch events drive them: the changed service's
    // view is compiled and applied alone.
    let view = |i: usize, eps: usize| ServiceView {
        key: key(i),
        service: Some(service(i)),
        slices: vec![(slice_key(i), slice(i, eps))],
    };
    let mut adds = Vec::new();
    let mut removals = Vec::new();
    for r in 0..11 {
        let i = n + r;
        let t = Instant::now();
        let out = compiler.compile_one(&view(i, 10), &ctx);
        syncer.apply_services(vec![(key(i), out.ports)]);
        while reader.load().service_for(vip(i), 80, Proto::Tcp).is_none() {}
        adds.push(t.elapsed().as_secs_f64() * 1e3);
        let j = r * 7 % n;
        let t = Instant::now();
        let out = compiler.compile_one(&view(j, 9), &ctx);
        syncer.apply_services(vec![(key(j), out.ports)]);
        let nine = |r: &dataplane::Reader| {
            r.load()
                .service_for(vip(j), 80, Proto::Tcp)
                .map(|m| m.svc.endpoints().len())
                == Some(9)
        };
        while !nine(&reader) {}
        removals.push(t.elapsed().as_secs_f64() * 1e3);
    }
    adds.sort_by(f64::total_cmp);
    removals.sort_by(f64::total_cmp);
    json!({
        "services": n,
        "endpoints_per_service": 10,
        "initial_sync_ms": (initial.as_secs_f64() * 1e4).round() / 10.0,
        "full_resync_unchanged_ms": (full_resync.as_secs_f64() * 1e4).round() / 10.0,
        "add_one_service_ms": {"median": round(adds[5]), "max": round(adds[10])},
        "remove_one_endpoint_ms": {"median": round(removals[5]), "max": round(removals[10])},
        "heap_bytes": memory::live_bytes(),
        "peak_rss_bytes": memory::peak_rss(),
    })
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub fn run(args: &Args) {
    let sizes: Vec<Value> = args.services.iter().map(|&n| measure(n.max(1))).collect();
    let report = json!({
        "benchmark": "control",
        "method": "initial: full compile + publish; add/remove: incremental sync of the changed service (as watch events drive it); timed until a reader sees the change",
        "sizes": sizes,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
        return;
    }
    println!("kxp control benchmark: {}\n", report["method"].as_str().unwrap_or(""));
    println!(
        "{:>9} {:>16} {:>18} {:>22} {:>26} {:>14}",
        "services",
        "initial sync ms",
        "full resync ms",
        "add one svc ms (med/max)",
        "remove one ep ms (med/max)",
        "peak RSS MiB"
    );
    for s in report["sizes"].as_array().into_iter().flatten() {
        println!(
            "{:>9} {:>16} {:>18} {:>22} {:>26} {:>14}",
            s["services"].to_string(),
            s["initial_sync_ms"].to_string(),
            s["full_resync_unchanged_ms"].to_string(),
            format!(
                "{} / {}",
                s["add_one_service_ms"]["median"], s["add_one_service_ms"]["max"]
            ),
            format!(
                "{} / {}",
                s["remove_one_endpoint_ms"]["median"], s["remove_one_endpoint_ms"]["max"]
            ),
            s["peak_rss_bytes"].as_u64().map(|b| b / (1 << 20)).unwrap_or(0),
        );
    }
}
