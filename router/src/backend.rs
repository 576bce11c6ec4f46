//! Backends: what the flags say about each worker rank (`BackendSpec`, pure parsing), and
//! what the router knows about it at run time (`Backend`: a lazily connected channel,
//! requests in flight, health and the load it last reported).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use deepseek_proto::v1::GetLoadResponse;
use deepseek_proto::v1::inference_client::InferenceClient;
use tonic::transport::{Channel, Endpoint};

use crate::tls::WorkerConnector;

use crate::error::Error;
use crate::routed::{RoutedChunks, capacity_chunks};

/// One `--backend pool=NAME,weight=W,addr=HOST:PORT[,gpu=PRODUCT]` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendSpec {
    pub pool: String,
    /// Share of its pool's traffic under the `weighted` policy.
    pub weight: u32,
    pub addr: String,
    /// GPU product (`NVIDIA-H100-80GB-HBM3`), when known; labels its metrics.
    pub gpu: String,
}

impl std::str::FromStr for BackendSpec {
    type Err = Error;

    /// `addr` is required; `pool` defaults to "default", `weight` to 1, `gpu` to unknown.
    fn from_str(value: &str) -> Result<Self, Error> {
        parse_spec(value).map_err(Error::BackendSpec)
    }
}

/// A `--backend` value, or why it is not one.
fn parse_spec(value: &str) -> Result<BackendSpec, String> {
    let (mut pool, mut weight, mut addr, mut gpu) = (None, None, None, None);
    for field in value.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        let (key, v) = field
            .split_once('=')
            .ok_or_else(|| format!("{field:?}: expected KEY=VALUE (pool, weight, addr, gpu)"))?;
        match key {
            "pool" => pool = Some(v.to_string()),
            "weight" => {
                weight = Some(
                    v.parse()
                        .map_err(|_| format!("weight={v:?}: expected a non-negative integer"))?,
                )
            }
            "addr" => addr = Some(v.to_string()),
            "gpu" => gpu = Some(v.to_string()),
            other => return Err(format!("unknown key {other:?} (pool, weight, addr, gpu)")),
        }
    }
    let addr = addr.ok_or("addr=HOST:PORT is required")?;
    if addr.is_empty() || !addr.contains(':') {
        return Err(format!("addr={addr:?}: expected HOST:PORT"));
    }
    Ok(BackendSpec {
        pool: pool.unwrap_or_else(|| "default".into()),
        weight: weight.unwrap_or(1),
        addr,
        gpu: gpu.unwrap_or_default(),
    })
}

/// Backends from a file: one `--backend` value per line; blank lines and `#` comments skipped.
pub fn parse_backends_file(text: &str) -> Result<Vec<BackendSpec>, Error> {
    text.lines()
        .enumerate()
        .map(|(n, line)| (n, line.split('#').next().unwrap_or("").trim()))
        .filter(|(_, line)| !line.is_empty())
        .map(|(n, line)| {
            parse_spec(line).map_err(|e| Error::BackendSpec(format!("line {}: {e}", n + 1)))
        })
        .collect()
}

/// A worker rank as the router sees it.
pub struct Backend {
    pub spec: BackendSpec,
    client: InferenceClient<Channel>,
    pub channel: Channel,
    /// Streams this router has open on it.
    in_flight: AtomicUsize,
    /// Waiting + running sequences it last reported (all routers' requests).
    reported_busy: AtomicUsize,
    healthy: AtomicBool,
    /// Health checks in a row that got no answer in time.
    unanswered_checks: AtomicU32,
    /// KV blocks in use, in all, and their size in tokens, as last reported (0 until then).
    kv_blocks_used: AtomicUsize,
    kv_blocks_total: AtomicUsize,
    kv_block_tokens: AtomicUsize,
    /// The prompts' chunks sent here, for `cache-aware` routing.
    routed: Mutex<RoutedChunks>,
}

/// What one active health check found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Check {
    Serving,
    /// The worker answered that it does not serve (starting, draining): out at once.
    NotServing,
    /// No answer in time. A rank busy with a batch on a loaded machine can miss one; only
    /// `UNANSWERED_CHECKS_TO_EJECT` in a row take it out, as a readiness probe's
    /// `failureThreshold` does. A dead rank fails requests and is ejected by those at once.
    NoAnswer,
}

/// Unanswered health checks in a row that take a backend out (Kubernetes' default
/// readiness `failureThreshold`).
pub const UNANSWERED_CHECKS_TO_EJECT: u32 = 3;

/// A backend's health after `check`, given whether it was healthy and how many checks in a
/// row went unanswered before: `(healthy, unanswered)`.
pub fn health_after(check: Check, healthy: bool, unanswered: u32) -> (bool, u32) {
    match check {
        Check::Serving => (true, 0),
        Check::NotServing => (false, 0),
        Check::NoAnswer => {
            let unanswered = unanswered.saturating_add(1);
            (
                healthy && unanswered < UNANSWERED_CHECKS_TO_EJECT,
                unanswered,
            )
        }
    }
}

impl Backend {
    /// A backend reached in plaintext, or over mutual TLS through `tls`.
    pub fn new(spec: BackendSpec, tls: Option<&WorkerConnector>) -> Result<Self, Error> {
        let endpoint = Endpoint::from_shared(format!("http://{}", spec.addr))
            .map_err(|source| Error::BackendAddr {
                addr: spec.addr.clone(),
                source,
            })?
            .connect_timeout(std::time::Duration::from_secs(2))
            .tcp_nodelay(true);
        let channel = match tls {
            None => endpoint.connect_lazy(),
            Some(connector) => endpoint.connect_with_connector_lazy(connector.clone()),
        };
        Ok(Backend {
            client: InferenceClient::new(channel.clone()).max_decoding_message_size(64 << 20),
            channel,
            spec,
            in_flight: AtomicUsize::new(0),
            reported_busy: AtomicUsize::new(0),
            // Optimistic until the first health check says otherwise.
            healthy: AtomicBool::new(true),
            unanswered_checks: AtomicU32::new(0),
            kv_blocks_used: AtomicUsize::new(0),
            kv_blocks_total: AtomicUsize::new(0),
            kv_block_tokens: AtomicUsize::new(0),
            routed: Mutex::new(RoutedChunks::default()),
        })
    }

    pub fn client(&self) -> InferenceClient<Channel> {
        self.client.clone()
    }

    /// Counts a stream as open until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Outstanding work: what it reported or what this router has open, whichever is more
    /// (other routers' requests show only in the report, ours show at once locally).
    pub fn load(&self) -> usize {
        self.in_flight()
            .max(self.reported_busy.load(Ordering::Relaxed))
    }

    /// An active health check's outcome and the load reported with it. Only the health
    /// task writes these, so load-then-store does not race with itself (a request's
    /// recheck, `Router::recheck_ejected`, writes `Serving` alone, which reads nothing).
    pub fn observed(&self, check: Check, load: Option<&GetLoadResponse>) {
        let (healthy, unanswered) = health_after(
            check,
            self.healthy(),
            self.unanswered_checks.load(Ordering::Relaxed),
        );
        self.healthy.store(healthy, Ordering::Relaxed);
        self.unanswered_checks.store(unanswered, Ordering::Relaxed);
        if let Some(load) = load {
            let busy = load.waiting_sequences + load.running_sequences;
            self.reported_busy.store(busy as usize, Ordering::Relaxed);
            self.kv_blocks_used
                .store(load.kv_blocks_used as usize, Ordering::Relaxed);
            self.kv_blocks_total
                .store(load.kv_blocks_total as usize, Ordering::Relaxed);
            self.kv_block_tokens
                .store(load.kv_block_tokens as usize, Ordering::Relaxed);
        }
    }

    /// KV blocks in use and in all, as last reported.
    pub fn kv_blocks(&self) -> (usize, usize) {
        (
            self.kv_blocks_used.load(Ordering::Relaxed),
            self.kv_blocks_total.load(Ordering::Relaxed),
        )
    }

    /// How many of a prompt's leading chunks were sent here and may still be cached, and
    /// when the last of them was sent.
    pub fn cached_chunks(&self, names: &[u64]) -> (usize, u64) {
        self.routed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .leading(names)
    }

    /// Records a prompt's chunks as sent here at `tick`, keeping what its KV cache holds at
    /// `bytes_per_token` (all, until it reports its size).
    pub fn sent(&self, names: &[u64], tick: u64, bytes_per_token: f64) {
        let kv_tokens = self.kv_blocks_total.load(Ordering::Relaxed)
            * self.kv_block_tokens.load(Ordering::Relaxed);
        let capacity = match kv_tokens {
            0 => usize::MAX,
            tokens => capacity_chunks(tokens, bytes_per_token),
        };
        self.routed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .record(names, tick, capacity);
    }

    /// A request could not reach it: ejected until a health check finds it serving again.
    pub fn failed(&self) {
        self.healthy.store(false, Ordering::Relaxed);
    }
}

/// An open stream on a backend.
pub struct InFlight(Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_flags_parse_with_defaults_and_name_what_is_wrong() {
        assert_eq!(
            parse_spec("pool=h100,weight=3,addr=10.0.0.1:50051,gpu=NVIDIA-H100-80GB-HBM3"),
            Ok(BackendSpec {
                pool: "h100".into(),
                weight: 3,
                addr: "10.0.0.1:50051".into(),
                gpu: "NVIDIA-H100-80GB-HBM3".into(),
            })
        );
        let spec: BackendSpec = "addr=w-0.w:50051".parse().unwrap();
        assert_eq!((spec.pool.as_str(), spec.weight), ("default", 1));
        for (bad, says) in [
            ("pool=a", "addr=HOST:PORT is required"),
            ("addr=nohost", "expected HOST:PORT"),
            ("addr=a:1,weight=-2", "weight=\"-2\""),
            ("addr=a:1,zone=x", "unknown key \"zone\""),
            ("addr=a:1,pool", "expected KEY=VALUE"),
        ] {
            let err = bad.parse::<BackendSpec>().unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn only_silence_in_a_row_or_an_answer_takes_a_backend_out() {
        let mut state = (true, 0);
        for _ in 1..UNANSWERED_CHECKS_TO_EJECT {
            state = health_after(Check::NoAnswer, state.0, state.1);
            assert!(state.0, "a missed check or two leave it in: {state:?}");
        }
        state = health_after(Check::NoAnswer, state.0, state.1);
        assert_eq!(state, (false, UNANSWERED_CHECKS_TO_EJECT));
        assert_eq!(health_after(Check::Serving, state.0, state.1), (true, 0));
        assert_eq!(health_after(Check::NotServing, true, 0), (false, 0));
        // Ejected by a failed request, it stays out until it answers SERVING.
        assert_eq!(health_after(Check::NoAnswer, false, 0), (false, 1));
        // An answer in between starts the count again.
        let after_answer = health_after(Check::Serving, true, 2);
        assert!(health_after(Check::NoAnswer, after_answer.0, after_answer.1).0);
    }

    #[test]
    fn a_backends_file_skips_comments_and_numbers_its_errors() {
        let text = "# h100 group\npool=h100,addr=a:1\n\n  pool=a100,weight=0,addr=b:2 # spill\n";
        let specs = parse_backends_file(text).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[1].weight, 0);
        assert_eq!(
            parse_backends_file("addr=a:1\npool=x\n")
                .unwrap_err()
                .to_string(),
            "line 2: addr=HOST:PORT is required"
        );
    }
}
