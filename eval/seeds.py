"""One study run at several seeds, side by side: a lift that holds at one seed and not another is not a
finding. Reads each folder's committed matrix.json (docs/results/<study>_seed<k>/) and prints, per task
and compared metric, every headline comparison (each trained row minus its best control, at every size of
a data-efficiency curve; self minus cross) with its interval at each seed, then the spread of the point
differences and how many seeds' intervals exclude zero. Usage:

    python -m selfexplain.eval.seeds docs/results/study_patching_scale_seed0 docs/results/study_patching_scale_seed1 ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from .headline import marked, significant

SEEDED = ("trained - best control", "self - cross")
"""The comparisons set side by side (on all records; the subsets stay in each run's report)."""


def _key(d: dict) -> tuple:
    """What names one comparison across seeds: the best control may differ from seed to seed, the
    cross-explainer may not."""
    second = d["second"] if d["comparison"] == "self - cross" else ""
    return d["comparison"], d["target"], d["metric"], d["first"], second


def seed_table(folders: list[Path], task: str) -> list[str]:
    """Markdown lines: one row per comparison, one column per folder, then the spread."""
    per_seed = {}
    for folder in folders:
        table = json.loads((folder / "matrix.json").read_text())["tasks"].get(task, {})
        per_seed[folder.name] = {_key(d): d for d in table.get("differences", []) if d["comparison"] in SEEDED}
    keys = sorted({k for found in per_seed.values() for k in found},
                  key=lambda k: (k[0], k[1], k[2], _size(per_seed, k), k[3], k[4]))
    names = list(per_seed)
    lines = [f"| comparison | target | metric | row | {' | '.join(names)} | spread (min, max) | significant |",
             "|---|---|---|---|" + "---|" * len(names) + "---|---|"]
    for key in keys:
        found = [per_seed[name].get(key) for name in names]
        points = [d["difference"] for d in found if d]
        row = key[3] + (f" - {key[4]}" if key[4] else "")
        cells = [_entry(d) for d in found]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {row} | {' | '.join(cells)} | "
                     f"{min(points):+.3f}, {max(points):+.3f} | {sum(significant(d) for d in found if d)} of {len(points)} |")
    return lines


def _size(per_seed: dict, key: tuple) -> int:
    return next((d.get("examples_per_layer", 0) for found in per_seed.values() if (d := found.get(key))), 0)


def _entry(d: Optional[dict]) -> str:
    if d is None:
        return "-"
    return marked(d) + (f" vs {d['second']}" if d["comparison"] != "self - cross" else "")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m selfexplain.eval.seeds", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders with a matrix.json, one per seed")
    parser.add_argument("--task", help="one task (default: every task of the first folder)")
    args = parser.parse_args(argv)
    tasks = [args.task] if args.task else list(json.loads((args.folders[0] / "matrix.json").read_text())["tasks"])
    for task in tasks:
        print(f"### {task}\n\n" + "\n".join(seed_table(args.folders, task)) + "\n")


if __name__ == "__main__":
    main()
