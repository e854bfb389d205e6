"""Ground-truth stage: a Ray actor pool runs a task's technique on the target and writes shards.

Per (task, target): work items are cut into units of `items_per_shard`; each unit becomes one raw
shard, written atomically by the actor that processed it and listed in the raw manifest by the driver
as it completes. A rerun skips listed shards; a unit whose actor died is redone on a new actor and
its shard (same name) replaces any partial one, so every record ends up present exactly once. Then
the driver balances each split and writes train/ and test/ shards with label statistics.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

from groundtruth.dataset import finalize, split_of
from groundtruth.layout import RAW
from groundtruth.models import prepare
from groundtruth.records import (Record, complete_shards, remove_temporaries, shard_name, temporary_name, write_manifest,
                                 write_shard, write_tar)
from groundtruth.tasks import TASKS

from .actor_pool import run_pool
from .config import RunConfig
from .ray_session import torch_threads
from .typed_yaml import stable_hash

EVAL_ONLY_FIELDS = ("judge", "data_efficiency")  # task fields that do not change the ground truth
FAULT_ENV = "SELFEXPLAIN_GT_FAULT"
"""Fault injection for tests: comma-separated "<action>:<unit>:<marker file>", each done once (the marker
records it, with the node it happened on). kill: write half a shard, then exit hard. hang: stop before
writing (until the actor's node is removed)."""


def gt_hash(cfg: RunConfig, task: str, target: str) -> str:
    """What the shards of (task, target) depend on; a change makes existing shards unusable."""
    task_cfg = asdict(cfg.tasks[task])
    for name in EVAL_ONLY_FIELDS:  # settings read after ground truth is made
        task_cfg.pop(name, None)
    return stable_hash({"task": task_cfg, "target": asdict(cfg.models[target]),
                        "seed": cfg.seed, "items_per_shard": cfg.groundtruth.items_per_shard})


class GroundTruthWorker:
    """One copy of the target model; turns units of work items into raw shards."""

    def __init__(self, spec, threads: int):
        import torch

        from groundtruth.models import load_model

        torch.set_num_threads(threads)
        self.model, self.tokenizer = load_model(spec)

    def process(self, task: str, task_cfg, target: str, unit: int, items: list, out_path: str,
                test_fraction: float, seed: int, batch_size: int) -> dict:
        records = TASKS[task].run(self.model, self.tokenizer, items, task_cfg, target,
                                  lambda source: split_of(source, test_fraction, seed), batch_size)
        _inject_fault(unit, Path(out_path), records)
        return write_shard(Path(out_path), records)

    def activations(self, task_cfg, texts: list[str], out_path: str, batch_size: int) -> int:
        """Feature descriptions, step 1: the residual stream at the task's layers over corpus texts,
        streamed into a shard folder (one .npy per layer, renamed when complete); returns the token count."""
        from groundtruth.features.activations import write_activations
        from groundtruth.features.task import target_layers

        layers = target_layers(task_cfg, self.model.config.num_hidden_layers)
        return write_activations(self.model, self.tokenizer, texts, layers, Path(out_path), batch_size,
                                 task_cfg.max_tokens)

    def last_token_states(self, texts: list[str], layer: int, batch_size: int):
        """The residual stream after `layer` at each text's last token: [n, d] (the dACT set)."""
        import numpy as np
        import torch

        from groundtruth.patching import clean_runs

        states = []
        for start in range(0, len(texts), batch_size):
            ids = [torch.tensor(self.tokenizer(t)["input_ids"]) for t in texts[start:start + batch_size]]
            states += [run.states[layer + 1, -1].float().cpu().numpy() for run in clean_runs(self.model, ids)]
        return np.stack(states)


def _inject_fault(unit: int, out_path: Path, records: list[Record]) -> None:
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        action, index, marker = spec.split(":", 2)
        if int(index) != unit or Path(marker).exists():
            continue
        import ray

        Path(marker).write_text(ray.get_runtime_context().get_node_id())
        if action == "kill":
            write_tar(temporary_name(out_path), records[: len(records) // 2])  # half a shard, never renamed
            os._exit(1)
        if action == "hang":
            while True:
                time.sleep(1)
        raise ValueError(f"{FAULT_ENV}: unknown action {action!r} (kill or hang)")


def run_groundtruth(cfg: RunConfig) -> dict:
    """Generate (or finish) ground truth for every enabled task and target; returns label stats."""
    import ray

    from .feature_stage import run_feature_groundtruth

    pc = cfg.groundtruth
    stats: dict = {}
    for task, task_cfg in cfg.tasks.items():
        spec = TASKS[task]
        if spec.build_items is None:  # a staged task (feature descriptions) with its own steps
            for target in cfg.targets:
                stats.setdefault(task, {})[target] = run_feature_groundtruth(
                    cfg, task, task_cfg, target, cfg.layout.groundtruth(task, target), gt_hash(cfg, task, target))
            continue
        items = spec.build_items(task_cfg, cfg.seed)
        units = [items[i:i + pc.items_per_shard] for i in range(0, len(items), pc.items_per_shard)]
        for target in cfg.targets:
            folder, config_hash = cfg.layout.groundtruth(task, target), gt_hash(cfg, task, target)
            raw = folder / RAW
            done = complete_shards(raw, config_hash)
            todo = [i for i in range(len(units)) if shard_name(i) not in done]
            manifest = {"config_hash": config_hash, "shards": dict(done), "complete": False}
            if todo:
                model_spec = cfg.models[target]
                prepare(model_spec)  # dequantise packaged weights once, before actors race to it
                actor_cls = ray.remote(num_cpus=pc.actor_cpus, num_gpus=pc.actor_gpus, max_restarts=0)(GroundTruthWorker)

                def on_result(unit: int, entry: dict) -> int:
                    manifest["shards"][shard_name(unit)] = entry
                    write_manifest(raw, manifest)
                    return entry["count"]

                run_pool(
                    make_actor=lambda: actor_cls.remote(model_spec, torch_threads(pc.actor_cpus)),
                    n_actors=pc.actors, units=todo,
                    call=lambda actor, unit: actor.process.remote(
                        task, task_cfg, target, unit, units[unit], str(raw / shard_name(unit)),
                        task_cfg.test_fraction, cfg.seed, pc.batch_size),
                    on_result=on_result, max_retries=pc.max_retries, desc=f"groundtruth {task}/{target}",
                )
            removed = remove_temporaries(raw)
            if removed:
                print(f"[groundtruth] {task}/{target}: removed {removed} half-written shard(s) of dead actors", flush=True)
            manifest["complete"] = True
            manifest["count"] = sum(e["count"] for e in manifest["shards"].values())
            write_manifest(raw, manifest)
            stats.setdefault(task, {})[target] = finalize(folder, task_cfg, config_hash, cfg.seed, pc.shard_size)
    return stats
