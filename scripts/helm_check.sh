#!/usr/bin/env bash
# The Helm chart (deploy/helm/ratelimitd), as CI checks it: for each case of values below,
# `helm lint --strict`, `helm template`, and every rendered resource validated strictly against
# Kubernetes' own schemas by kubernetes-validate (dev extra; it ships the schemas, so nothing
# is downloaded). .ci/run installs helm; tests/test_helm.py runs this script.
#
#   scripts/helm_check.sh            HELM=/path/to/helm KUBE_VERSION=1.33.0 scripts/helm_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
HELM=${HELM:-helm}
VALIDATE=${KUBERNETES_VALIDATE:-.venv/bin/kubernetes-validate}
KUBE_VERSION=${KUBE_VERSION:-1.33.0}
CHART=deploy/helm/ratelimitd
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

declare -A CASES=(
  [embedded]=""
  [external]="--set storage.url=redis://:example-password@valkey:6379/0 --set operatorToken.value=rlt_example --set replicaCount=3"
  [cluster-tls]="--set storage.url=rediss+cluster://valkey-0.valkey:6379\\,valkey-1.valkey:6379 --set storage.tlsSecret=valkey-ca --set tls.secretName=ratelimitd-tls --set tls.serverName=ratelimitd.internal --set replicaCount=3"
  [mtls-existing-secrets]="--set storage.existingSecret=ratelimitd-storage --set operatorToken.existingSecret=ratelimitd-operator --set tls.secretName=ratelimitd-tls --set tls.clientCA=true --set metrics.enabled=false --set podDisruptionBudget.enabled=false --set replicaCount=2"
)

for name in $(printf '%s\n' "${!CASES[@]}" | sort); do
  # shellcheck disable=SC2086 # each case is a list of flags
  "$HELM" lint --strict --quiet "$CHART" ${CASES[$name]} >/dev/null
  # shellcheck disable=SC2086
  "$HELM" template ratelimitd "$CHART" ${CASES[$name]} >"$out/$name.yaml"
  "$VALIDATE" --strict --quiet -k "$KUBE_VERSION" "$out/$name.yaml"
  kinds=$(grep -E '^kind: ' "$out/$name.yaml" | sed 's/^kind: //' | paste -sd, -)
  echo "helm chart, $name: lint, template and schema ($KUBE_VERSION) ok: $kinds"
done
