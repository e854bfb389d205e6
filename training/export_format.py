"""The weights of an explainer export, in the formats the ecosystem loads.

A full fine-tune is a Hugging Face model folder (`save_pretrained`: config, safetensors weights), which
`AutoModelForCausalLM.from_pretrained(folder)` loads as it is. A LoRA explainer is a PEFT adapter folder
(adapter_config.json, adapter_model.safetensors), which `PeftModel.from_pretrained(base, folder)` loads onto
its base model once the base has the tokenizer's rows. Either way the folder holds the tokenizer with the
[begin][vec][end] tokens. Embedding rows added for them that did not train (train_embeddings: false; they
were initialised at random) travel in the adapter as peft trainable-token rows, so the adapter alone
rebuilds the model training left; an embedding matrix that trained travels whole.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save
from torch import nn

from selfexplain.groundtruth.models import ModelSpec, load_model

from .explainer import SPECIAL_TOKENS, add_vector_tokens
from .lora import LoraConfig, peft_config

ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKEN_ROWS = "token_adapter.trainable_tokens_delta"  # peft's key for a module's trainable-token rows


def has_vector_tokens(tokenizer) -> bool:
    return all(t in tokenizer.get_vocab() for t in SPECIAL_TOKENS)


def embedding_params(model: nn.Module) -> dict[str, tuple[str, str]]:
    """The embedding matrices an export may carry rows of: {'input' | 'output': (module name, parameter
    name)}; a head tied to the input embedding is one matrix, listed once."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    found = {}
    for side, module in (("input", inp), ("output", out)):
        if module is None or (side == "output" and module.weight is inp.weight):
            continue
        name = next(n for n, m in model.named_modules() if m is module)
        found[side] = (name, f"{name}.weight")
    return found


def write_weights(folder: Path, model: nn.Module, tokenizer, state: dict[str, torch.Tensor], trained: set[str],
                  lora: Optional[LoraConfig], base: str) -> str:
    """Write the model's weights into `folder` as a model folder ('full') or an adapter folder ('lora'),
    with its tokenizer; returns which. `state` holds the model's tensors by parameter name (under ZeRO-3
    only those gathered: the trained ones and the embeddings whose [vec] rows an adapter keeps); `trained`
    names the parameters that trained."""
    tokenizer.save_pretrained(folder)
    if lora is None:
        model.save_pretrained(folder, state_dict={k: v.detach().cpu() for k, v in state.items()})
        _readable_like(folder, folder / "tokenizer_config.json")
        return "full"
    from peft import get_peft_model_state_dict

    adapter = get_peft_model_state_dict(model, state_dict=state, save_embedding_layers=False)
    rows = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) if has_vector_tokens(tokenizer) else []
    token_indices = {}
    for module, param in embedding_params(model).values():
        if param in trained:  # the whole matrix trained: it travels whole, as peft's save_embedding_layers
            adapter[param] = state[param]
        elif rows and param in state:
            adapter[f"{module}.{TOKEN_ROWS}"] = state[param][rows]
            token_indices[module.rpartition(".")[2]] = rows
    peft_config(lora, base, token_indices).save_pretrained(folder)
    # bytes written through Python, not save_file: that creates the file 0600, whatever the umask
    (folder / ADAPTER_WEIGHTS).write_bytes(save({k: v.detach().cpu().contiguous() for k, v in adapter.items()}))
    return "lora"


def _readable_like(folder: Path, like: Path) -> None:
    """Every file of `folder` with the mode of `like` (written through Python, so as the umask says):
    safetensors' own writer, which save_pretrained uses, creates files 0600."""
    mode = like.stat().st_mode & 0o777
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(mode)


@torch.no_grad()
def read_weights(folder: Path, weights: str, base: ModelSpec, vector_tokens: bool, device: Optional[str]):
    """(model, tokenizer) of an export folder: a model folder loads as it is; an adapter loads onto its
    base model, given the vector tokens the way training added them (the same ids), then merges in (a
    loaded explainer runs as fast as its base)."""
    if weights == "full":
        return load_model(ModelSpec(str(folder), base.dtype, chat_template_kwargs=base.chat_template_kwargs), device)
    from peft import PeftModel

    model, tokenizer = load_model(base, device)
    if vector_tokens:
        add_vector_tokens(model, tokenizer)
    model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer
