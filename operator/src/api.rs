//! The `DeepSeekDeployment` custom resource (`serving.deepseek-operator.io/v1alpha1`).
//!
//! Doc comments on every field become the OpenAPI descriptions that `kubectl explain` shows.
//! Validation that the API server can do on its own (ranges, CEL rules) lives here in the
//! schema; what needs cluster state (GPU product known, PVC present) is checked by the
//! controller and reported in `status`.

use std::collections::BTreeMap;

use deepseek_proto::memory::ModelShape;
use k8s_openapi::api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "serving.deepseek-operator.io";

/// A DeepSeek mixture-of-experts model served by expert-parallel worker groups in one or more
/// GPU node pools, behind one router endpoint (gRPC and OpenAI-compatible HTTP).
// Several `printcolumn(type_ = ...)` entries read to clippy as repeated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "serving.deepseek-operator.io",
    version = "v1alpha1",
    kind = "DeepSeekDeployment",
    plural = "deepseekdeployments",
    shortname = "dsd",
    namespaced,
    status = "DeepSeekDeploymentStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(name = "Pools", type_ = "string", json_path = ".status.poolSummary"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoints.grpc"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "!has(self.parallelism.expertParallelRanks) || self.pools.all(p, self.parallelism.expertParallelRanks % p.gpusPerPod == 0)"
).message("parallelism.expertParallelRanks must be divisible by every pool's gpusPerPod").field_path(".parallelism.expertParallelRanks"))]
#[x_kube(validation = Rule::new(
    "!has(self.parallelism.expertParallelRanks) || self.pools.all(p, !has(p.podsPerGroup) || p.podsPerGroup * p.gpusPerPod == self.parallelism.expertParallelRanks)"
).message("pools[].podsPerGroup × gpusPerPod must equal parallelism.expertParallelRanks when both are set").field_path(".pools"))]
#[serde(rename_all = "camelCase")]
pub struct DeepSeekDeploymentSpec {
    /// The model to serve and where its weights come from.
    pub model: ModelSpec,

    /// Node pools that run expert-parallel groups: the router shares traffic by their
    /// weights and `spec.replicas` fills the heaviest first (ties in list order). Pool names
    /// are unique.
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    #[schemars(length(min = 1, max = 16))]
    pub pools: Vec<PoolSpec>,

    /// Expert-parallel layout shared by every pool.
    #[serde(default)]
    pub parallelism: ParallelismSpec,

    /// The router Deployment that fronts all pools with one endpoint.
    #[serde(default)]
    pub router: RouterSpec,

    /// Mutual TLS between the router and the workers, and between a group's ranks: `{}` for
    /// a CA the operator keeps and rotates, or `secretName` for a certificate of yours.
    /// Without it, those hops are plaintext (the workers' NetworkPolicy still admits only
    /// the router and the group's own ranks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_tls: Option<WorkerTls>,

    /// Settings for every worker rank (pools may override some of them).
    #[serde(default)]
    pub worker: WorkerSpec,

    /// Total number of expert-parallel groups across all pools, for `kubectl scale` and the
    /// HorizontalPodAutoscaler. When set it overrides `pools[].replicas`: each pool first gets
    /// its `minReplicas`, then the rest fill pools by weight, highest first (ties in list
    /// order), up to their `maxReplicas`, or to the groups a full pool holds (see
    /// `spillAfterSeconds`). When unset, each pool runs its own `replicas`.
    #[schemars(range(min = 0))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,

    /// With `replicas`: how long a pod of a pool's group may stay unschedulable (time for a
    /// cluster autoscaler to add nodes) before that pool counts as full at the groups it
    /// holds and the rest of the total goes to the next pools. A full pool is tried again
    /// ten minutes later (`status.pools[].fullSince`).
    #[schemars(range(min = 0))]
    #[serde(default = "default_spill_after")]
    pub spill_after_seconds: i32,

    /// Who may scrape the workers' metrics port (9090), as NetworkPolicy peers (pod and
    /// namespace selectors, IP blocks). Default: pods in the operator's namespace (its
    /// `--metrics-from-namespace`, else the namespace it runs in); when the operator cannot
    /// tell, pods in this deployment's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_from: Option<Vec<NetworkPolicyPeer>>,

    /// Scale the number of groups with load, between the pools' `minReplicas` and
    /// `maxReplicas` (every pool needs `maxReplicas`), written to `spec.replicas` through the
    /// scale subresource: the heaviest pool fills first and the next takes the spill-over.
    /// The load is read from the routers' `/metrics`. The operator steps aside while a
    /// HorizontalPodAutoscaler targets this deployment. Absent: groups change only when the
    /// spec (or `kubectl scale`, or an HPA) does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// OpenTelemetry traces of the router and the workers. Absent: none are exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSpec>,
}

/// Spans exported over OTLP/gRPC: a request's span in the router continues its client's
/// trace (a W3C `traceparent` header or gRPC metadata), and the worker's the router's.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TracingSpec {
    /// The collector's OTLP/gRPC endpoint, `http://HOST:4317` (or `https://`), given to the
    /// router and every worker as `OTEL_EXPORTER_OTLP_ENDPOINT`.
    #[schemars(regex(pattern = r"^https?://\S+$"))]
    pub otlp_endpoint: String,
}

/// Load-aware scaling: the load is the requests running and waiting on the workers and held
/// by the routers, and optionally the share of the KV cache in use.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Requests (running and waiting) one group should hold: the desired groups are the
    /// load divided by this, rounded up.
    #[schemars(range(min = 1))]
    #[serde(default = "default_target_requests")]
    pub target_requests_per_group: i32,

    /// Scale up only to a count the load has called for during this whole window (HPA's
    /// scale-up stabilization). 0: at once.
    #[schemars(range(min = 0))]
    #[serde(default)]
    pub scale_up_window_seconds: i32,

    /// Scale down only to the highest count the load called for during this window, so a
    /// lull does not tear down groups that take minutes to start.
    #[schemars(range(min = 0))]
    #[serde(default = "default_scale_down_window")]
    pub scale_down_window_seconds: i32,

    /// Scale to zero groups after this many seconds without a request, when every pool's
    /// `minReplicas` is 0; the router stays and holds the next request while a group starts.
    /// Absent: at least one group always runs.
    #[schemars(range(min = 1))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_to_zero_after_seconds: Option<i32>,

    /// Also scale by KV-cache use: enough groups that the share of the KV cache in use
    /// (over the serving ranks, from the routers) comes down to this percentage; the
    /// deployment gets the more groups of this and the request target. Absent: requests only.
    #[schemars(range(min = 1, max = 100))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_kv_cache_percent: Option<i32>,

    /// How long the router holds a request while no group serves (waking from zero, every
    /// group restarting) before it answers UNAVAILABLE (HTTP 503 with `Retry-After`).
    #[schemars(range(min = 0, max = 3600))]
    #[serde(default = "default_hold_requests")]
    pub hold_requests_seconds: i32,
}

/// The served model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.architecture) || has(self.routedExperts)")
    .message("set model.architecture or model.routedExperts so experts can be placed on ranks"))]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Name clients use in requests (`model` in OpenAI requests). Defaults to the resource name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_name: Option<String>,

    /// Where the checkpoint comes from: exactly one of `huggingFace` or `pvc`.
    pub source: ModelSource,

    /// Weight precision on the GPUs. `auto` is FP8 (an FP8 checkpoint's linear weights at
    /// one byte per weight, routed experts included): multiplied in FP8 on Hopper and newer
    /// (H100, H200), in bf16 on Ampere (A100) on weights dequantised tile by tile inside the
    /// GEMM. Pools may override it.
    #[serde(default)]
    pub dtype: Dtype,

    /// Architecture hint (`config.json` `model_type`); sets the routed expert count when
    /// `routedExperts` is not given. The worker checks it against the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<Architecture>,

    /// Routed experts per MoE layer (`n_routed_experts` in `config.json`), e.g. 64 for
    /// DeepSeek-V2-Lite. Overrides the architecture's default.
    // The API server knows int32 and int64, not schemars' uint32 (it warns on every apply).
    #[schemars(range(min = 1, max = 65536), extend("format" = "int32"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routed_experts: Option<u32>,
}

/// Checkpoint location.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.huggingFace) != has(self.pvc)")
    .message("model.source needs exactly one of huggingFace or pvc"))]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// Download from a Hugging Face repository into each pod before the worker starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugging_face: Option<HuggingFaceSource>,

    /// Mount an existing PersistentVolumeClaim that already holds the checkpoint (read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,
}

/// A Hugging Face Hub repository. The operator downloads it once per revision into a
/// PersistentVolumeClaim it creates (a Job running `deepseek-worker download`), and creates
/// the worker groups once that succeeded; they mount the claim read-only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HuggingFaceSource {
    /// Repository id, e.g. `deepseek-ai/DeepSeek-V3`.
    #[schemars(length(min = 1))]
    pub repo: String,

    /// Branch, tag or commit. Pin a commit for reproducible rollouts. A new revision is
    /// downloaded into a new claim beside the old one, which goes once no group uses it.
    #[serde(default = "default_revision")]
    pub revision: String,

    /// Secret key holding a Hugging Face token, for gated or private repositories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<SecretKeyRef>,

    /// The hub or a mirror of it (`HF_ENDPOINT`), e.g. `https://hf-mirror.example`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// Storage request of the model cache claim, e.g. `800Gi` for DeepSeek-V3 (the
    /// checkpoint is about 690 GB). Default `1Ti`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_size: Option<Quantity>,

    /// Storage class of the model cache claim; the cluster's default class when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,

    /// Access mode of the model cache claim. `ReadWriteMany` (the default) lets groups on
    /// many nodes mount it; `ReadWriteOnce` only suits deployments whose pods share a node.
    #[serde(default)]
    pub access_mode: CacheAccessMode,
}

/// How the model cache claim may be mounted.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheAccessMode {
    #[default]
    ReadWriteMany,
    ReadWriteOnce,
}

impl CacheAccessMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheAccessMode::ReadWriteMany => "ReadWriteMany",
            CacheAccessMode::ReadWriteOnce => "ReadWriteOnce",
        }
    }
}

/// A key in a Secret of the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretKeyRef {
    /// Secret name.
    pub name: String,
    /// Key within the Secret.
    #[serde(default = "default_token_key")]
    pub key: String,
}

/// An existing PersistentVolumeClaim.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// Claim name in the deployment's namespace. It must allow many readers (ReadOnlyMany or
    /// ReadWriteMany) when groups span nodes.
    #[schemars(length(min = 1))]
    pub claim_name: String,

    /// Directory inside the volume that holds `config.json` and the safetensors files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Weight precision.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// FP8 weights on GPUs (see `fp8`).
    #[default]
    Auto,
    /// FP8 e4m3 weights with 128×128 block scales, from an FP8 checkpoint: FP8 GEMMs on
    /// sm_89 and newer, bf16 GEMMs on weights dequantised inside the kernel on Ampere.
    Fp8,
    /// bfloat16 weights.
    Bf16,
}

/// Model family, as `model_type` in `config.json`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// DeepSeek-V3, R1 and V3.1 (256 routed experts).
    #[serde(rename = "deepseek_v3")]
    DeepseekV3,
    /// DeepSeek-V2 (160 routed experts; set routedExperts to 64 for V2-Lite).
    #[serde(rename = "deepseek_v2")]
    DeepseekV2,
}

impl Architecture {
    pub fn routed_experts(self) -> u32 {
        match self {
            Architecture::DeepseekV3 => 256,
            Architecture::DeepseekV2 => 160,
        }
    }

    /// The published model of this architecture with `routed_experts` experts (V2 with 64
    /// is V2-Lite); `None` for another size, whose shape the operator cannot know.
    pub fn shape(self, routed_experts: u32) -> Option<ModelShape> {
        match (self, routed_experts) {
            (Architecture::DeepseekV3, 256) => Some(ModelShape::DEEPSEEK_V3),
            (Architecture::DeepseekV2, 160) => Some(ModelShape::DEEPSEEK_V2),
            (Architecture::DeepseekV2, 64) => Some(ModelShape::DEEPSEEK_V2_LITE),
            _ => None,
        }
    }
}

/// A node pool that runs expert-parallel groups of one kind of GPU.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.minReplicas) || self.minReplicas <= self.replicas")
    .message("minReplicas must be ≤ replicas").field_path(".minReplicas"))]
#[x_kube(validation = Rule::new("!has(self.maxReplicas) || self.replicas <= self.maxReplicas")
    .message("replicas must be ≤ maxReplicas").field_path(".maxReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct PoolSpec {
    /// Pool name (DNS label), unique within the deployment; used in object names and labels.
    #[schemars(
        length(min = 1, max = 20),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// GPU product as the `nvidia.com/gpu.product` node label spells it, e.g.
    /// `NVIDIA-H100-80GB-HBM3` or `NVIDIA-A100-SXM4-80GB`. Omit it for a CPU pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_product: Option<String>,

    /// GPUs per pod, one expert-parallel rank per GPU. On a CPU pool: ranks per pod.
    #[schemars(range(min = 1, max = 16))]
    #[serde(default = "one")]
    pub gpus_per_pod: i32,

    /// Pods per expert-parallel group. Defaults to
    /// `parallelism.expertParallelRanks / gpusPerPod`, or 1.
    #[schemars(range(min = 1, max = 64))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods_per_group: Option<i32>,

    /// Number of expert-parallel groups (each a full copy of the model) in this pool.
    #[schemars(range(min = 0))]
    #[serde(default = "one")]
    pub replicas: i32,

    /// Lowest replica count `spec.replicas` may give this pool.
    #[schemars(range(min = 0))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_replicas: Option<i32>,

    /// Highest replica count `spec.replicas` may give this pool.
    #[schemars(range(min = 0))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas: Option<i32>,

    /// Relative share of traffic the router sends to this pool (0 = only on spill-over).
    #[schemars(range(min = 0, max = 1000))]
    #[serde(default = "one")]
    pub weight: i32,

    /// Weight precision for this pool; overrides `model.dtype`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Dtype>,

    /// Extra node labels the pods require, merged over the GPU product selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Tolerations for the pool's node taints (e.g. `nvidia.com/gpu:NoSchedule`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Affinity; replaces the default (keep a group's pods in one zone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Worker container resources for this pool; replaces `worker.resources`. The GPU limit
    /// is always `gpusPerPod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// Expert-parallel layout.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ParallelismSpec {
    /// Expert-parallel ranks per group. Defaults to each pool's `podsPerGroup × gpusPerPod`.
    #[schemars(range(min = 1, max = 1024))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_parallel_ranks: Option<i32>,

    /// Extra expert copies per MoE layer, spread over ranks to even out hot experts.
    #[schemars(range(min = 0, max = 1024))]
    #[serde(default)]
    pub redundant_experts: i32,

    /// ConfigMap (in this namespace) whose `metrics` entry holds the workers' `/metrics`
    /// text (scrapes of every rank, concatenated). Each pool's placement plan is then
    /// balanced by the tokens routed to each expert: the hottest get the redundant copies,
    /// and every rank carries a near-equal load. Changing it rolls the groups. Unset:
    /// round-robin placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_load_config_map: Option<String>,
}

/// The router in front of all pools.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    /// Router pods.
    #[schemars(range(min = 0, max = 64))]
    #[serde(default = "default_router_replicas")]
    pub replicas: i32,

    /// How a request picks a pool and a rank.
    #[serde(default)]
    pub policy: RoutingPolicy,

    /// gRPC port of the router Service (`deepseek.v1.Inference`).
    #[schemars(range(min = 1, max = 65535))]
    #[serde(default = "default_grpc_port")]
    pub grpc_port: i32,

    /// HTTP port of the router Service (OpenAI-compatible API).
    #[schemars(range(min = 1, max = 65535))]
    #[serde(default = "default_http_port")]
    pub http_port: i32,

    /// Router image; defaults to the release matching the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Router container resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Secret (in this namespace) whose `api-keys` entry lists the accepted API keys, a line
    /// each: `NAME sha256:HEX` (`deepseek-router hash-key NAME` prints it for a key), so the
    /// Secret holds no key, optionally with `rpm=N tpm=N` (the key's requests and tokens per
    /// minute); clients then send `Authorization: Bearer KEY`. Unset: no key is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys_secret: Option<String>,

    /// Serve HTTPS and gRPC over TLS with this certificate. Without it, plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RouterTls>,
}

/// The certificate the router and the workers show each other.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkerTls {
    /// A Secret in this namespace with `ca.crt`, `tls.crt` and `tls.key`, such as a
    /// cert-manager `Certificate` from a CA issuer of this deployment's own writes (usages
    /// server auth and client auth). Each side accepts the other's certificate when that CA
    /// signed it, whatever its names, so the CA must sign for nothing else. A renewed Secret
    /// is used without a restart. Unset: the operator makes a CA for this deployment and
    /// the Secret `NAME-worker-tls`, and rotates both (certificates renewed after 20 of
    /// their 30 days, the CA after 8 of its 12 months, with no failed handshake); the CA's
    /// key stays in `NAME-worker-ca`, which no pod mounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub secret_name: Option<String>,
}

impl WorkerTls {
    /// The Secret the pods mount.
    pub fn secret(&self, deployment: &str) -> String {
        self.secret_name
            .clone()
            .unwrap_or_else(|| crate::names::worker_tls_secret_name(deployment))
    }

    /// Whether the operator keeps the CA.
    pub fn operator_ca(&self) -> bool {
        self.secret_name.is_none()
    }
}

/// The router's serving certificate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouterTls {
    /// A `kubernetes.io/tls` Secret in this namespace (`tls.crt`, `tls.key`), such as a
    /// cert-manager `Certificate` writes. A renewed Secret is served without a restart.
    #[schemars(length(min = 1))]
    pub secret_name: String,
}

impl Default for RouterSpec {
    fn default() -> Self {
        RouterSpec {
            replicas: default_router_replicas(),
            policy: RoutingPolicy::default(),
            grpc_port: default_grpc_port(),
            http_port: default_http_port(),
            image: None,
            resources: None,
            api_keys_secret: None,
            tls: None,
        }
    }
}

/// Routing policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingPolicy {
    /// Pool by weight, then the rank with the least outstanding work.
    #[default]
    LeastLoad,
    /// Like least-load, but requests sharing a prompt prefix go to the same rank (KV reuse).
    PrefixAffinity,
    /// Like least-load, but a request goes to the rank that was sent the longest run of its
    /// prompt's opening and can still hold it in its KV cache.
    CacheAware,
    /// Pool and rank strictly by weight, ignoring load.
    Weighted,
}

/// Settings for every worker rank.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// Worker image; defaults to the release matching the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Worker container resources (pools may replace them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Token budget of one scheduler step (prefill chunks plus decodes).
    #[schemars(range(min = 1))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_tokens: Option<i32>,

    /// Share of each GPU's memory that weights, working space and the KV cache may use
    /// together (vLLM's `gpu_memory_utilization`); the cache gets what is left. Default 0.9
    /// on GPU pools. On CPU pools, the share of the host memory left after loading.
    #[schemars(range(min = 0.01, max = 1.0))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_fraction: Option<f64>,

    /// Size of the `/dev/shm` memory volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<Quantity>,

    /// Extra environment variables for the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,
}

/// Observed state, computed from the objects the operator owns.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeepSeekDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default)]
    pub observed_generation: i64,

    /// `Ready`, `Progressing` and `Degraded`, with reasons.
    #[serde(default)]
    pub conditions: Vec<Condition>,

    /// Per-pool group counts.
    #[serde(default)]
    pub pools: Vec<PoolStatus>,

    /// Expert-parallel groups that exist, across pools (the scale subresource's replicas).
    #[serde(default)]
    pub replicas: i32,

    /// Groups whose every rank is ready on the current revision.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Label selector of the worker pods, for the scale subresource.
    #[serde(default)]
    pub selector: String,

    /// `pool:ready/desired` for every pool, for `kubectl get`.
    #[serde(default)]
    pub pool_summary: String,

    /// Where clients reach the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Endpoints>,

    /// The model cache of a `huggingFace` source: its claim, the download's progress and
    /// the commit it resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelStatus>,

    /// The built-in autoscaler's last decision (with `spec.autoscaling`). Serialized as null
    /// when absent, so that the controller's merge patch clears it.
    #[serde(default)]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// The download of a `huggingFace` source into its model cache claim.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    /// The claim that holds (or will hold) the spec's revision.
    pub claim_name: String,
    /// The commit the revision resolved to, once downloaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Bytes on the claim so far, as the download last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<i64>,
    /// Bytes of the files to download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<i64>,
}

/// What the built-in autoscaler last decided, and whether it is the one deciding.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// Who sets `spec.replicas`: `operator`, or `HorizontalPodAutoscaler/NAME` when one
    /// targets this deployment (the built-in autoscaler then steps aside).
    pub scaled_by: String,
    /// Groups it last asked for. (Absent fields serialize as null, so a merge patch of
    /// this status clears them.)
    #[serde(default)]
    pub desired_replicas: Option<i32>,
    /// Why, with the load it saw.
    #[serde(default)]
    pub reason: String,
    /// When it last changed `spec.replicas`.
    #[serde(default)]
    pub last_scale_time: Option<Time>,
}

/// Per-pool status.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// Pool name.
    pub name: String,
    /// Desired groups.
    pub replicas: i32,
    /// Groups whose every rank is ready on the current revision.
    pub ready_replicas: i32,
    /// Groups whose every rank runs the current revision.
    pub updated_replicas: i32,
    /// Current revision hash of the pool's pod template.
    pub revision: String,
    /// Set while the pool counts as full: the groups it held when a pod of another of its
    /// groups stayed unschedulable for `spec.spillAfterSeconds`. With `spec.replicas` (or
    /// autoscaling) the groups beyond go to the next pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_at: Option<i32>,
    /// Since when it counts as full; its groups are tried again ten minutes later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_since: Option<Time>,
}

/// Client endpoints (router Service addresses).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Endpoints {
    /// `host:port` of the `deepseek.v1.Inference` gRPC service.
    pub grpc: String,
    /// Base URL of the OpenAI-compatible HTTP API.
    pub http: String,
}

fn one() -> i32 {
    1
}
fn default_target_requests() -> i32 {
    16
}

fn default_scale_down_window() -> i32 {
    300
}

fn default_spill_after() -> i32 {
    120
}

fn default_hold_requests() -> i32 {
    // A DeepSeek-V3 group loads its weights in minutes.
    300
}

fn default_revision() -> String {
    "main".into()
}
fn default_token_key() -> String {
    "token".into()
}
fn default_router_replicas() -> i32 {
    2
}
fn default_grpc_port() -> i32 {
    50051
}
fn default_http_port() -> i32 {
    8000
}
