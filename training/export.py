"""Trained explainers as Hugging Face folders, with metadata that ties them to their config."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from groundtruth.models import ModelSpec, load_model

if TYPE_CHECKING:
    from .step import TrainJob

METADATA = "selfexplain.json"


class CheckpointMismatch(ValueError):
    """An exported explainer that was trained for another base model, task or target."""


def job_identity(job: "TrainJob") -> dict:
    """What an export must match to be reused: base model, task, target, data and hyperparameters."""
    return {
        "task": job.task,
        "target": job.target,
        "explainer": job.explainer,
        "explainer_spec": dataclasses.asdict(job.explainer_spec),
        "data_dir": str(Path(job.data_dir).resolve()),
        "train": dataclasses.asdict(job.train) | {"use_ray": None, "num_workers": None, "worker_cpus": None},
    }


def export_explainer(engine, wrapper, tokenizer, job: "TrainJob", rank: int, steps: int) -> Path:
    """Write job.export_dir atomically (full weights gathered under ZeRO-3). Call on every rank."""
    state = None
    if engine.zero_optimization_stage() == 3:
        full = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank takes part
        if rank == 0:
            state = {k.removeprefix("model."): v for k, v in full.items()}
    if rank != 0:
        return job.export_dir
    out = job.export_dir
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    wrapper.model.save_pretrained(tmp, state_dict=state)
    tokenizer.save_pretrained(tmp)
    (tmp / METADATA).write_text(json.dumps({**job_identity(job), "steps": steps}, indent=1, sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def export_matches(job: "TrainJob") -> bool:
    """True when job.export_dir holds a finished export of exactly this job (the stage can be skipped)."""
    meta = job.export_dir / METADATA
    if not meta.exists():
        return False
    saved = json.loads(meta.read_text())
    saved.pop("steps", None)
    return saved == job_identity(job)


def load_explainer(folder: Path, expect: dict):
    """Load an exported explainer, failing with the differing fields if it was made for something else.

    `expect` holds the metadata fields that must agree (e.g. task, target, explainer_spec).
    """
    meta_path = Path(folder) / METADATA
    if not meta_path.exists():
        raise CheckpointMismatch(f"{folder} is not a finished explainer export (no {METADATA}); rerun the train stage")
    meta = json.loads(meta_path.read_text())
    wrong = {k: (meta.get(k), v) for k, v in expect.items() if meta.get(k) != v}
    if wrong:
        detail = "; ".join(f"{k}: checkpoint has {have!r}, config says {want!r}" for k, (have, want) in wrong.items())
        raise CheckpointMismatch(f"explainer {folder} does not match its config ({detail}); retrain or fix the config")
    return load_model(ModelSpec(source=str(folder), dtype=meta["explainer_spec"]["dtype"]))
