//! What a GPU rank checks before it loads anything: that its GPU is the product its pool
//! names, and that its part of the model fits the memory the GPU has free. A misplaced or
//! oversized rank then says why at once (in its log and its pod's termination message)
//! instead of failing deep in loading, or running out of memory mid-pass.

use deepseek_proto::memory::{self, MemoryPlan, ModelShape, Rank, WeightFormat};
use deepseek_proto::placement::PlacementPlan;

use crate::bail;
use crate::error::Result;

/// The GPU is `expected` (an `nvidia.com/gpu.product` label): GPU feature discovery makes
/// the label from the device name, spaces as dashes, and may add `-SHARED` (time-slicing) or
/// `-MIG-…` (a MIG profile).
pub fn check_product(device_name: &str, expected: &str) -> Result<()> {
    let label = device_name.trim().replace(' ', "-");
    let suffix = expected.strip_prefix(&label);
    if suffix.is_some_and(|s| s.is_empty() || s == "-SHARED" || s.starts_with("-MIG-")) {
        return Ok(());
    }
    bail!(
        "this pod's pool runs on {expected} but its GPU is {device_name:?} ({label}); \
         check the pool's gpuProduct and the node's nvidia.com/gpu.product label"
    )
}

/// What one rank of a group will hold.
pub struct RankLoad<'a> {
    pub shape: ModelShape,
    pub plan: &'a PlacementPlan,
    /// Whether the rank holds an FP8 checkpoint's linear weights in FP8
    /// (`WeightFormat::on_gpu`).
    pub fp8: bool,
    pub batch_tokens: u64,
    pub memory_fraction: f64,
}

/// The rank's memory plan on a GPU of `total` bytes with `free` of them free now: refused
/// when its weights and a pass's working space do not fit what is free within the fraction,
/// with room for at least one pass's KV cache.
pub fn check_memory(load: &RankLoad<'_>, free: u64, total: u64) -> Result<MemoryPlan> {
    let copies: usize = load.plan.default.iter().map(Vec::len).sum();
    let routed = load.shape.routed_experts;
    let rank = Rank {
        gpu_bytes: total,
        memory_fraction: load.memory_fraction,
        group_size: u64::from(load.plan.group_size),
        redundant_experts: (copies as u64).saturating_sub(routed),
        weights: WeightFormat::on_gpu(load.fp8),
        batch_tokens: load.batch_tokens,
    };
    let mut plan = memory::plan(&load.shape, &rank);
    // What others already hold on this GPU is not ours to use.
    let held_elsewhere = total - free.min(total);
    let kv_bytes = plan.kv_tokens * plan.kv_per_token;
    plan.kv_tokens = kv_bytes.saturating_sub(held_elsewhere) / plan.kv_per_token;
    if !plan.fits(load.batch_tokens) {
        let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
        bail!(
            "this rank does not fit its GPU: {plan}, with {:.1} GiB of the GPU's {:.1} GiB \
             already in use; a pass of {} tokens needs its cache",
            gib(held_elsewhere),
            gib(total),
            load.batch_tokens
        );
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gpu_must_be_the_pools_product() {
        check_product("NVIDIA H100 80GB HBM3", "NVIDIA-H100-80GB-HBM3").unwrap();
        check_product("NVIDIA H100 80GB HBM3", "NVIDIA-H100-80GB-HBM3-SHARED").unwrap();
        let wrong = check_product("NVIDIA A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3")
            .unwrap_err()
            .to_string();
        assert!(wrong.contains("runs on NVIDIA-H100-80GB-HBM3"), "{wrong}");
        assert!(wrong.contains("\"NVIDIA A100-SXM4-80GB\""), "{wrong}");
        assert!(check_product("NVIDIA H100", "NVIDIA-H100-80GB-HBM3").is_err());
    }

    #[test]
    fn a_rank_fits_only_in_the_memory_left_free() {
        let plan = PlacementPlan::round_robin(32, 256, 32);
        let load = RankLoad {
            shape: ModelShape::DEEPSEEK_V3,
            plan: &plan,
            fp8: true,
            batch_tokens: 4096,
            memory_fraction: 0.9,
        };
        let total = 81_559u64 << 20;
        let idle = check_memory(&load, total, total).unwrap();
        assert_eq!(idle.expert_slots, 9);
        // Another process holding 5 GiB costs this rank that much cache.
        let shared = check_memory(&load, total - (5 << 30), total).unwrap();
        assert_eq!(
            idle.kv_tokens - shared.kv_tokens,
            (5u64 << 30).div_ceil(idle.kv_per_token)
        );
        let full = check_memory(&load, total - (20 << 30), total)
            .unwrap_err()
            .to_string();
        assert!(full.contains("does not fit its GPU"), "{full}");
        assert!(
            full.contains("20.0 GiB of the GPU's 79.6 GiB already in use"),
            "{full}"
        );
    }
}
