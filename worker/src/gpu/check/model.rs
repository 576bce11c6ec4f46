//! The model step on the GPU against the CPU path, both through the `Backend` interface the
//! scheduler uses; expert parallelism and NCCL.

use std::path::Path;
use std::sync::Arc;

use deepseek_proto::placement::PlacementPlan;

use super::{Check, relative_diff, sampling_cases};
use crate::backend::{Backend, KvCache, Output, Pass};
use crate::ep::{ChannelTransport, TcpTransport, Transport, Wire, listen_for_peers};
use crate::error::{Error, Result};
use crate::generate::{GenerateOptions, Generation, generate};
use crate::gpu::Dtype;
use crate::gpu::model::GpuModel;
use crate::gpu::nccl::NcclTransport;
use crate::gpu::runtime::Gpu;
use crate::model::Model;
use crate::model::cache::BlockTable;
use crate::sampling::{Next, Sampler, SamplingParams, Want};
use crate::{bail, ensure};

/// Every prompt and step logit of a generation, in order.
fn all_logits(g: &Generation) -> Vec<f32> {
    g.prompt_logits
        .iter()
        .chain(&g.step_logits)
        .flatten()
        .copied()
        .collect()
}

/// The whole model on the GPU against the CPU path: a 12-token prompt and 16 greedy tokens,
/// every logit of both; the tokens must be the same and the logits within bf16 rounding.
pub(super) fn check_model_step(device: usize, dir: &Path) -> Result<Vec<Check>> {
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
    let reference = generate(&cpu, &prompt, &options)?;
    let got = generate(&gpu, &prompt, &options)?;
    let differing = reference
        .tokens
        .iter()
        .zip(&got.tokens)
        .filter(|(a, b)| a != b)
        .count();
    let (expected, actual) = (all_logits(&reference), all_logits(&got));
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
pub(super) fn check_batched_step(device: usize, dir: &Path) -> Result<Vec<Check>> {
    let cpu = Model::open(dir)?;
    let gpu = GpuModel::open(dir, Gpu::open(device)?, Dtype::Auto)?;
    let expected = scheduler_shaped_passes(&cpu)?;
    let actual = scheduler_shaped_passes(&gpu)?;
    Ok(vec![Check::new(
        "model_step/batched",
        relative_diff(&actual, &expected),
        3e-2,
        "three sequences in one pool: prompts, then two decode rows and a prompt chunk in one pass",
    )])
}

/// One pass's logits, every row's, flattened.
fn every_row(
    model: &dyn Backend,
    cache: &mut KvCache,
    tokens: &[u32],
    segments: &mut [(usize, &mut BlockTable)],
) -> Result<Vec<f32>> {
    let pass = Pass {
        tokens,
        segments,
        batch_invariant: false,
        output: Output::EveryRow,
    };
    let mut logits = Vec::new();
    for next in model.forward(cache, pass)? {
        let Next::Logits(row) = next else {
            bail!("a token where logits were asked for");
        };
        logits.extend(row);
    }
    Ok(logits)
}

/// Every logit of `check_batched_step`'s passes on `model`.
fn scheduler_shaped_passes(model: &dyn Backend) -> Result<Vec<f32>> {
    let vocab = model.config().vocab_size as u32;
    let prompts: Vec<Vec<u32>> = [5u32, 19, 33]
        .iter()
        .map(|&len| (0..len).map(|i| (i * 31 + len) % vocab).collect())
        .collect();
    let mut cache = model.new_cache(16)?;
    let mut tables: Vec<BlockTable> = (0..3).map(|_| BlockTable::default()).collect();
    let mut logits = Vec::new();
    // The third prompt goes in two chunks: 20 tokens now, 13 in the mixed pass.
    let first_pass: Vec<&[u32]> = vec![&prompts[0], &prompts[1], &prompts[2][..20]];
    for (tokens, table) in first_pass.iter().zip(&mut tables) {
        ensure!(cache.pool.reserve(table, 40), "pool too small");
        logits.extend(every_row(
            model,
            &mut cache,
            tokens,
            &mut [(tokens.len(), table)],
        )?);
    }
    let mixed: Vec<u32> = [7, 11]
        .into_iter()
        .chain(prompts[2][20..].iter().copied())
        .collect();
    let [a, b, c] = &mut tables[..] else {
        unreachable!()
    };
    logits.extend(every_row(
        model,
        &mut cache,
        &mixed,
        &mut [(1, a), (1, b), (13, c)],
    )?);
    Ok(logits)
}

/// A scheduler's decode pass sampled on the GPU against the CPU sampler on the same pass's
/// logits: a sequence for each of `sampling_cases`, each with its seed.
pub(super) fn check_device_sampling(device: usize, dir: &Path) -> Result<Vec<Check>> {
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
            sampled[i] != Next::Token(cpu)
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
pub(super) fn check_expert_parallel(device: usize, dir: &Path) -> Result<Vec<Check>> {
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
    let plan = PlacementPlan::round_robin(2, experts, 0);
    let runs: Vec<Generation> = std::thread::scope(|scope| {
        let handles: Vec<_> = ChannelTransport::group(2)
            .into_iter()
            .enumerate()
            .map(|(rank, transport)| {
                let (plan, prompt, options) = (plan.clone(), &prompts[rank], &options);
                scope.spawn(move || -> Result<Generation> {
                    let (model, _) = GpuModel::open_rank(
                        dir,
                        Gpu::open(device)?,
                        Dtype::Auto,
                        (plan, rank, Wire::F32),
                        |_| Ok(Arc::new(transport) as Arc<dyn Transport>),
                    )?;
                    generate(&model, prompt, options)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| Error::msg("a rank panicked"))?)
            .collect::<Result<_>>()
    })?;
    let mut checks = Vec::new();
    for (rank, run) in runs.iter().enumerate() {
        let alone = generate(&whole, &prompts[rank], &options)?;
        let same_tokens = run.tokens == alone.tokens;
        checks.push(Check::new(
            format!("expert_parallel/rank{rank}"),
            if same_tokens { relative_diff(&all_logits(run), &all_logits(&alone)) } else { f64::INFINITY },
            1e-3,
            format!("EP=2 on one GPU, f32 wire: tokens {:?} (alone {:?}); logits against one GPU holding every expert", run.tokens, alone.tokens),
        ));
    }
    Ok(checks)
}

/// The NCCL transport's exchange, in a group of one (NCCL will not put two ranks on one
/// GPU): messages to itself, large, small and empty, through NCCL's send and receive.
pub(super) fn check_nccl(device: usize) -> Result<Vec<Check>> {
    let gpu = Gpu::open(device)?;
    let timeout = std::time::Duration::from_secs(10);
    let peers = ["127.0.0.1:50199".to_string()];
    let tcp = TcpTransport::connect(
        listen_for_peers(&peers, 0)?,
        0,
        &peers,
        0,
        timeout,
        timeout,
        None,
    )?;
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
