//! One step of the engine: stream the tokens whose logits are ready, give decoding sequences
//! their blocks (preempting the newest when the pool is dry), then run the batched decode
//! pass and the prompt chunks that fit the token budget: in it, those short enough to compute
//! there what they compute alone (`Backend::batchable_chunk_tokens`), each other one alone.

use std::sync::atomic::Ordering;
use std::time::Instant;

use deepseek_proto::v1::FinishReason;
use tonic::Status;

use super::sequence::{Sequence, emit};
use super::{Engine, Outcome, internal};
use crate::backend::{Output, Pass};
use crate::error::Result;
use crate::model::cache::{BLOCK_TOKENS, BlockTable};
use crate::sampling::Want;

impl Engine {
    /// One step; returns the tokens generated.
    pub(super) fn step(&mut self) -> usize {
        let mut generated = 0;
        let now = Instant::now();
        let mut i = 0;
        while i < self.running.len() {
            let seq = &mut self.running[i];
            let outcome = if seq.respond.is_closed() {
                Outcome::Finished(FinishReason::Cancelled)
            } else if seq.deadline.is_some_and(|d| d <= now) {
                Outcome::Failed(Status::deadline_exceeded("the request deadline passed"))
            } else if let Some(next) = seq.next.take() {
                generated += 1;
                emit(
                    &self.model.config().eos_token_ids,
                    self.tokenizer.as_deref(),
                    &self.metrics,
                    seq,
                    next,
                )
            } else {
                Outcome::Continue
            };
            if !self.finish(i, outcome) {
                i += 1;
            }
        }
        self.reserve_decode_blocks();
        let decodes = self
            .running
            .iter()
            .filter(|s| s.next_decode_token().is_some())
            .count();
        let chunks = self.plan_chunks(self.config.max_batch_tokens.saturating_sub(decodes));
        let batchable = self.model.batchable_chunk_tokens();
        let (together, alone): (Vec<_>, Vec<_>) =
            chunks.into_iter().partition(|&(_, len)| len <= batchable);
        let passes = usize::from(decodes > 0 || !together.is_empty()) + alone.len();
        let passes = match self.agree_on_passes(passes) {
            Ok(passes) => {
                self.load.group_busy.store(passes > 0, Ordering::Relaxed);
                passes
            }
            Err(err) => {
                self.group_failed(&err);
                return generated;
            }
        };
        if passes == 0 {
            return generated;
        }
        let prompt_tokens: usize = together.iter().chain(&alone).map(|&(_, len)| len).sum();
        let span = tracing::info_span!("step", decodes, prompt_tokens, passes);
        for seq in &self.running {
            let chunked = together.iter().chain(&alone).any(|&(id, _)| id == seq.id);
            if chunked || seq.next_decode_token().is_some() {
                deepseek_proto::telemetry::link(&span, &seq.span);
            }
        }
        if let Err(err) = span.in_scope(|| self.run_passes(&together, &alone, passes)) {
            self.group_failed(&err);
        }
        generated
    }

    /// The decode pass with the chunks `together`, the chunks `alone` (sequence ids and
    /// chunk lengths), then idle passes up to `passes`. Errs only when the expert-parallel
    /// group failed.
    fn run_passes(
        &mut self,
        together: &[(u64, usize)],
        alone: &[(u64, usize)],
        passes: usize,
    ) -> Result<()> {
        let mut done = usize::from(self.run_together(together)?);
        for (id, _) in alone {
            // By id: a failed decode may have removed sequences and moved the others.
            if let Some(i) = self.running.iter().position(|s| s.id == *id) {
                done += usize::from(self.prefill_chunk(i)?);
            }
        }
        for _ in done..passes {
            self.model.forward_idle()?;
        }
        Ok(())
    }
    /// Gives every sequence with a token to decode the block it needs, preempting the newest
    /// sequences while the pool is dry.
    fn reserve_decode_blocks(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let seq = &mut self.running[i];
            let position = seq.blocks.tokens();
            if seq.next_decode_token().is_none()
                || self.cache.pool.reserve(&mut seq.blocks, position + 1)
            {
                i += 1;
                continue;
            }
            // Possibly `i` itself, which ends the loop.
            self.preempt(self.running.len() - 1);
        }
    }

    /// Frees sequence `i`'s blocks and queues it first; it keeps what it generated.
    fn preempt(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        self.cache.pool.release(&mut seq.blocks);
        seq.next = None;
        self.metrics.preemptions.inc();
        seq.span
            .in_scope(|| tracing::debug!(generated = seq.generated.len(), "preempted"));
        self.waiting.push_front(seq);
    }

    /// Runs every sequence's next known token, and the prompt chunks `chunks` (sequence ids
    /// and lengths), through the model in one batch-invariant pass: every row computes what
    /// it would alone, each weight read once for all. True when the pass ran, an error when
    /// the expert-parallel group failed.
    fn run_together(&mut self, chunks: &[(u64, usize)]) -> Result<bool> {
        // (sequence index, rows, cache position before the pass, a prompt chunk or not)
        let mut rows: Vec<(usize, usize, usize, bool)> = Vec::new();
        let mut tokens: Vec<u32> = Vec::new();
        for (i, seq) in self.running.iter().enumerate() {
            let done = seq.blocks.tokens();
            if let Some(&(_, len)) = chunks.iter().find(|(id, _)| *id == seq.id) {
                tokens.extend_from_slice(&seq.request.prompt_ids[done..done + len]);
                rows.push((i, len, done, true));
            } else if let Some(token) = seq.next_decode_token() {
                tokens.push(token);
                rows.push((i, 1, done, false));
            }
        }
        if rows.is_empty() {
            return Ok(false);
        }
        let on_device = self.model.samples_on_device();
        let wants: Vec<Want> = rows
            .iter()
            .map(|&(i, len, _, _)| self.running[i].want(len, on_device))
            .collect();
        let mut segments: Vec<(usize, &mut BlockTable)> = (self.running.iter_mut().enumerate())
            .filter_map(|(i, seq)| {
                let &(_, len, _, _) = rows.iter().find(|&&(row, ..)| row == i)?;
                Some((len, &mut seq.blocks))
            })
            .collect();
        let pass = Pass {
            tokens: &tokens,
            segments: &mut segments,
            batch_invariant: true,
            output: Output::LastRows(&wants),
        };
        match self.model.forward(&mut self.cache, pass) {
            Ok(outputs) => {
                for (&(i, len, done, chunk), next) in rows.iter().zip(outputs) {
                    self.running[i].take(next);
                    if chunk {
                        self.register_prompt_blocks(i, done, len);
                    }
                }
                Ok(true)
            }
            // In a group a pass that failed may have left peers mid-exchange: the group fails.
            Err(err) if err.is_group() || self.group.is_some() => Err(err),
            Err(err) => {
                let status = internal(err);
                // Highest index first, so removal leaves the others where they are.
                for &(i, ..) in rows.iter().rev() {
                    self.finish(i, Outcome::Failed(status.clone()));
                }
                Ok(false)
            }
        }
    }

    /// The sequences whose next prompt chunk runs this step, oldest first, while the chunks
    /// fit in `budget`; the first always runs. Chunks start at multiples of `prefill_chunk`,
    /// whatever the budget, so a prompt is computed the same way in every batch and after
    /// every preemption.
    fn plan_chunks(&self, mut budget: usize) -> Vec<(u64, usize)> {
        let mut chosen = Vec::new();
        for seq in &self.running {
            if !seq.prefilling() {
                continue;
            }
            let chunk = self.chunk_len(seq);
            if !chosen.is_empty() && chunk > budget {
                break;
            }
            budget = budget.saturating_sub(chunk);
            chosen.push((seq.id, chunk));
        }
        chosen
    }

    fn chunk_len(&self, seq: &Sequence) -> usize {
        let left = seq
            .request
            .prompt_ids
            .len()
            .saturating_sub(seq.blocks.tokens());
        left.min(self.config.prefill_chunk)
    }

    /// Runs sequence `i`'s next prompt chunk; true when the pass ran, an error when the
    /// expert-parallel group failed.
    fn prefill_chunk(&mut self, i: usize) -> Result<bool> {
        let chunk = self.chunk_len(&self.running[i]);
        let on_device = self.model.samples_on_device();
        let seq = &mut self.running[i];
        let wants = [seq.want(chunk, on_device)];
        let done = seq.blocks.tokens();
        let pass = Pass {
            tokens: &seq.request.prompt_ids[done..done + chunk],
            segments: &mut [(chunk, &mut seq.blocks)],
            batch_invariant: false,
            output: Output::LastRows(&wants),
        };
        let (outcome, ran) = match self.model.forward(&mut self.cache, pass) {
            Ok(mut outputs) => {
                if let Some(next) = outputs.pop() {
                    seq.take(next);
                }
                self.register_prompt_blocks(i, done, chunk);
                (Outcome::Continue, true)
            }
            Err(err) if err.is_group() || self.group.is_some() => return Err(err),
            Err(err) => (Outcome::Failed(internal(err)), false),
        };
        self.finish(i, outcome);
        Ok(ran)
    }

    /// After sequence `i`'s prompt chunk of `chunk` tokens from `done` ran: a whole chunk at
    /// its fixed offset computes what any prompt starting the same way would, so later
    /// prompts may share its blocks.
    fn register_prompt_blocks(&mut self, i: usize, done: usize, chunk: usize) {
        let prefill_chunk = self.config.prefill_chunk;
        if self.config.cached_chunk_blocks().is_none()
            || chunk != prefill_chunk
            || !done.is_multiple_of(prefill_chunk)
        {
            return;
        }
        let seq = &self.running[i];
        let (first, end) = (done / BLOCK_TOKENS, (done + chunk) / BLOCK_TOKENS);
        let names = &seq.prompt_names[first..end.min(seq.prompt_names.len())];
        self.cache.pool.register(&seq.blocks, first, names);
    }
}
