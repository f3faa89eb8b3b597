//! Prometheus metrics, with kube-proxy's names where the meaning matches so
//! existing dashboards and alerts keep working.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub struct Metrics {
    registry: Registry,
    /// kube-proxy: how long one sync of the rules took.
    pub sync_duration: Histogram,
    /// kube-proxy: unix time of the last successful sync.
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    /// kube-proxy: from an endpoint change (its trigger time) to tables live.
    pub network_programming_duration: Histogram,
    /// kube-proxy: service-port changes applied.
    pub service_changes: Counter,
    /// kube-proxy: services with a Local policy and no local endpoint.
    pub no_local_endpoints: Family<Vec<(String, String)>, Gauge>,
    /// kxp: syncs that kept the old tables because the source was unusable.
    pub sync_failures: Counter,
    /// kxp: objects (or parts) skipped as unusable in the last sync.
    pub skipped_objects: Gauge,
    /// kxp: service ports live in the tables.
    pub service_ports: Gauge,
    /// kxp: errors from the Kubernetes API watches (each followed by a retry).
    pub api_watch_errors: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            sync_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 20)),
            last_sync_timestamp: Gauge::default(),
            network_programming_duration: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            service_changes: Counter::default(),
            no_local_endpoints: Family::default(),
            sync_failures: Counter::default(),
            skipped_objects: Gauge::default(),
            service_ports: Gauge::default(),
            api_watch_errors: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            m.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            m.last_sync_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            m.network_programming_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        registry.register(
            "kxp_sync_failures",
            "Syncs that kept the live tables because the source was unusable",
            m.sync_failures.clone(),
        );
        registry.register(
            "kxp_skipped_objects",
            "Objects or parts of objects skipped as unusable in the last sync",
            m.skipped_objects.clone(),
        );
        registry.register(
            "kxp_service_ports",
            "Service ports live in the tables",
            m.service_ports.clone(),
        );
        registry.register(
            "kxp_api_watch_errors",
            "Errors from the Kubernetes API watches, each followed by a retry with backoff",
            m.api_watch_errors.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }
}
