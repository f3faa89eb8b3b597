//! Prometheus metrics, with kube-proxy's names where the meaning matches so
//! existing dashboards and alerts keep working.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

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
    /// kxp: publishes the dataplane did not take (a steering map write failed).
    pub dataplane_sync_failures: Counter,
    /// kxp: reads of the kernel's facts (interfaces, routes, neighbours).
    pub kernel_reads: Counter,
    /// kxp: objects (or parts) skipped as unusable in the last sync.
    pub skipped_objects: Gauge,
    /// kxp: service ports live in the tables.
    pub service_ports: Gauge,
    /// kxp: errors from the Kubernetes API watches (each followed by a retry).
    pub api_watch_errors: Gauge,
    /// kxp, per worker (queue): packets by direction, drops by reason,
    /// RX->TX-submit latency quantiles, UMEM frames by place.
    worker_packets: Family<Vec<(String, String)>, Gauge>,
    worker_drops: Family<Vec<(String, String)>, Gauge>,
    worker_latency: Family<Vec<(String, String)>, Gauge>,
    worker_frames: Family<Vec<(String, String)>, Gauge>,
    worker_events: Family<Vec<(String, String)>, Gauge>,
    worker_umems: Family<Vec<(String, String)>, Gauge>,
    worker_time: Family<Vec<(String, String)>, Gauge>,
    worker_time_samples: Family<Vec<(String, String)>, Gauge>,
    /// kxp: what the XDP program did with each frame (all ports).
    steering_packets: Family<Vec<(String, String)>, Gauge>,
    workers: Mutex<Option<WorkerSource>>,
    /// When the workers' histograms began (about: kxp's start).
    started: std::time::SystemTime,
}

/// Latency quantiles exported, as (label, quantile).
const QUANTILES: [(&str, f64); 5] = [("0.5", 0.5), ("0.9", 0.9), ("0.99", 0.99), ("0.999", 0.999), ("1", 1.0)];

/// Where the per-worker reports come from (the running datapath).
pub type WorkerSource = Box<dyn Fn() -> (Vec<runtime::worker::WorkerReport>, runtime::SteeringStats) + Send + Sync>;

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
            dataplane_sync_failures: Counter::default(),
            kernel_reads: Counter::default(),
            skipped_objects: Gauge::default(),
            service_ports: Gauge::default(),
            api_watch_errors: Gauge::default(),
            worker_packets: Family::default(),
            worker_drops: Family::default(),
            worker_latency: Family::default(),
            worker_frames: Family::default(),
            worker_umems: Family::default(),
            worker_time: Family::default(),
            worker_time_samples: Family::default(),
            worker_events: Family::default(),
            steering_packets: Family::default(),
            workers: Mutex::new(None),
            started: std::time::SystemTime::now(),
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
            "kxp_dataplane_sync_failures",
            "Publishes whose steering map writes failed (retried every second; /healthz fails meanwhile)",
            m.dataplane_sync_failures.clone(),
        );
        registry.register(
            "kxp_kernel_reads",
            "Reads of the kernel's interfaces, routes and neighbours (on its notifications, at most 10 a second after a burst of 5)",
            m.kernel_reads.clone(),
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
        registry.register(
            "kxp_worker_packets",
            "Packets per worker (queue) by direction: rx, tx, passed, dropped",
            m.worker_packets.clone(),
        );
        registry.register(
            "kxp_worker_drops",
            "Packets dropped per worker by reason: the engine's, tx_ring_full, kernel_return, and the kernel's xsk_* counters",
            m.worker_drops.clone(),
        );
        registry.register(
            "kxp_worker_latency_nanoseconds",
            "RX to TX-submit latency quantiles per worker (queue=\"all\": merged), per packet, measured per batch",
            m.worker_latency.clone(),
        );
        registry.register(
            "kxp_worker_frames",
            "UMEM frames per worker by place: free, fill (lent for RX), tx (in flight), held (a batch in hand), total",
            m.worker_frames.clone(),
        );
        registry.register(
            "kxp_worker_events",
            "Per worker: flows created, evicted, moved or reset; rejects, ICMP errors translated, frag-needed sent; VXLAN encap/decap; frames copied between its two UMEMs; TX wakeups (sendto calls)",
            m.worker_events.clone(),
        );
        registry.register(
            "kxp_worker_time_nanoseconds",
            "Per worker, since start, quantiles of where its time goes: part=\"engine\" (process per packet, 1 packet in 64 timed), \"tx_wakeup\" (each sendto: the kernel's delivery work), \"sleep\" (each idle poll)",
            m.worker_time.clone(),
        );
        registry.register(
            "kxp_worker_time_samples",
            "Per worker and part, how many samples kxp_worker_time_nanoseconds is made of",
            m.worker_time_samples.clone(),
        );
        registry.register(
            "kxp_worker_umems",
            "UMEMs per worker: 1, or 2 when pods have their own copy-mode UMEM beside a zero-copy uplink (or kxp.umemLayout: split)",
            m.worker_umems.clone(),
        );
        registry.register(
            "kxp_steering_packets",
            "Frames the XDP program saw, redirected to kxp's sockets (XDP_PASS when none is bound), and passed to the kernel",
            m.steering_packets.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The workers' time histograms as an interval log (`latency_log`);
    /// empty (no worker) without a datapath.
    pub fn latency_hlog(&self) -> Result<Vec<u8>, String> {
        let guard = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        let reports = guard.as_ref().map(|source| source().0).unwrap_or_default();
        crate::latency_log::encode(&reports, self.started)
    }

    pub fn set_worker_source(&self, source: WorkerSource) {
        *self.workers.lock().unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    fn refresh_workers(&self) {
        let guard = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        let Some(source) = guard.as_ref() else {
            return;
        };
        let (reports, steering) = source();
        for (verdict, n) in [
            ("seen", steering.seen),
            ("redirected", steering.redirected),
            ("passed", steering.passed),
        ] {
            let labels = vec![("verdict".to_string(), verdict.to_string())];
            self.steering_packets.get_or_create(&labels).set(n as i64);
        }
        if reports.len() > 1 {
            let all = runtime::datapath::merged_latency(&reports);
            for (name, q) in QUANTILES {
                let labels = vec![
                    ("queue".to_string(), "all".to_string()),
                    ("quantile".to_string(), name.to_string()),
                ];
                self.worker_latency
                    .get_or_create(&labels)
                    .set(all.value_at_quantile(q) as i64);
            }
        }
        for r in reports {
            let q = r.queue.to_string();
            let l = |k: &str, v: &str| vec![("queue".to_string(), q.clone()), (k.to_string(), v.to_string())];
            let st = &r.stats;
            for (dir, n) in [
                ("rx", st.rx_packets),
                ("tx", st.tx_packets),
                ("passed", st.passed),
                ("dropped", st.total_drops()),
            ] {
                self.worker_packets.get_or_create(&l("direction", dir)).set(n as i64);
            }
            for (event, n) in [
                ("new_flows", st.new_flows),
                ("ct_evictions", st.ct_evictions),
                ("flows_rebalanced", st.flows_rebalanced),
                ("flows_reset", st.flows_reset),
                ("rejects", st.rejects),
                ("icmp_translated", st.icmp_translated),
                ("frag_needed", st.frag_needed),
                ("encapsulated", st.encapsulated),
                ("decapsulated", st.decapsulated),
                ("fragments_translated", st.fragments_translated),
                ("fragments_evicted", st.fragments_evicted),
                ("umem_copies", r.runtime.umem_copies),
                ("tx_wakeups", r.runtime.tx_wakeups),
            ] {
                self.worker_events.get_or_create(&l("event", event)).set(n as i64);
            }
            for &reason in dataplane::DropReason::ALL {
                let n = st.drop_count(reason);
                if n > 0 {
                    self.worker_drops
                        .get_or_create(&l("reason", reason.label()))
                        .set(n as i64);
                }
            }
            self.worker_drops
                .get_or_create(&l("reason", "tx_ring_full"))
                .set(r.runtime.tx_ring_full as i64);
            self.worker_drops
                .get_or_create(&l("reason", "kernel_return"))
                .set(r.runtime.kernel_return_dropped as i64);
            self.worker_drops
                .get_or_create(&l("reason", "oversized"))
                .set(r.runtime.oversized as i64);
            self.worker_drops
                .get_or_create(&l("reason", "host_dropped"))
                .set(r.runtime.host_dropped as i64);
            self.worker_drops
                .get_or_create(&l("reason", "umem_copy_no_frame"))
                .set(r.runtime.umem_copy_no_frame as i64);
            self.worker_umems
                .get_or_create(&vec![("queue".to_string(), q.clone())])
                .set(r.umems as i64);
            let k = r.kernel;
            for (reason, n) in [
                ("xsk_rx_dropped", k.rx_dropped),
                ("xsk_rx_ring_full", k.rx_ring_full),
                ("xsk_fill_ring_empty", k.fill_ring_empty),
                ("xsk_invalid_descs", k.invalid_descs),
            ] {
                self.worker_drops.get_or_create(&l("reason", reason)).set(n as i64);
            }
            for (name, q) in QUANTILES {
                self.worker_latency
                    .get_or_create(&l("quantile", name))
                    .set(r.latency.value_at_quantile(q) as i64);
            }
            for (part, h) in r.parts.named() {
                for (name, quantile) in QUANTILES {
                    let labels = vec![
                        ("queue".to_string(), q.clone()),
                        ("part".to_string(), part.to_string()),
                        ("quantile".to_string(), name.to_string()),
                    ];
                    self.worker_time
                        .get_or_create(&labels)
                        .set(h.value_at_quantile(quantile) as i64);
                }
                self.worker_time_samples
                    .get_or_create(&l("part", part))
                    .set(h.len() as i64);
            }
            let f = r.frames;
            for (place, n) in [
                ("free", f.free),
                ("fill", f.in_fill),
                ("tx", f.in_tx),
                ("held", f.held),
                ("total", f.total),
            ] {
                self.worker_frames.get_or_create(&l("place", place)).set(n as i64);
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.refresh_workers();
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }
}
