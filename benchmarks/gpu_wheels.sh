#!/usr/bin/env bash
# The wheels the GPU check needs beyond what a machine's Python already has, for a machine that cannot
# reach a package registry: `python -m benchmarks.gpu_needs wheels` lists them (every distribution the
# check's imports reach, at this venv's versions, short of what HAVE names), and this builds the pure ones
# and fetches the compiled ones for the target's Python.
#   benchmarks/gpu_wheels.sh [OUT] [HAVE]      OUT: default .whl; HAVE: default benchmarks/gpu_image_packages.txt
#   env: PY   the project's venv Python (default .venv/bin/python); PYVER  the target's Python (default 3.12)
# On the GPU machine:
#   SITE=$(mktemp -d); python3 -m pip install --no-index --no-deps --target "$SITE" .whl/*.whl
#   PYTHONPATH="$SITE" python3 -m benchmarks.gpu_check --out benchmarks/results/gpu/check.json
set -euo pipefail
OUT="${1:-.whl}"
HAVE="${2:-benchmarks/gpu_image_packages.txt}"
PY="${PY:-.venv/bin/python}"
PYVER="${PYVER:-3.12}"
mkdir -p "$OUT"
lines=$("$PY" -m benchmarks.gpu_needs wheels --have "$HAVE" --python-version "$PYVER")
pure=$(awk '$1 == "pure" {print $2}' <<<"$lines")
binary=$(awk '$1 == "binary" {print $2}' <<<"$lines")
# pip matches each manylinux tag exactly: the glibc versions wheels of these packages are built for
TARGET=(--python-version "$PYVER" --implementation cp --only-binary=:all:)
for tag in manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux2014 manylinux1; do
    TARGET+=(--platform "${tag}_x86_64")
done
# pure ones (deepspeed ships only source) as py3 wheels, built here where needed
[ -z "$pure" ] || DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps -w "$OUT" $pure
[ -z "$binary" ] || "$PY" -m pip download --quiet --no-deps "${TARGET[@]}" -d "$OUT" $binary
echo "$(wc -l <<<"$lines") distributions, $(du -sh "$OUT" | cut -f1) in $OUT"
