//! Prometheus metrics of one worker, served as text on `--metrics-listen`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use deepseek_proto::placement::EXPERT_LOAD_METRIC;

use crate::model::moe::ExpertLoad;

/// Live counters for `GetLoad` and `/metrics`.
#[derive(Default)]
pub struct Load {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    /// Generated tokens per second over the last step, ×1000.
    pub milli_tokens_per_second: AtomicU64,
    /// Set on shutdown once the grace period is over: every open request ends UNAVAILABLE.
    pub abort: AtomicBool,
    /// Set while this rank's expert-parallel group is re-forming after a failure.
    pub group_down: AtomicBool,
    /// Set while the group's last step had passes to run for any rank: a draining rank stays
    /// until its peers' requests are done too, since they cannot step without it.
    pub group_busy: AtomicBool,
}

impl Load {
    /// The counters of a process's ranks added up; a flag is set when any rank's is.
    pub fn sum<'a>(loads: impl IntoIterator<Item = &'a Load>) -> Load {
        let sum = Load::default();
        let add = |to: &AtomicUsize, from: &AtomicUsize| {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        };
        for load in loads {
            add(&sum.waiting, &load.waiting);
            add(&sum.running, &load.running);
            add(&sum.kv_blocks_used, &load.kv_blocks_used);
            add(&sum.kv_blocks_total, &load.kv_blocks_total);
            sum.milli_tokens_per_second.fetch_add(
                load.milli_tokens_per_second.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            for (to, from) in [
                (&sum.abort, &load.abort),
                (&sum.group_down, &load.group_down),
                (&sum.group_busy, &load.group_busy),
            ] {
                to.fetch_or(from.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        sum
    }

    /// Requests queued or running.
    pub fn busy(&self) -> usize {
        self.waiting.load(Ordering::Relaxed) + self.running.load(Ordering::Relaxed)
    }
}

pub struct Metrics {
    registry: Registry,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub prompt_tokens: Counter,
    /// Prompt tokens found in the prefix cache, not computed again.
    pub prompt_tokens_cached: Counter,
    /// Cached blocks given up for new ones.
    pub kv_blocks_evicted: Counter,
    pub generation_tokens: Counter,
    /// By finish reason (`length`, `stop`, `eos`, `cancelled`, `error`).
    pub requests: Family<Vec<(String, String)>, Counter>,
    /// Tool calls read from replies, by outcome (`parsed`, `malformed`).
    tool_calls: Family<Vec<(String, String)>, Counter>,
    pub preemptions: Counter,
    waiting: Gauge,
    running: Gauge,
    kv_blocks_used: Gauge,
    kv_blocks_total: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let time_to_first_token = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let inter_token_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let [
            prompt_tokens,
            prompt_tokens_cached,
            kv_blocks_evicted,
            generation_tokens,
            preemptions,
        ] = std::array::from_fn(|_| Counter::default());
        let requests = Family::<Vec<(String, String)>, Counter>::default();
        let tool_calls = Family::<Vec<(String, String)>, Counter>::default();
        let [waiting, running, kv_blocks_used, kv_blocks_total] =
            std::array::from_fn(|_| Gauge::default());
        let mut registry = Registry::with_prefix("deepseek_worker");
        registry.register(
            "time_to_first_token_seconds",
            "Arrival to first generated token",
            time_to_first_token.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Time between a sequence's generated tokens",
            inter_token_latency.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens of admitted requests",
            prompt_tokens.clone(),
        );
        registry.register(
            "prompt_tokens_cached",
            "Prompt tokens found in the prefix cache (their KV not computed again)",
            prompt_tokens_cached.clone(),
        );
        registry.register(
            "kv_blocks_evicted",
            "Cached KV blocks given up for new ones",
            kv_blocks_evicted.clone(),
        );
        registry.register(
            "generation_tokens",
            "Generated tokens",
            generation_tokens.clone(),
        );
        registry.register(
            "requests",
            "Finished requests by finish reason",
            requests.clone(),
        );
        registry.register(
            "tool_calls",
            "Tool calls read from replies: parsed, or malformed and sent as text",
            tool_calls.clone(),
        );
        registry.register(
            "preemptions",
            "Sequences preempted for KV blocks (recomputed later)",
            preemptions.clone(),
        );
        registry.register("waiting_sequences", "Requests queued", waiting.clone());
        registry.register(
            "running_sequences",
            "Sequences being generated",
            running.clone(),
        );
        registry.register(
            "kv_blocks_used",
            "KV cache blocks in use",
            kv_blocks_used.clone(),
        );
        registry.register(
            "kv_blocks_total",
            "KV cache blocks in all",
            kv_blocks_total.clone(),
        );
        Metrics {
            registry,
            time_to_first_token,
            inter_token_latency,
            prompt_tokens,
            prompt_tokens_cached,
            kv_blocks_evicted,
            generation_tokens,
            requests,
            tool_calls,
            preemptions,
            waiting,
            running,
            kv_blocks_used,
            kv_blocks_total,
        }
    }
}

impl Metrics {
    pub fn finished(&self, reason: &str) {
        self.requests
            .get_or_create(&vec![("finish_reason".into(), reason.into())])
            .inc();
    }

    /// A tool call read from a reply: `parsed`, or `malformed` (sent as text).
    pub fn tool_call(&self, outcome: &str) {
        self.tool_calls
            .get_or_create(&vec![("outcome".into(), outcome.into())])
            .inc();
    }

    /// The text of `/metrics`: `load`, and the experts' counters of every local rank (tokens
    /// per expert and bytes sent, added up), none before the model is loaded.
    pub fn render(&self, load: &Load, experts: &[(&ExpertLoad, Option<u64>)]) -> String {
        self.waiting
            .set(load.waiting.load(Ordering::Relaxed) as i64);
        self.running
            .set(load.running.load(Ordering::Relaxed) as i64);
        self.kv_blocks_used
            .set(load.kv_blocks_used.load(Ordering::Relaxed) as i64);
        self.kv_blocks_total
            .set(load.kv_blocks_total.load(Ordering::Relaxed) as i64);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        // `encode` ends with "# EOF"; keep it last.
        let body_end = out.rfind("# EOF").unwrap_or(out.len());
        let eof = out.split_off(body_end);
        if !experts.is_empty() {
            out.push_str(
                "# HELP deepseek_worker_expert_routed_tokens Tokens routed to each expert.\n",
            );
            out.push_str("# TYPE deepseek_worker_expert_routed_tokens counter\n");
            let mut routed = std::collections::BTreeMap::new();
            for (layer, expert, tokens) in experts.iter().flat_map(|(load, _)| load.snapshot()) {
                *routed.entry((layer, expert)).or_insert(0) += tokens;
            }
            for ((layer, expert), tokens) in routed {
                let _ = writeln!(
                    out,
                    "{EXPERT_LOAD_METRIC}{{layer=\"{layer}\",expert=\"{expert}\"}} {tokens}"
                );
            }
            let sent: Vec<u64> = experts.iter().filter_map(|(_, sent)| *sent).collect();
            if !sent.is_empty() {
                let bytes: u64 = sent.iter().sum();
                out.push_str("# HELP deepseek_worker_expert_parallel_bytes_sent Bytes of tokens and expert outputs sent to other ranks.\n");
                out.push_str("# TYPE deepseek_worker_expert_parallel_bytes_sent counter\n");
                let _ = writeln!(
                    out,
                    "deepseek_worker_expert_parallel_bytes_sent_total {bytes}"
                );
            }
        }
        out + &eof
    }
}

/// `/metrics` on its own port.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<()> {
    use axum::http::header;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}
