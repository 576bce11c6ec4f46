//! The routing core both fronts share: pick a backend, open the worker's stream, retry on
//! another backend while nothing has been streamed, then pass messages through. Dropping the
//! returned stream drops the worker's stream, which cancels the request there.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use deepseek_proto::telemetry;
use deepseek_proto::v1::generate_request::Prompt;
use deepseek_proto::v1::inference_client::InferenceClient;
use deepseek_proto::v1::{GenerateRequest, GenerateResponse, GetLoadRequest, GetLoadResponse};
use futures::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tracing::Instrument;

use crate::auth::Key;
use crate::backend::{Backend, BackendSpec, Check, InFlight};
use crate::error::Error;
use crate::health;
use crate::metrics::Metrics;
use crate::policy::{Picker, Policy, View, stable_hash};
use crate::routed::chunk_names;
use crate::tls::WorkerConnector;

/// Bytes of the prompt that decide prefix affinity: enough for a system prompt's opening.
const AFFINITY_PREFIX_BYTES: usize = 256;

/// The gRPC metadata key of the seconds after which a refused request may be retried.
pub const RETRY_AFTER: &str = "retry-after";

pub type ResponseStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub policy: Policy,
    /// `(pool, weight)` in preference order.
    pub pools: Vec<(String, u32)>,
    /// Streams a backend may have open before its pool counts as saturated there.
    pub max_in_flight_per_backend: usize,
    /// Requests the router holds at once; beyond, RESOURCE_EXHAUSTED (HTTP 429).
    pub max_in_flight: usize,
    /// Backends tried for one request before giving up.
    pub max_attempts: usize,
    /// How long a request waits for a healthy backend when there is none (a deployment
    /// waking from zero groups); zero: UNAVAILABLE at once.
    pub hold_for_backend: Duration,
    /// Mutual TLS to the workers; plaintext without.
    pub worker_tls: Option<WorkerConnector>,
}

/// How often a held request looks for a healthy backend again.
const HOLD_POLL: Duration = Duration::from_millis(50);

/// The least time between two rounds of `Router::recheck_ejected`: in an outage, requests
/// share one round instead of each asking every backend.
const RECHECK_SPACING: Duration = Duration::from_millis(250);

/// The backends in use and the picker built over them; replaced whole when discovery
/// changes the set.
struct Members {
    backends: Vec<Arc<Backend>>,
    picker: Mutex<Picker>,
}

pub struct Router {
    members: RwLock<Arc<Members>>,
    open: Arc<AtomicUsize>,
    /// Requests held until a backend is healthy.
    waiting: Arc<AtomicUsize>,
    /// Orders the prompts sent, for `cache-aware`'s least-recently-sent.
    sends: AtomicU64,
    /// Prompt bytes per prompt token in answered requests (f64 bits), which turns a
    /// backend's KV capacity in tokens into the prompt bytes it holds.
    bytes_per_token: Arc<AtomicU64>,
    /// When `recheck_ejected` last asked the ejected backends; one round at a time.
    rechecked: tokio::sync::Mutex<Option<Instant>>,
    config: RouterConfig,
    pub metrics: Metrics,
}

/// One in a count (requests open, requests held) until it drops.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    /// Counts one more in `count`; gives the count before.
    fn new(count: &Arc<AtomicUsize>) -> (Self, usize) {
        (
            Counted(count.clone()),
            count.fetch_add(1, Ordering::Relaxed),
        )
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Router {
    pub fn new(specs: Vec<BackendSpec>, config: RouterConfig) -> Result<Self, Error> {
        let router = Router {
            members: RwLock::new(Arc::new(Members {
                backends: Vec::new(),
                picker: Mutex::new(Picker::new(config.policy, config.pools.clone(), &[], 1)),
            })),
            open: Arc::new(AtomicUsize::new(0)),
            waiting: Arc::new(AtomicUsize::new(0)),
            sends: AtomicU64::new(0),
            // English text in a 100k+ BPE vocabulary; token-id prompts count 4 bytes a token.
            bytes_per_token: Arc::new(AtomicU64::new(4.0f64.to_bits())),
            rechecked: tokio::sync::Mutex::new(None),
            metrics: Metrics::default(),
            config,
        };
        router.set_backends(specs)?;
        Ok(router)
    }

    /// The backends in use now.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.members().backends.clone()
    }

    fn members(&self) -> Arc<Members> {
        self.members
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replaces the backend set. Backends that stay keep their connection, health and
    /// in-flight count; streams open on removed ones run to their end.
    pub fn set_backends(&self, specs: Vec<BackendSpec>) -> Result<(), Error> {
        let current = self.members();
        let backends = specs
            .into_iter()
            .map(
                |spec| match current.backends.iter().find(|b| b.spec == spec) {
                    Some(kept) => Ok(kept.clone()),
                    None => Backend::new(spec, self.config.worker_tls.as_ref()).map(Arc::new),
                },
            )
            .collect::<Result<Vec<_>, _>>()?;
        let names: Vec<(&str, &str)> = backends
            .iter()
            .map(|b| (b.spec.pool.as_str(), b.spec.addr.as_str()))
            .collect();
        let picker = Picker::new(
            self.config.policy,
            self.config.pools.clone(),
            &names,
            self.config.max_in_flight_per_backend,
        );
        *self
            .members
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(Members {
            backends,
            picker: Mutex::new(picker),
        });
        Ok(())
    }

    fn admit(&self) -> Result<Counted, Status> {
        let (admitted, open) = Counted::new(&self.open);
        if open >= self.config.max_in_flight {
            return Err(Status::resource_exhausted(format!(
                "the router is at its limit of {} open requests; retry later",
                self.config.max_in_flight
            )));
        }
        Ok(admitted)
    }

    /// The backend for a request with prefix hash `key` and prompt chunks `chunks`, other
    /// than those `tried` (by address).
    fn pick(&self, key: Option<u64>, chunks: &[u64], tried: &[String]) -> Option<Arc<Backend>> {
        let members = self.members();
        let views: Vec<View> = members
            .backends
            .iter()
            .map(|b| View {
                pool: &b.spec.pool,
                weight: b.spec.weight,
                healthy: b.healthy(),
                load: b.load(),
                in_flight: b.in_flight(),
                cached: if chunks.is_empty() {
                    (0, 0)
                } else {
                    b.cached_chunks(chunks)
                },
            })
            .collect();
        let exclude: Vec<usize> = (0..members.backends.len())
            .filter(|&i| tried.contains(&members.backends[i].spec.addr))
            .collect();
        let i = members
            .picker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pick(&views, key, &exclude)?;
        Some(members.backends[i].clone())
    }

    /// The `/metrics` page.
    pub fn metrics_text(&self) -> String {
        self.metrics
            .render(&self.backends(), self.waiting.load(Ordering::Relaxed))
    }

    /// Whether requests wait for a backend when none is healthy.
    pub fn holds_requests(&self) -> bool {
        !self.config.hold_for_backend.is_zero()
    }

    /// Whether the router takes requests: a backend is healthy, or it holds requests until
    /// one is (the gRPC health service's overall status, and `/ready`).
    pub fn ready(&self) -> bool {
        self.any_healthy() || self.holds_requests()
    }

    fn any_healthy(&self) -> bool {
        self.backends().iter().any(|b| b.healthy())
    }

    /// With no backend left to try (the picker takes healthy ones only): whether to try
    /// again once one is healthy. When none is, the ejected ones are asked again, once a
    /// request (`rechecked`); then, if requests are held (the pools are at zero, or a group
    /// just listed is still loading), waits for one up to `hold_for_backend` after the
    /// request `arrived`, counted in `waiting`; UNAVAILABLE after that, with a
    /// `retry-after` in seconds (HTTP's `Retry-After`).
    async fn wait_again(&self, arrived: Instant, rechecked: &mut bool) -> Result<bool, Status> {
        if self.any_healthy() {
            return Ok(false);
        }
        if !*rechecked {
            *rechecked = true;
            if self.recheck_ejected().await {
                return Ok(true);
            }
        }
        let hold = self.config.hold_for_backend;
        if hold.is_zero() {
            return Ok(false);
        }
        let _waiting = Counted::new(&self.waiting);
        while !self.any_healthy() {
            if arrived.elapsed() >= hold {
                let seconds = hold.as_secs().max(1);
                let mut status = Status::unavailable(format!(
                    "no healthy backend after holding the request {seconds} s; retry later"
                ));
                if let Ok(value) = seconds.to_string().parse() {
                    status.metadata_mut().insert(RETRY_AFTER, value);
                }
                return Err(status);
            }
            tokio::time::sleep(HOLD_POLL).await;
        }
        Ok(true)
    }

    /// With no healthy backend, asks the ejected ones for their health now instead of
    /// refusing on what a check up to an interval ago found: a rank ejected while it loaded
    /// may serve by now, just as the group it replaces leaves (a rollout's step). One round
    /// at a time, at most one per `RECHECK_SPACING`; whether a backend is healthy after it.
    async fn recheck_ejected(&self) -> bool {
        let mut last = self.rechecked.lock().await;
        if last.is_none_or(|at| at.elapsed() >= RECHECK_SPACING) {
            let ejected: Vec<Arc<Backend>> = (self.backends().into_iter())
                .filter(|b| !b.healthy())
                .collect();
            let checks = futures::future::join_all(ejected.iter().map(|b| health::probe(b)));
            for (backend, check) in ejected.iter().zip(checks.await) {
                if check == Check::Serving {
                    tracing::info!(backend = %backend.spec.addr, "an ejected backend serves again");
                    backend.observed(check, None);
                }
            }
            *last = Some(Instant::now());
        }
        self.any_healthy()
    }

    /// Why no backend could be picked.
    fn none_left(&self, last: Option<Status>) -> Status {
        last.unwrap_or_else(|| {
            if self.backends().iter().any(|b| b.healthy()) {
                Status::resource_exhausted("every backend is saturated; retry later")
            } else {
                Status::unavailable("no healthy backend")
            }
        })
    }

    /// Opens a `Generate` stream on the best backend. A failure before the first message is
    /// retried on another backend (up to `max_attempts`); after it, errors pass through.
    /// Opens a stream on a backend for a caller with API key `key` (if keys are in use),
    /// whose requests and tokens are counted, and whose tokens spend its rate limit. The
    /// request's span continues the caller's trace (`trace`: its headers or metadata), and
    /// the backend's continues this one.
    pub async fn generate(
        &self,
        request: GenerateRequest,
        timeout: Option<Duration>,
        key: Option<Arc<Key>>,
        trace: &MetadataMap,
    ) -> Result<ResponseStream, Status> {
        let span = tracing::info_span!("route", id = %request.request_id);
        telemetry::continue_trace(&span, trace);
        let opened = self.open_stream(request, timeout).instrument(span).await;
        self.metrics.opened(opened.as_ref().err().map(Status::code));
        let Some(key) = key else {
            return opened;
        };
        let tokens = self.metrics.count_key(key.name());
        Ok(Box::pin(opened?.inspect(move |message| {
            if let Ok(m) = message {
                tokens.inc_by(m.token_ids.len() as u64);
                key.spend(m.token_ids.len() as u64);
            }
        })))
    }

    async fn open_stream(
        &self,
        request: GenerateRequest,
        timeout: Option<Duration>,
    ) -> Result<ResponseStream, Status> {
        let admitted = self.admit()?;
        let started = Instant::now();
        // What the policy reads of the prompt: its opening's hash, or all of it in chunks.
        let (key, prompt) = match self.config.policy {
            Policy::PrefixAffinity => (affinity_key(&request), Vec::new()),
            Policy::CacheAware => (None, prompt_bytes(&request, usize::MAX)),
            Policy::LeastLoad | Policy::Weighted => (None, Vec::new()),
        };
        let chunks = chunk_names(&prompt);
        let (mut tried, mut rechecked) = (Vec::new(), false);
        let mut last = None;
        loop {
            let picked = (tried.len() < self.config.max_attempts)
                .then(|| self.pick(key, &chunks, &tried))
                .flatten();
            let Some(backend) = picked else {
                if self.wait_again(started, &mut rechecked).await? {
                    tried.clear();
                    continue;
                }
                break;
            };
            if !tried.is_empty() {
                self.metrics.retries.inc();
            }
            tried.push(backend.spec.addr.clone());
            let in_flight = backend.start();
            let mut call = tonic::Request::new(request.clone());
            telemetry::propagate(&tracing::Span::current(), call.metadata_mut());
            if let Some(timeout) = timeout {
                call.set_timeout(timeout.saturating_sub(started.elapsed()));
            }
            let opened = match backend.client().generate(call).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    stream.message().await.map(|first| (first, stream))
                }
                Err(status) => Err(status),
            };
            match opened {
                Ok((first, rest)) => {
                    self.metrics.first_message(started.elapsed());
                    let stream = pass_through(first, rest, (in_flight, admitted));
                    if chunks.is_empty() {
                        return Ok(stream);
                    }
                    let sent = self.sends.fetch_add(1, Ordering::Relaxed);
                    backend.sent(
                        &chunks,
                        sent,
                        f64::from_bits(self.bytes_per_token.load(Ordering::Relaxed)),
                    );
                    return Ok(calibrating(
                        stream,
                        prompt.len(),
                        self.bytes_per_token.clone(),
                    ));
                }
                Err(status) if retryable(&status) => {
                    eject_unless_full(&backend, &status);
                    tracing::warn!(backend = %backend.spec.addr, code = ?status.code(), message = status.message(), "backend failed before the first token; trying another");
                    last = Some(status);
                }
                Err(status) => return Err(status),
            }
        }
        Err(self.none_left(last))
    }

    /// A unary call on the least-loaded healthy backend, failing over like `generate`.
    pub async fn unary<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(InferenceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let started = Instant::now();
        let (mut tried, mut rechecked) = (Vec::new(), false);
        let mut last = None;
        loop {
            let picked = (tried.len() < self.config.max_attempts)
                .then(|| self.pick(None, &[], &tried))
                .flatten();
            let Some(backend) = picked else {
                if self.wait_again(started, &mut rechecked).await? {
                    tried.clear();
                    continue;
                }
                break;
            };
            tried.push(backend.spec.addr.clone());
            let _in_flight = backend.start();
            match call(backend.client()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if retryable(&status) => {
                    eject_unless_full(&backend, &status);
                    last = Some(status);
                }
                Err(status) => return Err(status),
            }
        }
        Err(self.none_left(last))
    }

    /// The group's load: every healthy backend's report, summed.
    pub async fn load(&self) -> GetLoadResponse {
        let reports = futures::future::join_all(
            self.backends()
                .into_iter()
                .filter(|b| b.healthy())
                .map(|b| async move { b.client().get_load(GetLoadRequest {}).await }),
        )
        .await;
        reports
            .into_iter()
            .flatten()
            .map(tonic::Response::into_inner)
            .fold(GetLoadResponse::default(), |sum, r| GetLoadResponse {
                waiting_sequences: sum.waiting_sequences + r.waiting_sequences,
                running_sequences: sum.running_sequences + r.running_sequences,
                kv_blocks_used: sum.kv_blocks_used + r.kv_blocks_used,
                kv_blocks_total: sum.kv_blocks_total + r.kv_blocks_total,
                tokens_per_second: sum.tokens_per_second + r.tokens_per_second,
                // (the same on every rank of one model)
                kv_block_tokens: sum.kv_block_tokens.max(r.kv_block_tokens),
            })
    }
}

/// After a retryable failure: a backend that was merely full stays in; any other is ejected
/// until a health check finds it serving.
fn eject_unless_full(backend: &Backend, status: &Status) {
    if status.code() != Code::ResourceExhausted {
        backend.failed();
    }
}

/// Failures that say nothing about the request itself: another backend may serve it.
/// A status with a `source` was made here from a transport error (a connection the backend
/// dropped, whatever code it maps to); `Cancelled` is one too, since a client that goes away
/// drops the router's call instead of seeing a status. A passed deadline is final.
fn retryable(status: &Status) -> bool {
    if status.code() == Code::DeadlineExceeded {
        return false;
    }
    std::error::Error::source(status).is_some()
        || matches!(
            status.code(),
            Code::Unavailable
                | Code::Unknown
                | Code::ResourceExhausted
                | Code::Aborted
                | Code::Cancelled
        )
}

/// The first message, then the rest of the worker's stream; the guards live as long as the
/// stream, and an error ends it.
fn pass_through(
    first: Option<GenerateResponse>,
    rest: Streaming<GenerateResponse>,
    guards: (InFlight, Counted),
) -> ResponseStream {
    let Some(first) = first else {
        return Box::pin(futures::stream::empty());
    };
    let tail = futures::stream::unfold(Some((rest, guards)), |state| async move {
        let (mut rest, guards) = state?;
        match rest.message().await {
            Ok(Some(message)) => Some((Ok(message), Some((rest, guards)))),
            Ok(None) => None,
            Err(status) => Some((Err(status), None)),
        }
    });
    Box::pin(futures::stream::once(async move { Ok(first) }).chain(tail))
}

/// Learns the prompt bytes per token from the usage in the stream's last message: an
/// average over recent requests (each weighs 1/16).
fn calibrating(
    stream: ResponseStream,
    prompt_bytes: usize,
    bytes_per_token: Arc<AtomicU64>,
) -> ResponseStream {
    Box::pin(stream.inspect(move |message| {
        let Some(usage) = message.as_ref().ok().and_then(|m| m.usage.as_ref()) else {
            return;
        };
        if usage.prompt_tokens == 0 {
            return;
        }
        let seen = prompt_bytes as f64 / f64::from(usage.prompt_tokens);
        let _ = bytes_per_token.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            let old = f64::from_bits(bits);
            Some((old + (seen - old) / 16.0).to_bits())
        });
    }))
}

/// The hash of the prompt's opening bytes, for prefix affinity.
pub fn affinity_key(request: &GenerateRequest) -> Option<u64> {
    request.prompt.as_ref()?;
    Some(stable_hash(&prompt_bytes(request, AFFINITY_PREFIX_BYTES)))
}

/// The first `limit` bytes of a prompt as the router compares prompts: text as it is, token
/// ids little-endian, a chat's tools and then each message's role, content and calls, each
/// ended by a NUL.
pub fn prompt_bytes(request: &GenerateRequest, limit: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    match &request.prompt {
        None => {}
        Some(Prompt::Text(text)) => bytes.extend_from_slice(text.as_bytes()),
        Some(Prompt::TokenIds(ids)) => {
            for id in ids.ids.iter().take(limit.div_ceil(4)) {
                bytes.extend_from_slice(&id.to_le_bytes());
            }
        }
        Some(Prompt::Chat(chat)) => {
            let push = |bytes: &mut Vec<u8>, field: &str| {
                bytes.extend_from_slice(field.as_bytes());
                bytes.push(0);
            };
            if !chat.tools_json.is_empty() {
                push(&mut bytes, &chat.tools_json);
            }
            for m in &chat.messages {
                push(&mut bytes, &m.role);
                push(&mut bytes, &m.content);
                for call in &m.tool_calls {
                    push(&mut bytes, &call.name);
                    push(&mut bytes, &call.arguments);
                }
                if bytes.len() >= limit {
                    break;
                }
            }
        }
    }
    bytes.truncate(limit);
    bytes
}

#[cfg(test)]
mod tests {
    use deepseek_proto::v1::{ChatMessage, ChatMessages, TokenIds, ToolCall};

    use super::*;

    fn with(prompt: Prompt) -> GenerateRequest {
        GenerateRequest {
            prompt: Some(prompt),
            ..Default::default()
        }
    }

    #[test]
    fn prompts_compare_by_their_bytes_tools_and_calls_included() {
        let ids = with(Prompt::TokenIds(TokenIds { ids: vec![1, 258] }));
        assert_eq!(prompt_bytes(&ids, usize::MAX), [1, 0, 0, 0, 2, 1, 0, 0]);
        assert_eq!(prompt_bytes(&ids, 5).len(), 5);
        let chat = |tools_json: &str, arguments: &str| {
            with(Prompt::Chat(ChatMessages {
                tools_json: tools_json.into(),
                messages: vec![ChatMessage {
                    role: "assistant".into(),
                    tool_calls: vec![ToolCall {
                        id: "c".into(),
                        name: "f".into(),
                        arguments: arguments.into(),
                    }],
                    ..Default::default()
                }],
            }))
        };
        assert_eq!(
            prompt_bytes(&chat("[]", "{}"), usize::MAX),
            b"[]\0assistant\0\0f\0{}\0"
        );
        for other in [chat("", "{}"), chat("[]", "{\"a\": 1}")] {
            assert_ne!(affinity_key(&other), affinity_key(&chat("[]", "{}")));
        }
        assert_eq!(affinity_key(&GenerateRequest::default()), None);
    }
}
