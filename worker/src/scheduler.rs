//! The scheduler: one thread owns the model, the KV block pool, the queue and the running
//! sequences, and steps them together (continuous batching at the iteration level: a new
//! request joins the next step, a finished one leaves at once).
//!
//! Each step samples a token for every sequence whose logits are ready, runs all of those
//! tokens through the model in one batched, batch-invariant decode pass, then spends what is
//! left of the token budget (`max_batch_tokens`) on prompt chunks, oldest request first.
//!
//! KV memory is paged: a request is admitted when the pool has blocks for its prompt, and a
//! sequence takes one more block each time it crosses a block boundary. When the pool runs
//! dry the newest sequence is preempted: its blocks are freed and it waits at the front of
//! the queue, keeping what it has streamed. Readmitted, it recomputes its cache (prompt
//! chunks, then its generated tokens replayed as decode rows) and carries on with bit-equal
//! numbers, because prompt chunks sit at fixed offsets and decode rows are batch-invariant:
//! greedy output never depends on what else the worker is doing.
//!
//! A sequence whose client went away or whose deadline passed is dropped at the next step
//! and its blocks freed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use deepseek_proto::v1::{FinishReason, GenerateResponse, TokenLogprob, Usage};
use tokio::sync::mpsc;
use tonic::Status;

use crate::backend::{Backend, KvCache, Output, Pass};
use crate::ep::{GroupError, Transport};
use crate::metrics::{Load, Metrics};
use crate::model::cache::{BlockTable, blocks_for};
use crate::sampling::{Next, Sampler, Want};
use crate::tokenizer::{IncrementalDecoder, StopCheck, StopStrings, Tokenizer};
use crate::validate::ValidRequest;

/// How often an idle rank of an expert-parallel group checks in with its peers.
const GROUP_IDLE_POLL: Duration = Duration::from_millis(2);
/// How long a rank waits between attempts to re-form its failed group.
const GROUP_REJOIN_PAUSE: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Tokens one step may run: decode rows plus prompt chunks. A step always runs at least
    /// one waiting chunk, so prompts progress however many sequences decode.
    pub max_batch_tokens: usize,
    pub max_seqs: usize,
    /// Prompts run in chunks of this many tokens at fixed offsets.
    pub prefill_chunk: usize,
    /// Blocks in the KV pool.
    pub kv_blocks: usize,
    /// Requests waiting beyond this are refused with RESOURCE_EXHAUSTED.
    pub max_waiting: usize,
}

pub type ResponseSender = mpsc::UnboundedSender<Result<GenerateResponse, Status>>;

pub struct Submission {
    pub request: ValidRequest,
    pub deadline: Option<Instant>,
    pub respond: ResponseSender,
}

/// The handle the gRPC service submits through.
#[derive(Clone)]
pub struct Scheduler {
    submit: mpsc::UnboundedSender<Submission>,
    pub load: Arc<Load>,
    max_waiting: usize,
}

impl Scheduler {
    /// Starts the scheduler thread; it runs until every handle is dropped. With `group`
    /// (an expert-parallel rank), every step is taken in lockstep with the other ranks.
    pub fn start(
        model: Arc<dyn Backend>,
        tokenizer: Option<Arc<Tokenizer>>,
        config: SchedulerConfig,
        metrics: Arc<Metrics>,
        group: Option<Arc<dyn Transport>>,
    ) -> anyhow::Result<Self> {
        let cache = model.new_cache(config.kv_blocks)?;
        let (submit, inbox) = mpsc::unbounded_channel();
        let load = Arc::new(Load::default());
        load.kv_blocks_total
            .store(config.kv_blocks, Ordering::Relaxed);
        let max_waiting = config.max_waiting;
        let engine = Engine {
            cache,
            model,
            tokenizer,
            config,
            load: load.clone(),
            metrics,
            inbox,
            waiting: VecDeque::new(),
            running: Vec::new(),
            group,
        };
        std::thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || engine.run())
            .expect("spawning the scheduler thread");
        Ok(Scheduler {
            submit,
            load,
            max_waiting,
        })
    }

    /// Queues a request; overload fails fast.
    pub fn submit(&self, submission: Submission) -> Result<(), Status> {
        if self.load.waiting.load(Ordering::Relaxed) >= self.max_waiting {
            return Err(Status::resource_exhausted(format!(
                "{} requests are already waiting; retry later",
                self.max_waiting
            )));
        }
        self.load.waiting.fetch_add(1, Ordering::Relaxed);
        self.submit
            .send(submission)
            .map_err(|_| Status::unavailable("the scheduler has stopped"))
    }
}

struct Sequence {
    request: ValidRequest,
    deadline: Option<Instant>,
    respond: ResponseSender,
    blocks: BlockTable,
    sampler: Sampler,
    /// What predicts the next token (its logits, or the token sampled on the GPU), once the
    /// cache holds every known token.
    next: Option<Next>,
    generated: Vec<u32>,
    decoder: IncrementalDecoder,
    stops: StopStrings,
    arrived: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    span: tracing::Span,
    /// Unique in the process: names the sequence across removals from `running`.
    id: u64,
}

impl Sequence {
    fn new(s: Submission) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let span = tracing::info_span!(
            "request",
            id = %s.request.request_id,
            prompt_tokens = s.request.prompt_ids.len(),
            max_new_tokens = s.request.max_new_tokens,
        );
        Sequence {
            sampler: Sampler::new(s.request.sampling.clone()),
            stops: StopStrings::new(s.request.stop.clone()),
            blocks: BlockTable::default(),
            request: s.request,
            deadline: s.deadline,
            respond: s.respond,
            next: None,
            generated: Vec::new(),
            decoder: IncrementalDecoder::default(),
            arrived: Instant::now(),
            first_token: None,
            last_token: None,
            span,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Tokens the sequence consists of: its prompt and what it generated.
    fn known(&self) -> usize {
        self.request.prompt_ids.len() + self.generated.len()
    }

    fn prefilling(&self) -> bool {
        self.blocks.tokens() < self.request.prompt_ids.len()
    }

    /// The next known token the cache lacks, once the prompt is in: the token just sampled,
    /// or one being replayed after preemption.
    fn next_decode_token(&self) -> Option<u32> {
        let position = self.blocks.tokens();
        let generated = position.checked_sub(self.request.prompt_ids.len())?;
        self.generated.get(generated).copied()
    }

    /// Takes what a forward pass that ended at the cache's last position gives: it predicts
    /// the next token only when the cache holds every known token.
    fn take(&mut self, next: Next) {
        if self.blocks.tokens() == self.known() {
            self.next = Some(next);
        }
    }

    /// What a pass adding `rows` positions should give back: nothing unless it completes
    /// the sequence; then, where the backend samples `on_device`, the next token sampled
    /// there unless penalties or logprobs need the logits on the host. A draw uses the
    /// sampler's next random number, which is why it is taken only for a pass whose result
    /// is used.
    fn want(&mut self, rows: usize, on_device: bool) -> Want {
        if self.blocks.tokens() + rows != self.known() {
            return Want::Nothing;
        }
        if self.request.include_logprobs || !on_device {
            return Want::Logits;
        }
        self.sampler.device_draw().map_or(Want::Logits, Want::Token)
    }
}

struct Engine {
    model: Arc<dyn Backend>,
    tokenizer: Option<Arc<Tokenizer>>,
    config: SchedulerConfig,
    load: Arc<Load>,
    metrics: Arc<Metrics>,
    inbox: mpsc::UnboundedReceiver<Submission>,
    cache: KvCache,
    /// Oldest first; preempted sequences go back to the front.
    waiting: VecDeque<Sequence>,
    /// In arrival order, so the newest is last (the one preempted first).
    running: Vec<Sequence>,
    /// The expert-parallel group this rank steps with, if any.
    group: Option<Arc<dyn Transport>>,
}

enum Outcome {
    Continue,
    Finished(FinishReason),
    Failed(Status),
}

impl Engine {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                if self.group.is_none() {
                    match self.inbox.blocking_recv() {
                        Some(submission) => self.waiting.push_back(Sequence::new(submission)),
                        None => return,
                    }
                } else if self.inbox.is_closed() && self.inbox.is_empty() {
                    return;
                } else {
                    // Peers may have work: this rank keeps stepping (empty) with them.
                    std::thread::sleep(GROUP_IDLE_POLL);
                }
            }
            while let Ok(submission) = self.inbox.try_recv() {
                self.waiting.push_back(Sequence::new(submission));
            }
            if self.load.abort.load(Ordering::Relaxed) {
                self.abort_all();
                continue;
            }
            self.admit();
            let started = Instant::now();
            let decoded = self.step();
            let seconds = started.elapsed().as_secs_f64();
            if seconds > 0.0 {
                self.load.milli_tokens_per_second.store(
                    (decoded as f64 / seconds * 1000.0) as u64,
                    Ordering::Relaxed,
                );
            }
            self.publish_load();
        }
    }

    /// FIFO: the oldest waiting request goes first, and nothing overtakes it while it waits
    /// for room. A request needs blocks for every token it knows (prompt, and anything it
    /// generated before a preemption); beyond the first, admission also leaves 1% of the pool
    /// free so that running sequences can grow without preempting at once.
    fn admit(&mut self) {
        let now = Instant::now();
        self.waiting.retain(|s| {
            let expired = s.deadline.is_some_and(|d| d <= now);
            if expired {
                let _ = s.respond.send(Err(Status::deadline_exceeded(
                    "the deadline passed while queued",
                )));
            }
            !expired && !s.respond.is_closed()
        });
        let watermark = self.cache.pool.total_blocks() / 100;
        while let Some(next) = self.waiting.front_mut() {
            let known = next.known();
            let headroom = if self.running.is_empty() {
                0
            } else {
                watermark
            };
            let fits = self.cache.pool.free_blocks() >= blocks_for(known) + headroom;
            if self.running.len() >= self.config.max_seqs || !fits {
                if self.running.is_empty() {
                    // Alone it can never fit: validation should have stopped it.
                    let s = self.waiting.pop_front().expect("front exists");
                    let _ = s.respond.send(Err(Status::resource_exhausted(format!(
                        "needs {} KV blocks; the pool has {}",
                        blocks_for(known),
                        self.cache.pool.total_blocks()
                    ))));
                    continue;
                }
                break;
            }
            let reserved = self.cache.pool.reserve(&mut next.blocks, known);
            debug_assert!(reserved, "checked above");
            let seq = self.waiting.pop_front().expect("front exists");
            if seq.generated.is_empty() {
                self.metrics
                    .prompt_tokens
                    .inc_by(seq.request.prompt_ids.len() as u64);
            }
            seq.span
                .in_scope(|| tracing::debug!(replay = seq.generated.len(), "admitted"));
            let at = self.running.partition_point(|r| r.arrived <= seq.arrived);
            self.running.insert(at, seq);
        }
    }

    /// One step; returns the tokens generated.
    fn step(&mut self) -> usize {
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
            Ok(passes) => passes,
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
    fn run_passes(&mut self, chunks: &[u64], passes: usize) -> anyhow::Result<()> {
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

    /// The passes (forward calls) this step runs: this rank's own, or in an expert-parallel
    /// group the most any rank needs, since every rank takes part in every pass's exchanges.
    fn agree_on_passes(&self, mine: usize) -> anyhow::Result<usize> {
        let Some(group) = &self.group else {
            return Ok(mine);
        };
        let counts = group.all_to_all(vec![(mine as u32).to_le_bytes().to_vec(); group.size()])?;
        counts.iter().try_fold(mine, |most, count| {
            let count: [u8; 4] = count
                .as_slice()
                .try_into()
                .map_err(|_| anyhow::anyhow!("a malformed pass count from a peer"))?;
            Ok(most.max(u32::from_le_bytes(count) as usize))
        })
    }

    /// A peer of the group failed: every open request ends UNAVAILABLE, and the rank
    /// re-forms the group with its peers (health is NOT_SERVING meanwhile), retrying until
    /// the missing rank is back.
    fn group_failed(&mut self, err: &anyhow::Error) {
        tracing::error!(
            error = format!("{err:#}"),
            "the expert-parallel group failed"
        );
        self.load.group_down.store(true, Ordering::Relaxed);
        self.fail_open_requests();
        let Some(group) = self.group.clone() else {
            return;
        };
        while let Err(err) = group.rejoin() {
            tracing::warn!(
                error = format!("{err:#}"),
                "re-forming the expert-parallel group"
            );
            self.fail_open_requests();
            std::thread::sleep(GROUP_REJOIN_PAUSE);
        }
        tracing::info!("the expert-parallel group is back");
        self.fail_open_requests();
        self.load.group_down.store(false, Ordering::Relaxed);
    }

    fn fail_open_requests(&mut self) {
        while let Ok(submission) = self.inbox.try_recv() {
            self.waiting.push_back(Sequence::new(submission));
        }
        let unavailable = || {
            Status::unavailable("an expert-parallel peer of this worker failed; retry elsewhere")
        };
        for s in self.waiting.drain(..) {
            let _ = s.respond.send(Err(unavailable()));
        }
        while !self.running.is_empty() {
            self.finish(0, Outcome::Failed(unavailable()));
        }
        self.publish_load();
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
    fn decode_together(&mut self) -> anyhow::Result<bool> {
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
            Err(err) if GroupError::is_in(&err) || self.group.is_some() => Err(err),
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
    fn prefill_chunk(&mut self, i: usize) -> anyhow::Result<bool> {
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
                (Outcome::Continue, true)
            }
            Err(err) if GroupError::is_in(&err) || self.group.is_some() => return Err(err),
            Err(err) => (Outcome::Failed(internal(err)), false),
        };
        self.finish(i, outcome);
        Ok(ran)
    }

    /// Ends sequence `i` if the outcome says so; true when it was removed.
    fn finish(&mut self, i: usize, outcome: Outcome) -> bool {
        let message = match outcome {
            Outcome::Continue => return false,
            Outcome::Failed(status) => {
                self.metrics.finished("error");
                Err(status)
            }
            Outcome::Finished(reason) => {
                self.metrics.finished(finish_label(reason));
                Ok(final_message(
                    self.tokenizer.as_deref(),
                    &mut self.running[i],
                    reason,
                ))
            }
        };
        let mut seq = self.running.remove(i);
        self.cache.pool.release(&mut seq.blocks);
        seq.span.in_scope(|| match &message {
            Ok(m) => tracing::info!(
                finish_reason = finish_label(m.finish_reason()),
                completion_tokens = seq.generated.len(),
                seconds = seq.arrived.elapsed().as_secs_f64(),
                "finished"
            ),
            Err(status) => {
                tracing::info!(code = ?status.code(), message = status.message(), "failed")
            }
        });
        let _ = seq.respond.send(message);
        true
    }

    fn abort_all(&mut self) {
        let unavailable =
            || Status::unavailable("the worker shut down before the request finished");
        for s in self.waiting.drain(..) {
            let _ = s.respond.send(Err(unavailable()));
        }
        while !self.running.is_empty() {
            self.finish(0, Outcome::Failed(unavailable()));
        }
        self.publish_load();
    }

    fn publish_load(&self) {
        self.load
            .waiting
            .store(self.waiting.len() + self.inbox.len(), Ordering::Relaxed);
        self.load
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.load.kv_blocks_used.store(
            self.cache.pool.total_blocks() - self.cache.pool.free_blocks(),
            Ordering::Relaxed,
        );
    }
}

/// Samples the next token and streams it; unless that ends the sequence, the token waits
/// for the step's batched forward pass.
fn emit(
    eos_ids: &[u32],
    tokenizer: Option<&Tokenizer>,
    metrics: &Metrics,
    seq: &mut Sequence,
    next: Next,
) -> Outcome {
    let history = seq.request.prompt_ids.iter().chain(&seq.generated);
    let (token, logits) = match next {
        Next::Logits(logits) => (seq.sampler.sample(&logits, history), Some(logits)),
        Next::Token(token) => (token, None),
    };
    seq.generated.push(token);
    let now = Instant::now();
    match seq.last_token.replace(now) {
        Some(previous) => metrics
            .inter_token_latency
            .observe((now - previous).as_secs_f64()),
        None => {
            seq.first_token = Some(now);
            metrics
                .time_to_first_token
                .observe((now - seq.arrived).as_secs_f64());
        }
    }
    metrics.generation_tokens.inc();
    let eos = !seq.request.ignore_eos && eos_ids.contains(&token);
    let mut response = GenerateResponse {
        token_ids: vec![token],
        ..Default::default()
    };
    // (requests with logprobs always keep their logits on the host)
    if let (true, Some(logits)) = (seq.request.include_logprobs, &logits) {
        response.logprobs = vec![TokenLogprob {
            token_id: token,
            logprob: log_softmax_at(logits, token),
        }];
    }
    let mut stopped = false;
    if let Some(tokenizer) = tokenizer.filter(|_| !eos) {
        match seq
            .decoder
            .push(tokenizer, token)
            .map(|delta| seq.stops.push(&delta))
        {
            Ok(StopCheck::Continue(text)) => response.text = text,
            Ok(StopCheck::Stopped(text)) => {
                response.text = text;
                stopped = true;
            }
            Err(err) => return Outcome::Failed(internal(err)),
        }
    }
    if seq.respond.send(Ok(response)).is_err() {
        return Outcome::Finished(FinishReason::Cancelled);
    }
    if stopped {
        return Outcome::Finished(FinishReason::Stop);
    }
    if eos {
        return Outcome::Finished(FinishReason::Eos);
    }
    if seq.generated.len() >= seq.request.max_new_tokens {
        return Outcome::Finished(FinishReason::Length);
    }
    Outcome::Continue
}

/// The last message: held-back text, the finish reason and usage.
fn final_message(
    tokenizer: Option<&Tokenizer>,
    seq: &mut Sequence,
    reason: FinishReason,
) -> GenerateResponse {
    // Release what the decoder and the stop-string check held back; after a stop there is none.
    let mut text = String::new();
    if let Some(tokenizer) = tokenizer.filter(|_| reason != FinishReason::Stop) {
        match seq
            .decoder
            .finish(tokenizer)
            .map(|rest| seq.stops.push(&rest))
        {
            Ok(StopCheck::Continue(released)) => text = released + &seq.stops.flush(),
            Ok(StopCheck::Stopped(released)) => text = released,
            Err(err) => tracing::warn!(error = %err, "detokenizing the tail failed"),
        }
    }
    let now = Instant::now();
    let seconds = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64();
    GenerateResponse {
        text,
        finish_reason: reason as i32,
        usage: Some(Usage {
            prompt_tokens: seq.request.prompt_ids.len() as u32,
            completion_tokens: seq.generated.len() as u32,
            time_to_first_token_seconds: seq.first_token.map_or(0.0, |t| seconds(seq.arrived, t)),
            total_seconds: seconds(seq.arrived, now),
        }),
        ..Default::default()
    }
}

/// Stable metric label of a finish reason.
fn finish_label(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
        FinishReason::Eos => "eos",
        FinishReason::Cancelled => "cancelled",
        FinishReason::Unspecified => "unspecified",
    }
}

fn log_softmax_at(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    (f64::from(logits[token as usize] - max) - sum.ln()) as f32
}

/// Internal errors are logged in full and returned without internals.
fn internal(err: anyhow::Error) -> Status {
    tracing::error!(error = %err, "model step failed");
    Status::internal("the model step failed; see the worker log")
}
