//! One sequence, start to finish: prefill the prompt, then sample and decode token by token
//! until a stop token or the token budget.

use std::time::Instant;

use crate::backend::{Backend, KvCache, Output, Pass};
use crate::bail;
use crate::error::{Error, Result};
use crate::model::cache::{BlockTable, blocks_for};
use crate::sampling::{Next, Sampler, SamplingParams, Want};

/// One sequence in a cache of its own.
struct Sequence<'a> {
    backend: &'a dyn Backend,
    cache: KvCache,
    table: BlockTable,
}

impl Sequence<'_> {
    /// The logits of `tokens`, appended to the sequence: every row's, or the last row's.
    fn extend(&mut self, tokens: &[u32], every_row: bool) -> Result<Vec<Vec<f32>>> {
        let needed = self.table.tokens() + tokens.len();
        if !self.cache.pool.reserve(&mut self.table, needed) {
            bail!("the sequence would exceed its cache");
        }
        let output = if every_row {
            Output::EveryRow
        } else {
            Output::LastRows(&[Want::Logits])
        };
        let pass = Pass {
            tokens,
            segments: &mut [(tokens.len(), &mut self.table)],
            batch_invariant: false,
            output,
        };
        self.backend
            .forward(&mut self.cache, pass)?
            .into_iter()
            .map(|next| match next {
                Next::Logits(logits) => Ok(logits),
                Next::Token(_) => bail!("the backend sampled where logits were asked for"),
            })
            .collect()
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
    backend: &dyn Backend,
    prompt: &[u32],
    options: &GenerateOptions,
) -> Result<Generation> {
    let context = backend.config().max_position_embeddings;
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
    options.sampling.validate().map_err(Error::msg)?;
    let mut sampler = Sampler::new(options.sampling.clone());
    let mut out = Generation::default();
    if options.max_new_tokens == 0 {
        return Ok(out);
    }

    let mut sequence = Sequence {
        backend,
        cache: backend.new_cache(blocks_for(prompt.len() + options.max_new_tokens))?,
        table: BlockTable::default(),
    };
    let start = Instant::now();
    let logits = sequence.extend(prompt, options.keep_logits)?;
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
        last = sequence.extend(&[token], false)?.remove(0);
    }
    out.decode_seconds = start.elapsed().as_secs_f64();
    Ok(out)
}
