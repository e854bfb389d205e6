"""Trained explainers as the tensors training changed (safetensors, in the training precision), with
metadata that names the base model they apply to and ties them to their config."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from safetensors.torch import load_file, save

from selfexplain.groundtruth.errors import BadInput
from selfexplain.groundtruth.models import ModelSpec, load_model, model_device
from selfexplain.groundtruth.records import data_fingerprint
from selfexplain.groundtruth.tasks import TASKS

from .explainer import SPECIAL_TOKENS

if TYPE_CHECKING:
    from .job import TrainJob

METADATA = "selfexplain.json"
PROJECTION = "projection.pt"  # Pi, next to the weights, for explainers of vector tasks
TRAINED = "trained.safetensors"
"""The tensors training changed, in the training precision; METADATA names the base model they apply to."""
VECTOR_ROWS = "vector_token_rows"  # rows of the [begin][vec][end] tokens in embeddings that did not train


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


def _param_name(model, weight) -> Optional[str]:
    return next((name for name, p in model.named_parameters() if p is weight), None)


def has_vector_tokens(tokenizer) -> bool:
    return all(t in tokenizer.get_vocab() for t in SPECIAL_TOKENS)


def trained_tensors(model, tokenizer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What training changed, from a full state dict of the model (gathered under ZeRO-3): every
    parameter that required grad (LoRA adapters as they are), plus the [begin][vec][end] rows of
    embeddings that did not train (the rows were added for them and initialised at random)."""
    out = {name: state[name] for name, p in model.named_parameters() if p.requires_grad}
    if has_vector_tokens(tokenizer):
        out.update(_untrained_vector_rows(model, tokenizer, state, trained=set(out)))
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _untrained_vector_rows(model, tokenizer, state: dict[str, torch.Tensor],
                           trained: set[str]) -> dict[str, torch.Tensor]:
    """The [begin][vec][end] rows of each embedding matrix that did not train, keyed by side."""
    rows = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    embeddings = {"input": model.get_input_embeddings(), "output": model.get_output_embeddings()}
    if embeddings["output"] is not None and embeddings["output"].weight is embeddings["input"].weight:
        del embeddings["output"]  # tied: one matrix
    out = {}
    for side, module in embeddings.items():
        name = _param_name(model, module.weight) if module is not None else None
        if name is not None and name not in trained and name in state and state[name].shape[0] > max(rows):
            out[f"{VECTOR_ROWS}.{side}"] = state[name][rows]
    return out


def _zero3_exported(wrapper, tokenizer, rank: int) -> dict[str, torch.Tensor]:
    """What an export holds, gathered from ZeRO-3 partitions one parameter at a time onto rank 0's host:
    the parameters that trained, Pi, and the embedding matrices whose [vec] rows it keeps. Never the
    frozen rest (a 70B LoRA explainer: ~3 GB of adapters, not 141 GB of weights). Every rank calls it,
    and every rank walks the same parameters in the same order (each gather is a collective)."""
    import deepspeed

    model = wrapper.model
    rows_of = set()
    if has_vector_tokens(tokenizer):
        rows_of = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    out = {}
    for name, p in wrapper.named_parameters():
        if not (p.requires_grad or name.startswith("projection.") or id(p) in rows_of):
            continue
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if rank == 0:
                out[name] = p.detach().to("cpu", copy=True)
    return out


def export_explainer(engine, wrapper, tokenizer, job: "TrainJob", rank: int, steps: int) -> Path:
    """Write job.export_dir atomically: the trained tensors in the training precision (safetensors), Pi,
    and the metadata naming the base model they apply to (under ZeRO-3 what they need is gathered first).
    Call on every rank."""
    state, projection_state = None, None
    if engine.zero_optimization_stage() == 3:
        gathered = _zero3_exported(wrapper, tokenizer, rank)  # collective: every rank takes part
        if rank == 0:
            state = {k.removeprefix("model."): v for k, v in gathered.items() if k.startswith("model.")}
            projection_state = {k.removeprefix("projection."): v for k, v in gathered.items() if k.startswith("projection.")}
    if rank != 0:
        return job.export_dir
    out = job.export_dir
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = state if state is not None else wrapper.model.state_dict()
    # bytes written through Python, not save_file: that creates the file 0600, whatever the umask
    (tmp / TRAINED).write_bytes(save(trained_tensors(wrapper.model, tokenizer, state)))
    meta = {**job_identity(job), "steps": steps, "vector_tokens": has_vector_tokens(tokenizer)}
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
    for produced in ("steps", "projection", "vector_tokens"):  # what the run made, not what defines it
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

    The base model named in the metadata is loaded (it must be loadable here: packaged, cached or on the
    hub), given the [begin][vec][end] tokens, and the trained tensors are applied (LoRA adapters merged).
    `expect` holds metadata fields that must agree (e.g. task, target, explainer_spec); a mismatch fails
    naming the differing fields. A full-weights export of earlier versions loads as it is.
    """
    meta_path = Path(folder) / METADATA
    if not meta_path.exists():
        raise CheckpointMismatch(f"{folder} is not a finished explainer export (no {METADATA}); rerun the train stage")
    meta = json.loads(meta_path.read_text())
    wrong = {k: (meta.get(k), v) for k, v in (expect or {}).items() if meta.get(k) != v}
    if wrong:
        detail = "; ".join(f"{k}: checkpoint has {have!r}, config says {want!r}" for k, (have, want) in wrong.items())
        raise CheckpointMismatch(f"explainer {folder} does not match its config ({detail}); retrain or fix the config")
    base = ModelSpec(**meta["explainer_spec"])  # its dtype and chat template settings, read from the export
    if (Path(folder) / TRAINED).exists():
        model, tokenizer = _base_with_trained(Path(folder), meta, base, device)
    else:
        model, tokenizer = load_model(ModelSpec(str(folder), base.dtype, chat_template_kwargs=base.chat_template_kwargs),
                                      device)
    projection = None
    if "projection" in meta:
        from .explainer import Projection

        # in the explainer's own dtype, as training ran it (docs/GPU.md: Pi's precision)
        projection = Projection.load(Path(folder) / PROJECTION).to(model_device(model),
                                                                   model.get_input_embeddings().weight.dtype)
    return model, tokenizer, projection


@torch.no_grad()
def _base_with_trained(folder: Path, meta: dict, base: ModelSpec, device: Optional[str]):
    """The base model, with the vector tokens added where training added them (the same ids), and the
    trained tensors of the export applied."""
    from .explainer import add_vector_tokens
    from .lora import LoraConfig, apply_lora, merge_lora_

    model, tokenizer = load_model(base, device)
    tensors = load_file(folder / TRAINED)
    if meta.get("vector_tokens"):
        ids = add_vector_tokens(model, tokenizer)
        rows = [ids.begin, ids.vec, ids.end]
        for side, module in (("input", model.get_input_embeddings()), ("output", model.get_output_embeddings())):
            saved = tensors.pop(f"{VECTOR_ROWS}.{side}", None)
            if saved is not None:
                module.weight[rows] = saved.to(module.weight.device, module.weight.dtype)
    lora = meta["train"].get("lora")
    if lora is not None:
        apply_lora(model, LoraConfig(**lora))
    unexpected = model.load_state_dict(tensors, strict=False).unexpected_keys
    if unexpected:
        raise CheckpointMismatch(f"{folder / TRAINED} holds tensors {unexpected[:5]} that {base.source} does not have; "
                                 "was it trained from another base model?")
    if lora is not None:
        merge_lora_(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer
