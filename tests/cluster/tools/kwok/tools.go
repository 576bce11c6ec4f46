//go:build tools

// Pins the kwok release tests/cluster/build.sh builds.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
