"""Vector injection: the explainer reads a vector of the target's internals through a soft token.

The prompt holds `[begin] [vec] [end]`; after the input embedding layer the embedding at `[vec]` is
replaced by v (cast to the embedding dtype, no scaling), or by Pi_l v when a per-target-layer
projection maps the target's hidden size to the explainer's (docs/METHOD.md section 1). With
`match_norm` every injected vector is rescaled to the explainer's mean token-embedding norm.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .projection import Projection

SPECIAL_TOKENS = ("<|se_begin|>", "<|se_vec|>", "<|se_end|>")
"""The [begin] [vec] [end] triple, added to any tokenizer (the paper reused reserved tokens)."""
VECTOR_TEXT = "".join(SPECIAL_TOKENS)
"""The triple as prompt text."""


@dataclass(frozen=True)
class VectorTokens:
    begin: int
    vec: int
    end: int

    text = VECTOR_TEXT


def add_vector_tokens(model, tokenizer) -> VectorTokens:
    """Add the special-token triple to the tokenizer (once) and grow the model's embeddings if the new ids
    fall past their rows. Many models have more rows than tokenizer entries (Qwen3: 151,936 for ~151,672):
    theirs are kept, never shrunk to the tokenizer. Rows are counted by `num_embeddings`, not the weight's
    shape, which ZeRO-3 partitions to [0] on every rank."""
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    return VectorTokens(*ids)


@torch.no_grad()
def embedding_norm(model, chunk: int = 8192) -> float:
    """Mean norm of the input-embedding module's output over the vocabulary (Gemma's sqrt(d) scaling
    included: the module is called, not its weight read). Gathers a ZeRO-3 partitioned weight."""
    embed = model.get_input_embeddings()
    gathered = nullcontext()
    if hasattr(embed.weight, "ds_id"):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([embed.weight])
    with gathered:
        vocab = embed.weight.shape[0]
        total = sum(embed(torch.arange(i, min(i + chunk, vocab), device=embed.weight.device)).float().norm(dim=-1).sum().item()
                    for i in range(0, vocab, chunk))
    return total / vocab


@contextmanager
def injecting(model, vec_id: int, vectors: Optional[torch.Tensor]) -> Iterator[None]:
    """Inside the block, the input embedding at every `[vec]` token is replaced by its vector.

    vectors [B', d] lists the vectors of the batch's `[vec]` tokens in row order (one per row that has
    one). A forward hook on the embedding layer does it, so training, plain forwards and generate()
    (whose later steps see no `[vec]`) all go through the same code. No scaling: the vector is only
    cast. Gemma scales token embeddings inside its embedding module; the soft token replaces the result.
    """
    if vectors is None:
        yield
        return

    def replace(module, args, output):
        input_ids = args[0] if args else None
        if input_ids is None:
            return output
        positions = input_ids == vec_id
        found = int(positions.sum())
        if found == 0:  # a generation step after the prompt
            return output
        if found != vectors.shape[0]:
            raise ValueError(f"{found} [vec] tokens in the batch but {vectors.shape[0]} vectors")
        output = output.clone()
        output[positions] = vectors.to(output.device, output.dtype)
        return output

    handle = model.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def inject(model, input_ids: torch.Tensor, vec_id: int, vectors: torch.Tensor) -> torch.Tensor:
    """Input embeddings [B, T, d] with the embedding at every `[vec]` token replaced by its vector."""
    with injecting(model, vec_id, vectors):
        return model.get_input_embeddings()(input_ids)


def projected_inputs(model, projection: Optional[Projection], input_ids: torch.Tensor, vec_id: int,
                     vectors: torch.Tensor, keys: list[str]) -> torch.Tensor:
    """Embeddings with Pi v (or v when there is no projection) at the `[vec]` positions."""
    mapped = projection(vectors, keys) if projection is not None else vectors
    return inject(model, input_ids, vec_id, mapped)
