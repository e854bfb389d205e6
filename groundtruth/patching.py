"""Task B core, activation patching: blocks, block-mean vectors, and two patchers that agree.

The target's layers are cut into B contiguous blocks. For a (block, position t) of prompt x and its
aligned position t' of the counterfactual x': v = mean over the block's layers of x' hidden states
(the residual stream after each layer) at t', written over x's hidden state at t after every layer
of the block. The label is the greedy next token at the last position before and after.

`patch_slow` is the obvious reference: one full forward per intervention with forward hooks.
`patch_fast` reuses the clean run: the layers before a block are not run again (stand-ins return the
cached input of the block's first layer), the positions before the first patched one are not run again
either (their keys and values come from a cache of x's prefix: causal attention leaves them unchanged),
and all interventions of one block run as one batch. `patch_pairs` does the same for several pairs at
once: pairs whose prompts have one length share their clean runs' forwards (`pair_clean_runs`) and
their patched forwards, one per block. It goes through the model's own forward, so masks, rotary
tables and per-layer attention types (Gemma's sliding-window and global layers) are whatever the
architecture makes them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import torch
from torch import nn

from .errors import ConfigError
from .generation import shared_prefix
from .kv_cache import cache_kwargs, cache_of
from .models import model_device


@dataclass(frozen=True)
class Intervention:
    block: int
    position: int  # t in x
    source_position: int  # aligned t' in x'


class Decision(NamedTuple):
    """The target's greedy next token and its logit margin over the runner-up (a near-tie flips under
    bf16 rounding or another kernel; records keep the margin so such labels can be filtered)."""

    token: int
    margin: float


def decide(logits: torch.Tensor) -> list[Decision]:
    """Greedy decisions of logits [N, V], compared in fp32."""
    top = logits.float().topk(2, dim=-1)
    margins = (top.values[:, 0] - top.values[:, 1]).tolist()
    return [Decision(int(t), float(m)) for t, m in zip(top.indices[:, 0].tolist(), margins)]


def decided_tokens(result: tuple[Decision, list[Decision]]) -> tuple[int, list[int]]:
    """A patcher's (clean, patched) result as tokens only: what two patchers must agree on (margins
    may differ in their last bits between batched and unbatched kernels)."""
    clean, patched = result
    return clean.token, [d.token for d in patched]


class CleanRun(NamedTuple):
    states: torch.Tensor  # [L + 1, T, d] on the model's device, in its dtype
    decision: Decision  # at the last position
    cache: Optional[object] = None  # keys and values of every position (a one-row DynamicCache), if kept


def layer_blocks(num_layers: int, num_blocks: int) -> list[list[int]]:
    """Contiguous, near-equal blocks of layer indices (earlier blocks take the remainder)."""
    if not 1 <= num_blocks <= num_layers:
        raise ConfigError(f"num_blocks must be between 1 and {num_layers}, got {num_blocks}")
    size, extra = divmod(num_layers, num_blocks)
    blocks, start = [], 0
    for b in range(num_blocks):
        end = start + size + (1 if b < extra else 0)
        blocks.append(list(range(start, end)))
        start = end
    return blocks


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (Llama, Gemma, Qwen, ... all keep them here)."""
    return model.get_decoder().layers


@torch.no_grad()
def clean_runs(model, prompts: list[torch.Tensor], keep_cache: tuple[int, ...] = ()) -> list[CleanRun]:
    """Per prompt: its residual stream [L + 1, T, d] (index 0: embeddings, l + 1: after layer l) and
    its greedy next-token decision, all prompts in one right-padded forward (on short prompts a forward costs
    about the same for one row as for several: reading the weights dominates). A prefix all prompts
    share is run once and its keys and values serve every row: under causal attention the positions
    after it see exactly what they would in a full run. keep_cache: the prompts (indices) whose keys and
    values to keep too, when the prompts have one length (patch_fast then reads its prefix from them)."""
    device = model_device(model)
    shared = shared_prefix(prompts)
    own = [ids[shared:] for ids in prompts]  # what each prompt adds after the shared prefix
    lengths = [len(ids) for ids in own]
    input_ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    mask = torch.ones(len(prompts), shared + max(lengths), dtype=torch.long)
    for row, ids in enumerate(own):
        input_ids[row, :len(ids)] = ids
        mask[row, shared + len(ids):] = 0
    ends = sorted({n - 1 for n in lengths})  # the LM head runs only where some prompt ends
    cache = bool(keep_cache) and len(ends) == 1
    past, prefix_states = None, None
    if shared:
        prefix_states, prefix_out = _hooked_forward(model, prompts[0][None, :shared].to(device), use_cache=True,
                                                    logits_to_keep=1)
        past = cache_of(prefix_out)
        past.batch_repeat_interleave(len(prompts))
    # no mask for prompts of one length: the model's plain causal path, exactly what patch_slow runs
    states, out = _hooked_forward(model, input_ids.to(device), attention_mask=mask.to(device) if len(ends) > 1 else None,
                                  **cache_kwargs(model, past), use_cache=cache or past is not None,
                                  logits_to_keep=torch.tensor(ends))  # host index: the head may sit on another GPU
    if prefix_states is not None:
        states = torch.cat([prefix_states.expand(-1, len(prompts), -1, -1), states], dim=2)
    logits = out.logits  # [B, len(ends), V]
    last = decide(torch.stack([logits[row, ends.index(n - 1)] for row, n in enumerate(lengths)]))
    caches = _rows(cache_of(out), keep_cache) if cache else {}
    return [CleanRun(states[:, row, :shared + n], last[row], caches.get(row)) for row, n in enumerate(lengths)]


def _hooked_forward(model, input_ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, object]:
    """The model's output on input_ids [B, T] and its residual stream [L + 1, B, T, d], read with forward
    hooks (output_hidden_states ends after the final norm)."""
    captured: list[torch.Tensor] = []

    def keep(module, args, output):
        captured.append((output[0] if isinstance(output, tuple) else output).clone())

    hooks = [m.register_forward_hook(keep) for m in (model.get_input_embeddings(), *decoder_layers(model))]
    try:
        out = model(input_ids=input_ids, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    device = input_ids.device
    return torch.stack([c.to(device) for c in captured]), out  # layers may sit on several GPUs


CLEAN_ROWS = 16
"""Prompts in one forward of pair_clean_runs: 8 pairs' x and x' read the weights once, and a preamble they
share runs once for all of them."""


def pair_clean_runs(model, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[list[tuple[int, CleanRun, CleanRun]]]:
    """Clean runs of (x, x') for every pair, x's keys and values kept for patching, one group of pairs at
    a time: [(pair index, clean run of x, clean run of x')] (a group's states are freed once its consumer
    moves on). Pairs whose x and x' all have one length share forwards of up to CLEAN_ROWS prompts
    (unpadded and unmasked: each row computes what patch_slow's forward does); a pair of two lengths
    runs alone."""
    groups: dict[int, list[int]] = {}
    for i, (x, x_prime) in enumerate(pairs):
        groups.setdefault(len(x) if len(x) == len(x_prime) else -1 - i, []).append(i)
    for members in groups.values():
        for start in range(0, len(members), CLEAN_ROWS // 2):
            group = members[start:start + CLEAN_ROWS // 2]
            runs = clean_runs(model, [ids for i in group for ids in pairs[i]], keep_cache=tuple(range(0, 2 * len(group), 2)))
            yield [(i, runs[2 * k], runs[2 * k + 1]) for k, i in enumerate(group)]


def _rows(cache, rows: tuple[int, ...]) -> dict[int, object]:
    """Rows of a batched DynamicCache, each as a cache of its own (the last one is the batched cache
    itself, cut down: one row needs no copy)."""
    out = {}
    for i, row in enumerate(rows):
        mine = cache if i == len(rows) - 1 else copy.deepcopy(cache)
        mine.batch_select_indices(torch.tensor([row]))
        out[row] = mine
    return out


def clean_run(model, ids: torch.Tensor) -> CleanRun:
    """clean_runs for one prompt."""
    return clean_runs(model, [ids])[0]


def layer_states(model, ids: torch.Tensor) -> torch.Tensor:
    """Residual stream of one prompt: [L + 1, T, d] (see clean_run)."""
    return clean_run(model, ids).states


def block_vector(source_states: torch.Tensor, block: list[int], position: int) -> torch.Tensor:
    """v: mean over the block's layers of the source's residual stream at `position` -> [d], in fp32
    (a bf16 sum over a block's layers loses the low bits of every addend)."""
    return source_states[[layer + 1 for layer in block], position].float().mean(0)


def _overwrite_hook(positions: torch.Tensor, vectors: torch.Tensor):
    """A forward hook writing vectors[n] over row n's hidden state at positions[n] (rows in order)."""
    rows = torch.arange(len(positions), device=positions.device)  # .to() below is then free on one device

    def overwrite(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[rows.to(hidden.device), positions.to(hidden.device)] = vectors.to(hidden.device, hidden.dtype)
        return output

    return overwrite


@torch.no_grad()
def patch_slow(model, x: torch.Tensor, x_prime: torch.Tensor, blocks: list[list[int]],
               interventions: list[Intervention]) -> tuple[Decision, list[Decision]]:
    """(clean decision, patched decision per intervention): one hooked full forward each."""
    device = model_device(model)
    x = x.to(device)
    source = clean_run(model, x_prime).states
    clean = decide(model(input_ids=x.unsqueeze(0)).logits[:, -1])[0]
    patched = []
    layers = decoder_layers(model)
    for iv in interventions:
        hook = _overwrite_hook(torch.tensor([iv.position], device=device),
                               block_vector(source, blocks[iv.block], iv.source_position)[None])
        handles = [layers[layer].register_forward_hook(hook) for layer in blocks[iv.block]]
        try:
            patched += decide(model(input_ids=x.unsqueeze(0)).logits[:, -1])
        finally:
            for handle in handles:
                handle.remove()
    return clean, patched


class _CachedInput(nn.Module):
    """Stands in for a decoder layer before the patched block: returns the clean run's cached input of
    the block's first layer instead of computing anything."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden  # [N, T, d]

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden


def prefix_cache(model, x: torch.Tensor, prefix: int, full: Optional[object]):
    """The keys and values of x's first `prefix` positions at every layer (a DynamicCache: cut from `full`,
    the keys and values of x's clean run where it kept them, else computed), or None for an empty prefix.
    Under causal attention a patch at position t leaves every position before t as it was, so the patched
    runs start at t and read these instead of recomputing them."""
    if prefix == 0:
        return None
    if full is not None and _holds_every_position(full, len(x)):
        cache = copy.deepcopy(full)
        cache.crop(prefix - len(x))  # a negative count drops that many positions from the end
        return cache
    return cache_of(model(input_ids=x[None, :prefix], use_cache=True, logits_to_keep=1))


def _holds_every_position(cache, length: int) -> bool:
    """Whether each layer of the cache still holds all `length` positions: a sliding-window layer past
    its window has dropped the earliest ones, and a prefix cut from it would miss them."""
    return all(layer.keys is None or layer.keys.shape[-2] == length for layer in cache.layers)


@torch.no_grad()
def patch_fast(model, x: torch.Tensor, x_prime: torch.Tensor, blocks: list[list[int]],
               interventions: list[Intervention], clean: CleanRun | None = None,
               source: CleanRun | None = None) -> tuple[Decision, list[Decision]]:
    """Same decisions as patch_slow, from the cached clean run, one batch per block; only the positions
    from the first patched one on are computed, and only from the block's first layer on.

    clean / source: clean_run results of x and x' when the caller already has them (they are also
    where the vectors come from)."""
    if clean is None or source is None:
        clean, source = clean_runs(model, [x, x_prime], keep_cache=(0,))
    return clean.decision, patch_pairs(model, [PairPatches(x, interventions, clean, source)], blocks)[0]


class PairPatches(NamedTuple):
    """One pair's interventions with its clean runs (clean_runs or pair_clean_runs of x and x')."""

    x: torch.Tensor  # [T] token ids
    interventions: list[Intervention]
    clean: CleanRun
    source: CleanRun


PATCH_ROWS = 64
"""Patched copies of x in one forward at most (their last-position logits are [rows, vocab])."""


@torch.no_grad()
def patch_pairs(model, pairs: list[PairPatches], blocks: list[list[int]]) -> list[list[Decision]]:
    """patch_fast's decisions for several pairs at once: per block, the interventions of every pair whose
    x has one length and whose first patched position is the same run as one batch (up to PATCH_ROWS
    rows), each row reading its own pair's prefix keys and values and clean states."""
    decisions = [[Decision(0, 0.0)] * len(pair.interventions) for pair in pairs]
    prefixes: dict[tuple[int, int], object] = {}  # (pair, first) -> keys and values of x[:first]
    for b, block in enumerate(blocks):
        runs: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (len(x), first) -> (pair, intervention)
        for p, pair in enumerate(pairs):
            members = [i for i, iv in enumerate(pair.interventions) if iv.block == b]
            if members:
                first = min(pair.interventions[i].position for i in members)
                runs.setdefault((len(pair.x), first), []).extend((p, i) for i in members)
        for (_, first), rows in runs.items():
            for start in range(0, len(rows), PATCH_ROWS):
                chunk = rows[start:start + PATCH_ROWS]
                for p in {p for p, _ in chunk}:
                    if (p, first) not in prefixes:
                        prefixes[p, first] = prefix_cache(model, pairs[p].x.to(model_device(model)), first, pairs[p].clean.cache)
                logits = _patched_block(model, pairs, chunk, block, first, prefixes)
                for (p, i), decision in zip(chunk, decide(logits)):
                    decisions[p][i] = decision
    return decisions


def _stacked_cache(caches: list):
    """One cache whose row r is caches[r] (one-row caches of one length), or None for empty prefixes."""
    if caches[0] is None:
        return None
    out = copy.deepcopy(caches[0])  # its per-layer bookkeeping (length, window) holds for all: one length
    for i, layer in enumerate(out.layers):
        if layer.keys is not None:
            layer.keys = torch.cat([c.layers[i].keys for c in caches])  # [rows, H, first, D]
            layer.values = torch.cat([c.layers[i].values for c in caches])
    return out


def _patched_block(model, pairs: list[PairPatches], rows: list[tuple[int, int]], block: list[int], first: int,
                   prefixes: dict) -> torch.Tensor:
    """Last-position logits [n, V], one row per (pair, intervention) in `rows` (pairs whose x has one
    length): x with that patch, positions from `first` on (earlier ones come from the prefix caches),
    layers before the block replaced by the clean run's input of its first layer."""
    layers = decoder_layers(model)
    device, start = model_device(model), block[0]
    ivs = [pairs[p].interventions[i] for p, i in rows]
    where = torch.tensor([iv.position - first for iv in ivs], device=device)
    vectors = torch.stack([block_vector(pairs[p].source.states, block, iv.source_position) for (p, _), iv in zip(rows, ivs)])
    cache = _stacked_cache([prefixes[p, first] for p, _ in rows])
    input_ids = torch.stack([pairs[p].x[first:] for p, _ in rows]).to(device)  # [n, T - first]
    # the input of the block's first layer, [n, T - first, d]
    skipped = [layers[i] for i in range(start)]
    cached = _CachedInput(torch.stack([pairs[p].clean.states[start, first:] for p, _ in rows]))
    for i in range(start):
        layers[i] = cached
    handles = [layers[layer].register_forward_hook(_overwrite_hook(where, vectors)) for layer in block]
    try:
        # one unpadded batch of copies of x: no attention mask needed; only the last position's logits
        return model(input_ids=input_ids, **cache_kwargs(model, cache), use_cache=cache is not None,
                     logits_to_keep=1).logits[:, -1]
    finally:
        for handle in handles:
            handle.remove()
        for i, layer in enumerate(skipped):
            layers[i] = layer
