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

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deepseek_proto::serving::starting_health;
use deepseek_proto::v1::inference_server::InferenceServer;

pub use crate::error::Error;

use crate::auth::ApiKeys;
use crate::backend::BackendSpec;
use crate::proxy::{Router, RouterConfig};

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
}

/// Serves gRPC, HTTP and (when given) metrics on the listeners until `shutdown` completes.
pub async fn serve(
    config: RunConfig,
    grpc: tokio::net::TcpListener,
    http: tokio::net::TcpListener,
    metrics: Option<tokio::net::TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
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
        let router = router.clone();
        let app = axum::Router::new().route(
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
        );
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
    let http_server = axum::serve(http, http_app).with_graceful_shutdown(stopped(stop.clone()));
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(deepseek_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let grpc_server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(InferenceServer::new(grpc::Front { router, keys }))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc),
            stopped(stop),
        );
    let (http_result, grpc_result) = tokio::join!(http_server, grpc_server);
    http_result?;
    grpc_result?;
    Ok(())
}
