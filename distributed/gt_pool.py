"""Ground-truth stage: fans a task's ground truth out over Ray, by the strategy its spec declares
(groundtruth/stages.py); the method itself lives in groundtruth/.

Per-item task, per target: work items are cut into units of `items_per_shard`; each unit becomes one raw
shard, written atomically by the target actor that processed it and listed in the raw manifest by the
driver as it completes. A rerun skips listed shards; a unit whose actor died is redone on a new actor and
its shard (same name) replaces any partial one, so every record ends up present exactly once. Then the
driver balances each split and writes train/ and test/ shards with label statistics (`finalize`).

Staged task, per target: each step's units still to do go to target actors (`target` steps), to Ray
tasks with an actor's resources (`task` steps: each computes on the GPU it reserves) or run here
(`driver` steps); then the recipe's `finish` writes the label statistics.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from selfexplain.groundtruth.dataset import finalize, source_splits
from selfexplain.groundtruth.layout import RAW
from selfexplain.groundtruth.models import prepare
from selfexplain.groundtruth.records import (complete_shards, remove_temporaries, shard_name, temporary_name, write_manifest,
                                 write_shard, write_tar)
from selfexplain.groundtruth.stages import StageContext, StagedRecipe
from selfexplain.groundtruth.tasks import TASKS

from .actor_pool import inject_fault, run_pool
from .config import RunConfig
from .ray_session import torch_threads
from .target_actor import target_actor_class
from .tracking import log_progress
from .typed_yaml import stable_hash


def gt_hash(cfg: RunConfig, task: str, target: str) -> str:
    """What the shards of (task, target) depend on; a change makes existing shards unusable."""
    task_cfg = asdict(cfg.tasks[task])
    for name in type(cfg.tasks[task]).eval_only_fields:
        task_cfg.pop(name)
    for name in getattr(type(cfg.tasks[task]), "unset_keeps_hash", ()):
        if task_cfg[name] is None:
            task_cfg.pop(name)
    return stable_hash({"task": task_cfg, "target": asdict(cfg.models[target]),
                        "seed": cfg.seed, "items_per_shard": cfg.groundtruth.items_per_shard})


def stage_context(cfg: RunConfig, task: str, target: str) -> StageContext:
    gp = cfg.groundtruth
    return StageContext(task=task, task_cfg=cfg.tasks[task], target=target, model=cfg.models[target],
                        folder=cfg.layout.groundtruth(task, target), config_hash=gt_hash(cfg, task, target),
                        seed=cfg.seed, batch_size=gp.batch_size, shard_size=gp.shard_size)


def on_target_actors(cfg: RunConfig, model_spec, units: list, call: Callable[[Any, Any], Any],
                     on_result: Callable[[Any, Any], int], desc: str) -> None:
    """call(actor, unit) for every unit on the stage's pool of target actors."""
    gp = cfg.groundtruth
    prepare(model_spec)  # dequantise packaged weights once, before actors race to it
    actor_cls = target_actor_class(cfg)
    run_pool(make_actor=lambda: actor_cls.remote(model_spec, torch_threads(gp.actor_cpus)), n_actors=gp.actors,
             units=units, call=call, on_result=on_result, max_retries=gp.max_retries, desc=desc)


def process_unit(ctx: StageContext, unit: int, items: list, out_path: str, model, tokenizer) -> dict:
    """One unit of a per-item task on a target actor: its records as one raw shard."""
    records = TASKS[ctx.task].run(model, tokenizer, items, ctx.task_cfg, ctx.target, source_splits(ctx), ctx.batch_size)
    inject_fault(unit, lambda: write_tar(temporary_name(Path(out_path)), records[: len(records) // 2]))
    return write_shard(Path(out_path), records)


def run_items(cfg: RunConfig, ctx: StageContext, units: list[list]) -> dict:
    """A per-item task on one target: the raw shards not made yet, then balance and split."""
    raw = ctx.folder / RAW
    done = complete_shards(raw, ctx.config_hash)
    todo = [i for i in range(len(units)) if shard_name(i) not in done]
    manifest = {"config_hash": ctx.config_hash, "shards": dict(done), "complete": False}

    def on_result(unit: int, entry: dict) -> int:
        manifest["shards"][shard_name(unit)] = entry
        write_manifest(raw, manifest)
        return entry["count"]

    on_target_actors(cfg, ctx.model, todo, on_result=on_result, desc=f"groundtruth {ctx.task}/{ctx.target}",
                     call=lambda actor, unit: actor.call.remote(process_unit, ctx, unit, units[unit],
                                                                str(raw / shard_name(unit))))
    removed = remove_temporaries(raw)
    if removed:
        print(f"[groundtruth] {ctx.task}/{ctx.target}: removed {removed} half-written shard(s) of dead actors", flush=True)
    manifest["complete"] = True
    manifest["count"] = sum(e["count"] for e in manifest["shards"].values())
    write_manifest(raw, manifest)
    return finalize(ctx.folder, TASKS[ctx.task], ctx.task_cfg, ctx.config_hash, ctx.seed, ctx.shard_size)


def _call_step(fn: Callable, ctx: StageContext, unit: Any, threads: int) -> Any:
    import torch

    torch.set_num_threads(threads)
    return fn(ctx, unit)


def _run_tasks(fn, args: list[tuple], desc: str) -> None:
    """fn.remote(*a) for every a, with a progress bar (Ray retries lost tasks; an error raises)."""
    import ray

    pending = [fn.remote(*a) for a in args]
    with tqdm(total=len(pending), desc=desc, dynamic_ncols=True) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready[0])
            bar.update(1)
            log_progress(desc, {"units_done": bar.n, "units_total": bar.total})


def run_staged(cfg: RunConfig, recipe: StagedRecipe, ctx: StageContext) -> dict:
    """A staged task on one target: each step's remaining units where the step says, then finish."""
    import ray

    stats = recipe.done(ctx)
    if stats is not None:
        return stats
    gp = cfg.groundtruth
    as_task = ray.remote(num_cpus=gp.actor_cpus, num_gpus=gp.actor_gpus, max_retries=gp.max_retries)(_call_step)
    for step in recipe.steps:
        units, desc = step.todo(ctx), f"{step.name} {ctx.task}/{ctx.target}"
        if not units:
            continue
        if step.where == "target":
            on_target_actors(cfg, ctx.model, units, call=lambda actor, unit: actor.call.remote(step.run, ctx, unit),
                             on_result=lambda unit, produced: produced if isinstance(produced, int) else 0, desc=desc)
        elif step.where == "task":
            _run_tasks(as_task, [(step.run, ctx, unit, torch_threads(gp.actor_cpus)) for unit in units], desc)
        else:
            for unit in units:
                step.run(ctx, unit)
    return recipe.finish(ctx)


def run_groundtruth(cfg: RunConfig) -> dict:
    """Generate (or finish) ground truth for every enabled task and target; returns label stats."""
    stats: dict = {}
    for task, task_cfg in cfg.tasks.items():
        spec = TASKS[task]
        if spec.staged is None:
            items = spec.build_items(task_cfg, cfg.seed)
            per = cfg.groundtruth.items_per_shard
            units = [items[i:i + per] for i in range(0, len(items), per)]
        for target in cfg.targets:
            ctx = stage_context(cfg, task, target)
            stats.setdefault(task, {})[target] = (run_staged(cfg, spec.staged, ctx) if spec.staged else
                                                  run_items(cfg, ctx, units))
    return stats
