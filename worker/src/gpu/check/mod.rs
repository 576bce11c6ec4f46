//! `deepseek-worker gpu-check`: every kernel against the CPU path (the reference) on small
//! shapes, including the tiny fixtures' router configurations, and the whole model step on
//! the three tiny fixtures (greedy tokens and logits); then — with `--bench` —
//! benchmarks at DeepSeek-V3 shapes on random weights made on the GPU. The result is one
//! JSON report; `tests/gpu/run.sh` runs it.

mod bench;
mod experts;
mod kernels;
mod model;

use std::path::Path;

use cudarc::driver::{CudaSlice, DeviceRepr};
use half::bf16;
use serde_json::{Value, json};

use self::bench::{benchmarks, layer_benchmark};
use self::experts::{
    check_dequant_fp8, check_grouped_gemm_bf16, check_grouped_gemm_fp8,
    check_grouped_gemm_fp8_weights, check_linear_fp8, check_permute,
};
use self::kernels::{
    check_mla_decode, check_moe_gate, check_rms_norm, check_rope, check_sample, check_silu_mul,
};
use self::model::{
    check_batched_step, check_device_sampling, check_expert_parallel, check_model_step, check_nccl,
};
use super::runtime::Gpu;
use crate::config::Config;
use crate::error::{Context, Result};
use crate::sampling::{Rng, SamplingParams};

/// One kernel compared with the CPU path: the largest error and what it may be.
struct Check {
    name: String,
    error: f64,
    tolerance: f64,
    detail: String,
}

impl Check {
    fn new(name: impl Into<String>, error: f64, tolerance: f64, detail: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            error,
            tolerance,
            detail: detail.into(),
        }
    }

    fn json(&self) -> Value {
        json!({
            "name": self.name,
            "passed": self.error <= self.tolerance,
            "max_error": self.error,
            "tolerance": self.tolerance,
            "detail": self.detail,
        })
    }
}

/// Runs the checks (and the benchmarks when `bench`); `fixtures` holds the tiny checkpoints'
/// directories. The report's `passed` is false when any check failed.
pub fn run(device: usize, fixtures: &Path, bench: bool) -> Result<Value> {
    let gpu = Gpu::open(device)?;
    let configs: Vec<(String, Config)> = ["tiny-v3-bf16", "tiny-v3-fp8", "tiny-v2-lite"]
        .iter()
        .map(|name| {
            let path = fixtures.join(name).join("config.json");
            Config::from_file(&path)
                .with_context(|| path.display().to_string())
                .map(|c| (name.to_string(), c))
        })
        .collect::<Result<_>>()?;

    let mut checks: Vec<Value> = Vec::new();
    let mut record = |name: &str, result: Result<Vec<Check>>| match result {
        Ok(list) => checks.extend(list.iter().map(Check::json)),
        Err(e) => checks.push(json!({"name": name, "passed": false, "error": format!("{e}")})),
    };
    record("rms_norm", check_rms_norm(&gpu));
    record("silu_mul", check_silu_mul(&gpu));
    record("rope", check_rope(&gpu, &configs[0].1));
    record("moe_gate", check_moe_gate(&gpu, &configs));
    record("moe_sort_permute", check_permute(&gpu));
    record("grouped_gemm_bf16", check_grouped_gemm_bf16(&gpu));
    if gpu.has_fp8_tensor_cores() {
        record("grouped_gemm_fp8", check_grouped_gemm_fp8(&gpu));
    }
    record(
        "grouped_gemm_fp8_weights",
        check_grouped_gemm_fp8_weights(&gpu),
    );
    record("linear_fp8", check_linear_fp8(&gpu));
    record("dequant_fp8", check_dequant_fp8(&gpu));
    record("mla_decode", check_mla_decode(&gpu));
    record("sample", check_sample(&gpu));
    for (name, _) in &configs {
        record(
            &format!("model_step/{name}"),
            check_model_step(device, &fixtures.join(name)),
        );
    }
    let tiny = fixtures.join("tiny-v3-bf16");
    record("model_step/batched", check_batched_step(device, &tiny));
    record("expert_parallel", check_expert_parallel(device, &tiny));
    record("device_sampling", check_device_sampling(device, &tiny));
    record("nccl", check_nccl(device));
    let passed = checks.iter().all(|c| c["passed"] == true);

    let benchmarks = if bench {
        let mut report = benchmarks(&gpu).unwrap_or_else(|e| json!({"error": format!("{e}")}));
        report["decode_layer"] =
            layer_benchmark(device).unwrap_or_else(|e| json!({"error": format!("{e}")}));
        report
    } else {
        Value::Null
    };
    Ok(json!({
        "device": gpu.name,
        "architecture": gpu.architecture,
        "compiler": gpu.compiler,
        "passed": passed,
        "checks": checks,
        "benchmarks": benchmarks,
    }))
}

/// Host data: uniform in [−scale, scale), reproducible.
pub(super) fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32 * scale)
        .collect()
}

pub(super) fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

pub(super) fn up<T: DeviceRepr>(gpu: &Gpu, host: &[T]) -> Result<CudaSlice<T>> {
    Ok(gpu.stream.clone_htod(host)?)
}

pub(super) fn down<T: DeviceRepr + Default + Clone>(
    gpu: &Gpu,
    device: &CudaSlice<T>,
) -> Result<Vec<T>> {
    Ok(gpu.stream.clone_dtoh(device)?)
}

/// Largest |a − b|.
pub(super) fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max)
}

/// Largest |a − b| relative to the largest |b|: for bf16 outputs of long sums.
pub(super) fn relative_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().map(|x| f64::from(x.abs())).fold(1e-30, f64::max);
    max_diff(a, b) / scale
}

/// Greedy, temperature alone, and each cut alone and together.
pub(super) fn sampling_cases() -> [SamplingParams; 6] {
    [
        SamplingParams::default(),
        SamplingParams {
            temperature: 1.0,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.7,
            top_k: 40,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.9,
            top_p: 0.9,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.3,
            min_p: 0.05,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.8,
            top_k: 100,
            top_p: 0.95,
            min_p: 0.01,
            ..Default::default()
        },
    ]
}
