"""The explainer x target matrix: one cell per (task, row, target), rows being trained, untrained and
baseline explainers."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from selfexplain.groundtruth.records import write_atomic

from .agreement import agreement_counts
from .differences import headline_differences, random_target_differences
from .forms import metrics_of
from .rows import ROW_KINDS


@dataclass
class Cell:
    task: str
    row: str  # e.g. "smollm2 trained", "gemma untrained", "majority"
    kind: str  # a row kind of eval/rows.py (trained, no_vector, untrained, ...) or "baseline"
    explainer: str  # model name, or the baseline's name
    target: str
    metrics: dict
    units: Optional[list] = field(default=None, repr=False)
    """Per test record (per feature) what the metrics aggregate, for paired comparisons; kept in the cell's
    file, not in matrix.json."""
    size: Optional[int] = None
    """Records per layer the row's explainer was trained on, for a data-efficiency job's rows; None: all."""

    @property
    def is_self(self) -> bool:
        return self.kind == "trained" and self.explainer == self.target and self.size is None


def save_cell(path: Path, key: str, cell: Cell, predictions: list[str]) -> None:
    """One scored cell, its per-record units and predictions, under the key of the data it scored."""
    write_atomic(path, json.dumps({"key": key, "cell": dataclasses.asdict(cell), "predictions": predictions}, indent=1))


def load_cell(path: Path, key: Optional[str] = None) -> Optional[Cell]:
    """A saved cell; None when the file is missing or (given a key) scored other data."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return Cell(**saved["cell"]) if key is None or saved.get("key") == key else None


def build_matrix(cells: list[Cell], label_stats: dict, agreement: Optional[dict] = None,
                 twins: Optional[dict[str, str]] = None) -> dict:
    """matrix.json content: per task, its targets, rows (cells by target), label statistics and the
    headline differences; with `agreement` ((task, target, other model) -> a flag per test record), self
    vs cross also on the records where the models agree and where they disagree, and the counts; with
    `twins` (random-weights target -> the trained target it copies the shape of), each explaining row on
    the trained target minus the same row on its twin."""
    tasks: dict = {}
    for cell in cells:  # targets in the order cells first name them
        task = tasks.setdefault(cell.task, {"targets": [], "rows": {}, "metrics": list(metrics_of(cell.task)),
                                            "label_stats": label_stats.get(cell.task, {})})
        if cell.target not in task["targets"]:
            task["targets"].append(cell.target)
    kind_order = {kind: i for i, kind in enumerate(ROW_KINDS)}  # rows in registration order, baselines last
    for cell in sorted(cells, key=lambda c: (kind_order.get(c.kind, len(kind_order)), c.size is not None, c.size or 0,
                                             c.row)):
        row = tasks[cell.task]["rows"].setdefault(cell.row, {"kind": cell.kind, "explainer": cell.explainer, "cells": {},
                                                             **({"size": cell.size} if cell.size is not None else {})})
        row["cells"][cell.target] = {**cell.metrics, "self": cell.is_self}
    for task, comparisons in headline_differences(cells, agreement).items():
        tasks[task]["differences"] = comparisons
    for (task, target, other), flags in (agreement or {}).items():
        if task in tasks:
            tasks[task].setdefault("agreement", {}).setdefault(target, {})[other] = {**agreement_counts(flags),
                                                                                   "flags": flags}
    for task, comparisons in random_target_differences(cells, twins or {}).items():
        tasks[task]["random_target"] = comparisons
    return {"tasks": tasks, **({"random_targets": twins} if twins else {})}


def headline(table: dict) -> str:
    """The metric a task's heatmap and bar chart show (its first)."""
    return table["metrics"][0]


def data_efficiency(table: dict) -> dict[str, list[tuple[int, float]]]:
    """'explainer<-target' -> [(train examples per layer, headline metric)] from the trained rows of a task
    table at every size, sorted by size; only curves of 2+ points."""
    metric = headline(table)
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in table["rows"].values():
        if row["kind"] != "trained":
            continue
        for target, cell in row["cells"].items():
            if "examples_per_layer" in cell:
                curves.setdefault(f"{row['explainer']}<-{target}", []).append((cell["examples_per_layer"], cell[metric]))
    return {k: sorted(v) for k, v in curves.items() if len(v) > 1}


def lift_curves(table: dict) -> dict[str, dict[str, list[dict]]]:
    """'explainer<-target' -> metric -> the trained row minus its best control at each training size
    (the headline's comparisons on all records, each with its interval), sorted by train examples per
    layer; only explainers with 2+ sizes."""
    curves: dict[str, dict[str, list[dict]]] = {}
    for d in table.get("differences", []):
        if d["comparison"] == "trained - best control" and "examples_per_layer" in d:
            name = f"{table['rows'][d['first']]['explainer']}<-{d['target']}"
            curves.setdefault(name, {}).setdefault(d["metric"], []).append(d)
    return {name: {m: sorted(points, key=lambda d: d["examples_per_layer"]) for m, points in by.items()}
            for name, by in curves.items() if len(next(iter(by.values()))) > 1}


def add_projection_errors(matrix: dict, errors: dict) -> dict:
    """Attach lstsq fit errors (task -> 'explainer<-target' -> key -> errors) to matrix.json."""
    for task, table in matrix["tasks"].items():
        if errors.get(task):
            table["projection_fit_error"] = errors[task]
    return matrix


def write_matrix(path: Path, matrix: dict) -> None:
    write_atomic(path, json.dumps(matrix, indent=1))


def cells_of(matrix: dict) -> list[Cell]:
    """The cells of a matrix.json (inverse of build_matrix)."""
    return [Cell(task, name, row["kind"], row["explainer"], target, {k: v for k, v in m.items() if k != "self"},
                 size=row.get("size"))
            for task, t in matrix["tasks"].items() for name, row in t["rows"].items() for target, m in row["cells"].items()]

