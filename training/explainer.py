"""Vector injection: the explainer reads a vector of the target's internals through a soft token.

The prompt holds `[begin] [vec] [end]`; after the input embedding layer the embedding at `[vec]` is
replaced by v (cast to the embedding dtype, no scaling), or by Pi_l v when a per-target-layer
projection maps the target's hidden size to the explainer's (DESIGN.md section 2.1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

SPECIAL_TOKENS = ("<|se_begin|>", "<|se_vec|>", "<|se_end|>")
"""The [begin] [vec] [end] triple, added to any tokenizer (the paper reused reserved tokens)."""


@dataclass(frozen=True)
class VectorTokens:
    begin: int
    vec: int
    end: int

    @property
    def text(self) -> str:
        """The triple as prompt text."""
        return "".join(SPECIAL_TOKENS)


def add_vector_tokens(model, tokenizer) -> VectorTokens:
    """Add the special-token triple to the tokenizer (once) and resize the model's embeddings."""
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    return VectorTokens(*ids)


ProjectionKind = Literal["none", "random", "lstsq"]


class Projection(nn.Module):
    """Per-target-layer linear maps Pi_l: d_target -> d_explainer, no bias.

    kind 'none' is the identity and needs equal hidden sizes; 'random' starts from a scaled random
    matrix; 'lstsq' is fitted with `fit` from paired hidden states. Applied whenever configured, even
    when the sizes happen to match (the paper's code silently skipped it then).
    """

    def __init__(self, kind: ProjectionKind, layers: list[int], d_target: int, d_explainer: int,
                 trainable: bool = True, seed: int = 0):
        super().__init__()
        if kind == "none" and d_target != d_explainer:
            raise ValueError(
                f"projection kind 'none' cannot map target hidden size {d_target} to explainer hidden size "
                f"{d_explainer}; use kind 'random' or 'lstsq'"
            )
        self.kind, self.layers = kind, list(layers)
        self.maps = nn.ParameterDict()
        if kind != "none":
            gen = torch.Generator().manual_seed(seed)
            for layer in self.layers:
                weight = torch.randn(d_explainer, d_target, generator=gen) / d_target ** 0.5  # [d_e, d_t]
                self.maps[str(layer)] = nn.Parameter(weight, requires_grad=trainable)
        self.fit_error: dict[int, float] = {}

    def forward(self, vectors: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """vectors [N, d_target], layers [N] (target layer of each vector) -> [N, d_explainer]."""
        if self.kind == "none":
            return vectors
        out = []
        for vector, layer in zip(vectors, layers.tolist()):
            if str(layer) not in self.maps:
                raise KeyError(f"no projection for target layer {layer} (have {self.layers})")
            weight = self.maps[str(layer)]
            out.append(weight @ vector.to(weight.dtype))
        return torch.stack(out)

    @torch.no_grad()
    def fit(self, layer: int, h_target: torch.Tensor, h_explainer: torch.Tensor) -> float:
        """Least-squares fit of Pi_layer from paired hidden states: min ||h_E - Pi h_M||^2.

        h_target [N, d_target], h_explainer [N, d_explainer] (same tokens of the same text). Returns the
        relative fit error ||h_E - Pi h_M|| / ||h_E||, also kept in `fit_error`.
        """
        solution = torch.linalg.lstsq(h_target.double(), h_explainer.double()).solution  # [d_t, d_e]
        weight = self.maps[str(layer)]
        weight.copy_(solution.T.to(weight.dtype))
        residual = h_explainer.double() - h_target.double() @ solution
        error = (residual.norm() / h_explainer.double().norm()).item()
        self.fit_error[layer] = error
        return error


def inject(model, input_ids: torch.Tensor, vec_id: int, vectors: torch.Tensor) -> torch.Tensor:
    """Input embeddings [B, T, d] with the embedding at every `[vec]` token replaced by its vector.

    input_ids [B, T] holds one `[vec]` per row that has a vector; vectors [B', d] lists them in row
    order (B' = number of `[vec]` tokens). No scaling or normalisation: the vector is only cast.
    """
    embeds = model.get_input_embeddings()(input_ids)  # [B, T, d]
    # Gemma scales token embeddings inside its embedding module; the soft token replaces the result.
    positions = input_ids == vec_id
    if int(positions.sum()) != vectors.shape[0]:
        raise ValueError(f"{int(positions.sum())} [vec] tokens in the batch but {vectors.shape[0]} vectors")
    embeds = embeds.clone()
    embeds[positions] = vectors.to(embeds.dtype)
    return embeds


def projected_inputs(model, projection: Optional[Projection], input_ids: torch.Tensor, vec_id: int,
                     vectors: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
    """Embeddings with Pi v (or v when there is no projection) at the `[vec]` positions."""
    mapped = projection(vectors, layers) if projection is not None else vectors
    return inject(model, input_ids, vec_id, mapped)
