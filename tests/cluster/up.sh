#!/usr/bin/env bash
# Starts a local Kubernetes control plane built from source (tests/cluster/build.sh): etcd,
# kube-apiserver (RBAC + Node authorization, PodSecurity and the default admission plugins,
# service-account token signing), kube-controller-manager, kube-scheduler, and kwok as the
# kubelet of fake GPU nodes: eight H100 and eight A100 nodes (8 GPUs each) across two zones,
# the A100s tainted as deploy/samples/deepseek-v3-h100-a100.yaml expects.
#
# Prints `export KUBECONFIG=...` on stdout once the nodes are Ready; everything else goes to
# stderr and to $DSD_CLUSTER_DIR/logs/. tests/cluster/down.sh stops it all.
#
# Env: DSD_CLUSTER_DIR (state: certificates, etcd data, logs, the audit log of service
# accounts outside kube-system; default .tools/cluster/run),
# DSD_CLUSTER_CACHE (built binaries, see versions.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/versions.sh"
source "$here/lib.sh"
dir="${DSD_CLUSTER_DIR:-$CLUSTER_CACHE/run}"
log() { echo "cluster: $*" >&2; }

bin="$("$here/build.sh")"
if [ -e "$dir/pids" ]; then
  log "a cluster is already running from $dir; stopping it first"
  "$here/down.sh"
fi
rm -rf "$dir"
mkdir -p "$dir/pki" "$dir/logs" "$dir/etcd" "$dir/apiserver"
: >"$dir/pids"
# A failed start leaves nothing running.
trap 'status=$?; if [ $status -ne 0 ]; then log "start failed; logs in $dir/logs"; DSD_CLUSTER_DIR="$dir" "$here/down.sh"; fi' EXIT

etcd_port=$(free_port); etcd_peer_port=$(free_port); api_port=$(free_port)
kcm_port=$(free_port); scheduler_port=$(free_port); kwok_port=$(free_port)

# --- certificates: one CA, a serving certificate, a client certificate per component ---
pki="$dir/pki"
openssl_quiet() { openssl "$@" 2>/dev/null; }
openssl_quiet req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=dsd-local-ca" \
  -keyout "$pki/ca.key" -out "$pki/ca.crt"
sign() { # sign NAME SUBJECT [SAN]
  local name="$1" subject="$2" san="${3:-}"
  openssl_quiet req -newkey rsa:2048 -nodes -subj "$subject" -keyout "$pki/$name.key" -out "$pki/$name.csr"
  local ext="$pki/$name.ext"
  if [ -n "$san" ]; then
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" >"$ext"
  else
    printf 'extendedKeyUsage=clientAuth\n' >"$ext"
  fi
  openssl_quiet x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 30 -extfile "$ext" -out "$pki/$name.crt"
}
sign apiserver "/CN=kube-apiserver" \
  "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
sign admin "/O=system:masters/CN=dsd-admin"
sign controller-manager "/CN=system:kube-controller-manager"
sign scheduler "/CN=system:kube-scheduler"
openssl_quiet genrsa -out "$pki/sa.key" 2048
openssl_quiet rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

# Audit the requests of service accounts outside kube-system (the operator's, the routers'), so
# tests and benchmarks can count what the operator asks of the API server.
cat >"$dir/audit-policy.yaml" <<'YAML'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: None
    userGroups: ["system:serviceaccounts:kube-system"]
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
YAML

server="https://127.0.0.1:$api_port"
kubeconfig() { # kubeconfig NAME -> $dir/NAME.kubeconfig
  local file="$dir/$1.kubeconfig"
  "$bin/kubectl" config --kubeconfig "$file" set-cluster local --server "$server" \
    --certificate-authority "$pki/ca.crt" --embed-certs >/dev/null
  "$bin/kubectl" config --kubeconfig "$file" set-credentials "$1" \
    --client-certificate "$pki/$1.crt" --client-key "$pki/$1.key" --embed-certs >/dev/null
  "$bin/kubectl" config --kubeconfig "$file" set-context local --cluster local --user "$1" >/dev/null
  "$bin/kubectl" config --kubeconfig "$file" use-context local >/dev/null
}
kubeconfig admin; kubeconfig controller-manager; kubeconfig scheduler
export KUBECONFIG="$dir/admin.kubeconfig"
kubectl() { "$bin/kubectl" "$@"; }

start() { # start NAME COMMAND...: runs in its own process group, logs to logs/NAME.log
  local name="$1"; shift
  setsid "$@" >"$dir/logs/$name.log" 2>&1 </dev/null &
  echo "$name $!" >>"$dir/pids"
}

log "etcd $ETCD_VERSION on 127.0.0.1:$etcd_port"
start etcd "$bin/etcd" --name local --data-dir "$dir/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster "local=http://127.0.0.1:$etcd_peer_port" \
  --unsafe-no-fsync --quota-backend-bytes 4294967296
wait_until 30 etcd curl -sf "http://127.0.0.1:$etcd_port/health"

log "kube-apiserver $KUBERNETES_VERSION on $server"
start kube-apiserver "$bin/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
  --cert-dir "$dir/apiserver" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --service-cluster-ip-range 10.96.0.0/16 \
  --authorization-mode Node,RBAC \
  --enable-admission-plugins NodeRestriction \
  --allow-privileged=true \
  --audit-policy-file "$dir/audit-policy.yaml" --audit-log-path "$dir/logs/audit.log" \
  --audit-log-maxsize 0
wait_until 120 "the API server" kubectl get --raw /readyz

log "kube-controller-manager and kube-scheduler"
start kube-controller-manager "$bin/kube-controller-manager" \
  --kubeconfig "$dir/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$dir/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$dir/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$kcm_port" --leader-elect=false \
  --use-service-account-credentials \
  --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
  --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key"
start kube-scheduler "$bin/kube-scheduler" \
  --kubeconfig "$dir/scheduler.kubeconfig" \
  --authentication-kubeconfig "$dir/scheduler.kubeconfig" \
  --authorization-kubeconfig "$dir/scheduler.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$scheduler_port" --leader-elect=false

# kwok's stages come from its own module (pinned in tools/kwok/go.sum): nodes become Ready and
# keep a lease; pods on them go through their init containers and become Running and Ready
# with an IP, each step after 1-6 s as on a real node (so a rollout can be watched and
# interrupted), and go when deleted after a 1 s grace.
stages="$(cd "$here/tools/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage"
log "kwok $KWOK_VERSION"
start kwok "$bin/kwok" --kubeconfig "$dir/admin.kubeconfig" \
  --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
  --cidr 10.244.0.0/16 --node-ip 10.0.0.1 --server-address "127.0.0.1:$kwok_port" \
  --node-lease-duration-seconds 40 \
  --config "$stages/node/fast/node-initialize.yaml" \
  --config "$stages/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml" \
  --config "$stages/pod/general/pod-create.yaml" \
  --config "$stages/pod/general/pod-init-container-running.yaml" \
  --config "$stages/pod/general/pod-init-container-completed.yaml" \
  --config "$stages/pod/general/pod-ready.yaml" \
  --config "$stages/pod/general/pod-complete.yaml" \
  --config "$stages/pod/general/pod-delete.yaml"

# Service accounts need their controller before anything can create pods.
wait_until 60 "the default ServiceAccount" kubectl get serviceaccount default

log "fake GPU nodes"
node() { # node NAME PRODUCT ZONE TAINTS_YAML
  cat <<YAML
apiVersion: v1
kind: Node
metadata:
  name: $1
  annotations: {kwok.x-k8s.io/node: fake}
  labels:
    kubernetes.io/hostname: $1
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
    nvidia.com/gpu.product: $2
    nvidia.com/gpu.count: "8"
    topology.kubernetes.io/zone: $3
spec:
  taints: $4
status:
  capacity: &resources {cpu: "192", memory: 2Ti, pods: "250", ephemeral-storage: 4Ti, nvidia.com/gpu: "8"}
  allocatable: *resources
---
YAML
}
{
  for i in 0 1 2 3 4 5 6 7; do
    node "h100-$i" NVIDIA-H100-80GB-HBM3 "zone-$((i % 2))" "[]"
    node "a100-$i" NVIDIA-A100-SXM4-80GB "zone-$((i % 2))" \
      '[{key: nvidia.com/gpu, value: present, effect: NoSchedule}, {key: pool, value: a100, effect: NoSchedule}]'
  done
} | kubectl apply -f - >/dev/null
nodes_ready() {
  [ "$(kubectl get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True)" = 16 ]
}
wait_until 60 "the nodes to be Ready" nodes_ready
log "ready: $(kubectl version 2>/dev/null | tr '\n' ' ')"
echo "export KUBECONFIG=$dir/admin.kubeconfig PATH=$bin:\$PATH"
