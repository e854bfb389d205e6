#!/usr/bin/env bash
# Wheels the GPU check needs beyond torch and transformers, for a GPU machine that cannot reach a package
# registry (Python 3.12, x86-64): deepspeed and webdataset for the training stages, sae-lens for the SAE
# stage, countryinfo for the speed benchmarks' questions (python -m benchmarks.run --device cuda), and what
# they import that such an image usually lacks. About 40 MB. Usage there:
#   SITE=$(mktemp -d); python3 -m pip install --no-index --no-deps --target "$SITE" .whl/*.whl
#   PYTHONPATH="$SITE" python3 -m benchmarks.gpu_check --out benchmarks/results/gpu/check.json
set -euo pipefail
OUT="${1:-.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
TARGET=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# pure-Python packages (deepspeed and a few others ship only source): built or fetched as py3 wheels
PURE=(deepspeed==0.19.8 hjson pydantic==2.14.4 annotated-types typing-inspection
      webdataset==1.0.2 braceexpand countryinfo==1.0.1
      sae-lens==6.54.12 transformer-lens==3.9.0 babe datasets nltk plotly plotly-express python-dotenv simple-parsing
      docstring-parser tenacity beartype better-abc fancy-einsum transformers-stream-generator typeguard dill)
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps -w "$OUT" "${PURE[@]}"
# compiled ones, for the GPU machine's Python; pydantic-core at the version pydantic pins
CORE=$(unzip -p "$OUT"/pydantic-2.14.4-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
"$PY" -m pip download --quiet --no-deps --only-binary=:all: "${TARGET[@]}" -d "$OUT" \
    "pydantic-core==$CORE" wandb==0.31.0 multiprocess
du -sh "$OUT"
