"""Ground-truth stage: fans each task's recipe (groundtruth/stages.py) out over Ray, per target; the
method itself lives in groundtruth/.

Each step's units still to do go to target actors (`target` steps; an actor that dies is replaced and its
unit redone, and a unit writes its output atomically, so nothing is lost or doubled), to Ray tasks with
an actor's resources (`task` steps: each computes on the GPU it reserves), or run here (`driver` steps);
each unit's result is collected here as it finishes; then the recipe's `finish` writes the label
statistics. A per-item task's recipe is its raw shards, then balancing and splitting
(groundtruth/per_item.py).
"""
from __future__ import annotations

from dataclasses import asdict
from functools import partial
from typing import Any, Callable

from tqdm import tqdm

from selfexplain.groundtruth.models import prepare
from selfexplain.groundtruth.stages import StageContext, StagedRecipe, Step
from selfexplain.groundtruth.tasks import TASKS

from .actor_pool import run_pool
from .config import RunConfig
from .ray_session import idle_share, torch_threads
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
                        seed=cfg.seed, batch_size=gp.batch_size, shard_size=gp.shard_size,
                        items_per_shard=gp.items_per_shard)


class TargetActors:
    """The stage's live target actors, each holding one model, kept from one `target` step to the next:
    the tasks of one target run one after another on the same actors instead of each step loading the
    model again (a model load and an actor start took about 10 s per step on 2 CPUs; a 70B model's
    load takes minutes). Released when the model changes and before a `task` step, whose Ray tasks need
    the CPUs and GPUs the actors hold."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.spec, self.actors = cfg, None, []

    def run(self, model_spec, units: list, call: Callable[[Any, Any], Any], on_result: Callable[[Any, Any], int],
            desc: str) -> None:
        """call(actor, unit) for every unit on the pool of target actors of model_spec."""
        gp = self.cfg.groundtruth
        if model_spec != self.spec:
            self.release()
            prepare(model_spec)  # dequantise packaged weights once, before actors race to it
            self.spec = model_spec
        actor_cls = target_actor_class(self.cfg)
        run_pool(make_actor=lambda: actor_cls.remote(model_spec, torch_threads(gp.actor_cpus)), n_actors=gp.actors,
                 units=units, call=call, on_result=on_result, max_retries=gp.max_retries, desc=desc, kept=self.actors)

    def release(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors.clear()

    def __enter__(self) -> "TargetActors":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _call_step(fn: Callable, ctx: StageContext, unit: Any, threads: int) -> Any:
    import torch

    torch.set_num_threads(threads)
    return fn(ctx, unit)


def _run_tasks(fn, units: list, args: Callable[[Any], tuple], on_result: Callable[[Any, Any], int], desc: str) -> None:
    """fn.remote(*args(unit)) for every unit, on_result(unit, result) as each finishes, with a progress
    bar (Ray retries lost tasks; an error raises)."""
    import ray

    pending = {fn.remote(*args(unit)): unit for unit in units}
    with tqdm(total=len(pending), desc=desc, dynamic_ncols=True) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            on_result(pending.pop(ready[0]), ray.get(ready[0]))
            bar.update(1)
            log_progress(desc, {"units_done": bar.n, "units_total": bar.total})


def run_steps(cfg: RunConfig, steps: tuple[Step, ...], ctx: StageContext, actors: TargetActors) -> None:
    """Each step's remaining units where the step says, in order (`target` steps on `actors`)."""
    import ray

    gp = cfg.groundtruth
    for step in steps:
        units, desc = step.todo(ctx), f"{step.name} {ctx.task}/{ctx.target}"
        if not units:
            continue
        if step.where == "target":
            actors.run(ctx.model, units, call=lambda actor, unit: actor.call.remote(step.run, ctx, unit),
                       on_result=partial(step.collected, ctx), desc=desc)
        elif step.where == "task":
            actors.release()
            cpus = idle_share(gp.actor_cpus, gp.actors, len(units))
            as_task = ray.remote(num_cpus=cpus, num_gpus=gp.actor_gpus, max_retries=gp.max_retries)(_call_step)
            _run_tasks(as_task, units, lambda unit: (step.run, ctx, unit, torch_threads(cpus)),
                       partial(step.collected, ctx), desc)
        else:
            for unit in units:
                step.collected(ctx, unit, step.run(ctx, unit))


def run_recipe(cfg: RunConfig, recipe: StagedRecipe, ctx: StageContext, actors: TargetActors) -> dict:
    """A task's ground truth on one target: each step, then finish (read back if already finished)."""
    stats = recipe.done(ctx)
    if stats is not None:
        return stats
    run_steps(cfg, recipe.steps, ctx, actors)
    return recipe.finish(ctx)


def run_groundtruth(cfg: RunConfig) -> dict:
    """Generate (or finish) ground truth for every enabled task and target, target by target so that its
    tasks share the target's actors; returns label stats as {task: {target: stats}}."""
    stats: dict = {task: {} for task in cfg.tasks}  # filled target by target: each task's targets in order
    with TargetActors(cfg) as actors:
        for target in cfg.targets:
            for task in cfg.tasks:
                stats[task][target] = run_recipe(cfg, TASKS[task].recipe, stage_context(cfg, task, target), actors)
    return stats
