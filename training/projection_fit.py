"""Fitting Pi by least squares on paired hidden states of target and explainer (docs/METHOD.md section 1).

Pairing across tokenizers: both models read the same passages; a position pairs when a token of each
ends at the same character of the text (special tokens and each sequence's first token, where hidden
norms are outliers, are left out).

Which explainer layer: a self-explainer reads the target's layer-l state as an input embedding, so a
cross-explainer should read the state its own layers hold at the same relative depth. Target layer l
of L_M pairs with explainer layer round((l + 1) * L_E / L_M) - 1; a block's vector (the mean over its
layers) pairs with the mean over the paired explainer layers.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from selfexplain.groundtruth.errors import ConfigError
from selfexplain.groundtruth.models import ModelSpec, load_model
from selfexplain.groundtruth.patching import clean_runs, decoder_layers
from selfexplain.groundtruth.sources.corpus import load_passages

from .explainer import Projection, ProjectionConfig, ProjectionKind, key_layers


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
