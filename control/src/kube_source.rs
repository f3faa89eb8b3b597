//! Cluster objects from the Kubernetes API: kube-rs watchers feeding
//! reflector stores, unmodified.
//!
//! The watcher lists, then watches from the list's resourceVersion; on a
//! 410 Expired (inside the watch stream, as a real API server sends it) or a
//! dropped connection it relists, and the store swaps in the new list
//! atomically at `InitDone` — so a relist never shows the sync loop an empty
//! or half-filled view. While the API server is unreachable the stores keep
//! their last content, the tables stay live, and the watcher retries with
//! exponential backoff (counted in `KubeStatus`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::Notify;

use crate::objects::{key_of, ClusterObjects, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME};
use crate::source::Source;

/// kube-proxy's selector for Services and EndpointSlices it must ignore.
pub fn proxy_label_selector() -> String {
    format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}")
}

/// Watch health, for logs, metrics and `/healthz`.
#[derive(Debug, Default)]
pub struct KubeStatus {
    /// Watch errors seen (each one is followed by a backoff and a retry).
    pub errors: AtomicU64,
    /// Set while the last event from every watcher was not an error.
    pub connected: AtomicBool,
}

pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    pub status: Arc<KubeStatus>,
}

impl KubeSource {
    /// Starts the three watchers on `client`; `changed` is poked on every
    /// change to any store.
    pub fn spawn(client: Client, changed: Arc<Notify>) -> Arc<Self> {
        let status = Arc::new(KubeStatus::default());
        let selector = proxy_label_selector();
        let services = watch::<Service>(
            Api::all(client.clone()),
            watcher::Config::default().labels(&selector),
            changed.clone(),
            status.clone(),
        );
        let slices = watch::<EndpointSlice>(
            Api::all(client.clone()),
            watcher::Config::default().labels(&selector),
            changed.clone(),
            status.clone(),
        );
        let nodes = watch::<Node>(Api::all(client), watcher::Config::default(), changed, status.clone());
        Arc::new(KubeSource {
            services,
            slices,
            nodes,
            status,
        })
    }
}

fn watch<K>(api: Api<K>, config: watcher::Config, changed: Arc<Notify>, status: Arc<KubeStatus>) -> Store<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(_) => {
                    status.connected.store(true, Ordering::Relaxed);
                    changed.notify_one();
                }
                Err(e) => {
                    status.errors.fetch_add(1, Ordering::Relaxed);
                    status.connected.store(false, Ordering::Relaxed);
                    tracing::warn!(kind = K::kind(&Default::default()).as_ref(), error = %e, "watch failed; keeping last tables, retrying with backoff");
                }
            }
        }
    });
    store
}

impl Source for KubeSource {
    fn snapshot(&self) -> Result<ClusterObjects, String> {
        if !self.ready() {
            return Err("initial list not complete".into());
        }
        let mut objs = ClusterObjects::default();
        for s in self.services.state() {
            objs.services.insert(key_of(&s.metadata), (*s).clone());
        }
        for s in self.slices.state() {
            objs.endpoint_slices.insert(key_of(&s.metadata), (*s).clone());
        }
        for n in self.nodes.state() {
            objs.nodes
                .insert(n.metadata.name.clone().unwrap_or_default(), (*n).clone());
        }
        Ok(objs)
    }

    fn ready(&self) -> bool {
        store_ready(&self.services) && store_ready(&self.slices) && store_ready(&self.nodes)
    }

    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn errors(&self) -> u64 {
        self.status.errors.load(Ordering::Relaxed)
    }
}

/// A store is ready once its first list is complete.
fn store_ready<K>(s: &Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    futures::FutureExt::now_or_never(s.wait_until_ready()).is_some_and(|r| r.is_ok())
}
