//! `deepseek-worker`: one expert-parallel rank set of a DeepSeek MoE model.
//!
//! `generate` runs the model on one prompt from the command line; `serve` serves it over gRPC
//! (`deepseek.v1.Inference`, health, reflection).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use deepseek_proto::placement::{PlacementPlan, expert_load_from_metrics};
use deepseek_proto::serving::shutdown_signal;
use deepseek_proto::telemetry;
use deepseek_proto::tls::{Identity, TlsFiles};
use deepseek_worker::backend;
use deepseek_worker::config::Config;
use deepseek_worker::download::{
    DEFAULT_ENDPOINT, DownloadConfig, DownloadError, Progress, download, hub_model, into_cache,
};
use deepseek_worker::generate::{GenerateOptions, generate};
use deepseek_worker::gpu::{self, DeviceSpec};
use deepseek_worker::model::kernels::{DecodeWeights, Isa};
use deepseek_worker::rank;
use deepseek_worker::sampling::SamplingParams;
use deepseek_worker::scheduler::SchedulerConfig;
use deepseek_worker::server::{self, GroupConfig, ServeConfig};
use deepseek_worker::tokenizer::Tokenizer;
use serde_json::json;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from one prompt and print the result as JSON.
    Generate(GenerateArgs),
    /// Serve the model over gRPC as ranks of an expert-parallel group.
    // Boxed: its flags outweigh the other commands' many times over.
    Serve(Box<rank::ServeArgs>),
    /// Print an expert placement plan (JSON) for `serve --placement`: balanced from the
    /// tokens each expert was routed (the ranks' `/metrics`), or round-robin without them.
    Plan(PlanArgs),
    /// Check every GPU kernel against the CPU path (and with --bench, benchmark them at
    /// DeepSeek-V3 shapes); prints a JSON report and fails when a check does.
    GpuCheck(GpuCheckArgs),
    /// Compile every GPU kernel into the kernel cache, for machines without NVRTC.
    Kernels(KernelsArgs),
    /// Download a model repository from the Hugging Face Hub (or the mirror at HF_ENDPOINT;
    /// HF_TOKEN for gated or private ones) into a directory: the revision pinned to its
    /// commit, files in parallel, interrupted files resumed, sizes and safetensors headers
    /// checked. Progress on stderr (JSON lines when it is not a terminal); the result as
    /// JSON on stdout.
    Download(DownloadArgs),
}

#[derive(clap::Args)]
struct DownloadArgs {
    /// The model repository, OWNER/NAME.
    #[arg(long)]
    repo: String,
    /// Branch, tag or commit; resolved to its commit before anything is fetched.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Where the files go (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// Only the files this glob matches (repeatable; `*` matches across `/`).
    #[arg(long = "include")]
    include: Vec<String>,
    /// Files fetched at once.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// The hub or a mirror of it.
    #[arg(long, env = "HF_ENDPOINT", default_value = deepseek_worker::download::DEFAULT_ENDPOINT)]
    endpoint: String,
}

#[derive(clap::Args)]
struct GpuCheckArgs {
    /// The GPU, `cuda:N`.
    #[arg(long, default_value = "cuda:0")]
    device: deepseek_worker::gpu::DeviceSpec,
    /// Directory of the tiny fixture checkpoints (their router configurations are checked).
    #[arg(long, default_value = "tests/fixtures")]
    fixtures: PathBuf,
    /// Also run the benchmarks at DeepSeek-V3 shapes.
    #[arg(long)]
    bench: bool,
    /// Write the report here too.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(clap::Args)]
struct KernelsArgs {
    /// Cubin architectures, e.g. sm_80 (A100) and sm_90a (H100/H200).
    #[arg(long = "arch", required = true)]
    architectures: Vec<String>,
    /// The cache directory a worker later reads as DSD_KERNEL_CACHE.
    #[arg(long)]
    cache: PathBuf,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// Checkpoint directory; its config.json gives the number of routed experts.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Ranks in the expert-parallel group.
    #[arg(long)]
    group_size: u32,
    /// Extra copies of hot experts per MoE layer.
    #[arg(long, default_value_t = 0)]
    redundant: u32,
    /// `/metrics` texts of the group's ranks (files, `-` for standard input); their
    /// `deepseek_worker_expert_routed_tokens_total` counters are summed.
    #[arg(long = "metrics")]
    metrics: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Checkpoint directory (config.json, safetensors; tokenizer.json for text prompts), or
    /// `hf:OWNER/NAME[@REVISION]`: downloaded into the Hugging Face cache first.
    #[arg(long)]
    model: PathBuf,
    /// Prompt text (needs tokenizer.json).
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    prompt: Option<String>,
    /// Prompt token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long)]
    seed: Option<u64>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Write every prompt position's and generated step's logits to this JSON file.
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// Where the model runs: `cpu`, or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// On a GPU, how an FP8 checkpoint's linear weights are held and multiplied: auto, bf16
    /// or fp8. The CPU path keeps the checkpoint's weights as stored and computes in f32
    /// whatever this says.
    #[arg(long, value_enum, default_value = "auto")]
    dtype: gpu::Dtype,
    /// CPU kernels: `baseline`, `avx2`, `avx512` or `avx512vbmi` (default: the best this CPU
    /// has). Every path gives the same bits; this changes speed only.
    #[arg(long, value_enum)]
    cpu_kernels: Option<Isa>,
    /// How the CPU kernels hold bf16 weights: `stored` (default: in place from the
    /// checkpoint) or `coded` (recoded at load, losslessly, in 12 bits a weight: a quarter less
    /// memory and faster decode, slower prompts and large batches; needs the avx512vbmi
    /// kernels).
    #[arg(long, value_enum, default_value = "stored")]
    cpu_decode_weights: DecodeWeights,
}

fn main() -> anyhow::Result<()> {
    park_candle_pool_at_once();
    match Cli::parse().command {
        Command::Generate(args) => run_generate(args),
        Command::Serve(args) => run_serve(*args).inspect_err(record_for_kubernetes),
        Command::Plan(args) => run_plan(args),
        Command::GpuCheck(args) => run_gpu_check(args),
        Command::Kernels(args) => run_kernels(args),
        Command::Download(args) => run_download(args).inspect_err(record_for_kubernetes),
    }
}

/// candle runs elementwise ops on large tensors (a prompt's residual adds) on its own pool,
/// whose threads then spin 25,000 pauses for the next op on the cores the kernels' threads
/// need: a 128-token prompt ran 5-14% faster here with them parked at once, to be woken by
/// the next such op. `CANDLE_BARRIER_POOL_SPIN_LIMIT` set by the user is kept.
fn park_candle_pool_at_once() {
    const SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN_LIMIT).is_none() {
        // SAFETY: main's first statement: no other thread exists yet.
        unsafe { std::env::set_var(SPIN_LIMIT, "0") };
    }
}

fn run_download(args: DownloadArgs) -> anyhow::Result<()> {
    let config = DownloadConfig {
        endpoint: args.endpoint,
        token: hf_token(),
        repo: args.repo,
        revision: args.revision,
        dir: args.dir,
        include: args.include,
        parallel: args.parallel,
    };
    let downloaded = with_progress(|progress| async move { download(&config, &progress).await })?;
    let summary = serde_json::to_string(&downloaded)?;
    println!("{summary}");
    // The operator reads the commit from there.
    termination_message(&summary);
    Ok(())
}

/// The gRPC port's certificate, when `--tls-cert` is given (mutual TLS with
/// `--tls-client-ca`).
fn tls_identity(args: &rank::ServeArgs) -> anyhow::Result<Option<Arc<Identity>>> {
    let (Some(cert), Some(key)) = (args.tls_cert.clone(), args.tls_key.clone()) else {
        return Ok(None);
    };
    let files = TlsFiles {
        cert,
        key,
        ca: args.tls_client_ca.clone(),
        flags: ["--tls-cert", "--tls-key", "--tls-client-ca"],
    };
    Ok(Some(Arc::new(
        Identity::load(files).map_err(anyhow::Error::msg)?,
    )))
}

/// `HF_TOKEN`, never a flag: a flag shows in the process list.
fn hf_token() -> Option<String> {
    std::env::var("HF_TOKEN").ok()
}

/// A `--model` naming a hub repository, `hf:OWNER/NAME[@REVISION]`, is downloaded into the
/// Hugging Face cache (`HF_HOME`, else `~/.cache/huggingface`) first, or found there; a
/// directory is used as it is.
fn local_model(model: &Path) -> anyhow::Result<PathBuf> {
    let Some((repo, revision)) = model.to_str().and_then(hub_model) else {
        return Ok(model.to_path_buf());
    };
    let hf_home = std::env::var_os("HF_HOME")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/huggingface"))
        })
        .context("set HF_HOME (or HOME) for the Hugging Face cache")?;
    let config = DownloadConfig {
        endpoint: std::env::var("HF_ENDPOINT").unwrap_or_else(|_| DEFAULT_ENDPOINT.into()),
        token: hf_token(),
        repo,
        revision,
        dir: PathBuf::new(),
        include: deepseek_proto::pod::CHECKPOINT_FILES
            .iter()
            .map(|glob| glob.to_string())
            .collect(),
        parallel: 8,
    };
    let (dir, _) =
        with_progress(|progress| async move { into_cache(config, &hf_home, &progress).await })?;
    Ok(dir)
}

/// Runs a download, reporting its progress on stderr meanwhile: a line redrawn on a
/// terminal, JSON lines otherwise.
fn with_progress<T, Fut>(start: impl FnOnce(Arc<Progress>) -> Fut) -> anyhow::Result<T>
where
    Fut: Future<Output = Result<T, DownloadError>>,
{
    let terminal = std::io::stderr().is_terminal();
    let report = move |progress: &Progress| {
        let line = progress.line();
        let mut err = std::io::stderr();
        let _ = if terminal {
            write!(err, "\r{}", line.terminal())
        } else {
            writeln!(err, "{}", line.json())
        };
    };
    let progress = Arc::new(Progress::default());
    let result = tokio::runtime::Runtime::new()?.block_on(async {
        let reporting = {
            let progress = progress.clone();
            tokio::spawn(async move {
                let every = Duration::from_millis(if terminal { 250 } else { 1000 });
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    report(&progress);
                }
            })
        };
        let result = start(progress.clone()).await;
        reporting.abort();
        result
    });
    report(&progress);
    if terminal {
        eprintln!();
    }
    Ok(result?)
}

/// In a pod, why the worker stopped, where Kubernetes shows it in the pod's status (the
/// container's termination message) and the operator in the deployment's.
fn record_for_kubernetes(err: &anyhow::Error) {
    termination_message(&format!("{err:#}"));
}

/// Writes the container's termination message, in a pod (elsewhere there is no such file).
fn termination_message(text: &str) {
    let path = std::path::Path::new("/dev/termination-log");
    if path.exists() {
        let _ = std::fs::write(path, text);
    }
}

fn run_gpu_check(args: GpuCheckArgs) -> anyhow::Result<()> {
    let DeviceSpec::Cuda(ordinal) = args.device else {
        bail!("--device must name a GPU (cuda:N) for gpu-check");
    };
    let report = deepseek_worker::gpu::check::run(ordinal, &args.fixtures, args.bench)?;
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &args.report {
        std::fs::write(path, &text).with_context(|| format!("--report {}", path.display()))?;
    }
    if report["passed"] != true {
        bail!("some GPU kernels do not match the CPU path (see \"checks\")");
    }
    Ok(())
}

fn run_kernels(args: KernelsArgs) -> anyhow::Result<()> {
    let nvrtc = gpu::Nvrtc::load()?;
    let include = gpu::cuda_include_dir()
        .context("no CUDA headers (cuda_bf16.h): set DSD_CUDA_INCLUDE or CUDA_PATH")?;
    let cache = gpu::KernelCache::at(args.cache.clone());
    for architecture in &args.architectures {
        cache.cubins(architecture, Some(&nvrtc), Some(&include))?;
    }
    eprintln!(
        "compiled {} kernels for {} with NVRTC {}.{} ({}) into {}",
        gpu::KERNELS.len(),
        args.architectures.join(", "),
        nvrtc.version.0,
        nvrtc.version.1,
        nvrtc.found,
        args.cache.display()
    );
    Ok(())
}

fn run_plan(args: PlanArgs) -> anyhow::Result<()> {
    if args.group_size == 0 {
        bail!("--group-size must be at least 1");
    }
    let model_dir = args.model.unwrap_or_else(|| PathBuf::from(TINY_MODEL));
    let experts = Config::from_file(&model_dir.join("config.json"))?
        .moe
        .n_routed_experts;
    let mut texts = Vec::new();
    for path in &args.metrics {
        texts.push(if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("--metrics -")?
        } else {
            std::fs::read_to_string(path)
                .with_context(|| format!("--metrics {}", path.display()))?
        });
    }
    let loads = expert_load_from_metrics(texts.iter().map(String::as_str), experts)
        .map_err(|e| anyhow::anyhow!("--metrics: {e}"))?;
    let plan = PlacementPlan::balanced(args.group_size, experts as u32, args.redundant, &loads);
    println!("{}", serde_json::to_string_pretty(&plan)?);
    Ok(())
}

/// Fixes `--cpu-kernels` and `--cpu-decode-weights` for the process before any kernel runs.
fn choose_cpu_kernels(
    isa: Option<Isa>,
    decode_weights: DecodeWeights,
    device: DeviceSpec,
) -> anyhow::Result<()> {
    if decode_weights == DecodeWeights::Coded && device != DeviceSpec::Cpu {
        bail!("--cpu-decode-weights coded is for --device cpu; a GPU reads its own weights");
    }
    if let Some(isa) = isa {
        Isa::choose(isa).map_err(|e| anyhow::anyhow!("--cpu-kernels: {e}"))?;
    }
    DecodeWeights::choose(decode_weights).map_err(|e| anyhow::anyhow!("--cpu-decode-weights: {e}"))
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    if let Some(threads) = args.threads.filter(|&n| n > 0) {
        // SAFETY: set before any other thread exists; candle and rayon read it at first use.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
    choose_cpu_kernels(args.cpu_kernels, args.cpu_decode_weights, args.device)?;
    let model_dir = local_model(&args.model)?;
    let start = Instant::now();
    let model = backend::open(&model_dir, args.device, args.dtype)?;
    let stop_ids = model.config().eos_token_ids.clone();
    let load_seconds = start.elapsed().as_secs_f64();

    let tokenizer = Tokenizer::from_dir(&model_dir)?;
    let prompt_ids = match (args.prompt_ids, &args.prompt, &tokenizer) {
        (Some(ids), _, _) => ids,
        (None, Some(text), Some(tokenizer)) => tokenizer.encode(text, true)?,
        (None, Some(_), None) => bail!(
            "--prompt needs {}/tokenizer.json; this model has none, so give --prompt-ids",
            model_dir.display()
        ),
        (None, None, _) => bail!("give --prompt or --prompt-ids"),
    };
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            ..Default::default()
        },
        stop_ids,
        keep_logits: args.logits_out.is_some(),
    };
    let out = generate(model.as_ref(), &prompt_ids, &options)?;
    if let Some(path) = &args.logits_out {
        let logits = json!({"prompt_logits": out.prompt_logits, "step_logits": out.step_logits});
        std::fs::write(path, serde_json::to_vec(&logits)?)
            .with_context(|| format!("--logits-out {}", path.display()))?;
    }
    let per_second = |tokens: usize, seconds: f64| {
        if seconds > 0.0 {
            tokens as f64 / seconds
        } else {
            0.0
        }
    };
    // The first generated token comes from the prefill; decode produced the rest.
    let decoded = out.tokens.len().saturating_sub(1);
    let mut report = json!({
        "prompt_ids": prompt_ids,
        "tokens": out.tokens,
        "timing": {
            "load_s": load_seconds,
            "prefill_tokens_per_s": per_second(prompt_ids.len(), out.prefill_seconds),
            "decode_tokens_per_s": per_second(decoded, out.decode_seconds),
        },
        "cpu_kernels": Isa::selected().name(),
    });
    if let Some(tokenizer) = &tokenizer {
        report["text"] = tokenizer.decode(&out.tokens, true)?.into();
    }
    println!("{report}");
    Ok(())
}

/// The tiny checkpoint that ships with the repository, served when no --model is given.
const TINY_MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/tiny-v3-bf16"
);

fn run_serve(args: rank::ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    // Dropped before the runtime: the last spans flush over its connections.
    let _telemetry = {
        let _inside = runtime.enter();
        telemetry::init("deepseek-worker", args.otlp_endpoint.as_deref())
            .map_err(anyhow::Error::msg)?
    };
    let ranks = args.resolve()?;
    choose_cpu_kernels(args.cpu_kernels, args.cpu_decode_weights, args.device)?;
    if args.ep_transport == deepseek_worker::ep::EpTransport::Nccl && args.device == DeviceSpec::Cpu
    {
        bail!("--ep-transport nccl needs --device cuda:N");
    }
    if let Some(fraction) = args.kv_cache_fraction.filter(|f| !(*f > 0.0 && *f <= 1.0)) {
        bail!("--kv-cache-fraction must be in (0, 1], got {fraction}");
    }
    if args.dry_run {
        println!("{}", args.dry_run_report(&ranks));
        return Ok(());
    }
    tracing::info!(cpu_kernels = Isa::selected().name(), "CPU kernels");
    let model_dir = local_model(
        &args
            .model
            .clone()
            .unwrap_or_else(|| PathBuf::from(TINY_MODEL)),
    )?;
    let config = Config::from_file(&model_dir.join("config.json"))?;
    let chat_template = match &args.chat_template {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--chat-template {}", path.display()))?,
        ),
        None => None,
    };
    let max_batch_tokens = args.max_batch_tokens.max(1);
    let serve = ServeConfig {
        chat_template,
        served_name: args.served_name.clone().unwrap_or_else(|| {
            model_dir
                .file_name()
                .map_or_else(|| "deepseek".into(), |n| n.to_string_lossy().into_owned())
        }),
        model_dir,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        tls: tls_identity(&args)?,
        health_listen: args.health_listen,
        shutdown_grace: std::time::Duration::from_secs(args.shutdown_grace_seconds),
        scheduler: SchedulerConfig {
            max_batch_tokens,
            max_seqs: args.max_seqs.max(1),
            prefill_chunk: args.chunked_prefill_size.clamp(1, max_batch_tokens),
            kv_blocks: args.kv_cache_blocks.unwrap_or(4096).max(1),
            max_waiting: 4 * args.max_seqs.max(1),
            compute_threads: None,
        },
        rank: ranks.first,
        ranks: ranks.count,
        ranks_per_gpu: args.ranks_per_gpu,
        group_size: ranks.group_size,
        pool: args.pool.clone(),
        group: if ranks.group_size > 1 {
            let experts = config.moe.n_routed_experts as u32;
            Some(GroupConfig {
                peers: args.peers.clone(),
                plan: args
                    .read_plan(ranks.group_size)?
                    .unwrap_or_else(|| PlacementPlan::round_robin(ranks.group_size, experts, 0)),
                wire: args.ep_wire,
                transport: args.ep_transport,
                connect_timeout: Duration::from_secs(args.ep_connect_timeout_seconds),
                stall_timeout: Duration::from_secs(args.ep_stall_timeout_seconds),
            })
        } else {
            None
        },
        device: args.device,
        gpu_product: args.gpu_product.clone(),
        dtype: args.dtype,
        kv_cache_fraction: args.kv_cache_fraction,
    };
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(serve.listen).await.with_context(|| format!("--listen {}", serve.listen))?;
        tracing::info!(listen = %listener.local_addr()?, model = %serve.model_dir.display(), "listening");
        let shutdown = async {
            shutdown_signal().await;
            tracing::info!("shutting down: no new requests, finishing open streams");
        };
        Ok(server::serve(serve, listener, shutdown).await?)
    })
}
