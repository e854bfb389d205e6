"""Registry of ground-truth tasks: how to build a task's work items and run its technique on a batch.

A task plugs into the pipeline by adding a TaskSpec here and a config field in distributed/config.py's
TasksConfig of the same name. Per-item tasks (ablation, patching) give build_items and run; the
feature-description task runs its own steps (distributed/feature_stage.py) and gives neither.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import ablation, patching_task
from .features import task as feature_task
from .records import Record


@dataclass(frozen=True)
class TaskSpec:
    name: str
    build_items: Optional[Callable[[Any, int], list]]  # (task config, seed) -> items; each has .source_id
    run: Optional[Callable[..., list]]  # (model, tokenizer, items, task config, target, split_of, batch_size) -> records
    explanation_tokens: int  # max new tokens when an explainer answers (the paper: 50 for causal tasks, 20 for A)
    has_vectors: bool = False  # records carry a vector the explainer reads through [vec]
    balance_cell: Optional[Callable[[Record], str]] = None  # cells balancing spreads records over
    eval_splits: tuple[str, ...] = ("test",)  # splits eval scores: test, then out-of-distribution sets
    selfie: bool = False  # eval adds the SelfIE row (untrained explainer, scaled v)


TASKS: dict[str, TaskSpec] = {
    ablation.TASK: TaskSpec(ablation.TASK, ablation.build_items, ablation.run_ablation, explanation_tokens=50),
    patching_task.TASK: TaskSpec(patching_task.TASK, patching_task.build_items, patching_task.run_patching,
                                 explanation_tokens=50, has_vectors=True, balance_cell=patching_task.balance_cell),
    feature_task.TASK: TaskSpec(feature_task.TASK, None, None, explanation_tokens=20, has_vectors=True,
                                eval_splits=("test",) + feature_task.OOD_SPLITS, selfie=True),
}
