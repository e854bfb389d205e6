"""Attention-head patching: each query head's output at the last position of x, taken from the run on x'.

A head's output is its slice of the attention output projection's input (`o_proj`: [.., H * D] -> [.., d],
query head h at columns h*D..(h+1)*D). Under grouped-query attention the query heads that share a key and
value head still write their own slices, so every query head is patched on its own. Its contribution to
the residual stream is that slice through its columns of `o_proj` (what the explainer reads as v).

Only the last position is patched. That is where the next token is decided and where, in factual recall,
attention heads read the attribute out of the subject (Geva et al. 2023, "Dissecting Recall of Factual
Associations"); it is also the one position of x and x' that aligns whatever their subjects' lengths. So
a patched run needs only the last token: every earlier position is x's own under causal attention, its
keys and values come from x's clean run, and all heads of a pair run as one batch of one-token rows.

`patch_heads_slow` is the obvious reference: one full hooked forward of x per head.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from .kv_cache import cache_kwargs, cache_of
from .models import model_device
from .patching import Decision, decide, decoder_layers, prefix_cache


@dataclass(frozen=True)
class Head:
    layer: int
    head: int  # query head index within the layer


def attention_output(model, layer: int) -> nn.Linear:
    """The attention output projection of a decoder layer (Llama, Gemma, Qwen, Mistral: self_attn.o_proj)."""
    return decoder_layers(model)[layer].self_attn.o_proj


def head_shape(model) -> tuple[int, int, int]:
    """(layers, query heads per layer, head dim) of a Hugging Face causal LM."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    return len(decoder_layers(model)), heads, attention_output(model, 0).in_features // heads


def every_head(model, layers: Optional[list[int]] = None) -> list[Head]:
    """Every query head of the given layers (negative: from the last; None: every layer), layer by layer."""
    num_layers, num_heads, _ = head_shape(model)
    chosen = range(num_layers) if layers is None else sorted({layer % num_layers for layer in layers})
    return [Head(layer, head) for layer in chosen for head in range(num_heads)]


def answer_token(tokenizer, answer: str) -> int:
    """The first token of an answer as it follows a completion prompt (" Paris")."""
    return tokenizer.encode(" " + answer, add_special_tokens=False)[0]


class HeadRun(NamedTuple):
    """One prompt's clean run as head patching needs it."""

    outputs: torch.Tensor  # [L, H, D] every head's output at the last position, on the model's device
    logits: torch.Tensor  # [V] at the last position, fp32
    cache: object  # keys and values of every position (a one-row DynamicCache)


@torch.no_grad()
def head_run(model, ids: torch.Tensor) -> HeadRun:
    """A clean forward of one prompt [T]: every head's output at its last position (read by pre-hooks on
    each layer's o_proj), the last logits and the keys and values."""
    layers, heads, dim = head_shape(model)
    captured: list[torch.Tensor] = []
    hooks = [attention_output(model, layer).register_forward_pre_hook(
        lambda module, args: captured.append(args[0][0, -1].reshape(heads, dim).clone())) for layer in range(layers)]
    try:
        out = model(input_ids=ids[None].to(model_device(model)), use_cache=True, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    device = model_device(model)
    return HeadRun(torch.stack([c.to(device) for c in captured]), out.logits[0, -1].float(), cache_of(out))


@torch.no_grad()
def head_vector(model, head: Head, output: torch.Tensor) -> torch.Tensor:
    """A head's contribution to the residual stream: its output [D] through its columns of o_proj -> [d], fp32
    (o_proj's bias, where a model has one, belongs to no head)."""
    proj = attention_output(model, head.layer)
    dim = output.shape[-1]
    columns = proj.weight[:, head.head * dim:(head.head + 1) * dim]  # [d, D]
    return columns.float() @ output.to(columns.device).float()


class HeadPatches(NamedTuple):
    clean: Decision
    patched: list[Decision]  # one per head, in order
    effects: list[float]
    """Per head, how much patching moved the logit difference (x''s answer token minus x's) toward x''s
    answer; zeros when no answer tokens were given."""


def _logit_difference(logits: torch.Tensor, answers: Optional[tuple[int, int]]) -> torch.Tensor:
    """logits [..., V] -> [...]: the logit of x''s answer token minus x's (zeros without answers)."""
    if answers is None:
        return torch.zeros(logits.shape[:-1])
    original, counterfactual = answers
    return (logits[..., counterfactual] - logits[..., original]).float().cpu()


def _overwrite_heads(rows: torch.Tensor, heads: torch.Tensor, values: torch.Tensor, num_heads: int):
    """A pre-hook of o_proj writing values[n] [D] over head heads[n] of row rows[n] at the last position."""

    def overwrite(module, args):
        hidden = args[0]  # [N, T, H * D]
        last = hidden[:, -1].view(hidden.shape[0], num_heads, -1)  # a view: writes reach `hidden`
        last[rows.to(hidden.device), heads.to(hidden.device)] = values.to(hidden.device, hidden.dtype)
        return None

    return overwrite


def _hooked(model, heads: list[Head], values: torch.Tensor) -> list:
    """Register one pre-hook per patched layer: row i's head heads[i] gets values[i]."""
    _, num_heads, _ = head_shape(model)
    handles = []
    for layer in sorted({h.layer for h in heads}):
        mine = [i for i, h in enumerate(heads) if h.layer == layer]
        hook = _overwrite_heads(torch.tensor(mine), torch.tensor([heads[i].head for i in mine]),
                                values[mine], num_heads)
        handles.append(attention_output(model, layer).register_forward_pre_hook(hook))
    return handles


@torch.no_grad()
def patch_heads_slow(model, x: torch.Tensor, x_prime: torch.Tensor, heads: list[Head],
                     answers: Optional[tuple[int, int]] = None) -> HeadPatches:
    """The reference: per head, one full forward of x with that head's last-position output from x'."""
    device = model_device(model)
    source = head_run(model, x_prime)
    clean_logits = model(input_ids=x[None].to(device)).logits[0, -1]
    patched, effects = [], []
    base = _logit_difference(clean_logits, answers)
    for head in heads:
        handles = _hooked(model, [head], source.outputs[head.layer, head.head][None])
        try:
            logits = model(input_ids=x[None].to(device)).logits[0, -1]
        finally:
            for handle in handles:
                handle.remove()
        patched += decide(logits[None])
        effects.append(float(_logit_difference(logits, answers) - base))
    return HeadPatches(decide(clean_logits[None])[0], patched, effects)


HEAD_ROWS = 64
"""One-token rows in one patched forward at most (each row carries a copy of x's keys and values)."""


@torch.no_grad()
def patch_heads(model, x: torch.Tensor, x_prime: torch.Tensor, heads: list[Head],
                answers: Optional[tuple[int, int]] = None, clean: Optional[HeadRun] = None,
                source: Optional[HeadRun] = None) -> HeadPatches:
    """patch_heads_slow's decisions and effects, from x's clean keys and values: each head one row of x's
    last token, up to HEAD_ROWS rows per forward. clean / source: head_run of x and x', if already made."""
    device = model_device(model)
    clean = clean or head_run(model, x)
    source = source or head_run(model, x_prime)
    prefix = prefix_cache(model, x.to(device), len(x) - 1, clean.cache)
    base = _logit_difference(clean.logits, answers)
    patched, effects = [], []
    for start in range(0, len(heads), HEAD_ROWS):
        chunk = heads[start:start + HEAD_ROWS]
        cache = None
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(chunk))
        values = torch.stack([source.outputs[h.layer, h.head] for h in chunk])
        handles = _hooked(model, chunk, values)
        try:
            logits = model(input_ids=x[-1:].to(device).expand(len(chunk), 1), **cache_kwargs(model, cache),
                           use_cache=cache is not None, logits_to_keep=1).logits[:, -1]
        finally:
            for handle in handles:
                handle.remove()
        patched += decide(logits)
        effects += (_logit_difference(logits, answers) - base).tolist()
    return HeadPatches(decide(clean.logits[None])[0], patched, effects)
