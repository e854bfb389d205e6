"""The Ray Train worker benchmark: one training job run by a Ray Train worker vs the same loop in this
process, and the two measurements that tell where the difference goes."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from benchmarks.setting import Setting, recipe_zero_stage, train_records

STEPS, ROUNDS = 15, 2
"""Steps per job (the log's steps 5, 10 and 15 time steps 6-15: the first ones hold the warm-up, the
second step took 1.7x the others) and rounds of every way, interleaved (one way's runs differed by up to
10% on this machine)."""


def _idle_ray_train_job(config: dict) -> None:
    """A Ray Train worker that waits for its stop file: Ray Train's processes up, no work."""
    while not os.path.exists(config["stop"]):
        time.sleep(0.5)


def _beside_idle_ray_train(root: Path, cpus: int, run: Callable[[], None]) -> None:
    """run() in this process while a local Ray of `cpus` CPUs (as the pipeline starts it) holds an idle Ray
    Train job."""
    from ray.train import RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from selfexplain.distributed.config import RayConfig
    from selfexplain.distributed.ray_session import ray_session

    stop = root / "stop_idle_job"
    stop.unlink(missing_ok=True)  # an earlier round's
    with ray_session(RayConfig(num_cpus=cpus)):
        trainer = TorchTrainer(_idle_ray_train_job, train_loop_config={"stop": str(stop)},
                               scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                               run_config=RayRunConfig(storage_path=str(root / "idle_storage")))
        idle = threading.Thread(target=trainer.fit)
        idle.start()
        try:
            time.sleep(20)  # the controller, its helper actors and the worker started
            run()
        finally:
            stop.touch()
            idle.join()


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _seconds_per_step(train_log: Path) -> float:
    log = [json.loads(line) for line in train_log.read_text().splitlines()][-3:]  # steps 5, 10, 15
    return (log[-1]["seconds"] - log[0]["seconds"]) / (log[-1]["step"] - log[0]["step"])


def bench_ray_train_worker(s: Setting) -> dict:
    """One training job (SmolLM2 at the CPU recipe's ZeRO stage, micro batch 8, all this machine's
    threads) run by a Ray Train worker vs in this process: seconds per optimizer step from the job's own
    log, written every 5 steps as the recipes log; fast: the Ray worker (ratio = in-process / Ray, so 1.0
    means no cost). Each round also takes two measurements that tell where the difference goes:
    - the in-process loop while an idle Ray Train job is up: the cost of Ray's processes sharing the
      cores, apart from the worker's own (Ray's processes take about 0.09 cores in 2000 wakeups a second
      on this machine; that share costs the two lock-step training threads more than its size: 14 plain
      processes waking 100 times a second for 60 us each, 0.084 cores, slowed the in-process loop 10%);
    - the job with one thread fewer both ways, the Ray worker reserving that many CPUs of a Ray of all
      the machine's cores: with a core spare for Ray's processes, what the Ray worker itself costs.
    CPU only: on a GPU gpu_check times the jobs themselves."""
    if s.device != "cpu":
        return s.skip("ray_train_worker", "measured on CPU workers only")
    from selfexplain.distributed.config import RayConfig
    from selfexplain.distributed.ray_session import ray_session
    from selfexplain.distributed.train_job import fit_with_ray
    from selfexplain.groundtruth.records import write_split
    from selfexplain.training.job import TrainConfig, TrainJob
    from selfexplain.training.step import run_training

    threads, stage = torch.get_num_threads(), recipe_zero_stage(s)
    spare = max(1, threads - 1)
    root = Path(tempfile.mkdtemp(prefix="bench_ray_train_"))
    write_split(root / "data", train_records(STEPS * 8), "h", shard_size=32)

    def job(name: str, cpus: int) -> TrainJob:
        cfg = TrainConfig(micro_batch_size=8, lr=1e-5, max_steps=STEPS, log_every=5, checkpoint_every=STEPS,
                          train_embeddings=False, prompt_format="plain", worker_cpus=float(cpus), zero_stage=stage)
        return TrainJob("input_ablation", "smollm2", "smollm2", s.spec("smollm2-135m-instruct"),
                        str(root / "data"), str(root / name), cfg)

    def in_process(j: TrainJob) -> None:
        with _torch_threads(int(j.train.worker_cpus)):
            run_training(j)

    def by_ray_train(j: TrainJob) -> None:
        with ray_session(RayConfig(num_cpus=threads)):  # as the pipeline starts a local Ray
            fit_with_ray([j], root / "ray_storage" / Path(j.out_dir).name)

    ways: dict[str, tuple[Callable[[TrainJob], None], int]] = {
        "in_process": (in_process, threads), "ray": (by_ray_train, threads),
        "in_process_beside_idle_ray_train": (lambda j: _beside_idle_ray_train(root, threads, lambda: in_process(j)),
                                             threads),
        "in_process_one_core_spare": (in_process, spare), "ray_one_core_spare": (by_ray_train, spare)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for r in range(ROUNDS):
            for name, (run, cpus) in ways.items():
                j = job(f"{name}{r}", cpus)
                run(j)
                times[name].append(_seconds_per_step(j.train_log))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    return s.write("ray_train_worker", med["ray"], med["in_process"], 0.9,
                   {"model": "smollm2-135m-instruct", "steps": STEPS, "micro_batch": 8, "zero_stage": stage,
                    "rounds": ROUNDS, "fast": f"Ray Train worker ({threads} CPUs)", "naive": "the same loop in this process"},
                   seconds_per_step={name: [round(x, 3) for x in t] for name, t in times.items()},
                   ray_worker_vs_in_process_beside_ray=round(med["in_process_beside_idle_ray_train"] / med["ray"], 3),
                   one_core_spare={"threads": spare,
                                   "ratio": round(med["in_process_one_core_spare"] / med["ray_one_core_spare"], 3)})
