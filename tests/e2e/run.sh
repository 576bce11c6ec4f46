#!/usr/bin/env bash
# End-to-end test of the operator against a real control plane (tests/cluster/up.sh: API
# server, controller-manager, scheduler, kwok's fake H100 and A100 nodes). Fails when no
# cluster is reachable: start one with `eval "$(tests/cluster/up.sh)"`.
#
# The operator runs as a local process with a token of the chart's own ServiceAccount, so the
# chart's RBAC is what is exercised. Covered: helm install/upgrade/uninstall and
# `kubectl apply -k deploy/`; least privilege (`kubectl auth can-i`); `kubectl explain`,
# printer columns, the short name; specs refused by the API server naming the field; the tiny
# and the H100+A100 samples (owner references, placement on their pool's nodes, GPU requests,
# tolerations, honest status, a pool without nodes reported Unschedulable, spec.replicas
# spilling from a pool that cannot place another group, a pool whose GPUs
# cannot hold the model refused with its memory plan); `kubectl scale`
# and a HorizontalPodAutoscaler on the scale subresource; the built-in autoscaler stepping
# aside for an HPA, then writing through the scale subresource itself; a rollout watched end to end, with
# the operator killed in the middle; leader election hand-over; no writes when idle; restricted
# Pod Security admission; garbage collection; the operator's worker CA (`workerTls: {}`), and
# its refusal without Secret access; the chart's PodMonitors, ServiceMonitor and dashboard
# against the Prometheus Operator's own CRDs.
#
# Env: OPERATOR_BIN (default ./target/debug/deepseek-operator), HELM (default helm on PATH,
# else .tools/bin/helm), KUBECTL (default kubectl on PATH: the one up.sh built).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"
source tests/cluster/versions.sh
source tests/cluster/lib.sh

KUBECTL="${KUBECTL:-$(command -v kubectl)}"
HELM="${HELM:-$(command -v helm || echo "$repo/.tools/bin/helm")}"
OPERATOR_BIN="${OPERATOR_BIN:-$repo/target/debug/deepseek-operator}"
[ -n "$KUBECTL" ] || { echo "e2e: FAIL: no kubectl on PATH (tests/cluster/up.sh prints the PATH to export)" >&2; exit 1; }
[ -n "${KUBECONFIG:-}" ] || { echo "e2e: FAIL: KUBECONFIG is not set; start a cluster with: eval \"\$(tests/cluster/up.sh)\"" >&2; exit 1; }
"$KUBECTL" get --raw /readyz >/dev/null || { echo "e2e: FAIL: no API server at KUBECONFIG=$KUBECONFIG" >&2; exit 1; }

SYSTEM=dsd-system          # the Helm release's namespace
RELEASE=dsd
OPERATOR_SA="$RELEASE-deepseek-operator"
LEASE="$RELEASE-deepseek-operator"
NS=dsd-e2e                 # the tiny sample
FLAGSHIP=dsd-flagship      # the H100 + A100 sample
work="$(mktemp -d)"
# The operators' logs stay beside the cluster's own (tests/cluster/up.sh starts them afresh).
logs="$(dirname "$KUBECONFIG")/logs"
rm -f "$logs"/e2e-operator-*.log
export XDG_CACHE_HOME="$work/xdg" XDG_CONFIG_HOME="$work/xdg" XDG_DATA_HOME="$work/xdg"

kubectl() { "$KUBECTL" "$@"; }
helm() { "$HELM" "$@"; }
k() { kubectl -n "$NS" "$@"; }
say() { printf '\ne2e: --- %s\n' "$*"; }
fail() {
  echo "e2e: FAIL: $*" >&2
  for log in "$logs"/e2e-operator-*.log; do
    [ -e "$log" ] && { echo "--- last lines of $log" >&2; tail -n 30 "$log" >&2; }
  done
  exit 1
}
wait_for() { wait_until "$@" || fail "waiting for $2"; } # wait_for SECONDS DESCRIPTION COMMAND...
jsonpath() { kubectl "$@" 2>/dev/null || true; }
condition() { # condition NAMESPACE NAME TYPE -> "status reason"
  jsonpath -n "$1" get dsd "$2" -o jsonpath="{.status.conditions[?(@.type==\"$3\")].status} {.status.conditions[?(@.type==\"$3\")].reason}"
}
ready_is() { [ "$(condition "$1" "$2" Ready | cut -d' ' -f1)" = "$3" ]; }
absent() { ! kubectl "$@" >/dev/null 2>&1; }
summary_is() { [ "$(jsonpath -n "$1" get dsd "$2" -o jsonpath='{.status.poolSummary}')" = "$3" ]; }
# A sample moved to another namespace.
sample() { sed "s/^  namespace: .*/  namespace: $2/" "deploy/samples/$1.yaml"; }
restricted_namespace() {
  kubectl create namespace "$1" --dry-run=client -o yaml \
    | kubectl label --local -f - -o yaml pod-security.kubernetes.io/enforce=restricted \
      pod-security.kubernetes.io/enforce-version=latest \
    | kubectl apply -f - >/dev/null
}

# --- operators as local processes ----------------------------------------------------------
declare -A operator_pid=()
start_operator() { # start_operator IDENTITY: leader-elected, with the chart's ServiceAccount token
  KUBECONFIG="$work/operator.kubeconfig" RUST_LOG=info,deepseek_operator=debug \
    "$OPERATOR_BIN" run --leader-elect --lease-name "$LEASE" --lease-namespace "$SYSTEM" \
    --identity "$1" --metrics-listen "127.0.0.1:$(free_port)" --log-format text \
    >>"$logs/e2e-operator-$1.log" 2>&1 &
  operator_pid[$1]=$!
}
kill_operator() { # kill_operator IDENTITY [SIGNAL]
  kill "-${2:-TERM}" "${operator_pid[$1]}" 2>/dev/null || true
  wait "${operator_pid[$1]}" 2>/dev/null || true
  unset "operator_pid[$1]"
}
lease_is() { [ "$(jsonpath -n "$SYSTEM" get lease "$LEASE" -o jsonpath='{.spec.holderIdentity}')" = "$1" ]; }
cleanup() {
  for id in "${!operator_pid[@]}"; do kill_operator "$id" KILL; done
  kubectl delete namespace "$NS" "$FLAGSHIP" dsd-scoped --wait=false >/dev/null 2>&1 || true
  helm uninstall dsd-scoped -n dsd-scoped-system >/dev/null 2>&1 || true
  kubectl delete persistentvolume "$NS-tiny-model" --wait=false >/dev/null 2>&1 || true
  helm uninstall "$RELEASE" -n "$SYSTEM" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Writes to the API server by the operator's ServiceAccount since line N of the audit log,
# leader election's lease renewals apart.
audit_log="$logs/audit.log"
operator_writes_since() {
  audit_requests "$audit_log" "$1" "$SYSTEM" "$OPERATOR_SA" \
    | grep -E '^(create|update|patch|delete) ' | grep -v '^[a-z]* leases ' || true
}

# ============================================================================================
say "helm install (CRDs from the chart) into a restricted namespace"
restricted_namespace "$SYSTEM"
helm install "$RELEASE" charts/deepseek-operator -n "$SYSTEM" --wait --timeout 120s >/dev/null 2>"$work/helm.err" \
  || fail "helm install: $(cat "$work/helm.err")"
# The API server warns about what it does not understand in a CRD (an unknown format, say).
grep -i warning "$work/helm.err" && fail "the API server warned while the chart was installed"
kubectl wait --for condition=established --timeout=60s crd/deepseekdeployments.serving.deepseek-operator.io >/dev/null
# Helm's --wait accepts a Deployment with maxUnavailable pods missing; wait for all of them.
kubectl -n "$SYSTEM" rollout status deployment "$OPERATOR_SA" --timeout 120s >/dev/null \
  || fail "the chart's operator Deployment did not become available"

say "kubectl explain, printer columns, short name"
# (its text reflowed: explain wraps lines)
explained() { [[ "$(kubectl explain "$1" | tr -s ' \n' '  ')" == *"$2"* ]] || fail "kubectl explain $1 does not say \"$2\""; }
explained dsd.spec.pools.gpusPerPod "one expert-parallel rank per GPU"
explained deepseekdeployments.spec.replicas "HorizontalPodAutoscaler"
explained dsd.spec.autoscaling.scaleToZeroAfterSeconds "holds the next request"
explained dsd.status.autoscaling.scaledBy "steps aside"
explained dsd.status.conditions "lastTransitionTime"
kubectl api-resources --api-group serving.deepseek-operator.io | grep -qw dsd || fail "short name dsd missing"

say "the chart's RBAC: what the operator's ServiceAccount may and may not do"
as_operator=(--as "system:serviceaccount:$SYSTEM:$OPERATOR_SA")
expect_can() { kubectl auth can-i "${as_operator[@]}" "$@" >/dev/null 2>&1 || fail "the operator cannot $*"; }
expect_cannot() { ! kubectl auth can-i "${as_operator[@]}" "$@" >/dev/null 2>&1 || fail "the operator can $* (it should not)"; }
check_least_privilege() {
  expect_can watch deepseekdeployments.serving.deepseek-operator.io --all-namespaces
  expect_can patch deepseekdeployments.serving.deepseek-operator.io --subresource status -n "$NS"
  expect_can patch deepseekdeployments.serving.deepseek-operator.io --subresource scale -n "$NS"
  expect_can list horizontalpodautoscalers.autoscaling -n "$NS"
  expect_can patch statefulsets.apps -n "$NS"
  expect_can delete pods -n "$NS"
  expect_can get persistentvolumeclaims -n "$NS"
  expect_can create persistentvolumeclaims -n "$NS"
  expect_can create jobs.batch -n "$NS"
  expect_can get pods --subresource log -n "$NS"
  expect_can create events.events.k8s.io -n "$NS"
  expect_can update leases.coordination.k8s.io/"$LEASE" -n "$SYSTEM"
  # Secrets by name only, for the worker CA (workerCa.enabled, the default).
  expect_can get secrets -n "$NS"
  expect_can create secrets -n "$NS"
  expect_can update secrets -n "$NS"
  expect_cannot list secrets --all-namespaces
  expect_cannot watch secrets -n "$NS"
  expect_cannot patch secrets -n "$NS"
  expect_cannot delete secrets -n "$NS"
  expect_cannot create pods -n "$NS"
  expect_cannot delete deepseekdeployments.serving.deepseek-operator.io -n "$NS"
  expect_cannot patch deepseekdeployments.serving.deepseek-operator.io -n "$NS"
  expect_cannot patch persistentvolumeclaims -n "$NS"
  expect_cannot patch jobs.batch -n "$NS"
  expect_cannot patch nodes
  expect_cannot create clusterroles.rbac.authorization.k8s.io
  expect_cannot create clusterrolebindings.rbac.authorization.k8s.io
  expect_cannot update leases.coordination.k8s.io/other -n "$SYSTEM"
  expect_cannot create leases.coordination.k8s.io -n "$NS"
  expect_cannot create serviceaccounts --subresource token -n "$NS"
  expect_cannot '*' '*'
}
check_least_privilege

# The operator's own credentials: a token of the chart's ServiceAccount, not the admin's.
tests/cluster/token-kubeconfig.sh "$SYSTEM" "$OPERATOR_SA" "$work/operator.kubeconfig"
start_operator e2e-a
wait_for 60 "the operator to take the lease" lease_is e2e-a

# ============================================================================================
say "invalid specs are refused by the API server, naming the field"
restricted_namespace "$NS"
refused() { # refused FIELD: the manifest on stdin must be refused with a message naming FIELD
  local out
  if out=$(kubectl apply -f - 2>&1); then fail "accepted a spec with an invalid $1"; fi
  echo "$out" | grep -q -- "$1" || fail "the refusal does not name $1: $out"
}
tiny() { sample tiny "$NS"; }
tiny | sed 's/^      replicas: 1$/      replicas: 1\n      minReplicas: 2/' | refused minReplicas          # CEL
tiny | sed 's/^      gpusPerPod: 1$/      gpusPerPod: 0/' | refused gpusPerPod                             # schema minimum
tiny | sed 's/^      gpusPerPod: 1$/      gpusPerPod: 1\n      colour: blue/' | refused colour                 # unknown field
tiny | sed 's/^    source:$/    source:\n      huggingFace: {repo: a\/b}/' | refused "exactly one of huggingFace or pvc"
tiny | sed 's/^  pools:$/  parallelism: {expertParallelRanks: 3}\n  pools:\n    - {name: two, gpusPerPod: 2, replicas: 1}/' \
  | refused expertParallelRanks
tiny | sed 's/^  pools:$/  tracing: {otlpEndpoint: "collector:4317"}\n  pools:/' | refused otlpEndpoint   # schema pattern
kubectl get dsd -n "$NS" -o name | grep -q . && fail "a refused spec left an object behind"

# ============================================================================================
say "tiny sample: blocked without its model volume"
tiny | kubectl apply -f - >/dev/null
reason_is() { [ "$(condition "$1" "$2" "$3")" = "$4" ]; }
wait_for 60 "ModelVolumeMissing" reason_is "$NS" tiny Ready "False ModelVolumeMissing"
k get statefulset tiny-cpu-g0 >/dev/null 2>&1 && fail "objects created without the model volume"

say "tiny sample: every object owned, pods Ready under restricted Pod Security, Ready=True"
tests/cluster/static-claim.sh "$NS" tiny-model
owned_objects="statefulset/tiny-cpu-g0 service/tiny-cpu-g0 poddisruptionbudget/tiny-cpu-g0
  networkpolicy/tiny-cpu-g0 configmap/tiny-cpu-placement deployment/tiny-router service/tiny-router
  serviceaccount/tiny-router role/tiny-router rolebinding/tiny-router"
for object in $owned_objects; do
  wait_for 60 "$object" k get "$object"
  owner=$(k get "$object" -o jsonpath='{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}/{.metadata.ownerReferences[0].controller}')
  [ "$owner" = DeepSeekDeployment/tiny/true ] || fail "$object is not controlled by the DeepSeekDeployment ($owner)"
done
wait_for 90 "tiny to be Ready" ready_is "$NS" tiny True
summary_is "$NS" tiny "cpu:1/1" || fail "pool summary: $(k get dsd tiny -o jsonpath='{.status.poolSummary}')"
[ "$(k get pod tiny-cpu-g0-0 -o jsonpath='{.status.phase}/{.spec.nodeName}')" != "Running/" ] || fail "worker pod not placed"
# kwok removes a deleted pod at a random moment within its grace period, as a kubelet does when
# the worker exits somewhere in its drain; every wait for a pod to go or be replaced allows it.
grace=$(k get pod tiny-cpu-g0-0 -o jsonpath='{.spec.terminationGracePeriodSeconds}')
pod_gone_s=$((grace + 30))
pod_replaced_s=$((pod_gone_s + 30)) # gone, then scheduled, started and Ready
k get events --field-selector reason=FailedCreate -o jsonpath='{.items[*].message}' | grep -q PodSecurity \
  && fail "restricted Pod Security refused a pod the operator made"
k get events --field-selector involvedObject.kind=DeepSeekDeployment,involvedObject.name=tiny -o jsonpath='{.items[*].reason}' | grep -q . \
  || fail "no Events on the DeepSeekDeployment"
columns=$(k get dsd | head -1)
[ "$(echo $columns)" = "NAME READY POOLS REPLICAS ENDPOINT AGE" ] || fail "printer columns: $columns"
[ "$(k get dsd tiny --no-headers | awk '{print $2, $3, $4}')" = "True cpu:1/1 1" ] || fail "printed row: $(k get dsd tiny)"

say "no writes while nothing changes"
sleep 5 # the last status changes of the rollout-free start settle (the router's, say)
audit_mark=$(audit_mark "$audit_log")
sleep 20
writes=$(operator_writes_since "$audit_mark")
[ -z "$writes" ] || fail "the operator wrote while idle: $writes"

say "kubectl scale and a HorizontalPodAutoscaler on the scale subresource"
k scale dsd tiny --replicas 3
groups_ready() { [ "$(jsonpath -n "$1" get dsd "$2" -o jsonpath='{.status.readyReplicas}/{.status.replicas}')" = "$3/$3" ]; }
wait_for 90 "three ready groups" groups_ready "$NS" tiny 3
scale=$(k get --raw "/apis/serving.deepseek-operator.io/v1alpha1/namespaces/$NS/deepseekdeployments/tiny/scale")
echo "$scale" | grep -q '"selector":"app.kubernetes.io/' || fail "the scale subresource has no selector: $scale"
echo "$scale" | grep -q '"replicas":3' || fail "the scale subresource does not report 3 replicas: $scale"
k apply -f - >/dev/null <<YAML
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: tiny}
spec:
  scaleTargetRef: {apiVersion: serving.deepseek-operator.io/v1alpha1, kind: DeepSeekDeployment, name: tiny}
  minReplicas: 3
  maxReplicas: 4
  metrics:
    - type: Resource
      resource: {name: cpu, target: {type: Utilization, averageUtilization: 80}}
YAML
# No metrics server runs here, so the HPA cannot compute a utilisation; what matters is that it
# read the scale subresource (AbleToScale) and got as far as asking for the selected pods'
# metrics, which needs the selector.
hpa_read_scale() {
  local got
  got=$(k get hpa tiny -o jsonpath='{.status.conditions[?(@.type=="AbleToScale")].reason}/{.status.conditions[?(@.type=="ScalingActive")].reason}')
  [ "$got" = "SucceededGetScale/FailedGetResourceMetric" ]
}
wait_for 90 "the HorizontalPodAutoscaler to read the scale subresource" hpa_read_scale

say "the built-in autoscaler: it steps aside for the HPA, then owns the scale subresource"
audit_mark=$(audit_mark "$audit_log")
k patch dsd tiny --type json -p '[{"op": "add", "path": "/spec/pools/0/maxReplicas", "value": 3},
  {"op": "add", "path": "/spec/autoscaling", "value": {"targetRequestsPerGroup": 4}}]' >/dev/null
scaled_by_is() { [ "$(k get dsd tiny -o jsonpath='{.status.autoscaling.scaledBy}')" = "$1" ]; }
wait_for 30 "status.autoscaling to name the HPA" scaled_by_is HorizontalPodAutoscaler/tiny
k get events --field-selector involvedObject.name=tiny,reason=AutoscalerStepsAside -o name | grep -q . \
  || fail "no AutoscalerStepsAside Event"
k scale dsd tiny --replicas 4 # within the HPA's bounds, above the pool's maximum
sleep $((2 * 2 + 1)) # two of the autoscaler's samples
operator_writes_since "$audit_mark" | grep -q ' deepseekdeployments/scale ' \
  && fail "the built-in autoscaler wrote the scale subresource while an HPA targets the deployment"
k delete hpa tiny >/dev/null
# Its own now: it brings spec.replicas back within the pools' bounds, through the scale
# subresource. (The load it reads from the routers' /metrics cannot be had here: simulated
# pods serve nothing. run-local drives that part with real load.)
replicas_is() { [ "$(k get dsd tiny -o jsonpath='{.spec.replicas}')" = "$1" ]; }
wait_for 30 "the autoscaler to bring spec.replicas back to 3" replicas_is 3
wait_for 10 "status.autoscaling to say the operator scales" scaled_by_is operator
operator_writes_since "$audit_mark" | grep -q '^patch deepseekdeployments/scale tiny' \
  || fail "the autoscaler did not write through the scale subresource: $(operator_writes_since "$audit_mark")"
k get events --field-selector involvedObject.name=tiny,reason=Scaled -o jsonpath='{.items[*].message}' \
  | grep -q "4 → 3 groups: kept within the pools' 1..3 groups" || fail "no Scaled Event with its reason"
k patch dsd tiny --type json -p '[{"op": "remove", "path": "/spec/autoscaling"}]' >/dev/null
wait_for 30 "status.autoscaling to go with spec.autoscaling" scaled_by_is ""

say "a rollout watched from start to end, the operator killed in the middle"
revisions() { jsonpath -n "$NS" get pods -l serving.deepseek-operator.io/pool=cpu \
  -o jsonpath='{range .items[*]}{.metadata.labels.serving\.deepseek-operator\.io/revision}{"\n"}{end}' | sort -u; }
old_revision=$(revisions)
[ "$(echo "$old_revision" | wc -l)" = 1 ] || fail "pods on several revisions before the rollout: $old_revision"
mkfifo "$work/pods.watch"
"$KUBECTL" -n "$NS" get pods -l serving.deepseek-operator.io/pool=cpu --watch --output-watch-events \
  -o json >"$work/pods.watch" 2>/dev/null &
kubectl_watch_pid=$!
python3 tests/e2e/watch_rollout.py 3 1 <"$work/pods.watch" >"$work/rollout.out" 2>&1 &
watch_pid=$!
wait_for 30 "the rollout watch's baseline" grep -q baseline "$work/rollout.out"
k patch dsd tiny --type merge -p '{"spec":{"worker":{"image":"registry.example/deepseek-worker:e2e-2"}}}' >/dev/null
rollout_begun() { revisions | grep -vqx "$old_revision"; }
wait_for "$pod_replaced_s" "the first group on the new revision" rollout_begun
kill_operator e2e-a KILL
revisions | grep -qx "$old_revision" \
  || fail "the rollout finished before the operator could be killed in its middle"
echo "e2e: operator killed with groups on revisions: $(revisions | tr '\n' ' ')"
start_operator e2e-a
rollout_done() { ! kill -0 "$watch_pid" 2>/dev/null; }
wait_for $((3 * pod_replaced_s)) "the rollout to finish" rollout_done
wait "$watch_pid" || fail "$(cat "$work/rollout.out")"
cat "$work/rollout.out"
kill "$kubectl_watch_pid" 2>/dev/null || true
wait_for 60 "Ready on the new revision" ready_is "$NS" tiny True
[ "$(k get dsd tiny -o jsonpath='{.status.observedGeneration}')" = "$(k get dsd tiny -o jsonpath='{.metadata.generation}')" ] \
  || fail "Ready before the new generation was observed"
[ "$(revisions | wc -l)" = 1 ] && [ "$(revisions)" != "$old_revision" ] \
  || fail "pods left on the old revision: $(revisions)"

say "two operators: one leader; the other takes over when it dies"
start_operator e2e-b
sleep 3
lease_is e2e-a || fail "the lease moved to a standby"
grep -q "waiting for the leader lease" "$logs/e2e-operator-e2e-b.log" || fail "the standby does not say it waits"
kill_operator e2e-a KILL
wait_for 60 "the standby to take the lease" lease_is e2e-b
k scale dsd tiny --replicas 1
wait_for "$pod_gone_s" "the new leader to scale down" groups_ready "$NS" tiny 1
k get statefulset tiny-cpu-g1 >/dev/null 2>&1 && fail "the second group is still there after scaling to 1"

say "workerTls: {}: a CA the operator keeps, one certificate for router and workers, collected with the deployment"
tiny | sed 's/^  name: tiny$/  name: tiny-ca/; s/^  router:$/  workerTls: {}\n  router:/' | kubectl apply -f - >/dev/null
wait_for 60 "the workers' TLS Secret" k get secret tiny-ca-worker-tls
for secret in tiny-ca-worker-ca tiny-ca-worker-tls; do
  owner=$(k get secret "$secret" -o jsonpath='{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}/{.metadata.ownerReferences[0].controller}')
  [ "$owner" = DeepSeekDeployment/tiny-ca/true ] || fail "Secret $secret is not controlled by the DeepSeekDeployment ($owner)"
done
[ "$(k get secret tiny-ca-worker-tls -o jsonpath='{.type}')" = kubernetes.io/tls ] || fail "the pods' Secret is not kubernetes.io/tls"
entries=$(k get secret tiny-ca-worker-tls -o go-template='{{range $k, $v := .data}}{{$k}} {{end}}')
[ "$entries" = "ca.crt tls.crt tls.key " ] || fail "the pods' Secret holds $entries (the CA's key must not be there)"
k get secret tiny-ca-worker-tls -o jsonpath='{.data.ca\.crt}' | base64 -d >"$work/ca.crt"
k get secret tiny-ca-worker-tls -o jsonpath='{.data.tls\.crt}' | base64 -d >"$work/tls.crt"
openssl verify -CAfile "$work/ca.crt" "$work/tls.crt" >/dev/null || fail "the CA did not sign the certificate"
openssl x509 -in "$work/tls.crt" -noout -ext extendedKeyUsage | grep -q "TLS Web Client Authentication" \
  || fail "the certificate is not for client auth"
wait_for 90 "tiny-ca to be Ready" ready_is "$NS" tiny-ca True
for object in statefulset/tiny-ca-cpu-g0 deployment/tiny-ca-router; do
  mounted=$(k get "$object" -o jsonpath='{.spec.template.spec.volumes[?(@.name=="worker-tls")].secret.secretName}')
  [ "$mounted" = tiny-ca-worker-tls ] || fail "$object mounts $mounted"
done
versions=$(k get secret tiny-ca-worker-ca tiny-ca-worker-tls -o jsonpath='{.items[*].metadata.resourceVersion}')
k annotate dsd tiny-ca e2e.deepseek-operator.io/poke=1 >/dev/null # another reconcile
sleep 5
[ "$(k get secret tiny-ca-worker-ca tiny-ca-worker-tls -o jsonpath='{.items[*].metadata.resourceVersion}')" = "$versions" ] \
  || fail "a reconcile with nothing due rewrote the CA's Secrets"
k delete dsd tiny-ca --wait=true >/dev/null
for secret in tiny-ca-worker-ca tiny-ca-worker-tls; do wait_for 60 "Secret $secret to be collected" absent -n "$NS" get secret "$secret"; done

say "deletion: garbage collection removes everything"
k delete dsd tiny --wait=true >/dev/null
no_pods() { [ -z "$(jsonpath -n "$1" get pods -o name)" ]; }
for object in $owned_objects; do wait_for 60 "$object to be collected" absent -n "$NS" get "$object"; done
wait_for "$pod_gone_s" "the worker pods to go" no_pods "$NS"

# ============================================================================================
# This cluster has no storage provisioner: a model cache claim gets a PersistentVolume made
# for it, as a provisioner would (kwok's nodes mount nothing, so the hostPath is never used).
bind_volume() { # bind_volume NAMESPACE CLAIM
  kubectl delete pv "$1-$2" --ignore-not-found >/dev/null
  kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: $1-$2}
spec:
  capacity: {storage: 1Ti}
  accessModes: [ReadWriteMany]
  storageClassName: ""
  hostPath: {path: /var/lib/$1/$2}
  claimRef: {namespace: $1, name: $2}
YAML
}
model_cache() { jsonpath -n "$1" get dsd "$2" -o jsonpath='{.status.model.claimName}'; }
model_cache_is_not() { local claim; claim=$(model_cache "$1" "$2"); [ -n "$claim" ] && [ "$claim" != "$3" ]; }
bind_model_cache() { # bind_model_cache NAMESPACE DEPLOYMENT
  wait_for 60 "$2's model cache claim" model_cache_is_not "$1" "$2" ""
  bind_volume "$1" "$(model_cache "$1" "$2")"
}
model_says() { # model_says NAMESPACE DEPLOYMENT TEXT: ModelReady's message contains TEXT
  jsonpath -n "$1" get dsd "$2" -o jsonpath='{.status.conditions[?(@.type=="ModelReady")].message}' | grep -q -- "$3"
}
claims_mounted() { # the claims the groups' model volumes name, sorted and unique
  jsonpath -n "$1" get statefulsets -l app.kubernetes.io/component=worker \
    -o jsonpath='{range .items[*]}{.spec.template.spec.volumes[?(@.name=="model")].persistentVolumeClaim.claimName}{"\n"}{end}' | sort -u
}

say "H100 + A100 sample: the model downloads once, into a cache claim, before any group starts"
restricted_namespace "$FLAGSHIP"
sample deepseek-v3-h100-a100 "$FLAGSHIP" | kubectl apply -f - >/dev/null
wait_for 60 "ModelReady: Downloading" reason_is "$FLAGSHIP" deepseek-v3 ModelReady "False Downloading"
cache=$(model_cache "$FLAGSHIP" deepseek-v3)
kubectl -n "$FLAGSHIP" get "job/$cache" "pvc/$cache" >/dev/null || fail "no download Job and claim $cache"
# Without a volume the download's pod is not scheduled, and the status says why.
wait_for 60 "the download to wait for its claim" model_says "$FLAGSHIP" deepseek-v3 "unbound immediate PersistentVolumeClaims"
reason_is "$FLAGSHIP" deepseek-v3 Ready "False Downloading" || fail "Ready: $(condition "$FLAGSHIP" deepseek-v3 Ready)"
[ -z "$(jsonpath -n "$FLAGSHIP" get statefulsets -o name)" ] || fail "groups created before the model was downloaded"
bind_volume "$FLAGSHIP" "$cache"
wait_for 60 "ModelReady: Downloaded" reason_is "$FLAGSHIP" deepseek-v3 ModelReady "True Downloaded"

say "H100 + A100 sample: pods only on their pool's nodes, with their GPUs and tolerations"
wait_for 120 "deepseek-v3 to be Ready" ready_is "$FLAGSHIP" deepseek-v3 True
[ "$(claims_mounted "$FLAGSHIP")" = "$cache" ] || fail "the groups mount $(claims_mounted "$FLAGSHIP"), not $cache"
summary_is "$FLAGSHIP" deepseek-v3 "h100:2/2 a100:1/1" \
  || fail "pool summary: $(kubectl -n "$FLAGSHIP" get dsd deepseek-v3 -o jsonpath='{.status.poolSummary}')"
placements=$(kubectl -n "$FLAGSHIP" get pods -l app.kubernetes.io/component=worker -o jsonpath='{range .items[*]}{.metadata.name} {.metadata.labels.serving\.deepseek-operator\.io/pool} {.spec.nodeName} {.spec.containers[0].resources.requests.nvidia\.com/gpu}{"\n"}{end}')
[ "$(echo "$placements" | wc -l)" = 16 ] || fail "expected 16 worker pods (2×4 H100, 1×8 A100): $placements"
while read -r pod pool node gpus; do
  product=$(kubectl get node "$node" -o jsonpath='{.metadata.labels.nvidia\.com/gpu\.product}')
  case "$pool/$product/$gpus" in
    h100/NVIDIA-H100-80GB-HBM3/8 | a100/NVIDIA-A100-SXM4-80GB/8) ;;
    *) fail "$pod of pool $pool runs on $node ($product) asking for $gpus GPUs" ;;
  esac
done <<<"$placements"
kubectl -n "$FLAGSHIP" get events --field-selector reason=FailedCreate -o jsonpath='{.items[*].message}' \
  | grep -q PodSecurity && fail "restricted Pod Security refused a pod of the H100+A100 sample"

say "a new revision downloads beside the old; the groups move once it is there; the old cache goes"
kubectl -n "$FLAGSHIP" patch dsd deepseek-v3 --type merge \
  -p '{"spec":{"model":{"source":{"huggingFace":{"revision":"v3.1"}}}}}' >/dev/null
wait_for 60 "the new revision's cache claim" model_cache_is_not "$FLAGSHIP" deepseek-v3 "$cache"
next_cache=$(model_cache "$FLAGSHIP" deepseek-v3)
wait_for 60 "the new revision to download" model_says "$FLAGSHIP" deepseek-v3 "unbound immediate PersistentVolumeClaims"
ready_is "$FLAGSHIP" deepseek-v3 True || fail "the groups stopped serving while the new revision downloads"
[ "$(claims_mounted "$FLAGSHIP")" = "$cache" ] || fail "the groups left $cache before $next_cache was there"
bind_volume "$FLAGSHIP" "$next_cache"
wait_for 60 "ModelReady: Downloaded" reason_is "$FLAGSHIP" deepseek-v3 ModelReady "True Downloaded"
mounts_only() { [ "$(claims_mounted "$1")" = "$2" ]; }
wait_for 30 "the groups to mount $next_cache" mounts_only "$FLAGSHIP" "$next_cache"
wait_for 240 "the rollout to the new revision" reason_is "$FLAGSHIP" deepseek-v3 Progressing "False Complete"
wait_for 120 "the old cache claim to go" absent -n "$FLAGSHIP" get pvc "$cache"
absent -n "$FLAGSHIP" get job "$cache" || fail "the old revision's download Job is still there"
ready_is "$FLAGSHIP" deepseek-v3 True || fail "not Ready after the rollout: $(condition "$FLAGSHIP" deepseek-v3 Ready)"
kubectl -n "$FLAGSHIP" delete dsd deepseek-v3 --wait=true >/dev/null
wait_for "$pod_gone_s" "the H100+A100 pods to go" no_pods "$FLAGSHIP"

say "a pool its GPUs cannot hold is refused with the memory plan's numbers, creating nothing"
# DeepSeek-V3 in groups of 16 H100s: the experts leave no room for a KV cache.
sample deepseek-v3-h100-a100 "$FLAGSHIP" | sed 's/podsPerGroup: 4$/podsPerGroup: 2/' | kubectl apply -f - >/dev/null
wait_for 60 "InsufficientGpuMemory" reason_is "$FLAGSHIP" deepseek-v3 Ready "False InsufficientGpuMemory"
message=$(kubectl -n "$FLAGSHIP" get dsd deepseek-v3 -o jsonpath='{.status.conditions[?(@.type=="Ready")].message}')
case "$message" in
  *"spec.pools[h100]: the model does not fit a rank's NVIDIA-H100-80GB-HBM3"*"KV cache 0 tokens"*) ;;
  *) fail "the refusal does not give the plan: $message" ;;
esac
[ -z "$(jsonpath -n "$FLAGSHIP" get statefulsets,jobs,pvc -o name)" ] || fail "objects created for a pool that does not fit"
kubectl -n "$FLAGSHIP" get events --field-selector reason=InsufficientGpuMemory -o name | grep -q . \
  || fail "no InsufficientGpuMemory Event"
kubectl -n "$FLAGSHIP" delete dsd deepseek-v3 --wait=true >/dev/null

say "a pool with no nodes it may use is reported Unschedulable while the other serves"
# Without the A100 pool's tolerations its pods fit no node: the A100s are tainted.
sample deepseek-v3-h100-a100 "$FLAGSHIP" \
  | python3 -c 'import sys; text = sys.stdin.read(); start = text.index("      tolerations:"); end = text.index("  router:"); print(text[:start] + text[end:], end="")' \
  | kubectl apply -f - >/dev/null
bind_model_cache "$FLAGSHIP" deepseek-v3
wait_for 120 "Degraded: Unschedulable" reason_is "$FLAGSHIP" deepseek-v3 Degraded "True Unschedulable"
wait_for 60 "the H100 pool to serve" summary_is "$FLAGSHIP" deepseek-v3 "h100:2/2 a100:0/1"
ready_is "$FLAGSHIP" deepseek-v3 False || fail "Ready with a pool unschedulable"
kubectl -n "$FLAGSHIP" delete dsd deepseek-v3 --wait=true >/dev/null

say "spec.replicas spills from a pool that cannot place another group to the next pool"
# The eight H100 nodes hold two groups of four pods; the third group waits for a node, and
# after spillAfterSeconds the H100 pool counts as full at two and the A100 pool takes it.
# (The last sample's pods must be gone first: terminating, they still hold their nodes.)
wait_for "$pod_gone_s" "the last sample's pods to go" no_pods "$FLAGSHIP"
sample deepseek-v3-h100-a100 "$FLAGSHIP" \
  | sed 's/^  parallelism:/  replicas: 3\n  spillAfterSeconds: 10\n  parallelism:/' \
  | kubectl apply -f - >/dev/null
bind_model_cache "$FLAGSHIP" deepseek-v3
wait_for 150 "the third group to go to the A100 pool" summary_is "$FLAGSHIP" deepseek-v3 "h100:2/2 a100:1/1"
[ "$(kubectl -n "$FLAGSHIP" get dsd deepseek-v3 -o jsonpath='{.status.pools[0].fullAt}')" = 2 ] \
  || fail "status.pools[h100].fullAt: $(kubectl -n "$FLAGSHIP" get dsd deepseek-v3 -o jsonpath='{.status.pools}')"
wait_for 60 "Ready with the spilled group" ready_is "$FLAGSHIP" deepseek-v3 True
absent -n "$FLAGSHIP" get statefulset deepseek-v3-h100-g2 || fail "the H100 group that found no nodes is still there"
kubectl -n "$FLAGSHIP" delete dsd deepseek-v3 --wait=true >/dev/null
wait_for "$pod_gone_s" "the spill-over sample's pods to go" no_pods "$FLAGSHIP"

# ============================================================================================
say "namespace-scoped install without Secret access: the chart's rules bound in one namespace, an operator that serves only it"
SCOPED=dsd-scoped SCOPED_SYSTEM=dsd-scoped-system
restricted_namespace "$SCOPED_SYSTEM"
restricted_namespace "$SCOPED"
helm install dsd-scoped charts/deepseek-operator -n "$SCOPED_SYSTEM" --set watchNamespace="$SCOPED" \
  --set workerCa.enabled=false --set leaderElection.enabled=false --set replicaCount=1 --wait --timeout 120s >/dev/null 2>"$work/helm.err" \
  || fail "helm install with watchNamespace: $(cat "$work/helm.err")"
scoped_sa=$(kubectl -n "$SCOPED_SYSTEM" get deployment -o jsonpath='{.items[0].spec.template.spec.serviceAccountName}')
as_scoped=(--as "system:serviceaccount:$SCOPED_SYSTEM:$scoped_sa")
kubectl auth can-i "${as_scoped[@]}" patch statefulsets.apps -n "$SCOPED" >/dev/null \
  || fail "the scoped operator cannot manage its namespace"
for denied in "patch statefulsets.apps -n $NS" "watch deepseekdeployments.serving.deepseek-operator.io --all-namespaces" \
  "create jobs.batch -n $NS" "get secrets -n $SCOPED"; do
  # shellcheck disable=SC2086
  ! kubectl auth can-i "${as_scoped[@]}" $denied >/dev/null 2>&1 || fail "the scoped operator can $denied"
done
tests/cluster/token-kubeconfig.sh "$SCOPED_SYSTEM" "$scoped_sa" "$work/scoped.kubeconfig"
KUBECONFIG="$work/scoped.kubeconfig" RUST_LOG=info,deepseek_operator=debug \
  "$OPERATOR_BIN" run --namespace "$SCOPED" --metrics-listen "127.0.0.1:$(free_port)" --log-format text \
  >>"$logs/e2e-operator-scoped.log" 2>&1 &
operator_pid[scoped]=$!
# With TLS to the router and between router and workers: the Secrets are mounted, never read.
tests/cluster/static-claim.sh "$SCOPED" tiny-model
sample tiny "$SCOPED" \
  | sed 's/^  router:$/  workerTls: {secretName: tiny-mtls}\n  router:\n    tls: {secretName: tiny-router-cert}/' \
  | kubectl apply -f - >/dev/null
wait_for 90 "tiny to be Ready in the watched namespace" ready_is "$SCOPED" tiny True
volumes=$(kubectl -n "$SCOPED" get deployment tiny-router -o jsonpath='{.spec.template.spec.volumes[*].secret.secretName}')
[ "$volumes" = "tiny-router-cert tiny-mtls" ] || fail "the router mounts the Secrets $volumes"
probe=$(kubectl -n "$SCOPED" get statefulset tiny-cpu-g0 -o jsonpath='{.spec.template.spec.containers[0].readinessProbe.grpc.port}')
[ "$probe" = 50052 ] || fail "with workerTls the workers' probes ask port $probe"
[ "$(condition "$SCOPED" tiny Ready)" = "True AllGroupsReady" ] || fail "$(condition "$SCOPED" tiny Ready)"
# workerCa.enabled=false: a deployment that wants the operator's CA is refused, saying why.
sample tiny "$SCOPED" | sed 's/^  name: tiny$/  name: tiny-ca/; s/^  router:$/  workerTls: {}\n  router:/' \
  | kubectl apply -f - >/dev/null
wait_for 60 "WorkerCaForbidden" reason_is "$SCOPED" tiny-ca Ready "False WorkerCaForbidden"
kill_operator scoped
kubectl delete namespace "$SCOPED" --wait=false >/dev/null
kubectl delete persistentvolume "$SCOPED-tiny-model" --wait=false >/dev/null
helm uninstall dsd-scoped -n "$SCOPED_SYSTEM" --wait >/dev/null

# ============================================================================================
say "the Prometheus Operator's CRDs installed: helm upgrade adds the PodMonitors (auto), the ServiceMonitor and the dashboard, as those CRDs accept them"
kill_operator e2e-b
# The CRDs from the Prometheus Operator's own Go module, at a pinned version.
prometheus_operator=$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])') \
  || fail "could not fetch the Prometheus Operator $PROMETHEUS_OPERATOR_VERSION module"
for kind in podmonitors servicemonitors; do
  kubectl apply --server-side -f "$prometheus_operator/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" >/dev/null
  kubectl wait --for condition=Established "crd/$kind.monitoring.coreos.com" --timeout 60s >/dev/null
done
helm upgrade "$RELEASE" charts/deepseek-operator -n "$SYSTEM" --set logLevel=debug \
  --set metrics.serviceMonitor.enabled=true --set metrics.dashboard.enabled=true --wait --timeout 120s >/dev/null
[ "$(kubectl -n "$SYSTEM" get podmonitors -o name | sort | tr '\n' ' ')" \
  = "podmonitor.monitoring.coreos.com/$OPERATOR_SA-routers podmonitor.monitoring.coreos.com/$OPERATOR_SA-workers " ] \
  || fail "PodMonitors after the upgrade: $(kubectl -n "$SYSTEM" get podmonitors -o name)"
relabelled=$(kubectl -n "$SYSTEM" get podmonitor "$OPERATOR_SA-workers" -o jsonpath='{.spec.podMetricsEndpoints[0].relabelings[*].targetLabel}')
[ "$relabelled" = "component deployment gpu_product pool" ] || fail "the PodMonitor relabels to $relabelled"
kubectl -n "$SYSTEM" get servicemonitor "$OPERATOR_SA" >/dev/null || fail "no ServiceMonitor for the operator"
kubectl -n "$SYSTEM" get configmap "$OPERATOR_SA-dashboard" -o jsonpath='{.data.deepseek-serving\.json}' \
  | python3 -c 'import json, sys; assert json.load(sys.stdin)["panels"]' || fail "the dashboard ConfigMap"
[ "$(kubectl -n "$SYSTEM" get deployment "$OPERATOR_SA" -o jsonpath='{.spec.template.spec.containers[0].env[?(@.name=="RUST_LOG")].value}')" = debug ] \
  || fail "helm upgrade did not change the operator Deployment"

say "helm uninstall"
helm uninstall "$RELEASE" -n "$SYSTEM" --wait >/dev/null
wait_for 60 "the release's objects to go" absent -n "$SYSTEM" get deployment "$OPERATOR_SA"
absent get clusterrole "$OPERATOR_SA" || fail "helm uninstall left the ClusterRole"
# Helm never deletes a chart's CRDs (that would delete every DeepSeekDeployment).
kubectl get crd deepseekdeployments.serving.deepseek-operator.io >/dev/null || fail "helm uninstall removed the CRD"

say "kubectl apply -k deploy/"
kubectl apply -k deploy/ >/dev/null
kubectl -n deepseek-system rollout status deployment/deepseek-operator --timeout 120s >/dev/null \
  || fail "deploy/'s operator Deployment did not become available"
SYSTEM=deepseek-system OPERATOR_SA=deepseek-operator LEASE=deepseek-operator
as_operator=(--as "system:serviceaccount:$SYSTEM:$OPERATOR_SA")
check_least_privilege
kubectl delete -k deploy/ --wait=true >/dev/null
absent get crd deepseekdeployments.serving.deepseek-operator.io || fail "kubectl delete -k deploy/ left the CRD"

echo
echo "e2e: passed"
