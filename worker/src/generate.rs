//! One sequence, start to finish: prefill the prompt, then sample and decode token by token
//! until a stop token or the token budget.

use std::time::Instant;

use anyhow::{Result, bail};

use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams};

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

pub fn generate(model: &Model, prompt: &[u32], options: &GenerateOptions) -> Result<Generation> {
    let context = model.config().max_position_embeddings;
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
    options.sampling.validate().map_err(anyhow::Error::msg)?;
    let mut sampler = Sampler::new(options.sampling.clone());
    let mut cache = model.new_cache();
    let mut out = Generation::default();
    if options.max_new_tokens == 0 {
        return Ok(out);
    }

    let start = Instant::now();
    let logits: Vec<Vec<f32>> = model.forward(prompt, &mut cache)?.to_vec2()?;
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
        last = model
            .forward(&[token], &mut cache)?
            .to_vec2::<f32>()?
            .remove(0);
    }
    out.decode_seconds = start.elapsed().as_secs_f64();
    Ok(out)
}
