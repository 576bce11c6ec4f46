#!/usr/bin/env bash
# Creates a PersistentVolumeClaim bound to a PersistentVolume made for it (named
# NAMESPACE-CLAIM): this cluster has no storage provisioner, and pods wait for their claims
# to be bound before they are scheduled. kwok's nodes mount nothing, so the hostPath is never
# touched. Usage: static-claim.sh NAMESPACE CLAIM
set -euo pipefail
namespace="$1" claim="$2"
"${KUBECTL:-kubectl}" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: $namespace-$claim}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  hostPath: {path: /var/lib/$namespace/$claim}
  claimRef: {namespace: $namespace, name: $claim}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $claim, namespace: $namespace}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  volumeName: $namespace-$claim
  resources: {requests: {storage: 1Gi}}
YAML
