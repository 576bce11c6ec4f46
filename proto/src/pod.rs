//! The operator → worker pod contract: what the operator's pod template sets and
//! `deepseek-worker serve` reads. Both sides use these names, so neither can drift alone (a
//! test renders a pod with the operator's builders and runs the worker's parser on it).

/// Environment variables of a worker container. Each is also a `serve` flag.
pub mod env {
    /// Checkpoint directory.
    pub const MODEL: &str = "DSD_MODEL";
    /// Name clients use for the model.
    pub const SERVED_NAME: &str = "DSD_SERVED_NAME";
    /// How a GPU holds and multiplies an FP8 checkpoint's linear weights: `auto`, `bf16` or `fp8`.
    pub const DTYPE: &str = "DSD_DTYPE";
    /// `cpu` or `cuda:N` (the device plugin numbers a pod's own GPUs from 0).
    pub const DEVICE: &str = "DSD_DEVICE";
    /// The pool's name.
    pub const POOL: &str = "DSD_POOL";
    /// Ranks in the expert-parallel group.
    pub const GROUP_SIZE: &str = "DSD_GROUP_SIZE";
    /// Ranks (GPUs) in one pod.
    pub const RANKS_PER_POD: &str = "DSD_RANKS_PER_POD";
    /// The StatefulSet pod index; the pod's first rank is index × ranks per pod.
    pub const POD_INDEX: &str = "DSD_POD_INDEX";
    /// Every rank's expert-parallel address in rank order, comma-separated.
    pub const PEERS: &str = "DSD_PEERS";
    /// The placement plan file.
    pub const PLACEMENT: &str = "DSD_PLACEMENT";
    /// gRPC listen address.
    pub const LISTEN: &str = "DSD_LISTEN";
    /// Prometheus `/metrics` listen address.
    pub const METRICS_LISTEN: &str = "DSD_METRICS_LISTEN";
    /// Where spans go over OTLP/gRPC: OpenTelemetry's own variable, which the router reads too.
    pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    /// Token budget of one scheduler step.
    pub const MAX_BATCH_TOKENS: &str = "DSD_MAX_BATCH_TOKENS";
    /// The pool's GPU product (`nvidia.com/gpu.product`); a rank on another GPU refuses to
    /// start.
    pub const GPU_PRODUCT: &str = "DSD_GPU_PRODUCT";
    /// A writable directory for the kernels compiled at start (those the image does not ship).
    pub const KERNEL_CACHE: &str = "DSD_KERNEL_CACHE";
    /// KV cache size as a fraction of the memory left once the weights are loaded.
    pub const KV_CACHE_FRACTION: &str = "DSD_KV_CACHE_FRACTION";
    /// Mutual TLS on the gRPC port: the worker's certificate, its key, and the CA clients'
    /// certificates must chain to.
    pub const TLS_CERT: &str = "DSD_TLS_CERT";
    pub const TLS_KEY: &str = "DSD_TLS_KEY";
    pub const TLS_CLIENT_CA: &str = "DSD_TLS_CLIENT_CA";
    /// Plaintext gRPC health only, for the kubelet's probes when the gRPC port wants TLS.
    pub const HEALTH_LISTEN: &str = "DSD_HEALTH_LISTEN";
}

/// The worker's token budget of one scheduler step when `MAX_BATCH_TOKENS` is not set; the
/// operator's memory plan assumes it then.
pub const DEFAULT_MAX_BATCH_TOKENS: u32 = 2048;
/// gRPC (`deepseek.v1.Inference` and health) on every worker pod.
pub const GRPC_PORT: u16 = 50051;
/// The expert-parallel port of a pod's first rank; local rank `i` listens on `EP_PORT + i`.
pub const EP_PORT: u16 = 50061;
/// Prometheus `/metrics`.
pub const METRICS_PORT: u16 = 9090;
/// Plaintext gRPC health (`HEALTH_LISTEN`), when the gRPC port wants mutual TLS.
pub const HEALTH_PORT: u16 = 50052;
/// The gRPC health service name the startup and liveness probes ask for: SERVING while the
/// process runs, even when the group is down (readiness covers that), so a lost peer does
/// not restart pods. The router answers it too.
pub const LIVENESS_SERVICE: &str = "liveness";
/// Where the checkpoint volume is mounted.
pub const MODEL_MOUNT: &str = "/models";

/// The files of a hub repository that serving reads (the config, the tokenizer, the
/// weights): what a download fetches.
pub const CHECKPOINT_FILES: &[&str] = &["*.json", "*.safetensors"];
/// Where the placement ConfigMap is mounted; the plan is its `placement::PLAN_FILE`.
pub const PLACEMENT_MOUNT: &str = "/etc/deepseek/placement";
