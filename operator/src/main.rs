use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use deepseek_operator::api::{DeepSeekDeployment, Dtype};
use deepseek_operator::controller::{self, Context};
use deepseek_operator::leader::{self, LeaseConfig};
use deepseek_operator::metrics::Metrics;
use deepseek_operator::{autoscaler, gpu, local, resolve};
use deepseek_proto::memory::{self, ModelShape, Rank, WeightFormat};
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
    /// Print the objects the operator would create for a DeepSeekDeployment manifest, after
    /// each GPU pool's memory plan (as YAML comments).
    Render {
        /// Manifest file (YAML), or `-` for standard input.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Print, as a Markdown table, how a model fits one rank of H100, H200 and A100 groups
    /// of 8 to 64 ranks.
    MemoryTable(MemoryTableArgs),
    /// Run the controller (in-cluster config, or the current kubeconfig context).
    Run(RunArgs),
    /// Run DeepSeekDeployments as processes on this machine: every rank a `deepseek-worker`,
    /// one `deepseek-router` per deployment, supervised as a cluster would; prints the
    /// endpoints once every group is ready, stops everything on Ctrl-C or SIGTERM.
    RunLocal(RunLocalArgs),
}

#[derive(clap::Args)]
struct RunLocalArgs {
    /// A DeepSeekDeployment manifest (repeatable).
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// Apply edits of the files while running: groups added or removed, a changed revision
    /// rolled one group per pool at a time.
    #[arg(long)]
    watch: bool,
    /// `CLAIM=DIR`: the local directory of a PersistentVolumeClaim the spec names
    /// (repeatable). Unnamed claims are `tests/fixtures`, where the samples' checkpoints are.
    #[arg(long = "pvc", value_parser = parse_claim)]
    claims: Vec<(String, PathBuf)>,
    /// The router's API keys file, for a spec with `router.apiKeysSecret`.
    #[arg(long)]
    api_keys_file: Option<PathBuf>,
    /// GPUs of this machine for GPU pools (default: the NVIDIA devices in /dev).
    #[arg(long)]
    gpus: Option<u32>,
    /// Directory of `deepseek-worker` and `deepseek-router` (default: beside this
    /// executable, else on PATH).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Keep FILE a Prometheus `file_sd_configs` list of the router's and every worker's
    /// `/metrics` (labels `deployment`, `component`, `pool`, `pod`), rewritten as processes
    /// come and go.
    #[arg(long, value_name = "FILE")]
    prometheus_targets: Option<PathBuf>,
}

fn parse_claim(value: &str) -> Result<(String, PathBuf), String> {
    let (claim, dir) = value.split_once('=').ok_or("expected CLAIM=DIR")?;
    if claim.is_empty() || dir.is_empty() {
        return Err(format!("{value:?}: expected CLAIM=DIR"));
    }
    Ok((claim.to_string(), PathBuf::from(dir)))
}

#[derive(clap::Args)]
struct MemoryTableArgs {
    #[arg(long, value_enum, default_value = "deepseek-v3")]
    architecture: TableArchitecture,
    /// Extra expert copies per layer across a group (`parallelism.redundantExperts`).
    #[arg(long, default_value_t = 32)]
    redundant_experts: u64,
    /// Tokens of one scheduler pass (`worker.maxBatchTokens`).
    #[arg(long, default_value_t = 4096)]
    max_batch_tokens: u64,
    /// Share of GPU memory for weights, working space and cache (`worker.kvCacheFraction`).
    #[arg(long, default_value_t = resolve::DEFAULT_GPU_MEMORY_FRACTION)]
    memory_fraction: f64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TableArchitecture {
    DeepseekV3,
    DeepseekV2,
    DeepseekV2Lite,
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
    /// The namespace whose pods may scrape worker metrics when a deployment has no
    /// `spec.metricsFrom` (default: the namespace the operator runs in, POD_NAMESPACE).
    #[arg(long, env = "METRICS_FROM_NAMESPACE")]
    metrics_from_namespace: Option<String>,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", serde_yaml::to_string(&DeepSeekDeployment::crd())?),
        Command::Render { file } => print!("{}", render(&file)?),
        Command::MemoryTable(args) => print!("{}", memory_table(&args)),
        Command::Run(args) => tokio::runtime::Runtime::new()?.block_on(run(args))?,
        Command::RunLocal(args) => run_local(args)?,
    }
    Ok(())
}

fn run_local(args: RunLocalArgs) -> anyhow::Result<()> {
    let fixtures = PathBuf::from("tests/fixtures");
    let options = local::run::Options {
        files: args.files,
        watch: args.watch,
        volumes: local::LocalVolumes {
            claims: args.claims.into_iter().collect(),
            default_claim_dir: fixtures.is_dir().then_some(fixtures),
            api_keys_file: args.api_keys_file,
        },
        gpus: args.gpus.unwrap_or_else(nvidia_devices),
        bin_dir: args.bin_dir,
        prometheus_targets: args.prometheus_targets,
    };
    // One thread: the children's parent-death signal follows the thread that started them.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(local::run::run(options))?;
    Ok(())
}

/// `/dev/nvidia0`, `/dev/nvidia1`, …: one per GPU the driver shows.
fn nvidia_devices() -> u32 {
    let Ok(entries) = std::fs::read_dir("/dev") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("nvidia"))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .count() as u32
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

    let mut ctx = Context::new(client.clone(), metrics.clone(), identity.clone());
    ctx.metrics_namespace = args
        .metrics_from_namespace
        .or_else(|| args.lease_namespace.clone());
    let ctx = Arc::new(ctx);
    if !args.leader_elect {
        metrics.leader.set(1);
        tokio::select! {
            () = controller::run(ctx.clone(), args.namespace.clone()) => {}
            () = autoscaler::run(ctx, args.namespace) => {}
        }
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
        () = controller::run(ctx.clone(), args.namespace.clone()) => Ok(()),
        () = autoscaler::run(ctx, args.namespace) => Ok(()),
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
    let desired = dsd.desired()?;
    let mut out = String::new();
    for (pool, _) in &desired.pools {
        if let (Some(plan), Some(product)) = (&pool.memory, &pool.gpu_product) {
            out.push_str(&format!(
                "# memory plan of a rank, pool {} ({product}, {} ranks per group): {plan}\n",
                pool.name, pool.group_size
            ));
        }
    }
    out.push_str(&desired.to_yaml());
    Ok(out)
}

/// One row per GPU and group size: where a rank's memory goes, as the worker holds the
/// model with the operator's default dtype (an FP8 checkpoint's linear weights in FP8 on
/// every GPU; see `WeightFormat::on_gpu`).
fn memory_table(args: &MemoryTableArgs) -> String {
    let shape = match args.architecture {
        TableArchitecture::DeepseekV3 => ModelShape::DEEPSEEK_V3,
        TableArchitecture::DeepseekV2 => ModelShape::DEEPSEEK_V2,
        TableArchitecture::DeepseekV2Lite => ModelShape::DEEPSEEK_V2_LITE,
    };
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    let mut out = String::from(
        "| GPU | ranks | experts per layer | replicated GiB | experts GiB | working GiB | KV tokens | fits |\n\
         |---|---:|---|---:|---:|---:|---:|---|\n",
    );
    for product in [
        "NVIDIA-H100-80GB-HBM3",
        "NVIDIA-H200",
        "NVIDIA-A100-SXM4-80GB",
    ] {
        let fp8 = gpu::resolve_dtype(Dtype::Auto) == Dtype::Fp8;
        for group_size in [8, 16, 32, 64] {
            let rank = Rank {
                gpu_bytes: gpu::memory_bytes(product).expect("a listed product"),
                memory_fraction: args.memory_fraction,
                group_size,
                redundant_experts: args.redundant_experts,
                weights: WeightFormat::on_gpu(fp8),
                batch_tokens: args.max_batch_tokens,
            };
            let plan = memory::plan(&shape, &rank);
            out.push_str(&format!(
                "| {product} | {group_size} | {} × {} | {:.1} | {:.1} | {:.1} | {} | {} |\n",
                plan.expert_slots,
                rank.weights,
                gib(plan.replicated),
                gib(plan.experts),
                gib(plan.working),
                plan.kv_tokens,
                if plan.fits(args.max_batch_tokens) {
                    "yes"
                } else {
                    "no"
                },
            ));
        }
    }
    out
}
