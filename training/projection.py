"""Pi, the map from a target's hidden states to an explainer's input embeddings (docs/METHOD.md section 1):
its settings, the map itself (one matrix per vector key), its initial values, the least-squares fit,
saving and loading. Vector injection (training/explainer.py) applies it.

Fitting pairs hidden states across tokenizers: both models read the same passages; a position pairs when
a token of each ends at the same character of the text (special tokens and each sequence's first token,
where hidden norms are outliers, are left out).

Which explainer layer: a self-explainer reads the target's layer-l state as an input embedding, so a
cross-explainer should read the state its own layers hold at the same relative depth. Target layer l
of L_M pairs with explainer layer round((l + 1) * L_E / L_M) - 1; a block's vector (the mean over its
layers) pairs with the mean over the paired explainer layers.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn

from selfexplain.groundtruth.errors import ConfigError
from selfexplain.groundtruth.models import ModelSpec, load_model
from selfexplain.groundtruth.patching import clean_runs, decoder_layers
from selfexplain.groundtruth.sources.corpus import load_passages

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




def paired_layers(layers: list[int], n_target: int, n_explainer: int) -> list[int]:
    """Explainer layers at the same relative depth as the given target layers."""
    return sorted({max(0, round((l + 1) * n_explainer / n_target) - 1) for l in layers})


def _token_ends(tokenizer, text: str) -> tuple[list[int], dict[int, int]]:
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ends = {}
    content = [n for n, (s, e) in enumerate(enc["offset_mapping"]) if e > s]
    for n in content[1:]:  # the first content token carries outlier norms in some models
        ends[enc["offset_mapping"][n][1]] = n
    return enc["input_ids"], ends


@torch.no_grad()
def paired_states(target, target_tok, explainer, explainer_tok, passages: list[str], keys: list[str],
                  batch_size: int = 32) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per key: (h_target [N, d_t], h_explainer [N, d_e]) at the paired positions of all passages."""
    n_t, n_e = len(decoder_layers(target)), len(decoder_layers(explainer))
    rows_t = {k: [l + 1 for l in key_layers(k)] for k in keys}  # +1: index 0 is the embedding
    rows_e = {k: [l + 1 for l in paired_layers(key_layers(k), n_t, n_e)] for k in keys}
    out: dict[str, tuple[list, list]] = {k: ([], []) for k in keys}
    for start in range(0, len(passages), batch_size):
        chunk = passages[start:start + batch_size]
        sides = [[_token_ends(tok, text) for text in chunk] for tok in (target_tok, explainer_tok)]
        runs_t = clean_runs(target, [torch.tensor(ids) for ids, _ in sides[0]])  # per passage: [L_t + 1, T, d_t]
        runs_e = clean_runs(explainer, [torch.tensor(ids) for ids, _ in sides[1]])
        for run_t, run_e, (_, ends_t), (_, ends_e) in zip(runs_t, runs_e, *sides):
            shared = sorted(set(ends_t) & set(ends_e))
            pos_t, pos_e = [ends_t[c] for c in shared], [ends_e[c] for c in shared]
            for k in keys:  # fp32 on the device: a bf16 mean over a block loses the low bits
                out[k][0].append(run_t.states[rows_t[k]][:, pos_t].float().mean(0))
                out[k][1].append(run_e.states[rows_e[k]][:, pos_e].float().mean(0))
    return {k: (torch.cat(a), torch.cat(b)) for k, (a, b) in out.items()}


def fit_projection(keys: list[str], target_spec: ModelSpec, explainer_spec: ModelSpec, cfg: ProjectionConfig,
                   seed: int, trainable: bool, device: Optional[str] = None) -> Projection:
    """An lstsq Pi fitted on cfg.fit_corpus, with its relative error on the fit passages and on held-out
    ones in fit_error. Both models run on `device` (default: load_model's placement); the solve runs
    in fp64 where the states are. The returned Pi is on the CPU."""
    target, target_tok = load_model(target_spec, device)
    explainer, explainer_tok = ((target, target_tok) if explainer_spec == target_spec
                                else load_model(explainer_spec, device))
    projection = Projection("lstsq", keys, target.config.hidden_size, explainer.config.hidden_size, trainable=trainable)
    passages = load_passages(cfg.fit_corpus, cfg.fit_texts, seed)
    held = max(1, len(passages) // 5)
    fit = paired_states(target, target_tok, explainer, explainer_tok, passages[held:], keys)
    test = paired_states(target, target_tok, explainer, explainer_tok, passages[:held], keys)
    for key in keys:
        h_t, h_e = fit[key]
        if h_t.shape[0] < h_t.shape[1]:
            raise ConfigError(f"lstsq projection for layers {key}: {h_t.shape[0]} paired tokens for a {h_t.shape[1]}-wide "
                             f"target state; raise projection.fit_texts (now {cfg.fit_texts})")
        projection.fit(key, h_t, h_e)
        projection.fit_error[key]["heldout"] = projection.error(key, *test[key])
        projection.fit_error[key]["tokens"] = float(h_t.shape[0])
    errors = ", ".join(f"{k}: {e['heldout']:.3f}" for k, e in projection.fit_error.items())
    print(f"[fit] lstsq Pi {explainer_spec.source} <- {target_spec.source}: held-out relative error {errors}", flush=True)
    return projection


def fitted_projection(path: Path, keys: list[str], target_spec: ModelSpec, explainer_spec: ModelSpec,
                      cfg: ProjectionConfig, seed: int, device: Optional[str] = None) -> Projection:
    """The lstsq Pi kept at `path`, fitted first if the file is missing or was fitted for other keys."""
    trainable = cfg.is_trainable("lstsq")
    if path.exists():
        saved = Projection.load(path, trainable=trainable)
        if saved.kind == "lstsq" and saved.keys == keys:
            return saved
    projection = fit_projection(keys, target_spec, explainer_spec, cfg, seed, trainable, device)
    save_projection(projection, path)
    return projection


def save_projection(projection: Projection, path: Path) -> None:
    """Write a projection atomically (ranks and eval actors may read the path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    projection.save(tmp)
    os.replace(tmp, path)


def initial_projection(path: Path, kind: ProjectionKind, keys: list[str], d_target: int, d_explainer: int,
                       target_spec: Optional[ModelSpec], explainer_spec: ModelSpec, cfg: ProjectionConfig,
                       seed: int, device: Optional[str] = None) -> Projection:
    """The projection an explainer starts from. 'none' and 'random' are built at once (seeded); 'lstsq' is
    fitted once and kept at `path`, so that training ranks and the untrained eval row share it."""
    if kind != "lstsq":
        return Projection(kind, keys, d_target, d_explainer, trainable=cfg.is_trainable(kind), seed=seed)
    if target_spec is None:
        raise ValueError("an lstsq projection needs the target model's spec to be fitted")
    projection = fitted_projection(path, keys, target_spec, explainer_spec, cfg, seed, device)
    if (projection.d_target, projection.d_explainer) != (d_target, d_explainer):
        raise ConfigError(f"{path} maps {projection.d_target} -> {projection.d_explainer}, but the vectors are "
                         f"{d_target}-wide and the explainer {d_explainer}-wide; delete the file to refit")
    return projection
