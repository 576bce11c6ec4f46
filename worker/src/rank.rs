//! Where this process sits in its expert-parallel group, from flags or the `DSD_*`
//! environment the operator sets, checked against the placement plan.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::ValueEnum;
use deepseek_proto::placement::PlacementPlan;
use deepseek_proto::pod::{self, env};

use crate::bail;
use crate::error::{Context, Error, Result};
use crate::gpu::{DeviceSpec, Dtype};
use crate::model::kernels::{DecodeWeights, Isa};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Where the model runs: `cpu`, or `cuda:N` (the first of `--ranks-per-pod` GPUs). GPU
    /// ranks of a group exchange tokens through host memory, over TCP or NCCL.
    #[arg(long, env = env::DEVICE, default_value = "cpu")]
    pub device: DeviceSpec,
    /// The GPU product this rank must run on (an `nvidia.com/gpu.product` label value).
    #[arg(long, env = env::GPU_PRODUCT)]
    pub gpu_product: Option<String>,
    /// On a GPU, how an FP8 checkpoint's linear weights are held and multiplied: `auto` (FP8
    /// for an FP8 checkpoint, bf16 otherwise), `bf16` (dequantised at load) or `fp8` (one
    /// byte a weight; FP8 GEMMs on sm_89 and later, dequantised tile by tile elsewhere). The
    /// CPU path keeps the checkpoint's weights as stored and computes in f32 whatever this
    /// says.
    #[arg(long, env = env::DTYPE, value_enum, default_value = "auto")]
    pub dtype: Dtype,
    /// CPU kernels: `baseline`, `avx2`, `avx512` or `avx512vbmi` (default: the best this CPU
    /// has). Every path gives the same bits; this changes speed only.
    #[arg(long, value_enum)]
    pub cpu_kernels: Option<Isa>,
    /// How the CPU kernels hold bf16 weights: `stored` (default: in place from the
    /// checkpoint) or `coded` (recoded at load, losslessly, in 12 bits a weight: a quarter less
    /// memory and faster decode, slower prompts and large batches; needs the avx512vbmi
    /// kernels).
    #[arg(long, value_enum, default_value = "stored")]
    pub cpu_decode_weights: DecodeWeights,
    /// Checkpoint directory (config.json, safetensors), or `hf:OWNER/NAME[@REVISION]`:
    /// downloaded into the Hugging Face cache (`HF_HOME`) first (what is there already is
    /// checked, not fetched again).
    #[arg(long, env = env::MODEL)]
    pub model: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = env::LISTEN, default_value_t = SocketAddr::from(([0, 0, 0, 0], pod::GRPC_PORT)))]
    pub listen: SocketAddr,
    /// Model name reported to clients (default: the model directory's name).
    #[arg(long, env = env::SERVED_NAME)]
    pub served_name: Option<String>,
    /// A Jinja chat template file to use instead of the model's `tokenizer_config.json` one,
    /// as vLLM's `--chat-template`: DeepSeek's own templates do not show `tools` to the model.
    #[arg(long, env = "DSD_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// Token budget of one scheduler step (decodes plus prefill chunks).
    #[arg(long, env = env::MAX_BATCH_TOKENS, default_value_t = pod::DEFAULT_MAX_BATCH_TOKENS as usize)]
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    #[arg(long, env = "DSD_MAX_SEQS", default_value_t = 64)]
    pub max_seqs: usize,
    /// Prompts run in chunks of this many tokens (at most --max-batch-tokens).
    #[arg(long, env = "DSD_CHUNKED_PREFILL_SIZE", default_value_t = 512)]
    pub chunked_prefill_size: usize,
    /// KV cache size in blocks of 16 tokens.
    #[arg(
        long,
        env = "DSD_KV_CACHE_BLOCKS",
        conflicts_with = "kv_cache_fraction"
    )]
    pub kv_cache_blocks: Option<usize>,
    /// KV cache size as a fraction of the memory available at start; on a GPU, the share of
    /// device memory that weights, cache and working space may use together (vLLM's
    /// `gpu_memory_utilization`).
    #[arg(long, env = env::KV_CACHE_FRACTION)]
    pub kv_cache_fraction: Option<f64>,
    /// Address for Prometheus `/metrics` (not served when unset).
    #[arg(long, env = env::METRICS_LISTEN)]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve gRPC over TLS with this PEM certificate (read again when it changes).
    #[arg(long, env = env::TLS_CERT, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = env::TLS_KEY, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// With `--tls-cert`: a client must present a certificate this CA (PEM) signed.
    #[arg(long, env = env::TLS_CLIENT_CA, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Also serve gRPC health, and nothing else, in plaintext here: for the kubelet's
    /// probes, which speak no TLS.
    #[arg(long, env = env::HEALTH_LISTEN)]
    pub health_listen: Option<SocketAddr>,
    /// Export spans over OTLP/gRPC to this collector (`http://HOST:4317`); off when unset. A
    /// request's span continues the trace its caller's `traceparent` names.
    #[arg(long, env = env::OTLP_ENDPOINT)]
    pub otlp_endpoint: Option<String>,
    /// Seconds open streams may run after SIGTERM before they are ended.
    #[arg(long, env = "DSD_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,
    /// Node pool this rank belongs to (reported by ModelInfo).
    #[arg(long, env = env::POOL, default_value = "")]
    pub pool: String,
    /// Ranks in the expert-parallel group.
    #[arg(long, env = env::GROUP_SIZE, default_value_t = 1)]
    pub group_size: u32,
    /// First rank of this process. Defaults to pod index × ranks per pod.
    #[arg(long)]
    pub rank: Option<u32>,
    /// StatefulSet pod index (set by the operator through the downward API).
    #[arg(long, env = env::POD_INDEX, default_value_t = 0)]
    pub pod_index: u32,
    /// Ranks this process runs (one per local GPU).
    #[arg(long, env = env::RANKS_PER_POD, default_value_t = 1)]
    pub ranks_per_pod: u32,
    /// Local ranks sharing each GPU, splitting its memory (`--kv-cache-fraction`) evenly:
    /// local rank i runs on GPU i / N from `--device`. For testing a multi-rank pod on one
    /// GPU; serving gives each rank its own.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub ranks_per_gpu: u32,
    /// Expert-parallel address of every rank in rank order, this process's own included.
    #[arg(long, env = env::PEERS, value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Placement plan (JSON); round-robin when absent.
    #[arg(long, env = env::PLACEMENT)]
    pub placement: Option<PathBuf>,
    /// Activations between expert-parallel ranks: bf16 (half the bytes) or f32 (exact).
    #[arg(long, env = "DSD_EP_WIRE", value_enum, default_value = "bf16")]
    pub ep_wire: crate::ep::Wire,
    /// What carries the group's exchanges: `tcp`, or `nccl` between GPU ranks.
    #[arg(long, env = "DSD_EP_TRANSPORT", value_enum, default_value = "tcp")]
    pub ep_transport: crate::ep::EpTransport,
    /// Seconds to wait for the other ranks of the group to load and connect.
    #[arg(long, env = "DSD_EP_CONNECT_TIMEOUT_SECONDS", default_value_t = 600)]
    pub ep_connect_timeout_seconds: u64,
    /// Seconds a peer may be silent mid-step before the group counts as failed.
    #[arg(long, env = "DSD_EP_STALL_TIMEOUT_SECONDS", default_value_t = 30)]
    pub ep_stall_timeout_seconds: u64,
    /// Check the flags, the environment and the placement plan, print what this process
    /// would serve as (JSON) and exit, without loading the model or listening.
    #[arg(long)]
    pub dry_run: bool,
}

/// The ranks this process runs and the group around them.
#[derive(Debug, PartialEq, Eq)]
pub struct LocalRanks {
    pub first: u32,
    pub count: u32,
    pub group_size: u32,
    /// Expert-parallel listen address of each local rank.
    pub listen: Vec<String>,
}

impl ServeArgs {
    pub fn resolve(&self) -> Result<LocalRanks> {
        let ranks = resolve_ranks(self)?;
        self.read_plan(ranks.group_size)?;
        Ok(ranks)
    }

    /// The plan from `--placement`, checked against the group size; None without the flag.
    pub fn read_plan(&self, group_size: u32) -> Result<Option<PlacementPlan>> {
        let Some(path) = &self.placement else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--placement {}", path.display()))?;
        let plan = PlacementPlan::from_json(&text)
            .map_err(|e| Error::Message(format!("--placement {}: {e}", path.display())))?;
        if plan.group_size != group_size {
            bail!(
                "--placement {}: plan is for groupSize {}, but --group-size is {group_size}",
                path.display(),
                plan.group_size,
            );
        }
        Ok(Some(plan))
    }

    /// What `--dry-run` prints: the settings the operator's environment controls, and this
    /// process's ranks.
    pub fn dry_run_report(&self, ranks: &LocalRanks) -> serde_json::Value {
        serde_json::json!({
            "model": self.model,
            "served_name": self.served_name,
            "device": self.device.to_string(),
            "dtype": self.dtype.to_possible_value().map(|v| v.get_name().to_string()),
            "pool": self.pool,
            "listen": self.listen.to_string(),
            "metrics_listen": self.metrics_listen.map(|a| a.to_string()),
            "max_batch_tokens": self.max_batch_tokens,
            "kv_cache_fraction": self.kv_cache_fraction,
            "placement": self.placement,
            "first_rank": ranks.first,
            "ranks": ranks.count,
            "group_size": ranks.group_size,
            "expert_parallel_listen": ranks.listen,
            "peers": self.peers,
        })
    }
}

fn resolve_ranks(args: &ServeArgs) -> Result<LocalRanks> {
    if args.group_size == 0 {
        bail!("--group-size must be at least 1");
    }
    if args.ranks_per_pod == 0 {
        bail!("--ranks-per-pod must be at least 1");
    }
    let first = args.rank.unwrap_or(args.pod_index * args.ranks_per_pod);
    let end = first + args.ranks_per_pod;
    if end > args.group_size {
        bail!(
            "ranks {first}..{end} do not fit in a group of {} (--rank/--pod-index, --ranks-per-pod)",
            args.group_size
        );
    }
    let listen = if args.group_size == 1 && args.peers.is_empty() {
        vec![]
    } else if args.peers.len() != args.group_size as usize {
        bail!(
            "--peers lists {} addresses, expected --group-size = {}",
            args.peers.len(),
            args.group_size
        );
    } else {
        args.peers[first as usize..end as usize].to_vec()
    };
    Ok(LocalRanks {
        first,
        count: args.ranks_per_pod,
        group_size: args.group_size,
        listen,
    })
}

impl fmt::Display for LocalRanks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.first + self.count - 1;
        write!(f, "ranks {}..={last} of {}", self.first, self.group_size)?;
        if !self.listen.is_empty() {
            write!(f, ", expert-parallel on {}", self.listen.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn args(flags: &[&str]) -> ServeArgs {
        Cli::try_parse_from(std::iter::once("serve").chain(flags.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn the_pod_index_picks_this_pods_ranks_and_addresses() {
        let peers = "a:1,a:2,b:1,b:2";
        let ranks = resolve_ranks(&args(&[
            "--group-size",
            "4",
            "--ranks-per-pod",
            "2",
            "--pod-index",
            "1",
            "--peers",
            peers,
        ]))
        .unwrap();
        assert_eq!(
            ranks,
            LocalRanks {
                first: 2,
                count: 2,
                group_size: 4,
                listen: vec!["b:1".into(), "b:2".into()]
            }
        );
        assert_eq!(
            ranks.to_string(),
            "ranks 2..=3 of 4, expert-parallel on b:1, b:2"
        );
    }

    #[test]
    fn a_single_rank_needs_no_peers() {
        assert_eq!(
            resolve_ranks(&args(&[])).unwrap().to_string(),
            "ranks 0..=0 of 1"
        );
    }

    #[test]
    fn inconsistent_groups_are_refused_naming_the_flag() {
        let err = resolve_ranks(&args(&["--group-size", "4", "--peers", "a,b"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--peers lists 2 addresses, expected --group-size = 4"
        );
        let err = resolve_ranks(&args(&[
            "--group-size",
            "2",
            "--ranks-per-pod",
            "2",
            "--pod-index",
            "1",
            "--peers",
            "a,b",
        ]))
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("ranks 2..4 do not fit in a group of 2")
        );
        assert!(resolve_ranks(&args(&["--group-size", "0"])).is_err());
        let zero = Cli::try_parse_from(["serve", "--ranks-per-gpu", "0"])
            .err()
            .unwrap();
        assert!(zero.to_string().contains("--ranks-per-gpu"), "{zero}");
    }

    #[test]
    fn the_placement_plan_must_match_the_group() {
        let dir = std::env::temp_dir().join(format!("dsd-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plan.json");
        let plan = PlacementPlan::round_robin(2, 8, 0);
        std::fs::write(&path, serde_json::to_string(&plan).unwrap()).unwrap();
        let mut serve = args(&["--group-size", "2", "--peers", "a,b"]);
        serve.placement = Some(path.clone());
        serve.resolve().unwrap();
        serve.group_size = 4;
        serve.peers = vec!["a".into(), "b".into(), "c".into(), "d".into()];
        let err = serve.resolve().unwrap_err().to_string();
        assert!(
            err.ends_with("plan is for groupSize 2, but --group-size is 4"),
            "{err}"
        );
        std::fs::write(&path, "{\"version\": 1}").unwrap();
        assert!(
            serve
                .resolve()
                .unwrap_err()
                .to_string()
                .contains("missing field")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
