"""A training job's live curves: one W&B run per job, opened by rank 0, grouped under the pipeline's run,
logging loss, learning rate, tokens/s and memory at every step while the job trains (offline by default;
`wandb sync` uploads). Jobs without W&B settings (tests, `wandb.mode: disabled`) log nothing here; the
loss log train_log.jsonl is written either way."""
from __future__ import annotations

import resource
from dataclasses import asdict
from pathlib import Path

import torch

from .job import TrainJob


def job_name(out_dir: Path) -> str:
    """A training job's name from its folder: '<task>/<explainer>_on_<target>' (plus the variant: subset size,
    control), as the run folder names it."""
    out = Path(out_dir)
    return f"{out.parent.name}/{out.name}"


def job_run_name(group: str, name: str) -> str:
    """A job's W&B run name: its pipeline's group, then job_name."""
    return f"{group}/{name}"


def memory_gb(device: torch.device) -> float:
    """Peak memory of this rank so far: the GPU's allocator on CUDA, the process's resident set elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class JobCurves:
    """Rank 0's W&B run of one training job (a no-op on other ranks and without settings)."""

    def __init__(self, job: TrainJob, rank: int):
        self.run = None
        if rank != 0 or job.wandb is None:
            return
        import wandb

        w = job.wandb
        self.run = wandb.init(project=w.project, entity=w.entity, mode=w.mode, group=w.group, dir=w.dir,
                              name=job_run_name(w.group, job_name(job.out_dir)), job_type="train", reinit="create_new",
                              config={"task": job.task, "target": job.target, "explainer": job.explainer,
                                      "explainer_spec": job.explainer_spec.source, "control": job.control,
                                      "records_per_layer": job.max_records_per_layer, "seed": job.seed,
                                      "train": asdict(job.train)},
                              settings=wandb.Settings(silent=True, console="off"))

    def log(self, step: int, values: dict) -> None:
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

