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

use crate::compile::{compile, NodeContext, Problem, ServiceIds};
use crate::source::Source;
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
    pub failed_syncs: AtomicU64,
    /// Service-port changes published, summed over syncs.
    pub service_changes: AtomicU64,
    pub last: Mutex<Option<SyncOutcome>>,
}

#[derive(Clone, Debug)]
pub struct SyncOutcome {
    pub at: Instant,
    pub duration: Duration,
    /// `Err` when the source had no usable view (tables kept).
    pub result: Result<(usize, Option<u64>), String>,
    pub problems: Vec<Problem>,
    /// When the last sync that succeeded finished.
    pub last_success: Option<Instant>,
}

pub struct SyncLoop {
    pub source: Arc<dyn Source>,
    pub syncer: Syncer,
    pub ctx: NodeContext,
    pub policy: SyncPolicy,
    pub changed: Arc<Notify>,
    pub status: Arc<SyncStatus>,
}

impl SyncLoop {
    /// Runs forever (until the task is dropped).
    pub async fn run(mut self) {
        let mut ids = ServiceIds::default();
        let mut last_success = None;
        let mut last_sync: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(self.policy.full_every) => {}
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
            let outcome = match self.source.snapshot() {
                Ok(objs) => {
                    let desired = compile(&objs, &self.ctx, &mut ids);
                    let SyncReport {
                        added,
                        updated,
                        removed,
                        problems,
                        published,
                    } = self.syncer.apply(desired);
                    for p in &problems {
                        tracing::warn!(object = %p.object, reason = %p.reason, "skipped");
                    }
                    let changes = added + updated + removed;
                    self.status.service_changes.fetch_add(changes as u64, Ordering::Relaxed);
                    last_success = Some(Instant::now());
                    tracing::info!(
                        source = self.source.name(),
                        added,
                        updated,
                        removed,
                        ?published,
                        "synced"
                    );
                    SyncOutcome {
                        at: started,
                        duration: started.elapsed(),
                        result: Ok((changes, published)),
                        problems,
                        last_success,
                    }
                }
                Err(reason) => {
                    self.status.failed_syncs.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(source = self.source.name(), %reason, "source unusable; keeping the live tables");
                    SyncOutcome {
                        at: started,
                        duration: started.elapsed(),
                        result: Err(reason),
                        problems: vec![],
                        last_success,
                    }
                }
            };
            self.status.syncs.fetch_add(1, Ordering::Relaxed);
            *self.status.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
            last_sync = Some(Instant::now());
        }
    }
}
