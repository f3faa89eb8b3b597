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
    /// Run the control process: watch the cluster (or a manifest directory),
    /// keep the tables in sync, serve /healthz (10256) and /metrics (10249).
    Run(RunArgs),
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
    /// Read a running kxp's state.
    Dump {
        #[command(subcommand)]
        what: Dump,
    },
}

#[derive(Subcommand)]
enum Dump {
    /// Per-core percentiles since start of where each worker's time goes
    /// (batch, engine, TX wakeups, idle sleeps), read from a running kxp.
    Latency {
        /// kxp's metricsBindAddress.
        #[arg(long, default_value = "127.0.0.1:10249")]
        metrics: std::net::SocketAddr,
        /// Also write the raw histograms here, as an HdrHistogram interval
        /// log (.hlog) for HdrHistogram's plotters.
        #[arg(long)]
        hlog: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// KubeProxyConfiguration YAML (plus kxp's own `kxp:` section).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Read Services/EndpointSlices/Nodes from this directory instead of the
    /// API server (standalone and lab mode); reloaded on change.
    #[arg(long, conflicts_with_all = ["master", "kubeconfig"])]
    manifests: Option<PathBuf>,
    /// API server URL. Overrides the kubeconfig's; needed in-cluster, where
    /// the default points at the `kubernetes` ClusterIP kxp itself programs.
    #[arg(long)]
    master: Option<String>,
    /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name (hostnameOverride).
    #[arg(long)]
    node_name: Option<String>,
    /// clusterCIDR.
    #[arg(long)]
    cluster_cidr: Option<dataplane::addr::Cidr>,
    /// healthzBindAddress, e.g. 0.0.0.0:10256.
    #[arg(long)]
    healthz_bind_address: Option<std::net::SocketAddr>,
    /// metricsBindAddress, e.g. 127.0.0.1:10249.
    #[arg(long)]
    metrics_bind_address: Option<std::net::SocketAddr>,
    /// minSyncPeriod (Go duration, e.g. 1s).
    #[arg(long, value_parser = control::config::parse_go_duration)]
    min_sync_period: Option<std::time::Duration>,
    /// syncPeriod (Go duration, e.g. 30s).
    #[arg(long, value_parser = control::config::parse_go_duration)]
    sync_period: Option<std::time::Duration>,
}

async fn run(a: RunArgs) -> Result<(), String> {
    let shutdown = shutdown_signal();
    let mut cfg = control::config::Config::load(a.config.as_deref()).map_err(|e| e.to_string())?;
    if let Some(n) = a.node_name {
        cfg.node_name = n;
    }
    if a.cluster_cidr.is_some() {
        cfg.cluster_cidr = a.cluster_cidr;
    }
    if let Some(b) = a.healthz_bind_address {
        cfg.healthz_bind_address = b;
    }
    if let Some(b) = a.metrics_bind_address {
        cfg.metrics_bind_address = b;
    }
    if let Some(d) = a.min_sync_period {
        cfg.min_sync_period = d;
    }
    if let Some(d) = a.sync_period {
        cfg.sync_period = d;
    }
    let source = match a.manifests {
        Some(dir) => control::daemon::SourceSpec::Manifests(dir),
        None => control::daemon::SourceSpec::Kube(kube_client(a.master, a.kubeconfig).await?),
    };
    let d = control::daemon::start(&cfg, source).await.map_err(|e| e.to_string())?;
    tracing::info!(node = %cfg.node_name, healthz = %d.healthz_addr, metrics = %d.metrics_addr, "kxp control running");
    shutdown.await;
    tracing::info!("shutting down");
    if let Some(dp) = &d.datapath {
        // Stop the workers and let their TX rings drain before the programs
        // detach (on exit, with their links).
        for w in dp.lock().unwrap_or_else(|e| e.into_inner()).shutdown() {
            tracing::info!(
                queue = w.queue,
                rx = w.stats.rx_packets,
                tx = w.stats.tx_packets,
                frames = ?w.frames,
                balanced = w.frames.balanced(),
                "worker stopped"
            );
        }
    }
    Ok(())
}

async fn kube_client(master: Option<String>, kubeconfig: Option<PathBuf>) -> Result<kube::Client, String> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(&path)
                .map_err(|e| format!("cannot read kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => match (&master, kube::Config::infer().await) {
            (_, Ok(c)) => c,
            (Some(m), Err(_)) => kube::Config::new(m.parse().map_err(|e| format!("--master {m:?}: {e}"))?),
            (None, Err(e)) => {
                return Err(format!(
                "no Kubernetes API configuration found ({e}); pass --master URL, --kubeconfig FILE, or --manifests DIR"
            ))
            }
        },
    };
    if let Some(m) = master {
        config.cluster_url = m.parse().map_err(|e| format!("--master {m:?}: {e}"))?;
    } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        tracing::warn!("using the in-cluster API address, which is the `kubernetes` ClusterIP kxp itself programs; pass --master with the API server's real address");
    }
    kube::Client::try_from(config).map_err(|e| format!("cannot build Kubernetes client: {e}"))
}

/// Listens for SIGTERM and Ctrl-C from the moment it is called (before the
/// datapath attaches, so a TERM during start-up still exits cleanly); the
/// returned future completes on the first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    async move {
        match term {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
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

/// `kxp dump latency`: the table, after writing the raw log to `hlog`.
fn dump_latency(metrics: std::net::SocketAddr, hlog: Option<&std::path::Path>) -> Result<String, String> {
    let log = control::latency_log::fetch(metrics)?;
    if let Some(path) = hlog {
        std::fs::write(path, &log).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let hists = control::latency_log::decode(&log)?;
    if hists.is_empty() {
        return Err(format!("{metrics} runs no datapath workers (no kxp.interfaces)"));
    }
    Ok(control::latency_log::table(&hists))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Dump {
            what: Dump::Latency { metrics, hlog },
        } => match dump_latency(metrics, hlog.as_deref()) {
            Ok(table) => {
                print!("{table}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kxp dump latency: {e}");
                ExitCode::from(1)
            }
        },
        Command::Run(args) => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("kxp: cannot start the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kxp: {e}");
                    ExitCode::from(1)
                }
            }
        }
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
