//! Active health checks: every interval each backend is asked for gRPC health and, when
//! serving, its load (`GetLoad`) and, until known, the model name it serves. A backend that
//! fails a request, or answers that it is not serving, is ejected at once (`Backend::failed`,
//! `Check::NotServing`); one that misses `UNANSWERED_CHECKS_TO_EJECT` checks in a row is
//! too. It is readmitted here when it answers SERVING again. The router's
//! `deepseek.v1.Inference` is SERVING while any backend is; the server as a whole (its
//! readiness) too, and always when it holds requests until a backend is up.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deepseek_proto::v1::inference_server::InferenceServer;
use deepseek_proto::v1::{GetLoadRequest, ModelInfoRequest};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

use crate::backend::{Backend, Check};
use crate::grpc::Front;
use crate::proxy::Router;

/// How long one check may take before the backend counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn watch(
    router: Arc<Router>,
    reporter: HealthReporter,
    served_name: Arc<OnceLock<String>>,
    interval: Duration,
) {
    let mut serving = None;
    loop {
        let backends = router.backends();
        futures::future::join_all(backends.iter().map(|b| check(b, &served_name))).await;
        let any = backends.iter().any(|b| b.healthy());
        if serving != Some(any) {
            serving = Some(any);
            let status = |up: bool| {
                if up {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                }
            };
            // A router that holds requests until a backend is up takes them meanwhile.
            reporter
                .set_service_status("", status(router.ready()))
                .await;
            reporter
                .set_service_status(
                    <InferenceServer<Front> as tonic::server::NamedService>::NAME,
                    status(any),
                )
                .await;
            tracing::info!(serving = any, "backends checked");
        }
        tokio::time::sleep(interval).await;
    }
}

/// Asks a backend for its gRPC health. A refused connection or an error status is an
/// answer (`NotServing`); only silence for `CHECK_TIMEOUT` is `NoAnswer`.
pub(crate) async fn probe(backend: &Backend) -> Check {
    let mut health = HealthClient::new(backend.channel.clone());
    let request = HealthCheckRequest {
        service: String::new(),
    };
    match tokio::time::timeout(CHECK_TIMEOUT, health.check(request)).await {
        Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32 => Check::Serving,
        Ok(_) => Check::NotServing,
        Err(_) => Check::NoAnswer,
    }
}

async fn check(backend: &Backend, served_name: &OnceLock<String>) {
    let outcome = probe(backend).await;
    let serving = outcome == Check::Serving;
    let load = if serving {
        let mut client = backend.client();
        match tokio::time::timeout(CHECK_TIMEOUT, client.get_load(GetLoadRequest {})).await {
            Ok(Ok(load)) => Some(load.into_inner()),
            _ => None,
        }
    } else {
        None
    };
    if serving && served_name.get().is_none() {
        let mut client = backend.client();
        if let Ok(Ok(info)) =
            tokio::time::timeout(CHECK_TIMEOUT, client.model_info(ModelInfoRequest {})).await
        {
            let _ = served_name.set(info.into_inner().served_name);
        }
    }
    let was_healthy = backend.healthy();
    backend.observed(outcome, load.as_ref());
    if backend.healthy() != was_healthy {
        tracing::info!(backend = %backend.spec.addr, ?outcome, healthy = !was_healthy, "backend health changed");
    }
}
