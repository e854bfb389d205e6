"""Explainer inference: batched greedy explanations for records, reading vectors where records have them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from selfexplain.groundtruth.generation import PromptFormat, greedy_generate
from selfexplain.groundtruth.records import Record
from selfexplain.training.batches import encode_prompt
from selfexplain.training.explainer import add_vector_tokens, injecting
from selfexplain.training.projection import Projection, vector_key
from selfexplain.training.export import has_vector_tokens


@dataclass
class Ask:
    """One set of questions to an explainer: its records, and how each record's v reaches the prompt.

    with_vector=False leaves the [begin][vec][end] triple and v out (the no-vector row); vector_scale
    (SelfIE) injects Pi v / ||Pi v|| * vector_scale instead of Pi v (v itself without a projection)."""

    records: list[Record]
    projection: Optional[Projection] = None
    with_vector: bool = True
    vector_scale: Optional[float] = None

    def vectors(self) -> list[Optional[torch.Tensor]]:
        """What goes in at each record's [vec] token ([d_explainer]), None where the prompt has none."""
        if not self.with_vector or all(r.vector is None for r in self.records):
            return [None] * len(self.records)
        if any(r.vector is None for r in self.records):
            raise ValueError("explain: some records carry a vector and some do not; evaluate them separately")
        vectors = torch.from_numpy(np.stack([r.vector for r in self.records]))  # [N, d_target]
        keys = [vector_key(r.layers) for r in self.records]
        mapped = self.projection(vectors, keys) if self.projection is not None else vectors
        if self.vector_scale is not None:
            mapped = torch.nn.functional.normalize(mapped, dim=-1) * self.vector_scale
        return list(mapped)


@torch.no_grad()
def explain_all(model, tokenizer, asks: list[Ask], fmt: PromptFormat, max_new_tokens: int,
                batch_size: int = 16) -> list[list[str]]:
    """The explainer's greedy answers to several sets of questions (rows of one explainer: trained,
    zero v, shuffled v, no vector, SelfIE scales), in one pass: every prompt is sorted by length with
    all the others, so batches fill up across sets. Per ask, its answers in record order."""
    vectors = [v for ask in asks for v in ask.vectors()]
    prompts = [encode_prompt(tokenizer, r, fmt, ask.with_vector) for ask in asks for r in ask.records]
    if all(v is None for v in vectors) and not has_vector_tokens(tokenizer):
        flat = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    else:
        tokens = add_vector_tokens(model, tokenizer)  # no-op for a trained export, which has them

        def injected(rows: list[int]):
            present = [vectors[i] for i in rows if vectors[i] is not None]  # one per prompt with a [vec], in row order
            return injecting(model, tokens.vec, torch.stack(present) if present else None)

        # never written by an answer, with or without v in the prompt (so a row reads the same in any batch)
        flat = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, batch_context=injected,
                               suppress_tokens=(tokens.begin, tokens.vec, tokens.end), row_tokens={tokens.vec})
    out, start = [], 0
    for ask in asks:
        out.append(flat[start:start + len(ask.records)])
        start += len(ask.records)
    return out


def explain(model, tokenizer, records: list[Record], fmt: PromptFormat, max_new_tokens: int,
            batch_size: int = 16, projection: Optional[Projection] = None, with_vector: bool = True,
            vector_scale: Optional[float] = None) -> list[str]:
    """The explainer's greedy answer to each record's question, in record order (see Ask)."""
    return explain_all(model, tokenizer, [Ask(records, projection, with_vector, vector_scale)], fmt, max_new_tokens,
                       batch_size)[0]
