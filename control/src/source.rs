//! Where cluster objects come from. A source keeps its own view current and
//! pokes `changed` whenever that view moves; the sync loop then takes a
//! consistent `snapshot()`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::manifests::{self, ManifestError};
use crate::objects::{ClusterObjects, ObjectKey};

/// One service and the EndpointSlices that belong to it: all a service's
/// compilation reads. `service: None` means it was deleted.
#[derive(Clone, Debug)]
pub struct ServiceView {
    pub key: ObjectKey,
    pub service: Option<Service>,
    pub slices: Vec<(ObjectKey, EndpointSlice)>,
}

/// What changed since the last `take_changes`.
#[derive(Debug)]
pub enum Changes {
    /// Unknown or wide change (first sync, relist, nodes, manifests): compile everything.
    Full,
    /// Only these services (or their slices) changed.
    Services(Vec<ServiceView>),
}

pub trait Source: Send + Sync + 'static {
    /// The current view, or why there is none usable right now (in which
    /// case the live tables stay as they are).
    fn snapshot(&self) -> Result<ClusterObjects, String>;
    /// False until the first complete view is in (no sync before that: an
    /// empty view would wipe every service).
    fn ready(&self) -> bool;
    /// Short name for logs and metrics.
    fn name(&self) -> &'static str;
    /// Errors talking to the source so far (each followed by a retry).
    fn errors(&self) -> u64 {
        0
    }
    /// What changed since the last call. Sources that cannot tell say `Full`.
    fn take_changes(&self) -> Changes {
        Changes::Full
    }
}

/// Manifests in a directory, reloaded when any file in it changes.
pub struct ManifestSource {
    dir: PathBuf,
}

impl ManifestSource {
    /// Also spawns a poller that pokes `changed` when the directory's files
    /// change (mtime, size or set of names), checked every `every`.
    pub fn spawn(dir: PathBuf, changed: Arc<Notify>, every: Duration) -> Arc<Self> {
        let src = Arc::new(ManifestSource { dir: dir.clone() });
        tokio::spawn(async move {
            let mut last = fingerprint(&dir);
            loop {
                tokio::time::sleep(every).await;
                let now = fingerprint(&dir);
                if now != last {
                    last = now;
                    changed.notify_one();
                }
            }
        });
        src
    }
}

fn fingerprint(dir: &PathBuf) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok().map(|m| (e.path(), m.len(), m.modified().ok())))
        .collect();
    v.sort();
    v
}

impl Source for ManifestSource {
    fn snapshot(&self) -> Result<ClusterObjects, String> {
        manifests::load_dir(&self.dir).map_err(|e: ManifestError| e.to_string())
    }

    fn ready(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "manifests"
    }
}
