//! Where the worker ranks come from while the router runs. In a cluster, from the EndpointSlices of the group Services (the
//! operator's `--discover-namespace` and `--discover-selector`): each ready or starting
//! endpoint's address on the `grpc` port is a backend, in the pool its Service's
//! `serving.deepseek-operator.io/pool` label names, with the GPU product its `gpu-product`
//! label names (EndpointSlices carry their Service's labels). Whether a rank takes requests is left to the health checks.
//! Elsewhere, from a backends file that a supervisor rewrites (`deepseek-operator run-local`).

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};

use crate::BackendsFile;
use crate::backend::{BackendSpec, parse_backends_file};
use crate::proxy::Router;

/// How often a backends file is read again.
pub const BACKENDS_FILE_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// The pool and GPU product labels the operator puts on group Services.
pub const LABEL_POOL: &str = "serving.deepseek-operator.io/pool";
pub const LABEL_GPU_PRODUCT: &str = "serving.deepseek-operator.io/gpu-product";
/// The Service port the workers serve `deepseek.v1.Inference` on.
pub const GRPC_PORT: &str = "grpc";

/// The backends the slices describe, sorted by address. Terminating endpoints and slices
/// without a pool label or a `grpc` port are left out.
pub fn backends_from_slices<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Vec<BackendSpec> {
    let mut backends: Vec<BackendSpec> = slices
        .into_iter()
        .flat_map(|slice| {
            let label = |key| slice.metadata.labels.as_ref().and_then(|l| l.get(key));
            let (pool, gpu) = (label(LABEL_POOL), label(LABEL_GPU_PRODUCT));
            let port = slice.ports.iter().flatten().find_map(|p| {
                (p.name.as_deref() == Some(GRPC_PORT))
                    .then_some(p.port)
                    .flatten()
            });
            let (Some(pool), Some(port)) = (pool, port) else {
                return Vec::new();
            };
            slice
                .endpoints
                .iter()
                .filter(|e| {
                    !e.conditions
                        .as_ref()
                        .and_then(|c| c.terminating)
                        .unwrap_or(false)
                })
                .flat_map(|e| &e.addresses)
                .map(|address| BackendSpec {
                    pool: pool.clone(),
                    gpu: gpu.cloned().unwrap_or_default(),
                    weight: 1,
                    addr: if address.contains(':') {
                        format!("[{address}]:{port}")
                    } else {
                        format!("{address}:{port}")
                    },
                })
                .collect()
        })
        .collect();
    backends.sort_by(|a, b| a.addr.cmp(&b.addr));
    backends.dedup_by(|a, b| a.addr == b.addr);
    backends
}

/// Keeps the router's backends equal to what the matching EndpointSlices say, until the
/// watch ends (it retries with backoff, so never in practice).
pub async fn watch(client: kube::Client, namespace: &str, selector: &str, router: Arc<Router>) {
    let api: Api<EndpointSlice> = Api::namespaced(client, namespace);
    let (reader, writer) = reflector::store();
    let events = reflector(
        writer,
        watcher(api, watcher::Config::default().labels(selector)),
    )
    .default_backoff()
    .touched_objects();
    futures::pin_mut!(events);
    let mut current = Vec::new();
    while let Some(event) = events.next().await {
        if let Err(err) = event {
            tracing::warn!(error = %err, "watching EndpointSlices");
            continue;
        }
        let slices = reader.state();
        let backends = backends_from_slices(slices.iter().map(|s| s.as_ref()));
        if backends != current {
            tracing::info!(backends = backends.len(), "worker endpoints changed");
            if let Err(err) = router.set_backends(backends.clone()) {
                tracing::warn!(error = %err, "an endpoint address was not usable");
            }
            current = backends;
        }
    }
}

/// Keeps the router's backends equal to the `--backend` flags plus the file's lines, read
/// every `BACKENDS_FILE_POLL`. A file that cannot be read or parsed is reported and the
/// current set kept; writers replace it whole (write, then rename), so no half is read.
pub async fn follow_file(file: BackendsFile, router: Arc<Router>) {
    let mut applied: Option<String> = None;
    loop {
        tokio::time::sleep(BACKENDS_FILE_POLL).await;
        // A few lines on a local disk: read in place.
        let text = match std::fs::read_to_string(&file.path) {
            Ok(text) => text,
            Err(err) => {
                tracing::warn!(path = %file.path.display(), error = %err, "reading the backends file");
                continue;
            }
        };
        if applied.as_ref() == Some(&text) {
            continue;
        }
        let backends = parse_backends_file(&text).and_then(|specs| {
            let mut backends = file.fixed.clone();
            backends.extend(specs);
            let count = backends.len();
            router.set_backends(backends).map(|()| count)
        });
        match backends {
            Ok(count) => tracing::info!(backends = count, "the backends file changed"),
            Err(err) => {
                tracing::warn!(path = %file.path.display(), error = %err, "the backends file is not usable; keeping the current backends")
            }
        }
        applied = Some(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(pool: Option<&str>, port_name: &str, endpoints: serde_json::Value) -> EndpointSlice {
        let mut labels = json!({"kubernetes.io/service-name": "tiny-h100-g0"});
        if let Some(pool) = pool {
            labels[LABEL_POOL] = pool.into();
            labels[LABEL_GPU_PRODUCT] = format!("gpu-of-{pool}").into();
        }
        serde_json::from_value(json!({
            "metadata": {"name": "s", "labels": labels},
            "addressType": "IPv4",
            "ports": [{"name": port_name, "port": 50051, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    #[test]
    fn endpoints_become_backends_in_their_services_pool() {
        let slices = [
            slice(
                Some("h100"),
                "grpc",
                json!([
                    {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                    {"addresses": ["10.0.0.1"], "conditions": {"ready": false}},
                    {"addresses": ["10.0.0.9"], "conditions": {"terminating": true}},
                ]),
            ),
            slice(Some("a100"), "grpc", json!([{"addresses": ["fd00::5"]}])),
            slice(None, "grpc", json!([{"addresses": ["10.0.0.7"]}])),
            slice(
                Some("h100"),
                "metrics",
                json!([{"addresses": ["10.0.0.8"]}]),
            ),
        ];
        let backends = backends_from_slices(&slices);
        assert_eq!(backends[0].gpu, "gpu-of-h100");
        let got: Vec<(&str, &str)> = backends
            .iter()
            .map(|b| (b.pool.as_str(), b.addr.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("h100", "10.0.0.1:50051"),
                ("h100", "10.0.0.2:50051"),
                ("a100", "[fd00::5]:50051"),
            ]
        );
    }
}
