//! Prometheus metrics of the router, served as text on `--metrics-listen`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::backend::Backend;

pub struct Metrics {
    registry: Registry,
    /// `Generate` calls by outcome: `ok` (a stream was opened) or the gRPC code.
    requests: Family<Vec<(String, String)>, Counter>,
    pub retries: Counter,
    first_message: Histogram,
    /// `Generate` requests by API key name.
    key_requests: Family<Vec<(String, String)>, Counter>,
    /// Tokens streamed back by API key name.
    key_tokens: Family<Vec<(String, String)>, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let requests = Family::<Vec<(String, String)>, Counter>::default();
        let retries = Counter::default();
        let first_message = Histogram::new(exponential_buckets(0.0005, 2.0, 18));
        let [key_requests, key_tokens] =
            std::array::from_fn(|_| Family::<Vec<(String, String)>, Counter>::default());
        let mut registry = Registry::with_prefix("deepseek_router");
        registry.register(
            "key_requests",
            "Generate requests by API key name",
            key_requests.clone(),
        );
        registry.register(
            "key_tokens",
            "Tokens streamed back by API key name",
            key_tokens.clone(),
        );
        registry.register(
            "requests",
            "Generate requests by outcome (ok, or the gRPC code)",
            requests.clone(),
        );
        registry.register(
            "retries",
            "Requests sent to another backend after a failure before the first token",
            retries.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Arrival at the router to the first streamed message",
            first_message.clone(),
        );
        Metrics {
            registry,
            requests,
            retries,
            first_message,
            key_requests,
            key_tokens,
        }
    }
}

impl Metrics {
    /// Counts a request of the API key `name`; returns its token counter.
    pub fn count_key(&self, name: &str) -> Counter {
        let label = vec![("key".to_string(), name.to_string())];
        self.key_requests.get_or_create(&label).inc();
        self.key_tokens.get_or_create(&label).clone()
    }

    pub fn opened(&self, failure: Option<tonic::Code>) {
        let outcome = failure.map_or_else(|| "ok".to_string(), |code| format!("{code:?}"));
        self.requests
            .get_or_create(&vec![("outcome".into(), outcome)])
            .inc();
    }

    pub fn first_message(&self, after: Duration) {
        self.first_message.observe(after.as_secs_f64());
    }

    /// The registry, then per-backend gauges read live from the backends.
    pub fn render(&self, backends: &[Arc<Backend>]) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        let body_end = out.rfind("# EOF").unwrap_or(out.len());
        let eof = out.split_off(body_end);
        for (name, help, value) in [
            (
                "backend_in_flight",
                "Streams open on each backend",
                (|b: &Backend| b.in_flight()) as fn(&Backend) -> usize,
            ),
            ("backend_healthy", "1 while a backend takes requests", |b| {
                usize::from(b.healthy())
            }),
        ] {
            let _ = writeln!(out, "# HELP deepseek_router_{name} {help}.");
            let _ = writeln!(out, "# TYPE deepseek_router_{name} gauge");
            for b in backends {
                let _ = writeln!(
                    out,
                    "deepseek_router_{name}{{backend=\"{}\",pool=\"{}\",gpu=\"{}\"}} {}",
                    b.spec.addr,
                    b.spec.pool,
                    b.spec.gpu,
                    value(b)
                );
            }
        }
        out + &eof
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_tokens_are_counted_by_api_key_name() {
        let metrics = Metrics::default();
        metrics.count_key("team-a").inc_by(5);
        metrics.count_key("team-a").inc_by(2);
        metrics.count_key("team-b");
        let text = metrics.render(&[]);
        for line in [
            "deepseek_router_key_requests_total{key=\"team-a\"} 2",
            "deepseek_router_key_tokens_total{key=\"team-a\"} 7",
            "deepseek_router_key_requests_total{key=\"team-b\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
