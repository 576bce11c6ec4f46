//! `deepseek-router`: one gRPC and OpenAI-compatible HTTP endpoint over the worker ranks of
//! a DeepSeekDeployment's pools. See the crate docs and ARCHITECTURE.md.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use deepseek_proto::serving::shutdown_signal;
use deepseek_proto::telemetry;
use deepseek_proto::tls::{Identity, TlsFiles};
use deepseek_router::auth::{ApiKeys, key_line};
use deepseek_router::backend::{BackendSpec, parse_backends_file};
use deepseek_router::policy::Policy;
use deepseek_router::proxy::RouterConfig;
use deepseek_router::tls::WorkerConnector;
use deepseek_router::{BackendsFile, RunConfig, serve};

#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// gRPC listen address (`deepseek.v1.Inference`, health, reflection).
    #[arg(long, default_value = "0.0.0.0:50051")]
    grpc_listen: String,
    /// HTTP listen address (OpenAI-compatible API).
    #[arg(long, default_value = "0.0.0.0:8000")]
    http_listen: String,
    /// Metrics listen address (`/metrics`); empty turns it off.
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics_listen: String,
    /// Export spans over OTLP/gRPC to this collector (`http://HOST:4317`); off when unset.
    /// A request's span continues the trace of its `traceparent` header, and the worker's
    /// continues the router's.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Model name clients use (default: what the workers report).
    #[arg(long)]
    served_name: Option<String>,
    #[arg(long, value_enum, default_value = "least-load")]
    policy: Policy,
    /// Namespace of the worker EndpointSlices (discovery in a cluster).
    #[arg(long)]
    discover_namespace: Option<String>,
    /// Label selector of the worker pods (discovery in a cluster).
    #[arg(long)]
    discover_selector: Option<String>,
    /// `NAME=WEIGHT` for each pool, in preference order (weight 0: spill-over only).
    #[arg(long = "pool", value_parser = parse_pool)]
    pools: Vec<(String, u32)>,
    /// A worker rank: `pool=NAME,weight=W,addr=HOST:PORT` (repeatable).
    #[arg(long = "backend")]
    backends: Vec<BackendSpec>,
    /// A file of `--backend` values, one per line, read again every second while the
    /// router runs (replace it whole: write another file, then rename it over this one).
    #[arg(long)]
    backends_file: Option<PathBuf>,
    /// A file of API keys, `NAME sha256:HEX` per line (see `hash-key`); when set, requests
    /// need `Authorization: Bearer KEY`.
    #[arg(long)]
    api_keys_file: Option<PathBuf>,
    /// Requests the router holds at once; beyond, RESOURCE_EXHAUSTED / HTTP 429.
    #[arg(long, default_value_t = 4096)]
    max_in_flight: usize,
    /// Streams one backend may have open before its pool counts as saturated there.
    #[arg(long, default_value_t = 256)]
    max_in_flight_per_backend: usize,
    /// Backends tried for a request that fails before its first token.
    #[arg(long, default_value_t = 3)]
    max_attempts: usize,
    /// Seconds a request waits for a healthy backend when there is none (a deployment
    /// waking from zero groups); 0: UNAVAILABLE (HTTP 503) at once. While it holds
    /// requests, the router reports itself SERVING.
    #[arg(long, default_value_t = 0)]
    hold_for_backend_seconds: u64,
    /// Milliseconds between active health checks of every backend.
    #[arg(long, default_value_t = 1000)]
    health_interval_ms: u64,
    /// PEM certificate chain (leaf first) to serve gRPC and HTTP over TLS; read again when
    /// it changes (a renewed Secret), so a rotation needs no restart. With `--tls-key`.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Reach the workers over mutual TLS: the CA (PEM) their certificates must chain to.
    /// With `--worker-tls-cert` and `--worker-tls-key`, the router's own certificate, which
    /// that CA signed. Read again when they change.
    #[arg(long, requires_all = ["worker_tls_cert", "worker_tls_key"])]
    worker_tls_ca: Option<PathBuf>,
    /// PEM certificate the router presents to the workers.
    #[arg(long, requires = "worker_tls_ca")]
    worker_tls_cert: Option<PathBuf>,
    /// PEM private key of `--worker-tls-cert`.
    #[arg(long, requires = "worker_tls_ca")]
    worker_tls_key: Option<PathBuf>,
}

fn parse_pool(value: &str) -> Result<(String, u32), String> {
    let (name, weight) = value.split_once('=').ok_or("expected NAME=WEIGHT")?;
    let weight = weight
        .parse()
        .map_err(|_| format!("weight {weight:?} is not a non-negative integer"))?;
    Ok((name.to_string(), weight))
}

impl Cli {
    /// The run configuration, and where to discover workers (the client is made later, in
    /// the runtime).
    fn run_config(self) -> anyhow::Result<(RunConfig, Option<(String, String)>)> {
        let fixed = self.backends;
        let mut backends = fixed.clone();
        if let Some(path) = &self.backends_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--backends-file {}", path.display()))?;
            backends.extend(
                parse_backends_file(&text)
                    .with_context(|| format!("--backends-file {}", path.display()))?,
            );
        }
        let discovery = match (self.discover_namespace, self.discover_selector) {
            (Some(namespace), Some(selector)) => Some((namespace, selector)),
            (None, None) => None,
            _ => bail!("--discover-namespace and --discover-selector go together"),
        };
        if backends.is_empty() && discovery.is_none() && self.backends_file.is_none() {
            bail!(
                "no backends: give --backend pool=NAME,weight=W,addr=HOST:PORT, --backends-file, \
                 or --discover-namespace and --discover-selector"
            );
        }
        let keys = match &self.api_keys_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("--api-keys-file {}", path.display()))?;
                let keys = ApiKeys::parse(&text)
                    .with_context(|| format!("--api-keys-file {}", path.display()))?;
                if keys.is_empty() {
                    bail!("--api-keys-file {}: no keys in the file", path.display());
                }
                keys
            }
            None => ApiKeys::default(),
        };
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(
                Identity::load(TlsFiles {
                    cert,
                    key,
                    ca: None,
                    flags: ["--tls-cert", "--tls-key", ""],
                })
                .map_err(anyhow::Error::msg)?,
            )),
            _ => None,
        };
        let worker_tls = match (self.worker_tls_cert, self.worker_tls_key) {
            (Some(cert), Some(key)) => {
                let identity = Arc::new(
                    Identity::load(TlsFiles {
                        cert,
                        key,
                        ca: self.worker_tls_ca,
                        flags: ["--worker-tls-cert", "--worker-tls-key", "--worker-tls-ca"],
                    })
                    .map_err(anyhow::Error::msg)?,
                );
                Some(WorkerConnector::new(identity).context("--worker-tls-ca is required")?)
            }
            _ => None,
        };
        Ok((
            RunConfig {
                backends,
                discovery: None,
                backends_file: self.backends_file.map(|path| BackendsFile { path, fixed }),
                routing: RouterConfig {
                    policy: self.policy,
                    pools: self.pools,
                    max_in_flight_per_backend: self.max_in_flight_per_backend.max(1),
                    max_in_flight: self.max_in_flight.max(1),
                    max_attempts: self.max_attempts.max(1),
                    hold_for_backend: Duration::from_secs(self.hold_for_backend_seconds),
                    worker_tls,
                },
                keys,
                served_name: self.served_name,
                health_interval: Duration::from_millis(self.health_interval_ms.max(10)),
                tls,
            },
            discovery,
        ))
    }
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Read an API key from standard input and print its line for `--api-keys-file`: the
    /// name and the key's SHA-256, so the file (a Secret) never holds the key itself.
    HashKey {
        /// The key's name: in metrics, and the line to delete to revoke it.
        name: String,
    },
}

async fn bind(flag: &str, addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("{flag} {addr}"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    // Dropped before the runtime: the last spans flush over its connections.
    let _telemetry = {
        let _inside = runtime.enter();
        telemetry::init("deepseek-router", cli.otlp_endpoint.as_deref())
            .map_err(anyhow::Error::msg)?
    };
    if let Some(Command::HashKey { name }) = &cli.command {
        let key = std::io::read_to_string(std::io::stdin())?;
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            bail!("hash-key: give one key, without spaces, on standard input");
        }
        println!("{}", key_line(name, key));
        return Ok(());
    }
    let (grpc, http, metrics) = (
        cli.grpc_listen.clone(),
        cli.http_listen.clone(),
        cli.metrics_listen.clone(),
    );
    let (mut config, discover) = cli.run_config()?;
    runtime.block_on(async move {
        if let Some((namespace, selector)) = discover {
            let client = kube::Client::try_default()
                .await
                .context("EndpointSlice discovery needs a Kubernetes client configuration")?;
            config.discovery = Some(deepseek_router::Discovery {
                client,
                namespace,
                selector,
            });
        }
        let grpc = bind("--grpc-listen", &grpc).await?;
        let http = bind("--http-listen", &http).await?;
        let metrics = match metrics.as_str() {
            "" => None,
            addr => Some(bind("--metrics-listen", addr).await?),
        };
        tracing::info!(
            grpc = %grpc.local_addr()?,
            http = %http.local_addr()?,
            backends = config.backends.len(),
            "routing"
        );
        let shutdown = async {
            shutdown_signal().await;
            tracing::info!("shutting down");
        };
        Ok(serve(config, grpc, http, metrics, shutdown).await?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_parse_as_name_and_weight() {
        assert_eq!(parse_pool("h100=3"), Ok(("h100".into(), 3)));
        assert!(parse_pool("h100").is_err());
        assert!(parse_pool("h100=-1").unwrap_err().contains("\"-1\""));
    }

    #[test]
    fn the_operators_arguments_are_accepted() {
        let args = [
            "deepseek-router",
            "--grpc-listen",
            "0.0.0.0:50051",
            "--policy",
            "prefix-affinity",
            "--discover-namespace",
            "inference",
            "--discover-selector",
            "app=w",
            "--pool",
            "h100=3",
            "--pool",
            "a100=1",
        ];
        let cli = Cli::try_parse_from(args).unwrap();
        assert_eq!(cli.policy, Policy::PrefixAffinity);
        assert_eq!(
            cli.pools,
            [("h100".to_string(), 3), ("a100".to_string(), 1)]
        );
        let (config, discover) = cli.run_config().unwrap();
        assert!(config.backends.is_empty());
        assert_eq!(discover, Some(("inference".into(), "app=w".into())));
    }

    #[test]
    fn backends_come_from_flags() {
        let cli = Cli::try_parse_from([
            "deepseek-router",
            "--backend",
            "pool=h100,weight=2,addr=127.0.0.1:50051",
            "--backend",
            "addr=127.0.0.1:50052",
        ])
        .unwrap();
        let config = cli.run_config().unwrap().0;
        assert_eq!(config.backends.len(), 2);
        assert_eq!(config.backends[1].pool, "default");
        let bad = Cli::try_parse_from(["deepseek-router", "--backend", "pool=x"]);
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("addr=HOST:PORT is required")
        );
    }
}
