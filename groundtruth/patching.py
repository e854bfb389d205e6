"""Task B core, activation patching (work in progress for issue 3: no pipeline task yet).

The target's layers are cut into B contiguous blocks. For a (block, position t) of prompt x and its
aligned position t' of the counterfactual x': v = mean over the block's layers of x' hidden states
(the residual stream after each layer) at t', written over x's hidden state at t after every layer
of the block. The label is the greedy next token at the last position before and after.

`patch_slow` is the obvious reference: one full forward per intervention with forward hooks.
`patch_fast` reuses the clean run: each intervention starts at its block's first layer from the
cached hidden state, and all interventions of one block run as one batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Intervention:
    block: int
    position: int  # t in x
    source_position: int  # aligned t' in x'


def layer_blocks(num_layers: int, num_blocks: int) -> list[list[int]]:
    """Contiguous, near-equal blocks of layer indices (earlier blocks take the remainder)."""
    if not 1 <= num_blocks <= num_layers:
        raise ValueError(f"num_blocks must be between 1 and {num_layers}, got {num_blocks}")
    size, extra = divmod(num_layers, num_blocks)
    blocks, start = [], 0
    for b in range(num_blocks):
        end = start + size + (1 if b < extra else 0)
        blocks.append(list(range(start, end)))
        start = end
    return blocks


@torch.no_grad()
def layer_states(model, ids: torch.Tensor) -> torch.Tensor:
    """Residual stream of one prompt: [L + 1, T, d]; index 0 is the embeddings, l + 1 after layer l.

    Read with forward hooks (not output_hidden_states, whose last entry is after the final norm)."""
    captured: list[torch.Tensor] = []

    def keep(module, args, output):
        captured.append((output[0] if isinstance(output, tuple) else output)[0].clone())

    modules = [model.get_input_embeddings(), *model.model.layers]
    hooks = [m.register_forward_hook(keep) for m in modules]
    try:
        model(input_ids=ids.unsqueeze(0))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(captured)


def block_vector(source_states: torch.Tensor, block: list[int], position: int) -> torch.Tensor:
    """v: mean over the block's layers of the source's residual stream at `position` -> [d]."""
    return source_states[[layer + 1 for layer in block], position].mean(0)


@torch.no_grad()
def patch_slow(model, x: torch.Tensor, x_prime: torch.Tensor, blocks: list[list[int]],
               interventions: list[Intervention]) -> tuple[int, list[int]]:
    """(clean next token, patched next token per intervention): one hooked full forward each."""
    source = layer_states(model, x_prime)
    clean = int(model(input_ids=x.unsqueeze(0)).logits[0, -1].argmax())
    patched = []
    for iv in interventions:
        vector = block_vector(source, blocks[iv.block], iv.source_position)

        def overwrite(module, args, output, position=iv.position, vector=vector):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden[:, position] = vector
            return output

        hooks = [model.model.layers[layer].register_forward_hook(overwrite) for layer in blocks[iv.block]]
        try:
            patched.append(int(model(input_ids=x.unsqueeze(0)).logits[0, -1].argmax()))
        finally:
            for hook in hooks:
                hook.remove()
    return clean, patched


def _run_layers(model, hidden: torch.Tensor, start: int, end: int, patch: dict) -> torch.Tensor:
    """Run decoder layers [start, end) on hidden [N, T, d]; after layer l, rows take patch[l] =
    (positions [N], vectors [N, d]). Llama-style decoders (one rotary embedding, one causal mask)."""
    base = model.model
    if not hasattr(base, "rotary_emb") or getattr(model.config, "sliding_window_pattern", None):
        raise NotImplementedError(f"fast patching supports Llama-style decoders, not {type(model).__name__}")
    positions = torch.arange(hidden.shape[1]).unsqueeze(0)
    rotary = base.rotary_emb(hidden, position_ids=positions)
    rows = torch.arange(hidden.shape[0])
    for layer in range(start, end):
        # no mask: a full-length unpadded batch gets the causal mask inside attention
        hidden = base.layers[layer](hidden, attention_mask=None, position_embeddings=rotary, position_ids=positions)
        if layer in patch:
            where, vectors = patch[layer]
            hidden = hidden.clone()
            hidden[rows, where] = vectors
    return hidden


@torch.no_grad()
def patch_fast(model, x: torch.Tensor, x_prime: torch.Tensor, blocks: list[list[int]],
               interventions: list[Intervention]) -> tuple[int, list[int]]:
    """Same labels as patch_slow, from the cached clean run, one batch per block."""
    clean_states = layer_states(model, x)  # [L + 1, T, d]
    source = layer_states(model, x_prime)
    num_layers = len(model.model.layers)
    clean = int(_next_token(model, clean_states[-1:]).item())
    patched = [0] * len(interventions)
    for b, block in enumerate(blocks):
        members = [i for i, iv in enumerate(interventions) if iv.block == b]
        if not members:
            continue
        where = torch.tensor([interventions[i].position for i in members])
        vectors = torch.stack([block_vector(source, block, interventions[i].source_position) for i in members])
        start = block[0]
        hidden = clean_states[start].expand(len(members), -1, -1).clone()  # input of the block's first layer
        hidden = _run_layers(model, hidden, start, num_layers, {layer: (where, vectors) for layer in block})
        for i, token in zip(members, _next_token(model, hidden).tolist()):
            patched[i] = int(token)
    return clean, patched


def _next_token(model, hidden: torch.Tensor) -> torch.Tensor:
    """Greedy next token at the last position of residual streams [N, T, d] -> [N]."""
    return model.lm_head(model.model.norm(hidden[:, -1])).argmax(-1)
