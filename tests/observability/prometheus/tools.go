//go:build tools

// Pins the Prometheus release tests/observability/build-prometheus.sh builds.
package tools

import _ "github.com/prometheus/prometheus/cmd/prometheus"
