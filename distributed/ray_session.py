"""Starting and joining Ray, with the environment every worker process needs."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from selfexplain.training.allocator import ALLOCATOR_ENV

from .config import RayConfig

# Environment forwarded to every Ray worker: offline model loading, W&B mode, DeepSpeed's op cache,
# and the project's own switches (SELFEXPLAIN_*).
FORWARDED_PREFIXES = ("SELFEXPLAIN_", "HF_", "TRANSFORMERS_", "WANDB_", "TORCH_EXTENSIONS_DIR", "TOKENIZERS_",
                      "MALLOC_")


# Ray Train sends a worker's print() both to its logger and, since Ray wraps stdout, to stdout: every
# training line reached the driver twice. Unpatched, print goes to stdout once (and the dashboard's logs).
RAY_WORKER_DEFAULTS = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}

# A local Ray is one node, and no node of it drains: Ray Train's preemption watcher, an actor polling for
# node drains, would only be one more process waking the cores ~160 times a second beside the training
# threads (Ray's processes took ~0.1 of 2 cores and made the training threads lose their core 5x as often).
LOCAL_RAY_WORKER_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def worker_env(local: bool = False) -> dict[str, str]:
    """Environment for every Ray worker of this driver; `local`: a Ray this process starts."""
    forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}
    own = {**RAY_WORKER_DEFAULTS, **ALLOCATOR_ENV, **(LOCAL_RAY_WORKER_DEFAULTS if local else {})}
    defaults = {k: os.environ.get(k, v) for k, v in own.items()}  # the user's value wins
    return {**defaults, **forwarded}


@contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """ray.init for the block (local unless cfg.address), then ray.shutdown if we started it.

    Never `ray stop`: that ends every Ray process on the machine, not only ours.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs: dict = {"runtime_env": {"env_vars": worker_env(local=not cfg.address)}, "log_to_driver": True,
                    "namespace": "selfexplain"}
    if cfg.address:
        kwargs["address"] = cfg.address
        # Inside a submitted Ray job the job's runtime env is already set; without this Ray refuses a
        # driver runtime env that names any of the same variables (ours are forwarded from this very
        # environment, so the merged values agree).
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    else:
        kwargs["num_cpus"] = cfg.num_cpus or os.cpu_count()
        kwargs["include_dashboard"] = cfg.include_dashboard
        if cfg.temp_dir:
            kwargs["_temp_dir"] = os.path.abspath(cfg.temp_dir)
    ray.init(**kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def torch_threads(cpus: float) -> int:
    """Threads for a worker reserving `cpus` CPUs: at least 1, never more than it reserved."""
    return max(1, int(cpus))


def idle_share(cpus: float, actors: int, units: int) -> float:
    """CPUs each unit of a pool sized for `actors` workers of `cpus` CPUs reserves when the units are
    fewer than the workers: its share of the idle workers' CPUs too (one SAE to train, one validation
    sample), at most what the largest node has. GPUs stay one worker's: these units use one device."""
    import ray

    share = cpus * max(1, actors // max(units, 1))
    largest = max((node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]), default=cpus)
    return max(cpus, min(share, largest))
