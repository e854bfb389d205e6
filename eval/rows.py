"""Eval rows as data: each kind of explainer row, what it reads and where it applies.

The eval stage and the dry run both plan a matrix's rows from ROW_KINDS; adding a control row (a zero or
shuffled vector, an explainer trained without v, ...) is one `register_row_kind` call. A row applies by
the task's capabilities (`TaskSpec.has_vectors`, `selfie`) and the eval settings, never by task name.
Baselines, which need no explainer, are the other registry (eval/baselines.py).
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional

import numpy as np

from selfexplain.groundtruth.registry import register
from selfexplain.groundtruth.taskspec import TaskSpec
from selfexplain.training.controls import TRAINED_CONTROLS


@dataclass(frozen=True)
class RowKind:
    name: str
    label: str
    """Row name; {explainer} and {trained} ("trained", or for a data-efficiency job's row "trained, n per
    layer") are filled in."""
    applies: Callable[[TaskSpec, str, Any], bool]
    """(task spec, split, eval settings) -> whether the row is in that split's matrix."""
    reads_base: bool = False
    """Reads the explainer's base weights (and the Pi training started from) instead of its export."""
    with_vector: bool = True
    """The [vec] triple and v are in the prompt (for tasks with vectors)."""
    scaled: bool = False
    """SelfIE: one generation per eval.selfie_scales with v unit-normalised and scaled; the best is reported."""
    per_size: bool = False
    """Also one row per data-efficiency job (trained on n records per layer) beside the full-data job's:
    the trained row and the controls that read its export, so each point of the curve has its controls."""
    per_control: bool = False
    """One row per trained-control job (training/controls.py); the control's rewrite applies to the test
    records too, so its explainer is scored on what it was trained to see."""
    curve: bool = False
    """A point of the data-efficiency curve (its cell records the job's records per layer)."""
    control: bool = False
    """A control: the report's headline compares each trained explainer with its best control row."""
    rewrite: Optional[Callable[[list], list]] = None
    """The test records as this row's explainer sees them, e.g. with v zeroed or shuffled across records
    (a control row); None: as they are. Scores are always against the records' own labels."""


ROW_KINDS: dict[str, RowKind] = {}


def register_row_kind(kind: RowKind) -> RowKind:
    return register(ROW_KINDS, kind, "row kind")


def _test_only(split: str) -> bool:
    return split == "test"


def zero_vectors(records: list) -> list:
    """Every v replaced by zeros: what the explainer says with nothing to read."""
    return [dataclasses.replace(r, vector=np.zeros_like(r.vector)) for r in records]


def shuffled_vectors(records: list) -> list:
    """Every v replaced by another test record's v from the same layers (a seeded derangement within each
    layer group; a group of one keeps its own): what the explainer says reading the wrong vector."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(tuple(r.layers), []).append(i)
    vectors = [r.vector for r in records]
    for key, members in groups.items():
        takes = cyclic_derangement(sorted(members, key=lambda i: records[i].record_id), f"shuffled:{key}")
        for i, other in takes.items():
            vectors[i] = records[other].vector
    return [dataclasses.replace(r, vector=v) for r, v in zip(records, vectors)]


def cyclic_derangement(items: list, seed: str) -> dict:
    """item -> the item whose place it takes: one cycle through a seeded shuffle of `items`, so nothing
    keeps its own place (a single item does)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return {item: order[(at + 1) % len(order)] for at, item in enumerate(order)}


def _vector_control(spec: TaskSpec, split: str, ec: Any) -> bool:
    return _test_only(split) and spec.has_vectors and ec.vector_controls


register_row_kind(RowKind("trained", "{explainer} {trained}", lambda spec, split, ec: True, per_size=True, curve=True))
register_row_kind(RowKind(  # the paper's check of how much v matters
    "no_vector", "{explainer} {trained}, no vector",
    lambda spec, split, ec: _test_only(split) and spec.has_vectors and ec.no_vector, with_vector=False,
    per_size=True, control=True))
register_row_kind(RowKind("trained_control", "{explainer} {control}", lambda spec, split, ec: _test_only(split),
                          per_control=True, control=True))
register_row_kind(RowKind("zero_vector", "{explainer} {trained}, zero v", _vector_control, rewrite=zero_vectors,
                          per_size=True, control=True))
register_row_kind(RowKind("shuffled_vector", "{explainer} {trained}, shuffled v", _vector_control,
                          rewrite=shuffled_vectors, per_size=True, control=True))
register_row_kind(RowKind("untrained", "{explainer} untrained", lambda spec, split, ec: _test_only(split) and ec.untrained,
                          reads_base=True, control=True))
register_row_kind(RowKind("selfie", "{explainer} SelfIE",
                          lambda spec, split, ec: _test_only(split) and spec.selfie and bool(ec.selfie_scales),
                          reads_base=True, scaled=True, control=True))


@dataclass(frozen=True)
class PlannedRow:
    kind: RowKind
    label: str
    job: Any  # the training job whose export (or base model) the row reads


def trained_label(size: Optional[int]) -> str:
    """What a row's label calls its explainer's training: on all records, or on n per layer."""
    return "trained" if size is None else f"trained, {size} per layer"


def plan_rows(spec: TaskSpec, split: str, settings: Any, explainer: str, job: Any,
              subsets: Optional[list] = None, controls: Optional[list] = None) -> list[PlannedRow]:
    """One explainer's rows of a (task, split): `job` is its full-data training job, `subsets` its
    data-efficiency jobs (each with max_records_per_layer; their rows are on the test split only),
    `controls` its trained-control jobs."""
    rows = []
    sized = (subsets or []) if _test_only(split) else []
    for kind in ROW_KINDS.values():
        if not kind.applies(spec, split, settings):
            continue
        if kind.per_control:
            rows += [PlannedRow(kind, kind.label.format(explainer=explainer, control=TRAINED_CONTROLS[j.control].label), j)
                     for j in controls or []]
            continue
        for j in [job, *(sized if kind.per_size else [])]:
            rows.append(PlannedRow(kind, kind.label.format(explainer=explainer, trained=trained_label(getattr(j, "max_records_per_layer", None))),
                                    j))
    return rows


def applicable_controls(spec: TaskSpec, settings: Any) -> list[str]:
    """The trained controls of the eval settings that apply to a task (each trains its own explainer)."""
    return [c for c in getattr(settings, "trained_controls", []) if TRAINED_CONTROLS[c].applies(spec)]


def control_placeholders(spec: TaskSpec, settings: Any) -> list:
    """Stand-ins for the control jobs of a task, for counting its rows before any job exists (dry run)."""
    return [SimpleNamespace(control=c) for c in applicable_controls(spec, settings)]


def row_records(kind: RowKind, job: Any, records: list) -> list:
    """The test records as a row's explainer sees them: its kind's rewrite, then its job's control's."""
    records = kind.rewrite(records) if kind.rewrite else records
    return TRAINED_CONTROLS[job.control].rewrite(records) if getattr(job, "control", None) else records
