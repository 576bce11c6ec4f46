//! One step of the engine: stream the tokens whose logits are ready, give decoding sequences
//! their blocks (preempting the newest when the pool is dry), then run the batched decode
//! pass and the prompt chunks that fit the token budget.

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
        let passes = usize::from(decodes > 0) + chunks.len();
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
        if let Err(err) = self.run_passes(&chunks, passes) {
            self.group_failed(&err);
        }
        generated
    }

    /// The decode pass, the prompt chunks, then idle passes up to `passes`. Errs only when
    /// the expert-parallel group failed.
    fn run_passes(&mut self, chunks: &[u64], passes: usize) -> Result<()> {
        let mut done = usize::from(self.decode_together()?);
        for id in chunks {
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

    /// Runs every sequence's next known token through the model in one batched pass;
    /// true when the pass ran, an error when the expert-parallel group failed.
    fn decode_together(&mut self) -> Result<bool> {
        let rows: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].next_decode_token().is_some())
            .collect();
        if rows.is_empty() {
            return Ok(false);
        }
        let on_device = self.model.samples_on_device();
        let wants: Vec<Want> = rows
            .iter()
            .map(|&i| self.running[i].want(1, on_device))
            .collect();
        let (tokens, mut segments): (Vec<u32>, Vec<(usize, &mut BlockTable)>) = self
            .running
            .iter_mut()
            .filter_map(|seq| Some((seq.next_decode_token()?, (1, &mut seq.blocks))))
            .unzip();
        let pass = Pass {
            tokens: &tokens,
            segments: &mut segments,
            batch_invariant: true,
            output: Output::LastRows(&wants),
        };
        match self.model.forward(&mut self.cache, pass) {
            Ok(outputs) => {
                for (&i, next) in rows.iter().zip(outputs) {
                    self.running[i].take(next);
                }
                Ok(true)
            }
            // In a group a pass that failed may have left peers mid-exchange: the group fails.
            Err(err) if err.is_group() || self.group.is_some() => Err(err),
            Err(err) => {
                let status = internal(err);
                // Highest index first, so removal leaves the others where they are.
                for &i in rows.iter().rev() {
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
    fn plan_chunks(&self, mut budget: usize) -> Vec<u64> {
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
            chosen.push(seq.id);
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
                // A whole chunk at its fixed offset computes what any prompt starting the
                // same way would: later prompts may share its blocks.
                let prefill_chunk = self.config.prefill_chunk;
                if self.config.cached_chunk_blocks().is_some()
                    && chunk == prefill_chunk
                    && done.is_multiple_of(prefill_chunk)
                {
                    let (first, end) = (done / BLOCK_TOKENS, (done + chunk) / BLOCK_TOKENS);
                    let names = &seq.prompt_names[first..end.min(seq.prompt_names.len())];
                    self.cache.pool.register(&seq.blocks, first, names);
                }
                (Outcome::Continue, true)
            }
            Err(err) if err.is_group() || self.group.is_some() => return Err(err),
            Err(err) => (Outcome::Failed(internal(err)), false),
        };
        self.finish(i, outcome);
        Ok(ran)
    }
}
