"""Top-activating contexts per feature, mined shard by shard and merged (streaming top-k).

An exemplar is a window of tokens around the token where a feature fires most in one text, with the
feature's activation at every token of the window; one exemplar per text and feature. Each shard also
contributes windows of a few random texts as negatives (the simulator is scored on both, so a
description that fires everywhere scores low).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from .activations import ActivationBatch


@dataclass
class Window:
    tokens: list[str]
    acts: list[float]  # the feature's activation at each token of the window
    origin: Optional[list[int]] = None  # [activation shard, token index] of a top exemplar's peak

    @property
    def peak(self) -> float:
        return max(self.acts) if self.acts else 0.0


@dataclass
class FeatureExemplars:
    """What the describers, simulators and the report see of one feature."""

    layer: int
    feature: int
    top: list[Window] = field(default_factory=list)  # strongest first
    negatives: list[Window] = field(default_factory=list)
    active_tokens: int = 0  # tokens where the feature fired
    tokens: int = 0  # tokens seen

    @property
    def frequency(self) -> float:
        return self.active_tokens / self.tokens if self.tokens else 0.0

    def windows(self) -> list[Window]:
        """Top exemplars then negatives: the tokens a simulation is scored on."""
        return self.top + self.negatives

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "FeatureExemplars":
        data = dict(data)
        data["top"] = [Window(**w) for w in data["top"]]
        data["negatives"] = [Window(**w) for w in data["negatives"]]
        return cls(**data)


def _window(batch: ActivationBatch, feature_acts: np.ndarray, start: int, end: int, peak: int,
            before: int, after: int, origin: Optional[list[int]] = None) -> Window:
    lo, hi = max(start, peak - before), min(end, peak + after + 1)
    return Window(batch.tokens[lo:hi], [round(float(a), 4) for a in feature_acts[lo:hi]], origin)


def mine_exemplars(batch: ActivationBatch, feature_acts: np.ndarray, layer: int, top_k: int, negatives: int,
                   before: int = 12, after: int = 3, seed: int = 0, shard: int = 0) -> dict[int, FeatureExemplars]:
    """Per feature that fires in the batch: its top_k texts' windows (peaks centred, `before`
    tokens of context, `after` tokens after) and windows of `negatives` random texts.

    feature_acts: [N_tokens, d_sae], rows aligned with batch.tokens. Top windows remember where their
    peak is ([shard, token index]) so the raw activation there can be read back (the ACT set)."""
    text_of = batch.text_of
    if len(text_of) == 0:
        return {}
    texts, starts = np.unique(text_of, return_index=True)  # text_of is grouped by text
    ends = np.append(starts[1:], len(text_of))
    per_text_max = np.maximum.reduceat(feature_acts, starts, axis=0)  # [n_texts, d_sae]
    per_text_arg = np.stack([starts[i] + feature_acts[starts[i]:ends[i]].argmax(0) for i in range(len(texts))])
    active = (feature_acts > 0).sum(0)  # [d_sae]
    rng = random.Random(seed)
    negative_texts = rng.sample(range(len(texts)), min(negatives, len(texts)))
    out: dict[int, FeatureExemplars] = {}
    for f in np.nonzero(active)[0]:
        f = int(f)
        order = np.argsort(-per_text_max[:, f], kind="stable")[:top_k]
        ex = FeatureExemplars(layer, f, active_tokens=int(active[f]), tokens=len(text_of))
        col = feature_acts[:, f]
        ex.top = [_window(batch, col, starts[i], ends[i], per_text_arg[i, f], before, after,
                          [shard, int(per_text_arg[i, f])]) for i in order if per_text_max[i, f] > 0]
        # a negative window is the start of a random text, of the same length as an exemplar's
        ex.negatives = [_window(batch, col, starts[i], ends[i], starts[i] + before, before, after)
                        for i in negative_texts]
        out[f] = ex
    return out


def merge_exemplars(parts: list[dict[int, FeatureExemplars]], top_k: int, negatives: int) -> dict[int, FeatureExemplars]:
    """Merge per-shard exemplars (in shard order): the top_k strongest windows over all shards, the
    first `negatives` negatives, summed counts."""
    merged: dict[int, FeatureExemplars] = {}
    total = 0  # tokens over all shards (a shard's features all saw its every token)
    for part in parts:
        total += next(iter(part.values())).tokens if part else 0
        for f, ex in part.items():
            into = merged.setdefault(f, FeatureExemplars(ex.layer, f))
            into.top = sorted(into.top + ex.top, key=lambda w: -w.peak)[:top_k]
            into.negatives = (into.negatives + ex.negatives)[:negatives]
            into.active_tokens += ex.active_tokens
    for ex in merged.values():
        ex.tokens = total
    return merged
