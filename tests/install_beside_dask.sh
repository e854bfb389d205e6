#!/usr/bin/env bash
# selfexplain installs beside Dask's `distributed` (Ray users run Dask on Ray) and neither hides the other:
# a fresh venv gets Dask's distributed from the registry and selfexplain without its dependencies, then
# each import name must resolve into its own distribution. Needs the package registry; `make install-check`.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install --quiet --upgrade pip setuptools wheel
"$PY" -m pip install --quiet distributed
mkdir "$WORK/src"  # a copy, so the build's scratch folders never land in the checkout
cp -r "$REPO/setup.py" "$REPO/selfexplain" "$REPO/groundtruth" "$REPO/training" "$REPO/eval" "$REPO/distributed" "$WORK/src/"
"$PY" -m pip install --quiet --no-deps --no-build-isolation "$WORK/src"
cd "$WORK"  # away from the checkout, so only the installed copies can be found
"$PY" - <<'PY'
import importlib.metadata as md
import importlib.util
import pathlib

def owner(module: str) -> str:
    origin = pathlib.Path(importlib.util.find_spec(module).origin).resolve()
    for dist in ("distributed", "selfexplain"):
        if any(pathlib.Path(f.locate()).resolve() == origin for f in md.files(dist) or ()):
            return dist
    return f"neither ({origin})"

import distributed  # Dask's, importing cleanly with selfexplain installed beside it
found = {"distributed": owner("distributed"), "distributed.client": owner("distributed.client")}
for module in ("selfexplain.groundtruth", "selfexplain.training", "selfexplain.eval", "selfexplain.distributed",
               "selfexplain.distributed.cli", "selfexplain.groundtruth.records"):
    found[module] = owner(module)
for module, dist in found.items():
    print(f"{module:36s} -> {dist}")
want = {m: "distributed" if m.startswith("distributed") else "selfexplain" for m in found}
assert found == want, "a package resolved into the wrong distribution"
tops = sorted({f.parts[0] for f in md.files("selfexplain") if f.suffix == ".py"})
print("selfexplain's top-level names:", tops)
assert tops == ["selfexplain"], tops
print(f"OK: Dask distributed {md.version('distributed')} and selfexplain {md.version('selfexplain')} side by side")
PY
