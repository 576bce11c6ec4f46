#!/usr/bin/env bash
# Builds the local control plane's binaries from Go modules, once per machine: etcd, the
# Kubernetes components and kubectl, and kwok. The pinned versions live in tests/cluster/tools/
# (go.mod + go.sum); the binaries are cached under a folder named after them, so a change of
# version builds anew and an unchanged one costs nothing. Prints the bin folder on stdout.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/versions.sh"

bin="$CLUSTER_BIN"
if [ -x "$bin/kube-apiserver" ] && [ -x "$bin/kube-controller-manager" ] \
  && [ -x "$bin/kube-scheduler" ] && [ -x "$bin/kubectl" ] && [ -x "$bin/etcd" ] \
  && [ -x "$bin/kwok" ]; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: Go is needed to build the control plane" >&2; exit 1; }
mkdir -p "$bin.partial"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false
start=$SECONDS

log() { echo "build.sh: $*" >&2; }

# Without the stamp every component reports v0.0.0, and the API server's compatibility
# version (taken from the binary version) would be wrong.
minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
stamp=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  stamp+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  stamp+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

log "etcd $ETCD_VERSION"
(cd "$here/tools/etcd" && go build -trimpath -ldflags "-s -w" -o "$bin.partial/etcd" .)

log "kwok $KWOK_VERSION"
(cd "$here/tools/kwok" && go build -trimpath -ldflags "-s -w" -o "$bin.partial/kwok" sigs.k8s.io/kwok/cmd/kwok)

for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  log "$cmd $KUBERNETES_VERSION"
  (cd "$here/tools/kubernetes" && go build -trimpath -ldflags "-s -w$stamp" \
    -o "$bin.partial/$cmd" "k8s.io/kubernetes/cmd/$cmd")
done

rm -rf "$bin"
mv "$bin.partial" "$bin"
log "built in $((SECONDS - start)) s into $bin"
echo "$bin"
