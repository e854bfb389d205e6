"""Training stage: every (task, target, explainer) fine-tuned through Ray Train + DeepSpeed, or in-process."""
from __future__ import annotations

import os
from pathlib import Path

from groundtruth.models import prepare
from training.export import export_matches
from training.step import TrainJob, prefit_projections, run_training

from .config import RunConfig
from .gt_pool import gt_dir
from .ray_session import torch_threads


def explainer_dir(cfg: RunConfig, task: str, target: str, explainer: str) -> Path:
    return cfg.run_dir / "explainers" / task / f"{explainer}_on_{target}"


def train_jobs(cfg: RunConfig) -> list[TrainJob]:
    """One job per enabled task, target and explainer; plus, for a task with a data-efficiency curve,
    one per size for each self-explainer (trained on the first n records of each layer)."""
    jobs = []
    for task, task_cfg in cfg.tasks.enabled().items():
        for target in cfg.targets:
            for explainer in cfg.explainers:
                sizes = getattr(task_cfg, "data_efficiency", []) if explainer == target else []
                for n in [None, *sizes]:
                    folder = explainer_dir(cfg, task, target, explainer)
                    jobs.append(TrainJob(
                        task=task, target=target, explainer=explainer, explainer_spec=cfg.models[explainer],
                        data_dir=str(gt_dir(cfg, task, target) / "train"),
                        out_dir=str(folder if n is None else folder.with_name(f"{folder.name}_{n}_per_layer")),
                        train=cfg.train, seed=cfg.seed, target_spec=cfg.models[target], max_records_per_layer=n))
    return jobs


def _ray_worker_loop(config: dict) -> None:
    """Body of each Ray Train worker: threads, DeepSpeed's env, then the plain training loop."""
    import ray.train
    import torch

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    os.environ.update({"RANK": str(ctx.get_world_rank()), "WORLD_SIZE": str(ctx.get_world_size()),
                       "LOCAL_RANK": str(ctx.get_local_rank()), "LOCAL_SIZE": str(ctx.get_local_world_size())})
    run_training(TrainJob.from_json(config["job"]), report=lambda metrics: ray.train.report(metrics))


def fit_with_ray(job: TrainJob) -> None:
    """Run one job on job.train.num_workers Ray Train workers (gloo on CPU, nccl on GPUs)."""
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tc = job.train
    trainer = TorchTrainer(
        _ray_worker_loop,
        train_loop_config={"job": job.to_json(), "threads": torch_threads(tc.worker_cpus)},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.worker_cpus}),
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        # a crashed worker restarts the group, which resumes from the newest DeepSpeed checkpoint
        run_config=RayRunConfig(name=f"{job.explainer}_on_{job.target}", storage_path=str(Path(job.out_dir) / "ray"),
                                failure_config=FailureConfig(max_failures=2)),
    )
    trainer.fit()


def run_train_stage(cfg: RunConfig) -> list[Path]:
    """Train every explainer whose export is missing or stale; return the export folders."""
    exports = []
    jobs = train_jobs(cfg)
    todo = [job for job in jobs if not export_matches(job)]
    for job in todo:
        prepare(job.explainer_spec)
    prefit_projections(todo)  # one lstsq fit per (explainer, target) pair, shared by its tasks
    for job in jobs:
        subset = f" ({job.max_records_per_layer} records per layer)" if job.max_records_per_layer else ""
        if job not in todo:
            print(f"[train] {job.task}: {job.explainer} on {job.target}{subset} already exported, skipping", flush=True)
        else:
            print(f"[train] {job.task}: {job.explainer} on {job.target}{subset} "
                  f"({'Ray Train, ' + str(job.train.num_workers) + ' workers' if job.train.use_ray else 'in-process'}, "
                  f"ZeRO-{job.train.zero_stage})", flush=True)
            if job.train.use_ray:
                fit_with_ray(job)
            else:
                run_training(job)
            if not export_matches(job):
                raise RuntimeError(f"training of {job.explainer} on {job.target} ended without a matching export in {job.export_dir}")
        exports.append(job.export_dir)
    return exports
