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

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::Notify;

use crate::objects::{key_of, ClusterObjects, ObjectKey, LABEL_HEADLESS, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME};
use crate::source::{Changes, ServiceView, Source};

/// kube-proxy's selector for Services and EndpointSlices it must ignore.
pub fn proxy_label_selector() -> String {
    format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}")
}

/// Watch health, for logs, metrics and `/healthz`.
#[derive(Debug, Default)]
pub struct KubeStatus {
    /// Watch errors seen (each one is followed by a backoff and a retry).
    pub errors: AtomicU64,
}

pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    pub status: Arc<KubeStatus>,
    dirty: Arc<Mutex<Dirty>>,
    /// Service -> its EndpointSlices, kept from watch events.
    slice_index: Arc<Mutex<SliceIndex>>,
}

type SliceIndex = HashMap<ObjectKey, BTreeSet<ObjectKey>>;

/// What changed since the last sync.
struct Dirty {
    /// A relist or a node change: compile everything.
    full: bool,
    services: BTreeSet<ObjectKey>,
}

/// The service an EndpointSlice belongs to.
fn owner(s: &EndpointSlice) -> Option<ObjectKey> {
    let name = s.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    Some(ObjectKey {
        namespace: key_of(&s.metadata).namespace,
        name: name.clone(),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl KubeSource {
    /// Starts the three watchers on `client`; `changed` is poked on every
    /// change to any store.
    pub fn spawn(client: Client, changed: Arc<Notify>) -> Arc<Self> {
        let status = Arc::new(KubeStatus::default());
        let dirty = Arc::new(Mutex::new(Dirty {
            full: true,
            services: BTreeSet::new(),
        }));
        let slice_index: Arc<Mutex<SliceIndex>> = Arc::default();
        let selector = proxy_label_selector();
        let d = dirty.clone();
        let services = watch::<Service>(
            Api::all(client.clone()),
            watcher::Config::default().labels(&selector),
            changed.clone(),
            status.clone(),
            move |ev| match ev {
                watcher::Event::Apply(s) | watcher::Event::Delete(s) => {
                    lock(&d).services.insert(key_of(&s.metadata));
                }
                watcher::Event::InitDone => lock(&d).full = true,
                _ => {}
            },
        );
        let (d, idx) = (dirty.clone(), slice_index.clone());
        let slices = watch::<EndpointSlice>(
            Api::all(client.clone()),
            watcher::Config::default().labels(&selector),
            changed.clone(),
            status.clone(),
            move |ev| match ev {
                watcher::Event::Apply(s) => {
                    if let Some(svc) = owner(s) {
                        lock(&idx).entry(svc.clone()).or_default().insert(key_of(&s.metadata));
                        lock(&d).services.insert(svc);
                    }
                }
                watcher::Event::Delete(s) => {
                    if let Some(svc) = owner(s) {
                        if let Some(set) = lock(&idx).get_mut(&svc) {
                            set.remove(&key_of(&s.metadata));
                        }
                        lock(&d).services.insert(svc);
                    }
                }
                watcher::Event::InitDone => lock(&d).full = true,
                _ => {}
            },
        );
        let d = dirty.clone();
        let nodes = watch::<Node>(
            Api::all(client),
            watcher::Config::default(),
            changed,
            status.clone(),
            move |ev| {
                if !matches!(ev, watcher::Event::Init | watcher::Event::InitApply(_)) {
                    lock(&d).full = true;
                }
            },
        );
        Arc::new(KubeSource {
            services,
            slices,
            nodes,
            status,
            dirty,
            slice_index,
        })
    }
}

fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
    status: Arc<KubeStatus>,
    on_event: impl Fn(&watcher::Event<K>) + Send + 'static,
) -> Store<K>
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
                Ok(ev) => {
                    // The reflector has already applied the event to the store.
                    on_event(&ev);
                    changed.notify_one();
                }
                Err(e) => {
                    status.errors.fetch_add(1, Ordering::Relaxed);
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

    fn take_changes(&self) -> Changes {
        let keys = {
            let mut d = lock(&self.dirty);
            if d.full {
                d.full = false;
                d.services.clear();
                drop(d);
                self.rebuild_index();
                return Changes::Full;
            }
            std::mem::take(&mut d.services)
        };
        let idx = lock(&self.slice_index);
        let views = keys
            .into_iter()
            .map(|key| {
                let service = self
                    .services
                    .get(&ObjectRef::new(&key.name).within(&key.namespace))
                    .map(|s| (*s).clone());
                let slices = idx
                    .get(&key)
                    .into_iter()
                    .flatten()
                    .filter_map(|sk| {
                        let s = self.slices.get(&ObjectRef::new(&sk.name).within(&sk.namespace))?;
                        Some((sk.clone(), (*s).clone()))
                    })
                    .collect();
                ServiceView { key, service, slices }
            })
            .collect();
        Changes::Services(views)
    }
}

impl KubeSource {
    /// After a relist the store was replaced wholesale: rebuild the index.
    fn rebuild_index(&self) {
        let mut idx = SliceIndex::new();
        for s in self.slices.state() {
            if let Some(svc) = owner(&s) {
                idx.entry(svc).or_default().insert(key_of(&s.metadata));
            }
        }
        *lock(&self.slice_index) = idx;
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
