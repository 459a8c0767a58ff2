#!/usr/bin/env bash
# Refresh the copies of configs/ that kustomize needs inside deploy/ (it reads no file outside a
# kustomization's directory). tests/unit/test_deploy.py fails until this has run after a change.
#   deploy/sync-configs.sh
# deploy/base/config/gateway.yaml is not a copy (a cluster changes a few keys; the test compares the
# rest) and deploy/base/config/registry-sync.yaml is a placeholder until configs/ has one.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cp configs/routing.yaml deploy/base/config/routing.yaml
# prod: the example routes without the rule that opens the admin API to anonymous callers
grep -v 'name: demo-admin' configs/routing.yaml >deploy/overlays/prod/routing.yaml
cp configs/prometheus/infergate-rules.yml deploy/prometheus/infergate-rules.yml
echo "deploy/: copies of configs/ refreshed"
