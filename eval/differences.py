"""The report's headline: each trained explainer minus its best control, and self minus cross, each with a
paired bootstrap 95% interval and a one-line reading.

Every cell of one (matrix task, target) is scored on the same test records in the same order, so two
rows compare record by record: one resample of record indices is applied to both, and the interval is
that of the difference (narrower than two independent intervals when the rows agree on most records).
Which metrics are compared is the task's scoring form's (`Form.compared`); which rows are controls is
the row kind's (`RowKind.control`) or the baseline's (`Baseline.control`: gold is a ceiling, not a control).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .agreement import AGREE, DISAGREE, subset
from .baselines import BASELINES
from .forms import form_of
from .metrics import BOOTSTRAP_RESAMPLES
from .rows import ROW_KINDS


def _difference(a: list, b: list, aggregate: Callable[[list], dict], metric: str,
                resamples: Iterable[tuple[Sequence[int], Sequence[int]]]) -> Optional[dict]:
    """metric(a) - metric(b), with the 2.5/97.5 percentiles of the difference over `resamples` (index
    arrays into a and into b); None when either side has no value of the metric."""
    point_a, point_b = aggregate(a).get(metric), aggregate(b).get(metric)
    if point_a is None or point_b is None:
        return None
    draws = []
    for rows_a, rows_b in resamples:
        x, y = aggregate([a[i] for i in rows_a]).get(metric), aggregate([b[i] for i in rows_b]).get(metric)
        if x is not None and y is not None:  # a resample without a changed record has no content_match_changed
            draws.append(x - y)
    lo, hi = np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan"))
    return {"difference": point_a - point_b, "lo": float(lo), "hi": float(hi)}


def paired_difference(a: list, b: list, aggregate: Callable[[list], dict], metric: str,
                      seed: int = 0) -> Optional[dict]:
    """metric(a) - metric(b) over the same units, with the 2.5/97.5 percentiles of the difference over
    BOOTSTRAP_RESAMPLES paired resamples; None when the rows do not cover the same units."""
    if not a or len(a) != len(b):
        return None
    rows = np.random.default_rng(seed).integers(0, len(a), size=(BOOTSTRAP_RESAMPLES, len(a)))
    return _difference(a, b, aggregate, metric, ((row, row) for row in rows))


def unpaired_difference(a: list, b: list, aggregate: Callable[[list], dict], metric: str,
                        seed: int = 0) -> Optional[dict]:
    """metric(a) - metric(b) for units of different records (two targets' test sets): each side resampled
    on its own, the 2.5/97.5 percentiles of the difference over BOOTSTRAP_RESAMPLES draws."""
    if not a or not b:
        return None
    rng = np.random.default_rng(seed)
    return _difference(a, b, aggregate, metric, ((rng.integers(0, len(a), len(a)), rng.integers(0, len(b), len(b)))
                                                 for _ in range(BOOTSTRAP_RESAMPLES)))


def reading(first: str, second: str, metric: str, d: dict) -> str:
    """One line a reader can quote: who beats whom by how much, or that this size cannot tell."""
    interval = f"{abs(d['difference']):.3f} [{min(abs(d['lo']), abs(d['hi'])):.3f}, {max(abs(d['lo']), abs(d['hi'])):.3f}]"
    if d["lo"] > 0:
        return f"{first} beats {second} on {metric} by {interval}"
    if d["hi"] < 0:
        return f"{second} beats {first} on {metric} by {interval}"
    return (f"{first} vs {second} on {metric}: no difference detectable at this size "
            f"({d['difference']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}])")


def _is_control(cell) -> bool:
    if cell.kind == "baseline":
        return cell.explainer in BASELINES and BASELINES[cell.explainer].control
    return cell.kind in ROW_KINDS and ROW_KINDS[cell.kind].control


def control_of(control, cell) -> bool:
    """Whether `control` is a control row of the trained cell: a baseline, or one of the explainer's control
    rows that reads its base model or the export of the same training size."""
    if not _is_control(control):
        return False
    if control.kind == "baseline":
        return True
    return control.explainer == cell.explainer and (control.size == cell.size or ROW_KINDS[control.kind].reads_base)


def _compare(first, second, metric: str, aggregate, comparison: str, flags: Optional[list] = None,
             want: Optional[bool] = None) -> Optional[dict]:
    """first - second on their units, or (flags given) on the units of records whose flag is `want`."""
    a, b = (first.units, second.units) if flags is None else (subset(first.units, flags, want), subset(second.units, flags, want))
    d = paired_difference(a, b, aggregate, metric)
    if d is None:
        return None
    return {"comparison": comparison, "target": first.target, "metric": metric, "first": first.row,
            "second": second.row, **d, "n": len(a), "reading": reading(first.row, second.row, metric, d),
            **({"examples_per_layer": first.metrics["examples_per_layer"]} if "examples_per_layer" in first.metrics else {})}


def headline_differences(cells: list, agreement: Optional[dict] = None) -> dict[str, list[dict]]:
    """matrix task -> its comparisons: per target and compared metric, each trained explainer (at each
    training size of the data-efficiency curve) against the control row that scores best on that metric
    (its own rows at its size or reading its base model, or a baseline), and the self-explainer against
    each other explainer trained on the same target at the same size: on all records, and where
    `agreement` ((task, target, other model) -> a flag per test record, eval/agreement.py) says, on the
    records where the other model as a target agrees and where it disagrees (against the control: where
    it disagrees). Cells without units are left out."""
    out: dict[str, list[dict]] = {}
    for task in dict.fromkeys(c.task for c in cells):
        form = form_of(task)
        mine = [c for c in cells if c.task == task and c.units]
        for target in dict.fromkeys(c.target for c in mine):
            here = [c for c in mine if c.target == target]
            trained = [c for c in here if c.kind == "trained"]
            for metric in form.compared:
                for cell in trained:
                    controls = [c for c in here if control_of(c, cell) and c.metrics.get(metric) is not None]
                    if controls:
                        # ties go by row name, so any order of the same cells names the same control
                        best = max(controls, key=lambda c: (c.metrics[metric], c.row))
                        out.setdefault(task, []).extend(_against_control(cell, best, metric, form.aggregate,
                                                                         agreement or {}))
                for own in (c for c in trained if c.explainer == target):
                    for cross in (c for c in trained if c.size == own.size and c is not own and c.explainer != target):
                        out.setdefault(task, []).extend(_self_vs_cross(own, cross, metric, form.aggregate, agreement or {}))
    return out


def control_differences(cells: list, kinds: Optional[Sequence[str]] = None) -> dict[str, list[dict]]:
    """matrix task -> per target and compared metric, each trained explainer (at each training size) minus
    each of its control rows (or, given `kinds`, those of these row kinds), on all records: the lift over
    zero v or over shuffled v beside the one over the best control."""
    out: dict[str, list[dict]] = {}
    for task in dict.fromkeys(c.task for c in cells):
        form = form_of(task)
        mine = [c for c in cells if c.task == task and c.units]
        for cell in (c for c in mine if c.kind == "trained"):
            controls = [c for c in mine if c.target == cell.target and control_of(c, cell)
                        and (kinds is None or c.kind in kinds)]
            for metric in form.compared:
                found = (_compare(cell, c, metric, form.aggregate, "trained - control") for c in controls)
                out.setdefault(task, []).extend(d for d in found if d)
    return out


def _against_control(cell, best, metric: str, aggregate, agreement: dict) -> list[dict]:
    """The trained row minus its best control on all records and on those where another model, as a target,
    labels the item otherwise: for a cross-explainer its own model; for a self-explainer each other model."""
    found = [_compare(cell, best, metric, aggregate, "trained - best control")]
    for (task, target, other), flags in agreement.items():
        mine = other == cell.explainer or cell.explainer == target
        if (task, target) == (cell.task, cell.target) and mine and len(flags) == len(cell.units):
            d = _compare(cell, best, metric, aggregate, f"trained - best control, {DISAGREE}", flags, False)
            found.append(d and {**d, "other": other})
    return [d for d in found if d]


def _self_vs_cross(own, cross, metric: str, aggregate, agreement: dict) -> list[dict]:
    found = [_compare(own, cross, metric, aggregate, "self - cross")]
    flags = agreement.get((own.task, own.target, cross.explainer))
    if flags is not None and len(flags) == len(own.units):
        found += [_compare(own, cross, metric, aggregate, f"self - cross, {name}", flags, want)
                  for name, want in ((AGREE, True), (DISAGREE, False))]
    return [d for d in found if d]


def random_target_differences(cells: list, twins: dict[str, str]) -> dict[str, list[dict]]:
    """matrix task -> per compared metric, each row that explains (trained explainers at full size, and
    baselines that are not controls, e.g. gold: the labels' own score) on a trained target minus the same
    row on its random-weights twin (`twins`: random target -> trained target), unpaired over the two test
    sets. A metric that scores both alike cannot tell an explanation of computation from one of noise."""
    out: dict[str, list[dict]] = {}
    for task in dict.fromkeys(c.task for c in cells):
        form = form_of(task)
        explains = {(c.row, c.target): c for c in cells if c.task == task and c.units and c.size is None
                    and not _is_control(c) and (c.kind == "baseline" or ROW_KINDS[c.kind].curve)}
        for random_target, trained_target in twins.items():
            for (row, target), cell in explains.items():
                twin = explains.get((row, random_target))
                if target != trained_target or twin is None:
                    continue
                for metric in form.compared:
                    d = unpaired_difference(cell.units, twin.units, form.aggregate, metric)
                    if d is not None:
                        out.setdefault(task, []).append({
                            "row": row, "target": trained_target, "random_target": random_target, "metric": metric, **d,
                            "reading": reading(f"{row} on {trained_target}", f"{row} on {random_target}", metric, d)})
    return out
