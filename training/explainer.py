"""Vector injection: the explainer reads a vector of the target's internals through a soft token.

The prompt holds `[begin] [vec] [end]`; after the input embedding layer the embedding at `[vec]` is
replaced by v (cast to the embedding dtype, no scaling), or by Pi_l v when a per-target-layer
projection maps the target's hidden size to the explainer's (docs/METHOD.md section 1). With
`match_norm` every injected vector is rescaled to the explainer's mean token-embedding norm.
"""
from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch
from torch import nn

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


ProjectionKind = Literal["none", "random", "lstsq"]


@dataclass
class ProjectionConfig:
    """How a target's vectors reach an explainer's embedding space (Pi, per target layer or block)."""

    self_kind: ProjectionKind = "none"
    """Pi for self-explainers (explainer == target): the paper feeds v unchanged."""
    cross_kind: ProjectionKind = "lstsq"
    """Pi for cross-model explainers: 'lstsq' (fitted on paired hidden states, the paper's better
    choice), 'random' (trained jointly), or 'none' (needs equal hidden sizes)."""
    trainable: Optional[bool] = None
    """Whether Pi is trained with the explainer; null: trained for 'random', frozen for 'lstsq'."""
    fit_corpus: str = "countries"
    """Text the lstsq fit reads: 'countries' (sentences built from countryinfo) or a .txt file path
    (one passage per line)."""
    fit_texts: int = 400
    """Passages read for the fit; a fifth of them are held out to report the fit's error."""
    match_norm: bool = False
    """Rescale each injected vector (after Pi) to the explainer's mean token-embedding norm. Unscaled
    (the paper), a unit-norm SAE direction is 3x (SmolLM2) to 26x (Gemma, whose embeddings are scaled by
    sqrt(d)) shorter than any token embedding, and a residual state 60x-200x longer (medians; docs/METHOD.md section 1)."""

    def kind_for(self, explainer: str, target: str) -> ProjectionKind:
        return self.self_kind if explainer == target else self.cross_kind

    def is_trainable(self, kind: ProjectionKind) -> bool:
        return kind == "random" if self.trainable is None else self.trainable


def vector_key(layers: list[int]) -> str:
    """Name of the target layers a vector comes from: '12' for one layer, '0-7' for a block."""
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def key_layers(key: str) -> list[int]:
    """Inverse of vector_key."""
    first, _, last = key.partition("-")
    return list(range(int(first), int(last or first) + 1))


class Projection(nn.Module):
    """Per-target-layer (or per-block) linear maps Pi: d_target -> d_explainer, no bias.

    kind 'none' is the identity and needs equal hidden sizes; 'random' starts from a scaled random
    matrix; 'lstsq' is fitted with `fit` from paired hidden states. Applied whenever configured, even
    when the sizes happen to match (the paper's code silently skipped it then).
    """

    def __init__(self, kind: ProjectionKind, keys: list[str], d_target: int, d_explainer: int,
                 trainable: bool = True, seed: int = 0):
        super().__init__()
        if kind == "none" and d_target != d_explainer:
            raise ValueError(
                f"projection kind 'none' cannot map target hidden size {d_target} to explainer hidden size "
                f"{d_explainer}; use kind 'random' or 'lstsq'"
            )
        self.kind, self.keys = kind, [str(k) for k in keys]
        self.d_target, self.d_explainer = d_target, d_explainer
        # Linear modules, not bare parameters: calling a module's forward is what makes ZeRO-3 gather
        # its partitioned weight (an 8B model's 4096 x 4096 map is far above the persistence threshold).
        self.maps = nn.ModuleDict()
        if kind != "none":
            gen = torch.Generator().manual_seed(seed)
            for key in self.keys:
                linear = nn.Linear(d_target, d_explainer, bias=False)
                with torch.no_grad():
                    linear.weight.copy_(torch.randn(d_explainer, d_target, generator=gen) / d_target ** 0.5)  # [d_e, d_t]
                linear.weight.requires_grad_(trainable)
                self.maps[key] = linear
        self.fit_error: dict[str, dict[str, float]] = {}
        self.norm: Optional[float] = None
        """When set, every output is rescaled to this norm (ProjectionConfig.match_norm); zero stays zero."""

    def forward(self, vectors: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """vectors [N, d_target], keys [N] (vector_key of each vector's layers) -> [N, d_explainer]."""
        mapped = self._map(vectors, keys)
        if self.norm is None:
            return mapped
        return nn.functional.normalize(mapped, dim=-1) * self.norm

    def _map(self, vectors: torch.Tensor, keys: list[str]) -> torch.Tensor:
        if self.kind == "none":
            return vectors
        missing = sorted(set(keys) - set(self.maps.keys()))
        if missing:
            raise KeyError(f"no projection for target layers {missing} (have {self.keys})")
        # the vectors come from records (host memory); Pi sits with the explainer (a GPU when it has one)
        weight = self.maps[keys[0]].weight if keys else None
        if weight is None:
            return vectors.new_zeros(0, self.d_explainer)
        vectors = vectors.to(weight.device)
        out = vectors.new_zeros(len(keys), self.d_explainer, dtype=weight.dtype)
        for key in sorted(set(keys)):
            rows = torch.tensor([i for i, k in enumerate(keys) if k == key], device=weight.device)
            mapped = self.maps[key](vectors[rows].to(self.maps[key].weight.dtype))
            out = out.to(mapped.dtype).index_put((rows,), mapped)
        return out

    def weight(self, key: str) -> torch.Tensor:
        """Pi for one key: [d_explainer, d_target]."""
        return self.maps[key].weight

    @torch.no_grad()
    def fit(self, key: str, h_target: torch.Tensor, h_explainer: torch.Tensor) -> float:
        """Least-squares fit of Pi_key from paired hidden states: min ||h_E - Pi h_M||^2.

        h_target [N, d_target], h_explainer [N, d_explainer] (same tokens of the same text). Returns the
        relative fit error ||h_E - Pi h_M|| / ||h_E||, also kept in fit_error[key]['fit'].
        """
        solution = torch.linalg.lstsq(h_target.double(), h_explainer.double()).solution  # [d_t, d_e]
        weight = self.weight(key)
        weight.copy_(solution.T.to(weight.dtype))
        error = self.error(key, h_target, h_explainer)
        self.fit_error.setdefault(key, {})["fit"] = error
        return error

    @torch.no_grad()
    def error(self, key: str, h_target: torch.Tensor, h_explainer: torch.Tensor) -> float:
        """Relative error ||h_E - Pi h_M|| / ||h_E|| of Pi_key on paired states (e.g. held-out text)."""
        predicted = h_target.double() @ self.weight(key).to(h_target.device).double().T
        return ((h_explainer.double() - predicted).norm() / h_explainer.double().norm()).item()

    def subset(self, keys: list[str]) -> "Projection":
        """A projection of only these keys (same weights and fit errors), e.g. one task's of a shared fit."""
        part = Projection(self.kind, keys, self.d_target, self.d_explainer)
        with torch.no_grad():
            for key in part.keys:
                part.weight(key).copy_(self.weight(key))
                part.weight(key).requires_grad_(self.weight(key).requires_grad)
        part.fit_error = {k: dict(self.fit_error[k]) for k in part.keys if k in self.fit_error}
        part.norm = self.norm
        return part

    def save(self, path: Path) -> None:
        """One safetensors file: each key's map [d_explainer, d_target] (float32) under its key, the settings
        as JSON in the header's metadata (any safetensors reader opens it; `load` rebuilds the module)."""
        from safetensors.torch import save

        settings = {"kind": self.kind, "keys": self.keys, "d_target": self.d_target, "d_explainer": self.d_explainer,
                    "fit_error": self.fit_error, "norm": self.norm}
        maps = {k: self.weight(k).detach().float().cpu().contiguous() for k in self.maps}
        # bytes written through Python, not save_file: that creates the file 0600, whatever the umask
        Path(path).write_bytes(save(maps, metadata={"selfexplain.projection": json.dumps(settings)}))

    @classmethod
    def load(cls, path: Path, trainable: bool = False) -> "Projection":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            header = (f.metadata() or {}).get("selfexplain.projection")
            if header is None:
                raise ValueError(f"{path} holds no projection settings (metadata 'selfexplain.projection')")
            settings = json.loads(header)
            maps = {key: f.get_tensor(key) for key in f.keys()}
        return cls.from_saved(settings, maps, trainable)

    @classmethod
    def from_saved(cls, settings: dict, maps: dict[str, torch.Tensor], trainable: bool = False) -> "Projection":
        """A projection from its settings (kind, keys, sizes, fit_error, norm) and its maps by key."""
        projection = cls(settings["kind"], settings["keys"], settings["d_target"], settings["d_explainer"],
                         trainable=trainable)
        with torch.no_grad():
            for key, weight in maps.items():
                projection.weight(key).copy_(weight)
        projection.fit_error = settings["fit_error"]
        projection.norm = settings.get("norm")
        return projection


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
