//! Serving kxp's HTTP endpoints (health, metrics, healthCheckNodePorts) so
//! that no client can hold them.
//!
//! `/healthz` and the healthCheckNodePorts listen on every node address and
//! decide whether load balancers and the kubelet keep the node: a client
//! that opens connections and never finishes a request (slowloris) must
//! neither starve them nor use up kxp's file descriptors, which new pods'
//! AF_XDP sockets also need. So every connection gets:
//! - a deadline for its request headers (`header_read_timeout`, also
//!   between requests on a kept-alive connection);
//! - a lifetime: a probe or a scrape takes milliseconds, nothing needs a
//!   connection for a minute;
//! - a bounded request size (hyper's read buffer);
//! - a cap on connections per server: when it is reached the *oldest*
//!   connection is closed to make room, so a newcomer (the kubelet's next
//!   probe) is always served and a flood of idle connections only evicts
//!   itself.
//!
//! Rejected: `axum::serve`, which has none of these knobs; a semaphore that
//! makes newcomers wait, which lets idle connections starve the probes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinHandle};

/// What one server allows each client.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time to send a request's headers.
    pub header_timeout: Duration,
    /// Longest a connection lives, whatever it does.
    pub lifetime: Duration,
    /// Most connections open at once; the oldest is closed beyond it.
    pub max_connections: usize,
    /// Largest request head, in bytes (hyper's minimum is 8 KiB).
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(5),
            lifetime: Duration::from_secs(60),
            max_connections: 128,
            max_request_bytes: 16 * 1024,
        }
    }
}

type Live = Arc<Mutex<BTreeMap<u64, AbortHandle>>>;

/// Removes a connection from the live set when its task ends.
struct Forget(Live, u64);

impl Drop for Forget {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
    }
}

/// Serves `app` on `listener` within `limits` until the task is aborted.
pub fn serve(listener: TcpListener, app: Router, limits: Limits) -> JoinHandle<()> {
    tokio::spawn(async move {
        let live: Live = Arc::default();
        let mut next_id = 0u64;
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before
                    // accept: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let id = next_id;
            next_id += 1;
            // Held until the new connection is recorded, so its task cannot
            // forget it before it is remembered.
            let mut conns = live.lock().unwrap_or_else(|e| e.into_inner());
            while conns.len() >= limits.max_connections.max(1) {
                if let Some((_, oldest)) = conns.pop_first() {
                    oldest.abort();
                }
            }
            let service = TowerToHyperService::new(app.clone());
            let forget = Forget(live.clone(), id);
            let task = tokio::spawn(async move {
                let _forget = forget;
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_timeout)
                    .max_buf_size(limits.max_request_bytes.max(8192))
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(limits.lifetime, conn).await;
            });
            conns.insert(id, task.abort_handle());
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn server(limits: Limits) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        serve(l, Router::new().route("/healthz", get(|| async { "ok" })), limits);
        addr
    }

    async fn get_healthz(addr: std::net::SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .expect("the server answered in time")
            .unwrap();
        out
    }

    /// Reads until the peer closes; true when it closed within `within`.
    async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 1024];
        matches!(
            tokio::time::timeout(within, async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await,
            Ok(())
        )
    }

    #[tokio::test]
    async fn slow_clients_cannot_starve_healthz() {
        let limits = Limits {
            header_timeout: Duration::from_millis(500),
            max_connections: 32,
            ..Limits::default()
        };
        let addr = server(limits).await;
        // 200 slowloris connections: half send nothing, half a partial header.
        let mut slow = Vec::new();
        for i in 0..200 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            if i % 2 == 0 {
                s.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ").await.unwrap();
            }
            slow.push(s);
        }
        let answer = get_healthz(addr).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // Every slow connection is closed: evicted by newer ones, or at the
        // header deadline.
        for s in slow.iter_mut() {
            assert!(
                closed_within(s, Duration::from_secs(3)).await,
                "a slow client kept its connection"
            );
        }
    }

    #[tokio::test]
    async fn oversized_requests_are_refused() {
        let addr = server(Limits::default()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let big = format!("GET /healthz HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
        let _ = s.write_all(big.as_bytes()).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("200 OK"), "{text}");
        assert!(get_healthz(addr).await.starts_with("HTTP/1.1 200"));
    }
}
