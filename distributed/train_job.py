"""Training stage: every (task, target, explainer) fine-tuned through Ray Train + DeepSpeed, or in-process."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from selfexplain.eval.rows import applicable_controls
from selfexplain.groundtruth.errors import DataSourceError
from selfexplain.groundtruth.models import prepare
from selfexplain.groundtruth.records import MANIFEST
from selfexplain.groundtruth.tasks import TASKS
from selfexplain.training.controls import TRAINED_CONTROLS
from selfexplain.training.projection import Projection
from selfexplain.training.export import export_differences, export_matches
from selfexplain.training.job import TrainJob
from selfexplain.training.preemption import PreemptionWatch, TrainingPreempted
from selfexplain.training.step import run_training
from selfexplain.training.vectors import FitMany, fit_each, fit_for_job, prefit_projections

from .config import RunConfig
from .ray_session import torch_threads
from .tracking import job_wandb


def train_jobs(cfg: RunConfig) -> list[TrainJob]:
    """One job per enabled task, target and explainer; for a task with a data-efficiency curve, one per
    size for each self-explainer (eval.data_efficiency_for: all, each explainer) trained on the first n
    records of each layer; and one per trained control of eval.trained_controls that applies to the
    task (training/controls.py)."""
    jobs = []
    for task in cfg.tasks:
        controls = applicable_controls(TASKS[task], cfg.eval)
        for target in cfg.targets:
            for explainer in cfg.explainers:
                own = explainer == target
                sizes = cfg.eval.data_efficiency.get(task, []) if own or cfg.eval.data_efficiency_for == "all" else []
                mine = controls if own or cfg.eval.trained_controls_for == "all" else []
                variants = [(n, None) for n in [None, *sizes]] + [(None, c) for c in mine]
                for n, control in variants:
                    jobs.append(TrainJob(
                        task=task, target=target, explainer=explainer, explainer_spec=cfg.models[explainer],
                        data_dir=str(cfg.layout.split(task, target, "train")),
                        out_dir=str(cfg.layout.explainer(task, target, explainer, n, control)),
                        train=cfg.train.for_task(task), seed=cfg.seed, target_spec=cfg.models[target], max_records_per_layer=n,
                        control=control, wandb=job_wandb(cfg)))
    return jobs


def ready_for_ranks(jobs: list[TrainJob], fit_many: FitMany) -> None:
    """What the jobs' ranks would otherwise each do: packaged models dequantised once, and one lstsq fit
    per (explainer, target) pair, shared by its tasks (`fit_many` runs them)."""
    for job in jobs:
        prepare(job.explainer_spec)
    prefit_projections(jobs, fit_many)


def write_job_files(cfg: RunConfig) -> list[Path]:
    """One JOB.json per training job under <run>/jobs/, for `python -m selfexplain.training.step JOB.json` under
    torchrun (cluster/slurm_torchrun.sbatch: training without Ray). The jobs' lstsq Pi are fitted here
    first, once per (explainer, target) pair, into each job's folder, where its ranks load them: a rank
    holds one GPU, too little for both models of a 70B pair."""
    jobs = train_jobs(cfg)
    missing = sorted({job.data_dir for job in jobs if not (Path(job.data_dir) / MANIFEST).exists()})
    if missing:
        raise DataSourceError(f"no ground truth at {', '.join(missing)}; run `selfexplain groundtruth` first")
    ready_for_ranks(jobs, fit_each)
    folder = cfg.layout.jobs
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for job in jobs:
        path = folder / f"{job.task}__{Path(job.out_dir).name}.json"
        path.write_text(job.to_json())
        paths.append(path)
    return paths


def describe_job(job: TrainJob) -> str:
    subset = f" ({job.max_records_per_layer} records per layer)" if job.max_records_per_layer else ""
    control = f" ({TRAINED_CONTROLS[job.control].label})" if job.control else ""
    return f"{job.task}: {job.explainer} on {job.target}{subset}{control}"


def _ray_worker_loop(config: dict) -> None:
    """Body of each Ray Train worker: threads, DeepSpeed's env, then the plain training loop for each
    job in turn. One worker group serves every job: starting a group (processes, imports, the gloo
    group) cost about 20 s per job on 2 CPUs, a fifth of a quickstart job. A restarted group skips the
    jobs already exported and resumes the interrupted one from its newest checkpoint."""
    import gc

    import ray.train
    import ray.train.torch
    import torch

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()  # Ray Train knows which of the node's GPUs is this worker's
    os.environ.update({"RANK": str(ctx.get_world_rank()), "WORLD_SIZE": str(ctx.get_world_size()),
                       "LOCAL_RANK": str(ctx.get_local_rank()), "LOCAL_SIZE": str(ctx.get_local_world_size())})
    for text in config["jobs"]:
        job = TrainJob.from_json(text)
        if export_matches(job):
            continue
        if job.stop_file.exists():  # SIGTERM reached the driver between two jobs: start no new one
            return
        if ctx.get_world_rank() == 0:
            print(f"[train] {describe_job(job)}", flush=True)
        try:
            run_training(job, report=lambda metrics: ray.train.report(metrics), device=device)
        except TrainingPreempted:  # the driver got SIGTERM: checkpoint written, end the group cleanly
            return
        gc.collect()  # the finished engine's weights and optimizer state, before the next model loads


def deal(jobs: list[TrainJob], groups: int, weight: Callable[[TrainJob], float]) -> list[list[TrainJob]]:
    """The jobs split among `groups` worker groups, heaviest first to the lightest-loaded group (each
    group keeps the stage's order), so the groups finish close together; empty groups are dropped."""
    weights = [weight(job) for job in jobs]
    loads, shares = [0.0] * groups, [[] for _ in range(groups)]
    for index in sorted(range(len(jobs)), key=lambda i: -weights[i]):
        lightest = loads.index(min(loads))
        loads[lightest] += weights[index]
        shares[lightest].append(index)
    return [[jobs[i] for i in sorted(share)] for share in shares if share]


def explainer_weight(job: TrainJob) -> float:
    """A job's relative cost: its explainer's weights on disk (steps are alike within a stage's tasks)."""
    folder = Path(prepare(job.explainer_spec))
    return float(sum(f.stat().st_size for f in folder.glob("*.safetensors"))) if folder.is_dir() else 1.0


def fit_with_ray(jobs: list[TrainJob], storage: Path) -> None:
    """Run the jobs on train.concurrent_groups groups of train.num_workers Ray Train workers at once (gloo
    on CPU, nccl on GPUs), each group its share one after another; the jobs share one TrainConfig
    (resources, ZeRO stage)."""
    shares = deal(jobs, jobs[0].train.concurrent_groups, explainer_weight)
    if len(shares) == 1:
        _fit_group(shares[0], storage, "explainers")
        return
    from concurrent.futures import ThreadPoolExecutor

    # Ray Train runs a trainer off the main thread (as under Tune); result() raises a group's failure
    with ThreadPoolExecutor(len(shares)) as pool:
        for done in [pool.submit(_fit_group, share, storage, f"explainers_{i}") for i, share in enumerate(shares)]:
            done.result()


def _fit_group(jobs: list[TrainJob], storage: Path, name: str) -> None:
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tc = jobs[0].train
    trainer = TorchTrainer(
        _ray_worker_loop,
        train_loop_config={"jobs": [job.to_json() for job in jobs], "threads": torch_threads(tc.worker_cpus)},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.worker_cpus}),
        torch_config=TorchConfig(backend=tc.backend or ("nccl" if tc.use_gpu else "gloo")),
        # a crashed worker restarts the group, which resumes from the newest DeepSpeed checkpoint
        run_config=RayRunConfig(name=name, storage_path=str(storage),
                                failure_config=FailureConfig(max_failures=2)),
    )
    trainer.fit()


def _fit_task(job: TrainJob, keys: list[str], threads: int) -> Projection:
    import torch

    torch.set_num_threads(threads)
    return fit_for_job(job, keys)


def projection_fitter(cfg: RunConfig) -> FitMany:
    """How the stage runs its lstsq fits: side by side as Ray tasks with an evaluator's resources (a fit
    runs the target and the explainer, as an evaluator runs explainers: on its GPU where eval.actor_gpus
    says so), or one after another in this process when no Ray session is up (train.use_ray: false)."""
    import ray

    if not ray.is_initialized():
        return fit_each
    ec = cfg.eval
    remote = ray.remote(num_cpus=ec.actor_cpus, num_gpus=ec.actor_gpus, max_retries=ec.max_retries)(_fit_task)
    threads = torch_threads(ec.actor_cpus)
    return lambda fits: ray.get([remote.remote(job, keys, threads) for job, keys in fits])


def run_train_stage(cfg: RunConfig) -> list[Path]:
    """Train every explainer whose export is missing or stale; return the export folders."""
    jobs = train_jobs(cfg)
    todo = []
    for job in jobs:
        differs = export_differences(job)
        if differs == []:
            print(f"[train] {describe_job(job)} already exported, skipping", flush=True)
            continue
        if differs:
            print(f"[train] {describe_job(job)}: the export differs in {', '.join(differs)}; training again", flush=True)
        todo.append(job)
    ready_for_ranks(todo, projection_fitter(cfg))
    if todo:
        tc = cfg.train
        print(f"[train] {len(todo)} explainers to train "
              f"({'Ray Train, ' + str(tc.num_workers) + ' workers' if tc.use_ray else 'in-process'}, "
              + (f"{tc.concurrent_groups} groups at once, " if tc.use_ray and tc.concurrent_groups > 1 else "")
              + f"ZeRO-{tc.zero_stage})", flush=True)
        for job in todo:
            job.stop_file.unlink(missing_ok=True)  # left by an earlier preempted run
        if tc.use_ray:
            # SIGTERM (preemption) reaches this driver, not the ranks: they checkpoint on its stop files
            with PreemptionWatch(relay_to=[job.stop_file for job in todo]) as watch:
                fit_with_ray(todo, cfg.layout.ray_train)
            if watch.signalled:
                print("[train] SIGTERM: every running explainer wrote a checkpoint; rerun to resume", flush=True)
                raise TrainingPreempted(None)
        else:
            for job in todo:
                print(f"[train] {describe_job(job)}", flush=True)
                run_training(job)
    for job in todo:
        if not export_matches(job):
            raise RuntimeError(f"training of {describe_job(job)} ended without a matching export in {job.export_dir}")
    return [job.export_dir for job in jobs]
