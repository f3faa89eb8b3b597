//! kxp benchmarks. Numbers, not pass/fail: see docs/BENCHMARKS.md.

mod control;
mod cpu;
mod engine;
mod flood;
mod kube_proxy;
mod lab_demo;
mod lab_run;
mod memory;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;

#[derive(Parser)]
#[command(
    name = "bench",
    about = "kxp benchmarks: print numbers (and ratios against baselines)"
)]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// The sans-IO packet engine on one core: ns/packet per path, update
    /// latency, conntrack memory, at 10 / 10,000 / 100,000 services.
    Engine(engine::Args),
    /// The control sync path: compile + diff + publish at 1k / 10k / 50k
    /// services: initial sync, one-service add, one-endpoint removal, RSS.
    Control(control::Args),
    /// The lab demo (root): a two-node namespace cluster, iperf3 TCP and UDP
    /// through a ClusterIP and a NodePort via kxp, against the kernel path.
    Lab(lab_demo::Args),
    /// Spoofed-source floods (root): 200 established connections through a
    /// NodePort and a ClusterIP, then a million packets of each kind, kxp
    /// against kube-proxy's iptables shape.
    Flood(flood::Args),
}

fn main() {
    let cli = Cli::parse();
    match cli.what {
        What::Engine(args) => engine::run(&args),
        What::Control(args) => control::run(&args),
        What::Lab(args) => lab_demo::run(&args),
        What::Flood(args) => flood::run(&args),
    }
}
