#!/usr/bin/env bash
# Submit the whole pipeline as a Ray job:  RAY_ADDRESS=http://head:8265 cluster/ray_job.sh configs/paper/input_ablation.yaml
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: RAY_ADDRESS=http://HEAD:8265 $0 CONFIG [--set key=value ...]" >&2
  exit 2
fi
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster's job server, e.g. http://head:8265}"
cd "$(dirname "$0")/.."
exec ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
  selfexplain run "$@" --set ray.address=auto
