use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use deepseek_operator::api::DeepSeekDeployment;
use deepseek_operator::controller::{self, Context};
use deepseek_operator::leader::{self, LeaseConfig};
use deepseek_operator::metrics::Metrics;
use kube::CustomResourceExt;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// Kubernetes operator for DeepSeek mixture-of-experts serving.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the DeepSeekDeployment CustomResourceDefinition as YAML.
    Crd,
    /// Print the objects the operator would create for a DeepSeekDeployment manifest.
    Render {
        /// Manifest file (YAML), or `-` for standard input.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Run the controller (in-cluster config, or the current kubeconfig context).
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    metrics_listen: SocketAddr,
    /// Watch one namespace only (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Reconcile only while holding a Lease, so several replicas can run.
    #[arg(long)]
    leader_elect: bool,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "deepseek-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease (default: the pod name, else the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", serde_yaml::to_string(&DeepSeekDeployment::crd())?),
        Command::Render { file } => print!("{}", render(&file)?),
        Command::Run(args) => tokio::runtime::Runtime::new()?.block_on(run(args))?,
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format.as_str() {
        "json" => logs.json().init(),
        _ => logs.init(),
    }
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let identity = args
        .identity
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "deepseek-operator".into());
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("--metrics-listen {}", args.metrics_listen))?;
    let http = axum::serve(
        listener,
        deepseek_operator::metrics::router(metrics.clone()),
    );
    tokio::spawn(async move {
        if let Err(err) = http.await {
            tracing::error!(error = %err, "metrics server stopped");
        }
    });
    metrics.ready.store(true, Ordering::Relaxed);

    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        identity.clone(),
    ));
    if !args.leader_elect {
        metrics.leader.set(1);
        controller::run(ctx, args.namespace).await;
        return Ok(());
    }
    let namespace = args
        .lease_namespace
        .context("--lease-namespace (or POD_NAMESPACE) is required with --leader-elect")?;
    let config = LeaseConfig {
        name: args.lease_name,
        namespace,
        identity,
        duration: Duration::from_secs(15),
        retry: Duration::from_secs(5),
    };
    let (leading_tx, mut leading) = watch::channel(false);
    let elector = tokio::spawn(leader::run(client, config, leading_tx));
    tracing::info!("waiting for the leader lease");
    leading.wait_for(|leading| *leading).await?;
    metrics.leader.set(1);
    tokio::select! {
        () = controller::run(ctx, args.namespace) => Ok(()),
        // Losing the lease ends the process: a restart rejoins as a follower.
        result = elector => Ok(result??),
    }
}

fn render(file: &PathBuf) -> anyhow::Result<String> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let dsd: DeepSeekDeployment = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not a valid DeepSeekDeployment", file.display()))?;
    Ok(dsd.desired()?.to_yaml())
}
