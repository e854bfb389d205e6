#!/usr/bin/env bash
# `make gpu-wheels-check`: the wheels of benchmarks/gpu_wheels.sh are all the GPU check needs. A fresh venv
# gets torch and transformers alone (this venv's versions), the wheel set is built against what that venv
# has, installed beside it with --no-index --no-deps, and every module the check's stages use is imported
# from there (python -m benchmarks.gpu_needs imports). Needs the package registry; not part of `make test`.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PY="$REPO/.venv/bin/python"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
TORCH=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
TRANSFORMERS=$("$PY" -c "import transformers; print(transformers.__version__)")
"${PYTHON:-python3}" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install --quiet "torch==$TORCH" "transformers==$TRANSFORMERS"
"$WORK/venv/bin/pip" list --format=freeze > "$WORK/have.txt"
PYVER=$("$WORK/venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
echo "fresh venv: Python $PYVER, torch $TORCH, transformers $TRANSFORMERS ($(wc -l < "$WORK/have.txt") distributions)"
PY="$PY" PYVER="$PYVER" benchmarks/gpu_wheels.sh "$WORK/whl" "$WORK/have.txt"
"$WORK/venv/bin/pip" install --quiet --no-index --no-deps --target "$WORK/site" "$WORK/whl"/*.whl
cd "$WORK"  # the project's venv on no path: only the fresh venv, the wheels and the repository's code
HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONPATH="$WORK/site:$REPO" "$WORK/venv/bin/python" -m benchmarks.gpu_needs imports
