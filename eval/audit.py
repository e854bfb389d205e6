"""Recompute a run's headline from what it committed, without rerunning anything:

    python -m selfexplain.eval.audit docs/results/<study>

The folder holds the run's `matrix.json` and `eval/<task>/<target>/<row>.json` (each cell with its
per-record units, as the eval stage saved it). The paired differences (and the agree / disagree split,
whose per-record flags matrix.json keeps), the lift at each size of a data-efficiency curve and each
trained target minus its random-weights twin are computed again from the units and compared with the
committed ones; the headline tables (and the lift per size, the random-twin contrast) are printed as
docs/RESULTS.md quotes them. Exit 1 when a number differs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .headline import headline_table
from .matrix import build_matrix, lift_curves, load_cell
from .report import lift_table, random_target_lines


COMPARED = {  # the parts of a task's table that hold differences, and what names one
    "differences": lambda d: (d["comparison"], d["target"], d["metric"], d["first"], d["second"]),
    "random_target": lambda d: ("trained - random target", d["target"], d["metric"], d["row"], d["random_target"]),
}


def committed_agreement(matrix: dict) -> dict:
    """(task, target, other model) -> flags, as matrix.json keeps them."""
    return {(task, target, other): entry["flags"] for task, table in matrix["tasks"].items()
            for target, others in table.get("agreement", {}).items() for other, entry in others.items()}


def committed_cells(folder: Path, task: str = "*") -> list:
    """The cells a run committed under folder/eval/<task>/<target>/<row>.json, with their units."""
    return [c for c in (load_cell(path) for path in sorted((folder / "eval").glob(f"{task}/*/*.json"))) if c is not None]


def recompute(folder: Path) -> tuple[dict, list[str]]:
    """(the matrix rebuilt from the folder's cells, the differences that do not match the committed ones)."""
    committed = json.loads((folder / "matrix.json").read_text())
    labels = {task: table.get("label_stats", {}) for task, table in committed["tasks"].items()}
    rebuilt = build_matrix(committed_cells(folder), labels, committed_agreement(committed),
                           committed.get("random_targets"))
    mismatched = []
    for task, table in committed["tasks"].items():
        for part, key in COMPARED.items():
            mine = {key(d): d for d in rebuilt["tasks"].get(task, {}).get(part, [])}
            for d in table.get(part, []):
                again = mine.get(key(d))
                if again is None or any(abs(again[k] - d[k]) > 1e-9 for k in ("difference", "lo", "hi")):
                    mismatched.append(f"{task}: {' / '.join(key(d))}")
    return rebuilt, mismatched


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfexplain.eval.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a folder with matrix.json and eval/ (e.g. docs/results/<study>)")
    args = parser.parse_args(argv)
    rebuilt, mismatched = recompute(args.folder)
    for task, table in rebuilt["tasks"].items():
        lines, curves = headline_table(task, table), lift_curves(table)
        lines += ["", *lift_table(curves)] if curves else []
        lines += ["", *random_target_lines(table)] if table.get("random_target") else []
        if lines:
            print(f"### {task}\n\n" + "\n".join(lines) + "\n")
    for line in mismatched:
        print(f"differs from the committed matrix.json: {line}", file=sys.stderr)
    print(f"{sum(len(t.get(part, [])) for t in rebuilt['tasks'].values() for part in COMPARED)} differences recomputed, "
          f"{len(mismatched)} differ from the committed ones")
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
