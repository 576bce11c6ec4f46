#!/usr/bin/env bash
# Builds Prometheus from its Go module (pinned in prometheus/go.mod and go.sum), once per
# machine: cached under .tools/ in a folder named after the version. Service discovery other
# than files is left out (tag remove_all_sd): the dashboard check scrapes the targets
# run-local writes. Prints the binary's path on stdout.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="$(sed -n 's#.*github.com/prometheus/prometheus \(v[^ ]*\).*#\1#p' "$here/prometheus/go.mod" | head -1)"
bin="${DSD_PROMETHEUS_CACHE:-$here/../../.tools/prometheus}/$version/prometheus"
if [ ! -x "$bin" ]; then
  command -v go >/dev/null || { echo "build-prometheus.sh: Go is needed" >&2; exit 1; }
  mkdir -p "$(dirname "$bin")"
  echo "build-prometheus.sh: Prometheus $version" >&2
  (cd "$here/prometheus" && CGO_ENABLED=0 GOFLAGS=-buildvcs=false go build -trimpath \
    -tags remove_all_sd -ldflags "-s -w" -o "$bin.partial" \
    github.com/prometheus/prometheus/cmd/prometheus)
  mv "$bin.partial" "$bin"
fi
echo "$bin"
