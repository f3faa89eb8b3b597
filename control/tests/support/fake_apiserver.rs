//! A fake Kubernetes API server that speaks the real list/watch protocol
//! for Services, EndpointSlices and Nodes, so kube-rs's watcher runs
//! unmodified against it:
//!
//! - list: `{kind: XList, metadata: {resourceVersion}, items}`;
//! - `watch=true&resourceVersion=R`: a 200 response streaming one JSON
//!   event per line (ADDED / MODIFIED / DELETED) for changes after R,
//!   BOOKMARKs when `allowWatchBookmarks=true`, ending after
//!   `timeoutSeconds`;
//! - a watch from a compacted R gets `410 Expired` as an ERROR event inside
//!   the 200 stream, exactly as a real API server sends it;
//! - `labelSelector` with `!key`, `key` and `key=value` terms.
//!
//! The server can be stopped and started again on the same address.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Res {
    Services,
    EndpointSlices,
    Nodes,
}

impl Res {
    fn api_version(self) -> &'static str {
        match self {
            Res::EndpointSlices => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Res::Services => "Service",
            Res::EndpointSlices => "EndpointSlice",
            Res::Nodes => "Node",
        }
    }
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Expired.
    compacted: u64,
    objects: HashMap<Res, BTreeMap<(String, String), Value>>,
    /// (rv, resource, type, object)
    events: Vec<(u64, Res, &'static str, Value)>,
    requests: u64,
}

#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    events: broadcast::Sender<()>,
    /// Bumped to end every open watch stream (compaction, stop).
    epoch: watch::Sender<u64>,
    /// Set while stopped: requests still in flight on old connections get 503.
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

pub struct FakeApiServer {
    pub addr: SocketAddr,
    shared: Shared,
    running: Option<(tokio::task::JoinHandle<()>, watch::Sender<bool>)>,
}

impl FakeApiServer {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Shared {
            store: Arc::new(Mutex::new(Store::default())),
            events: broadcast::channel(4096).0,
            epoch: watch::channel(0).0,
            stopped: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let mut s = FakeApiServer {
            addr,
            shared,
            running: None,
        };
        s.serve(listener);
        s
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .route("/api/v1/services", get(|s, q| handle(s, q, Res::Services)))
            .route(
                "/apis/discovery.k8s.io/v1/endpointslices",
                get(|s, q| handle(s, q, Res::EndpointSlices)),
            )
            .route("/api/v1/nodes", get(|s, q| handle(s, q, Res::Nodes)))
            .with_state(self.shared.clone());
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
                .await;
        });
        self.running = Some((task, stop_tx));
    }

    /// Stops answering: open watches end, the port closes.
    pub async fn stop(&mut self) {
        if let Some((task, stop)) = self.running.take() {
            self.shared.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = stop.send(true);
            self.shared.epoch.send_modify(|e| *e += 1);
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    /// Starts again on the same address, with the same objects.
    pub async fn restart(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.shared.stopped.store(false, std::sync::atomic::Ordering::SeqCst);
        self.serve(listener);
    }

    /// Creates or replaces an object (ADDED / MODIFIED).
    pub fn apply(&self, res: Res, mut obj: Value) {
        let mut st = self.shared.store.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or("").to_string();
        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        obj["apiVersion"] = json!(res.api_version());
        obj["kind"] = json!(res.kind());
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let map = st.objects.entry(res).or_default();
        let kind = if map.insert((ns, name), obj.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.events.push((rv, res, kind, obj));
        drop(st);
        let _ = self.shared.events.send(());
    }

    pub fn delete(&self, res: Res, ns: &str, name: &str) {
        let mut st = self.shared.store.lock().unwrap();
        let Some(mut obj) = st
            .objects
            .entry(res)
            .or_default()
            .remove(&(ns.to_string(), name.to_string()))
        else {
            return;
        };
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.events.push((rv, res, "DELETED", obj));
        drop(st);
        let _ = self.shared.events.send(());
    }

    /// Forgets the event history, like etcd compaction, and ends open
    /// watches: every client must relist (it gets 410 Expired on re-watch).
    pub fn compact(&self) {
        let mut st = self.shared.store.lock().unwrap();
        st.rv += 1;
        st.compacted = st.rv;
        st.events.clear();
        drop(st);
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    /// Requests served so far (lists + watches).
    pub fn requests(&self) -> u64 {
        self.shared.store.lock().unwrap().requests
    }
}

fn matches_selector(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = obj["metadata"]["labels"].as_object();
    sel.split(',').all(|term| {
        let term = term.trim();
        if let Some(k) = term.strip_prefix('!') {
            labels.is_none_or(|l| !l.contains_key(k))
        } else if let Some((k, v)) = term.split_once('=') {
            labels
                .and_then(|l| l.get(k.trim_end_matches('=')))
                .and_then(|x| x.as_str())
                == Some(v)
        } else {
            labels.is_some_and(|l| l.contains_key(term))
        }
    })
}

async fn handle(State(s): State<Shared>, Query(q): Query<HashMap<String, String>>, res: Res) -> Response {
    if s.stopped.load(std::sync::atomic::Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    s.store.lock().unwrap().requests += 1;
    if std::env::var_os("FAKE_API_DEBUG").is_some() {
        eprintln!("fake-apiserver: {res:?} {q:?}");
    }
    let selector = q.get("labelSelector");
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    if !watching {
        let st = s.store.lock().unwrap();
        let items: Vec<Value> = st
            .objects
            .get(&res)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|o| matches_selector(o, selector))
            .cloned()
            .collect();
        let body = json!({
            "apiVersion": res.api_version(),
            "kind": format!("{}List", res.kind()),
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        });
        return (StatusCode::OK, axum::Json(body)).into_response();
    }
    let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let timeout = Duration::from_secs(q.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(60));
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let selector = selector.cloned();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    let mut events = s.events.subscribe();
    let mut epoch = s.epoch.subscribe();
    epoch.mark_unchanged();
    let store = s.store.clone();
    tokio::spawn(async move {
        let line = |v: Value| Bytes::from(format!("{v}\n"));
        let expired = {
            let st = store.lock().unwrap();
            from < st.compacted
        };
        if expired {
            let status = json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410}});
            let _ = tx.send(line(status)).await;
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut sent = from;
        loop {
            // A compaction or stop ends the stream before anything newer is sent.
            if epoch.has_changed().unwrap_or(true) {
                return;
            }
            let batch: Vec<(u64, Value)> = {
                let st = store.lock().unwrap();
                st.events
                    .iter()
                    .filter(|(rv, r, _, o)| *rv > sent && *r == res && matches_selector(o, selector.as_ref()))
                    .map(|(rv, _, t, o)| (*rv, json!({"type": t, "object": o})))
                    .collect()
            };
            for (rv, ev) in batch {
                if tx.send(line(ev)).await.is_err() {
                    return;
                }
                sent = rv;
            }
            tokio::select! {
                biased;
                _ = epoch.changed() => return,
                _ = events.recv() => {}
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tokio::time::sleep(Duration::from_millis(200)), if bookmarks => {
                    // Never bookmark past an event of ours not yet sent.
                    let rv = {
                        let st = store.lock().unwrap();
                        let unsent = st.events.iter().filter(|(rv, r, _, _)| *rv > sent && *r == res).map(|e| e.0).min();
                        unsent.map_or(st.rv, |u| u - 1)
                    };
                    let bm = json!({"type": "BOOKMARK", "object": {
                        "kind": res.kind(), "apiVersion": res.api_version(),
                        "metadata": {"resourceVersion": rv.to_string()}}});
                    if tx.send(line(bm)).await.is_err() {
                        return;
                    }
                    sent = sent.max(rv);
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}
