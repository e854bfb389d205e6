"""Compare runs that differ in one training setting (a sweep) on the same test records.

Each run is a run folder of one config varied with --set (configs/sweep_cpu.yaml). Per run and compared
metric: the full-data trained row with its interval, that explainer's control rows (v left out, zero v,
shuffled v, a trained control, untrained: row kinds marked control; a data-efficiency curve's rows are
left out), the trained row minus the best of them, and the
trained row minus the first run's trained row, each difference paired over the same records. The first run is the
reference (the study's setting). Usage:

    python -m selfexplain.eval.sweep runs/sweep_plain30 runs/sweep_norm30 ... --task activation_patching --target smollm2
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from selfexplain.groundtruth.layout import RunLayout

from .differences import control_of, paired_difference
from .matrix import Cell
from .forms import form_of
from .rows import ROW_KINDS


def run_cells(run: Path, task: str, target: str, explainer: str) -> list[Cell]:
    """The scored cells of `explainer`'s rows in one run (as the eval stage wrote them)."""
    folder = RunLayout(run).eval_cell(task, target, "x").parent
    cells = [Cell(**json.loads(path.read_text())["cell"]) for path in sorted(folder.glob("*.json"))]
    return [c for c in cells if c.explainer == explainer and c.kind in ROW_KINDS]


def _value(cell: Cell, metric: str) -> str:
    m = cell.metrics
    if m.get(metric) is None:
        return "-"
    lo, hi = m.get(f"{metric}_lo"), m.get(f"{metric}_hi")
    return f"{m[metric]:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")


def _difference(d: Optional[dict]) -> str:
    return "-" if d is None else f"{d['difference']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def _control_label(cell: Cell) -> str:
    return cell.row.removeprefix(f"{cell.explainer} ")


def sweep_table(runs: list[Path], task: str, target: str, explainer: str) -> str:
    """A markdown table per compared metric: one line per run (the first is the reference), one column
    per control row any run has."""
    form = form_of(task)
    per_run = {run: run_cells(run, task, target, explainer) for run in runs}
    trained_of = {run: next((c for c in cells if c.kind == "trained" and c.size is None), None) for run, cells in per_run.items()}
    reference = trained_of[runs[0]]
    labels = list(dict.fromkeys(_control_label(c) for run, cells in per_run.items() for c in cells
                                if trained_of[run] is not None and control_of(c, trained_of[run])))
    lines = [f"### {task}, {explainer} on {target}", ""]
    for metric in form.compared:
        lines += [f"**{metric}**", "", f"| run | trained | {' | '.join(labels)} | trained - best control | trained - {runs[0].name} |",
                  "|---|---|" + "---|" * len(labels) + "---|---|"]
        for run, cells in per_run.items():
            trained = trained_of[run]
            if trained is None:
                lines.append(f"| {run.name} | (not scored) |" + " |" * (len(labels) + 2))
                continue
            controls = {_control_label(c): c for c in cells if control_of(c, trained) and c.metrics.get(metric) is not None}
            best = max(controls.values(), key=lambda c: c.metrics[metric], default=None)
            over_best = paired_difference(trained.units, best.units, form.aggregate, metric) if best else None
            over_ref = (paired_difference(trained.units, reference.units, form.aggregate, metric)
                        if reference is not None and trained is not reference else None)
            shown = [_value(controls[label], metric) if label in controls else "-" for label in labels]
            lines.append(f"| {run.name} | {_value(trained, metric)} | {' | '.join(shown)} | {_difference(over_best)} | "
                         f"{_difference(over_ref)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders; the first is the reference")
    parser.add_argument("--task", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--explainer", help="default: the target (self-explanation)")
    args = parser.parse_args(argv)
    print(sweep_table(args.runs, args.task, args.target, args.explainer or args.target))


if __name__ == "__main__":
    main()
