"""Trained explainers as Hugging Face folders, with metadata that ties them to their config."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from groundtruth.errors import BadInput
from groundtruth.models import ModelSpec, load_model, model_device
from groundtruth.records import data_fingerprint
from groundtruth.tasks import TASKS

if TYPE_CHECKING:
    from .job import TrainJob

METADATA = "selfexplain.json"
PROJECTION = "projection.pt"  # Pi, next to the weights, for explainers of vector tasks


class CheckpointMismatch(BadInput, ValueError):
    """An exported explainer that was trained for another base model, task or target."""


def reads_vectors(task: str) -> bool:
    """Whether an explainer of this task reads vectors (unknown tasks: assume it does)."""
    spec = TASKS.get(task.split(":")[0])
    return spec is None or spec.has_vectors


def job_identity(job: "TrainJob") -> dict:
    """What an export must match to be reused: base model, task, target, data and hyperparameters. The
    data is named by its content (a hash of its shards), not its path, so a copied or moved run folder
    still matches its exports."""
    train = dataclasses.asdict(job.train) | {"use_ray": None, "num_workers": None, "worker_cpus": None}
    if not reads_vectors(job.task):
        train.pop("projection")  # no vector reaches this explainer: how one would be projected cannot matter
    return {
        "task": job.task,
        "target": job.target,
        "explainer": job.explainer,
        "explainer_spec": dataclasses.asdict(job.explainer_spec),
        "data": data_fingerprint(Path(job.data_dir)),
        "train": train,
    } | ({"records_per_layer": job.max_records_per_layer} if job.max_records_per_layer else {}) \
      | ({"control": job.control} if job.control else {})


def export_explainer(engine, wrapper, tokenizer, job: "TrainJob", rank: int, steps: int) -> Path:
    """Write job.export_dir atomically (full weights gathered under ZeRO-3). Call on every rank."""
    state, projection_state = None, None
    if engine.zero_optimization_stage() == 3:
        full = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank takes part
        if rank == 0:
            state = {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")}
            projection_state = {k.removeprefix("projection."): v for k, v in full.items() if k.startswith("projection.")}
    if rank != 0:
        return job.export_dir
    out = job.export_dir
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if job.train.lora is not None:  # a plain model again: adapters merged into the weights they adapt
        from .lora import merge_lora_state

        state = merge_lora_state(state if state is not None else wrapper.model.state_dict(),
                                 job.train.lora.alpha / job.train.lora.r)
    wrapper.model.save_pretrained(tmp, state_dict=state)
    tokenizer.save_pretrained(tmp)
    meta = {**job_identity(job), "steps": steps}
    projection = wrapper.projection
    if projection is not None:
        if projection_state:  # ZeRO-3: the module's own parameters are partitioned; save a gathered copy
            from .explainer import Projection

            gathered = Projection(projection.kind, projection.keys, projection.d_target, projection.d_explainer)
            gathered.load_state_dict({k: v.float() for k, v in projection_state.items()})
            gathered.fit_error, gathered.norm = projection.fit_error, projection.norm
            projection = gathered
        projection.save(tmp / PROJECTION)
        meta["projection"] = {"kind": projection.kind, "keys": projection.keys, "fit_error": projection.fit_error,
                              "norm": projection.norm}
    (tmp / METADATA).write_text(json.dumps(meta, indent=1, sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def export_differences(job: "TrainJob") -> Optional[list[str]]:
    """How job.export_dir differs from this job: None when there is no finished export, [] when it is
    exactly this job's (the stage can skip it), else the differing fields (e.g. 'data', 'train.lr')."""
    meta = job.export_dir / METADATA
    if not meta.exists():
        return None
    saved = json.loads(meta.read_text())
    saved.pop("steps", None)
    saved.pop("projection", None)
    return _differing(saved, job_identity(job))


def _differing(have: dict, want: dict, prefix: str = "") -> list[str]:
    fields = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            fields += _differing(a, b, f"{prefix}{key}.")
        elif a != b:
            fields.append(f"{prefix}{key}")
    return fields


def export_matches(job: "TrainJob") -> bool:
    """True when job.export_dir holds a finished export of exactly this job (the stage can be skipped)."""
    return export_differences(job) == []


def load_explainer(folder: Path, expect: dict, device: Optional[str] = None):
    """Load an exported explainer onto `device` (default: load_model's placement) -> (model, tokenizer,
    projection or None, beside the model), failing with the differing fields if it was made for
    something else.

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
    base = ModelSpec(**meta["explainer_spec"])  # its dtype and chat template settings, read from the export
    model, tokenizer = load_model(ModelSpec(str(folder), base.dtype, chat_template_kwargs=base.chat_template_kwargs), device)
    projection = None
    if "projection" in meta:
        from .explainer import Projection

        projection = Projection.load(Path(folder) / PROJECTION).to(model_device(model))
    return model, tokenizer, projection
