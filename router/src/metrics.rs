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

    /// The registry, then gauges read live: requests `waiting` for a backend, and per
    /// backend and per pool.
    pub fn render(&self, backends: &[Arc<Backend>], waiting: usize) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        let body_end = out.rfind("# EOF").unwrap_or(out.len());
        let eof = out.split_off(body_end);
        write_gauge(
            &mut out,
            "waiting_requests",
            "Requests held until some backend is healthy, as when the deployment wakes from zero groups (per router replica: take the sum)",
            &[waiting],
            |&waiting| (String::new(), waiting),
        );
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
            write_gauge(&mut out, name, help, backends, |b| {
                let labels = format!(
                    "backend=\"{}\",pool=\"{}\",gpu=\"{}\"",
                    b.spec.addr, b.spec.pool, b.spec.gpu
                );
                (labels, value(b))
            });
        }
        let pools = pool_loads(backends.iter().map(|b| {
            let (kv_used, kv_total) = b.kv_blocks();
            RankLoad {
                pool: &b.spec.pool,
                healthy: b.healthy(),
                requests: b.load(),
                kv_used,
                kv_total,
            }
        }));
        for (name, help, value) in [
            (
                "pool_requests",
                "Requests running or waiting on a pool's healthy ranks (the same in every router replica: take the max, not the sum)",
                (|p: &PoolLoad| p.requests as f64) as fn(&PoolLoad) -> f64,
            ),
            (
                "pool_healthy_ranks",
                "Ranks of a pool taking requests",
                |p| p.healthy as f64,
            ),
            (
                "pool_kv_cache_usage",
                "Share of the KV cache blocks in use on a pool's healthy ranks (0 to 1)",
                |p| p.kv_used as f64 / p.kv_total.max(1) as f64,
            ),
        ] {
            write_gauge(&mut out, name, help, &pools, |p| {
                (format!("pool=\"{}\"", p.pool), value(p))
            });
        }
        out + &eof
    }
}

/// A gauge family in the text format: its HELP and TYPE lines, then each item's labels and
/// value.
fn write_gauge<T, V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    help: &str,
    items: &[T],
    sample: impl Fn(&T) -> (String, V),
) {
    let _ = writeln!(out, "# HELP deepseek_router_{name} {help}.");
    let _ = writeln!(out, "# TYPE deepseek_router_{name} gauge");
    for item in items {
        let (labels, value) = sample(item);
        let labels = if labels.is_empty() {
            labels
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "deepseek_router_{name}{labels} {value}");
    }
}

/// What one rank contributes to its pool's gauges.
pub struct RankLoad<'a> {
    pub pool: &'a str,
    pub healthy: bool,
    pub requests: usize,
    pub kv_used: usize,
    pub kv_total: usize,
}

/// A pool's load, over its healthy ranks: what an external autoscaler (an HPA on custom
/// metrics, KEDA) scales the deployment's groups by.
#[derive(Debug, Default, PartialEq)]
pub struct PoolLoad {
    pub pool: String,
    pub healthy: usize,
    pub requests: usize,
    pub kv_used: usize,
    pub kv_total: usize,
}

/// Each pool's load, pools in the order they first appear.
pub fn pool_loads<'a>(ranks: impl Iterator<Item = RankLoad<'a>>) -> Vec<PoolLoad> {
    let mut pools: Vec<PoolLoad> = Vec::new();
    for rank in ranks {
        let at = match pools.iter().position(|p| p.pool == rank.pool) {
            Some(at) => at,
            None => {
                pools.push(PoolLoad {
                    pool: rank.pool.to_string(),
                    ..Default::default()
                });
                pools.len() - 1
            }
        };
        if rank.healthy {
            let pool = &mut pools[at];
            pool.healthy += 1;
            pool.requests += rank.requests;
            pool.kv_used += rank.kv_used;
            pool.kv_total += rank.kv_total;
        }
    }
    pools
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_page_has_a_gauge_per_pool() {
        let backend = |spec: &str| Arc::new(Backend::new(spec.parse().unwrap(), None).unwrap());
        let backends = [
            backend("pool=h100,addr=10.0.0.1:50051"),
            backend("pool=h100,addr=10.0.0.2:50051"),
        ];
        backends[1].failed();
        let text = Metrics::default().render(&backends, 2);
        for line in [
            "deepseek_router_waiting_requests 2",
            "deepseek_router_pool_requests{pool=\"h100\"} 0",
            "deepseek_router_pool_healthy_ranks{pool=\"h100\"} 1",
            "deepseek_router_pool_kv_cache_usage{pool=\"h100\"} 0",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn pools_sum_their_healthy_ranks() {
        let rank = |pool, healthy, requests, kv_used| RankLoad {
            pool,
            healthy,
            requests,
            kv_used,
            kv_total: 100,
        };
        let pools = pool_loads(
            [
                rank("h100", true, 5, 40),
                rank("a100", true, 1, 10),
                rank("h100", true, 3, 20),
                rank("h100", false, 9, 90),
                rank("cpu", false, 2, 0),
            ]
            .into_iter(),
        );
        let load = |pool: &str, healthy, requests, kv_used, kv_total| PoolLoad {
            pool: pool.into(),
            healthy,
            requests,
            kv_used,
            kv_total,
        };
        assert_eq!(
            pools,
            [
                load("h100", 2, 8, 60, 200),
                load("a100", 1, 1, 10, 100),
                // a pool with no healthy rank still shows, at zero
                load("cpu", 0, 0, 0, 0),
            ]
        );
    }

    #[test]
    fn requests_and_tokens_are_counted_by_api_key_name() {
        let metrics = Metrics::default();
        metrics.count_key("team-a").inc_by(5);
        metrics.count_key("team-a").inc_by(2);
        metrics.count_key("team-b");
        let text = metrics.render(&[], 0);
        for line in [
            "deepseek_router_key_requests_total{key=\"team-a\"} 2",
            "deepseek_router_key_tokens_total{key=\"team-a\"} 7",
            "deepseek_router_key_requests_total{key=\"team-b\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
