"""The explain stage: a trained explainer asked about every unit its task declares on one target, the
chunks spread over Ray actors (the eval stage's resources: one actor per GPU where there are GPUs), then a
validation sample, the Neuronpedia export and the HTML browser. The method is eval/explain_units.py and
eval/explain_validation.py; this module only spreads it.

Each chunk becomes one shard, written atomically by the actor that explained it and listed in the
manifest by the driver as it completes: a rerun skips listed shards, a chunk whose actor died is redone
on a new actor (its shard, same name, replaces any partial one), so every unit is written exactly once.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Optional

from selfexplain.eval.explain_outputs import BROWSER, NEURONPEDIA, browser_title, write_browser, write_feature_export
from selfexplain.eval.explain_units import ExplainJob, UnitExplainer, read_rows, shard_file, task_units, write_rows
from selfexplain.eval.explain_validation import VALIDATION, sample_rows, summary_lines, validate
from selfexplain.groundtruth.errors import ConfigError, DataSourceError
from selfexplain.groundtruth.faults import inject_fault
from selfexplain.groundtruth.records import (complete_shards, iter_records, read_manifest, remove_temporaries, safe_key,
                                             temporary_name, write_atomic, write_manifest)
from selfexplain.groundtruth.tasks import TASKS
from selfexplain.training.export import read_metadata

from .actor_pool import run_pool
from .config import RunConfig
from .gt_pool import TargetActors, run_steps, stage_context
from .ray_session import idle_share, torch_threads
from .scaling import gpu_hours, shape_of
from .typed_yaml import stable_hash


class ExplainWorker:
    """A Ray actor holding one explainer (and the target, when the task's questions need it)."""

    def __init__(self, job: ExplainJob, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.worker = UnitExplainer(job)

    def chunk(self, index: int, chunk) -> dict:
        rows = self.worker.rows(chunk)
        path = Path(self.worker.job.out) / shard_file(index)
        inject_fault(index, lambda: write_atomic(temporary_name(path), json.dumps(rows[: len(rows) // 2])))
        return write_rows(path, rows)

    def validate(self, sample: list[dict], eligible: int, seed: int) -> dict:
        return validate(self.worker.job, self.worker.explainer, self.worker.target(), sample, eligible, seed)


def explain_job(cfg: RunConfig, task: str, explainer: str, target: str, export: Optional[str] = None,
                limit: Optional[int] = None, layers: Optional[list[int]] = None, chunk_size: Optional[int] = None,
                source: Optional[str] = None) -> ExplainJob:
    """The job `selfexplain explain` runs: the run's trained explainer (or an export folder) on the run's
    ground-truth context of (task, target), or on a context of its own for the units of `source`."""
    units, name = task_units(task), f"{explainer}_on_{target}"
    ctx = stage_context(cfg, task, target)
    train = cfg.layout.split(task, target, "train")
    trained_on = frozenset(r.source_id for r in iter_records(train)) if (train / "manifest.json").exists() else frozenset()
    if source is not None:
        if units.with_source is None:
            raise ConfigError(f"--source: task {task!r} explains only the units its ground truth analysed")
        tag = safe_key(source.rstrip("/").split("/")[-1]) + "-" + stable_hash(source)[:8]
        name, trained_on = f"{name}_{tag}", frozenset()  # nothing of another source was trained on
        task_cfg = units.with_source(cfg.tasks[task], source, layers)
        ctx = dataclasses.replace(ctx, task_cfg=task_cfg, folder=cfg.run_dir / "explain" / task / name / "groundtruth",
                                  config_hash=stable_hash([ctx.config_hash, dataclasses.asdict(task_cfg)]))
    export = export or str(cfg.layout.explainer(task, target, explainer) / "export")
    return ExplainJob(ctx, export, str(cfg.run_dir / "explain" / task / name), explainer,
                      chunk_size or units.chunk_size, limit, tuple(layers) if layers else None,
                      cfg.eval.budget_for(task), cfg.eval.batch_size, trained_on, source)


def prepare_source(cfg: RunConfig, job: ExplainJob) -> None:
    """A --source job's own ground-truth context, made by the task's prepare steps (skipped where done)."""
    if job.source is not None and job.units.prepare:
        with TargetActors(cfg) as actors:
            run_steps(cfg, job.units.prepare, job.ctx, actors)


def job_hash(job: ExplainJob) -> str:
    """What the shards depend on: the units (ground truth, chunks, limit, layers) and the explainer."""
    return stable_hash([job.ctx.config_hash, (Path(job.export) / "selfexplain.json").read_text(), job.chunk_size,
                        job.limit, job.layers, job.max_new_tokens])


def plan_explain(cfg: RunConfig, job: ExplainJob) -> list[str]:
    """Dry-run lines: the work items, units and shards, what is done, and the explainer's GPU-hours."""
    units = job.units
    chunks = job.chunks()
    items = sum(len(c) for c in chunks)
    per = units.units_per_item(job.ctx.task_cfg)
    spec, shape = TASKS[job.ctx.task], shape_of(cfg.models[job.explainer])
    lines = [f"explain {job.ctx.task}: {job.explainer} on {job.ctx.target}: {items} {units.unit_name}s "
             + (f"(~{items * per} units) " if per != 1 else "") + f"in {len(chunks)} shards -> {job.out}"]
    done = Path(job.out) / "manifest.json"
    if done.exists():
        lines.append(f"  {len(read_manifest(Path(job.out))['shards'])} shards already written")
    if shape is not None:
        flops = 2 * shape.params * (spec.work.explainer_tokens + job.max_new_tokens) * items * per
        lines.append(f"  explainer: {flops:.2e} FLOPs, {gpu_hours(flops, cfg.scale, training=False):,.2f} GPU-h "
                     f"(inference utilisation {cfg.scale.inference_utilisation:g})")
    return lines


def run_explain(cfg: RunConfig, job: ExplainJob, validate_n: int = 200) -> dict:
    """Every chunk not written yet, on the eval stage's actors; then validation, exports and the browser.
    Returns the validation (also in validation.json)."""
    out = Path(job.out)
    if not (Path(job.export) / "selfexplain.json").exists():
        raise DataSourceError(f"no trained explainer at {job.export}: run the train stage first (or give --export)")
    prepare_source(cfg, job)
    key, chunks = job_hash(job), job.chunks()
    done = complete_shards(out, key)
    manifest = {"config_hash": key, "shards": dict(done), "complete": False}
    todo = [i for i in range(len(chunks)) if shard_file(i) not in done]

    def on_result(index: int, entry: dict) -> int:
        manifest["shards"][shard_file(index)] = entry
        write_manifest(out, manifest)
        return entry["count"]

    out.mkdir(parents=True, exist_ok=True)
    on_workers(cfg, job, todo, lambda actor, index: actor.chunk.remote(index, chunks[index]), on_result, "explain", "shard")
    remove_temporaries(out)
    if todo or not read_manifest(out).get("complete"):
        manifest["complete"] = True
        manifest["count"] = sum(e["count"] for e in manifest["shards"].values())
        write_manifest(out, manifest)
    rows = read_rows(out, manifest)
    return finish_explain(cfg, job, rows, key, validate_n)


def finish_explain(cfg: RunConfig, job: ExplainJob, rows: list[dict], key: str, validate_n: int) -> dict:
    """validation.json, the Neuronpedia export and the browser, each made again only when the units or the
    sample size changed (or it is missing)."""
    out = Path(job.out)
    path = out / VALIDATION
    validation = json.loads(path.read_text()) if path.exists() else {}
    fresh = validation.get("key") == [key, validate_n]
    if not fresh:
        validation = {**validate_sample(cfg, job, rows, validate_n), "key": [key, validate_n]}
        write_atomic(path, json.dumps(validation, indent=1))
    units = job.units
    if units.feature_of is not None and not (fresh and (out / NEURONPEDIA).exists()):
        meta = read_metadata(Path(job.export))
        write_feature_export(out, rows, lambda row: units.feature_of(row["query"]), validation,
                             cfg.models[job.ctx.target].source, "selfexplain", meta.get("explainer", job.explainer))
    if not (fresh and (out / BROWSER).exists()):
        write_browser(out / BROWSER, rows, validation,
                      browser_title(job.ctx.task, job.explainer, job.ctx.target, len(rows)), summary_lines(validation))
    return validation


def validate_sample(cfg: RunConfig, job: ExplainJob, rows: list[dict], validate_n: int) -> dict:
    """The validation of a seeded sample, on an actor of the eval stage's resources."""
    sample = sample_rows(rows, validate_n, cfg.seed)
    eligible = sum(not r["trained_on"] for r in rows)
    results: list[dict] = []
    on_workers(cfg, job, [0], lambda actor, _: actor.validate.remote(sample, eligible, cfg.seed),
               lambda _, result: results.append(result) or len(sample), "validate", "sample")
    return results[0]


def on_workers(cfg: RunConfig, job: ExplainJob, units: list, call: Callable, on_result: Callable[[Any, Any], int],
               verb: str, unit_name: str) -> None:
    """call(actor, unit) for every unit on ExplainWorker actors with the eval stage's resources (fewer units
    than actors: each actor also takes the idle ones' CPUs)."""
    import ray

    ec = cfg.eval
    cpus = idle_share(ec.actor_cpus, ec.actors, len(units))
    actor_cls = ray.remote(num_cpus=cpus, num_gpus=ec.actor_gpus, max_restarts=0)(ExplainWorker)
    run_pool(make_actor=lambda: actor_cls.remote(job, torch_threads(cpus)), n_actors=ec.actors, units=units,
             call=call, on_result=on_result, max_retries=ec.max_retries,
             desc=f"{verb} {job.ctx.task}/{job.explainer}_on_{job.ctx.target}", unit_name=unit_name)
