"""AtP*'s QK fix: exact attention probabilities where a block patch sets a layer's query and key.

AtP takes each layer's softmax as linear in its scores. Where a patch moves a key or query far, as
overwriting the residual stream at a subject token does, the softmax saturates (one score overtakes a
row) and the linear estimate misses most of the change (Kramar et al. 2024, "AtP*", section 3.1.1). The
fix computes the attention probabilities exactly with the patched position's query and key, and puts
their change, not its linearisation, into the estimate:

    estimate* = estimate + sum over fixed layers L of [ dM/dA_L . (A_L' - A_L) - dM/d(q_L, k_L) . J_L (x' - x) ]

x is layer L's clean input at the patched position and x' the patched one; A_L' are L's attention
probabilities with that position's key (its column, every row) and query (its own row) computed from x';
the last term is the same change taken linearly (the gradient at L's queries and keys pulled back through
L's input norm, projections and rotary embedding), which the plain estimate already holds.

Fixed layers: a block patch overwrites the residual stream at its position after each of its layers, so
the layer after each of them reads exactly v there; those layers are fixed. Layers past the block read v
plus what the layers between did and stay linear, as do values, MLPs and head patches (the head screen
held 0.95 of the changed labels at a fifth of the heads with the linear estimate, docs/RESULTS.md).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


@dataclass
class LayerAttention:
    """One layer's attention in a forward of one prompt, as `recorded_attention` saw it."""

    layer_input: torch.Tensor  # [T, d], the decoder layer's input (the residual stream)
    kwargs: dict               # the attention module's call, less hidden states and mask (rotary embeddings)
    query: torch.Tensor        # [1, H, T, D], after norms and rotary embeddings; .grad after a backward
    key: torch.Tensor          # [1, Hkv, T, D]
    probs: torch.Tensor        # [1, H, T, T]
    mask: torch.Tensor         # [T, T], additive (0 or -inf)
    scaling: float
    softcap: Optional[float]


def wide(tensor: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16 and fp16 scores and probabilities are upcast, as eager attention does)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def attention_scores(query: torch.Tensor, key: torch.Tensor, scaling: float, softcap: Optional[float]) -> torch.Tensor:
    """query [..., Tq, D] x key [..., Tk, D] -> [..., Tq, Tk], at least fp32, as eager attention scores them."""
    scores = torch.matmul(wide(query), wide(key).transpose(-1, -2)) * scaling
    return scores if not softcap else softcap * torch.tanh(scores / softcap)


def additive_mask(mask: Optional[torch.Tensor], tq: int, tk: int, device, window: Optional[int] = None) -> torch.Tensor:
    """An attention function's mask ([B, 1, Tq, Tk] bool or additive; None: causal, within `window` positions
    where a sliding window is passed beside it, as flash attention gets it) -> [Tq, Tk]."""
    if mask is None:
        query = torch.arange(tk - tq, tk, device=device)[:, None]
        key = torch.arange(tk, device=device)[None]
        hidden = (key > query) | ((query - key >= window) if window else False)
        return torch.zeros(tq, tk, device=device).masked_fill(hidden, float("-inf"))
    mask = mask[0, 0, -tq:, :tk]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf"))
    return mask.float()


def _explicit_attention(records: Optional[list], keep: Optional[list]):
    """Eager attention from explicit probabilities. With `records`, each call of a batch of one is kept
    (its query, key and probabilities retaining their gradients); with `keep`, only (query, key) are,
    and the output is zeros."""
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
                  softcap: Optional[float] = None, **kwargs):
        if keep is not None:
            keep.append((query, key))
            return torch.zeros(*query.shape[:1], query.shape[2], query.shape[1], value.shape[-1],
                               dtype=value.dtype, device=value.device), None
        groups = query.shape[1] // key.shape[1]
        scaling = module.head_dim ** -0.5 if scaling is None else scaling
        tq, tk = query.shape[2], key.shape[2]
        scores = attention_scores(query, key.repeat_interleave(groups, 1), scaling, softcap)
        mask = additive_mask(attention_mask, tq, tk, query.device, kwargs.get("sliding_window"))
        probs = torch.softmax(scores + mask, dim=-1)
        output = torch.matmul(probs.to(value.dtype), value.repeat_interleave(groups, 1)).transpose(1, 2).contiguous()
        if records is not None and query.shape[0] == 1:
            for tensor in (query, key, probs):
                if tensor.requires_grad:  # not in the layers before the first perturbation
                    tensor.retain_grad()
            records.append((module, query, key, probs, mask, scaling, softcap))
        return output, None
    return attention


@contextmanager
def _attention_function(function, also: Optional[str] = None) -> Iterator[None]:
    """Within the block, the models' SDPA and eager attention (and `also`, a model's own) run `function`."""
    saved = {name: ALL_ATTENTION_FUNCTIONS.get(name) for name in {"sdpa", "eager", also or "eager"}}
    for name in saved:
        ALL_ATTENTION_FUNCTIONS[name] = function
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                del ALL_ATTENTION_FUNCTIONS[name]
            else:
                ALL_ATTENTION_FUNCTIONS[name] = old


@contextmanager
def recorded_attention(layers: nn.ModuleList, out: list[LayerAttention]) -> Iterator[None]:
    """Within the block, a forward of one prompt fills `out` with each decoder layer's attention, in layer
    order, its query, key and probabilities keeping their gradients for a backward."""
    seen: list = []
    inputs: dict[int, tuple[torch.Tensor, dict]] = {}

    def layer_input(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs[index] = (hidden[0].detach(), {})
        return hook

    def attention_call(index: int):
        def hook(module, args, kwargs):
            inputs[index] = (inputs[index][0], {k: v for k, v in kwargs.items()
                                                if k not in ("hidden_states", "attention_mask", "cache", "past_key_values")})
        return hook

    handles = [h for i, layer in enumerate(layers) for h in (
        layer.register_forward_pre_hook(layer_input(i), with_kwargs=True),
        layer.self_attn.register_forward_pre_hook(attention_call(i), with_kwargs=True))]
    try:
        with _attention_function(_explicit_attention(seen, None), layers[0].self_attn.config._attn_implementation):
            yield
    finally:
        for handle in handles:
            handle.remove()
    by_module = {id(entry[0]): entry for entry in seen}
    for i, layer in enumerate(layers):
        _, query, key, probs, mask, scaling, softcap = by_module[id(layer.self_attn)]
        out.append(LayerAttention(inputs[i][0], inputs[i][1], query, key, probs, mask, scaling, softcap))


def query_key(layer: nn.Module, record: LayerAttention, hidden: torch.Tensor,
              positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The query [n, H, D] and key [n, Hkv, D] layer's attention makes of residual-stream inputs hidden [n, d]
    at positions [n] (its input norm, projections, query/key norms and rotary embedding, run by the model's
    own code), differentiable in hidden."""
    kwargs = dict(record.kwargs)
    cos, sin = kwargs.pop("position_embeddings")  # [1, T, D] each
    kept: list = []
    with _attention_function(_explicit_attention(None, kept), layer.self_attn.config._attn_implementation):
        layer.self_attn(hidden_states=layer.input_layernorm(hidden)[:, None],
                        position_embeddings=(cos[0, positions][:, None], sin[0, positions][:, None]),
                        attention_mask=None, **kwargs)
    query, key = kept[0]
    return query[:, :, 0], key[:, :, 0]


def patched_probs(record: LayerAttention, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The attention probabilities [n, H, T, T] with position positions[i]'s query and key set to query[i]
    [H, D] and key[i] [Hkv, D]: its column scored against every row's query, its row with the new query
    against every key (its own the new one)."""
    q, k = record.query[0].detach(), record.key[0].detach()  # [H, T, D], [Hkv, T, D]
    groups, n, (heads, length, _) = q.shape[0] // k.shape[0], len(positions), q.shape
    keys = k.repeat_interleave(groups, 0)[None].repeat(n, 1, 1, 1)  # [n, H, T, D]
    keys[torch.arange(n, device=keys.device), :, positions.to(keys.device)] = key.repeat_interleave(groups, 1).to(keys.dtype)
    scores = attention_scores(q[None], keys, record.scaling, record.softcap)  # [n, H, T, T]: the new key's column
    own_row = attention_scores(query[:, :, None].to(keys.dtype), keys, record.scaling, record.softcap)  # [n, H, 1, T]
    index = positions.to(keys.device).view(n, 1, 1, 1).expand(n, heads, 1, length)
    scores = scores.scatter(2, index, own_row)
    return torch.softmax(scores + record.mask, dim=-1)


def qk_corrections(layers: nn.ModuleList, attention: list[LayerAttention], sites: dict[int, list[tuple[int, int, torch.Tensor]]],
                   count: int) -> list[float]:
    """Per estimate (count of them), the QK fix to add: sites[L] lists (estimate index, position, the input
    x' [d] that layer L reads there) for each layer L fixed. The layers' records hold a backward's gradients."""
    corrections = torch.zeros(count, dtype=torch.float64)
    for index, entries in sites.items():
        record, layer = attention[index], layers[index]
        if record.probs.grad is None:
            raise RuntimeError(f"layer {index}: no gradient at its attention probabilities; run the backward first")
        which = torch.tensor([e[0] for e in entries])
        positions = torch.tensor([e[1] for e in entries], device=record.layer_input.device)
        patched = torch.stack([e[2] for e in entries]).to(record.layer_input.device, record.layer_input.dtype)  # [n, d]
        clean = record.layer_input.detach().requires_grad_(True)  # [T, d]
        every = torch.arange(clean.shape[0], device=clean.device)
        with torch.enable_grad():
            q_all, k_all = query_key(layer, record, clean, every)  # the linear term: grad at q, k pulled back
            pulled, = torch.autograd.grad([q_all, k_all], clean, [record.query.grad[0].transpose(0, 1),
                                                                    record.key.grad[0].transpose(0, 1)])
        with torch.no_grad():
            q_new, k_new = query_key(layer, record, patched, positions)
            moved = patched_probs(record, positions, q_new, k_new) - wide(record.probs[0].detach())  # [n, H, T, T]
            exact = (moved * wide(record.probs.grad[0])).sum((1, 2, 3))
            linear = (wide(patched - record.layer_input[positions]) * wide(pulled[positions])).sum(-1)
        corrections.index_add_(0, which, (exact - linear).double().cpu())
    return corrections.tolist()
