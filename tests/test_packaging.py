"""The installed distribution: one top-level package, `selfexplain`, holding every layer of the tree."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("groundtruth", "training", "eval", "distributed")


def test_the_wheel_holds_no_top_level_package_but_selfexplain(tmp_path):
    src = tmp_path / "src"  # a copy, so the build's scratch folders never land in the checkout
    src.mkdir()
    shutil.copy(ROOT / "setup.py", src)
    for name in ("selfexplain", *LAYERS):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("selfexplain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"selfexplain"}
    in_tree = {f"selfexplain/{p.relative_to(ROOT).as_posix()}" for layer in LAYERS
               for p in (ROOT / layer).rglob("*.py") if "__pycache__" not in p.parts}
    assert in_tree - set(names) == set(), "layer modules missing from the wheel"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "selfexplain = selfexplain.distributed.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_a_source_checkout_imports_the_layers_under_selfexplain_without_installing(tmp_path):
    """Ray jobs' working directories and GPU machines given the tree run it uninstalled."""
    code = ("import selfexplain.distributed.config as c, selfexplain.groundtruth.records as r, sys;"
            "print(c.__file__); print(r.__file__); print('training' in sys.modules)")
    done = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[:0] = [{str(ROOT)!r}] + "
                           f"[p for p in {sys.path!r} if 'site-packages' in p and 'selfexplain' not in p]; {code}"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    config, records, bare = done.stdout.split()
    assert Path(config) == ROOT / "distributed" / "config.py" and Path(records) == ROOT / "groundtruth" / "records.py"
    assert bare == "False"
