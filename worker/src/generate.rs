//! One sequence, start to finish: prefill the prompt, then sample and decode token by token
//! until a stop token or the token budget.

use std::time::Instant;

use anyhow::{Result, bail};

use crate::config::Config;
use crate::gpu::model::{GpuKv, GpuModel};
use crate::model::Model;
use crate::model::cache::{BlockTable, KvCache, KvPool, blocks_for};
use crate::sampling::{Sampler, SamplingParams};

/// The forward passes of one sequence: the CPU model with its cache, or the GPU model.
pub trait Sequence {
    fn config(&self) -> &Config;
    /// The logits ([tokens][vocab]) of `tokens`, appended to the sequence.
    fn extend(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>>;
}

pub struct CpuSequence<'a> {
    model: &'a Model,
    cache: KvCache,
}

impl<'a> CpuSequence<'a> {
    pub fn new(model: &'a Model) -> Self {
        CpuSequence {
            model,
            cache: model.new_cache(),
        }
    }
}

impl Sequence for CpuSequence<'_> {
    fn config(&self) -> &Config {
        self.model.config()
    }

    fn extend(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        Ok(self.model.forward(tokens, &mut self.cache)?.to_vec2()?)
    }
}

pub struct GpuSequence<'a> {
    model: &'a GpuModel,
    kv: GpuKv,
    pool: KvPool,
    table: BlockTable,
}

impl<'a> GpuSequence<'a> {
    /// A sequence of at most `tokens` tokens, with a device cache of its own.
    pub fn new(model: &'a GpuModel, tokens: usize) -> Result<Self> {
        let (kv, pool) = model.new_kv(blocks_for(tokens).max(1))?;
        Ok(GpuSequence {
            model,
            kv,
            pool,
            table: BlockTable::default(),
        })
    }
}

impl Sequence for GpuSequence<'_> {
    fn config(&self) -> &Config {
        self.model.config()
    }

    fn extend(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let needed = self.table.tokens() + tokens.len();
        if !self.pool.reserve(&mut self.table, needed) {
            bail!("the sequence would exceed its GPU cache");
        }
        self.model.forward_batch(
            tokens,
            &mut self.kv,
            &mut [(tokens.len(), &mut self.table)],
            false,
        )
    }
}

pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends after any of these (EOS); it is kept in the output.
    pub stop_ids: Vec<u32>,
    /// Keep every prompt position's and step's logits.
    pub keep_logits: bool,
}

#[derive(Debug, Default)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// `[prompt_len][vocab]` when asked for.
    pub prompt_logits: Vec<Vec<f32>>,
    /// `step_logits[k]` gave `tokens[k]`, when asked for.
    pub step_logits: Vec<Vec<f32>>,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

pub fn generate(
    sequence: &mut dyn Sequence,
    prompt: &[u32],
    options: &GenerateOptions,
) -> Result<Generation> {
    let context = sequence.config().max_position_embeddings;
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    if prompt.len() + options.max_new_tokens > context {
        bail!(
            "prompt ({} tokens) + max_new_tokens ({}) exceeds the context length {context}",
            prompt.len(),
            options.max_new_tokens
        );
    }
    options.sampling.validate()?;
    let mut sampler = Sampler::new(options.sampling.clone());
    let mut out = Generation::default();
    if options.max_new_tokens == 0 {
        return Ok(out);
    }

    let start = Instant::now();
    let logits = sequence.extend(prompt)?;
    out.prefill_seconds = start.elapsed().as_secs_f64();
    let mut last = logits.last().cloned().unwrap_or_default();
    if options.keep_logits {
        out.prompt_logits = logits;
    }

    let start = Instant::now();
    loop {
        let token = sampler.sample(&last, prompt.iter().chain(&out.tokens));
        if options.keep_logits {
            out.step_logits.push(std::mem::take(&mut last));
        }
        out.tokens.push(token);
        if out.tokens.len() == options.max_new_tokens || options.stop_ids.contains(&token) {
            break;
        }
        last = sequence.extend(&[token])?.remove(0);
    }
    out.decode_seconds = start.elapsed().as_secs_f64();
    Ok(out)
}
