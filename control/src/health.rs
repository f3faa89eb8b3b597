//! HTTP endpoints: `/healthz` and `/livez` (kube-proxy's port 10256),
//! `/metrics` (10249), and one `healthCheckNodePort` server per
//! `externalTrafficPolicy: Local` service, answering 200 with the local
//! endpoint count, or 503 when there is none, so load balancers only send
//! to nodes that can serve. All are served within `http::Limits`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::http::{self, Limits};
use crate::metrics::Metrics;
use crate::runner::SyncStatus;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for {what}: {source}; free the port or set {setting}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub what: &'static str,
    pub setting: &'static str,
    pub source: std::io::Error,
}

pub async fn listen(
    addr: SocketAddr,
    what: &'static str,
    setting: &'static str,
) -> Result<tokio::net::TcpListener, BindError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| BindError {
        addr,
        what,
        setting,
        source,
    })
}

#[derive(Clone)]
struct HealthState {
    status: Arc<SyncStatus>,
    /// Unhealthy when no sync has succeeded for this long.
    stale_after: Duration,
}

/// `/healthz` and `/livez`: 200 while syncs keep succeeding, 503 before the
/// first one, when the last success is older than `stale_after`, and while
/// the dataplane has not taken the published tables.
pub fn serve_healthz(
    listener: tokio::net::TcpListener,
    status: Arc<SyncStatus>,
    stale_after: Duration,
) -> JoinHandle<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .with_state(HealthState { status, stale_after });
    http::serve(listener, app, Limits::default())
}

async fn healthz(State(h): State<HealthState>) -> impl IntoResponse {
    let last = *h.status.last_success.lock().unwrap_or_else(|e| e.into_inner());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let (mut code, last_updated) = match last {
        Some(t) if t.elapsed() <= h.stale_after => (StatusCode::OK, now - t.elapsed().as_secs_f64()),
        Some(t) => (StatusCode::SERVICE_UNAVAILABLE, now - t.elapsed().as_secs_f64()),
        None => (StatusCode::SERVICE_UNAVAILABLE, 0.0),
    };
    // Tables published but not in the steering maps: traffic may be lost.
    let in_sync = !h.status.dataplane_behind.load(std::sync::atomic::Ordering::Relaxed);
    if !in_sync {
        code = StatusCode::SERVICE_UNAVAILABLE;
    }
    (
        code,
        axum::Json(json!({
            "lastUpdated": last_updated,
            "currentTime": now,
            "nodeEligible": true,
            "dataplaneInSync": in_sync,
        })),
    )
}

pub fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) -> JoinHandle<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render())
            }),
        )
        .route(
            "/latency.hlog",
            get(|State(m): State<Arc<Metrics>>| async move {
                match m.latency_hlog() {
                    Ok(log) => (StatusCode::OK, log),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.into_bytes()),
                }
            }),
        );
    http::serve(listener, app.with_state(metrics), Limits::default())
}

/// What one healthCheckNodePort reports: service port name, local endpoints.
type CheckState = Arc<Mutex<(String, usize)>>;

/// One HTTP server per healthCheckNodePort, opened and closed as services
/// come and go.
#[derive(Default)]
pub struct HealthCheckServers {
    servers: BTreeMap<u16, (CheckState, JoinHandle<()>)>,
    /// Where to listen (port replaced per service); 0.0.0.0 by default.
    pub bind_ip: Option<std::net::IpAddr>,
}

impl HealthCheckServers {
    /// `want`: port -> (service name, usable local endpoints).
    pub async fn update(&mut self, want: BTreeMap<u16, (String, usize)>) -> Vec<BindError> {
        let mut errors = Vec::new();
        let gone: Vec<u16> = self.servers.keys().filter(|p| !want.contains_key(p)).copied().collect();
        for p in gone {
            if let Some((_, task)) = self.servers.remove(&p) {
                task.abort();
            }
        }
        for (port, info) in want {
            if let Some((state, _)) = self.servers.get(&port) {
                *state.lock().unwrap_or_else(|e| e.into_inner()) = info;
                continue;
            }
            let ip = self.bind_ip.unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
            match listen(
                SocketAddr::new(ip, port),
                "a healthCheckNodePort",
                "the service's healthCheckNodePort",
            )
            .await
            {
                Ok(l) => {
                    let state = Arc::new(Mutex::new(info));
                    let app = Router::new().fallback(get(health_check)).with_state(state.clone());
                    let task = http::serve(l, app, Limits::default());
                    self.servers.insert(port, (state, task));
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }
}

async fn health_check(State(s): State<CheckState>) -> impl IntoResponse {
    let (name, local) = s.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (ns, svc) = name.split_once('/').unwrap_or(("", &name));
    let svc = svc.split(':').next().unwrap_or(svc);
    let code = if local > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        axum::Json(json!({"service": {"namespace": ns, "name": svc}, "localEndpoints": local})),
    )
}

/// Seconds since the epoch, for the last-sync gauge.
pub fn unix_now(at: Instant) -> f64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (now.saturating_sub(at.elapsed())).as_secs_f64()
}
