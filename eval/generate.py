"""Explainer inference: batched greedy explanations for records, reading vectors where records have them."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from groundtruth.generation import PromptFormat, greedy_generate
from groundtruth.records import Record
from training.batches import encode_prompt
from training.explainer import Projection, add_vector_tokens, injecting, vector_key


@torch.no_grad()
def explain(model, tokenizer, records: list[Record], fmt: PromptFormat, max_new_tokens: int,
            batch_size: int = 16, projection: Optional[Projection] = None, with_vector: bool = True,
            vector_scale: Optional[float] = None) -> list[str]:
    """The explainer's greedy answer to each record's question, in record order.

    Records with vectors are asked with the [begin][vec][end] triple in the prompt and Pi v (v without
    a projection) at [vec]; with_vector=False leaves the triple and the vector out (the no-vector row).
    vector_scale (SelfIE) injects Pi v / ||Pi v|| * vector_scale instead.
    """
    use_vectors = with_vector and any(r.vector is not None for r in records)
    prompts_of = lambda: [encode_prompt(tokenizer, r, fmt, with_vector) for r in records]  # noqa: E731
    if not use_vectors:
        return greedy_generate(model, tokenizer, prompts_of(), max_new_tokens, batch_size)
    if any(r.vector is None for r in records):
        raise ValueError("explain: some records carry a vector and some do not; evaluate them separately")
    tokens = add_vector_tokens(model, tokenizer)  # no-op for a trained export, which has them
    vectors = torch.from_numpy(np.stack([r.vector for r in records]))  # [N, d_target]
    mapped = projection(vectors, [vector_key(r.layers) for r in records]) if projection is not None else vectors
    if vector_scale is not None:
        mapped = torch.nn.functional.normalize(mapped, dim=-1) * vector_scale
    return greedy_generate(
        model, tokenizer, prompts_of(), max_new_tokens, batch_size,
        batch_context=lambda rows: injecting(model, tokens.vec, mapped[rows]),
        suppress_tokens=(tokens.begin, tokens.vec, tokens.end),
    )
