//! Prometheus metrics of one worker, served as text on `--metrics-listen`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::Model;
use crate::scheduler::Load;

pub struct Metrics {
    registry: Registry,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    /// By finish reason (`length`, `stop`, `eos`, `cancelled`, `error`).
    pub requests: Family<Vec<(String, String)>, Counter>,
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
        let [prompt_tokens, generation_tokens, preemptions] =
            std::array::from_fn(|_| Counter::default());
        let requests = Family::<Vec<(String, String)>, Counter>::default();
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
            generation_tokens,
            requests,
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

    /// The text exposition: the registry, then per-expert routed-token counters read from the
    /// model (the load signal for expert placement).
    pub fn render(&self, load: &Load, model: Option<&Model>) -> String {
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
        if let Some(model) = model {
            out.push_str(
                "# HELP deepseek_worker_expert_routed_tokens Tokens routed to each expert.\n",
            );
            out.push_str("# TYPE deepseek_worker_expert_routed_tokens counter\n");
            for (layer, expert, tokens) in model.expert_load().snapshot() {
                let _ = writeln!(
                    out,
                    "deepseek_worker_expert_routed_tokens_total{{layer=\"{layer}\",expert=\"{expert}\"}} {tokens}"
                );
            }
            if let Some(bytes) = model.expert_bytes_sent() {
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

/// Tokens routed to each expert, summed over `/metrics` texts (one per rank): layer →
/// counts of experts `0..experts`. The input of `PlacementPlan::balanced`.
pub fn expert_load_from_metrics<'a>(
    texts: impl IntoIterator<Item = &'a str>,
    experts: usize,
) -> Result<BTreeMap<u32, Vec<u64>>, String> {
    const NAME: &str = "deepseek_worker_expert_routed_tokens_total{";
    let mut loads: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (n, line) in texts.into_iter().flat_map(str::lines).enumerate() {
        let Some(rest) = line.strip_prefix(NAME) else {
            continue;
        };
        let parsed = (|| {
            let (labels, value) = rest.split_once("} ")?;
            let label = |key: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix("=\"")?.strip_suffix('"'))
                    .and_then(|v| v.parse::<usize>().ok())
            };
            Some((
                label("layer")?,
                label("expert")?,
                value.trim().parse::<u64>().ok()?,
            ))
        })();
        let (layer, expert, tokens) =
            parsed.ok_or_else(|| format!("line {}: cannot read {line:?}", n + 1))?;
        if expert >= experts {
            return Err(format!(
                "line {}: expert {expert}, but the model has {experts} routed experts",
                n + 1
            ));
        }
        loads
            .entry(layer as u32)
            .or_insert_with(|| vec![0; experts])[expert] += tokens;
    }
    Ok(loads)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_load_is_read_back_from_several_ranks() {
        let rank0 = "# TYPE x counter\ndeepseek_worker_expert_routed_tokens_total{layer=\"1\",expert=\"2\"} 5\n";
        let rank1 = "deepseek_worker_expert_routed_tokens_total{layer=\"1\",expert=\"2\"} 3\n\
                     deepseek_worker_expert_routed_tokens_total{layer=\"2\",expert=\"0\"} 7\n# EOF\n";
        let loads = expert_load_from_metrics([rank0, rank1], 4).unwrap();
        assert_eq!(loads[&1], [0, 0, 8, 0]);
        assert_eq!(loads[&2], [7, 0, 0, 0]);
        let bad = "deepseek_worker_expert_routed_tokens_total{layer=\"1\",expert=\"9\"} 1";
        assert!(
            expert_load_from_metrics([bad], 4)
                .unwrap_err()
                .contains("expert 9")
        );
        let garbled = "deepseek_worker_expert_routed_tokens_total{layer=\"x\"} 1";
        assert!(
            expert_load_from_metrics([garbled], 4)
                .unwrap_err()
                .contains("line 1")
        );
    }
}
