#!/usr/bin/env bash
# Writes a kubeconfig that authenticates as a ServiceAccount (a `kubectl create token` token)
# against the current cluster, so a local process runs with exactly that account's RBAC.
# Usage: token-kubeconfig.sh NAMESPACE SERVICEACCOUNT OUT [DURATION (default 2h)]
set -euo pipefail
namespace="$1" account="$2" out="$3" duration="${4:-2h}"
kubectl="${KUBECTL:-kubectl}"
server=$("$kubectl" config view --raw --minify -o jsonpath='{.clusters[0].cluster.server}')
ca="$(mktemp)"
trap 'rm -f "$ca"' EXIT
"$kubectl" config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' \
  | base64 -d >"$ca"
token=$("$kubectl" -n "$namespace" create token "$account" --duration "$duration")
rm -f "$out"
config() { KUBECONFIG="$out" "$kubectl" config "$@" >/dev/null; }
config set-cluster local --server "$server" --certificate-authority "$ca" --embed-certs
config set-credentials "$account" --token "$token"
config set-context local --cluster local --user "$account"
config use-context local
user=$(KUBECONFIG="$out" "$kubectl" auth whoami -o jsonpath='{.status.userInfo.username}')
[ "$user" = "system:serviceaccount:$namespace:$account" ] \
  || { echo "token-kubeconfig: $out authenticates as $user" >&2; exit 1; }
