//! kxp benchmarks. Numbers, not pass/fail: see docs/BENCHMARKS.md.

mod control;
mod engine;
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
}

fn main() {
    let cli = Cli::parse();
    match cli.what {
        What::Engine(args) => engine::run(&args),
        What::Control(args) => control::run(&args),
    }
}
