#!/usr/bin/env bash
# The operator at scale, on the local control plane (tests/cluster/up.sh): N DeepSeekDeployments
# of one single-rank group (and one router pod) each, created at once. Measures the time until
# all are Ready, the operator's CPU time and peak RSS, the API requests it made per
# reconciliation (from the API server's audit log), then one idle minute in which it must
# write nothing. The peer, measured over the same interval: kube-controller-manager's CPU
# time for the StatefulSets, ReplicaSets and pods behind them.
#
# Usage: eval "$(tests/cluster/up.sh)"; bench/operator/run.sh [N (default 200)] [IDLE_SECONDS (default 60)]
# Env: OPERATOR_BIN (default ./target/release/deepseek-operator, else the debug build).
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/cluster/lib.sh
N="${1:-200}"
IDLE="${2:-60}"
[ -n "${KUBECONFIG:-}" ] || { echo "bench: start a cluster first: eval \"\$(tests/cluster/up.sh)\"" >&2; exit 1; }
OPERATOR_BIN="${OPERATOR_BIN:-$( [ -x target/release/deepseek-operator ] && echo target/release/deepseek-operator || echo target/debug/deepseek-operator)}"
HELM="${HELM:-$(command -v helm || echo .tools/bin/helm)}"
cluster="$(dirname "$KUBECONFIG")"
audit_log="$cluster/logs/audit.log"
SYSTEM=dsd-bench-system NS=dsd-bench RELEASE=bench
SA="$RELEASE-deepseek-operator"
work="$(mktemp -d)"
export XDG_CACHE_HOME="$work" XDG_CONFIG_HOME="$work" XDG_DATA_HOME="$work"
log() { echo "bench: $*" >&2; }

operator_pid=""
cleanup() {
  [ -n "$operator_pid" ] && kill "$operator_pid" 2>/dev/null
  kubectl delete namespace "$NS" --wait=false >/dev/null 2>&1
  kubectl delete pv "$NS-tiny-model" --wait=false >/dev/null 2>&1
  "$HELM" uninstall "$RELEASE" -n "$SYSTEM" >/dev/null 2>&1
  kubectl delete namespace "$SYSTEM" --wait=false >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

# CPU seconds (user + system) of a process, and its peak resident set in MiB.
cpu_seconds() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }
peak_rss_mib() { awk '/VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
kcm_pid=$(awk '$1 == "kube-controller-manager" { print $2 }' "$cluster/pids")
reconciliations() {
  curl -sf "http://127.0.0.1:$metrics_port/metrics" | awk '/^deepseek_operator_reconciliations_total/ { print $2 }'
}
# The operator's API requests since audit-log line $1, counted by verb as JSON (leases apart:
# that is the leader election's renewal, not reconciliation).
requests_since() {
  audit_requests "$audit_log" "$1" "$SYSTEM" "$SA" | python3 -c '
import collections, json, sys
verbs = collections.Counter()
for verb, *resource in map(str.split, sys.stdin):
    verbs[("lease-" if resource[:1] == ["leases"] else "") + verb] += 1
print(json.dumps(dict(sorted(verbs.items()))))'
}
machine() { # the CPU by name and the vector extensions that tell machines apart, and the cores
  local flags
  flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'avx2|avx512f|avx512_bf16|amx_tile' | tr '\n' ' ')
  echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) (${flags% }), $(nproc) cores"
}

log "installing the chart and starting the operator with its ServiceAccount's token"
kubectl create namespace "$SYSTEM" >/dev/null
"$HELM" install "$RELEASE" charts/deepseek-operator -n "$SYSTEM" --set replicaCount=1 >/dev/null
tests/cluster/token-kubeconfig.sh "$SYSTEM" "$SA" "$work/operator.kubeconfig"
kubectl create namespace "$NS" >/dev/null
tests/cluster/static-claim.sh "$NS" tiny-model
metrics_port=$(free_port)
KUBECONFIG="$work/operator.kubeconfig" RUST_LOG=warn "$OPERATOR_BIN" run --leader-elect \
  --lease-name "$SA" --lease-namespace "$SYSTEM" --identity bench \
  --metrics-listen "127.0.0.1:$metrics_port" --log-format text >"$work/operator.log" 2>&1 &
operator_pid=$!
leading() { [ "$(kubectl -n "$SYSTEM" get lease "$SA" -o jsonpath='{.spec.holderIdentity}')" = bench ]; }
wait_until 60 "the operator to take the lease" leading

for i in $(seq 1 "$N"); do
  sed -e "s/^  name: tiny$/  name: bench-$i/" -e "s/^  namespace: .*/  namespace: $NS/" deploy/samples/tiny.yaml
  echo "---"
done >"$work/deployments.yaml"

log "creating $N DeepSeekDeployments"
mark=$(audit_mark "$audit_log")
operator_cpu0=$(cpu_seconds "$operator_pid"); kcm_cpu0=$(cpu_seconds "$kcm_pid")
reconciles0=$(reconciliations)
start=$(date +%s.%N)
kubectl apply -f "$work/deployments.yaml" >/dev/null
ready_count() {
  kubectl -n "$NS" get dsd -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True
}
all_ready() { [ "$(ready_count)" = "$N" ]; }
wait_until 1200 "all $N to be Ready" all_ready
elapsed=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
operator_cpu=$(python3 -c "print(f'{$(cpu_seconds "$operator_pid") - $operator_cpu0:.2f}')")
kcm_cpu=$(python3 -c "print(f'{$(cpu_seconds "$kcm_pid") - $kcm_cpu0:.2f}')")
reconciles=$(python3 -c "print(int($(reconciliations) - $reconciles0))")
sleep 2 # let the audit log catch up with the last responses
requests=$(requests_since "$mark")
log "all $N Ready after ${elapsed}s"

log "idle for ${IDLE}s"
mark=$(audit_mark "$audit_log")
reconciles0=$(reconciliations)
operator_idle_cpu0=$(cpu_seconds "$operator_pid")
sleep "$IDLE"
idle_requests=$(requests_since "$mark")
idle_reconciles=$(python3 -c "print(int($(reconciliations) - $reconciles0))")
idle_cpu=$(python3 -c "print(f'{$(cpu_seconds "$operator_pid") - $operator_idle_cpu0:.2f}')")

python3 - "$N" "$elapsed" "$operator_cpu" "$(peak_rss_mib "$operator_pid")" "$kcm_cpu" "$reconciles" \
  "$requests" "$IDLE" "$idle_requests" "$idle_reconciles" "$idle_cpu" "$(machine)" <<'EOF'
import json, sys
(n, elapsed, cpu, rss, kcm, reconciles, requests, idle, idle_requests, idle_reconciles, idle_cpu,
 machine) = sys.argv[1:]
requests, idle_requests = json.loads(requests), json.loads(idle_requests)
work = {verb: count for verb, count in requests.items() if not verb.startswith("lease-")}
writes = sum(c for v, c in idle_requests.items() if v in ("create", "update", "patch", "delete"))
total = sum(work.values())
print(f"| deployments | time to all Ready | operator CPU | kube-controller-manager CPU (same interval) | operator/KCM | operator peak RSS | reconciliations | API requests (per reconciliation) | idle {idle} s: writes, reconciliations, CPU |")
print("|---|---|---|---|---|---|---|---|---|")
print(f"| {n} | {elapsed} s | {cpu} s | {kcm} s | ×{float(cpu) / float(kcm):.2f} | {rss} MiB | {reconciles} | "
      f"{total} ({total / max(int(reconciles), 1):.1f}): {', '.join(f'{v} {c}' for v, c in work.items())} | "
      f"{writes}, {idle_reconciles}, {idle_cpu} s |")
print(f"machine: {machine}")
print(json.dumps({"deployments": int(n), "all_ready_s": float(elapsed), "operator_cpu_s": float(cpu),
                  "operator_peak_rss_mib": float(rss), "kcm_cpu_s": float(kcm),
                  "reconciliations": int(reconciles), "requests": work,
                  "idle_s": int(idle), "idle_requests": idle_requests, "idle_writes": writes,
                  "idle_reconciliations": int(idle_reconciles), "machine": machine}))
EOF
