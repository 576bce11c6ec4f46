#!/usr/bin/env bash
# Validates every Kubernetes manifest the project ships or generates:
#   - the Helm chart (helm lint --strict; helm template with several value sets),
#   - deploy/ (rbac.yaml, operator.yaml, the CRD, and the kustomization as a whole),
#   - the CRD printed by the operator binary (and that the checked-in copies match it),
#   - the objects the operator renders for the sample DeepSeekDeployments,
# against the Kubernetes OpenAPI schemas with kubernetes-validate --strict (unknown fields
# are errors). Kinds without a bundled schema are only warned about by kubernetes-validate;
# here such a warning fails the check unless the kind is on ALLOWED_CUSTOM_KINDS.
#
# Env: OPERATOR_BIN (default ./target/debug/deepseek-operator), K8S_VERSION (default 1.35.0).
# Tools come from .tools (installed by .ci/tools.sh, run automatically when missing).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${REPO}"

TOOLS="${REPO}/.tools"
HELM="${TOOLS}/bin/helm"
KUBECTL="${TOOLS}/bin/kubectl"
KV="${TOOLS}/venv/bin/kubernetes-validate"
PY="${TOOLS}/venv/bin/python"
if [ ! -x "${HELM}" ] || [ ! -x "${KUBECTL}" ] || [ ! -x "${KV}" ]; then
  "${REPO}/.ci/tools.sh"
fi

OPERATOR_BIN="${OPERATOR_BIN:-./target/debug/deepseek-operator}"
# kubernetes-validate 1.35.0 bundles schemas up to 1.35 (matches k8s-openapi's v1_35 feature).
# The rendered objects need >= 1.33 (NetworkPolicy endPort, PDB unhealthyPodEvictionPolicy,
# topologySpreadConstraints matchLabelKeys, gRPC probes).
K8S_VERSION="${K8S_VERSION:-1.35.0}"
CHART="charts/deepseek-operator"
CRD_NAME="deepseekdeployments.yaml"
SAMPLES=(deploy/samples/tiny.yaml deploy/samples/tiny-ep.yaml deploy/samples/tiny-autoscaling.yaml deploy/samples/deepseek-v3-h100-a100.yaml)
# "Kind apiVersion" pairs that may lack a schema (custom resources of other projects).
ALLOWED_CUSTOM_KINDS=("ServiceMonitor monitoring.coreos.com/v1" "PodMonitor monitoring.coreos.com/v1")

WORK="$(mktemp -d)"
trap 'rm -rf "${WORK}"' EXIT
# Keep helm (and anything else) from reading or writing the user's config and caches.
export XDG_CACHE_HOME="${WORK}/xdg/cache" XDG_CONFIG_HOME="${WORK}/xdg/config" XDG_DATA_HOME="${WORK}/xdg/data"
export KUBECONFIG="${WORK}/kubeconfig"
mkdir -p "${XDG_CACHE_HOME}" "${XDG_CONFIG_HOME}" "${XDG_DATA_HOME}"

PASSED=()
FAILED=()

# check NAME CMD...: runs one check, records the result, never aborts the script.
check() {
  local name="$1"; shift
  printf '\n=== %s\n' "${name}"
  if "$@"; then
    PASSED+=("${name}")
  else
    FAILED+=("${name}")
    printf -- '--- FAILED: %s\n' "${name}"
  fi
}

# validate FILE: kubernetes-validate --strict; fails on errors, on schema-less kinds that are
# not allowed, and on a file without any object.
validate() {
  local file="$1" out rc=0 line allowed ok=1 count
  out="$("${KV}" --strict -k "${K8S_VERSION}" "${file}" 2>&1)" || rc=$?
  printf '%s\n' "${out}" | sed 's/^/    /'
  [ "${rc}" -eq 0 ] || ok=0
  while IFS= read -r line; do
    case "${line}" in
      WARN*)
        allowed=0
        for kind in "${ALLOWED_CUSTOM_KINDS[@]}"; do
          case "${line}" in
            *"for kind ${kind% *} with api version ${kind#* } "*) allowed=1 ;;
          esac
        done
        if [ "${allowed}" -eq 1 ]; then
          echo "    (allowed: custom resource without a bundled schema)"
        else
          echo "    unexpected warning: no schema for this kind (typo in kind/apiVersion?)"
          ok=0
        fi
        ;;
    esac
  done <<<"${out}"
  count="$(grep -c -E '^(INFO .* passed for resource|WARN |ERROR )' <<<"${out}" || true)"
  if [ "${count}" -eq 0 ]; then
    echo "    no Kubernetes objects found in ${file}"
    ok=0
  fi
  [ "${ok}" -eq 1 ]
}

helm_lint() { "${HELM}" lint --strict "${CHART}" "$@"; }

# helm_template_validate NAME HELM-ARGS...: renders the chart and validates the result.
helm_template_validate() {
  local name="$1"; shift
  local out="${WORK}/helm-${name}.yaml"
  "${HELM}" template deepseek-operator "${CHART}" --namespace deepseek-system "$@" >"${out}" || return 1
  validate "${out}"
}

# The chart's PodMonitors select pods the operator makes, on a port those pods name.
pod_monitors_rendered() {
  "${HELM}" template deepseek-operator "${CHART}" --namespace deepseek-system \
    --set metrics.podMonitors.enabled=true --set metrics.dashboard.enabled=true \
    >"${WORK}/podmonitors.yaml" || return 1
  "${OPERATOR_BIN}" render -f deploy/samples/tiny.yaml >"${WORK}/tiny-objects.yaml" || return 1
  "${PY}" - "${WORK}/podmonitors.yaml" "${WORK}/tiny-objects.yaml" <<'PYEOF'
import sys
import yaml

monitors = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "PodMonitor"]
templates = [d["spec"]["template"] for d in yaml.safe_load_all(open(sys.argv[2]))
             if d and d["kind"] in ("StatefulSet", "Deployment")]
assert len(monitors) == 2, f"expected 2 PodMonitors, got {len(monitors)}"
for monitor in monitors:
    name = monitor["metadata"]["name"]
    wanted = monitor["spec"]["selector"]["matchLabels"]
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    selected = [t for t in templates
                if all(t["metadata"]["labels"].get(k) == v for k, v in wanted.items())]
    assert selected, f"{name} selects no pod the operator makes"
    for template in selected:
        ports = [p.get("name") for c in template["spec"]["containers"] for p in c.get("ports", [])]
        assert port in ports, f"{name}: no port {port!r} among {ports}"
    relabelled = {r["targetLabel"] for r in monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]}
    assert {"deployment", "pool", "component"} <= relabelled, f"{name}: relabels only {relabelled}"

# The dashboard: every query keeps to the deployments chosen, a label the PodMonitors set.
import json
import re
[config] = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "ConfigMap"]
assert config["metadata"]["labels"].get("grafana_dashboard") == "1", config["metadata"]
dashboard = json.loads(config["data"]["deepseek-serving.json"])
for panel in dashboard["panels"]:
    for target in panel["targets"]:
        for selector in re.findall(r"deepseek_\w+\{([^}]*)\}", target["expr"]):
            assert 'deployment=~"$deployment"' in selector, f"{panel['title']}: {target['expr']}"
PYEOF
}

# PodMonitors "auto": none where the cluster lacks the API, both where it serves it.
pod_monitors_auto() {
  local without with
  without=$("${HELM}" template x "${CHART}" | grep -c '^kind: PodMonitor$' || true)
  with=$("${HELM}" template x "${CHART}" --api-versions monitoring.coreos.com/v1/PodMonitor \
    | grep -c '^kind: PodMonitor$' || true)
  [ "${without}" = 0 ] && [ "${with}" = 2 ] \
    || { echo "    auto: ${without} PodMonitors without the API, ${with} with it"; return 1; }
}

render_validate() {
  local sample="$1" out
  out="${WORK}/render-$(basename "${sample}")"
  "${OPERATOR_BIN}" render -f "${sample}" >"${out}" || return 1
  validate "${out}"
}

kustomize_validate() {
  local out="${WORK}/kustomize.yaml"
  "${KUBECTL}" kustomize deploy >"${out}" || return 1
  validate "${out}"
}

# The CRD copies must be byte-identical to what the operator prints.
crd_up_to_date() {
  local copy="$1"
  "${OPERATOR_BIN}" crd >"${WORK}/crd.yaml" || return 1
  if ! diff -u "${copy}" "${WORK}/crd.yaml"; then
    echo "    ${copy} is stale: regenerate it with \`${OPERATOR_BIN} crd > ${copy}\`"
    return 1
  fi
}

crd_validate() {
  "${OPERATOR_BIN}" crd >"${WORK}/crd-bin.yaml" || return 1
  validate "${WORK}/crd-bin.yaml"
}

# The chart and deploy/rbac.yaml must grant the same rules; neither may use wildcards, and
# Secrets only by name for the worker CA (none with workerCa.enabled=false).
rbac_policy() {
  "${HELM}" template deepseek-operator "${CHART}" --namespace deepseek-system >"${WORK}/rbac-helm.yaml" || return 1
  "${HELM}" template deepseek-operator "${CHART}" --namespace deepseek-system \
    --set workerCa.enabled=false >"${WORK}/rbac-helm-no-ca.yaml" || return 1
  "${PY}" - deploy/rbac.yaml "${WORK}/rbac-helm.yaml" "${WORK}/rbac-helm-no-ca.yaml" <<'PYEOF'
import sys
import yaml

def roles(path):
    found = {}
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if doc and doc.get("kind") in ("ClusterRole", "Role"):
                found[doc["kind"]] = doc.get("rules") or []
    return found

def normalize(rules):
    out = []
    for r in rules:
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                for v in r.get("verbs", []):
                    out.append((g, res, v, tuple(sorted(r.get("resourceNames", [])))))
    return sorted(set(out))

ok = True
plain, chart = roles(sys.argv[1]), roles(sys.argv[2])
for kind in ("ClusterRole", "Role"):
    if kind not in plain or kind not in chart:
        print(f"    {kind} missing (deploy/rbac.yaml: {kind in plain}, chart: {kind in chart})")
        ok = False
        continue
    a, b = normalize(plain[kind]), normalize(chart[kind])
    if a != b:
        print(f"    {kind} rules differ between deploy/rbac.yaml and the chart:")
        for x in sorted(set(a) - set(b)):
            print(f"      only in deploy/rbac.yaml: {x}")
        for x in sorted(set(b) - set(a)):
            print(f"      only in the chart:        {x}")
        ok = False
    for g, res, v, _ in a + b:
        if "*" in (g, res, v):
            print(f"    {kind} uses a wildcard: {(g, res, v)}")
            ok = False
        if g == "" and res.split("/")[0] == "secrets" and v not in ("get", "create", "update"):
            print(f"    {kind} grants more than get, create, update on Secrets: {v}")
            ok = False
    print(f"    {kind}: {len(a)} (group, resource, verb) grants, no wildcards, Secrets by name only")
for kind, rules in roles(sys.argv[3]).items():
    secrets = [x for x in normalize(rules) if x[0] == "" and x[1] == "secrets"]
    if secrets:
        print(f"    {kind} with workerCa.enabled=false grants Secrets: {secrets}")
        ok = False
sys.exit(0 if ok else 1)
PYEOF
}

require_file() { [ -f "$1" ] || { echo "    missing: $1"; return 1; }; }

echo "helm $("${HELM}" version --short), kubernetes-validate $("${KV}" --version), schemas for Kubernetes ${K8S_VERSION}"
echo "operator binary: ${OPERATOR_BIN}"

check "helm lint --strict (defaults)" helm_lint
check "helm lint --strict (serviceMonitor, watchNamespace=foo)" \
  helm_lint --set metrics.serviceMonitor.enabled=true --set watchNamespace=foo
check "helm template | kubernetes-validate (defaults)" helm_template_validate defaults
check "helm template | kubernetes-validate (serviceMonitor, watchNamespace=foo)" \
  helm_template_validate servicemonitor --set metrics.serviceMonitor.enabled=true --set watchNamespace=foo
check "helm lint --strict (podMonitors)" helm_lint --set metrics.podMonitors.enabled=true
check "helm template | kubernetes-validate (podMonitors, dashboard)" \
  helm_template_validate podmonitors --set metrics.podMonitors.enabled=true \
  --set metrics.dashboard.enabled=true
check "helm template (podMonitors, dashboard): PodMonitors on the metrics port, the dashboard on their labels" \
  pod_monitors_rendered
check "helm template (podMonitors auto): only where the cluster serves monitoring.coreos.com/v1" \
  pod_monitors_auto
check "helm template | kubernetes-validate (no leader election, existing ServiceAccount)" \
  helm_template_validate single --set leaderElection.enabled=false --set replicaCount=1 \
  --set serviceAccount.create=false --set serviceAccount.name=operator
check "RBAC: chart == deploy/rbac.yaml, least privilege" rbac_policy
check "kubernetes-validate deploy/rbac.yaml" validate deploy/rbac.yaml
check "kubernetes-validate deploy/operator.yaml" validate deploy/operator.yaml
check "deploy/crd/${CRD_NAME} exists" require_file "deploy/crd/${CRD_NAME}"
if [ -f "deploy/crd/${CRD_NAME}" ]; then
  check "kubernetes-validate deploy/crd/${CRD_NAME}" validate "deploy/crd/${CRD_NAME}"
  check "deploy/crd/${CRD_NAME} matches \`deepseek-operator crd\`" crd_up_to_date "deploy/crd/${CRD_NAME}"
  check "kubectl kustomize deploy | kubernetes-validate" kustomize_validate
fi
check "kubernetes-validate \`deepseek-operator crd\`" crd_validate
check "${CHART}/crds/${CRD_NAME} matches \`deepseek-operator crd\`" crd_up_to_date "${CHART}/crds/${CRD_NAME}"
for sample in "${SAMPLES[@]}"; do
  check "deepseek-operator render -f ${sample} | kubernetes-validate" render_validate "${sample}"
done

printf '\n=== Summary: %d passed, %d failed\n' "${#PASSED[@]}" "${#FAILED[@]}"
for name in "${PASSED[@]}"; do printf '  PASS  %s\n' "${name}"; done
for name in "${FAILED[@]+"${FAILED[@]}"}"; do printf '  FAIL  %s\n' "${name}"; done
[ "${#FAILED[@]}" -eq 0 ]
