//! `deepseek-router`: one gRPC and OpenAI-compatible HTTP endpoint over the worker ranks of
//! a DeepSeekDeployment's pools.

pub mod auth;
pub mod backend;
pub mod discovery;
pub mod error;
pub mod grpc;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod openai;
pub mod policy;
pub mod proxy;
pub mod routed;
pub mod tls;

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deepseek_proto::serving::starting_health;
use deepseek_proto::v1::inference_server::InferenceServer;

pub use crate::error::Error;

use crate::auth::ApiKeys;
use crate::backend::BackendSpec;
use crate::proxy::{Router, RouterConfig};
use crate::tls::TlsListener;
use deepseek_proto::tls::{self as shared_tls, Identity};

/// Where the EndpointSlices of the workers are watched.
pub struct Discovery {
    pub client: kube::Client,
    pub namespace: String,
    pub selector: String,
}

/// A backends file, re-read while the router runs.
pub struct BackendsFile {
    pub path: std::path::PathBuf,
    /// The `--backend` flags, kept beside the file's lines.
    pub fixed: Vec<BackendSpec>,
}

/// Everything the router needs to run, flags resolved.
pub struct RunConfig {
    /// The backends at start; with `discovery` the watch replaces them, with
    /// `backends_file` the file's changes do.
    pub backends: Vec<BackendSpec>,
    pub discovery: Option<Discovery>,
    pub backends_file: Option<BackendsFile>,
    pub routing: RouterConfig,
    pub keys: ApiKeys,
    pub served_name: Option<String>,
    pub health_interval: Duration,
    /// Serve gRPC and HTTP over TLS with this certificate (plaintext without).
    pub tls: Option<Arc<Identity>>,
}

/// Serves gRPC, HTTP and (when given) metrics on the listeners until `shutdown` completes.
pub async fn serve(
    config: RunConfig,
    grpc: tokio::net::TcpListener,
    http: tokio::net::TcpListener,
    metrics: Option<tokio::net::TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    // Renewed certificates are read in, for the client ports and for the workers.
    let worker_identity = config
        .routing
        .worker_tls
        .as_ref()
        .map(|c| c.identity.clone());
    for identity in config.tls.iter().cloned().chain(worker_identity) {
        tokio::spawn(identity.follow());
    }
    let router = Arc::new(Router::new(config.backends, config.routing)?);
    let keys = Arc::new(config.keys);
    let served_name = Arc::new(OnceLock::new());
    if let Some(name) = config.served_name {
        let _ = served_name.set(name);
    }
    if let Some(d) = config.discovery {
        let router = router.clone();
        tokio::spawn(async move {
            discovery::watch(d.client, &d.namespace, &d.selector, router).await;
        });
    }
    if let Some(file) = config.backends_file {
        tokio::spawn(discovery::follow_file(file, router.clone()));
    }
    let (reporter, health_service) = starting_health().await;
    tokio::spawn(health::watch(
        router.clone(),
        reporter,
        served_name.clone(),
        config.health_interval,
    ));
    if let Some(listener) = metrics {
        let app = metrics_app(router.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
    }

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let http_app = openai::app(Arc::new(openai::Http {
        router: router.clone(),
        keys: keys.clone(),
        served_name,
    }));
    let http_server = match &config.tls {
        None => serve_http(http, http_app, stopped(stop.clone())),
        Some(cert) => {
            let listener = TlsListener {
                local: http.local_addr()?,
                connections: shared_tls::accept(http, cert.server_config(&[b"http/1.1"])),
            };
            serve_http(listener, http_app, stopped(stop.clone()))
        }
    };
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(deepseek_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let grpc_routes = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(InferenceServer::new(grpc::Front { router, keys }));
    type GrpcServing = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;
    let grpc_server: GrpcServing = match &config.tls {
        None => Box::pin(grpc_routes.serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc),
            stopped(stop),
        )),
        Some(cert) => Box::pin(grpc_routes.serve_with_incoming_shutdown(
            shared_tls::incoming(grpc, cert.server_config(&[b"h2"])),
            stopped(stop),
        )),
    };
    let (http_result, grpc_result) = tokio::join!(http_server, grpc_server);
    http_result?;
    grpc_result?;
    Ok(())
}

/// The HTTP front on `listener` (plain TCP or TLS) until `shutdown`.
fn serve_http<L>(
    listener: L,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    Box::pin(
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .into_future(),
    )
}

/// Prometheus metrics, and the probes' endpoints: `/health` answers while the process
/// runs, `/ready` while the router can take requests (the gRPC health service's overall
/// status), so probes work with TLS on the client ports.
fn metrics_app(router: Arc<Router>) -> axum::Router {
    use axum::http::StatusCode;
    let ready = router.clone();
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let body = router.metrics_text();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
        .route("/health", axum::routing::get(|| async { "ok" }))
        .route(
            "/ready",
            axum::routing::get(move || {
                let status = if ready.ready() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                async move { status }
            }),
        )
}
