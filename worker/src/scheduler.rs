//! The scheduler: one thread owns the model, the queue and the running sequences, and steps
//! them together (continuous batching at the iteration level: a new request joins the next
//! step, a finished one leaves at once).
//!
//! Each step first decodes one token for every running sequence, then spends what is left of
//! the token budget (`max_batch_tokens`) on prefill chunks, oldest request first. Admission
//! reserves a sequence's whole KV footprint (prompt + max_new_tokens) against the cache
//! capacity, so a running sequence never has to be preempted. A sequence whose client went
//! away or whose deadline passed is dropped at the next step and its KV cache freed.
//!
//! Sequences run one forward pass each within a step, so greedy output cannot depend on what
//! else is scheduled; batching them into shared kernels is the next step for throughput.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use deepseek_proto::v1::{FinishReason, GenerateResponse, TokenLogprob, Usage};
use tokio::sync::mpsc;
use tonic::Status;

use crate::metrics::Metrics;
use crate::model::Model;
use crate::model::cache::KvCache;
use crate::sampling::Sampler;
use crate::tokenizer::{IncrementalDecoder, StopCheck, StopStrings, Tokenizer};
use crate::validate::ValidRequest;

/// Tokens per reported KV block (the cache itself grows per token).
pub const KV_BLOCK_TOKENS: usize = 16;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub max_batch_tokens: usize,
    pub max_seqs: usize,
    /// Tokens the KV cache may hold across all sequences.
    pub kv_capacity_tokens: usize,
    /// Requests waiting beyond this are refused with RESOURCE_EXHAUSTED.
    pub max_waiting: usize,
}

/// Live counters for `GetLoad` and `/metrics`.
#[derive(Default)]
pub struct Load {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_tokens_reserved: AtomicUsize,
    pub kv_capacity_tokens: AtomicUsize,
    /// Generated tokens per second over the last step, ×1000.
    pub milli_tokens_per_second: AtomicU64,
    /// Set on shutdown once the grace period is over: every open request ends UNAVAILABLE.
    pub abort: AtomicBool,
}

impl Load {
    /// Requests queued or running.
    pub fn busy(&self) -> usize {
        self.waiting.load(Ordering::Relaxed) + self.running.load(Ordering::Relaxed)
    }
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
    /// Starts the scheduler thread; it runs until every handle is dropped.
    pub fn start(
        model: Arc<Model>,
        tokenizer: Option<Arc<Tokenizer>>,
        config: SchedulerConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (submit, inbox) = mpsc::unbounded_channel();
        let load = Arc::new(Load::default());
        load.kv_capacity_tokens
            .store(config.kv_capacity_tokens, Ordering::Relaxed);
        let max_waiting = config.max_waiting;
        let engine = Engine {
            model,
            tokenizer,
            config,
            load: load.clone(),
            metrics,
            inbox,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved: 0,
        };
        std::thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || engine.run())
            .expect("spawning the scheduler thread");
        Scheduler {
            submit,
            load,
            max_waiting,
        }
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
    cache: KvCache,
    sampler: Sampler,
    /// Prompt tokens already run through the model.
    prefilled: usize,
    /// Logits of the last position, once the prompt is in.
    next_logits: Option<Vec<f32>>,
    /// The token just sampled, waiting for this step's forward pass.
    pending: Option<u32>,
    generated: Vec<u32>,
    decoder: IncrementalDecoder,
    stops: StopStrings,
    arrived: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

struct Engine {
    model: Arc<Model>,
    tokenizer: Option<Arc<Tokenizer>>,
    config: SchedulerConfig,
    load: Arc<Load>,
    metrics: Arc<Metrics>,
    inbox: mpsc::UnboundedReceiver<Submission>,
    waiting: VecDeque<Submission>,
    running: Vec<Sequence>,
    reserved: usize,
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
                match self.inbox.blocking_recv() {
                    Some(submission) => self.waiting.push_back(submission),
                    None => return,
                }
            }
            while let Ok(submission) = self.inbox.try_recv() {
                self.waiting.push_back(submission);
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
    /// for room.
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
        while let Some(next) = self.waiting.front() {
            let need = next.request.kv_tokens();
            if self.running.len() >= self.config.max_seqs
                || self.reserved + need > self.config.kv_capacity_tokens
            {
                if self.running.is_empty() {
                    // Alone it can never fit: validation should have stopped it.
                    let s = self.waiting.pop_front().expect("front exists");
                    let _ = s.respond.send(Err(Status::resource_exhausted(format!(
                        "needs {need} KV tokens; the cache holds {}",
                        self.config.kv_capacity_tokens
                    ))));
                    continue;
                }
                break;
            }
            let s = self.waiting.pop_front().expect("front exists");
            self.reserved += need;
            self.metrics
                .prompt_tokens
                .inc_by(s.request.prompt_ids.len() as u64);
            self.running.push(Sequence {
                sampler: Sampler::new(s.request.sampling.clone()),
                stops: StopStrings::new(s.request.stop.clone()),
                cache: self.model.new_cache(),
                request: s.request,
                deadline: s.deadline,
                respond: s.respond,
                prefilled: 0,
                next_logits: None,
                pending: None,
                generated: Vec::new(),
                decoder: IncrementalDecoder::default(),
                arrived: Instant::now(),
                first_token: None,
                last_token: None,
            });
        }
    }

    /// One step; returns the tokens generated.
    fn step(&mut self) -> usize {
        let mut budget = self.config.max_batch_tokens;
        let mut generated = 0;
        let now = Instant::now();
        let mut i = 0;
        while i < self.running.len() {
            let seq = &mut self.running[i];
            let outcome = if seq.respond.is_closed() {
                Outcome::Finished(FinishReason::Cancelled)
            } else if seq.deadline.is_some_and(|d| d <= now) {
                Outcome::Failed(Status::deadline_exceeded("the request deadline passed"))
            } else if seq.next_logits.is_some() && budget > 0 {
                budget -= 1;
                generated += 1;
                emit(
                    &self.model.config().eos_token_ids,
                    self.tokenizer.as_deref(),
                    &self.metrics,
                    seq,
                )
            } else {
                Outcome::Continue
            };
            if self.finish(i, outcome) {
                continue;
            }
            i += 1;
        }
        self.decode_together();
        // Prefill with what is left, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &mut self.running[i];
            if seq.prefilled < seq.request.prompt_ids.len() {
                let chunk = (seq.request.prompt_ids.len() - seq.prefilled).min(budget);
                budget -= chunk;
                let outcome = prefill(&self.model, seq, chunk);
                if self.finish(i, outcome) {
                    continue;
                }
            }
            i += 1;
        }
        generated
    }

    /// Runs every sequence's newly sampled token through the model in one batched step.
    fn decode_together(&mut self) {
        let waiting: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].pending.is_some())
            .collect();
        if waiting.is_empty() {
            return;
        }
        let (tokens, mut caches): (Vec<u32>, Vec<&mut KvCache>) = self
            .running
            .iter_mut()
            .filter_map(|seq| Some((seq.pending.take()?, &mut seq.cache)))
            .unzip();
        match self
            .model
            .forward_decode(&tokens, &mut caches)
            .and_then(|l| Ok(l.to_vec2::<f32>()?))
        {
            Ok(logits) => {
                for (i, row) in waiting.into_iter().zip(logits) {
                    self.running[i].next_logits = Some(row);
                }
            }
            Err(err) => {
                let status = internal(err);
                // Highest index first, so swap_remove leaves the others where they are.
                for i in waiting.into_iter().rev() {
                    self.finish(i, Outcome::Failed(status.clone()));
                }
            }
        }
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
        let seq = self.running.swap_remove(i);
        self.reserved -= seq.request.kv_tokens();
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
        self.load
            .kv_tokens_reserved
            .store(self.reserved, Ordering::Relaxed);
    }
}

fn prefill(model: &Model, seq: &mut Sequence, chunk: usize) -> Outcome {
    let tokens = &seq.request.prompt_ids[seq.prefilled..seq.prefilled + chunk];
    match model
        .forward(tokens, &mut seq.cache)
        .and_then(|l| Ok(l.to_vec2::<f32>()?))
    {
        Ok(mut logits) => {
            seq.prefilled += chunk;
            if seq.prefilled == seq.request.prompt_ids.len() {
                seq.next_logits = logits.pop();
            }
            Outcome::Continue
        }
        Err(err) => Outcome::Failed(internal(err)),
    }
}

/// Samples the next token and streams it; unless that ends the sequence, the token waits in
/// `pending` for the step's batched forward pass.
fn emit(
    eos_ids: &[u32],
    tokenizer: Option<&Tokenizer>,
    metrics: &Metrics,
    seq: &mut Sequence,
) -> Outcome {
    let logits = seq.next_logits.take().expect("emit only after prefill");
    let history: Vec<u32> = seq
        .request
        .prompt_ids
        .iter()
        .chain(&seq.generated)
        .copied()
        .collect();
    let token = seq.sampler.sample(&logits, &history);
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
    if seq.request.include_logprobs {
        response.logprobs = vec![TokenLogprob {
            token_id: token,
            logprob: log_softmax_at(&logits, token),
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
    seq.pending = Some(token);
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
