# The control plane's pinned versions (sourced by the cluster scripts). The Go modules behind
# them are pinned with their hashes in tools/*/go.sum; keep the two in step.
KUBERNETES_VERSION=v1.36.3
ETCD_VERSION=v3.6.17
KWOK_VERSION=v0.8.0
# The e2e suite installs this release's PodMonitor and ServiceMonitor CRDs (from its Go module).
PROMETHEUS_OPERATOR_VERSION=v0.85.0
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# Binaries are cached by version, outside git (the repo's .tools/ is ignored).
CLUSTER_CACHE="${DSD_CLUSTER_CACHE:-$repo_root/.tools/cluster}"
CLUSTER_BIN="$CLUSTER_CACHE/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION"
