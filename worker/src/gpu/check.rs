//! `deepseek-worker gpu-check`: every kernel against the CPU path (the reference) on small
//! shapes, including the tiny fixtures' router configurations, and the whole model step on
//! the three tiny fixtures (greedy tokens and logits); then — with `--bench` —
//! benchmarks at DeepSeek-V3 shapes on random weights made on the GPU. The result is one
//! JSON report; `tests/gpu/run.sh` runs it.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use candle_core::{Device, Tensor};
use cudarc::driver::{CudaSlice, DeviceRepr, sys::CUevent_flags};
use deepseek_proto::placement::PlacementPlan;
use half::bf16;
use serde_json::{Value, json};

use super::Dtype;
use super::model::GpuModel;
use super::nccl::NcclTransport;
use super::runtime::{GateRule, Gpu};
use crate::config::{Config, Moe};
use crate::ep::{ChannelTransport, TcpTransport, Transport, Wire};
use crate::generate::{CpuSequence, GenerateOptions, GpuSequence, generate};
use crate::model::Model;
use crate::model::cache::BlockTable;
use crate::model::moe::route;
use crate::model::ops::{RmsNorm, Rope};
use crate::sampling::{Rng, Sampler, SamplingParams, Want};
use crate::weights::fp8_e4m3_to_f32;

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
        Err(e) => checks.push(json!({"name": name, "passed": false, "error": format!("{e:#}")})),
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
        let mut report = benchmarks(&gpu).unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
        report["decode_layer"] =
            layer_benchmark(device).unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
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

/// The whole model on the GPU against the CPU path: a 12-token prompt and 16 greedy tokens,
/// every logit of both; the tokens must be the same and the logits within bf16 rounding.
fn check_model_step(device: usize, dir: &Path) -> Result<Vec<Check>> {
    let cpu = Model::open(dir)?;
    let gpu = GpuModel::open(dir, Gpu::open(device)?, Dtype::Auto)?;
    let vocab = cpu.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % vocab).collect();
    let options = GenerateOptions {
        max_new_tokens: 16,
        sampling: SamplingParams::default(),
        stop_ids: Vec::new(),
        keep_logits: true,
    };
    let reference = generate(&mut CpuSequence::new(&cpu), &prompt, &options)?;
    let tokens = prompt.len() + options.max_new_tokens;
    let got = generate(&mut GpuSequence::new(&gpu, tokens)?, &prompt, &options)?;
    let differing = reference
        .tokens
        .iter()
        .zip(&got.tokens)
        .filter(|(a, b)| a != b)
        .count();
    let flatten = |g: &crate::generate::Generation| -> Vec<f32> {
        g.prompt_logits
            .iter()
            .chain(&g.step_logits)
            .flatten()
            .copied()
            .collect()
    };
    let (expected, actual) = (flatten(&reference), flatten(&got));
    let name = dir
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    Ok(vec![
        Check::new(
            format!("model_step/{name}/greedy_tokens"),
            differing as f64,
            0.0,
            format!(
                "16 greedy tokens after a 12-token prompt; CPU {:?}, GPU {:?}",
                reference.tokens, got.tokens
            ),
        ),
        Check::new(
            format!("model_step/{name}/logits"),
            relative_diff(&actual, &expected),
            3e-2,
            "every prompt and step logit; error relative to the largest |logit|",
        ),
    ])
}

/// A scheduler-shaped pass against the CPU path's: three sequences' prompts (lengths 5, 19
/// and 33, so block tables of 1–3 blocks from a shared pool), then one pass holding two
/// decode rows and the third sequence's next chunk.
fn check_batched_step(device: usize, dir: &Path) -> Result<Vec<Check>> {
    let cpu = Model::open(dir)?;
    let gpu = GpuModel::open(dir, Gpu::open(device)?, Dtype::Auto)?;
    let vocab = cpu.config().vocab_size as u32;
    let prompts: Vec<Vec<u32>> = [5u32, 19, 33]
        .iter()
        .map(|&len| (0..len).map(|i| (i * 31 + len) % vocab).collect())
        .collect();
    let blocks = 16;
    let mut cpu_pool = cpu.new_pool(blocks);
    let (mut kv, mut gpu_pool) = gpu.new_kv(blocks)?;
    let mut cpu_tables: Vec<BlockTable> = (0..3).map(|_| BlockTable::default()).collect();
    let mut gpu_tables: Vec<BlockTable> = (0..3).map(|_| BlockTable::default()).collect();
    let (mut expected, mut actual) = (Vec::new(), Vec::new());
    // The third prompt goes in two chunks: 20 tokens now, 13 in the mixed pass.
    let first_pass: Vec<&[u32]> = vec![&prompts[0], &prompts[1], &prompts[2][..20]];
    for (i, tokens) in first_pass.iter().enumerate() {
        ensure!(
            cpu_pool.reserve(&mut cpu_tables[i], 40) && gpu_pool.reserve(&mut gpu_tables[i], 40),
            "pool too small"
        );
        let c = cpu.forward_batch(
            tokens,
            &mut cpu_pool,
            &mut [(tokens.len(), &mut cpu_tables[i])],
            false,
        )?;
        expected.extend(c.to_vec2::<f32>()?.into_iter().flatten());
        let g = gpu.forward_batch(
            tokens,
            &mut kv,
            &mut [(tokens.len(), &mut gpu_tables[i])],
            false,
        )?;
        actual.extend(g.into_iter().flatten());
    }
    let mixed: Vec<u32> = [7, 11]
        .into_iter()
        .chain(prompts[2][20..].iter().copied())
        .collect();
    let [a, b, c] = &mut cpu_tables[..] else {
        unreachable!()
    };
    let cpu_logits =
        cpu.forward_batch(&mixed, &mut cpu_pool, &mut [(1, a), (1, b), (13, c)], false)?;
    expected.extend(cpu_logits.to_vec2::<f32>()?.into_iter().flatten());
    let [a, b, c] = &mut gpu_tables[..] else {
        unreachable!()
    };
    let gpu_logits = gpu.forward_batch(&mixed, &mut kv, &mut [(1, a), (1, b), (13, c)], false)?;
    actual.extend(gpu_logits.into_iter().flatten());
    Ok(vec![Check::new(
        "model_step/batched",
        relative_diff(&actual, &expected),
        3e-2,
        "three sequences in one pool: prompts, then two decode rows and a prompt chunk in one pass",
    )])
}

/// Greedy, temperature alone, and each cut alone and together.
fn sampling_cases() -> [SamplingParams; 6] {
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

/// A scheduler's decode pass sampled on the GPU against the CPU sampler on the same pass's
/// logits: a sequence for each of `sampling_cases`, each with its seed.
fn check_device_sampling(device: usize, dir: &Path) -> Result<Vec<Check>> {
    let gpu = GpuModel::open(dir, Gpu::open(device)?, Dtype::Auto)?;
    let vocab = gpu.config().vocab_size as u32;
    let params = sampling_cases();
    let n = params.len();
    let prompts: Vec<Vec<u32>> = (0..n as u32)
        .map(|s| (0..7).map(|i| (i * 17 + s * 29) % vocab).collect())
        .collect();
    // The same prompts in two caches: one pass gives logits, its twin samples on the GPU.
    let mut twins = Vec::new();
    for _ in 0..2 {
        let (mut kv, mut pool) = gpu.new_kv(16)?;
        let mut tables: Vec<BlockTable> = (0..n).map(|_| BlockTable::default()).collect();
        for (table, prompt) in tables.iter_mut().zip(&prompts) {
            ensure!(pool.reserve(table, 8), "pool too small");
            gpu.forward_batch(prompt, &mut kv, &mut [(prompt.len(), table)], true)?;
        }
        twins.push((kv, tables));
    }
    let next: Vec<u32> = (0..n as u32).map(|i| 3 + 2 * i).collect();
    let (kv, tables) = &mut twins[0];
    let mut segments: Vec<(usize, &mut BlockTable)> = tables.iter_mut().map(|t| (1, t)).collect();
    let logits = gpu.forward_batch(&next, kv, &mut segments, true)?;
    let seeded = |i: usize| {
        Sampler::new(SamplingParams {
            seed: Some(40 + i as u64),
            ..params[i].clone()
        })
    };
    let wants: Vec<Want> = (0..n)
        .map(|i| seeded(i).device_draw().map_or(Want::Logits, Want::Token))
        .collect();
    let (kv, tables) = &mut twins[1];
    let mut segments: Vec<(usize, &mut BlockTable)> = tables.iter_mut().map(|t| (1, t)).collect();
    let sampled = gpu.forward_sampled(&next, kv, &mut segments, &wants)?;
    let differing = (0..n)
        .filter(|&i| {
            let cpu = seeded(i).sample(&logits[i], &[]);
            sampled[i] != crate::sampling::Next::Token(cpu)
        })
        .count();
    Ok(vec![Check::new(
        "device_sampling",
        differing as f64,
        0.0,
        "one decode pass of 6 sequences: GPU-sampled tokens that differ from the CPU sampler's on the same logits",
    )])
}

/// Two GPU ranks of an expert-parallel group (threads, joined by channels), each holding
/// half the experts and generating from its own prompt in lockstep, against one GPU
/// holding them all.
fn check_expert_parallel(device: usize, dir: &Path) -> Result<Vec<Check>> {
    let whole = GpuModel::open(dir, Gpu::open(device)?, Dtype::Auto)?;
    let experts = whole.config().moe.n_routed_experts as u32;
    let vocab = whole.config().vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..2u32)
        .map(|r| (0..10).map(|i| (i * 13 + r * 101 + 3) % vocab).collect())
        .collect();
    let options = GenerateOptions {
        max_new_tokens: 8,
        sampling: SamplingParams::default(),
        stop_ids: Vec::new(),
        keep_logits: true,
    };
    let tokens = 10 + options.max_new_tokens;
    let plan = PlacementPlan::round_robin(2, experts, 0);
    let runs: Vec<crate::generate::Generation> = std::thread::scope(|scope| {
        let handles: Vec<_> = ChannelTransport::group(2)
            .into_iter()
            .enumerate()
            .map(|(rank, transport)| {
                let (plan, prompt, options) = (plan.clone(), &prompts[rank], &options);
                scope.spawn(move || -> Result<crate::generate::Generation> {
                    let (model, _) = GpuModel::open_rank(
                        dir,
                        Gpu::open(device)?,
                        Dtype::Auto,
                        (plan, rank, Wire::F32),
                        |_| Ok(Arc::new(transport) as Arc<dyn Transport>),
                    )?;
                    generate(&mut GpuSequence::new(&model, tokens)?, prompt, options)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a rank panicked"))?)
            .collect::<Result<_>>()
    })?;
    let mut checks = Vec::new();
    for (rank, run) in runs.iter().enumerate() {
        let alone = generate(
            &mut GpuSequence::new(&whole, tokens)?,
            &prompts[rank],
            &options,
        )?;
        let flatten = |g: &crate::generate::Generation| -> Vec<f32> {
            g.prompt_logits
                .iter()
                .chain(&g.step_logits)
                .flatten()
                .copied()
                .collect()
        };
        let same_tokens = run.tokens == alone.tokens;
        checks.push(Check::new(
            format!("expert_parallel/rank{rank}"),
            if same_tokens { relative_diff(&flatten(run), &flatten(&alone)) } else { f64::INFINITY },
            1e-3,
            format!("EP=2 on one GPU, f32 wire: tokens {:?} (alone {:?}); logits against one GPU holding every expert", run.tokens, alone.tokens),
        ));
    }
    Ok(checks)
}

/// The NCCL transport's exchange, in a group of one (NCCL will not put two ranks on one
/// GPU): messages to itself, large, small and empty, through NCCL's send and receive.
fn check_nccl(device: usize) -> Result<Vec<Check>> {
    let gpu = Gpu::open(device)?;
    let timeout = std::time::Duration::from_secs(10);
    let tcp = TcpTransport::connect(0, &["127.0.0.1:50199".to_string()], 0, timeout, timeout)?;
    let nccl = NcclTransport::connect(tcp, gpu.stream.clone())?;
    let large: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 256) as u8).collect();
    let mut differing = 0;
    for message in [large, vec![42], Vec::new()] {
        let back = nccl.all_to_all(vec![message.clone()])?;
        differing += usize::from(back != [message]);
    }
    Ok(vec![Check::new(
        "nccl/self_exchange",
        differing as f64,
        0.0,
        "a one-rank group sends itself 3 MB, 1 byte and nothing: messages that came back different",
    )])
}

/// Host data: uniform in [−scale, scale), reproducible.
fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32 * scale)
        .collect()
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn up<T: DeviceRepr>(gpu: &Gpu, host: &[T]) -> Result<CudaSlice<T>> {
    Ok(gpu.stream.clone_htod(host)?)
}

fn down<T: DeviceRepr + Default + Clone>(gpu: &Gpu, device: &CudaSlice<T>) -> Result<Vec<T>> {
    Ok(gpu.stream.clone_dtoh(device)?)
}

/// Largest |a − b|.
fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max)
}

/// Largest |a − b| relative to the largest |b|: for bf16 outputs of long sums.
fn relative_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().map(|x| f64::from(x.abs())).fold(1e-30, f64::max);
    max_diff(a, b) / scale
}

fn check_rms_norm(gpu: &Gpu) -> Result<Vec<Check>> {
    // rows 160 apart, as the latent sits in kv_a_proj's wider output
    let (rows, cols, stride) = (5, 144, 160);
    let wide = uniform(rows * stride, 1, 2.0);
    let x: Vec<f32> = wide
        .chunks(stride)
        .flat_map(|r| r[..cols].to_vec())
        .collect();
    let weight = to_bf16(&uniform(cols, 2, 1.5));
    let mut y = gpu.stream.alloc_zeros::<f32>(rows * cols)?;
    gpu.rms_norm(
        &up(gpu, &wide)?.as_view(),
        stride,
        &up(gpu, &weight)?,
        &mut y,
        rows,
        1e-6,
    )?;
    let weight_f32: Vec<f32> = weight.iter().map(|w| w.to_f32()).collect();
    let norm = RmsNorm::new(Tensor::from_vec(weight_f32, cols, &Device::Cpu)?, 1e-6);
    let expected = norm
        .forward(&Tensor::from_vec(x, (rows, cols), &Device::Cpu)?)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(vec![Check::new(
        "rms_norm",
        max_diff(&down(gpu, &y)?, &expected),
        1e-5,
        "5×144, rows 160 apart",
    )])
}

fn check_silu_mul(gpu: &Gpu) -> Result<Vec<Check>> {
    let (rows, width) = (7, 136);
    let gate_up = to_bf16(&uniform(rows * 2 * width, 3, 4.0));
    let mut h = gpu.stream.alloc_zeros::<bf16>(rows * width)?;
    gpu.silu_mul(&up(gpu, &gate_up)?, &mut h, rows)?;
    let expected: Vec<f32> = (0..rows * width)
        .map(|i| {
            let (row, col) = (i / width, i % width);
            let g = gate_up[row * 2 * width + col].to_f32();
            let u = gate_up[row * 2 * width + width + col].to_f32();
            g / (1.0 + (-g).exp()) * u
        })
        .collect();
    let got: Vec<f32> = down(gpu, &h)?.iter().map(|v| v.to_f32()).collect();
    // one bf16 rounding of the result
    Ok(vec![Check::new(
        "silu_mul",
        relative_diff(&got, &expected),
        1e-2,
        "7×136",
    )])
}

fn check_rope(gpu: &Gpu, cfg: &Config) -> Result<Vec<Check>> {
    let (tokens, heads, dim) = (6, 4, cfg.qk_rope_head_dim);
    let positions: Vec<usize> = (0..tokens).map(|t| t * 37 + 3).collect();
    let rope = Rope::new(cfg);
    let (cos, sin) = rope.tables(&positions)?;
    let x = uniform(tokens * heads * dim, 4, 1.0);
    let expected = rope
        .apply(
            &Tensor::from_vec(x.clone(), (tokens, heads, dim), &Device::Cpu)?,
            &cos,
            &sin,
        )?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (cos, sin) = (
        cos.flatten_all()?.to_vec1::<f32>()?,
        sin.flatten_all()?.to_vec1::<f32>()?,
    );
    // each (token, head) row sits after 8 other values, as q_pe does after q_nope
    let wide: Vec<f32> = x
        .chunks(dim)
        .flat_map(|r| [vec![9.0; 8], r.to_vec()].concat())
        .collect();
    let wide = up(gpu, &wide)?;
    let mut y = gpu.stream.alloc_zeros::<f32>(x.len())?;
    gpu.rope(
        &wide.slice(8..),
        dim + 8,
        &up(gpu, &cos)?,
        &up(gpu, &sin)?,
        &mut y,
        (tokens, heads, dim),
    )?;
    Ok(vec![Check::new(
        "rope",
        max_diff(&down(gpu, &y)?, &expected),
        1e-5,
        "YaRN tables of tiny-v3-bf16",
    )])
}

/// DeepSeek-V3's router: 256 experts in 8 groups, 4 groups kept, top-8.
fn v3_moe(tiny_v3: &Moe) -> Moe {
    Moe {
        n_routed_experts: 256,
        n_group: 8,
        topk_group: 4,
        num_experts_per_tok: 8,
        routed_scaling_factor: 2.5,
        ..tiny_v3.clone()
    }
}

fn check_moe_gate(gpu: &Gpu, configs: &[(String, Config)]) -> Result<Vec<Check>> {
    let mut cases: Vec<(String, Moe)> = configs
        .iter()
        .map(|(n, c)| (n.clone(), c.moe.clone()))
        .collect();
    cases.push(("deepseek-v3".into(), v3_moe(&configs[0].1.moe)));
    let tokens = 33;
    cases
        .into_iter()
        .enumerate()
        .map(|(i, (name, moe))| {
            let experts = moe.n_routed_experts;
            let logits = uniform(tokens * experts, 10 + i as u64, 4.0);
            let bias = (moe.topk_method == crate::config::TopkMethod::NoauxTc)
                .then(|| uniform(experts, 20 + i as u64, 0.5));
            let rule = GateRule::of(&moe);
            let mut chosen = gpu.stream.alloc_zeros::<i32>(tokens * rule.topk)?;
            let mut weights = gpu.stream.alloc_zeros::<f32>(tokens * rule.topk)?;
            let bias_device = bias.as_ref().map(|b| up(gpu, b)).transpose()?;
            gpu.moe_gate(
                &up(gpu, &logits)?,
                bias_device.as_ref(),
                experts,
                rule,
                &mut chosen,
                &mut weights,
            )?;
            let (chosen, weights) = (down(gpu, &chosen)?, down(gpu, &weights)?);
            let mut wrong_experts = 0;
            let mut weight_error = 0f64;
            for t in 0..tokens {
                let (e, w) = route(&logits[t * experts..][..experts], bias.as_deref(), &moe);
                let got = &chosen[t * rule.topk..][..rule.topk];
                wrong_experts += e.iter().zip(got).filter(|(a, b)| **a as i32 != **b).count();
                weight_error =
                    weight_error.max(max_diff(&weights[t * rule.topk..][..rule.topk], &w));
            }
            Ok(Check::new(
                format!("moe_gate/{name}"),
                if wrong_experts > 0 {
                    f64::INFINITY
                } else {
                    weight_error
                },
                1e-5,
                format!("{tokens} tokens, {experts} experts; experts that differ: {wrong_experts}"),
            ))
        })
        .collect()
}

fn check_permute(gpu: &Gpu) -> Result<Vec<Check>> {
    let (tokens, topk, experts, hidden) = (37, 8, 64, 144);
    let mut rng = Rng::new(5);
    let chosen: Vec<i32> = (0..tokens * topk)
        .map(|_| (rng.next_u64() % experts as u64) as i32)
        .collect();
    let order = gpu.moe_sort(&up(gpu, &chosen)?, topk, experts)?;
    let offsets = down(gpu, &order.offsets)?;
    let tile_start = down(gpu, &order.tile_start)?;
    let source = down(gpu, &order.source)?;
    let row_of = down(gpu, &order.row_of)?;
    let mut counts = vec![0i32; experts];
    chosen.iter().for_each(|&e| counts[e as usize] += 1);
    let mut bad = 0usize;
    for e in 0..experts {
        bad += usize::from(offsets[e + 1] - offsets[e] != counts[e]);
        let tiles = (counts[e] as usize).div_ceil(super::runtime::GEMM_TILE_ROWS) as i32;
        bad += usize::from(tile_start[e + 1] - tile_start[e] != tiles);
    }
    for (p, &row) in row_of.iter().enumerate() {
        let e = chosen[p] as usize;
        let in_segment = offsets[e] <= row && row < offsets[e + 1];
        bad += usize::from(!in_segment || source[row as usize] != (p / topk) as i32);
    }
    let sort = Check::new(
        "moe_sort",
        bad as f64,
        0.0,
        "37 tokens × top-8 over 64 experts: rows out of place",
    );

    let x = uniform(tokens * hidden, 6, 3.0);
    let mut permuted = gpu.stream.alloc_zeros::<bf16>(order.rows * hidden)?;
    gpu.moe_permute(&up(gpu, &x)?, &order, &mut permuted, hidden)?;
    let permuted = down(gpu, &permuted)?;
    let expected: Vec<f32> = (0..order.rows * hidden)
        .map(|i| bf16::from_f32(x[source[i / hidden] as usize * hidden + i % hidden]).to_f32())
        .collect();
    let got: Vec<f32> = permuted.iter().map(|v| v.to_f32()).collect();
    let permute = Check::new("moe_permute", max_diff(&got, &expected), 0.0, "bf16 gather");

    let expert_out = to_bf16(&uniform(order.rows * hidden, 7, 2.0));
    let weights = uniform(tokens * topk, 8, 1.0);
    let mut y = gpu.stream.alloc_zeros::<f32>(tokens * hidden)?;
    gpu.moe_unpermute(
        &up(gpu, &expert_out)?,
        &order,
        &up(gpu, &weights)?,
        &mut y,
        hidden,
    )?;
    let expected: Vec<f32> = (0..tokens * hidden)
        .map(|i| {
            let (t, c) = (i / hidden, i % hidden);
            (0..topk).fold(0.0, |sum, k| {
                let row = row_of[t * topk + k] as usize;
                sum + weights[t * topk + k] * expert_out[row * hidden + c].to_f32()
            })
        })
        .collect();
    let unpermute = Check::new(
        "moe_unpermute",
        max_diff(&down(gpu, &y)?, &expected),
        1e-5,
        "weighted combine in k order",
    );

    let mut quantised = gpu.stream.alloc_zeros::<u8>(order.rows * hidden)?;
    let groups = hidden.div_ceil(128);
    let mut scales = gpu.stream.alloc_zeros::<f32>(order.rows * groups)?;
    gpu.moe_permute_fp8(&up(gpu, &x)?, &order, &mut quantised, &mut scales, hidden)?;
    let (quantised, scales) = (down(gpu, &quantised)?, down(gpu, &scales)?);
    let mut error = 0f64;
    for row in 0..order.rows {
        let from = &x[source[row] as usize * hidden..][..hidden];
        for g in 0..groups {
            let cols = g * 128..((g + 1) * 128).min(hidden);
            let amax = from[cols.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
            for c in cols {
                let value = fp8_e4m3_to_f32(quantised[row * hidden + c]) * scales[row * groups + g];
                error = error.max(f64::from((value - from[c]).abs() / amax));
            }
        }
    }
    // e4m3 keeps 3 mantissa bits: half an ulp is 1/16 of the value, at most of amax
    let fp8 = Check::new(
        "moe_permute_fp8",
        error,
        1.0 / 16.0,
        "1×128 scales; error relative to the group's max",
    );
    Ok(vec![sort, permute, unpermute, fp8])
}

/// Expert segments of uneven sizes (none, under one tile, several tiles) with
/// shapes that are not multiples of the tile, as the tiny fixtures have.
fn uneven_routing(gpu: &Gpu) -> Result<(super::runtime::MoeOrder, Vec<usize>)> {
    let counts = [130usize, 0, 3, 64, 257];
    let chosen: Vec<i32> = counts
        .iter()
        .enumerate()
        .flat_map(|(e, &n)| std::iter::repeat_n(e as i32, n))
        .collect();
    let order = gpu.moe_sort(&up(gpu, &chosen)?, 1, counts.len())?;
    let expert_of_row: Vec<usize> = {
        let offsets = down(gpu, &order.offsets)?;
        (0..order.rows)
            .map(|r| {
                offsets
                    .iter()
                    .rposition(|&o| o as usize <= r)
                    .unwrap()
                    .min(counts.len() - 1)
            })
            .collect()
    };
    Ok((order, expert_of_row))
}

fn check_grouped_gemm_bf16(gpu: &Gpu) -> Result<Vec<Check>> {
    let (order, expert_of_row) = uneven_routing(gpu)?;
    [(272usize, 136usize), (256, 512)]
        .into_iter()
        .map(|(n, k)| {
            let x = to_bf16(&uniform(order.rows * k, 30, 1.0));
            let w = to_bf16(&uniform(order.experts * n * k, 31, 1.0));
            let mut y = gpu.stream.alloc_zeros::<bf16>(order.rows * n)?;
            gpu.grouped_gemm_bf16(&up(gpu, &x)?, &up(gpu, &w)?, &mut y, &order, n, k)?;
            let got: Vec<f32> = down(gpu, &y)?.iter().map(|v| v.to_f32()).collect();
            let expected = reference_gemm(
                order.rows,
                n,
                k,
                &expert_of_row,
                |r, i| x[r * k + i].to_f32(),
                |e, j, i| w[(e * n + j) * k + i].to_f32(),
            );
            Ok(Check::new(
                format!("grouped_gemm_bf16/n{n}k{k}"),
                relative_diff(&got, &expected),
                1e-2,
                "segments of 130, 0, 3, 64, 257 rows; bf16 output",
            ))
        })
        .collect()
}

/// y[r, j] = Σ_i x(r, i) · w(expert of r, j, i), in f64.
fn reference_gemm(
    rows: usize,
    n: usize,
    k: usize,
    expert_of_row: &[usize],
    x: impl Fn(usize, usize) -> f32,
    w: impl Fn(usize, usize, usize) -> f32,
) -> Vec<f32> {
    (0..rows * n)
        .map(|o| {
            let (r, j) = (o / n, o % n);
            (0..k)
                .map(|i| f64::from(x(r, i)) * f64::from(w(expert_of_row[r], j, i)))
                .sum::<f64>() as f32
        })
        .collect()
}

/// Random e4m3 bytes, never NaN (0x7f, 0xff).
fn random_fp8(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| match (rng.next_u64() & 0xff) as u8 {
            b @ (0x7f | 0xff) => b - 1,
            b => b,
        })
        .collect()
}

fn check_grouped_gemm_fp8(gpu: &Gpu) -> Result<Vec<Check>> {
    let (order, expert_of_row) = uneven_routing(gpu)?;
    [(272usize, 144usize), (256, 512)]
        .into_iter()
        .map(|(n, k)| {
            let (kb, nb) = (k.div_ceil(128), n.div_ceil(128));
            let x = random_fp8(order.rows * k, 40);
            let x_scale: Vec<f32> = uniform(order.rows * kb, 41, 1.0)
                .iter()
                .map(|v| v.abs() + 0.01)
                .collect();
            let w = random_fp8(order.experts * n * k, 42);
            let w_scale: Vec<f32> = uniform(order.experts * nb * kb, 43, 1.0)
                .iter()
                .map(|v| v.abs() + 0.01)
                .collect();
            let mut y = gpu.stream.alloc_zeros::<bf16>(order.rows * n)?;
            gpu.grouped_gemm_fp8(
                &up(gpu, &x)?,
                &up(gpu, &x_scale)?,
                &up(gpu, &w)?,
                &up(gpu, &w_scale)?,
                &mut y,
                &order,
                n,
                k,
            )?;
            let got: Vec<f32> = down(gpu, &y)?.iter().map(|v| v.to_f32()).collect();
            let expected = reference_gemm(
                order.rows,
                n,
                k,
                &expert_of_row,
                |r, i| fp8_e4m3_to_f32(x[r * k + i]) * x_scale[r * kb + i / 128],
                |e, j, i| {
                    fp8_e4m3_to_f32(w[(e * n + j) * k + i])
                        * w_scale[(e * nb + j / 128) * kb + i / 128]
                },
            );
            Ok(Check::new(
                format!("grouped_gemm_fp8/n{n}k{k}"),
                relative_diff(&got, &expected),
                1e-2,
                "128×128 weight and 1×128 activation scales; bf16 output",
            ))
        })
        .collect()
}

fn check_dequant_fp8(gpu: &Gpu) -> Result<Vec<Check>> {
    let (matrices, rows, cols) = (3, 200, 136);
    let q = random_fp8(matrices * rows * cols, 50);
    let (rb, cb) = (rows.div_ceil(128), cols.div_ceil(128));
    let scale_inv = uniform(matrices * rb * cb, 51, 0.01);
    let mut out = gpu.stream.alloc_zeros::<bf16>(q.len())?;
    gpu.dequant_fp8(
        &up(gpu, &q)?,
        &up(gpu, &scale_inv)?,
        &mut out,
        (matrices, rows, cols),
    )?;
    let got: Vec<f32> = down(gpu, &out)?.iter().map(|v| v.to_f32()).collect();
    let expected: Vec<f32> = (0..q.len())
        .map(|i| {
            let (m, r, c) = (i / (rows * cols), i / cols % rows, i % cols);
            bf16::from_f32(fp8_e4m3_to_f32(q[i]) * scale_inv[(m * rb + r / 128) * cb + c / 128])
                .to_f32()
        })
        .collect();
    Ok(vec![Check::new(
        "dequant_fp8",
        max_diff(&got, &expected),
        0.0,
        "3 × [200, 136], partial edge blocks",
    )])
}

fn check_mla_decode(gpu: &Gpu) -> Result<Vec<Check>> {
    const BLOCK: usize = crate::model::cache::BLOCK_TOKENS;
    let (heads, rank, rope) = (4, 136, 16);
    let lengths = [1usize, 17, 40, 0];
    let seqs = lengths.len();
    let max_blocks = 3;
    let pool = 12;
    // blocks handed out in a shuffled order, as a pool does after some churn
    let mut free: Vec<i32> = (0..pool as i32).rev().collect();
    let mut rng = Rng::new(60);
    for i in (1..free.len()).rev() {
        free.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let table: Vec<i32> = (0..seqs * max_blocks)
        .map(|_| free.pop().unwrap())
        .collect();
    let c_kv = to_bf16(&uniform(pool * BLOCK * rank, 61, 1.0));
    let k_pe = to_bf16(&uniform(pool * BLOCK * rope, 62, 1.0));
    let q_lat = uniform(seqs * heads * rank, 63, 0.3);
    let q_pe = uniform(seqs * heads * rope, 64, 0.3);
    let scale = 0.12;
    let lengths_i32: Vec<i32> = lengths.iter().map(|&l| l as i32).collect();
    let mut out = gpu.stream.alloc_zeros::<f32>(q_lat.len())?;
    gpu.mla_decode(
        &up(gpu, &q_lat)?,
        &up(gpu, &q_pe)?,
        &up(gpu, &c_kv)?,
        &up(gpu, &k_pe)?,
        (&up(gpu, &table)?, max_blocks),
        &up(gpu, &lengths_i32)?,
        &mut out,
        (seqs, heads, rank, rope),
        scale,
    )?;
    let mut expected = vec![0f32; q_lat.len()];
    for s in 0..seqs {
        let slot = |j: usize| table[s * max_blocks + j / BLOCK] as usize * BLOCK + j % BLOCK;
        for h in 0..heads {
            let q = (s * heads + h) * rank;
            let p = (s * heads + h) * rope;
            let scores: Vec<f64> = (0..lengths[s])
                .map(|j| {
                    let latent: f64 = (0..rank)
                        .map(|d| {
                            f64::from(q_lat[q + d]) * f64::from(c_kv[slot(j) * rank + d].to_f32())
                        })
                        .sum();
                    let positional: f64 = (0..rope)
                        .map(|d| {
                            f64::from(q_pe[p + d]) * f64::from(k_pe[slot(j) * rope + d].to_f32())
                        })
                        .sum();
                    (latent + positional) * f64::from(scale)
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for d in 0..rank {
                let value: f64 = weights
                    .iter()
                    .enumerate()
                    .map(|(j, w)| w * f64::from(c_kv[slot(j) * rank + d].to_f32()))
                    .sum();
                expected[q + d] = if total > 0.0 {
                    (value / total) as f32
                } else {
                    0.0
                };
            }
        }
    }
    Ok(vec![Check::new(
        "mla_decode",
        max_diff(&down(gpu, &out)?, &expected),
        1e-4,
        "lengths 1, 17, 40, 0 over shuffled 16-token blocks",
    )])
}

fn check_sample(gpu: &Gpu) -> Result<Vec<Check>> {
    let vocab = 129_280;
    let cases = sampling_cases();
    let draws = 8;
    let rows = cases.len() * draws;
    let logits = uniform(rows * vocab, 70, 6.0);
    let params: Vec<SamplingParams> = (0..rows)
        .map(|r| SamplingParams {
            seed: Some(100 + r as u64),
            ..cases[r / draws].clone()
        })
        .collect();
    let column = |f: &dyn Fn(&SamplingParams) -> f32| params.iter().map(f).collect::<Vec<f32>>();
    let uniform_draws: Vec<f64> = params
        .iter()
        .map(|p| Rng::new(p.seed.unwrap()).next_f64())
        .collect();
    let top_k: Vec<i32> = params.iter().map(|p| p.top_k as i32).collect();
    let mut probs = gpu.stream.alloc_zeros::<f64>(rows * vocab)?;
    let mut tokens = gpu.stream.alloc_zeros::<i32>(rows)?;
    gpu.sample(
        &up(gpu, &logits)?,
        &mut probs,
        vocab,
        &up(gpu, &column(&|p| p.temperature))?,
        &up(gpu, &top_k)?,
        &up(gpu, &column(&|p| p.top_p))?,
        &up(gpu, &column(&|p| p.min_p))?,
        &up(gpu, &uniform_draws)?,
        &mut tokens,
    )?;
    let tokens = down(gpu, &tokens)?;
    let differing = params
        .iter()
        .enumerate()
        .filter(|(r, p)| {
            let cpu = Sampler::new((*p).clone()).sample(&logits[r * vocab..][..vocab], &[]);
            cpu as i32 != tokens[*r]
        })
        .count();
    Ok(vec![Check::new(
        "sample",
        differing as f64,
        0.0,
        format!(
            "{rows} rows of {vocab} logits, greedy and top-k/top-p/min-p, each seed's first draw: tokens that differ from the CPU sampler"
        ),
    )])
}

/// Milliseconds per call of `f`, by CUDA events over `reps` calls after two warm-ups.
fn time_ms(gpu: &Gpu, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
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

/// DeepSeek-V3's MoE at its real sizes, on random weights made on the GPU.
fn benchmarks(gpu: &Gpu) -> Result<Value> {
    const HIDDEN: usize = 7168;
    const WIDTH: usize = 2048; // moe_intermediate_size
    const EXPERTS: usize = 256;
    const TOPK: usize = 8;
    let reps = 10;
    let tflops = |flops: f64, ms: f64| flops / ms / 1e9;
    let rule = GateRule {
        sigmoid: true,
        method: 0,
        n_group: 8,
        topk_group: 4,
        topk: TOPK,
        normalize: true,
        scale: 2.5,
    };

    // HBM: a device-to-device copy reads and writes every byte.
    let copy_bytes = 1usize << 32;
    let from = gpu.random_bf16(copy_bytes / 2, 1, 1.0)?;
    let mut to = gpu.stream.alloc_zeros::<bf16>(copy_bytes / 2)?;
    let copy_ms = time_ms(gpu, reps, || Ok(gpu.stream.memcpy_dtod(&from, &mut to)?))?;
    let hbm = 2.0 * copy_bytes as f64 / copy_ms / 1e6; // GB/s
    drop((from, to));

    let w_gate_up = gpu.random_bf16(EXPERTS * 2 * WIDTH * HIDDEN, 2, 1.0)?;
    let w_down = gpu.random_bf16(EXPERTS * HIDDEN * WIDTH, 3, 1.0)?;
    let dense_gate_up = gpu.random_bf16(2 * WIDTH * HIDDEN, 4, 1.0)?;
    let dense_down = gpu.random_bf16(HIDDEN * WIDTH, 5, 1.0)?;

    // A prefill-sized batch: grouped GEMM against cuBLAS, permute and combine bandwidth.
    let tokens = 4096;
    let logits = gpu.random_f32(tokens * EXPERTS, 6, 4.0)?;
    let mut chosen = gpu.stream.alloc_zeros::<i32>(tokens * TOPK)?;
    let mut weights = gpu.stream.alloc_zeros::<f32>(tokens * TOPK)?;
    gpu.moe_gate(&logits, None, EXPERTS, rule, &mut chosen, &mut weights)?;
    let order = gpu.moe_sort(&chosen, TOPK, EXPERTS)?;
    let rows = order.rows;
    let x = gpu.random_f32(tokens * HIDDEN, 7, 1.0)?;
    let mut xp = gpu.stream.alloc_zeros::<bf16>(rows * HIDDEN)?;
    let mut gate_up = gpu.stream.alloc_zeros::<bf16>(rows * 2 * WIDTH)?;
    let mut h = gpu.stream.alloc_zeros::<bf16>(rows * WIDTH)?;
    let mut expert_out = gpu.stream.alloc_zeros::<bf16>(rows * HIDDEN)?;
    let mut y = gpu.stream.alloc_zeros::<f32>(tokens * HIDDEN)?;

    let permute_ms = time_ms(gpu, reps, || gpu.moe_permute(&x, &order, &mut xp, HIDDEN))?;
    let permute_bytes = (rows * HIDDEN * (4 + 2)) as f64;
    let gate_up_ms = time_ms(gpu, reps, || {
        gpu.grouped_gemm_bf16(&xp, &w_gate_up, &mut gate_up, &order, 2 * WIDTH, HIDDEN)
    })?;
    gpu.silu_mul(&gate_up, &mut h, rows)?;
    let down_ms = time_ms(gpu, reps, || {
        gpu.grouped_gemm_bf16(&h, &w_down, &mut expert_out, &order, HIDDEN, WIDTH)
    })?;
    let unpermute_ms = time_ms(gpu, reps, || {
        gpu.moe_unpermute(&expert_out, &order, &weights, &mut y, HIDDEN)
    })?;
    let unpermute_bytes = (rows * HIDDEN * 2 + tokens * HIDDEN * 4) as f64;
    let cublas_gate_up_ms = time_ms(gpu, reps, || {
        gpu.linear(&xp, &dense_gate_up, &mut gate_up, (rows, 2 * WIDTH, HIDDEN))
    })?;
    let cublas_down_ms = time_ms(gpu, reps, || {
        gpu.linear(&h, &dense_down, &mut expert_out, (rows, HIDDEN, WIDTH))
    })?;
    let gate_up_flops = 2.0 * (rows * 2 * WIDTH * HIDDEN) as f64;
    let down_flops = 2.0 * (rows * HIDDEN * WIDTH) as f64;

    let mut report = json!({
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
    });

    if gpu.has_fp8_tensor_cores() {
        let (kb_hidden, kb_width) = (HIDDEN.div_ceil(128), WIDTH.div_ceil(128));
        let w8_gate_up = gpu.random_fp8(EXPERTS * 2 * WIDTH * HIDDEN, 8, 448.0)?;
        let s_gate_up = gpu.random_f32(EXPERTS * (2 * WIDTH / 128) * kb_hidden, 9, 1e-3)?;
        let w8_down = gpu.random_fp8(EXPERTS * HIDDEN * WIDTH, 10, 448.0)?;
        let s_down = gpu.random_f32(EXPERTS * (HIDDEN / 128) * kb_width, 11, 1e-3)?;
        let mut x8 = gpu.stream.alloc_zeros::<u8>(rows * HIDDEN)?;
        let mut x8_scale = gpu.stream.alloc_zeros::<f32>(rows * kb_hidden)?;
        gpu.moe_permute_fp8(&x, &order, &mut x8, &mut x8_scale, HIDDEN)?;
        let h8 = gpu.random_fp8(rows * WIDTH, 12, 448.0)?;
        let h8_scale = gpu.random_f32(rows * kb_width, 13, 1e-3)?;
        let fp8_gate_up_ms = time_ms(gpu, reps, || {
            gpu.grouped_gemm_fp8(
                &x8,
                &x8_scale,
                &w8_gate_up,
                &s_gate_up,
                &mut gate_up,
                &order,
                2 * WIDTH,
                HIDDEN,
            )
        })?;
        let fp8_down_ms = time_ms(gpu, reps, || {
            gpu.grouped_gemm_fp8(
                &h8,
                &h8_scale,
                &w8_down,
                &s_down,
                &mut expert_out,
                &order,
                HIDDEN,
                WIDTH,
            )
        })?;
        report["grouped_gemm_fp8"] = json!({
            "gate_up_tflops": tflops(gate_up_flops, fp8_gate_up_ms),
            "down_tflops": tflops(down_flops, fp8_down_ms),
            "overall_tflops": tflops(gate_up_flops + down_flops, fp8_gate_up_ms + fp8_down_ms),
        });
    }

    // Decode: 64 sequences, one token each. The MoE block end to end (gate, sort, permute,
    // both grouped GEMMs, SiLU, combine) and absorbed MLA attention over 4,096 positions.
    let batch = 64;
    let logits = gpu.random_f32(batch * EXPERTS, 14, 4.0)?;
    let x = gpu.random_f32(batch * HIDDEN, 15, 1.0)?;
    let mut chosen = gpu.stream.alloc_zeros::<i32>(batch * TOPK)?;
    let mut weights = gpu.stream.alloc_zeros::<f32>(batch * TOPK)?;
    let pairs = batch * TOPK;
    let mut xp = gpu.stream.alloc_zeros::<bf16>(pairs * HIDDEN)?;
    let mut gate_up = gpu.stream.alloc_zeros::<bf16>(pairs * 2 * WIDTH)?;
    let mut h = gpu.stream.alloc_zeros::<bf16>(pairs * WIDTH)?;
    let mut expert_out = gpu.stream.alloc_zeros::<bf16>(pairs * HIDDEN)?;
    let mut y = gpu.stream.alloc_zeros::<f32>(batch * HIDDEN)?;
    let moe_ms = time_ms(gpu, reps, || {
        gpu.moe_gate(&logits, None, EXPERTS, rule, &mut chosen, &mut weights)?;
        let order = gpu.moe_sort(&chosen, TOPK, EXPERTS)?;
        gpu.moe_permute(&x, &order, &mut xp, HIDDEN)?;
        gpu.grouped_gemm_bf16(&xp, &w_gate_up, &mut gate_up, &order, 2 * WIDTH, HIDDEN)?;
        gpu.silu_mul(&gate_up, &mut h, pairs)?;
        gpu.grouped_gemm_bf16(&h, &w_down, &mut expert_out, &order, HIDDEN, WIDTH)?;
        gpu.moe_unpermute(&expert_out, &order, &weights, &mut y, HIDDEN)
    })?;
    let (heads, rank, rope, context) = (128, 512, 64, 4096);
    let per_seq = context / crate::model::cache::BLOCK_TOKENS;
    let c_kv = gpu.random_bf16(batch * context * rank, 16, 1.0)?;
    let k_pe = gpu.random_bf16(batch * context * rope, 17, 1.0)?;
    let table: Vec<i32> = (0..(batch * per_seq) as i32).collect();
    let table = up(gpu, &table)?;
    let lengths = up(gpu, &vec![context as i32; batch])?;
    let q_lat = gpu.random_f32(batch * heads * rank, 18, 0.1)?;
    let q_pe = gpu.random_f32(batch * heads * rope, 19, 0.1)?;
    let mut out = gpu.stream.alloc_zeros::<f32>(batch * heads * rank)?;
    let mla_ms = time_ms(gpu, reps, || {
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
    report["decode"] = json!({
        "batch": batch,
        "moe_block_ms": moe_ms,
        "mla_attention_ms": mla_ms,
        "mla_cache_gb_s": cache_bytes / mla_ms / 1e6,
        "context": context,
        "note": "one layer's MoE block and attention core; the dense projections are not in yet",
    });
    Ok(report)
}

/// DeepSeek-V3's shapes with `layers` MoE layers (a published config.json's fields).
fn v3_config(layers: usize) -> Result<Config> {
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
fn layer_benchmark(device: usize) -> Result<Value> {
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
            layer_latency(device, dtype).unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    }
    Ok(report)
}

fn layer_latency(device: usize, dtype: Dtype) -> Result<Value> {
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
}
