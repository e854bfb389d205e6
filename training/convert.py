"""`selfexplain convert-export FOLDER`: an export of the first format (no 'format' field in selfexplain.json)
rewritten in place as the current one, without retraining.

Format 1 held `trained.safetensors` (the tensors training changed: LoRA adapters as `<layer>.lora_a` [r, d_in]
and `<layer>.lora_b` [d_out, r], scale alpha / r as peft's; other trained weights by parameter name; the
untrained [begin][vec][end] rows as `vector_token_rows.input` / `.output`) or, from earlier still, a whole
model folder, and Pi as `projection.pt` (a torch dict). The model training left is rebuilt from them and
written by the same code as a fresh export.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from selfexplain.groundtruth.models import ModelSpec, load_model

from .explainer import add_vector_tokens
from .projection import Projection
from .export import FORMAT, LEGACY_WEIGHTS, METADATA, PROJECTION, CheckpointMismatch
from .export_format import write_weights
from .lora import LoraConfig, apply_lora
from .model_card import write_model_card

LEGACY_PROJECTION = "projection.pt"
LEGACY_ROWS = "vector_token_rows"


def _peft_name(name: str) -> str:
    """A format-1 tensor name as the parameter of a peft model: adapters renamed, everything under base_model.model."""
    for old, new in ((".lora_a", ".lora_A.default.weight"), (".lora_b", ".lora_B.default.weight")):
        if name.endswith(old):
            name = name[: -len(old)] + new
    return f"base_model.model.{name}"


@torch.no_grad()
def _rebuilt(folder: Path, meta: dict):
    """(model, tokenizer, names of the trained parameters) as training left them, from format-1 tensors."""
    model, tokenizer = load_model(ModelSpec(**meta["explainer_spec"]), "cpu")
    tensors = load_file(folder / LEGACY_WEIGHTS)
    if meta.get("vector_tokens"):
        ids = add_vector_tokens(model, tokenizer)
        rows = [ids.begin, ids.vec, ids.end]
        for side, module in (("input", model.get_input_embeddings()), ("output", model.get_output_embeddings())):
            saved = tensors.pop(f"{LEGACY_ROWS}.{side}", None)
            if saved is not None:
                module.weight[rows] = saved.to(module.weight.dtype)
    lora = meta["train"].get("lora")
    if lora is not None:
        model = apply_lora(model, LoraConfig(**lora))
        tensors = {_peft_name(k): v for k, v in tensors.items()}
    unexpected = model.load_state_dict(tensors, strict=False).unexpected_keys
    if unexpected:
        raise CheckpointMismatch(f"{folder / LEGACY_WEIGHTS} holds tensors {unexpected[:5]} that "
                                 f"{meta['explainer_spec']['source']} does not have; was it trained from another base model?")
    return model, tokenizer, set(tensors)


def convert_export(folder: Path) -> bool:
    """Rewrite a format-1 export in place (atomically); False when it already is of the current format."""
    folder = Path(folder)
    meta_path = folder / METADATA
    if not meta_path.exists():
        raise CheckpointMismatch(f"{folder} is not an explainer export (no {METADATA})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") == FORMAT:
        return False
    tmp = folder.with_name(f".{folder.name}.converting")
    shutil.rmtree(tmp, ignore_errors=True)
    if (folder / LEGACY_WEIGHTS).exists():
        tmp.mkdir(parents=True)
        model, tokenizer, trained = _rebuilt(folder, meta)
        lora = meta["train"].get("lora")
        weights = write_weights(tmp, model, tokenizer, model.state_dict(), trained,
                                LoraConfig(**lora) if lora else None, meta["explainer_spec"]["source"])
    else:  # a whole model folder already: kept as it is
        shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns(LEGACY_PROJECTION, METADATA))
        weights = "full"
    if (folder / LEGACY_PROJECTION).exists():
        saved = torch.load(folder / LEGACY_PROJECTION, weights_only=True)  # a dict: settings and "maps"
        Projection.from_saved(saved, saved["maps"]).save(tmp / PROJECTION)
    meta.update(format=FORMAT, weights=weights)
    (tmp / METADATA).write_text(json.dumps(meta, indent=1, sort_keys=True))
    write_model_card(tmp, meta)
    old = folder.with_name(f".{folder.name}.format1")
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old)
    return True
