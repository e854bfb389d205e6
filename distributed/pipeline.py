"""The pipeline: groundtruth -> train -> eval -> report, each stage resumable, plus the dry-run plan."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from selfexplain.eval.agreement import agreement
from selfexplain.eval.baselines import BASELINES
from selfexplain.eval.matrix import add_projection_errors, build_matrix, write_matrix
from selfexplain.eval.report import export_results, write_report
from selfexplain.eval.rows import control_placeholders, plan_rows
from selfexplain.groundtruth.errors import BadInput
from selfexplain.groundtruth.models import describe, random_twins
from selfexplain.groundtruth.records import iter_records
from selfexplain.groundtruth.tasks import TASKS
from selfexplain.training.export import METADATA, CheckpointMismatch, read_metadata
from selfexplain.training.job import deepspeed_config
from selfexplain.training.model_card import write_model_card

from .config import RunConfig, save_resolved
from .eval_pool import run_eval_stage, test_records
from .gt_pool import run_groundtruth
from .preflight import check_inputs
from .ray_session import ray_session
from .scaling import scale_plan
from .tracking import log_progress, log_to_wandb, pipeline_run
from .train_job import describe_job, run_train_stage, train_jobs
from .typed_yaml import to_dict

STAGES = ("groundtruth", "train", "eval", "report")


def collect_label_stats(cfg: RunConfig) -> dict:
    stats: dict = {}
    for task in cfg.tasks:
        for target in cfg.targets:
            path = cfg.layout.label_stats(task, target)
            if path.exists():
                stats.setdefault(task, {})[target] = json.loads(path.read_text())
    return stats


def collect_projection_errors(cfg: RunConfig) -> dict:
    """lstsq fit errors of the exported explainers: task -> 'explainer<-target' -> key -> errors."""
    errors: dict = {}
    for job in train_jobs(cfg):
        meta = job.export_dir / METADATA
        if meta.exists():
            projection = json.loads(meta.read_text()).get("projection") or {}
            if projection.get("fit_error"):
                errors.setdefault(job.task, {})[f"{job.explainer}<-{job.target}"] = projection["fit_error"]
    return errors


def collect_agreement(cfg: RunConfig) -> dict:
    """(task, target, other model) -> per test record of the target, whether the other model as a target
    labels the same item alike (eval/agreement.py); for every cross-explainer's model that is a target too."""
    out, made = {}, {}

    def ground_truth(task: str, model: str) -> list:  # every record the model made as a target, read once
        if (task, model) not in made:
            splits = ("raw",) if cfg.layout.split(task, model, "raw").exists() else ("train", "test")
            made[(task, model)] = [r for s in splits if cfg.layout.split(task, model, s).exists()
                                   for r in iter_records(cfg.layout.split(task, model, s))]
        return made[(task, model)]

    for task in cfg.tasks:
        for target in cfg.targets:
            others = [m for m in cfg.explainers if m != target and m in cfg.targets]
            test = test_records(cfg, task, target) if others else []
            for other in others:
                flags = agreement(task, test, ground_truth(task, other))
                if flags is not None:
                    out[(task, target, other)] = flags
    return out


def eval_and_matrix(cfg: RunConfig) -> dict:
    cells = run_eval_stage(cfg)
    twins = random_twins(cfg.models, cfg.targets)
    matrix = add_projection_errors(build_matrix(cells, collect_label_stats(cfg), collect_agreement(cfg), twins),
                                   collect_projection_errors(cfg))
    write_matrix(cfg.layout.matrix, matrix)
    return matrix


def update_model_cards(cfg: RunConfig, matrix: dict) -> None:
    """Each export's model card gains its matrix cells, controls and baselines beside them."""
    for job in train_jobs(cfg):
        try:
            meta = read_metadata(job.export_dir)
        except CheckpointMismatch:  # not exported, or of an earlier format (eval named the conversion)
            continue
        write_model_card(job.export_dir, meta, export_results(matrix, job.task, job.explainer, job.target) or None)


def report(cfg: RunConfig) -> Path:
    path = cfg.layout.matrix
    if not path.exists():
        raise BadInput(f"{path} does not exist: run the eval stage first")
    matrix = json.loads(path.read_text())
    md = write_report(cfg.layout, matrix, cfg.name)
    update_model_cards(cfg, matrix)
    wandb_dir = log_to_wandb(cfg, matrix, cfg.layout.figures())
    print(f"[report] {md}" + (f"; W&B run in {wandb_dir}" if wandb_dir else ""), flush=True)
    return md


@contextmanager
def timed(stage: str) -> Iterator[None]:
    """A stage's wall time, on the console and into the pipeline's W&B run: where a run's time went."""
    started = time.time()
    yield
    seconds = time.time() - started
    print(f"[{stage}] done in {seconds / 60:.1f} min", flush=True)
    log_progress(stage, {"seconds": seconds})


def run(cfg: RunConfig, stages: tuple[str, ...] = STAGES) -> None:
    """Run the given stages in order inside one Ray session (report needs none), after checking their
    inputs; config.resolved.yaml is written when they succeed, so it describes what the folder holds."""
    check_inputs(cfg, stages)
    needs_ray = any(s in stages for s in ("groundtruth", "eval")) or ("train" in stages and cfg.train.use_ray)
    steps = {"groundtruth": run_groundtruth, "train": run_train_stage, "eval": eval_and_matrix}
    with pipeline_run(cfg):  # W&B: ground truth's and eval's progress as they go, then the results
        with ray_session(cfg.ray) if needs_ray else nullcontext():
            for stage in (s for s in STAGES if s in steps and s in stages):
                with timed(stage):
                    steps[stage](cfg)
        if "report" in stages:
            report(cfg)
    save_resolved(cfg)


def plan(cfg: RunConfig) -> str:
    """What a run would do, computed without loading any model."""
    gp, tc, ec = cfg.groundtruth, cfg.train, cfg.eval
    lines = [f"run {cfg.name} -> {cfg.run_dir}", f"ray: {cfg.ray.address or 'local (started here)'}", "models:"]
    lines += [f"  {name}: {spec.source} ({describe(spec.source)}, {spec.dtype})" for name, spec in cfg.models.items()]
    lines.append(f"targets: {', '.join(cfg.targets)}; explainers: {', '.join(cfg.explainers)}")
    for task, task_cfg in cfg.tasks.items():
        lines += [f"task {task}: " + "\n".join(TASKS[task].recipe.plan(task_cfg, cfg.seed, gp.items_per_shard)),
                  f"  groundtruth: {gp.actors} actors x ({gp.actor_cpus} CPU, {gp.actor_gpus} GPU), batch {gp.batch_size}"]
    jobs = train_jobs(cfg)
    lines.append(f"train: {len(jobs)} explainer jobs, {'Ray Train' if tc.use_ray else 'in-process'} with "
                 f"{tc.num_workers} workers x ({tc.worker_cpus} CPU{', 1 GPU' if tc.use_gpu else ''}), "
                 + (f"{tc.concurrent_groups} groups at once, " if tc.use_ray and tc.concurrent_groups > 1 else "")
                 + (f"LoRA r={tc.lora.r} on {', '.join(tc.lora.target_modules)}" if tc.lora else "full fine-tune"))
    for j in jobs:
        reads = (f", reads v through Pi '{tc.projection.kind_for(j.explainer, j.target)}'"
                 if TASKS[j.task].has_vectors else "")
        lines.append(f"  {describe_job(j)}{reads} -> {j.export_dir}")
    lines.append("  deepspeed config: " + json.dumps(deepspeed_config(tc, tc.num_workers)))
    lines.append(f"eval: {ec.actors} actors x ({ec.actor_cpus} CPU, {ec.actor_gpus} GPU), batch {ec.batch_size}")
    for task in cfg.tasks:
        spec = TASKS[task]
        per_explainer = len(plan_rows(spec, "test", ec, "", None, controls=control_placeholders(spec, ec)))
        # (without the data-efficiency rows)
        baselines = sum(BASELINES[b].applies_to(task) for b in ec.baselines)
        rows = len(cfg.explainers) * per_explainer + baselines
        lines.append(f"  {task}: {rows} rows x {len(cfg.targets)} targets")
        for split in spec.eval_splits[1:]:
            rows = len(cfg.explainers) * len(plan_rows(spec, split, ec, "", None)) + baselines
            lines.append(f"  {task}:{split}: {rows} rows x {len(cfg.targets)} targets")
    lines.append(f"wandb: {'off' if not cfg.wandb.enabled else cfg.wandb.mode} (project {cfg.wandb.project})")
    if tc.use_gpu or gp.actor_gpus or ec.actor_gpus:  # a GPU-cluster recipe: what it will cost
        lines += scale_plan(cfg)
    lines.append("resolved config:\n" + json.dumps(to_dict(cfg), indent=1))
    return "\n".join(lines)
