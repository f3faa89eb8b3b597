//! `kxp`: the node's service proxy.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use control::compile::{compile, NodeContext, ServiceIds};
use control::manifests;

#[derive(Parser)]
#[command(name = "kxp", version, about = "kxp: a kube-proxy replacement on AF_XDP")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compile a manifest directory without touching the network: print what
    /// would be programmed, and exit non-zero naming every unusable object.
    Check {
        /// Directory of Service / EndpointSlice / Node YAML manifests.
        #[arg(long)]
        manifests: PathBuf,
        /// This node's name (endpoints with this nodeName are local).
        #[arg(long, default_value = "")]
        node_name: String,
        /// NodePort range, as kube-proxy's --service-node-port-range.
        #[arg(long, default_value = "30000-32767", value_parser = parse_range)]
        node_port_range: (u16, u16),
        /// Pod network of the cluster (sources outside it are masqueraded).
        #[arg(long)]
        cluster_cidr: Option<dataplane::addr::Cidr>,
    },
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or("expected LOW-HIGH, e.g. 30000-32767")?;
    let lo: u16 = a.trim().parse().map_err(|_| format!("{a:?} is not a port"))?;
    let hi: u16 = b.trim().parse().map_err(|_| format!("{b:?} is not a port"))?;
    if lo > hi {
        return Err(format!("{lo} is above {hi}"));
    }
    Ok((lo, hi))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            manifests: dir,
            node_name,
            node_port_range,
            cluster_cidr,
        } => {
            let objs = match manifests::load_dir(&dir) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("kxp check: {e}");
                    return ExitCode::from(2);
                }
            };
            let ctx = NodeContext {
                node_name,
                node_port_range,
                cluster_cidr,
            };
            let desired = compile(&objs, &ctx, &mut ServiceIds::default());
            print!("{}", control::compile::summary(&desired));
            for p in &desired.problems {
                eprintln!("kxp check: {p}");
            }
            if desired.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}
