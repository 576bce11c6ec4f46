//! Object names, labels, ports and images shared by the builders and the controller.

use std::collections::BTreeMap;

use deepseek_proto::pod;

pub const FIELD_MANAGER: &str = "deepseek-operator";
pub const MANAGED_BY: &str = "deepseek-operator";
pub const PART_OF: &str = "deepseek-operator";

pub const LABEL_DEPLOYMENT: &str = "serving.deepseek-operator.io/deployment";
pub const LABEL_POOL: &str = "serving.deepseek-operator.io/pool";
pub const LABEL_GROUP: &str = "serving.deepseek-operator.io/group";
/// Pod template hash of a pool; pods carrying another value run an old revision.
pub const LABEL_REVISION: &str = "serving.deepseek-operator.io/revision";
pub const LABEL_GPU_PRODUCT: &str = "serving.deepseek-operator.io/gpu-product";
/// Set by the StatefulSet controller on every pod (Kubernetes ≥ 1.28).
pub const LABEL_POD_INDEX: &str = "apps.kubernetes.io/pod-index";
pub const NODE_LABEL_GPU_PRODUCT: &str = "nvidia.com/gpu.product";
/// The label the API server puts on every namespace, its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

pub const COMPONENT_WORKER: &str = "worker";
pub const COMPONENT_ROUTER: &str = "router";
pub const COMPONENT_MODEL_CACHE: &str = "model-cache";
pub const COMPONENT_WORKER_TLS: &str = "worker-tls";

// The pod contract's ports (`deepseek_proto::pod`) as Kubernetes' i32.
/// Worker gRPC (`deepseek.v1.Inference` + health); also the readiness probe target.
pub const WORKER_GRPC_PORT: i32 = pod::GRPC_PORT as i32;
/// First expert-parallel transport port; local rank `i` of a pod listens on `+ i`.
pub const WORKER_EP_PORT: i32 = pod::EP_PORT as i32;
pub const METRICS_PORT: i32 = pod::METRICS_PORT as i32;
pub const WORKER_HEALTH_PORT: i32 = pod::HEALTH_PORT as i32;

pub use pod::{LIVENESS_SERVICE, MODEL_MOUNT, PLACEMENT_MOUNT};
/// The worker's kernel cache: on the pod's `/tmp` emptyDir, the one writable path.
pub const KERNEL_CACHE_DIR: &str = "/tmp/deepseek-worker/kernels";
/// The entry of the expert-load ConfigMap that holds the workers' `/metrics` text.
pub const EXPERT_LOAD_ENTRY: &str = "metrics";
/// Where the router finds its API keys, and the Secret entry that holds them.
pub const ROUTER_KEYS_DIR: &str = "/etc/deepseek-router";
pub const ROUTER_KEYS_ENTRY: &str = "api-keys";
/// Where the router's TLS Secret is mounted (beside the keys: a mount inside a read-only
/// Secret volume cannot be made), and its entries.
pub const ROUTER_TLS_DIR: &str = "/etc/deepseek-router-tls";
pub const TLS_CERT_ENTRY: &str = "tls.crt";
pub const TLS_KEY_ENTRY: &str = "tls.key";
pub const TLS_CA_ENTRY: &str = "ca.crt";
/// Where `spec.workerTls`'s Secret is mounted, in the workers and in the router.
pub const WORKER_TLS_DIR: &str = "/etc/deepseek-worker-tls";

/// Unprivileged uid/gid of every container (distroless `nonroot`).
pub const RUN_AS: i64 = 65532;

pub const IMAGE_REGISTRY: &str = "ghcr.io/deepseek-operator";

/// Release image of one of the workspace binaries, matching this operator's version.
pub fn default_image(binary: &str) -> String {
    format!("{IMAGE_REGISTRY}/{binary}:{}", env!("CARGO_PKG_VERSION"))
}

pub fn group_name(deployment: &str, pool: &str, group: i32) -> String {
    format!("{deployment}-{pool}-g{group}")
}

pub fn placement_name(deployment: &str, pool: &str) -> String {
    format!("{deployment}-{pool}-placement")
}

/// The model cache claim, and the Job that fills it, of one repository revision: a new
/// revision gets a new name, so it downloads beside the old one.
pub fn model_cache_name(deployment: &str, repo: &str, revision: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in repo.bytes().chain([0]).chain(revision.bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{deployment}-model-{hash:08x}")
}

/// Whether `claim` is one of `deployment`'s model caches (`model_cache_name`).
pub fn is_model_cache_of(deployment: &str, claim: &str) -> bool {
    claim
        .strip_prefix(deployment)
        .is_some_and(|rest| rest.starts_with("-model-"))
}

/// Selector of a deployment's model cache claims and download Jobs (and the Jobs' pods).
pub fn model_cache_selector(deployment: &str) -> BTreeMap<String, String> {
    labels(&[
        (LABEL_DEPLOYMENT, deployment),
        ("app.kubernetes.io/component", COMPONENT_MODEL_CACHE),
    ])
}

/// The Secret the pods mount when the operator keeps the deployment's worker CA.
pub fn worker_tls_secret_name(deployment: &str) -> String {
    format!("{deployment}-worker-tls")
}

/// The operator's own Secret of that CA, with its key (never mounted).
pub fn worker_ca_secret_name(deployment: &str) -> String {
    format!("{deployment}-worker-ca")
}

/// When the operator last changed the worker TLS Secret (RFC 3339), on that Secret.
pub const ANNOTATION_TLS_PUBLISHED: &str = "serving.deepseek-operator.io/published-at";

pub fn router_name(deployment: &str) -> String {
    format!("{deployment}-router")
}

/// The `app.kubernetes.io` labels every object of a deployment carries.
pub fn common_labels(deployment: &str, component: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "deepseek"),
        ("app.kubernetes.io/instance", deployment),
        ("app.kubernetes.io/component", component),
        ("app.kubernetes.io/part-of", PART_OF),
        ("app.kubernetes.io/managed-by", MANAGED_BY),
        (LABEL_DEPLOYMENT, deployment),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Selector of every worker pod of a deployment (the scale subresource's selector).
pub fn workers_selector(deployment: &str) -> BTreeMap<String, String> {
    labels(&[
        (LABEL_DEPLOYMENT, deployment),
        ("app.kubernetes.io/component", COMPONENT_WORKER),
    ])
}

/// Selector of the pods of one group.
pub fn group_selector(deployment: &str, pool: &str, group: i32) -> BTreeMap<String, String> {
    let mut selector = workers_selector(deployment);
    selector.insert(LABEL_POOL.into(), pool.into());
    selector.insert(LABEL_GROUP.into(), group.to_string());
    selector
}

pub fn router_selector(deployment: &str) -> BTreeMap<String, String> {
    labels(&[
        (LABEL_DEPLOYMENT, deployment),
        ("app.kubernetes.io/component", COMPONENT_ROUTER),
    ])
}

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `k=v,k=v`, the string form of an equality label selector.
pub fn selector_string(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
