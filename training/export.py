"""Trained explainers as folders the ecosystem loads (training/export_format.py: a Hugging Face model folder
or a PEFT adapter folder, with the tokenizer), beside Pi (safetensors), the job's identity (selfexplain.json,
which ties the export to its config) and a model card (README.md)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from selfexplain.groundtruth.errors import BadInput
from selfexplain.groundtruth.models import ModelSpec, model_device
from selfexplain.groundtruth.records import data_fingerprint
from selfexplain.groundtruth.tasks import TASKS

from .export_format import embedding_params, has_vector_tokens, read_weights, write_weights
from .model_card import write_model_card

if TYPE_CHECKING:
    from .job import TrainJob

METADATA = "selfexplain.json"
"""The job's identity (what the export must match to be reused), what the run produced, and the format."""
PROJECTION = "projection.safetensors"  # Pi, next to the weights, for explainers of vector tasks
FORMAT = 2
"""Version of the export folder's layout; 1 (no 'format' field) held `trained.safetensors` and `projection.pt`,
which `selfexplain convert-export` rewrites."""
LEGACY_WEIGHTS = "trained.safetensors"


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
    train = dataclasses.asdict(job.train) | dict.fromkeys(job.train.RESOURCES)
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


def _zero3_exported(wrapper, tokenizer, rank: int, full: bool) -> dict[str, torch.Tensor]:
    """What an export holds, gathered from ZeRO-3 partitions one parameter at a time onto rank 0's host:
    every weight for a full fine-tune (a model folder is whole); for an adapter only the parameters that
    trained, Pi, and the embedding matrices whose [vec] rows it keeps, never the frozen rest (a 70B LoRA
    explainer: ~3 GB of adapters, not 141 GB of weights). Every rank calls it and walks the same parameters
    in the same order (each gather is a collective)."""
    import deepspeed

    rows_of = set()
    if has_vector_tokens(tokenizer):
        rows_of = {f"model.{param}" for _, param in embedding_params(wrapper.model).values()}
    out = {}
    for name, p in wrapper.named_parameters():
        if not (full or p.requires_grad or name.startswith("projection.") or name in rows_of):
            continue
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if rank == 0:
                out[name] = p.detach().to("cpu", copy=True)
    return out


def export_explainer(engine, wrapper, tokenizer, job: "TrainJob", rank: int, steps: int) -> Path:
    """Write job.export_dir atomically: the weights as a model or adapter folder with the tokenizer (in
    the training precision), Pi, the job's identity and a model card (under ZeRO-3 what they need is
    gathered first). Call on every rank."""
    state, projection_state = None, None
    if engine.zero_optimization_stage() == 3:
        gathered = _zero3_exported(wrapper, tokenizer, rank, full=job.train.lora is None)  # collective
        if rank == 0:
            state = {k.removeprefix("model."): v for k, v in gathered.items() if k.startswith("model.")}
            projection_state = {k.removeprefix("projection."): v for k, v in gathered.items() if k.startswith("projection.")}
    if rank != 0:
        return job.export_dir
    out = job.export_dir
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = wrapper.model
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    weights = write_weights(tmp, model, tokenizer, state if state is not None else model.state_dict(), trained,
                            job.train.lora, job.explainer_spec.source)
    meta = {**job_identity(job), "steps": steps, "vector_tokens": has_vector_tokens(tokenizer), "format": FORMAT,
            "weights": weights}
    projection = wrapper.projection
    if projection is not None:
        if projection_state:  # ZeRO-3: the module's own parameters are partitioned; save a gathered copy
            from .projection import Projection

            gathered = Projection(projection.kind, projection.keys, projection.d_target, projection.d_explainer)
            gathered.load_state_dict({k: v.float() for k, v in projection_state.items()})
            gathered.fit_error, gathered.norm = projection.fit_error, projection.norm
            projection = gathered
        projection.save(tmp / PROJECTION)
        meta["projection"] = {"kind": projection.kind, "keys": projection.keys, "fit_error": projection.fit_error,
                              "norm": projection.norm}
    (tmp / METADATA).write_text(json.dumps(meta, indent=1, sort_keys=True))
    write_model_card(tmp, meta)
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
    for produced in ("steps", "projection", "vector_tokens", "format", "weights"):  # made by the run, not its identity
        saved.pop(produced, None)
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


def load_explainer(folder: Path, expect: Optional[dict] = None, device: Optional[str] = None):
    """Load an exported explainer onto `device` (default: load_model's placement) -> (model, tokenizer,
    projection or None, beside the model). One call is all a person needs:

        model, tokenizer, projection = load_explainer("runs/quickstart/explainers/<task>/<name>/export")

    A model folder loads as it is; an adapter loads onto the base model named in the metadata (it must be
    loadable here: packaged, cached or on the hub), given the [begin][vec][end] tokens, and merges in.
    `expect` holds metadata fields that must agree (e.g. task, target, explainer_spec); a mismatch fails
    naming the differing fields.
    """
    meta = read_metadata(Path(folder))
    wrong = {k: (meta.get(k), v) for k, v in (expect or {}).items() if meta.get(k) != v}
    if wrong:
        detail = "; ".join(f"{k}: checkpoint has {have!r}, config says {want!r}" for k, (have, want) in wrong.items())
        raise CheckpointMismatch(f"explainer {folder} does not match its config ({detail}); retrain or fix the config")
    base = ModelSpec(**meta["explainer_spec"])  # its dtype and chat template settings, read from the export
    model, tokenizer = read_weights(Path(folder), meta["weights"], base, meta.get("vector_tokens", False), device)
    projection = None
    if "projection" in meta:
        from .projection import Projection

        # in the explainer's own dtype, as training ran it (docs/GPU.md: Pi's precision)
        projection = Projection.load(Path(folder) / PROJECTION).to(model_device(model),
                                                                   model.get_input_embeddings().weight.dtype)
    return model, tokenizer, projection


def read_metadata(folder: Path) -> dict:
    """An export's selfexplain.json, refusing a folder that is not a finished export of this format."""
    meta_path = folder / METADATA
    if not meta_path.exists():
        raise CheckpointMismatch(f"{folder} is not a finished explainer export (no {METADATA}); rerun the train stage")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointMismatch(f"{meta_path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointMismatch(
            f"{folder} is an export of an earlier selfexplain (format {meta.get('format', 1)}, {LEGACY_WEIGHTS}); "
            f"`selfexplain convert-export {folder}` rewrites it as a Hugging Face / PEFT folder")
    return meta
