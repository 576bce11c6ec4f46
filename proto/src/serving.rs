//! What the router and the worker do alike as gRPC servers: start their health service and
//! wait for the signal to shut down.

use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::{HealthReporter, health_reporter};

use crate::pod::LIVENESS_SERVICE;

/// The health service of a server that is starting: `liveness` SERVING for as long as the
/// process runs (what startup and liveness probes ask for), the server as a whole
/// NOT_SERVING until the caller reports it ready.
pub async fn starting_health() -> (HealthReporter, HealthServer<impl Health>) {
    let (reporter, service) = health_reporter();
    reporter
        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    (reporter, service)
}

/// Resolves on SIGTERM (what the kubelet sends) or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
