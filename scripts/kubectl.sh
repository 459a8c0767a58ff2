#!/usr/bin/env bash
# kubectl for the offline deploy/ checks (tests/unit/test_deploy.py): the kubectl on PATH, else
# Debian's kubernetes-client package (apt-get, as root or with password-less sudo).
#
#   scripts/kubectl.sh kustomize deploy/overlays/dev
#
# `kustomize` needs kubectl 1.24 or later (it names its kustomize, v4+); a standalone `kustomize`
# on PATH (`kustomize build`) is used when kubectl's is older. Debian 12's kubernetes-client is
# kubectl 1.20 with kustomize v2, too old for deploy/.
# Exit 3, with the reason on stderr, when no usable kubectl can be had: callers skip, loudly.
# INFERGATE_NO_INSTALL=1: never install anything.
set -euo pipefail

say() { echo "kubectl.sh: $*" >&2; }

kubectl=$(command -v kubectl || true)
if [ -z "$kubectl" ] && [ -z "${INFERGATE_NO_INSTALL:-}" ] && command -v apt-get >/dev/null; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=sudo; else sudo=none; fi
  fi
  if [ "$sudo" != none ]; then
    say "no kubectl on PATH; installing Debian's kubernetes-client"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq kubernetes-client; } >&2 \
      || say "apt-get install kubernetes-client failed"
    kubectl=$(command -v kubectl || true)
  fi
fi

if [ "${1:-}" = kustomize ]; then
  major=""
  if [ -n "$kubectl" ]; then
    # "Kustomize Version: v5.5.0" (kubectl 1.24+); older ones do not print it
    major=$("$kubectl" version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9][0-9]*\).*/\1/p')
  fi
  if [ -n "$major" ] && [ "$major" -ge 4 ]; then
    exec "$kubectl" "$@"
  fi
  if command -v kustomize >/dev/null; then
    shift
    exec kustomize build "$@"
  fi
  say "no kustomize v4+ (kubectl: ${kubectl:-none}${major:+, kustomize v$major}); install kubectl 1.24 or later, or kustomize"
  exit 3
fi

[ -n "$kubectl" ] || { say "no kubectl, and none could be installed"; exit 3; }
exec "$kubectl" "$@"
