"""Residual-stream activations of a target over a corpus: the data SAEs are trained on and exemplars
are mined from.

The first position of every text is dropped, as are the tokenizer's special tokens: the first
position is an attention sink whose residual norm is 50-100x the others' (SmolLM2 layer 15: 22,680
vs about 180; Gemma-3-270M: 83,038 vs about 6,000), which an SAE would spend its features on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..patching import clean_runs


@dataclass
class ActivationBatch:
    """Activations of a run of texts, tokens concatenated.

    tokens[i] is the readable string of token i, text_of[i] the index (into the texts given) of the
    text it belongs to; acts[layer] is [N_tokens, d] (float32)."""

    tokens: list[str]
    text_of: np.ndarray  # [N] int
    acts: dict[int, np.ndarray]

    def save(self, path) -> None:
        np.savez(path, tokens=np.array(self.tokens, dtype=object), text_of=self.text_of,
                 layers=np.array(sorted(self.acts)), **{f"layer_{l}": a for l, a in self.acts.items()})

    @classmethod
    def load(cls, path) -> "ActivationBatch":
        with np.load(path, allow_pickle=True) as data:
            return cls(list(data["tokens"]), data["text_of"], {int(l): data[f"layer_{l}"] for l in data["layers"]})

    @classmethod
    def concat(cls, parts: list["ActivationBatch"]) -> "ActivationBatch":
        """One batch of several; text indices are shifted so texts stay distinct."""
        tokens, text_of, offset = [], [], 0
        for p in parts:
            tokens += p.tokens
            text_of.append(p.text_of + offset)
            offset += int(p.text_of.max()) + 1 if len(p.text_of) else 0
        layers = parts[0].acts.keys() if parts else []
        return cls(tokens, np.concatenate(text_of) if text_of else np.zeros(0, dtype=np.int64),
                   {l: np.concatenate([p.acts[l] for p in parts]) for l in layers})


def readable_tokens(tokenizer, ids: list[int]) -> list[str]:
    """Each token as the text it stands for (leading spaces kept: ' cat', not 'Ġcat')."""
    return [tokenizer.decode([i]) for i in ids]


def corpus_activations(model, tokenizer, texts: list[str], layers: list[int], batch_size: int = 16,
                       max_tokens: int = 64) -> ActivationBatch:
    """The residual stream after each of `layers` at every kept token of every text (texts are cut
    to max_tokens tokens)."""
    n_layers = model.config.num_hidden_layers
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the target has {n_layers} layers (0..{n_layers - 1})")
    special = set(tokenizer.all_special_ids)
    tokens: list[str] = []
    text_of: list[int] = []
    acts: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        ids = [torch.tensor(tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"]) for t in chunk]
        for i, (x, (states, _)) in enumerate(zip(ids, clean_runs(model, ids))):
            keep = torch.tensor([int(t) not in special for t in x])
            keep[0] = False  # the attention sink (see the module docstring)
            kept = x[keep].tolist()
            tokens += readable_tokens(tokenizer, kept)
            text_of += [start + i] * len(kept)
            for l in layers:
                acts[l].append(states[l + 1][keep].float())  # states[l + 1]: after layer l
    d = model.config.hidden_size
    return ActivationBatch(tokens, np.array(text_of, dtype=np.int64),
                           {l: (torch.cat(a).numpy() if a else np.zeros((0, d), np.float32)) for l, a in acts.items()})
