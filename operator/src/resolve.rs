//! Resolve a spec into concrete per-pool numbers, or say why it cannot be realised.
//!
//! The CRD schema rejects most bad specs at admission; this repeats the checks that matter
//! (an older CRD may be installed) and adds the ones the schema cannot express.

use std::collections::BTreeMap;

use deepseek_proto::memory::{self, MemoryPlan, Rank, WeightFormat};
use deepseek_proto::pod;

use crate::api::{DeepSeekDeployment, Dtype, PoolSpec};
use crate::gpu::{self, GpuArch};

/// A pool with every default applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedPool {
    pub name: String,
    /// `None` for a CPU pool.
    pub gpu_product: Option<String>,
    pub arch: Option<GpuArch>,
    pub dtype: Dtype,
    /// Ranks per pod (one per GPU).
    pub ranks_per_pod: i32,
    pub pods_per_group: i32,
    /// Expert-parallel ranks per group.
    pub group_size: i32,
    /// Desired groups.
    pub replicas: i32,
    pub weight: i32,
    /// Routed experts per MoE layer, which the pool's placement plan spreads over its ranks.
    pub routed_experts: u32,
    /// The pool as written, for its overrides (node selector, tolerations, affinity,
    /// resources).
    pub spec: PoolSpec,
    /// Where a rank's GPU memory goes; `None` for a CPU pool, or when the model's shape
    /// (`model.architecture`) or the GPU's memory is unknown.
    pub memory: Option<MemoryPlan>,
}

/// The share of GPU memory the worker may use when `worker.kvCacheFraction` is not set
/// (vLLM's default `gpu_memory_utilization`).
pub const DEFAULT_GPU_MEMORY_FRACTION: f64 = 0.9;

/// Why a spec cannot be realised. `reason()` is the condition reason; the message names the
/// field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "spec.pools[{pool}].gpuProduct: unknown GPU product {product:?}; expected an \
         nvidia.com/gpu.product label value of an Ampere, Ada, Hopper or Blackwell GPU, \
         such as NVIDIA-H100-80GB-HBM3 or NVIDIA-A100-SXM4-80GB"
    )]
    UnknownGpuProduct { pool: String, product: String },
    #[error("spec.pools[{pool}]: {message}")]
    InvalidPool { pool: String, message: String },
    #[error(
        "spec.model: cannot place experts without their count; set model.architecture or \
         model.routedExperts"
    )]
    UnknownExpertCount,
    #[error("spec.pools: pool name {0:?} is used twice")]
    DuplicatePool(String),
    #[error("spec.pools: at least one pool is required")]
    NoPools,
    #[error("spec.model.source: needs exactly one of huggingFace or pvc")]
    ModelSource,
    #[error("metadata.name: {0:?} is too long; names of its objects must stay DNS labels (≤ 63)")]
    NameTooLong(String),
    #[error(
        "spec.pools[{pool}]: the model does not fit a rank's {product}: {plan}; a pass needs \
         {batch_tokens} tokens of cache (use more ranks per group, fewer redundant experts or a \
         smaller worker.maxBatchTokens)"
    )]
    InsufficientGpuMemory {
        pool: String,
        product: String,
        plan: String,
        batch_tokens: u64,
    },
}

impl SpecError {
    pub fn reason(&self) -> &'static str {
        match self {
            SpecError::UnknownGpuProduct { .. } => "UnknownGpuProduct",
            SpecError::UnknownExpertCount => "UnknownExpertCount",
            SpecError::InsufficientGpuMemory { .. } => "InsufficientGpuMemory",
            _ => "InvalidSpec",
        }
    }
}

/// Pods of a StatefulSet get `{sts}-{index}` names and a `controller-revision-hash` label that
/// must fit in 63 characters; leave room for the pool, group, index and suffix.
const MAX_NAME: usize = 30;

pub fn resolve(
    dsd: &DeepSeekDeployment,
    full: &BTreeMap<String, i32>,
) -> Result<Vec<ResolvedPool>, SpecError> {
    let spec = &dsd.spec;
    let name = dsd.metadata.name.clone().unwrap_or_default();
    if name.len() > MAX_NAME {
        return Err(SpecError::NameTooLong(name));
    }
    if spec.pools.is_empty() {
        return Err(SpecError::NoPools);
    }
    let source = &spec.model.source;
    if source.hugging_face.is_some() == source.pvc.is_some() {
        return Err(SpecError::ModelSource);
    }
    for (i, pool) in spec.pools.iter().enumerate() {
        if spec.pools[..i].iter().any(|p| p.name == pool.name) {
            return Err(SpecError::DuplicatePool(pool.name.clone()));
        }
    }
    if spec.autoscaling.is_some()
        && let Some(pool) = spec.pools.iter().find(|p| p.max_replicas.is_none())
    {
        return Err(SpecError::InvalidPool {
            pool: pool.name.clone(),
            message: "maxReplicas is required with spec.autoscaling".into(),
        });
    }
    let experts = routed_experts(dsd)?;
    let replicas = pool_replicas(spec.replicas, &spec.pools, full);
    spec.pools
        .iter()
        .zip(replicas)
        .map(|(pool, replicas)| resolve_pool(dsd, pool, replicas, experts))
        .collect()
}

/// Routed experts per MoE layer: `model.routedExperts`, else the architecture's count.
/// Resolution carries it on every pool; the controller reads it before resolving, to parse
/// measured expert load.
pub fn routed_experts(dsd: &DeepSeekDeployment) -> Result<u32, SpecError> {
    let model = &dsd.spec.model;
    model
        .routed_experts
        .or(model.architecture.map(|a| a.routed_experts()))
        .ok_or(SpecError::UnknownExpertCount)
}

fn resolve_pool(
    dsd: &DeepSeekDeployment,
    pool: &PoolSpec,
    replicas: i32,
    routed_experts: u32,
) -> Result<ResolvedPool, SpecError> {
    let invalid = |message: String| SpecError::InvalidPool {
        pool: pool.name.clone(),
        message,
    };
    let arch = match &pool.gpu_product {
        Some(product) => {
            Some(
                gpu::arch_of(product).ok_or_else(|| SpecError::UnknownGpuProduct {
                    pool: pool.name.clone(),
                    product: product.clone(),
                })?,
            )
        }
        None => None,
    };
    let dtype = pool.dtype.unwrap_or(dsd.spec.model.dtype);
    let dtype = match arch {
        Some(_) => gpu::resolve_dtype(dtype),
        // The CPU path computes in f32 from whatever the checkpoint holds.
        None => dtype,
    };
    let ranks_per_pod = pool.gpus_per_pod;
    if ranks_per_pod < 1 {
        return Err(invalid(format!(
            "gpusPerPod must be ≥ 1, got {ranks_per_pod}"
        )));
    }
    let group_size = match (
        dsd.spec.parallelism.expert_parallel_ranks,
        pool.pods_per_group,
    ) {
        (Some(ranks), Some(pods)) if ranks != pods * ranks_per_pod => {
            return Err(invalid(format!(
                "podsPerGroup × gpusPerPod = {pods} × {ranks_per_pod} differs from \
                 parallelism.expertParallelRanks = {ranks}"
            )));
        }
        (Some(ranks), _) if ranks % ranks_per_pod != 0 => {
            return Err(invalid(format!(
                "parallelism.expertParallelRanks = {ranks} is not divisible by \
                 gpusPerPod = {ranks_per_pod}"
            )));
        }
        (Some(ranks), _) => ranks,
        (None, pods) => pods.unwrap_or(1) * ranks_per_pod,
    };
    if group_size < 1 {
        return Err(invalid(format!(
            "a group needs at least one rank, got {group_size}"
        )));
    }
    if let (Some(min), Some(max)) = (pool.min_replicas, pool.max_replicas)
        && min > max
    {
        return Err(invalid(format!("minReplicas {min} > maxReplicas {max}")));
    }
    let memory = memory_plan(dsd, pool, dtype, group_size, routed_experts);
    check_fits(dsd, pool, memory.as_ref())?;
    Ok(ResolvedPool {
        name: pool.name.clone(),
        gpu_product: pool.gpu_product.clone(),
        arch,
        dtype,
        ranks_per_pod,
        pods_per_group: group_size / ranks_per_pod,
        group_size,
        replicas: replicas.max(0),
        weight: pool.weight,
        routed_experts,
        spec: pool.clone(),
        memory,
    })
}

/// A pool whose rank's cache would not hold one pass is refused, with the plan's numbers.
fn check_fits(
    dsd: &DeepSeekDeployment,
    pool: &PoolSpec,
    memory: Option<&MemoryPlan>,
) -> Result<(), SpecError> {
    let (Some(plan), Some(product)) = (memory, &pool.gpu_product) else {
        return Ok(());
    };
    let batch_tokens = batch_tokens(dsd);
    if plan.fits(batch_tokens) {
        return Ok(());
    }
    Err(SpecError::InsufficientGpuMemory {
        pool: pool.name.clone(),
        product: product.clone(),
        plan: plan.to_string(),
        batch_tokens,
    })
}

/// Tokens of one scheduler pass: `worker.maxBatchTokens`, else the worker's default.
pub fn batch_tokens(dsd: &DeepSeekDeployment) -> u64 {
    dsd.spec
        .worker
        .max_batch_tokens
        .map_or(u64::from(pod::DEFAULT_MAX_BATCH_TOKENS), |t| {
            t.max(1) as u64
        })
}

/// A rank's memory plan on the pool's GPU, as the worker will hold the model.
fn memory_plan(
    dsd: &DeepSeekDeployment,
    pool: &PoolSpec,
    dtype: Dtype,
    group_size: i32,
    routed_experts: u32,
) -> Option<MemoryPlan> {
    let shape = dsd.spec.model.architecture?.shape(routed_experts)?;
    let rank = Rank {
        gpu_bytes: gpu::memory_bytes(pool.gpu_product.as_deref()?)?,
        memory_fraction: dsd
            .spec
            .worker
            .kv_cache_fraction
            .unwrap_or(DEFAULT_GPU_MEMORY_FRACTION),
        group_size: group_size as u64,
        redundant_experts: dsd.spec.parallelism.redundant_experts.max(0) as u64,
        weights: WeightFormat::on_gpu(dtype == Dtype::Fp8),
        batch_tokens: batch_tokens(dsd),
    };
    Some(memory::plan(&shape, &rank))
}

/// Groups per pool. Without a total, each pool runs its own `replicas`. With one, every pool
/// first gets its `minReplicas`, then the rest fills pools by weight, highest first (ties in
/// list order), each up to its `maxReplicas` (none: all that is left) or, for a pool found
/// `full` (by name: the groups it holds), to those; the total is clamped to what the bounds
/// allow.
pub fn pool_replicas(
    total: Option<i32>,
    pools: &[PoolSpec],
    full: &BTreeMap<String, i32>,
) -> Vec<i32> {
    let Some(total) = total else {
        return pools.iter().map(|p| p.replicas).collect();
    };
    let mut counts: Vec<i32> = pools.iter().map(|p| p.min_replicas.unwrap_or(0)).collect();
    let mut left = total - counts.iter().sum::<i32>();
    let mut by_weight: Vec<usize> = (0..pools.len()).collect();
    by_weight.sort_by_key(|&i| std::cmp::Reverse(pools[i].weight));
    for i in by_weight {
        if left <= 0 {
            break;
        }
        let pool = &pools[i];
        let held = full.get(&pool.name).copied();
        let ceiling = match (pool.max_replicas, held) {
            (Some(max), Some(held)) => Some(max.min(held)),
            (max, held) => max.or(held),
        };
        let room = ceiling.map_or(left, |ceiling| (ceiling - counts[i]).max(0));
        let add = room.min(left);
        counts[i] += add;
        left -= add;
    }
    counts
}
