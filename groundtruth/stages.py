"""How a task's ground truth is made, as data: a recipe of steps, the same for every task.

A recipe is steps, each a list of units still to do and a function that does one unit, then `finish`,
which writes the label statistics. A step says where its units run, not how they are spread: `target`
units need the frozen target model (an actor holding it), `task` units need only the files earlier steps
wrote (a task with an actor's resources), `driver` units run where the stage is driven. Every unit
writes its result itself and is skipped by `todo` once written, so a rerun finishes what an interrupted
one left. A per-item task (patching, ablation) declares `build_items` and `run`, and its recipe is made
from them (groundtruth/per_item.py); feature descriptions write theirs out (features/recipe.py).
`run_in_process` runs a recipe in one process (tests, a GPU check); distributed/gt_pool.py fans the same
steps out over Ray.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from .layout import LABEL_STATS
from .records import split_complete, write_atomic

Where = Literal["target", "task", "driver"]


@dataclass(frozen=True)
class StageContext:
    """What every step of one (task, target) reads; picklable, so a Ray worker gets it whole."""

    task: str
    task_cfg: Any
    target: str
    model: Any
    """The target's ModelSpec."""
    folder: Path
    """The (task, target) ground-truth folder: its splits are subfolders."""
    config_hash: str
    """What the ground truth depends on; also names the work folder, so a changed config never reads
    another's intermediate files."""
    seed: int
    batch_size: int
    shard_size: int
    """Records per shard of a finished split."""
    items_per_shard: int = 64
    """Work items per unit of a step that cuts its items (a per-item task's raw shards)."""

    @property
    def work(self) -> Path:
        return self.folder / "work" / self.config_hash[:16]

    def complete(self, *splits: str) -> bool:
        """Every split folder is a finished split of this config, every shard present."""
        return all(split_complete(self.folder / s, self.config_hash) for s in splits)


@dataclass(frozen=True)
class Step:
    name: str
    where: Where
    todo: Callable[[StageContext], list]
    """Units not done yet."""
    run: Callable[..., Any]
    """run(ctx, unit), or run(ctx, unit, model, tokenizer) for a `target` step; writes its own output."""
    collect: Optional[Callable[[StageContext, Any, Any], int]] = None
    """collect(ctx, unit, result) where the stage is driven, as each unit finishes (e.g. listing its
    shard in a manifest); returns the records it made, for the progress bar. None: an int result is
    that count."""

    def collected(self, ctx: StageContext, unit: Any, result: Any) -> int:
        if self.collect is not None:
            return self.collect(ctx, unit, result)
        return result if isinstance(result, int) else 0


@dataclass(frozen=True)
class StagedRecipe:
    steps: tuple[Step, ...]
    finish: Callable[[StageContext], dict]
    """After every step: writes and returns the label statistics."""
    splits: tuple[str, ...]
    """Split folders the recipe writes: a run whose splits are complete and has statistics is done."""
    plan: Callable[[Any, int, int], list[str]]
    """plan(task config, seed, items per shard) -> dry-run lines (sizes, sources), loading no model."""
    count_items: Callable[[Any, int], int]
    """count_items(task config, seed) -> work items per target (for the scale plan); raises
    FileNotFoundError or ValueError where a source is not on this machine."""

    def done(self, ctx: StageContext) -> Optional[dict]:
        """The label statistics of a finished run of this config, or None."""
        stats = ctx.folder / LABEL_STATS
        return json.loads(stats.read_text()) if stats.exists() and ctx.complete(*self.splits) else None


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a reader sees the old file or the whole new one."""
    write_atomic(path, json.dumps(data))


def run_in_process(recipe: StagedRecipe, ctx: StageContext) -> dict:
    """Every step of a recipe here, in order, the target loaded once if a step needs it."""
    stats = recipe.done(ctx)
    if stats is not None:
        return stats
    run_steps(recipe.steps, ctx)
    return recipe.finish(ctx)


def run_steps(steps: tuple[Step, ...], ctx: StageContext, target: Optional[tuple] = None) -> None:
    """Each step's units still to do, here, in order; the target (model, tokenizer) loaded on first need
    unless given."""
    from .models import load_model

    for step in steps:
        for unit in step.todo(ctx):
            if step.where == "target":
                target = target or load_model(ctx.model)
                result = step.run(ctx, unit, *target)
            else:
                result = step.run(ctx, unit)
            step.collected(ctx, unit, result)
