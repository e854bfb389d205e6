"""The ground-truth actor: one copy of a frozen target model that runs whatever function it is handed.

It knows no task: a recipe's `target` step is a plain function called as fn(*args, model, tokenizer), so a
new task or step needs nothing here.
"""
from __future__ import annotations

from typing import Any, Callable


class TargetWorker:
    def __init__(self, spec, threads: int):
        import torch

        from selfexplain.groundtruth.models import load_model

        torch.set_num_threads(threads)
        self.model, self.tokenizer = load_model(spec)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args, self.model, self.tokenizer)


def target_actor_class(cfg):
    """TargetWorker as a Ray actor class with the ground-truth stage's resources (restarts are the
    pool's job: it replaces a dead actor and redoes its unit)."""
    import ray

    gp = cfg.groundtruth
    return ray.remote(num_cpus=gp.actor_cpus, num_gpus=gp.actor_gpus, max_restarts=0)(TargetWorker)
