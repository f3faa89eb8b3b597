//! The sync loop: kube-proxy's bounded-frequency runner.
//!
//! A change pokes `changed`; the loop syncs at most once per `min_interval`
//! (so a burst of 1,000 changes becomes a handful of syncs, each exact, as
//! each one compiles the whole current view) and at least once per
//! `full_every` (a periodic full reconcile that repairs anything missed).
//! Defaults follow kube-proxy: minSyncPeriod 1s, syncPeriod 30s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use std::collections::{BTreeMap, HashMap};

use crate::compile::{Compiler, NodeContext};
use crate::health::{unix_now, HealthCheckServers};
use crate::metrics::Metrics;
use crate::objects::{ClusterObjects, ObjectKey};
use crate::source::{Changes, ServiceView, Source};
use crate::sync::{SyncReport, Syncer};

#[derive(Clone, Copy, Debug)]
pub struct SyncPolicy {
    pub min_interval: Duration,
    pub full_every: Duration,
}

impl Default for SyncPolicy {
    fn default() -> Self {
        SyncPolicy {
            min_interval: Duration::from_secs(1),
            full_every: Duration::from_secs(30),
        }
    }
}

/// What the loop has done, for health and metrics.
#[derive(Debug, Default)]
pub struct SyncStatus {
    pub syncs: AtomicU64,
    /// Syncs that compiled only the services that changed.
    pub partial_syncs: AtomicU64,
    pub failed_syncs: AtomicU64,
    /// Service-port changes published, summed over syncs.
    pub service_changes: AtomicU64,
    /// When the last sync that succeeded finished (for `/healthz`).
    pub last_success: Mutex<Option<Instant>>,
    /// The last publish did not reach the dataplane (a steering map write
    /// failed): the maps and the tables disagree until a retry succeeds,
    /// and `/healthz` says so.
    pub dataplane_behind: std::sync::atomic::AtomicBool,
}

/// Runs after each publish with the new tables (the datapath brings its
/// steering maps up to them); an error means they still disagree, and the
/// hook is called again every second until it succeeds.
pub type PublishHook = Box<dyn FnMut(&dataplane::Tables) -> Result<(), String> + Send>;

/// Reads the kernel's facts for the tables (given the live tables, so it
/// can ask the kernel to resolve the next hops they need); `None` when they
/// cannot be read this time.
pub type HostObserver = Box<dyn FnMut(&dataplane::Tables) -> Option<runtime::host::HostFacts> + Send>;

/// The kernel's facts for the sync loop: how to read them, and a poke
/// each time the kernel reports a change (links, addresses, routes,
/// neighbours; see `runtime::netlink::watch`).
pub struct KernelFacts {
    pub observe: HostObserver,
    pub changed: Arc<Notify>,
}

/// How often the loop looks at whether the dataplane is behind (retrying
/// its maps) and whether the backstop read is due.
const TICK: Duration = Duration::from_secs(1);
/// The kernel's facts are re-read on every change it reports, after every
/// publish, and at least this often (a backstop for a lost notification).
const HOST_BACKSTOP: Duration = Duration::from_secs(10);
/// Reads on the kernel's notifications: a pod can make the node's neighbour
/// table churn (ARP with ever-changing addresses), and each read may
/// republish the tables, so they are budgeted: 10 a second, in bursts of 5
/// (a new pod is a few notifications in a row: its link, its route, its
/// neighbour; each is read at once).
const KERNEL_READS: (u32, u32) = (10, 5);

pub struct SyncLoop {
    pub source: Arc<dyn Source>,
    pub syncer: Syncer,
    pub ctx: NodeContext,
    pub policy: SyncPolicy,
    pub changed: Arc<Notify>,
    pub status: Arc<SyncStatus>,
    pub metrics: Arc<Metrics>,
    /// healthCheckNodePort servers; `None` in tests that do not want ports.
    pub health_checks: Option<HealthCheckServers>,
    /// Called with the new tables after every publish (e.g. to refill the
    /// XDP program's maps).
    pub on_publish: Option<PublishHook>,
    /// The kernel's facts; `None` without a datapath.
    pub host: Option<KernelFacts>,
}

impl SyncLoop {
    /// Runs forever (until the task is dropped).
    pub async fn run(mut self) {
        let mut compiler = Compiler::default();
        let mut last_sync: Option<Instant> = None;
        let mut last_full: Option<Instant> = None;
        let mut triggers: HashMap<ObjectKey, String> = HashMap::new();
        let mut health_ports: BTreeMap<String, u16> = BTreeMap::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The kernel's facts before the first sync: once healthy, kxp knows
        // its ports, pods and next hops.
        tick.tick().await;
        self.refresh_host();
        let mut host_read = Instant::now();
        let kernel_changed = self.host.as_ref().map(|h| h.changed.clone());
        // A kernel notification seen and not yet read, and when its read may
        // next be tried (the budget's clock is this loop's).
        let mut host_due = false;
        let mut try_read_at = Instant::now();
        let mut read_budget = dataplane::engine::TokenBucket::default();
        let clock = Instant::now();
        loop {
            let next_full = last_full.map_or(Duration::ZERO, |t| self.policy.full_every.saturating_sub(t.elapsed()));
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(next_full) => {}
                _ = async { kernel_changed.as_ref().expect("guarded").notified().await },
                    if kernel_changed.is_some() && !host_due => {
                    host_due = true;
                    try_read_at = Instant::now();
                    continue;
                }
                _ = tokio::time::sleep_until(try_read_at.into()), if host_due => {
                    let now = dataplane::Time(clock.elapsed().as_nanos() as u64);
                    if read_budget.take(now, KERNEL_READS) {
                        host_due = false;
                        self.refresh_host();
                        host_read = Instant::now();
                    } else {
                        try_read_at = Instant::now() + Duration::from_secs(1) / KERNEL_READS.0;
                    }
                    continue;
                }
                _ = tick.tick(), if self.host.is_some() || self.dataplane_behind() => {
                    if host_read.elapsed() >= HOST_BACKSTOP {
                        self.refresh_host();
                        host_read = Instant::now();
                    }
                    if self.dataplane_behind() {
                        self.publish_to_dataplane();
                    }
                    continue;
                }
            }
            if let Some(t) = last_sync {
                let since = t.elapsed();
                if since < self.policy.min_interval {
                    tokio::time::sleep(self.policy.min_interval - since).await;
                }
            }
            if !self.source.ready() {
                continue;
            }
            let started = Instant::now();
            // Always take the changes (this resets them); a due periodic
            // reconcile turns any sync into a full one.
            let changes = self.source.take_changes();
            let full_due = last_full.is_none_or(|t| t.elapsed() >= self.policy.full_every);
            let result = match changes {
                Changes::Services(views) if !full_due => {
                    Ok(self.sync_services(&mut compiler, views, &mut triggers, &mut health_ports, started))
                }
                _ => match self.source.snapshot() {
                    Ok(objs) => {
                        last_full = Some(Instant::now());
                        Ok(self.sync_full(&mut compiler, &objs, &mut triggers, &mut health_ports, started))
                    }
                    Err(reason) => Err(reason),
                },
            };
            match result {
                Ok((report, kind)) => {
                    if report.published.is_some() {
                        self.publish_to_dataplane();
                    }
                    if report.published.is_some() {
                        // New remote nodes need their next hops resolved now.
                        self.refresh_host();
                    }
                    if let Some(hc) = self.health_checks.as_mut() {
                        let want = health_check_wants(
                            &health_ports,
                            self.syncer.live(),
                            &self.syncer.publisher().reader().load(),
                        );
                        for e in hc.update(want).await {
                            tracing::warn!(error = %e, "healthCheckNodePort not served");
                        }
                    }
                    for p in &report.problems {
                        tracing::warn!(object = %p.object, reason = %p.reason, "skipped");
                    }
                    self.status
                        .service_changes
                        .fetch_add(report.changes() as u64, Ordering::Relaxed);
                    *self.status.last_success.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                    tracing::info!(
                        source = self.source.name(),
                        kind,
                        added = report.added,
                        updated = report.updated,
                        removed = report.removed,
                        published = ?report.published,
                        "synced"
                    );
                }
                Err(reason) => {
                    self.status.failed_syncs.fetch_add(1, Ordering::Relaxed);
                    self.metrics.sync_failures.inc();
                    tracing::warn!(source = self.source.name(), %reason, "source unusable; keeping the live tables");
                }
            }
            self.metrics.api_watch_errors.set(self.source.errors() as i64);
            self.status.syncs.fetch_add(1, Ordering::Relaxed);
            last_sync = Some(Instant::now());
        }
    }

    fn refresh_host(&mut self) {
        let Some(host) = self.host.as_mut() else {
            return;
        };
        self.metrics.kernel_reads.inc();
        let Some(facts) = (host.observe)(&self.syncer.publisher().reader().load()) else {
            return;
        };
        if self.syncer.apply_host(facts).is_some() {
            self.publish_to_dataplane();
        }
    }

    fn dataplane_behind(&self) -> bool {
        self.status.dataplane_behind.load(Ordering::Relaxed)
    }

    /// Runs the publish hook on the live tables; records whether the
    /// dataplane caught up.
    fn publish_to_dataplane(&mut self) {
        let Some(hook) = self.on_publish.as_mut() else {
            return;
        };
        let behind = match hook(&self.syncer.publisher().reader().load()) {
            Ok(()) => false,
            Err(e) => {
                self.metrics.dataplane_sync_failures.inc();
                tracing::error!(error = %e, "the dataplane did not take the published tables; retrying every second");
                true
            }
        };
        self.status.dataplane_behind.store(behind, Ordering::Relaxed);
    }

    /// Compiles the whole view (cached per service) and diffs everything.
    fn sync_full(
        &mut self,
        compiler: &mut Compiler,
        objs: &ClusterObjects,
        triggers: &mut HashMap<ObjectKey, String>,
        health_ports: &mut BTreeMap<String, u16>,
        started: Instant,
    ) -> (SyncReport, &'static str) {
        let desired = compiler.compile(objs, &self.ctx);
        *health_ports = desired.health_check_node_ports.clone();
        let report = self.syncer.apply(desired);
        let m = &self.metrics;
        m.skipped_objects.set(report.problems.len() as i64);
        let live = self.syncer.live();
        let tables = self.syncer.publisher().reader().load();
        let no_local = |f: &dyn Fn(&dataplane::tables::ServiceSpec) -> bool| {
            live.values().filter(|s| f(s) && local_usable(&tables, s) == 0).count() as i64
        };
        let labels = |p: &str| vec![("traffic_policy".to_string(), p.to_string())];
        m.no_local_endpoints
            .get_or_create(&labels("internal"))
            .set(no_local(&|s| s.internal_local));
        m.no_local_endpoints
            .get_or_create(&labels("external"))
            .set(no_local(&|s| s.external_local));
        record_triggers(m, triggers, objs.endpoint_slices.iter());
        triggers.retain(|k, _| objs.endpoint_slices.contains_key(k));
        self.record_common(started, report.changes());
        (report, "full")
    }

    /// Compiles and applies only the services that changed.
    fn sync_services(
        &mut self,
        compiler: &mut Compiler,
        views: Vec<ServiceView>,
        triggers: &mut HashMap<ObjectKey, String>,
        health_ports: &mut BTreeMap<String, u16>,
        started: Instant,
    ) -> (SyncReport, &'static str) {
        let mut problems = Vec::new();
        let mut updates = Vec::with_capacity(views.len());
        for view in &views {
            let out = compiler.compile_one(view, &self.ctx);
            let prefix = format!("{}:", view.key);
            health_ports.retain(|name, _| !name.starts_with(&prefix));
            if let Some(h) = out.health_check {
                for p in &out.ports {
                    health_ports.insert(p.name.clone(), h);
                }
            }
            problems.extend(out.problems);
            updates.push((view.key.clone(), out.ports));
        }
        let mut report = self.syncer.apply_services(updates);
        problems.append(&mut report.problems);
        report.problems = problems;
        record_triggers(
            &self.metrics,
            triggers,
            views.iter().flat_map(|v| v.slices.iter().map(|(k, s)| (k, s))),
        );
        self.record_common(started, report.changes());
        self.status.partial_syncs.fetch_add(1, Ordering::Relaxed);
        (report, "partial")
    }

    fn record_common(&self, started: Instant, changes: usize) {
        let m = &self.metrics;
        m.sync_duration.observe(started.elapsed().as_secs_f64());
        m.last_sync_timestamp.set(unix_now(Instant::now()));
        m.service_changes.inc_by(changes as u64);
        m.service_ports.set(self.syncer.live().len() as i64);
    }
}

/// Network programming latency: from each new endpoint-change trigger time
/// (set by the EndpointSlice controller) to now, tables live.
fn record_triggers<'a>(
    m: &Metrics,
    triggers: &mut HashMap<ObjectKey, String>,
    slices: impl Iterator<Item = (&'a ObjectKey, &'a k8s_openapi::api::discovery::v1::EndpointSlice)>,
) {
    let now = jiff::Timestamp::now();
    for (key, slice) in slices {
        let Some(t) = slice.metadata.annotations.as_ref().and_then(|a| a.get(TRIGGER_TIME)) else {
            continue;
        };
        if triggers.get(key) == Some(t) {
            continue;
        }
        triggers.insert(key.clone(), t.clone());
        if let Ok(at) = t.parse::<jiff::Timestamp>() {
            let secs = now.duration_since(at).as_secs_f64();
            if secs >= 0.0 {
                m.network_programming_duration.observe(secs);
            }
        }
    }
}

/// Annotation the EndpointSlice controller sets to when the change began.
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Usable local endpoints of a live service port, by the dataplane's own
/// rule (ready ones, else serving-and-terminating ones).
fn local_usable(t: &dataplane::Tables, s: &dataplane::tables::ServiceSpec) -> usize {
    t.service(s.id).map_or(0, |svc| svc.local_usable())
}

fn health_check_wants(
    ports: &BTreeMap<String, u16>,
    live: &BTreeMap<String, Arc<dataplane::tables::ServiceSpec>>,
    tables: &dataplane::Tables,
) -> BTreeMap<u16, (String, usize)> {
    let mut want: BTreeMap<u16, (String, usize)> = BTreeMap::new();
    for (name, port) in ports {
        let Some(spec) = live.get(name) else { continue };
        // Several ports of one service share its healthCheckNodePort.
        let e = want.entry(*port).or_insert_with(|| (name.clone(), 0));
        e.1 = e.1.max(local_usable(tables, spec));
    }
    want
}
