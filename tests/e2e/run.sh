#!/usr/bin/env bash
# Real-cluster end-to-end test of the operator. Runs only when KUBECONFIG points at a cluster
# (kind, k3d or a real one); skipped with a message otherwise.
#
# It installs the CRD, runs the operator binary locally against the cluster, applies the tiny
# sample (with a PVC), and checks that the operator creates every object with owner
# references, reports honest status (not Ready: the worker does not serve yet), refuses an
# invalid CR with a message naming the field, scales, and cleans up on delete.
#
# Env: KUBECTL (default kubectl, or .tools/bin/kubectl), OPERATOR_BIN (default
# ./target/debug/deepseek-operator), E2E_NAMESPACE (default dsd-e2e).
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ -z "${KUBECONFIG:-}" ]; then
  echo "e2e: skipped (set KUBECONFIG to run against a cluster)"
  exit 0
fi
KUBECTL="${KUBECTL:-$(command -v kubectl || echo .tools/bin/kubectl)}"
OPERATOR_BIN="${OPERATOR_BIN:-./target/debug/deepseek-operator}"
NS="${E2E_NAMESPACE:-dsd-e2e}"
k() { "$KUBECTL" -n "$NS" "$@"; }
fail() { echo "e2e: FAIL: $*" >&2; exit 1; }
wait_for() { # wait_for DESCRIPTION COMMAND...
  local what="$1"; shift
  for _ in $(seq 1 60); do "$@" >/dev/null 2>&1 && return 0; sleep 2; done
  fail "timed out waiting for $what"
}

"$KUBECTL" apply -f deploy/crd/deepseekdeployments.yaml
"$KUBECTL" wait --for condition=established --timeout=60s crd/deepseekdeployments.serving.deepseek-operator.io
"$KUBECTL" create namespace "$NS" --dry-run=client -o yaml | "$KUBECTL" apply -f -

"$OPERATOR_BIN" run --namespace "$NS" --metrics-listen 127.0.0.1:18080 --log-format text &
OPERATOR_PID=$!
trap 'kill $OPERATOR_PID 2>/dev/null; "$KUBECTL" delete namespace "$NS" --wait=false >/dev/null 2>&1 || true' EXIT

# Invalid: minReplicas above replicas is refused by the schema, naming the field.
invalid=$(sed -e 's/namespace: default/namespace: '"$NS"'/' -e 's/^      replicas: 1$/      replicas: 1\n      minReplicas: 2/' deploy/samples/tiny.yaml)
if out=$(echo "$invalid" | "$KUBECTL" apply -f - 2>&1); then fail "invalid CR was accepted"; fi
echo "$out" | grep -q "minReplicas" || fail "rejection does not name minReplicas: $out"

# Without its PVC the sample is blocked with a reason, and nothing is created.
sed 's/namespace: default/namespace: '"$NS"'/' deploy/samples/tiny.yaml | "$KUBECTL" apply -f -
wait_for "ModelVolumeMissing" sh -c "'$KUBECTL' -n '$NS' get dsd tiny -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].reason}' | grep -qx ModelVolumeMissing"
k get statefulset tiny-cpu-g0 >/dev/null 2>&1 && fail "objects created without the model volume"

cat <<YAML | k apply -f -
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: tiny-model}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
YAML
for object in statefulset/tiny-cpu-g0 service/tiny-cpu-g0 poddisruptionbudget/tiny-cpu-g0 \
  networkpolicy/tiny-cpu-g0 configmap/tiny-cpu-placement deployment/tiny-router service/tiny-router; do
  wait_for "$object" k get "$object"
  owner=$(k get "$object" -o jsonpath='{.metadata.ownerReferences[0].kind}')
  [ "$owner" = DeepSeekDeployment ] || fail "$object is not owned by the DeepSeekDeployment"
done
wait_for "status" sh -c "'$KUBECTL' -n '$NS' get dsd tiny -o jsonpath='{.status.poolSummary}' | grep -q 'cpu:0/1'"
[ "$(k get dsd tiny -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = False ] || fail "Ready without serving ranks"

k scale dsd tiny --replicas 2
wait_for "a second group" k get statefulset tiny-cpu-g1
k scale dsd tiny --replicas 1
wait_for "the second group to go" sh -c "! '$KUBECTL' -n '$NS' get statefulset tiny-cpu-g1"

k delete dsd tiny --wait=true
wait_for "garbage collection" sh -c "! '$KUBECTL' -n '$NS' get statefulset tiny-cpu-g0"
echo "e2e: passed"
