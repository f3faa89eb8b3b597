//! Root-only: `kxp run` attaches the XDP steering program to a lab node's
//! uplink, the node's own traffic keeps flowing, and `kill -9` leaves
//! nothing behind (the program hangs off a BPF link owned by the process).

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lab::{node_ip, Lab};

/// A kill -9 and the kernel's cleanup of the BPF link can take a while on
/// a loaded machine: 30 s.
fn wait_for(what: &str, f: impl FnMut() -> bool) {
    support::cluster::wait_for_within(what, Duration::from_secs(30), f);
}

/// Kills the child on drop so a failed assertion leaves no kxp running.
struct Kxp(Child);

impl Drop for Kxp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 192.168.77.1}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: lab}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
"#;

/// Starts `kxp run` inside the node's namespace with the steering program
/// on its uplink; returns once the program is attached.
fn start_kxp(node: &lab::Host, dir: &std::path::Path) -> Kxp {
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("cluster.yaml"), MANIFESTS).unwrap();
    let cfg = dir.join("kxp.yaml");
    let config = "kind: KubeProxyConfiguration\nhealthzBindAddress: 127.0.0.1:0\nmetricsBindAddress: 127.0.0.1:0\nkxp: {interfaces: [eth0]}\n";
    std::fs::write(&cfg, config).unwrap();
    let kxp = Kxp(Command::new("ip")
        .args([
            "netns",
            "exec",
            &node.ns,
            env!("CARGO_BIN_EXE_kxp"),
            "run",
            "--node-name",
            "n1",
            "--manifests",
        ])
        .arg(&manifests)
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kxp starts"));
    wait_for("XDP attached by kxp", || node.xdp_attached());
    kxp
}

fn ping_node(lab: &Lab) -> Result<String, lab::LabError> {
    lab.client
        .exec(&["ping", "-c", "2", "-W", "2", &node_ip(1).to_string()])
}

/// A one-node lab with kxp running on the node; the temp dir holds its files.
fn lab_with_kxp() -> (Lab, lab::Host, tempfile::TempDir, Kxp) {
    let lab = Lab::build(1, 1).expect("lab builds");
    let node = lab.nodes[0].host.clone();
    let dir = tempfile::tempdir().unwrap();
    let kxp = start_kxp(&node, dir.path());
    (lab, node, dir, kxp)
}

#[test]
fn kill_9_leaves_no_xdp_program_and_node_traffic_flows_throughout() {
    if !lab::root_or_skip() {
        return;
    }
    let (lab, node, _dir, mut kxp) = lab_with_kxp();
    ping_node(&lab).expect("node reachable with kxp running");
    node.exec(&["ip", "link", "show", "kxp0"])
        .expect("kxp's TUN device exists");
    // SIGKILL: no chance to clean up; the kernel drops the link with the process.
    kxp.0.kill().unwrap();
    kxp.0.wait().unwrap();
    wait_for("XDP gone after kill -9", || !node.xdp_attached());
    // The TUN device (and the routes into it) go with the process too.
    wait_for("kxp0 gone after kill -9", || {
        node.exec(&["ip", "link", "show", "kxp0"]).is_err()
    });
    ping_node(&lab).expect("node reachable after kxp died");
}

#[test]
fn sigterm_exits_cleanly_and_detaches() {
    if !lab::root_or_skip() {
        return;
    }
    let (_lab, node, _dir, mut kxp) = lab_with_kxp();
    lab::run(&["kill", "-TERM", &kxp.0.id().to_string()]).unwrap();
    let status = kxp.0.wait().unwrap();
    assert!(status.success(), "kxp exits 0 on SIGTERM: {status}");
    assert!(!node.xdp_attached(), "XDP detached on SIGTERM");
}

/// Runs `kxp run` in `ns` with `interfaces` (optionally through `prefix`,
/// e.g. to drop privileges) and returns its exit status and stderr.
fn run_kxp_expecting_failure(ns: &str, dir: &std::path::Path, interfaces: &str, prefix: &[&str]) -> String {
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("cluster.yaml"), MANIFESTS).unwrap();
    let cfg = dir.join("kxp-fail.yaml");
    std::fs::write(
        &cfg,
        format!(
            "healthzBindAddress: 127.0.0.1:0\nmetricsBindAddress: 127.0.0.1:0\nkxp: {{interfaces: [{interfaces}]}}\n"
        ),
    )
    .unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(prefix)
        .arg(env!("CARGO_BIN_EXE_kxp"))
        .args(["run", "--node-name", "n1", "--manifests"])
        .arg(&manifests)
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("kxp runs");
    assert!(!out.status.success(), "kxp must refuse to start");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    // One sentence saying what to do, not a backtrace.
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn start_up_problems_are_one_clear_sentence() {
    if !lab::root_or_skip() {
        return;
    }
    let (_lab, node, dir, _kxp) = lab_with_kxp();
    let missing = run_kxp_expecting_failure(&node.ns, dir.path(), "eth9", &[]);
    assert!(
        missing.contains("interface eth9 does not exist in this network namespace"),
        "{missing}"
    );
    // eth0 already carries the first kxp's program.
    let busy = run_kxp_expecting_failure(&node.ns, dir.path(), "eth0", &[]);
    assert!(busy.contains("eth0 already has an XDP program"), "{busy}");
    // dir must be readable by nobody for this one.
    lab::run(&["chmod", "-R", "a+rX", &dir.path().display().to_string()]).unwrap();
    let unprivileged = run_kxp_expecting_failure(
        &node.ns,
        dir.path(),
        "eth0",
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ],
    );
    assert!(unprivileged.contains("needs root"), "{unprivileged}");
}
