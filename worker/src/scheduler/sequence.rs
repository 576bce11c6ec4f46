//! A request's state while it is scheduled, and what streams it: each token sampled (with
//! its logprob), then the final message with the finish reason and usage.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use deepseek_proto::v1::{FinishReason, GenerateResponse, TokenLogprob, Usage};

use super::{Outcome, ResponseSender, Submission, internal};
use crate::metrics::Metrics;
use crate::model::cache::{BlockTable, PrefixHash, prefix_hashes};
use crate::sampling::{Next, Sampler, Want};
use crate::tokenizer::{IncrementalDecoder, Part, StopCheck, StopStrings, Thinking, Tokenizer};
use crate::tools::{ToolCallParser, ToolStep};
use crate::validate::ValidRequest;

/// One request from submission to its final message: waiting, running, or preempted and
/// waiting again.
pub(super) struct Sequence {
    pub(super) request: ValidRequest,
    pub(super) deadline: Option<Instant>,
    pub(super) respond: ResponseSender,
    pub(super) blocks: BlockTable,
    /// The prefix-cache names of the prompt's full blocks.
    pub(super) prompt_names: Vec<PrefixHash>,
    /// Prompt tokens its first admission found in the prefix cache.
    pub(super) cached_tokens: usize,
    sampler: Sampler,
    /// What predicts the next token (its logits, or the token sampled on the GPU), once the
    /// cache holds every known token.
    pub(super) next: Option<Next>,
    pub(super) generated: Vec<u32>,
    decoder: IncrementalDecoder,
    stops: StopStrings,
    thinking: Option<Thinking>,
    tools: Option<ToolCallParser>,
    pub(super) arrived: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    pub(super) span: tracing::Span,
    /// Unique in the process: names the sequence across removals from `running`.
    pub(super) id: u64,
}

impl Sequence {
    pub(super) fn new(mut s: Submission) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let span = tracing::info_span!(
            "request",
            id = %s.request.request_id,
            prompt_tokens = s.request.prompt_ids.len(),
            max_new_tokens = s.request.max_new_tokens,
        );
        deepseek_proto::telemetry::continue_trace(&span, &s.trace);
        Sequence {
            sampler: Sampler::new(s.request.sampling.clone()),
            stops: StopStrings::new(s.request.stop.clone()),
            thinking: s.request.thinking,
            tools: s
                .request
                .tools
                .take()
                .map(|tools| ToolCallParser::new(tools.markers, tools.names, &tools.forced)),
            blocks: BlockTable::default(),
            prompt_names: prefix_hashes(&s.request.prompt_ids),
            cached_tokens: 0,
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
    pub(super) fn known(&self) -> usize {
        self.request.prompt_ids.len() + self.generated.len()
    }

    pub(super) fn prefilling(&self) -> bool {
        self.blocks.tokens() < self.request.prompt_ids.len()
    }

    /// The next known token the cache lacks, once the prompt is in: the token just sampled,
    /// or one being replayed after preemption.
    pub(super) fn next_decode_token(&self) -> Option<u32> {
        let position = self.blocks.tokens();
        let generated = position.checked_sub(self.request.prompt_ids.len())?;
        self.generated.get(generated).copied()
    }

    /// Takes what a forward pass that ended at the cache's last position gives: it predicts
    /// the next token only when the cache holds every known token.
    pub(super) fn take(&mut self, next: Next) {
        if self.blocks.tokens() == self.known() {
            self.next = Some(next);
        }
    }

    /// What a pass adding `rows` positions should give back: nothing unless it completes
    /// the sequence; then, where the backend samples `on_device`, the next token sampled
    /// there unless penalties or logprobs need the logits on the host. A draw uses the
    /// sampler's next random number, which is why it is taken only for a pass whose result
    /// is used.
    pub(super) fn want(&mut self, rows: usize, on_device: bool) -> Want {
        if self.blocks.tokens() + rows != self.known() {
            return Want::Nothing;
        }
        if self.request.include_logprobs || !on_device {
            return Want::Logits;
        }
        self.sampler.device_draw().map_or(Want::Logits, Want::Token)
    }
}

/// Samples the next token and streams it; unless that ends the sequence, the token waits
/// for the step's batched forward pass.
pub(super) fn emit(
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
    let part = seq
        .thinking
        .as_mut()
        .map_or(Part::Answer, |t| t.step(token));
    if let Some(tokenizer) = tokenizer.filter(|_| !eos) {
        let delta = match answer_text(tokenizer, metrics, seq, part, token, &mut response) {
            Ok(delta) => delta,
            Err(err) => return Outcome::Failed(internal(err)),
        };
        // Stop strings end the answer, not the thinking.
        match part {
            Part::Thinking => response.reasoning_text = delta,
            Part::Tag => {}
            Part::Answer => match seq.stops.push(&delta) {
                StopCheck::Continue(text) => response.text = text,
                StopCheck::Stopped(text) => {
                    response.text = text;
                    stopped = true;
                }
            },
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

/// The text a token adds to its part of the output. In the answer, tool-call tokens are
/// held back: a call completed goes into `response`, a malformed one comes out as text.
fn answer_text(
    tokenizer: &Tokenizer,
    metrics: &Metrics,
    seq: &mut Sequence,
    part: Part,
    token: u32,
    response: &mut GenerateResponse,
) -> crate::error::Result<String> {
    let step = match (part, seq.tools.as_mut()) {
        (Part::Answer, Some(tools)) => tools.step(tokenizer, token),
        _ => ToolStep::Text,
    };
    match step {
        ToolStep::Text => seq.decoder.push(tokenizer, token),
        ToolStep::Held => Ok(String::new()),
        ToolStep::Call(call) => {
            metrics.tool_call("parsed");
            response.tool_calls.push(call);
            Ok(String::new())
        }
        ToolStep::Release(tokens) => released_call(tokenizer, metrics, seq, &tokens),
    }
}

/// A malformed or cut-off call's text, after any text the decoder still held.
fn released_call(
    tokenizer: &Tokenizer,
    metrics: &Metrics,
    seq: &mut Sequence,
    tokens: &[u32],
) -> crate::error::Result<String> {
    metrics.tool_call("malformed");
    tracing::warn!(parent: &seq.span, tokens = tokens.len(), "a tool call the model wrote malformed or left unfinished goes out as text");
    Ok(seq.decoder.finish(tokenizer)? + &tokenizer.decode(tokens, false)?)
}

/// The last message: held-back text, the finish reason and usage.
pub(super) fn final_message(
    tokenizer: Option<&Tokenizer>,
    metrics: &Metrics,
    seq: &mut Sequence,
    reason: FinishReason,
) -> GenerateResponse {
    // Release what the decoder and the stop-string check held back; after a stop there is none.
    let (mut text, mut reasoning_text) = (String::new(), String::new());
    let thinking = seq.thinking.is_some_and(|t| t.inside());
    if let Some(tokenizer) = tokenizer.filter(|_| reason != FinishReason::Stop) {
        let cut_off = seq.tools.as_mut().map(ToolCallParser::finish);
        let rest = match cut_off.filter(|tokens| !tokens.is_empty()) {
            Some(tokens) => released_call(tokenizer, metrics, seq, &tokens),
            None => seq.decoder.finish(tokenizer),
        };
        match rest {
            Ok(rest) if thinking => reasoning_text = rest,
            Ok(rest) => {
                text = match seq.stops.push(&rest) {
                    StopCheck::Continue(released) => released + &seq.stops.flush(),
                    StopCheck::Stopped(released) => released,
                }
            }
            Err(err) => tracing::warn!(error = %err, "detokenizing the tail failed"),
        }
    }
    let now = Instant::now();
    let seconds = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64();
    GenerateResponse {
        text,
        reasoning_text,
        finish_reason: reason as i32,
        usage: Some(Usage {
            prompt_tokens: seq.request.prompt_ids.len() as u32,
            completion_tokens: seq.generated.len() as u32,
            time_to_first_token_seconds: seq.first_token.map_or(0.0, |t| seconds(seq.arrived, t)),
            total_seconds: seconds(seq.arrived, now),
            cached_prompt_tokens: seq.cached_tokens as u32,
        }),
        ..Default::default()
    }
}

/// Stable metric label of a finish reason.
pub(super) fn finish_label(reason: FinishReason) -> &'static str {
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
