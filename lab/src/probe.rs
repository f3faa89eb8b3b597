//! Small TCP probes for tests: a listener inside a namespace that greets
//! each connection with its own name and remembers who connected (so a
//! test sees which backend answered and which source address it saw), and
//! a connect from inside a namespace that returns the greeting.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::LabError;

/// A thread that runs until its owner is dropped: it watches `stop`, and
/// the drop sets it and waits for the thread.
struct Background {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    fn spawn(f: impl FnOnce(Arc<AtomicBool>) + Send + 'static) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        Background {
            stop,
            thread: Some(std::thread::spawn(move || f(s))),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP listener running in a namespace until dropped.
pub struct Listener {
    pub name: String,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    _thread: Background,
}

/// Binds a socket with `bind` inside namespace `ns` (it stays there) and
/// names the error with the namespace and port.
fn bound_in<T: Send + 'static>(
    ns: &str,
    port: u16,
    bind: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, LabError> {
    crate::in_namespace(ns, bind)?.map_err(|e| LabError::Enter {
        ns: ns.to_string(),
        reason: format!("bind port {port}: {e}"),
    })
}

impl Listener {
    /// Listens on `0.0.0.0:port` in namespace `ns`, greeting with `name`.
    pub fn start(ns: &str, port: u16, name: &str) -> Result<Listener, LabError> {
        let listener = bound_in(ns, port, move || {
            let l = TcpListener::bind(("0.0.0.0", port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (p, greeting) = (peers.clone(), format!("{name}\n"));
        let thread = Background::spawn(move |stop| {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        p.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.write_all(greeting.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(Listener {
            name: name.to_string(),
            peers,
            _thread: thread,
        })
    }

    /// Source addresses of the connections accepted so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Connects from namespace `ns` to `to` and returns the listener's
/// greeting (its name), or the error (refused, timed out...).
pub fn connect(ns: &str, to: SocketAddr, timeout: Duration) -> Result<String, std::io::Error> {
    connect_from(ns, 0, to, timeout)
}

/// A TCP echo server in a namespace, one thread per connection, until
/// dropped: long-lived connections a test can probe again and again.
pub struct Echo {
    _thread: Background,
}

impl Echo {
    /// Echoes every byte on `0.0.0.0:port` in namespace `ns`.
    pub fn start(ns: &str, port: u16) -> Result<Echo, LabError> {
        let listener = bound_in(ns, port, move || {
            let l = TcpListener::bind(("0.0.0.0", port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let thread = Background::spawn(move |stop| {
            let mut conns = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let stop = stop.clone();
                        conns.push(std::thread::spawn(move || echo(conn, &stop)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        Ok(Echo { _thread: thread })
    }
}

fn echo(mut conn: TcpStream, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// Opens a TCP connection from namespace `ns` (the socket stays in that
/// namespace) and keeps it for the caller.
pub fn open(ns: &str, to: SocketAddr, timeout: Duration) -> Result<TcpStream, std::io::Error> {
    let s = crate::in_namespace(ns, move || TcpStream::connect_timeout(&to, timeout))
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}

/// Whether a connection to an [`Echo`] still carries data both ways: one
/// message out, the same message back within the read timeout.
pub fn echoes(s: &mut TcpStream) -> bool {
    let msg = b"kxp?\n";
    let mut back = [0u8; 5];
    s.write_all(msg).is_ok() && s.read_exact(&mut back).is_ok() && &back == msg
}

/// `connect`, from local port `from_port` (0: any; reused at once:
/// SO_REUSEADDR), as a client that picks its own source port does.
pub fn connect_from(ns: &str, from_port: u16, to: SocketAddr, timeout: Duration) -> Result<String, std::io::Error> {
    use socket2::{Domain, Socket, Type};
    crate::in_namespace(ns, move || {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], from_port)).into())?;
        s.connect_timeout(&to.into(), timeout)?;
        let mut s: TcpStream = s.into();
        s.set_read_timeout(Some(timeout))?;
        let mut greeting = String::new();
        s.read_to_string(&mut greeting)?;
        Ok(greeting.trim().to_string())
    })
    .map_err(|e| std::io::Error::other(e.to_string()))?
}

/// A UDP echo server in a namespace until dropped: every datagram goes
/// back to its sender as it came (a DNS server's large answer, say).
pub struct UdpEcho {
    _thread: Background,
}

impl UdpEcho {
    pub fn start(ns: &str, port: u16) -> Result<UdpEcho, LabError> {
        let sock = bound_in(ns, port, move || {
            let s = std::net::UdpSocket::bind(("0.0.0.0", port))?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(s)
        })?;
        let thread = Background::spawn(move |stop| {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Ok(UdpEcho { _thread: thread })
    }
}

/// Sends one `size`-byte datagram from namespace `ns` to `to` and waits
/// for its echo; returns the size of what came back.
pub fn udp_roundtrip(ns: &str, to: SocketAddr, size: usize, timeout: Duration) -> Result<usize, std::io::Error> {
    crate::in_namespace(ns, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(timeout))?;
        let msg: Vec<u8> = (0..size).map(|i| i as u8).collect();
        sock.send_to(&msg, to)?;
        let mut buf = vec![0u8; size + 1];
        let (n, _) = sock.recv_from(&mut buf)?;
        if buf[..n] != msg[..] {
            return Err(std::io::Error::other("the echo differs from what was sent"));
        }
        Ok(n)
    })
    .map_err(|e| std::io::Error::other(e.to_string()))?
}
