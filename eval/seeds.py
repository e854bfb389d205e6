"""One study run at several seeds, side by side: a lift that holds at one seed and not another is not a
finding. Per task and compared metric, every headline comparison (each trained row minus its best control,
at every size of a data-efficiency curve; self minus cross) with its interval at each seed, as each
folder's committed matrix.json holds it, then the spread of the point differences and how many seeds'
intervals exclude zero. With --every-control, each trained row minus each of its controls instead (or
those of the row kinds named), recomputed from the folder's committed cells. Usage:

    python -m selfexplain.eval.seeds docs/results/study_patching_scale_seed0 docs/results/study_patching_scale_seed1 ...
    python -m selfexplain.eval.seeds docs/results/study_patching_scale_seed* --every-control zero_vector,shuffled_vector
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from .audit import committed_cells
from .differences import control_differences
from .headline import marked, significant

SEEDED = ("trained - best control", "self - cross")
"""The committed comparisons set side by side (on all records; the subsets stay in each run's report)."""
NAMED_SECOND = ("self - cross", "trained - control")
"""Comparisons whose second row names the comparison; the best control may differ from seed to seed."""


def headline_of(folder: Path, task: str) -> list[dict]:
    """The folder's committed headline comparisons of the task."""
    table = json.loads((folder / "matrix.json").read_text())["tasks"].get(task, {})
    return [d for d in table.get("differences", []) if d["comparison"] in SEEDED]


def controls_of(folder: Path, task: str, kinds: Optional[Sequence[str]] = None) -> list[dict]:
    """Each trained row of the task minus each of its controls (of `kinds`), from the folder's cells."""
    return control_differences(committed_cells(folder, task), kinds).get(task, [])


def _key(d: dict) -> tuple:
    second = d["second"] if d["comparison"] in NAMED_SECOND else ""
    return d["comparison"], d["target"], d["metric"], d["first"], second


def seed_table(per_seed: dict[str, list[dict]]) -> list[str]:
    """Markdown lines: one row per comparison, one column per seed's comparisons, then the spread."""
    found_by = {name: {_key(d): d for d in found} for name, found in per_seed.items()}
    sizes = {_key(d): d.get("examples_per_layer", 0) for found in per_seed.values() for d in found}
    keys = sorted(sizes, key=lambda k: (k[0], k[1], k[2], sizes[k], k[3], k[4]))
    names = list(per_seed)
    lines = [f"| comparison | target | metric | row | {' | '.join(names)} | spread (min, max) | significant |",
             "|---|---|---|---|" + "---|" * len(names) + "---|---|"]
    for key in keys:
        found = [found_by[name].get(key) for name in names]
        points = [d["difference"] for d in found if d]
        row = key[3] + (f" - {key[4]}" if key[4] else "")
        cells = [_entry(d) for d in found]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {row} | {' | '.join(cells)} | "
                     f"{min(points):+.3f}, {max(points):+.3f} | {sum(significant(d) for d in found if d)} of {len(points)} |")
    return lines


def _entry(d: Optional[dict]) -> str:
    if d is None:
        return "-"
    return marked(d) + (f" vs {d['second']}" if d["comparison"] not in NAMED_SECOND else "")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m selfexplain.eval.seeds", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders with a matrix.json (and eval/), one per seed")
    parser.add_argument("--task", help="one task (default: every task of the first folder)")
    parser.add_argument("--metric", help="one compared metric (default: every one)")
    parser.add_argument("--every-control", nargs="?", const="", default=None, metavar="KINDS",
                        help="each trained row minus each of its controls, or those of these comma-separated row "
                             "kinds (e.g. zero_vector,shuffled_vector), recomputed from the cells")
    args = parser.parse_args(argv)
    tasks = [args.task] if args.task else list(json.loads((args.folders[0] / "matrix.json").read_text())["tasks"])
    kinds = [k for k in (args.every_control or "").split(",") if k] or None
    for task in tasks:
        per_seed = {folder.name: [d for d in (headline_of(folder, task) if args.every_control is None
                                              else controls_of(folder, task, kinds))
                                  if args.metric in (None, d["metric"])]
                    for folder in args.folders}
        print(f"### {task}\n\n" + "\n".join(seed_table(per_seed)) + "\n")


if __name__ == "__main__":
    main()
