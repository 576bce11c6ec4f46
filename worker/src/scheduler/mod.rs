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
//!
//! The parts: this file holds the handle the service submits through and the engine's loop
//! (admission, finishing); `steps.rs` one step's passes (decode rows, prompt chunks,
//! preemption); `group.rs` lockstep with an expert-parallel group and its failure;
//! `sequence.rs` a request's state and the messages it streams.

mod group;
mod sequence;
mod steps;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use deepseek_proto::v1::{FinishReason, GenerateResponse};
use tokio::sync::mpsc;
use tonic::Status;

use self::sequence::{Sequence, final_message, finish_label};
use crate::backend::{Backend, KvCache};
use crate::ep::Transport;
use crate::error::{Error, Result};
use crate::metrics::{Load, Metrics};
use crate::model::cache::{BLOCK_TOKENS, KvPool, blocks_for};
use crate::tokenizer::Tokenizer;
use crate::validate::ValidRequest;

/// How often an idle rank of an expert-parallel group checks in with its peers.
const GROUP_IDLE_POLL: Duration = Duration::from_millis(2);

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
    /// Threads of a compute pool of this scheduler's own; `None` shares the process's. A
    /// process running several ranks gives each its own: a rank blocked in a group
    /// exchange must never hold (or run nested inside) another rank's work.
    pub compute_threads: Option<usize>,
}

impl SchedulerConfig {
    /// Blocks in a prefill chunk, the unit the prefix cache registers and shares in; `None`
    /// (no caching) when a chunk is not whole blocks.
    fn cached_chunk_blocks(&self) -> Option<usize> {
        let whole =
            self.prefill_chunk >= BLOCK_TOKENS && self.prefill_chunk.is_multiple_of(BLOCK_TOKENS);
        whole.then_some(self.prefill_chunk / BLOCK_TOKENS)
    }
}

pub type ResponseSender = mpsc::UnboundedSender<Result<GenerateResponse, Status>>;

pub struct Submission {
    pub request: ValidRequest,
    pub deadline: Option<Instant>,
    pub respond: ResponseSender,
    /// The caller's trace context (gRPC metadata with its `traceparent`), which the request's
    /// span continues.
    pub trace: tonic::metadata::MetadataMap,
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
    ) -> Result<Self> {
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
        let pool = engine
            .config
            .compute_threads
            .map(|threads| rayon::ThreadPoolBuilder::new().num_threads(threads).build())
            .transpose()
            .map_err(|e| Error::msg(format!("a compute pool for the scheduler: {e}")))?;
        std::thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || match pool {
                Some(pool) => pool.install(|| engine.run()),
                None => engine.run(),
            })
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
            self.metrics
                .kv_blocks_evicted
                .inc_by(self.cache.pool.take_evicted());
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
            let chunk_blocks = self.config.cached_chunk_blocks();
            let shared = share_cached_prefix(&mut self.cache.pool, chunk_blocks, next);
            let needed = blocks_for(known) - next.blocks.blocks().len();
            let fits = self.cache.pool.free_blocks() >= needed + headroom;
            if self.running.len() >= self.config.max_seqs || !fits {
                self.cache.pool.release(&mut next.blocks);
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
            let mut seq = self.waiting.pop_front().expect("front exists");
            if seq.generated.is_empty() {
                seq.cached_tokens = shared;
                self.metrics
                    .prompt_tokens
                    .inc_by(seq.request.prompt_ids.len() as u64);
                self.metrics.prompt_tokens_cached.inc_by(shared as u64);
            }
            seq.span
                .in_scope(|| tracing::debug!(replay = seq.generated.len(), "admitted"));
            let at = self.running.partition_point(|r| r.arrived <= seq.arrived);
            self.running.insert(at, seq);
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
                    &self.metrics,
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

/// Starts a sequence that holds no blocks with the longest run of its prompt's blocks the
/// prefix cache has, in whole prefill chunks (so the chunks left start where they would
/// from scratch, and compute the same numbers), leaving at least the prompt's last token
/// to compute. Returns the tokens it shares.
fn share_cached_prefix(
    pool: &mut KvPool,
    chunk_blocks: Option<usize>,
    seq: &mut Sequence,
) -> usize {
    let Some(chunk_blocks) = chunk_blocks.filter(|_| seq.blocks.blocks().is_empty()) else {
        return 0;
    };
    let most = (seq.request.prompt_ids.len() - 1) / BLOCK_TOKENS;
    let names = &seq.prompt_names[..most.min(seq.prompt_names.len())];
    let run = pool.cached_run(names);
    let shared = run / chunk_blocks * chunk_blocks;
    pool.share(&mut seq.blocks, &names[..shared]);
    shared * BLOCK_TOKENS
}

/// Internal errors are logged in full and returned without internals.
fn internal(err: Error) -> Status {
    tracing::error!(error = %err, "model step failed");
    Status::internal("the model step failed; see the worker log")
}
