//! Benchmarks at DeepSeek-V3 shapes on random weights made on the GPU.

use cudarc::driver::CudaSlice;
use cudarc::driver::sys::CUevent_flags;
use serde_json::{Value, json};

use half::bf16;

use super::up;
use crate::config::Config;
use crate::ensure;
use crate::error::Result;
use crate::gpu::Dtype;
use crate::gpu::model::GpuModel;
use crate::gpu::runtime::{Fp8GemmInput, GateRule, Gpu, MoeOrder};
use crate::model::cache::BlockTable;

/// Milliseconds per call of `f`, by CUDA events over `reps` calls after two warm-ups.
pub(super) fn time_ms(gpu: &Gpu, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    f()?;
    let context = gpu.stream.context();
    let start = context.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = context.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    start.record(&gpu.stream)?;
    for _ in 0..reps {
        f()?;
    }
    end.record(&gpu.stream)?;
    Ok(f64::from(start.elapsed_ms(&end)?) / reps as f64)
}

// DeepSeek-V3's MoE sizes.
const HIDDEN: usize = 7168;
const WIDTH: usize = 2048; // moe_intermediate_size
const EXPERTS: usize = 256;
const TOPK: usize = 8;
/// Timed calls per measurement.
const REPS: usize = 10;

/// V3's router: sigmoid scores, the best 4 of 8 groups, top-8, normalised, scaled by 2.5.
const V3_GATE: GateRule = GateRule {
    sigmoid: true,
    method: 0,
    n_group: 8,
    topk_group: 4,
    topk: TOPK,
    normalize: true,
    scale: 2.5,
};

fn tflops(flops: f64, ms: f64) -> f64 {
    flops / ms / 1e9
}

/// FLOPs of the gate-and-up GEMM over `rows` expert rows.
fn gate_up_flops(rows: usize) -> f64 {
    2.0 * (rows * 2 * WIDTH * HIDDEN) as f64
}

/// FLOPs of the down GEMM over `rows` expert rows.
fn down_flops(rows: usize) -> f64 {
    2.0 * (rows * HIDDEN * WIDTH) as f64
}

/// DeepSeek-V3's MoE at its real sizes, on random weights made on the GPU.
pub(super) fn benchmarks(gpu: &Gpu) -> Result<Value> {
    let hbm = hbm_copy_gb_s(gpu)?;
    let weights = Weights::random(gpu)?;
    let mut prefill = PrefillBatch::new(gpu, 4096)?;
    let mut report = prefill.bench_bf16(gpu, &weights, hbm)?;
    if gpu.has_fp8_tensor_cores() {
        report["grouped_gemm_fp8"] = prefill.bench_fp8(gpu)?;
    }
    report["decode"] = bench_decode(gpu, &weights)?;
    Ok(report)
}

/// HBM bandwidth in GB/s: a device-to-device copy reads and writes every byte.
fn hbm_copy_gb_s(gpu: &Gpu) -> Result<f64> {
    let copy_bytes = 1usize << 32;
    let from = gpu.random_bf16(copy_bytes / 2, 1, 1.0)?;
    let mut to = gpu.stream.alloc_zeros::<bf16>(copy_bytes / 2)?;
    let copy_ms = time_ms(gpu, REPS, || Ok(gpu.stream.memcpy_dtod(&from, &mut to)?))?;
    Ok(2.0 * copy_bytes as f64 / copy_ms / 1e6)
}

/// Random bf16 weights: every routed expert, and one dense expert of the same shape for
/// cuBLAS to compare with.
struct Weights {
    gate_up: CudaSlice<bf16>,
    down: CudaSlice<bf16>,
    dense_gate_up: CudaSlice<bf16>,
    dense_down: CudaSlice<bf16>,
}

impl Weights {
    fn random(gpu: &Gpu) -> Result<Self> {
        Ok(Weights {
            gate_up: gpu.random_bf16(EXPERTS * 2 * WIDTH * HIDDEN, 2, 1.0)?,
            down: gpu.random_bf16(EXPERTS * HIDDEN * WIDTH, 3, 1.0)?,
            dense_gate_up: gpu.random_bf16(2 * WIDTH * HIDDEN, 4, 1.0)?,
            dense_down: gpu.random_bf16(HIDDEN * WIDTH, 5, 1.0)?,
        })
    }
}

/// A prefill-sized batch, routed and sorted once, with the buffers of every MoE stage.
struct PrefillBatch {
    tokens: usize,
    x: CudaSlice<f32>,
    gate_weights: CudaSlice<f32>,
    order: MoeOrder,
    xp: CudaSlice<bf16>,
    gate_up: CudaSlice<bf16>,
    h: CudaSlice<bf16>,
    expert_out: CudaSlice<bf16>,
    y: CudaSlice<f32>,
}

impl PrefillBatch {
    fn new(gpu: &Gpu, tokens: usize) -> Result<Self> {
        let logits = gpu.random_f32(tokens * EXPERTS, 6, 4.0)?;
        let mut chosen = gpu.stream.alloc_zeros::<i32>(tokens * TOPK)?;
        let mut gate_weights = gpu.stream.alloc_zeros::<f32>(tokens * TOPK)?;
        gpu.moe_gate(
            &logits,
            None,
            EXPERTS,
            V3_GATE,
            &mut chosen,
            &mut gate_weights,
        )?;
        let order = gpu.moe_sort(&chosen, TOPK, EXPERTS)?;
        let rows = order.rows;
        Ok(PrefillBatch {
            tokens,
            x: gpu.random_f32(tokens * HIDDEN, 7, 1.0)?,
            gate_weights,
            order,
            xp: gpu.stream.alloc_zeros::<bf16>(rows * HIDDEN)?,
            gate_up: gpu.stream.alloc_zeros::<bf16>(rows * 2 * WIDTH)?,
            h: gpu.stream.alloc_zeros::<bf16>(rows * WIDTH)?,
            expert_out: gpu.stream.alloc_zeros::<bf16>(rows * HIDDEN)?,
            y: gpu.stream.alloc_zeros::<f32>(tokens * HIDDEN)?,
        })
    }

    /// The bf16 grouped GEMMs against cuBLAS on one dense expert of as many rows, and the
    /// permute and combine bandwidth (also as a fraction of `hbm`, GB/s).
    fn bench_bf16(&mut self, gpu: &Gpu, weights: &Weights, hbm: f64) -> Result<Value> {
        let (tokens, rows, order) = (self.tokens, self.order.rows, &self.order);
        let permute_ms = time_ms(gpu, REPS, || {
            gpu.moe_permute(&self.x, order, &mut self.xp, HIDDEN)
        })?;
        let permute_bytes = (rows * HIDDEN * (4 + 2)) as f64;
        let gate_up_ms = time_ms(gpu, REPS, || {
            gpu.grouped_gemm_bf16(
                &self.xp,
                &weights.gate_up,
                &mut self.gate_up,
                order,
                2 * WIDTH,
                HIDDEN,
            )
        })?;
        gpu.silu_mul(&self.gate_up, &mut self.h, rows)?;
        let down_ms = time_ms(gpu, REPS, || {
            gpu.grouped_gemm_bf16(
                &self.h,
                &weights.down,
                &mut self.expert_out,
                order,
                HIDDEN,
                WIDTH,
            )
        })?;
        let unpermute_ms = time_ms(gpu, REPS, || {
            gpu.moe_unpermute(
                &self.expert_out,
                order,
                &self.gate_weights,
                &mut self.y,
                HIDDEN,
            )
        })?;
        let unpermute_bytes = (rows * HIDDEN * 2 + tokens * HIDDEN * 4) as f64;
        let cublas_gate_up_ms = time_ms(gpu, REPS, || {
            gpu.linear(
                &self.xp,
                &weights.dense_gate_up,
                &mut self.gate_up,
                (rows, 2 * WIDTH, HIDDEN),
            )
        })?;
        let cublas_down_ms = time_ms(gpu, REPS, || {
            gpu.linear(
                &self.h,
                &weights.dense_down,
                &mut self.expert_out,
                (rows, HIDDEN, WIDTH),
            )
        })?;
        let (gate_up_flops, down_flops) = (gate_up_flops(rows), down_flops(rows));
        Ok(json!({
            "shapes": format!("{tokens} tokens × top-{TOPK} = {rows} rows over {EXPERTS} experts; hidden {HIDDEN}, expert width {WIDTH}"),
            "hbm_copy_gb_s": hbm,
            "grouped_gemm_bf16": {
                "gate_up_tflops": tflops(gate_up_flops, gate_up_ms),
                "down_tflops": tflops(down_flops, down_ms),
                "cublas_dense_gate_up_tflops": tflops(gate_up_flops, cublas_gate_up_ms),
                "cublas_dense_down_tflops": tflops(down_flops, cublas_down_ms),
                "ratio_to_cublas": (cublas_gate_up_ms + cublas_down_ms) / (gate_up_ms + down_ms),
            },
            "permute_gb_s": permute_bytes / permute_ms / 1e6,
            "unpermute_gb_s": unpermute_bytes / unpermute_ms / 1e6,
            "permute_fraction_of_hbm": permute_bytes / permute_ms / 1e6 / hbm,
            "unpermute_fraction_of_hbm": unpermute_bytes / unpermute_ms / 1e6 / hbm,
        }))
    }

    /// The FP8 grouped GEMMs (128×128 weight and 1×128 activation scales) on the same rows.
    fn bench_fp8(&mut self, gpu: &Gpu) -> Result<Value> {
        let (rows, order) = (self.order.rows, &self.order);
        let (kb_hidden, kb_width) = (HIDDEN.div_ceil(128), WIDTH.div_ceil(128));
        let w8_gate_up = gpu.random_fp8(EXPERTS * 2 * WIDTH * HIDDEN, 8, 448.0)?;
        let s_gate_up = gpu.random_f32(EXPERTS * (2 * WIDTH / 128) * kb_hidden, 9, 1e-3)?;
        let w8_down = gpu.random_fp8(EXPERTS * HIDDEN * WIDTH, 10, 448.0)?;
        let s_down = gpu.random_f32(EXPERTS * (HIDDEN / 128) * kb_width, 11, 1e-3)?;
        let mut x8 = gpu.stream.alloc_zeros::<u8>(rows * HIDDEN)?;
        let mut x8_scale = gpu.stream.alloc_zeros::<f32>(rows * kb_hidden)?;
        gpu.moe_permute_fp8(&self.x, order, &mut x8, &mut x8_scale, HIDDEN)?;
        let h8 = gpu.random_fp8(rows * WIDTH, 12, 448.0)?;
        let h8_scale = gpu.random_f32(rows * kb_width, 13, 1e-3)?;
        let fp8_gate_up_ms = time_ms(gpu, REPS, || {
            gpu.grouped_gemm_fp8(
                Fp8GemmInput::Fp8(&x8, &x8_scale),
                (&w8_gate_up, &s_gate_up),
                &mut self.gate_up,
                order,
                2 * WIDTH,
                HIDDEN,
            )
        })?;
        let fp8_down_ms = time_ms(gpu, REPS, || {
            gpu.grouped_gemm_fp8(
                Fp8GemmInput::Fp8(&h8, &h8_scale),
                (&w8_down, &s_down),
                &mut self.expert_out,
                order,
                HIDDEN,
                WIDTH,
            )
        })?;
        let (gate_up_flops, down_flops) = (gate_up_flops(rows), down_flops(rows));
        Ok(json!({
            "gate_up_tflops": tflops(gate_up_flops, fp8_gate_up_ms),
            "down_tflops": tflops(down_flops, fp8_down_ms),
            "overall_tflops": tflops(gate_up_flops + down_flops, fp8_gate_up_ms + fp8_down_ms),
        }))
    }
}

/// Decode: 64 sequences, one token each. The MoE block end to end and absorbed MLA
/// attention over 4,096 positions.
fn bench_decode(gpu: &Gpu, weights: &Weights) -> Result<Value> {
    let (batch, context) = (64, 4096);
    let moe_ms = decode_moe_block_ms(gpu, weights, batch)?;
    let (mla_ms, cache_bytes) = decode_mla(gpu, batch, context)?;
    Ok(json!({
        "batch": batch,
        "moe_block_ms": moe_ms,
        "mla_attention_ms": mla_ms,
        "mla_cache_gb_s": cache_bytes / mla_ms / 1e6,
        "context": context,
        "note": "one layer's MoE block and attention core; the dense projections are not in yet",
    }))
}

/// Milliseconds per MoE block of `batch` tokens: gate, sort, permute, both grouped GEMMs,
/// SiLU, combine.
fn decode_moe_block_ms(gpu: &Gpu, weights: &Weights, batch: usize) -> Result<f64> {
    let logits = gpu.random_f32(batch * EXPERTS, 14, 4.0)?;
    let x = gpu.random_f32(batch * HIDDEN, 15, 1.0)?;
    let mut chosen = gpu.stream.alloc_zeros::<i32>(batch * TOPK)?;
    let mut gate_weights = gpu.stream.alloc_zeros::<f32>(batch * TOPK)?;
    let pairs = batch * TOPK;
    let mut xp = gpu.stream.alloc_zeros::<bf16>(pairs * HIDDEN)?;
    let mut gate_up = gpu.stream.alloc_zeros::<bf16>(pairs * 2 * WIDTH)?;
    let mut h = gpu.stream.alloc_zeros::<bf16>(pairs * WIDTH)?;
    let mut expert_out = gpu.stream.alloc_zeros::<bf16>(pairs * HIDDEN)?;
    let mut y = gpu.stream.alloc_zeros::<f32>(batch * HIDDEN)?;
    let (w_gate_up, w_down) = (&weights.gate_up, &weights.down);
    time_ms(gpu, REPS, || {
        gpu.moe_gate(
            &logits,
            None,
            EXPERTS,
            V3_GATE,
            &mut chosen,
            &mut gate_weights,
        )?;
        let order = gpu.moe_sort(&chosen, TOPK, EXPERTS)?;
        gpu.moe_permute(&x, &order, &mut xp, HIDDEN)?;
        gpu.grouped_gemm_bf16(&xp, w_gate_up, &mut gate_up, &order, 2 * WIDTH, HIDDEN)?;
        gpu.silu_mul(&gate_up, &mut h, pairs)?;
        gpu.grouped_gemm_bf16(&h, w_down, &mut expert_out, &order, HIDDEN, WIDTH)?;
        gpu.moe_unpermute(&expert_out, &order, &gate_weights, &mut y, HIDDEN)
    })
}

/// Milliseconds per absorbed MLA decode of `batch` sequences at `context` positions (V3's
/// 128 heads, latent rank 512, rope 64), and the cache bytes each call reads.
fn decode_mla(gpu: &Gpu, batch: usize, context: usize) -> Result<(f64, f64)> {
    let (heads, rank, rope) = (128, 512, 64);
    let per_seq = context / crate::model::cache::BLOCK_TOKENS;
    let c_kv = gpu.random_bf16(batch * context * rank, 16, 1.0)?;
    let k_pe = gpu.random_bf16(batch * context * rope, 17, 1.0)?;
    let table: Vec<i32> = (0..(batch * per_seq) as i32).collect();
    let table = up(gpu, &table)?;
    let lengths = up(gpu, &vec![context as i32; batch])?;
    let q_lat = gpu.random_f32(batch * heads * rank, 18, 0.1)?;
    let q_pe = gpu.random_f32(batch * heads * rope, 19, 0.1)?;
    let mut out = gpu.stream.alloc_zeros::<f32>(batch * heads * rank)?;
    let mla_ms = time_ms(gpu, REPS, || {
        gpu.mla_decode(
            &q_lat,
            &q_pe,
            &c_kv,
            &k_pe,
            (&table, per_seq),
            &lengths,
            &mut out,
            (batch, heads, rank, rope),
            0.1,
        )
    })?;
    let cache_bytes = (batch * context * (rank + rope) * 2) as f64;
    Ok((mla_ms, cache_bytes))
}

/// DeepSeek-V3's shapes with `layers` MoE layers (a published config.json's fields).
pub(super) fn v3_config(layers: usize) -> Result<Config> {
    Ok(Config::from_json(&format!(
        r#"{{"model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
            "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "num_hidden_layers": {layers}, "num_attention_heads": 128, "n_shared_experts": 1,
            "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
            "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
            "num_experts_per_tok": 8, "first_k_dense_replace": 0, "norm_topk_prob": true,
            "scoring_func": "sigmoid", "max_position_embeddings": 163840, "rope_theta": 10000,
            "rope_scaling": {{"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}}}"#
    ))?)
}

/// One decode step of 64 sequences at 4,096 positions through the whole GPU model step
/// (embedding, layers, final norm, lm_head, the logits' copy to the host), with two V3 MoE
/// layers and with one: the difference is one layer's decode latency. Experts in bf16, and
/// in FP8 where the GPU has FP8 tensor cores.
pub(super) fn layer_benchmark(device: usize) -> Result<Value> {
    let gpu = Gpu::open(device)?;
    let mut dtypes = vec![Dtype::Bf16];
    if gpu.has_fp8_tensor_cores() {
        dtypes.push(Dtype::Fp8);
    }
    drop(gpu);
    let mut report = json!({"batch": 64, "context": 4096,
        "note": "random V3-shaped weights; wall time of GpuModel::forward_batch, logits copied to the host"});
    for dtype in dtypes {
        let name = if dtype == Dtype::Fp8 { "fp8" } else { "bf16" };
        report[name] =
            layer_latency(device, dtype).unwrap_or_else(|e| json!({"error": format!("{e}")}));
    }
    Ok(report)
}

pub(super) fn layer_latency(device: usize, dtype: Dtype) -> Result<Value> {
    let (batch, context, reps) = (64, 4096, 5);
    let mut step_ms = Vec::new();
    for layers in [2, 1] {
        let model = GpuModel::random(v3_config(layers)?, Gpu::open(device)?, dtype, 7)?;
        let blocks = batch * (context / crate::model::cache::BLOCK_TOKENS + 1);
        let (mut kv, mut pool) = model.new_kv(blocks)?;
        let mut tables: Vec<BlockTable> = (0..batch).map(|_| BlockTable::default()).collect();
        for table in &mut tables {
            // context is a multiple of 16, so positions context..context + 16 share one block
            ensure!(pool.reserve(table, context + 16), "pool too small");
            table.advance(context); // stands for a prompt already in the cache
        }
        let tokens: Vec<u32> = (0..batch as u32).collect();
        let mut time = || -> Result<f64> {
            let started = std::time::Instant::now();
            let mut segments: Vec<(usize, &mut BlockTable)> =
                tables.iter_mut().map(|t| (1, t)).collect();
            // each repetition decodes the next position
            model.forward_batch(&tokens, &mut kv, &mut segments, true)?;
            Ok(started.elapsed().as_secs_f64() * 1e3)
        };
        time()?;
        time()?;
        let total: f64 = (0..reps).map(|_| time()).sum::<Result<f64>>()?;
        step_ms.push(total / reps as f64);
    }
    Ok(json!({
        "step_with_two_layers_ms": step_ms[0],
        "step_with_one_layer_ms": step_ms[1],
        "layer_ms": step_ms[0] - step_ms[1],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_benchmark_model_is_deepseek_v3_shaped() {
        let cfg = v3_config(1).unwrap();
        assert_eq!((cfg.hidden_size, cfg.moe.n_routed_experts), (7168, 256));
        assert!(cfg.is_moe_layer(0) && cfg.yarn.is_some());
        assert_eq!(v3_config(2).unwrap().num_hidden_layers, 2);
    }

    #[test]
    fn the_memory_plans_deepseek_v3_is_the_published_config() {
        // The published config.json's fields, here with every layer MoE.
        let shape = v3_config(61).unwrap().shape();
        let published = deepseek_proto::memory::ModelShape::DEEPSEEK_V3;
        assert_eq!(
            shape,
            deepseek_proto::memory::ModelShape {
                dense_layers: 0,
                ..published
            }
        );
    }
}
