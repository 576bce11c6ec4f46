#!/usr/bin/env bash
# Stops the local control plane started by tests/cluster/up.sh and leaves no process behind:
# each component runs in its own process group, which gets SIGTERM, then SIGKILL.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/versions.sh"
dir="${DSD_CLUSTER_DIR:-$CLUSTER_CACHE/run}"
[ -e "$dir/pids" ] || exit 0

# Reverse start order: kwok and the controllers before the API server, etcd last.
pids=$(tac "$dir/pids" | awk '{print $2}')
for pid in $pids; do kill -TERM -- "-$pid" 2>/dev/null; done
for _ in $(seq 1 50); do
  alive=""
  for pid in $pids; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
  [ -z "$alive" ] && break
  sleep 0.2
done
for pid in $pids; do kill -KILL -- "-$pid" 2>/dev/null; done
rm -f "$dir/pids"
echo "cluster: stopped" >&2
